"""BoneRegistrar: the public entry point used by the nodes, the CLI and outside scripts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
import functools
import logging
from pathlib import Path
import time
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation
import torch

from neural_bone_reg.core.confidence import (check_geometry, cluster_labels, noise_level,
                                             pose_covariance, Precision, precision_bounds,
                                             rigid_error_covariance, uniqueness_z)
from neural_bone_reg.core.config import Configs, registration_preset, RegistrationConfig
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.fields import GridField
from neural_bone_reg.core.io import check_points
from neural_bone_reg.core.neural_reg import HypothesisSet, optimise, robust_cost, StageResult
from neural_bone_reg.core.refine import (constraint_from_linearisation, Linearisation,
                                         linearise, refine_icp, SurfaceModel)
from neural_bone_reg.core.runtime import default_cache_dir
from neural_bone_reg.core.se3 import fps_rotations, geodesic_deg, make_transform
from neural_bone_reg.core.udf import load_checkpoint, train_or_load, UdfModel

LOG = logging.getLogger(__name__)

#: Cloud points used to find where each rotated cloud fits inside the bone's bounding box.
BOX_SAMPLE_POINTS = 256
#: Rotations used to judge how much room the cloud has inside the bone.
BOX_PROBE_ROTATIONS = 256
#: The rotated cloud's extent is taken between these percentiles (robust to outliers).
BOX_PERCENTILE = 2.0
#: Translation starts are spaced this far apart along the free room in the bone (mm).
ANCHOR_SPACING_MM = 40.0
#: At most this many translation starts; the hypotheses are shared out among them.
MAX_ANCHORS = 8
#: A cloud wider than this multiple of the bone's diagonal cannot be a patch of it.
MAX_CLOUD_TO_BONE_EXTENT = 1.5
#: ICP runs on at most this many points of the cloud (seeded subset); scoring uses all.
ICP_POINTS = 3000
#: A cloud whose measured point noise exceeds this (mm) is polished on all its points, not
#: the ICP_POINTS subset (specimen00's whole clouds measure 1.3-1.7 mm as acquired).
NOISY_CLOUD_MM = 2.0
#: Successive halving in the coarse stage keeps at least this many hypotheses per fine one.
COARSE_SURVIVORS_PER_FINE = 4
#: Candidates are refined on this many of the ICP points; the winner then on all of them.
CANDIDATE_ICP_POINTS = 1000
#: The uniqueness test's alternative must be an optimum, not a pose ICP left moving: one still
#: moving (last step above MAX_LAST_STEP_MM) is refined for up to this many times
#: ``refine_iterations`` more, and at most this many alternatives are so continued. On
#: specimen00's right femur with 2 mm of noise, alternatives 11-18 deg from the winner were
#: still moving 1.7-2.3 mm per step after 60 steps: sliding into the winner, they read as close
#: alternatives (z 4.7-5.7) and refused correct fits.
ALTERNATIVE_ITERATION_FACTOR = 3
MAX_ALTERNATIVE_EXTENSIONS = 3
#: At most this many reserve poses are refined looking for a distinct alternative (about 50 ms
#: each on 2 cores); past them uniqueness is unmeasured and the result refused. It bounds the
#: time of a cloud whose every candidate slides into one pose.
MAX_RESERVE_REFINES = 8
#: A cloud narrower than this share of the bone's diagonal is a patch: its hypotheses start on
#: the bone surface, with the patch's normal along the surface normal (see _surface_poses).
#: It was 0.6: two femoral 60 mm patches of seed 3 that spanned more started as full sweeps
#: do, and the search missed the truth's basin (found 166-179 deg off, fitting worse).
PATCH_FRACTION = 0.8
#: A cloud narrower than this share of the bone's diagonal is a short sweep: it carries
#: ``patch_fine_top_k`` hypotheses to the fine stage. specimen00's full sweeps span 0.95-0.99
#: of it, its 60 mm patches 0.37-0.69.
SHORT_SWEEP_FRACTION = 0.8
#: Patch hypotheses start at surface samples one per cube of this edge (mm), so a bigger bone
#: gets more anchors.
SURFACE_ANCHOR_SPACING_MM = 8.0
#: Spins about the surface normal tried at each anchor and normal sign.
SURFACE_SPINS = 16
#: Surface normals at the anchors are averaged over this radius (mm), on the same side.
ANCHOR_NORMAL_RADIUS_MM = 6.0
#: A patch's start poses put its pivot (the point nearest its centroid) on a surface anchor,
#: with the pivot's normal, from the points within this radius (mm), on the anchor's normal.
PIVOT_NORMAL_RADIUS_MM = 6.0
#: Fewer points than this around the pivot: the whole patch's thinnest axis is the normal.
MIN_PIVOT_POINTS = 10
#: The patch's middle (for its sag) is the points within this share of its lateral radius.
PATCH_MIDDLE_SHARE = 0.3
#: Surface start poses are pre-scored this many at a time.
PRESCREEN_BATCH = 4096
#: Fine poses are re-scored on the whole cloud this many at a time (bounds the memory).
RESCORE_BATCH = 8
#: The cost ratio reported as ``ambiguity`` never divides by less than this (mm).
AMBIGUITY_COST_FLOOR_MM = 0.05
#: Guidance looks for disagreement on at most this many bone surface samples ...
GUIDANCE_SAMPLES = 4000
#: ... within this distance (mm) of the target (where the sweep is).
GUIDANCE_RADIUS_MM = 80.0
#: Tracking ICP: at most this many iterations, stopping once a step moves less than the
#: tolerance (mm). Its own settings: tracking is ICP, whatever ``refine`` says for ``register``.
TRACK_ICP_ITERATIONS = 30
TRACK_ICP_TOLERANCE_MM = 0.03
#: A tracked fit whose ICP still moves more than this per step (mm) has not settled; one that
#: stops the iterations while creeping below it (noise-level jitter) is accepted.
TRACK_MAX_LAST_STEP_MM = 0.1
#: A registered fit whose ICP still moved more than this on its last step (mm) is refused:
#: the covariance and the gates describe a converged fit.
MAX_LAST_STEP_MM = 0.1
#: The cluster-robust statistics (uniqueness, covariance) rest on the spread of cluster sums:
#: fewer clusters than this are too few to estimate it. Bench clouds of specimen00 have 24-50
#: clusters of 10 mm in a 25 mm patch, 78-202 in a 60 mm one, 297-733 in a full sweep.
MIN_CLUSTERS = 20
#: How the refusals of the gates that calibration takes as given begin (convergence, clusters,
#: an alternative to compare with, noise in range): ``benchmarks/calibrate_gates.py`` replays
#: every other gate under each setting it scores, and keeps these refusals as they were.
FIXED_GATE_REASONS = ('not converged', 'too few independent regions', 'uniqueness not measured',
                      'too noisy')
#: The tiny search of ``warm_up`` on this many surface points: every stage runs, briefly.
WARM_UP_POINTS = 400
WARM_UP_CONFIG = dict(num_hypotheses=32, coarse_iterations=2, coarse_prune_every=0, fine_top_k=4,
                      patch_fine_top_k=4, fine_iterations=2, fine_points=64, final_candidates=2,
                      refined_candidates=1,
                      refine_iterations=2, min_points=3)
#: A prior whose 3x3 block is farther than this from orthonormal is not a rotation.
PRIOR_ORTHONORMAL_TOLERANCE = 1e-4


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return the requested device; None or 'auto' means CUDA when present, else the CPU."""
    if device is None or str(device) == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device} requested but CUDA is not available; use cpu or auto')
    return device


