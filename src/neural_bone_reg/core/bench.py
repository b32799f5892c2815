"""The bench protocol: seeded perturbed trials, the data's floor, and the figures of a run.

One protocol for the ``bench`` command and every benchmark script. For trial k of a case with
seed s, the cloud (given in the bone's mesh frame, so the true registration is the identity)

1. optionally becomes a patch (``patch_mm`` > 0): a seed point is drawn from the cloud with its
   own random stream, ``default_rng([s, k, PATCH_STREAM])``, and the points within
   ``patch_mm`` of it are kept;
2. optionally gets gaussian noise of ``noise_mm`` (after the patch cut);
3. is rotated about its centroid by a rotation uniform on SO(3) and translated by a vector of
   length uniform in [0, ``BENCH_MAX_TRANSLATION_MM``] mm, both from ``default_rng([s, k])``.

The rotation, translation and noise come from the same stream as before patches existed, so a
(seed, trial) pair moves a full cloud exactly as it always did. The registration must undo the
move; the ground truth is the inverse of step 3.

Each trial is also compared with its **floor**: robust ICP started at the truth on the trial's
own cloud, the best a registration can do with that data. A wrong result that fits worse than
the floor (higher residual and no more inliers) is a **search miss**: a better optimum existed
and the search did not find it. A wrong result that fits as well is truly ambiguous and must be
refused. The **case floor** is the same ICP on the whole unperturbed cloud.

Where a result carries a finite ``covariance`` (6x6, of the error ``T_true ~ se3_exp(delta) @
transform``, delta = (tx, ty, tz) mm, (rx, ry, rz) rad, in the bone frame), the error against
each floor is scored by its squared Mahalanobis distance; 95 % of them should lie within
``CHI2_6DOF_95``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
import re
from typing import Any, Callable, Sequence

import numpy as np

from neural_bone_reg.core import metrics
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.refine import refine_icp
from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform
from neural_bone_reg.core.se3 import random_rotations, se3_log

#: The bench protocol: translation length uniform in [0, this] mm.
BENCH_MAX_TRANSLATION_MM = 100.0
#: Seed index of the untimed warm-up registration, outside the trial range.
WARMUP_TRIAL = 2 ** 31 - 1
#: Third seed word of the patch's random stream, ``default_rng([seed, trial, PATCH_STREAM])``;
#: kept apart from the move's stream so patches leave the (seed, trial) moves unchanged.
PATCH_STREAM = 1
#: The floor's ICP runs at least this many iterations, whatever the registration config says.
FLOOR_MIN_ITERATIONS = 30
#: A result within both of these of the trial floor pose is the same optimum (deg, mm).
SAME_OPTIMUM_DEG = 2.0
SAME_OPTIMUM_MM = 2.0
#: The 95 % quantile of the chi-square distribution with 6 degrees of freedom.
CHI2_6DOF_95 = 12.59
#: The Chamfer distance is computed on about this many points of the cloud.
CHAMFER_POINTS = 5000


@dataclass(frozen=True)
class Floor:
    """Robust ICP started at the ground truth: the error the data itself leaves.

    ``transform`` maps the cloud it was run on into the bone frame; ``rre_deg`` and ``rte_mm``
    are against the truth; residual and inlier fraction are measured as the registrar does.
    """

    transform: np.ndarray
    rre_deg: float
    rte_mm: float
    residual_mm: float
    inlier_fraction: float
    iterations: int
    converged: bool

    def summary(self) -> dict[str, Any]:
        """Return a JSON-able dict of the floor."""
        return {'transform': self.transform.tolist(), 'rre_deg': self.rre_deg,
                'rte_mm': self.rte_mm, 'residual_mm': self.residual_mm,
                'inlier_fraction': self.inlier_fraction, 'iterations': self.iterations,
                'converged': self.converged}


def bench_cases(data: Path, only: Sequence[str] | None = None) -> list[str]:
    """Return the names of the ``NAME.stl`` + ``NAME.xyz`` pairs in ``data`` (those in ``only``).

    Raises ValueError when there is none, naming the folder.
    """
    cases = sorted(p.stem for p in Path(data).glob('*.stl')
                   if (Path(data) / f'{p.stem}.xyz').is_file() and (not only or p.stem in only))
    if not cases:
        raise ValueError(f'no NAME.stl + NAME.xyz pairs in {data}'
                         + (f' among {sorted(only)}' if only else ''))
    return cases


def patch_indices(points: np.ndarray, seed: int, trial: int, patch_mm: float) -> np.ndarray:
    """Return the indices of the points within ``patch_mm`` of a seeded seed point of the cloud.

    The seed point is drawn uniformly from ``points`` with ``default_rng([seed, trial,
    PATCH_STREAM])``; it is always in the patch.
    """
    if not patch_mm > 0.0:
        raise ValueError(f'patch_mm must be > 0 mm, got {patch_mm}')
    points = np.asarray(points, dtype=np.float64)
    centre = points[np.random.default_rng([seed, trial, PATCH_STREAM]).integers(len(points))]
    return np.flatnonzero(np.linalg.norm(points - centre, axis=1) <= patch_mm)


def bench_trial(points: Any, seed: int, trial: int, noise_mm: float,
                patch_mm: float = 0.0) -> tuple[Any, Any]:
    """Return the perturbed cloud of one trial and the ground truth that undoes it.

    See the module doc for the protocol; ``patch_mm`` = 0 keeps the whole cloud.
    """
    if not (0.0 <= noise_mm < np.inf and 0.0 <= patch_mm < np.inf):  # nan fails too
        raise ValueError('noise_mm and patch_mm must be finite and >= 0 mm, got '
                         f'{noise_mm}, {patch_mm}')
    rng = np.random.default_rng([seed, trial])
    rotation = random_rotations(1, rng)[0]
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    shift = direction * rng.uniform(0.0, BENCH_MAX_TRANSLATION_MM)
    if patch_mm > 0.0:
        points = np.asarray(points)[patch_indices(points, seed, trial, patch_mm)]
    pts = points + rng.normal(scale=noise_mm, size=points.shape) if noise_mm > 0 else points
    centroid = pts.mean(axis=0)
    perturb = make_transform(rotation, centroid + shift - rotation @ centroid)
    return apply_transform(perturb, pts), invert_transform(perturb)


def _scoring_points(registrar: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the points the registrar scores (validated, subsampled) and a seeded ICP subset."""
    from neural_bone_reg.core.registrar import ICP_POINTS

    cfg = registrar.config
    pts = registrar.validate(points)
    rng = np.random.default_rng(cfg.seed)
    if len(pts) > cfg.max_points:  # the registrar's own first draw
        pts = pts[np.sort(rng.choice(len(pts), cfg.max_points, replace=False))]
    if len(pts) <= ICP_POINTS:
        return pts, pts
    return pts, pts[rng.choice(len(pts), ICP_POINTS, replace=False)]


