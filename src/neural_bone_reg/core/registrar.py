"""BoneRegistrar: the public entry point used by the nodes, the CLI and outside scripts."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
import functools
import logging
from pathlib import Path
import time
from typing import Any

import numpy as np
import torch

from neural_bone_reg.core.config import Configs, registration_preset, RegistrationConfig
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.fields import GridField
from neural_bone_reg.core.io import check_points
from neural_bone_reg.core.neural_reg import HypothesisSet, optimise, robust_cost
from neural_bone_reg.core.refine import constraint_ratio, refine_icp, SurfaceModel
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
#: How many distinct candidates are refined and compared for the ambiguity measure.
REFINED_CANDIDATES = 3
#: Tracking ICP: at most this many iterations, stopping once a step moves less than the
#: tolerance (mm). Its own settings: tracking is ICP, whatever ``refine`` says for ``register``.
TRACK_ICP_ITERATIONS = 30
TRACK_ICP_TOLERANCE_MM = 0.01
#: A tracked fit whose ICP still moves more than this per step (mm) has not settled; one that
#: stops the iterations while creeping below it (noise-level jitter) is accepted.
TRACK_MAX_LAST_STEP_MM = 0.1
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

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_mesh(cls, path: str | Path, device: str | torch.device | None = None,
                  cache_dir: str | Path | None = None, *, configs: Configs | None = None,
                  preset: str = 'default', progress: Any = None,
                  **overrides: Any) -> 'BoneRegistrar':
        """Load the bone's UDF from the cache, or train it; ``overrides`` set registration."""
        from neural_bone_reg.core.sim import default_cache_dir

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
        """Register a partial cloud (N, 3) in mm, in any frame, to the bone; see the module doc."""
        start = time.perf_counter()
        cfg = self.config
        timings: dict[str, float] = {}
        pts = self.validate(points)
        rng = np.random.default_rng(cfg.seed)
        if len(pts) > cfg.max_points:
            pts = pts[np.sort(rng.choice(len(pts), cfg.max_points, replace=False))]
        centroid = pts.mean(axis=0)
        dev, dtype = self.device, torch.float32
        cloud = torch.as_tensor(pts, dtype=dtype, device=dev)
        centroid_t = torch.as_tensor(centroid, dtype=dtype, device=dev)
        field = self.field()

        # Coarse: all hypotheses on a few points.
        tick = time.perf_counter()
        rotations_np, landing_np, anchors = self._initial_poses(pts - centroid, rng)
        rotations = torch.as_tensor(rotations_np, dtype=dtype, device=dev)
        landing = torch.as_tensor(landing_np, dtype=dtype, device=dev)
        hyps = HypothesisSet(rotations, landing, centroid_t, cfg.latent_dim, cfg.backbone_dim,
                             cfg.translation_scale_mm, cfg.seed)
        coarse_pts = cloud[torch.as_tensor(rng.choice(len(pts), min(cfg.coarse_points, len(pts)),
                                                      replace=False), device=dev)]
        coarse = optimise(hyps, field, coarse_pts, cfg.coarse_iterations, cfg.learning_rate,
                          cfg.robust_scale_mm, cfg.early_stop_tolerance, cfg.fine_top_k,
                          cfg.coarse_prune_every, cfg.coarse_prune_keep,
                          min_survivors=min(4 * cfg.fine_top_k, cfg.num_hypotheses))
        timings['coarse_s'] = time.perf_counter() - tick

        # Fine: the best K distinct poses on many points, starting where the coarse stage left
        # them. Keeping them distinct preserves the alternatives the ambiguity measure needs.
        tick = time.perf_counter()
        order = torch.argsort(coarse.cost).cpu().numpy()
        top = torch.as_tensor(self._distinct(order, coarse.rotation.double().cpu().numpy(),
                                             coarse.translation.double().cpu().numpy(), centroid,
                                             cfg.fine_top_k), device=dev)
        landing_k = coarse.rotation[top] @ centroid_t + coarse.translation[top]
        fine_hyps = HypothesisSet(coarse.rotation[top], landing_k, centroid_t, cfg.latent_dim,
                                  cfg.backbone_dim, cfg.translation_scale_mm, cfg.seed + 1)
        fine_pts = cloud[torch.as_tensor(rng.choice(len(pts), min(cfg.fine_points, len(pts)),
                                                    replace=False), device=dev)]
        fine = optimise(fine_hyps, field, fine_pts, cfg.fine_iterations, cfg.learning_rate / 2,
                        cfg.robust_scale_mm, cfg.early_stop_tolerance, cfg.final_candidates)
        timings['fine_s'] = time.perf_counter() - tick

        # Final choice: re-score on the whole cloud, keep distinct poses, refine, compare.
        tick = time.perf_counter()
        with torch.no_grad():
            whole = torch.stack([
                robust_cost(field, fine.rotation[i:i + 1], fine.translation[i:i + 1], cloud,
                            cfg.robust_scale_mm)[0]
                for i in range(len(fine.cost))])
        order = torch.argsort(whole).cpu().numpy()
        rot_np = fine.rotation.double().cpu().numpy()
        tr_np = fine.translation.double().cpu().numpy()
        distinct = self._distinct(order, rot_np, tr_np, centroid, cfg.final_candidates)
        timings['rescore_s'] = time.perf_counter() - tick

        tick = time.perf_counter()
        icp_pts = pts if len(pts) <= ICP_POINTS else pts[
            rng.choice(len(pts), ICP_POINTS, replace=False)]
        refined = []
        for i in distinct[:REFINED_CANDIDATES]:
            rot, tr = rot_np[i], tr_np[i]
            if cfg.refine and cfg.refine_iterations > 0:
                icp = refine_icp(self.surface, icp_pts, rot, tr, cfg.robust_scale_mm,
                                 cfg.refine_iterations, cfg.refine_tolerance_mm)
                rot, tr = icp.rotation, icp.translation
            dist = self.surface.distances(pts @ rot.T + tr)
            truncated = float(np.minimum(dist, cfg.inlier_threshold_mm).mean())
            refined.append((truncated, rot, tr, dist))
        refined.sort(key=lambda item: item[0])
        timings['refine_s'] = time.perf_counter() - tick

        cost, rot, tr, dist = refined[0]
        residual, inlier_fraction = self._fit_quality(dist)
        constraint = constraint_ratio(self.surface, icp_pts, rot, tr, cfg.robust_scale_mm)
        alternative = None
        ambiguity = 0.0
        # The best refined alternative that is still a distinct pose from the winner.
        for alt_cost, alt_rot, alt_tr, _ in refined[1:]:
            if self._is_distinct(rot, tr, alt_rot, alt_tr, centroid):
                ambiguity = min(cost / max(alt_cost, 1e-9), 1.0)
                alternative = make_transform(alt_rot, alt_tr)
                break
        reasons = self._fit_reasons(residual, inlier_fraction)
        if ambiguity > cfg.gate_max_ambiguity:
            reasons.append(f'ambiguous: a distinct pose fits {ambiguity:.2f} as well '
                           f'(gate {cfg.gate_max_ambiguity})')
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - start
        timings.update(coarse_iterations=coarse.iterations, fine_iterations=fine.iterations,
                       anchors=anchors)
        return RegistrationResult(
            transform=make_transform(rot, tr), accepted=not reasons, residual_mm=residual,
            inlier_fraction=inlier_fraction, ambiguity=float(ambiguity),
            rejection_reasons=tuple(reasons), n_points=len(pts), time_s=elapsed, timings=timings,
            alternative_transform=alternative, candidates_refined=len(refined),
            constraint=constraint)

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        """Follow a pose known from the previous frame: robust ICP from ``prior``, gated.

        The video-rate path after a global ``register``: no search, so it holds only while the
        bone moves less than ``track_max_rotation_deg`` and ``track_max_translation_mm``
        between frames. ``prior`` is the last accepted 4x4 (input frame to bone frame). The
        result is accepted only if the residual, inlier and ``track_min_constraint`` gates pass,
        the ICP settled (its last step under ``TRACK_MAX_LAST_STEP_MM``) and the step from
        ``prior`` is within those bounds; otherwise the caller should fall back to
        ``register``. Ambiguity is not measured (nan): continuity with an accepted pose
        stands in for it.
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
        icp = refine_icp(self.surface, icp_pts, rot0, tr0, cfg.robust_scale_mm,
                         TRACK_ICP_ITERATIONS, TRACK_ICP_TOLERANCE_MM)
        rot, tr = icp.rotation, icp.translation
        centroid = pts.mean(axis=0)
        step_deg = float(geodesic_deg(rot, rot0))
        step_mm = float(np.linalg.norm((rot - rot0) @ centroid + tr - tr0))
        residual, inlier_fraction = self._fit_quality(self.surface.distances(pts @ rot.T + tr))
        constraint = constraint_ratio(self.surface, icp_pts, rot, tr, cfg.robust_scale_mm)
        reasons = self._fit_reasons(residual, inlier_fraction)
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
            constraint=constraint, method='track', step_deg=step_deg, step_mm=step_mm)

    # -- helpers ------------------------------------------------------------------------------

    def _fit_quality(self, dist: np.ndarray) -> tuple[float, float]:
        """Return (mean inlier distance in mm, inlier fraction) of point-to-surface distances."""
        inliers = dist <= self.config.inlier_threshold_mm
        residual = float(dist[inliers].mean()) if inliers.any() else float('inf')
        return residual, float(inliers.mean())

    def _fit_reasons(self, residual: float, inlier_fraction: float) -> list[str]:
        """Return why the fit itself fails the gates (empty when it passes them)."""
        cfg = self.config
        reasons = []
        if residual > cfg.gate_max_residual_mm:
            reasons.append(f'residual {residual:.2f} mm > {cfg.gate_max_residual_mm} mm')
        if inlier_fraction < cfg.gate_min_inlier_fraction:
            reasons.append(f'inlier fraction {inlier_fraction:.2f} < '
                           f'{cfg.gate_min_inlier_fraction}')
        return reasons

    def _initial_poses(self, centred: np.ndarray,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """Return start rotations (H, 3, 3), centroid landing points (H, 3), starts per rotation.

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
            _fps_rotations_cached(min(cfg.num_hypotheses, BOX_PROBE_ROTATIONS), cfg.seed), sample)
        room = float(np.median(np.max(probe_hi - probe_lo, axis=1)))
        count = int(min(MAX_ANCHORS, np.ceil(room / ANCHOR_SPACING_MM) + 1))
        per_anchor = max(cfg.num_hypotheses // count, 1)
        rot0 = _fps_rotations_cached(per_anchor, cfg.seed)
        box_lo, box_hi = self._feasible_boxes(rot0, sample)
        centre, size = (box_lo + box_hi) / 2.0, box_hi - box_lo
        longest = np.argmax(size, axis=1)
        spread = np.zeros_like(size)
        spread[np.arange(len(size)), longest] = size[np.arange(len(size)), longest]
        fractions = np.linspace(-0.5, 0.5, count) if count > 1 else np.zeros(1)
        landing = np.concatenate([centre + f * spread for f in fractions])
        return np.tile(rot0, (count, 1, 1)), landing, count

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
        angle = float(geodesic_deg(rot_a, rot_b))
        shift = float(np.linalg.norm((rot_a @ centroid + tr_a) - (rot_b @ centroid + tr_b)))
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