@functools.lru_cache(maxsize=8)
def _fps_rotations_cached(count: int, seed: int) -> np.ndarray:
    return fps_rotations(count, seed)


@dataclass(frozen=True)
class RegistrationResult:
    """A registration with its confidence. ``transform`` maps input points into the bone frame.

    ``method`` is 'global' (``register``: search from no initial guess) or 'track'
    (``track``: local refinement from the previous pose; ``ambiguity`` is then nan, not
    measured, and ``step_deg`` / ``step_mm`` say how far the pose moved from the prior).
    """

    transform: np.ndarray
    accepted: bool
    residual_mm: float
    inlier_fraction: float
    ambiguity: float
    rejection_reasons: tuple[str, ...]
    n_points: int
    time_s: float
    timings: dict[str, float] = field(default_factory=dict)
    alternative_transform: np.ndarray | None = None
    candidates_refined: int = 0
    constraint: float = float('nan')
    """How well the fit pins all six degrees of freedom (see ``refine.constraint_ratio``)."""
    method: str = 'global'
    step_deg: float = float('nan')
    step_mm: float = float('nan')
    covariance: np.ndarray = field(default_factory=lambda: np.full((6, 6), np.inf))
    """(6, 6) covariance of the error of ``transform``, a small rigid motion applied on the left
    in the bone frame, ``T_true ~ exp(delta) @ transform``, delta = (tx, ty, tz) mm then
    (rx, ry, rz) rad. Cluster-robust: see ``core.confidence``. Infinite when not measured."""
    bound_mm: float = float('inf')
    """95 % bound of the position at the cloud centroid (or ``precision_target_mm``), mm."""
    bound_deg: float = float('inf')
    """95 % bound of the rotation, degrees."""
    uniqueness_z: float = float('nan')
    """Standard errors by which the best pose fits better than the best distinct alternative."""
    uniqueness_margin_mm: float = float('nan')
    """Mean per-point truncated distance of the alternative minus that of the best, mm."""
    noise_mm: float = float('nan')
    """The cloud's point noise measured at the fit (robust spread within clusters), mm."""
    guidance: str = ''
    """For a refused result: where more data would help (least-constrained direction, where
    candidate poses disagree). Empty when accepted."""

    def summary(self) -> dict[str, Any]:
        """Return a JSON-able dict of the result."""
        return {
            'transform': self.transform.tolist(),
            'accepted': self.accepted,
            'residual_mm': self.residual_mm,
            'inlier_fraction': self.inlier_fraction,
            'ambiguity': self.ambiguity,
            'rejection_reasons': list(self.rejection_reasons),
            'n_points': self.n_points,
            'time_s': self.time_s,
            'timings': dict(self.timings),
            'alternative_transform': (None if self.alternative_transform is None
                                      else self.alternative_transform.tolist()),
            'constraint': self.constraint,
            'method': self.method,
            'step_deg': self.step_deg,
            'step_mm': self.step_mm,
            'covariance': self.covariance.tolist(),
            'bound_mm': self.bound_mm,
            'bound_deg': self.bound_deg,
            'uniqueness_z': self.uniqueness_z,
            'uniqueness_margin_mm': self.uniqueness_margin_mm,
            'noise_mm': self.noise_mm,
            'guidance': self.guidance,
        }