def fit_quality(registrar: Any, points: np.ndarray, transform: np.ndarray) -> tuple[float, float]:
    """Return (residual mm, inlier fraction) of ``transform`` on ``points``, as registered."""
    dist = registrar.surface.distances(apply_transform(transform, points))
    return registrar._fit_quality(dist)


def icp_floor(registrar: Any, points: np.ndarray, truth: np.ndarray) -> Floor:
    """Return the floor of a cloud: robust ICP from the truth ``truth`` (cloud -> bone frame).

    The ICP is the registrar's (its surface, ``robust_scale_mm``, ``refine_tolerance_mm`` and
    at least ``FLOOR_MIN_ITERATIONS`` iterations) on a seeded subset of at most
    ``registrar.ICP_POINTS`` points; the fit is measured on the points the registrar scores.
    """
    cfg = registrar.config
    pts, icp_pts = _scoring_points(registrar, points)
    icp = refine_icp(registrar.surface, icp_pts, truth[:3, :3], truth[:3, 3],
                     cfg.robust_scale_mm, max(cfg.refine_iterations, FLOOR_MIN_ITERATIONS),
                     cfg.refine_tolerance_mm)
    transform = make_transform(icp.rotation, icp.translation)
    residual, inliers = fit_quality(registrar, pts, transform)
    return Floor(transform, metrics.rre_deg(transform, truth),
                 metrics.rte_mm(transform, truth, points), residual, inliers, icp.iterations,
                 icp.converged)


def floor_of_case(registrar: Any, cloud: np.ndarray) -> Floor:
    """Return the floor of a whole cloud given in the bone frame (the truth is the identity)."""
    return icp_floor(registrar, cloud, np.eye(4))


def pose_error(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
    """Return delta (6,) with ``reference = se3_exp(delta) @ estimate`` (mm, then rad)."""
    return se3_log(reference @ invert_transform(estimate))


def mahalanobis_sq(covariance: Any, delta: np.ndarray) -> float:
    """Return ``delta^T C^-1 delta`` for a (6, 6) covariance; inf if C is not positive definite.

    A covariance that claims no uncertainty in some direction cannot cover an error there, so
    a singular or indefinite one scores inf rather than being inverted on its range only.
    """
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.shape != (6, 6) or not np.all(np.isfinite(cov)):
        raise ValueError(f'covariance must be a finite (6, 6) array, got shape {cov.shape}')
    cov = (cov + cov.T) / 2.0
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        return float('inf')
    whitened = np.linalg.solve(chol, np.asarray(delta, dtype=np.float64))
    return float(whitened @ whitened)


def _measured_covariance(covariance: Any) -> np.ndarray | None:
    """Return a result's covariance as (6, 6) float64, or None where it was not measured.

    None and a covariance with non-finite entries (a registrar's "unknown", all inf) are not
    measured; any other shape is an error.
    """
    if covariance is None:
        return None
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.shape != (6, 6):
        raise ValueError(f'result covariance must be (6, 6), got shape {cov.shape}')
    return cov if np.all(np.isfinite(cov)) else None


def _coverage(covariance: Any, reference: np.ndarray | None,
              estimate: np.ndarray) -> dict[str, Any]:
    """Return the error against ``reference``, its Mahalanobis^2 and whether it is inside 95 %."""
    if covariance is None or reference is None:
        return {'delta': None, 'mahalanobis2': None, 'inside95': None}
    delta = pose_error(reference, estimate)
    m2 = mahalanobis_sq(covariance, delta)
    return {'delta': delta.tolist(), 'mahalanobis2': m2, 'inside95': bool(m2 <= CHI2_6DOF_95)}


#: Residuals (mm) and inlier fractions closer than these are the same fit (ICP stopping at
#: its tolerance, 0.01 mm per step, leaves differences of this order).
SAME_FIT_RESIDUAL_MM = 0.005
SAME_FIT_INLIERS = 0.0


def is_search_miss(success: bool, fit: tuple[float, float],
                   floor_fit: tuple[float, float]) -> bool:
    """Return whether a result is a search miss: wrong, yet the floor pose fits better.

    ``fit`` and ``floor_fit`` are (residual mm, inlier fraction) of the result and of the floor
    on the same points: a miss has a higher residual and no more inliers than the floor.
    Differences within ``SAME_FIT_RESIDUAL_MM`` / ``SAME_FIT_INLIERS`` are ICP round-off
    (two runs stopping a hair apart in one optimum), not a better fit.
    """
    return bool(not success and fit[0] > floor_fit[0] + SAME_FIT_RESIDUAL_MM
                and fit[1] <= floor_fit[1] + SAME_FIT_INLIERS)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def evaluate_trial(registrar: Any, moved: np.ndarray, truth: np.ndarray, *,
                   case_floor_mesh: np.ndarray | None = None) -> dict[str, Any]:
    """Register ``moved``, compare with ``truth`` and the trial floor; return one row.

    ``truth`` maps ``moved`` into the bone frame. ``case_floor_mesh`` is the case floor's
    transform in the mesh frame (``floor_of_case(...).transform``), or None where the cloud is not
    a move of one fixed cloud (then no case-floor coverage). An ``InputError`` of the
    registration (a patch with too few points, say) gives a rejected row with its message.
    """
    row: dict[str, Any] = {'n_points': int(len(moved))}
    try:
        res = registrar.register(moved)
    except InputError as exc:
        row.update(input_error=str(exc), accepted=False, success=False, search_miss=False,
                   same_optimum=False, rre_deg=None, rte_mm=None, time_s=None,
                   mahalanobis2_trial_floor=None, mahalanobis2_case_floor=None,
                   inside95_trial_floor=None, inside95_case_floor=None, bound_mm=None,
                   bound_deg=None, uniqueness_z=None, measured_noise_mm=None)
        return row
    rre = metrics.rre_deg(res.transform, truth)
    rte = metrics.rte_mm(res.transform, truth, moved)
    success = metrics.is_success(rre, rte)
    sample = moved[:: max(len(moved) // CHAMFER_POINTS, 1)]
    row.update({
        'rre_deg': rre, 'rte_mm': rte, 'success': success, 'accepted': bool(res.accepted),
        'chamfer_mm': metrics.chamfer_mm(apply_transform(res.transform, sample),
                                         apply_transform(truth, sample)),
        'residual_mm': res.residual_mm, 'inlier_fraction': res.inlier_fraction,
        'ambiguity': res.ambiguity, 'time_s': res.time_s,
        'rejection_reasons': list(res.rejection_reasons),
    })

    floor = icp_floor(registrar, moved, truth)
    pts, _ = _scoring_points(registrar, moved)
    fit = fit_quality(registrar, pts, res.transform)
    same = (metrics.rre_deg(res.transform, floor.transform) <= SAME_OPTIMUM_DEG
            and metrics.rte_mm(res.transform, floor.transform, moved) <= SAME_OPTIMUM_MM)
    row.update({
        'floor_rre_deg': floor.rre_deg, 'floor_rte_mm': floor.rte_mm,
        'floor_residual_mm': floor.residual_mm, 'floor_inlier_fraction': floor.inlier_fraction,
        'floor_iterations': floor.iterations, 'floor_converged': floor.converged,
        'fit_residual_mm': fit[0], 'fit_inlier_fraction': fit[1],
        'same_optimum': bool(same),
        'search_miss': is_search_miss(success, fit, (floor.residual_mm, floor.inlier_fraction)),
    })

    covariance = _measured_covariance(getattr(res, 'covariance', None))
    case_ref = None if case_floor_mesh is None else case_floor_mesh @ truth
    trial_cov = _coverage(covariance, floor.transform, res.transform)
    case_cov = _coverage(covariance, case_ref, res.transform)
    row.update({
        'covariance': None if covariance is None else covariance.tolist(),
        'delta_trial_floor': trial_cov['delta'], 'delta_case_floor': case_cov['delta'],
        'mahalanobis2_trial_floor': trial_cov['mahalanobis2'],
        'mahalanobis2_case_floor': case_cov['mahalanobis2'],
        'inside95_trial_floor': trial_cov['inside95'],
        'inside95_case_floor': case_cov['inside95'],
        'bound_mm': _optional_float(getattr(res, 'bound_mm', None)),
        'bound_deg': _optional_float(getattr(res, 'bound_deg', None)),
        'uniqueness_z': _optional_float(getattr(res, 'uniqueness_z', None)),
        'measured_noise_mm': _optional_float(getattr(res, 'noise_mm', None)),
    })
    return row


def run_trial(registrar: Any, cloud: np.ndarray, seed: int, trial: int, *,
              noise_mm: float = 0.0, patch_mm: float = 0.0,
              case_floor: Floor | None = None) -> dict[str, Any]:
    """Run bench trial ``trial`` of ``cloud`` (bone frame) and return its row (module doc)."""
    moved, truth = bench_trial(cloud, seed, trial, noise_mm, patch_mm)
    row = {'trial': trial, 'noise_mm': noise_mm, 'patch_mm': patch_mm}
    row.update(evaluate_trial(registrar, moved, truth,
                              case_floor_mesh=None if case_floor is None
                              else case_floor.transform))
    return row


def run_case(registrar: Any, cloud: np.ndarray, seed: int, trials: int, *,
             noise_mm: float = 0.0, patch_mm: float = 0.0, warm_up: bool = True,
             on_row: Callable[[dict[str, Any]], None] | None = None,
             ) -> tuple[Floor, list[dict[str, Any]]]:
    """Return the case floor and the rows of ``trials`` bench trials of one cloud.

    ``warm_up`` first registers the untimed trial ``WARMUP_TRIAL`` of the whole cloud;
    ``on_row`` is called with each row as it is done (to print progress).
    """
    floor = floor_of_case(registrar, cloud)
    if warm_up:
        registrar.register(bench_trial(cloud, seed, WARMUP_TRIAL, 0.0)[0])
    rows = []
    for trial in range(trials):
        rows.append(run_trial(registrar, cloud, seed, trial, noise_mm=noise_mm,
                              patch_mm=patch_mm, case_floor=floor))
        if on_row is not None:
            on_row(rows[-1])
    return floor, rows


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None


def _fraction(flags: list[bool]) -> float | None:
    return float(np.mean(flags)) if flags else None


def refusal_test(reason: str) -> str:
    """Return the name of the test a refusal reason reports: 'ambiguous', 'imprecise', ...

    The reason's text before its first ':' or, for a reason without one ('residual 1.20 mm >
    0.90 mm'), before its first number.
    """
    head = reason.split(':', 1)[0] if ':' in reason else re.split(r'[-+]?\d', reason, 1)[0]
    return head.strip() or reason


def refusals_by_test(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Count refused rows by the set of tests each failed ('ambiguous+imprecise'), sorted.

    A row whose input was rejected (``input_error``) counts as 'input error'.
    """
    counts = Counter('input error' if 'input_error' in r else '+'.join(
        sorted({refusal_test(x) for x in r.get('rejection_reasons', ())})) or 'no reason given'
        for r in rows if not r['accepted'])
    return dict(sorted(counts.items()))


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Return the figures of a set of trial rows (one case or all).

    ``accepted_correct`` is a fraction of the trials; ``correct_rejected``, ``wrong_accepted``
    and ``search_misses`` are counts (``accepted_wrong`` and ``rejected_correct`` are their
    older names). ``reachable`` counts the trials whose own floor (ICP from the truth) is
    correct: in the others not even the truth's neighbourhood holds the pose, and refusing is
    right. ``correct_refused_by`` counts the correct but refused trials by the tests they
    failed (:func:`refusals_by_test`), ``wrong_refused_by`` the wrong ones. Coverage is over
    the accepted trials that carry a measured covariance; ``accepted_without_covariance``
    counts the others.
    """
    if not rows:
        raise ValueError('summarise needs at least one trial row')
    ok = [r for r in rows if r['success']]
    accepted = [r for r in rows if r['accepted']]
    wrong_accepted = sum(r['accepted'] and not r['success'] for r in rows)
    correct_rejected = sum(r['success'] and not r['accepted'] for r in rows)
    reachable = sum(r.get('floor_rre_deg') is not None
                    and metrics.is_success(r['floor_rre_deg'], r['floor_rte_mm']) for r in rows)
    floors = [r for r in rows if r.get('floor_rre_deg') is not None]
    with_cov = [r for r in accepted if r.get('mahalanobis2_trial_floor') is not None]
    with_case_cov = [r for r in accepted if r.get('mahalanobis2_case_floor') is not None]
    return {
        'trials': len(rows),
        'recall': len(ok) / len(rows),
        'rre_mean_deg': _mean([r['rre_deg'] for r in ok]),
        'rte_mean_mm': _mean([r['rte_mm'] for r in ok]),
        'chamfer_mean_mm': _mean([r['chamfer_mm'] for r in ok]),
        'time_median_s': _median([r['time_s'] for r in rows if r['time_s'] is not None]),
        'accepted': len(accepted),
        'accepted_correct': sum(r['accepted'] and r['success'] for r in rows) / len(rows),
        'correct_rejected': correct_rejected,
        'wrong_accepted': wrong_accepted,
        'search_misses': sum(r['search_miss'] for r in rows),
        'reachable': reachable,
        'correct_refused_by': refusals_by_test([r for r in rows if r['success']]),
        'wrong_refused_by': refusals_by_test([r for r in rows if not r['success']]),
        'same_optimum': sum(r['same_optimum'] for r in rows),
        'input_errors': sum('input_error' in r for r in rows),
        'accepted_wrong': wrong_accepted,
        'rejected_correct': correct_rejected,
        'n_points_median': _median([r['n_points'] for r in rows]),
        'floor_rre_mean_deg': _mean([r['floor_rre_deg'] for r in floors]),
        'floor_rte_mean_mm': _mean([r['floor_rte_mm'] for r in floors]),
        'covariance_trials': len(with_cov),
        'accepted_without_covariance': len(accepted) - len(with_cov),
        'coverage_trial_floor': _fraction([r['inside95_trial_floor'] for r in with_cov]),
        'coverage_case_floor': _fraction([r['inside95_case_floor'] for r in with_case_cov]),
        'bound_median_mm': _median([r['bound_mm'] for r in accepted
                                    if r.get('bound_mm') is not None]),
        'bound_median_deg': _median([r['bound_deg'] for r in accepted
                                     if r.get('bound_deg') is not None]),
    }