class BoneRegistrar:
    """Registers partial bone clouds to one patient's bone, through its neural UDF."""

    def __init__(self, model: UdfModel, config: RegistrationConfig | None = None,
                 device: str | torch.device | None = None) -> None:
        self.model = model
        self.config = config or RegistrationConfig()
        self.device = resolve_device(device)
        self.surface = SurfaceModel.build(model.surface_points, model.surface_normals)
        self._grid_field = GridField(model.grid, self.device)
        self._neural_field = model.field.to(self.device).requires_grad_(False)
        self._bone_diagonal = float(np.linalg.norm(np.ptp(self.surface.points, axis=0)))
        self._bone_lo = self.surface.points.min(axis=0)
        self._bone_hi = self.surface.points.max(axis=0)
        self._anchors: tuple[np.ndarray, np.ndarray] | None = None

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_mesh(cls, path: str | Path, device: str | torch.device | None = None,
                  cache_dir: str | Path | None = None, *, configs: Configs | None = None,
                  preset: str = 'default', progress: Any = None,
                  **overrides: Any) -> 'BoneRegistrar':
        """Load the bone's UDF from the cache, or train it; ``overrides`` set registration."""
        configs = configs or Configs(registration=registration_preset(preset))
        if overrides:
            configs = Configs(configs.udf, configs.train,
                              replace(configs.registration, **overrides))
        dev = resolve_device(device)
        model = train_or_load(path, cache_dir or default_cache_dir(), configs.udf, configs.train,
                              device=dev, progress=progress)
        return cls(model, configs.registration, dev)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device | None = None, *,
                        registration: RegistrationConfig | None = None) -> 'BoneRegistrar':
        """Build a registrar from a UDF checkpoint alone (as the preop loader publishes it)."""
        return cls(load_checkpoint(path), registration, device)

    @property
    def checkpoint_path(self) -> Path | None:
        """Return the checkpoint file of the UDF (None if it was never saved)."""
        return self.model.checkpoint_path

    @property
    def geometry_sha256(self) -> str:
        """Return the sha256 of the source geometry the UDF was trained on."""
        return self.model.geometry_sha256

    @property
    def surface_points(self) -> np.ndarray:
        """Return surface samples (M, 3) float32 of the bone, in the bone frame, mm."""
        return self.model.surface_points

    def with_config(self, config: RegistrationConfig) -> 'BoneRegistrar':
        """Return a registrar sharing this one's field, with another registration config."""
        clone = object.__new__(BoneRegistrar)
        clone.__dict__.update(self.__dict__)
        clone.config = config
        return clone

    def warm_up(self) -> float:
        """Run one tiny registration so the first real one does not pay torch's start-up.

        torch imports its compiler stack on the first optimiser step and allocates its pools
        on the first passes (about 1.5 s on a CPU); a node calls this after loading a model.
        It also computes the surface's curvature, which the first noisy cloud would otherwise
        wait for (under a second). Returns the seconds it took.
        """
        start = time.perf_counter()
        self.surface.mean_curvature  # computed once, cached on the shared surface
        tiny = replace(self.config, **WARM_UP_CONFIG)
        sample = self.surface.points[:: max(len(self.surface.points) // WARM_UP_POINTS, 1)]
        self.with_config(tiny).register(sample)
        return time.perf_counter() - start

    # -- registration -------------------------------------------------------------------------

    def field(self, backend: str | None = None):
        """Return the distance backend ('grid' or 'neural') as a callable on torch points."""
        neural = (backend or self.config.backend) == 'neural'
        return self._neural_field if neural else self._grid_field

    def validate(self, points: np.ndarray) -> np.ndarray:
        """Return the finite points as float64 (N, 3), or raise InputError saying what is wrong."""
        cfg = self.config
        pts = check_points(points, name='cloud', min_points=cfg.min_points)
        extent = float(np.linalg.norm(np.ptp(pts, axis=0)))
        if extent > MAX_CLOUD_TO_BONE_EXTENT * self._bone_diagonal:
            raise InputError(f'cloud spans {extent:.0f} mm but the bone is only '
                             f'{self._bone_diagonal:.0f} mm across; expected a patch of this bone '
                             'in mm (wrong units or a scene cloud?)')
        return pts

    def register(self, points: np.ndarray) -> RegistrationResult:
        """Register a partial cloud (N, 3) in mm, in any frame, to the bone; see the module doc.

        Stages: prepare (validate, refuse degenerate geometry, subsample), search (coarse then
        fine NeuralReg over all hypotheses), rescore (the fine poses on the whole cloud, kept
        distinct), refine (ICP on the best distinct candidates) and assess (fit, uniqueness,
        covariance, precision, guidance).
        """
        start = time.perf_counter()
        timings: dict[str, float] = {}
        prep = self._prepare(points)
        tick = time.perf_counter()
        coarse, anchors = self._coarse(prep)
        timings['coarse_s'] = time.perf_counter() - tick
        tick = time.perf_counter()
        fine = self._fine(prep, coarse)
        timings['fine_s'] = time.perf_counter() - tick
        tick = time.perf_counter()
        candidates = self._rescore(prep, fine)
        timings['rescore_s'] = time.perf_counter() - tick
        tick = time.perf_counter()
        refined = self._refine(prep, candidates)
        timings['refine_s'] = time.perf_counter() - tick
        tick = time.perf_counter()
        result = self._assess(prep, refined)
        timings['assess_s'] = time.perf_counter() - tick
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        timings.update(coarse_iterations=coarse.iterations, fine_iterations=fine.iterations,
                       anchors=anchors)
        return replace(result, time_s=time.perf_counter() - start, timings=timings)

    # -- registration stages ------------------------------------------------------------------

    def _prepare(self, points: np.ndarray) -> '_Prepared':
        """Validate, refuse degenerate geometry, subsample; return the cloud on the device."""
        cfg = self.config
        pts = self.validate(points)
        check_geometry(pts)
        rng = np.random.default_rng(cfg.seed)
        if len(pts) > cfg.max_points:
            pts = pts[np.sort(rng.choice(len(pts), cfg.max_points, replace=False))]
        centroid = pts.mean(axis=0)
        cloud = torch.as_tensor(pts, dtype=torch.float32, device=self.device)
        extent = float(np.linalg.norm(np.ptp(pts, axis=0)))
        icp_pts = pts if len(pts) <= ICP_POINTS else pts[
            rng.choice(len(pts), ICP_POINTS, replace=False)]
        return _Prepared(pts, centroid, cloud,
                         torch.as_tensor(centroid, dtype=torch.float32, device=self.device),
                         rng, extent < PATCH_FRACTION * self._bone_diagonal,
                         extent < SHORT_SWEEP_FRACTION * self._bone_diagonal, icp_pts)

    def _subset(self, prep: '_Prepared', count: int) -> torch.Tensor:
        """Return a seeded subset of ``count`` cloud points (all when fewer) on the device."""
        n = len(prep.points)
        pick = prep.rng.choice(n, min(count, n), replace=False)
        return prep.cloud[torch.as_tensor(pick, device=self.device)]

    def _coarse(self, prep: '_Prepared') -> tuple[StageResult, int]:
        """Optimise all hypotheses on a few points with successive halving."""
        cfg = self.config
        coarse_pts = self._subset(prep, cfg.patch_coarse_points if prep.is_patch
                                  else cfg.coarse_points)
        top_k = self._top_k(prep)
        if prep.is_patch:
            rotations_np, landing_np, anchors = self._surface_poses(prep, coarse_pts)
        else:
            rotations_np, landing_np, anchors = self._initial_poses(
                prep.points - prep.centroid, prep.rng, cfg.num_hypotheses)
            keep = max(int(cfg.num_hypotheses * cfg.optimised_share), top_k)
            rotations_np, landing_np = self._prescreen(rotations_np, landing_np, prep,
                                                       coarse_pts, keep)
        dtype = torch.float32
        rotations = torch.as_tensor(rotations_np, dtype=dtype, device=self.device)
        landing = torch.as_tensor(landing_np, dtype=dtype, device=self.device)
        hyps = HypothesisSet(rotations, landing, prep.centroid_t, cfg.latent_dim,
                             cfg.backbone_dim, cfg.translation_scale_mm, cfg.seed)
        coarse = optimise(hyps, self.field(), coarse_pts, cfg.coarse_iterations,
                          cfg.learning_rate, cfg.robust_scale_mm, cfg.early_stop_tolerance,
                          top_k, cfg.coarse_prune_every, cfg.coarse_prune_keep,
                          min_survivors=min(COARSE_SURVIVORS_PER_FINE * top_k,
                                            len(rotations_np)))
        return coarse, anchors

    def _top_k(self, prep: '_Prepared') -> int:
        """Return how many hypotheses go from the coarse to the fine stage for this cloud."""
        cfg = self.config
        return cfg.patch_fine_top_k if prep.is_short else cfg.fine_top_k

    def _fine(self, prep: '_Prepared', coarse: StageResult) -> StageResult:
        """Optimise the best K distinct coarse poses on many points.

        Keeping them distinct preserves the alternatives the uniqueness test needs.
        """
        cfg = self.config
        order = torch.argsort(coarse.cost).cpu().numpy()
        keep = self._distinct(order, coarse.rotation.double().cpu().numpy(),
                              coarse.translation.double().cpu().numpy(), prep.centroid,
                              self._top_k(prep))
        top = torch.as_tensor(keep, device=self.device)
        landing_k = coarse.rotation[top] @ prep.centroid_t + coarse.translation[top]
        fine_hyps = HypothesisSet(coarse.rotation[top], landing_k, prep.centroid_t,
                                  cfg.latent_dim, cfg.backbone_dim, cfg.translation_scale_mm,
                                  cfg.seed + 1)
        fine_pts = self._subset(prep, cfg.fine_points)
        return optimise(fine_hyps, self.field(), fine_pts, cfg.fine_iterations,
                        cfg.learning_rate / 2, cfg.robust_scale_mm, cfg.early_stop_tolerance,
                        cfg.final_candidates)

    def _rescore(self, prep: '_Prepared',
                 fine: StageResult) -> list[tuple[np.ndarray, np.ndarray]]:
        """Return the fine poses as (R, t), best first on the whole cloud, kept distinct.

        All of them, not only ``final_candidates``: ``_refine`` refines the first
        ``refined_candidates`` and keeps the rest as its reserve, refined in turn only while
        the uniqueness test lacks a distinct alternative.
        """
        cfg = self.config
        with torch.no_grad():
            whole = torch.cat([
                robust_cost(self.field(), fine.rotation[i:i + RESCORE_BATCH],
                            fine.translation[i:i + RESCORE_BATCH], prep.cloud,
                            cfg.robust_scale_mm)
                for i in range(0, len(fine.cost), RESCORE_BATCH)])
        order = torch.argsort(whole).cpu().numpy()
        rot = fine.rotation.double().cpu().numpy()
        tr = fine.translation.double().cpu().numpy()
        keep = self._distinct(order, rot, tr, prep.centroid, len(order))
        return [(rot[i], tr[i]) for i in keep]

    def _refine(self, prep: '_Prepared',
                candidates: list[tuple[np.ndarray, np.ndarray]]) -> list['_Candidate']:
        """ICP-refine the best distinct candidates; return them best first (truncated cost).

        Every candidate is refined on ``CANDIDATE_ICP_POINTS`` of the ICP points, with the
        full iteration budget, and judged on the whole cloud; the winner is then polished on
        all the ICP points, whose linearisation the covariance uses. Wrong candidates rarely
        converge (they creep along the surface for all their iterations), so this is where
        refining spends its time: 3 times less of it this way, for the same alternatives.
        """
        cfg = self.config
        icp_pts = prep.icp_points
        subset = icp_pts[::max(len(icp_pts) // CANDIDATE_ICP_POINTS, 1)]
        refined = [self._candidate(prep, subset, rot, tr)
                   for rot, tr in candidates[:min(cfg.refined_candidates, len(candidates))]]
        refined.sort(key=lambda item: item.cost)
        # ICP can bring two candidates to one optimum: keep the first of each.
        distinct: list[_Candidate] = []
        for cand in refined:
            if all(self._is_distinct(cand.rotation, cand.translation, kept.rotation,
                                     kept.translation, prep.centroid) for kept in distinct):
                distinct.append(cand)
        distinct = self._alternative(prep, subset, distinct, iter(candidates[len(refined):]))
        if len(subset) < len(icp_pts):
            distinct[0] = self._candidate(prep, icp_pts, distinct[0].rotation,
                                          distinct[0].translation)
        fit_pts, noise_var = self._fit_points(prep.points, icp_pts, distinct[0].rotation,
                                              distinct[0].translation)
        if fit_pts is not icp_pts:
            distinct[0] = self._candidate(prep, fit_pts, distinct[0].rotation,
                                          distinct[0].translation, noise_var)
        return distinct

    def _alternative(self, prep: '_Prepared', subset: np.ndarray, distinct: list['_Candidate'],
                     reserve: Iterator[tuple[np.ndarray, np.ndarray]]) -> list['_Candidate']:
        """Make ``distinct[1]``, the uniqueness test's alternative, a converged distinct pose.

        When every refined candidate converged to one pose, further candidates from
        ``reserve`` are refined until one stays distinct, at most ``MAX_RESERVE_REFINES``
        (else uniqueness is unmeasured). An
        alternative ICP left moving is refined further (``ALTERNATIVE_ITERATION_FACTOR``); one
        that so joins another candidate's pose is dropped and the next takes its place.
        """
        extensions = drawn = 0
        while True:
            while len(distinct) < 2:
                pose = next(reserve, None) if drawn < MAX_RESERVE_REFINES else None
                if pose is None:
                    return distinct
                drawn += 1
                cand = self._candidate(prep, subset, *pose)
                if self._is_distinct(cand.rotation, cand.translation, distinct[0].rotation,
                                     distinct[0].translation, prep.centroid):
                    distinct.append(cand)
                    distinct.sort(key=lambda item: item.cost)
            alt = distinct[1]
            if (alt.last_step_mm <= MAX_LAST_STEP_MM or extensions >= MAX_ALTERNATIVE_EXTENSIONS
                    or not self._refining):
                return distinct
            extensions += 1
            cont = self._candidate(prep, subset, alt.rotation, alt.translation,
                                   iterations=ALTERNATIVE_ITERATION_FACTOR
                                   * self.config.refine_iterations)
            others = distinct[:1] + distinct[2:]
            if all(self._is_distinct(cont.rotation, cont.translation, kept.rotation,
                                     kept.translation, prep.centroid) for kept in others):
                others.append(cont)
            distinct = sorted(others, key=lambda item: item.cost)

    def _fit_points(self, points: np.ndarray, icp_pts: np.ndarray, rotation: np.ndarray,
                    translation: np.ndarray) -> tuple[np.ndarray, float]:
        """Return the points the winner's final fit and covariance use, and their noise bias.

        A noisy cloud (measured point noise sigma above ``NOISY_CLOUD_MM`` on ``icp_pts`` at the
        pose) is polished on all its ``points``, with its residuals de-biased for that noise
        (``noise_var_mm2`` = sigma^2 of ``refine.linearise``). On specimen00 with added noise,
        ICP from the truth lands about half as far from the clean optimum on 20,000 points as on
        3,000 (2 mm), and the de-biasing halves the centroid error again (4 mm: 1.3-1.7 mm on
        the femurs without it, 0.6-0.9 mm with it). A clean cloud: ``(icp_pts, 0.0)``.
        """
        if len(points) <= len(icp_pts):
            return icp_pts, 0.0
        lin = linearise(self.surface, icp_pts @ rotation.T + translation,
                        self.config.robust_scale_mm)
        noise_var = 0.0 if lin is None else _noise_to_debias(self._cluster_noise(lin)[2])
        return (points, noise_var) if noise_var > 0.0 else (icp_pts, 0.0)

    def _cluster_noise(self, lin: Linearisation) -> tuple[np.ndarray, int, float]:
        """Return the clusters of ``lin``'s surface points (labels, count) and their noise (mm)."""
        labels, n_clusters = cluster_labels(lin.surface_points, self.config.cluster_mm)
        return labels, n_clusters, noise_level(lin.residual, labels, n_clusters)

    @property
    def _refining(self) -> bool:
        """Whether candidates are refined by ICP at all (``refine`` with a step budget)."""
        return self.config.refine and self.config.refine_iterations > 0

    def _candidate(self, prep: '_Prepared', icp_pts: np.ndarray, rotation: np.ndarray,
                   translation: np.ndarray, noise_var_mm2: float = 0.0,
                   iterations: int | None = None) -> '_Candidate':
        """Refine one pose by ICP on ``icp_pts`` (if refining) and score it on the cloud.

        ``noise_var_mm2``: the de-biasing of ``refine.linearise`` (0: none); ``iterations``:
        the ICP budget (default ``refine_iterations``).
        """
        cfg = self.config
        last_step = float('inf')  # not refined: not a converged fit
        if self._refining:
            icp = refine_icp(self.surface, icp_pts, rotation, translation, cfg.robust_scale_mm,
                             iterations or cfg.refine_iterations, cfg.refine_tolerance_mm,
                             noise_var_mm2)
            rotation, translation, last_step = icp.rotation, icp.translation, icp.last_step_mm
        dist = self.surface.distances(prep.points @ rotation.T + translation)
        truncated = np.minimum(dist, cfg.inlier_threshold_mm)
        return _Candidate(float(truncated.mean()), rotation, translation, dist, truncated,
                          icp_pts, noise_var_mm2, last_step)

    def _assess(self, prep: '_Prepared', refined: list['_Candidate']) -> RegistrationResult:
        """Judge the best candidate: fit, uniqueness, covariance, precision; say why not."""
        cfg = self.config
        best = refined[0]
        pts = prep.points
        moved = pts @ best.rotation.T + best.translation
        residual, inlier_fraction = self._fit_quality(best.distances)
        # The covariance of the estimate ICP made: from the points ICP used.
        lin = linearise(self.surface, best.icp_points @ best.rotation.T + best.translation,
                        cfg.robust_scale_mm, best.noise_var_mm2)
        target = self._precision_point(moved.mean(axis=0))
        constraint = constraint_from_linearisation(lin)
        covariance, precision, noise = self._covariance(lin, target)
        reasons = self._fit_reasons(residual, inlier_fraction, noise)
        if not best.last_step_mm <= MAX_LAST_STEP_MM:
            reasons.append('not converged: ICP still moved the cloud '
                           f'{best.last_step_mm:.2f} mm on its last step (gate '
                           f'{MAX_LAST_STEP_MM} mm; refine is off or refine_iterations too few)')
        # Uniqueness: the best against the best distinct alternative, cluster by cluster.
        alternative, ambiguity, z_score, margin = None, 0.0, float('nan'), float('nan')
        labels_all, n_all = cluster_labels(moved, cfg.cluster_mm)
        if n_all < MIN_CLUSTERS:
            reasons.append(f'too few independent regions: the cloud covers {n_all} clusters of '
                           f'{cfg.cluster_mm:g} mm; expected at least {MIN_CLUSTERS} to measure '
                           'uniqueness and covariance')
        if len(refined) < 2:
            reasons.append(f'uniqueness not measured: the {len(refined)} refined candidate '
                           'converged to one pose, so no distinct alternative was there to '
                           'compare it with')
        else:
            alt = refined[1]
            alternative = make_transform(alt.rotation, alt.translation)
            ambiguity = min(best.cost / max(alt.cost, AMBIGUITY_COST_FLOOR_MM), 1.0)
            z_score, margin, _ = uniqueness_z(best.truncated, alt.truncated, labels_all, n_all)
            if not z_score >= cfg.gate_min_uniqueness_z:
                reasons.append(
                    f'ambiguous: a distinct pose ({_pose_gap(best, alt, prep.centroid)}) fits '
                    f'only {margin:.3f} mm worse per point, {z_score:.1f} standard errors '
                    f'(gate {cfg.gate_min_uniqueness_z})')
        reasons += self._precision_reasons(precision)
        bound_mm, bound_deg = _bound(precision, 'bound_mm'), _bound(precision, 'bound_deg')
        guidance = self._guidance(reasons, precision, best, refined, target, prep)
        return RegistrationResult(
            transform=make_transform(best.rotation, best.translation), accepted=not reasons,
            residual_mm=residual, inlier_fraction=inlier_fraction, ambiguity=float(ambiguity),
            rejection_reasons=tuple(reasons), n_points=len(pts), time_s=0.0,
            alternative_transform=alternative, candidates_refined=len(refined),
            constraint=constraint, covariance=covariance, bound_mm=bound_mm,
            bound_deg=bound_deg, uniqueness_z=float(z_score), uniqueness_margin_mm=margin,
            noise_mm=noise, guidance=guidance)

    def _covariance(self, lin: Linearisation | None, target: np.ndarray,
                    clusters: tuple[np.ndarray, int, float] | None = None
                    ) -> tuple[np.ndarray, Precision | None, float]:
        """Return a fit's pose covariance, its bounds at ``target`` and the point noise (mm).

        ``clusters``: :meth:`_cluster_noise` of ``lin`` where the caller has it already.
        """
        cfg = self.config
        if lin is None:
            return np.full((6, 6), np.inf), None, float('nan')
        labels, n_clusters, noise = clusters or self._cluster_noise(lin)
        systematic = float(np.hypot(cfg.systematic_error_mm,
                                    cfg.systematic_noise_gain * noise ** 2))
        covariance = pose_covariance(lin.points, lin.normals, lin.residual, lin.weight,
                                     labels, n_clusters, scale=cfg.covariance_scale,
                                     systematic_mm=systematic,
                                     correlation_mm=cfg.systematic_length_mm)
        covariance = covariance + rigid_error_covariance(
            lin.points.mean(axis=0), cfg.rigid_error_mm, cfg.rigid_error_deg)
        if not np.isfinite(covariance).all():  # nan noise: every point alone in its cluster
            return np.full((6, 6), np.inf), None, noise
        return covariance, precision_bounds(covariance, target), noise

    def _precision_reasons(self, precision: Precision | None) -> list[str]:
        """Return why the 95 % bounds fail the precision gates (empty when they pass)."""
        cfg = self.config
        bound_mm, bound_deg = _bound(precision, 'bound_mm'), _bound(precision, 'bound_deg')
        where = 'the target' if cfg.precision_at_target else 'the cloud centroid'
        reasons = []
        if not bound_mm <= cfg.gate_max_bound_mm:
            reasons.append(f'imprecise: 95 % bound {bound_mm:.2f} mm at {where} '
                           f'(gate {cfg.gate_max_bound_mm} mm)')
        if not bound_deg <= cfg.gate_max_bound_deg:
            reasons.append(f'imprecise: 95 % rotation bound {bound_deg:.2f} deg '
                           f'(gate {cfg.gate_max_bound_deg} deg)')
        return reasons

    def _guidance(self, reasons: list[str], precision: Precision | None, best: '_Candidate',
                  refined: list['_Candidate'], target: np.ndarray, prep: '_Prepared') -> str:
        """Say where more data would help when the result is refused; '' when accepted."""
        if not reasons:
            return ''
        advice = []
        if precision is not None and np.isfinite(precision.bound_mm):
            axis = np.round(precision.weakest_translation, 2).tolist()
            spin = np.round(precision.weakest_rotation_axis, 2).tolist()
            advice.append(f'least constrained: translation along bone-frame {axis}, rotation '
                          f'about {spin}; extend the sweep across that direction')
        if len(refined) > 1:
            alt = refined[1]
            # The bone surface where the best and the alternative pose disagree most, among the
            # places the alternative would put the cloud: scanning there decides between them.
            relative = make_transform(alt.rotation, alt.translation) @ np.linalg.inv(
                make_transform(best.rotation, best.translation))
            surface = self.surface.points[:: max(len(self.surface.points) // GUIDANCE_SAMPLES,
                                                 1)]
            shift = np.linalg.norm(surface @ relative[:3, :3].T + relative[:3, 3] - surface,
                                   axis=1)
            near = np.linalg.norm(surface - target, axis=1) <= GUIDANCE_RADIUS_MM
            pool = np.flatnonzero(near) if near.any() else np.arange(len(surface))
            spot = surface[pool[np.argmax(shift[pool])]]
            advice.append(f'candidate poses disagree most ({shift[pool].max():.0f} mm) near '
                          f'bone point {np.round(spot, 0).tolist()} mm: add points there')
        if not advice:
            advice.append('no usable fit: acquire a larger patch of this bone')
        return '; '.join(advice)

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        """Follow a pose known from the previous frame: robust ICP from ``prior``, gated.

        The video-rate path after a global ``register``: no search, so it holds only while the
        bone moves less than ``track_max_rotation_deg`` and ``track_max_translation_mm``
        between frames. ``prior`` is the last accepted 4x4 (input frame to bone frame). The
        result is accepted only if the residual, inlier and ``track_min_constraint`` gates pass,
        the ICP settled (its last step under ``TRACK_MAX_LAST_STEP_MM``) and the step from
        ``prior`` is within those bounds; otherwise the caller should fall back to
        ``register``. Ambiguity is not measured (nan): continuity with an accepted pose
        stands in for it. A cloud noisier than ``NOISY_CLOUD_MM`` gets a second ICP
        de-biased for its measured noise, as in ``register``.
        """
        start = time.perf_counter()
        cfg = self.config
        pts = self.validate(points)
        rot0, tr0 = _check_prior(prior)
        rng = np.random.default_rng(cfg.seed)
        if len(pts) > cfg.max_points:
            pts = pts[np.sort(rng.choice(len(pts), cfg.max_points, replace=False))]
        icp_pts = pts if len(pts) <= cfg.track_points else pts[
            rng.choice(len(pts), cfg.track_points, replace=False)]
        check_geometry(icp_pts)  # on the ICP subset: cheap at video rate
        icp = refine_icp(self.surface, icp_pts, rot0, tr0, cfg.robust_scale_mm,
                         TRACK_ICP_ITERATIONS, TRACK_ICP_TOLERANCE_MM)
        rot, tr = icp.rotation, icp.translation
        # One linearisation of the ICP subset gives the fit statistics (its matches' distances:
        # no second query), the constraint and the covariance.
        moved = icp_pts @ rot.T + tr
        lin = linearise(self.surface, moved, cfg.robust_scale_mm)
        clusters = None if lin is None else self._cluster_noise(lin)
        noise_var = 0.0 if clusters is None else _noise_to_debias(clusters[2])
        if noise_var > 0.0:  # a noisy cloud: de-bias the fit as ``register`` does
            icp = refine_icp(self.surface, icp_pts, rot, tr, cfg.robust_scale_mm,
                             TRACK_ICP_ITERATIONS, TRACK_ICP_TOLERANCE_MM, noise_var)
            rot, tr = icp.rotation, icp.translation
            moved = icp_pts @ rot.T + tr
            lin = linearise(self.surface, moved, cfg.robust_scale_mm, noise_var)
            clusters = None  # of the refitted linearisation: measured again
        centroid = pts.mean(axis=0)
        step_deg = float(geodesic_deg(rot, rot0))
        step_mm = float(np.linalg.norm((rot - rot0) @ centroid + tr - tr0))
        # Unmatched points are outliers, unless the inlier threshold is set wider than that;
        # de-biased residuals are not distances.
        reuse = (lin is not None and cfg.inlier_threshold_mm <= lin.unmatched_beyond_mm
                 and noise_var == 0.0)
        residual, inlier_fraction = self._fit_quality(
            lin.distances(self.surface) if reuse else self.surface.distances(moved))
        constraint = constraint_from_linearisation(lin)
        covariance, precision, noise = self._covariance(
            lin, self._precision_point(centroid @ rot.T + tr), clusters)
        reasons = self._fit_reasons(residual, inlier_fraction, noise)
        reasons += self._precision_reasons(precision)
        if not icp.last_step_mm <= TRACK_MAX_LAST_STEP_MM:  # inf: ICP lost the surface
            reasons.append(f'tracking ICP did not settle: still moving '
                           f'{icp.last_step_mm:.2f} mm per step after {icp.iterations} steps')
        if not constraint >= cfg.track_min_constraint:  # written so that nan fails too
            reasons.append(f'under-constrained: the patch can slide or spin on the surface '
                           f'(constraint {constraint:.4f} < {cfg.track_min_constraint})')
        if step_deg > cfg.track_max_rotation_deg or step_mm > cfg.track_max_translation_mm:
            reasons.append(f'tracking lost: moved {step_deg:.1f} deg / {step_mm:.1f} mm from the '
                           f'previous pose (limits {cfg.track_max_rotation_deg} deg / '
                           f'{cfg.track_max_translation_mm} mm); register globally')
        return RegistrationResult(
            transform=make_transform(rot, tr), accepted=not reasons, residual_mm=residual,
            inlier_fraction=inlier_fraction, ambiguity=float('nan'),
            rejection_reasons=tuple(reasons), n_points=len(pts),
            time_s=time.perf_counter() - start, timings={'icp_iterations': icp.iterations},
            constraint=constraint, method='track', step_deg=step_deg, step_mm=step_mm,
            covariance=covariance, bound_mm=_bound(precision, 'bound_mm'),
            bound_deg=_bound(precision, 'bound_deg'), noise_mm=noise)

    # -- helpers ------------------------------------------------------------------------------

    def _precision_point(self, centroid: np.ndarray) -> np.ndarray:
        """Return where ``register`` and ``track`` judge the position bound (bone frame, mm).

        ``precision_target_mm`` with ``precision_at_target``, else the cloud's ``centroid``.
        """
        if self.config.precision_at_target:
            return np.asarray(self.config.precision_target_mm, dtype=np.float64)
        return np.asarray(centroid, dtype=np.float64)

    def _fit_quality(self, dist: np.ndarray) -> tuple[float, float]:
        """Return (mean inlier distance in mm, inlier fraction) of point-to-surface distances."""
        inliers = dist <= self.config.inlier_threshold_mm
        residual = float(dist[inliers].mean()) if inliers.any() else float('inf')
        return residual, float(inliers.mean())

    def residual_limit(self, noise_mm: float) -> float:
        """Return the largest mean inlier distance (mm) accepted for a cloud of this noise.

        ``gate_max_residual_mm``, or ``gate_residual_noise_factor`` times the measured noise
        where that is larger: noise alone spreads points off the surface, an offset does not
        come from noise (the noise is measured about each cluster's own mean residual).
        """
        cfg = self.config
        return noise_scaled_limit(cfg.gate_max_residual_mm, cfg.gate_residual_noise_factor,
                                  noise_mm)

    def _fit_reasons(self, residual: float, inlier_fraction: float,
                     noise_mm: float) -> list[str]:
        """Return why the fit itself fails the gates (empty when it passes them)."""
        cfg = self.config
        reasons = []
        limit = self.residual_limit(noise_mm)
        if not residual <= limit:  # nan fails too
            scaled = (f' (gate: the larger of {cfg.gate_max_residual_mm} mm and '
                      f'{cfg.gate_residual_noise_factor} x the measured noise {noise_mm:.2f} mm)'
                      if cfg.gate_residual_noise_factor > 0.0 else '')
            reasons.append(f'residual {residual:.2f} mm > {limit:.2f} mm{scaled}')
        if not inlier_fraction >= cfg.gate_min_inlier_fraction:
            reasons.append(f'inlier fraction {inlier_fraction:.2f} < '
                           f'{cfg.gate_min_inlier_fraction}')
        if noise_mm > cfg.gate_max_noise_mm:  # nan: unmeasured, the covariance is then inf
            reasons.append(f'too noisy: measured point noise {noise_mm:.2f} mm > '
                           f'{cfg.gate_max_noise_mm} mm, beyond the range the confidence model '
                           'was calibrated on')
        return reasons

    def _initial_poses(self, centred: np.ndarray, rng: np.random.Generator,
                       count: int) -> tuple[np.ndarray, np.ndarray, int]:
        """Return ``count`` start rotations (H, 3, 3), centroid landings (H, 3), the anchors.

        Rotations come from farthest point sampling on SO(3). For each rotation the cloud's
        centroid starts at the centre of the region where the rotated cloud fits inside the
        bone's bounding box (the centroid alignment, corrected for a patch seen from one side).
        Where that region is long (a short patch of a long bone), several starts are spread
        along it, and the hypotheses are shared out among them.
        """
        cfg = self.config
        n_sample = min(len(centred), BOX_SAMPLE_POINTS)
        sample = centred[rng.choice(len(centred), n_sample, replace=False)]
        probe_lo, probe_hi = self._feasible_boxes(
            _fps_rotations_cached(min(count, BOX_PROBE_ROTATIONS), cfg.seed), sample)
        room = float(np.median(np.max(probe_hi - probe_lo, axis=1)))
        anchors = int(min(MAX_ANCHORS, np.ceil(room / ANCHOR_SPACING_MM) + 1))
        per_anchor = max(count // anchors, 1)
        rot0 = _fps_rotations_cached(per_anchor, cfg.seed)
        box_lo, box_hi = self._feasible_boxes(rot0, sample)
        centre, size = (box_lo + box_hi) / 2.0, box_hi - box_lo
        longest = np.argmax(size, axis=1)
        spread = np.zeros_like(size)
        spread[np.arange(len(size)), longest] = size[np.arange(len(size)), longest]
        fractions = np.linspace(-0.5, 0.5, anchors) if anchors > 1 else np.zeros(1)
        landing = np.concatenate([centre + f * spread for f in fractions])
        return np.tile(rot0, (anchors, 1, 1)), landing, anchors

    def _surface_poses(self, prep: '_Prepared',
                       coarse_pts: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        """Return start poses of a patch: on the bone surface, patch normal on surface normal.

        A patch lies on the bone, so a point of it starts at one surface sample per
        ``SURFACE_ANCHOR_SPACING_MM`` cube, with its normal (either sign) turned onto the
        surface normal there, at ``SURFACE_SPINS`` spins about it: a 1-dof rotation search per
        anchor instead of SO(3). Two such frames of the patch (``_patch_frames``): its pivot
        with the pivot's local normal, and its middle with the whole patch's thinnest axis.
        These poses are scored at once on the coarse points and the best ``num_hypotheses``
        are optimised, the best start of each anchor first.

        Two frames because real patches are curved. On specimen00's 120 pelvis bench patches
        (25-60 mm, seeds 0-7) the whole patch's axis lay a median 28 deg (90th percentile 73
        deg) from the surface normal under its middle, the pivot's 9 deg (32 deg); on the
        femurs' 9-13 deg (21-22 deg) against 4-7 deg (9-13). A search miss of a 60 mm pelvis
        patch (seed 7) had no start within 30 deg of the truth, and 4 within 10 deg (and 10
        mm) from its pivot; one of seed 0, found from its middle, was missed from the pivot
        alone.
        """
        cfg = self.config
        centred = prep.points - prep.centroid
        anchors, anchor_normals = self._surface_anchors()
        spins = np.linspace(0.0, 2.0 * np.pi, SURFACE_SPINS, endpoint=False)
        rotations, landing, groups = [], [], []
        for pivot, normal in _patch_frames(centred):
            for sign in (1.0, -1.0):
                align = _rotations_onto(sign * normal, anchor_normals)  # (A, 3, 3)
                for spin in spins:
                    turn = Rotation.from_rotvec(anchor_normals * spin).as_matrix()
                    rotation = turn @ align
                    rotations.append(rotation)
                    # The pivot lands on the anchor: R (pivot - c) + landing = anchor.
                    landing.append(anchors - rotation @ pivot)
                    groups.append(np.arange(len(anchors)))
        rotations, landing = self._prescreen(np.concatenate(rotations), np.concatenate(landing),
                                             prep, coarse_pts, cfg.num_hypotheses,
                                             groups=np.concatenate(groups))
        return rotations, landing, len(anchors)

    def _prescreen(self, rotations: np.ndarray, landing: np.ndarray, prep: '_Prepared',
                   coarse_pts: torch.Tensor, keep: int,
                   groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return the ``keep`` start poses of lowest cost on the coarse points, best first.

        With ``groups`` (one id per pose: a patch's surface anchor), the best pose of every
        group is kept first (the best ``keep`` of those when there are more groups), and the
        rest by cost: a start tilted a few degrees off the truth scores worse on a few points
        than a well-seated wrong one, and a global cut dropped every start near the truth of
        a 60 mm pelvis patch of specimen00 (bench seed 3): a search miss.
        """
        if keep >= len(rotations):
            return rotations, landing
        dtype, dev = torch.float32, self.device
        rot_t = torch.as_tensor(rotations, dtype=dtype, device=dev)
        tr_t = torch.as_tensor(landing, dtype=dtype, device=dev) - rot_t @ prep.centroid_t
        with torch.no_grad():
            cost = torch.cat([
                robust_cost(self.field(), rot_t[i:i + PRESCREEN_BATCH],
                            tr_t[i:i + PRESCREEN_BATCH], coarse_pts, self.config.robust_scale_mm)
                for i in range(0, len(rot_t), PRESCREEN_BATCH)])
        order = torch.argsort(cost).cpu().numpy()
        if groups is None:
            best = order[:keep]
        else:  # positions in ``order``: each group's first (its best), then the next by cost
            chosen = np.zeros(len(order), dtype=bool)
            _, first = np.unique(groups[order], return_index=True)
            chosen[np.sort(first)[:keep]] = True
            chosen[np.flatnonzero(~chosen)[:keep - int(chosen.sum())]] = True
            best = order[chosen]
        return rotations[best], landing[best]

    def _surface_anchors(self) -> tuple[np.ndarray, np.ndarray]:
        """Return surface samples (A, 3), one per anchor-spacing cube, and their normals."""
        if self._anchors is None:
            points, normals = self.surface.points, self.surface.normals
            keys = np.floor(points / SURFACE_ANCHOR_SPACING_MM).astype(np.int64)
            _, first = np.unique(keys, axis=0, return_index=True)
            smoothed = []
            for i, near in zip(first, self.surface.tree.query_ball_point(
                    points[first], ANCHOR_NORMAL_RADIUS_MM, workers=1)):
                group = normals[near]
                group = group[group @ normals[i] > 0.0]
                mean = group.sum(axis=0) if len(group) else normals[i]
                smoothed.append(mean / max(np.linalg.norm(mean), 1e-12))
            self._anchors = (points[first], np.asarray(smoothed))
        return self._anchors

    def _feasible_boxes(self, rotations: np.ndarray,
                        sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return per rotation the box (lo, hi) of centroids keeping the cloud in the bone."""
        rotated = np.einsum('rij,nj->rni', rotations, sample)
        low, high = np.percentile(rotated, [BOX_PERCENTILE, 100 - BOX_PERCENTILE], axis=1)
        box_lo, box_hi = self._bone_lo - low, self._bone_hi - high
        # A cloud larger than the bone along an axis (noise, outliers): centre it there.
        mid = (box_lo + box_hi) / 2.0
        return np.minimum(box_lo, mid), np.maximum(box_hi, mid)

    def _is_distinct(self, rot_a: np.ndarray, tr_a: np.ndarray, rot_b: np.ndarray,
                     tr_b: np.ndarray, centroid: np.ndarray) -> bool:
        cfg = self.config
        angle, shift = _pose_distance(rot_a, tr_a, rot_b, tr_b, centroid)
        return angle > cfg.distinct_rotation_deg or shift > cfg.distinct_translation_mm

    def _distinct(self, order: np.ndarray, rot: np.ndarray, tr: np.ndarray, centroid: np.ndarray,
                  limit: int) -> list[int]:
        """Return up to ``limit`` indices in ``order`` whose poses differ from all before them."""
        cfg = self.config
        landing = np.einsum('hij,j->hi', rot, centroid) + tr
        chosen: list[int] = []
        for i in order:
            if chosen:
                angle = geodesic_deg(rot[i][None], rot[chosen])
                shift = np.linalg.norm(landing[chosen] - landing[i], axis=1)
                same = ((angle <= cfg.distinct_rotation_deg)
                        & (shift <= cfg.distinct_translation_mm))
                if np.any(same):
                    continue
            chosen.append(int(i))
            if len(chosen) == limit:
                break
        return chosen


@dataclass(frozen=True)
class _Prepared:
    """A validated cloud ready for the search."""

    points: np.ndarray
    """(N, 3) float64 mm, subsampled to ``max_points``."""
    centroid: np.ndarray
    cloud: torch.Tensor
    centroid_t: torch.Tensor
    rng: np.random.Generator
    is_patch: bool
    """Small against the bone (see PATCH_FRACTION): hypotheses start on the surface."""
    is_short: bool
    """Narrower than a full sweep (see SHORT_SWEEP_FRACTION): a wider fine stage."""
    icp_points: np.ndarray
    """The seeded subset (at most ICP_POINTS) that ICP refines on."""


@dataclass(frozen=True)
class _Candidate:
    """A refined candidate pose with its per-point distances to the surface."""

    cost: float
    """Mean truncated distance, mm."""
    rotation: np.ndarray
    translation: np.ndarray
    distances: np.ndarray
    truncated: np.ndarray
    icp_points: np.ndarray
    """The points ICP refined it on (their linearisation gives the covariance)."""
    noise_var_mm2: float = 0.0
    """The noise variance its residuals were de-biased for (``refine.linearise``)."""
    last_step_mm: float = float('inf')
    """How far ICP's last step moved the cloud, mm (inf: not refined)."""


def _rotations_onto(source: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Return the smallest rotations (A, 3, 3) turning unit ``source`` onto unit ``targets``."""
    cross = np.cross(source, targets)
    sine = np.linalg.norm(cross, axis=1)
    cosine = targets @ source
    axis = cross / np.maximum(sine, 1e-12)[:, None]
    opposite = sine < 1e-9  # antiparallel (or equal): any perpendicular axis will do
    if opposite.any():
        helper = np.eye(3)[np.argmin(np.abs(source))]
        perpendicular = np.cross(source, helper)
        axis[opposite] = perpendicular / np.linalg.norm(perpendicular)
    angle = np.arctan2(sine, cosine)
    return Rotation.from_rotvec(axis * angle[:, None]).as_matrix()


def _patch_frames(centred: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Return (pivot, normal) pairs that a patch's start poses put on the surface anchors.

    The pivot with its local normal (see :func:`_patch_pivot`), and the patch's middle (the
    points within ``PATCH_MIDDLE_SHARE`` of its lateral radius about its thinnest axis)
    with that whole-patch axis as normal.
    """
    sample = centred[:: max(len(centred) // BOX_SAMPLE_POINTS, 1)]
    _, _, axes = np.linalg.svd(sample, full_matrices=False)
    normal = axes[2]
    height = sample @ normal
    lateral = np.linalg.norm(sample - height[:, None] * normal, axis=1)
    middle = lateral <= PATCH_MIDDLE_SHARE * lateral.max()
    sag = float(height[middle].mean()) if middle.any() else 0.0
    return [_patch_pivot(centred), (sag * normal, normal)]


def _patch_pivot(centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return a patch's pivot (the point nearest its centroid) and its local normal.

    ``centred`` is the patch about its centroid. The normal is the thinnest principal axis of
    the points within ``PIVOT_NORMAL_RADIUS_MM`` of the pivot (at least ``MIN_PIVOT_POINTS`` of
    them, else of the whole patch).
    """
    pivot = centred[np.argmin(np.einsum('ij,ij->i', centred, centred))]
    near = centred[np.linalg.norm(centred - pivot, axis=1) <= PIVOT_NORMAL_RADIUS_MM]
    if len(near) < MIN_PIVOT_POINTS:
        near = centred
    near = near[:: max(len(near) // BOX_SAMPLE_POINTS, 1)]
    _, _, axes = np.linalg.svd(near - near.mean(axis=0), full_matrices=False)
    return pivot, axes[2]


def noise_scaled_limit(fixed_mm: float, factor: float, noise_mm: float) -> float:
    """Return ``max(fixed_mm, factor * noise_mm)``; ``fixed_mm`` where the noise is unmeasured."""
    scaled = factor * noise_mm
    return max(fixed_mm, scaled) if np.isfinite(scaled) else fixed_mm


def _bound(precision: Precision | None, name: str) -> float:
    """Return a bound of ``precision`` (inf when the covariance could not be measured)."""
    return float(getattr(precision, name)) if precision is not None else float('inf')


def _pose_distance(rot_a: np.ndarray, tr_a: np.ndarray, rot_b: np.ndarray, tr_b: np.ndarray,
                   centroid: np.ndarray) -> tuple[float, float]:
    """Return how far two poses are apart: (rotation deg, distance mm at ``centroid``)."""
    angle = float(geodesic_deg(rot_a, rot_b))
    shift = float(np.linalg.norm((rot_a @ centroid + tr_a) - (rot_b @ centroid + tr_b)))
    return angle, shift


def _pose_gap(a: _Candidate, b: _Candidate, centroid: np.ndarray) -> str:
    """Describe how far apart two candidate poses are (rotation, and at the centroid)."""
    angle, shift = _pose_distance(a.rotation, a.translation, b.rotation, b.translation, centroid)
    return f'{angle:.0f} deg / {shift:.0f} mm away'


def _noise_to_debias(noise_mm: float) -> float:
    """Return the noise variance (mm^2) to de-bias a fit for: sigma^2 of a noisy cloud.

    0 unless the measured point noise exceeds ``NOISY_CLOUD_MM`` (nan: 0).
    """
    return noise_mm ** 2 if noise_mm > NOISY_CLOUD_MM else 0.0


def _check_prior(prior: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (R, t) of a rigid 4x4 prior, or raise InputError saying what is wrong."""
    prior = np.asarray(prior, dtype=np.float64)
    if prior.shape != (4, 4) or not np.all(np.isfinite(prior)):
        raise InputError(f'prior must be a finite 4x4 transform, got shape {prior.shape}')
    rotation = prior[:3, :3]
    if (not np.allclose(rotation @ rotation.T, np.eye(3), atol=PRIOR_ORTHONORMAL_TOLERANCE)
            or np.linalg.det(rotation) <= 0.0):
        raise InputError('prior is not a rigid transform: its 3x3 block must be a rotation')
    return rotation, prior[:3, 3]
