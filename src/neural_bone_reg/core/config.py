"""Frozen configuration dataclasses of the algorithm core, one per subsystem.

Every length is in millimetres, every angle in degrees. ROS parameters and the CLI's YAML
mirror these fields as dotted names (``registration.num_hypotheses``); both build the configs
through :func:`configs_from_dict`, so a bad value fails the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
import math
from pathlib import Path
import re
from typing import Any, ClassVar, Mapping

import yaml

DISTANCE_BACKENDS = ('grid', 'neural')


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


#: How ``spec(exclusive=...)`` names the ends of a range that are excluded.
OPEN_ENDS = ('', 'low', 'high', 'both')


#: How ``spec(strict=...)`` says which way a safety setting refuses more: 'higher' or 'lower'
#: values are stricter, 'calibrated' settings were measured as they are (any change is
#: unvalidated).
STRICT_WAYS = ('', 'higher', 'lower', 'calibrated')


def spec(default: Any, *, doc: str, low: float | None = None, high: float | None = None,
         exclusive: str = '', unit: str = '', strict: str = '') -> Any:
    """Return a dataclass field whose metadata documents and bounds it.

    The metadata holds ``doc`` (ROS descriptions and the params files are made from it),
    ``range``: ``(low, high)``, inclusive unless ``exclusive`` names an end (None: unbounded
    on that side; a bound set by another field is checked in ``__post_init__``), ``open``:
    the excluded ends, ``unit`` ('mm', 'deg', 's'; '' for counts and ratios) and ``strict``:
    for a confidence gate or a term of the calibrated confidence model, which way of its
    default refuses more (see :func:`loosened_gates`).
    """
    if exclusive not in OPEN_ENDS:
        raise ValueError(f'exclusive must be one of {OPEN_ENDS}, got {exclusive!r}')
    if strict not in STRICT_WAYS:
        raise ValueError(f'strict must be one of {STRICT_WAYS}, got {strict!r}')
    bounds = None if low is None and high is None else (low, high)
    return field(default=default, metadata={'doc': doc, 'range': bounds, 'open': exclusive,
                                            'unit': unit, 'strict': strict})


def field_range(f: dataclasses.Field) -> tuple[float | None, float | None]:
    """Return a field's declared ``(low, high)``; (None, None) when it declares none."""
    return f.metadata.get('range') or (None, None)


def _number(value: float | None, infinite: str) -> str:
    if value is None:
        return infinite
    return str(value) if isinstance(value, int) else f'{value:g}'


def interval_text(f: dataclasses.Field) -> str:
    """Return a field's range as an interval, ``(0, 1]``, with its unit."""
    low, high = field_range(f)
    ends = f.metadata.get('open', '')
    text = (('(' if ends in ('low', 'both') else '[') + _number(low, '-inf') + ', '
            + _number(high, 'inf') + (')' if ends in ('high', 'both') else ']'))
    unit = f.metadata.get('unit', '')
    return f'{text} {unit}' if unit else text


def check_ranges(config: Any) -> None:
    """Raise ValueError naming the first number of ``config`` outside its declared range."""
    for f in fields(config):
        low, high = field_range(f)
        value = getattr(config, f.name)
        if isinstance(value, bool) and not isinstance(f.default, bool):
            raise ValueError(f'{config.SECTION}.{f.name} must be a number, got {value!r}')
        if (low is None and high is None) or isinstance(value, bool):
            continue
        ends = f.metadata.get('open', '')
        above = low is None or (value > low if ends in ('low', 'both') else value >= low)
        below = high is None or (value < high if ends in ('high', 'both') else value <= high)
        _check(above and below,
               f'{config.SECTION}.{f.name} must be in {interval_text(f)}, got {value!r}')


@dataclass(frozen=True)
class UdfConfig:
    """Architecture of the per-patient neural unsigned distance field."""

    SECTION: ClassVar[str] = 'udf'

    hidden_dim: int = spec(
        128, low=8, high=1024,
        doc='Width of each hidden layer (the paper: 128).')
    num_hidden_layers: int = spec(3, low=1, high=8, doc='Number of hidden layers (the paper: 3).')
    num_frequencies: int = spec(
        6, low=0, high=12,
        doc='Fourier-feature octaves of the normalised input; 0 feeds raw xyz as the paper does.')

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class TrainConfig:
    """How the UDF is fitted to one bone, and how its distance grid is built."""

    SECTION: ClassVar[str] = 'train'

    iterations: int = spec(
        3000, low=1, high=1_000_000,
        doc=('Adam steps. Many small steps fit better than few large ones for the same points '
             'seen.'))
    batch_size: int = spec(
        1024, low=64, high=1_000_000,
        doc='Query points per step (each epoch visits every supervision point once).')
    learning_rate: float = spec(
        3e-3, low=0.0, high=1.0, exclusive='low',
        doc='Peak Adam learning rate (after a 2 % linear warm-up; cosine-decayed to 2 % of it).')
    num_samples: int = spec(
        200_000, low=1000, high=10_000_000,
        doc='Supervision points drawn once around the surface, with exact distances.')
    near_surface_sigma_mm: tuple[float, ...] = spec(
        (0.5, 2.0, 8.0), unit='mm',
        doc='Standard deviations of the gaussian offsets from surface samples, in mm.')
    uniform_fraction: float = spec(
        0.1, low=0.0, high=1.0, exclusive='high',
        doc='Share of supervision points drawn uniformly in the padded bounding box.')
    margin_mm: float = spec(
        40.0, low=0.0, high=500.0, exclusive='low', unit='mm',
        doc='Padding of the bounding box that the field (and its grid) covers, in mm.')
    grid_voxel_mm: float = spec(
        1.5, low=0.25, high=10.0, unit='mm',
        doc='Voxel edge of the distance grid used by the fast backend, in mm.')
    num_surface_points: int = spec(
        30_000, low=1000, high=1_000_000,
        doc='Surface points with normals kept in the checkpoint for refinement and display.')
    seed: int = spec(0, low=0, high=2 ** 32 - 1, doc='Seed of sampling and initialisation.')

    def __post_init__(self) -> None:
        check_ranges(self)
        sigmas = self.near_surface_sigma_mm
        _check(len(sigmas) > 0 and all(s > 0 for s in sigmas),
               f'train.near_surface_sigma_mm must be positive mm values, got {sigmas}')


@dataclass(frozen=True)
class RegistrationConfig:
    """NeuralReg search, local refinement and the confidence gates."""

    SECTION: ClassVar[str] = 'registration'

    backend: str = spec(
        'grid',
        doc=("Distance backend of the search: 'grid' (UDF distilled to a grid) or 'neural' (the "
             'MLP).'))
    num_hypotheses: int = spec(
        2048, low=1, high=100_000,
        doc=('Rigid start poses of the search; rotations spread over SO(3) by farthest points '
             '(a patch: on the bone surface, see optimised_share).'))
    optimised_share: float = spec(
        0.25, low=0.0, high=1.0, exclusive='low',
        doc=("Share of a full sweep's start poses optimised at once: the best by their cost on "
             'the coarse points (1 = all, as published). A patch optimises num_hypotheses of '
             'its surface starts. Measured on specimen00: 0.25 keeps every result of 1.0, at '
             'a third of the coarse stage.'))
    latent_dim: int = spec(
        32, low=1, high=512,
        doc="Width of the shared backbone's input embedding per hypothesis.")
    backbone_dim: int = spec(
        64, low=1, high=1024,
        doc='Width of the shared backbone MLP feeding the per-hypothesis heads.')
    coarse_points: int = spec(
        64, low=8, high=100_000,
        doc='Cloud points scored per hypothesis in the coarse stage.')
    patch_coarse_points: int = spec(
        128, low=8, high=100_000,
        doc=('Cloud points scored per hypothesis in the coarse stage of a patch (a cloud '
             "narrower than 0.8 of the bone's diagonal, whose starts lie on the surface). On 64 "
             'points a wrong pose of a 40 mm pelvis patch of specimen00 (bench seed 3) scored '
             'better than the truth, and the search missed it.'))
    coarse_iterations: int = spec(90, low=0, high=100_000, doc='Adam steps of the coarse stage.')
    coarse_prune_every: int = spec(
        15, low=0, high=100_000,
        doc=('Every this many coarse steps the worse half of the hypotheses is dropped (0 = '
             'never).'))
    coarse_prune_keep: float = spec(
        0.5, low=0.0, high=1.0, exclusive='both',
        doc='Share of hypotheses kept at each coarse pruning (successive halving).')
    fine_top_k: int = spec(
        32, low=2,
        doc='Hypotheses carried from the coarse to the fine stage.')
    patch_fine_top_k: int = spec(
        96, low=2,
        doc=('Hypotheses carried from the coarse to the fine stage for a short sweep (a cloud '
             "narrower than 0.8 of the bone's diagonal). A patch has more near-equal optima than"
             ' a full sweep: with 32, 2 of 30 patches of specimen00 (60 and 40 mm) missed the '
             'best one; with 64, one 60 mm patch still did on another machine (its floating '
             'point took another path).'))
    fine_points: int = spec(
        512, low=8, high=1_000_000,
        doc='Cloud points scored per hypothesis in the fine stage.')
    fine_iterations: int = spec(50, low=0, high=100_000, doc='Adam steps of the fine stage.')
    learning_rate: float = spec(
        2e-2, low=0.0, high=1.0, exclusive='low',
        doc='Adam learning rate of both stages.')
    translation_scale_mm: float = spec(
        50.0, low=0.0, high=1000.0, exclusive='low', unit='mm',
        doc="Scale of a head's translation output, in mm (so both outputs are of order one).")
    robust_scale_mm: float = spec(
        3.0, low=0.0, high=100.0, exclusive='low', unit='mm',
        doc='Scale of the Geman-McClure cost on UDF values; points far beyond it barely count.')
    final_candidates: int = spec(
        8, low=2,
        doc=('Best fine hypotheses whose mean cost decides when the fine stage has converged '
             '(at least 2: uniqueness needs an alternative). Every distinct fine pose is '
             're-scored on the whole cloud; the refine stage draws from them best first.'))
    distinct_rotation_deg: float = spec(
        10.0, low=0.0, high=180.0, exclusive='low', unit='deg',
        doc=('Poses closer than this in rotation (and in translation below) count as the same '
             'pose.'))
    distinct_translation_mm: float = spec(
        10.0, low=0.0, high=1000.0, exclusive='low', unit='mm',
        doc='See distinct_rotation_deg.')
    refine: bool = spec(
        True,
        doc='Finish with robust point-to-plane ICP against the bone surface.')
    refine_iterations: int = spec(
        60, low=0, high=1000,
        doc=('Maximum ICP iterations per candidate. A wrong candidate creeps along the surface '
             'towards an optimum; stopped half-way it poses as a close alternative and the '
             'uniqueness test refuses a correct result (30 did so in 1 of 15 full sweeps).'))
    refine_tolerance_mm: float = spec(
        0.01, low=0.0, high=10.0, exclusive='low', unit='mm',
        doc='ICP stops once a step moves the cloud centroid and rotation by less than this.')
    inlier_threshold_mm: float = spec(
        5.0, strict='calibrated', low=0.0, high=100.0, exclusive='low', unit='mm',
        doc='A point within this distance of the surface after registration is an inlier.')
    max_points: int = spec(
        20_000, high=10_000_000,
        doc=('Larger clouds are subsampled (seeded) to this many points for scoring and '
             'refinement.'))
    min_points: int = spec(
        100, low=3,
        doc='Fewer valid points than this is an input error.')
    early_stop_tolerance: float = spec(
        1e-4, low=0.0, high=1.0, exclusive='high',
        doc='A stage stops when its best cost improves less than this (relative) over a window.')
    gate_max_residual_mm: float = spec(
        2.0, strict='lower', low=0.0, high=100.0, exclusive='low', unit='mm',
        doc=('Accept only if the mean inlier distance is at most this (or the noise-scaled '
             'limit below, where larger).'))
    gate_residual_noise_factor: float = spec(
        0.7, strict='lower', low=0.0, high=10.0,
        doc=('A noisy cloud may reach this multiple of its measured point noise as mean inlier '
             'distance (0: the fixed gate alone). Gaussian noise alone puts a correct fit at '
             '0.54-0.6 sigma (the mean of a half-normal cut at the 5 mm inlier threshold), so '
             'at 4 mm the fixed 2 mm refuses every correct fit; 0.7 leaves a margin above that '
             'and keeps the fixed gate below 2.9 mm of noise. On held-out data '
             '(benchmarks/calibrate_gates.py) 0.6-1.5 accept the same fits, no wrong one: '
             'under that much noise wrong fits have the same residual, and what refuses them '
             'is uniqueness and precision.'))
    gate_min_inlier_fraction: float = spec(
        0.6, strict='higher', low=0.0, high=1.0,
        doc='Accept only if at least this share of points are inliers.')
    gate_max_noise_mm: float = spec(
        5.0, strict='lower', low=0.0, high=100.0, exclusive='low', unit='mm',
        doc=("Accept only if the cloud's measured point noise is at most this, mm: the "
             "confidence model's noise-driven terms (the covariance's systematic_noise_gain, "
             'the noise-scaled residual gate, the de-biasing) were calibrated on clouds '
             'measuring up to about 4.2 mm (specimen00 as acquired, 1.3-1.7 mm, and with 2 and '
             '4 mm of gaussian noise added); beyond it they are an extrapolation.'))
    refined_candidates: int = spec(
        4, low=1, high=64,
        doc=('Distinct candidates refined by ICP and compared by the uniqueness test. When all '
             'of them converge to one pose, further distinct fine poses are refined, best '
             'first, until one stays distinct.'))
    cluster_mm: float = spec(
        10.0, strict='calibrated', low=0.5, high=200.0, unit='mm',
        doc=('Edge of the cubic clusters that confidence statistics treat as one correlated group'
             ' of points (ultrasound errors are shared by neighbours), mm. See '
             '``core.confidence``.'))
    covariance_scale: float = spec(
        2.0, strict='higher', low=0.01, high=1000.0,
        doc=('Multiplier of the cluster-robust sandwich term of the pose covariance. Calibrated '
             'with the two systematic_* terms below on held-out data: '
             'benchmarks/calibrate_gates.py.'))
    systematic_error_mm: float = spec(
        0.0, strict='higher', low=0.0, high=100.0, unit='mm',
        doc=('RMS of the smooth systematic surface offset (segmentation and tracking error shared'
             ' by neighbouring points) that the pose covariance allows for whatever the noise, '
             'mm. A patch cannot average it out as a whole sweep does; weak directions amplify '
             'it. 0: on held-out data (benchmarks/calibrate_gates.py) the noise-driven part below'
             ' covered every accepted error, and a fixed part large enough to matter pushed '
             "the femurs' full sweeps to the 2 deg gate."))
    systematic_length_mm: float = spec(
        50.0, strict='calibrated', low=1.0, high=1000.0, unit='mm',
        doc='Correlation length of that offset (gaussian), mm.')
    systematic_noise_gain: float = spec(
        0.1, strict='higher', low=0.0, high=10.0,
        doc=("Growth of the systematic offset with the cloud's measured point noise sigma, per mm:"
             ' the offset RMS is sqrt(systematic_error_mm^2 + (systematic_noise_gain * sigma^2)^2)'
             ' mm, '
             'for noise on a curved surface biases a fit by about sigma^2 times the curvature: '
             'noisy clouds are de-biased for that, and this term covers what is left and the '
             'systematic errors that grow with the noise.'))
    rigid_error_mm: float = spec(
        0.3, strict='higher', low=0.0, high=100.0, unit='mm',
        doc=('RMS per axis of a rigid translation error that the whole cloud shares (the '
             "probe's tracking and calibration over the frames of a sweep), at the cloud's "
             "centroid, mm. Nothing in the cloud's residuals shows it: specimen00's short "
             'sweeps, each well fitted, lie off the whole sweep by more than their residuals '
             'allow. Chosen with rigid_error_deg on held-out bench seeds (8-11, patches of 40 '
             'and 60 mm, errors against the case floor) as the pair with the best coverage '
             'that keeps every full and noisy sweep of the bench accepted, the smallest '
             'rotation first; see the README.'))
    rigid_error_deg: float = spec(
        0.1, strict='higher', low=0.0, high=45.0, unit='deg',
        doc='RMS per axis of the rigid rotation error about the centroid that goes with it, deg.')
    gate_min_uniqueness_z: float = spec(
        6.0, strict='higher', low=0.0, high=1000.0,
        doc=('Accept only if the best pose fits better than the best distinct alternative by at '
             "least this many standard errors (cluster-robust, so it adapts to the cloud's noise "
             'and size).'))
    gate_max_bound_mm: float = spec(
        2.0, strict='lower', low=0.0, high=1000.0, exclusive='low', unit='mm',
        doc='Accept only if the 95 % position bound at the target point is at most this, mm.')
    gate_max_bound_deg: float = spec(
        2.0, strict='lower', low=0.0, high=180.0, exclusive='low', unit='deg',
        doc='Accept only if the 95 % rotation bound is at most this, degrees.')
    precision_at_target: bool = spec(
        False,
        doc=("Judge the position bound at ``precision_target_mm`` instead of the cloud's "
             'centroid.'))
    precision_target_mm: tuple[float, ...] = spec(
        (0.0, 0.0, 0.0), unit='mm',
        doc=('Bone-frame point (x, y, z mm) where the position bound is judged when '
             "``precision_at_target``, e.g. a planned drill entry or the implant's centre."))
    track_points: int = spec(
        800, low=6,
        doc=('Tracking: points used by the frame-to-frame ICP and its fit statistics (seeded '
             'subset).'))
    track_max_rotation_deg: float = spec(
        10.0, strict='lower', low=0.0, high=180.0, exclusive='low', unit='deg',
        doc='Tracking: a frame whose pose turned more than this from the previous pose is lost.')
    track_max_translation_mm: float = spec(
        10.0, strict='lower', low=0.0, high=1000.0, exclusive='low', unit='mm',
        doc=('Tracking: a frame whose centroid moved more than this from the previous pose is '
             'lost.'))
    track_min_constraint: float = spec(
        0.001, strict='higher', low=0.0, high=1.0, exclusive='both',
        doc=('Tracking: accept only if the fit pins all six degrees of freedom at least this '
             'well. Tracking has no ambiguity measure (it searches no alternatives); this is its '
             'local stand-in. The smallest over the largest eigenvalue of the point-to-plane '
             "information matrix, with rotations scaled by the cloud's radius (1 = equally "
             'constrained in every direction). A patch that can slide along or spin about an axis'
             ' scores near 0. Measured: real ultrasound sweeps 0.03-0.09; simulated 20-40 % views'
             ' 0.004-0.2, except the fibula (thin and long, 0.0008-0.0011, so about half its '
             'frames fall back to global registration); 25 mm patches of the real femoral shaft '
             "0.0003-0.0008; the phantom's tapered shaft 0.0008."))
    seed: int = spec(0, low=0, high=2 ** 32 - 1,
                     doc='Seed of sampling and head initialisation.')

    def __post_init__(self) -> None:
        _check(self.backend in DISTANCE_BACKENDS,
               f'registration.backend must be one of {DISTANCE_BACKENDS}, got {self.backend!r}')
        check_ranges(self)
        # Bounds set by another field.
        _check(self.fine_top_k <= self.num_hypotheses,
               f'registration.fine_top_k must be in [2, num_hypotheses={self.num_hypotheses}], '
               f'got {self.fine_top_k}')
        _check(self.patch_fine_top_k <= self.num_hypotheses,
               'registration.patch_fine_top_k must be in [2, num_hypotheses='
               f'{self.num_hypotheses}], got {self.patch_fine_top_k}')
        _check(self.final_candidates <= min(self.fine_top_k, self.patch_fine_top_k),
               'registration.final_candidates must be in [2, min(fine_top_k, patch_fine_top_k)='
               f'{min(self.fine_top_k, self.patch_fine_top_k)}], got {self.final_candidates}')
        _check(self.min_points <= self.max_points,
               f'registration.min_points must be in [3, max_points={self.max_points}], '
               f'got {self.min_points}')
        target = self.precision_target_mm
        _check(len(target) == 3 and all(abs(float(v)) <= 1e6 for v in target),
               'registration.precision_target_mm must be three bone-frame mm coordinates '
               f'within 1e6, got {target}')
        _check(self.track_points <= self.max_points,
               f'registration.track_points must be in [6, max_points={self.max_points}], '
               f'got {self.track_points}')
        # The residual is a mean of distances within inlier_threshold_mm: a gate at or above
        # it could never refuse anything.
        _check(self.gate_max_residual_mm < self.inlier_threshold_mm,
               'registration.gate_max_residual_mm must be below inlier_threshold_mm='
               f'{self.inlier_threshold_mm} (the residual is a mean of distances within it), '
               f'got {self.gate_max_residual_mm}')


def loosened_gates(config: RegistrationConfig) -> tuple[str, ...]:
    """Return a line per confidence setting of ``config`` looser than its calibrated default.

    The gates and the confidence model's terms (fields with ``strict`` metadata) were
    calibrated as a whole (``benchmarks/calibrate_gates.py``). A value on the accepting side
    of its default, or any change of a ``'calibrated'`` one, accepts results that calibration
    never measured: the node warns about them. Empty when none is.
    """
    calibrated = RegistrationConfig()
    out = []
    for f in fields(config):
        way = f.metadata.get('strict', '')
        value, default = getattr(config, f.name), getattr(calibrated, f.name)
        if not way or value == default:
            continue
        if way == 'calibrated':
            out.append(f'{config.SECTION}.{f.name}={value:g} (calibrated at {default:g}; any '
                       'other value is unvalidated)')
        elif (value < default) if way == 'higher' else (value > default):
            side = 'lower' if way == 'higher' else 'higher'
            out.append(f'{config.SECTION}.{f.name}={value:g} (calibrated at {default:g}; '
                       f'{side} accepts more)')
    return tuple(out)


@dataclass(frozen=True)
class SweepConfig:
    """How the slices of a probe sweep are accumulated, and when the sweep is solved."""

    SECTION: ClassVar[str] = 'sweep'

    min_points: int = spec(
        1500, low=3, high=10_000_000,
        doc=('Points (after voxel downsampling) needed before a sweep is registered; later '
             'solves always take the newest data.'))
    max_age_s: float = spec(
        30.0, low=0.01, high=3600.0, unit='s',
        doc='Slices older than this (by header stamp) than the newest slice drop out, s.')
    voxel_mm: float = spec(
        1.0, low=0.0, high=50.0, unit='mm',
        doc='Voxel edge for downsampling the accumulated points, mm; 0 keeps every point.')
    max_points: int = spec(
        60_000, low=100, high=10_000_000,
        doc='Most points held; the oldest slices drop out beyond it (bounded memory).')
    settle_s: float = spec(
        0.3, low=0.0, high=60.0, unit='s',
        doc=('Solve once no slice has arrived for this long, s (the probe paused or the sweep '
             'ended); 0 solves on every new slice.'))
    max_wait_s: float = spec(
        2.0, low=0.0, high=3600.0, unit='s',
        doc=('During a sweep that keeps streaming, solve at the latest this long after new data '
             'became due, s.'))

    def __post_init__(self) -> None:
        check_ranges(self)


@dataclass(frozen=True)
class TrackingConfig:
    """When a frame may be tracked from the last accepted pose (mode 'track').

    The gates of a tracked result itself are ``RegistrationConfig.track_*``.
    """

    SECTION: ClassVar[str] = 'track'

    max_gap_s: float = spec(
        5.0, low=0.001, high=600.0, unit='s',
        doc=('A frame stamped (or arriving) more than this after the last accepted one, or '
             'stamped before it, is registered from scratch, not tracked, s. Must exceed the '
             'time of one full registration, which the first tracked frame waits for.'))
    max_age_s: float = spec(
        30.0, low=0.1, high=3600.0, unit='s',
        doc=('A track is re-anchored by a full registration (output pauses for its duration) '
             'once its last one is this old, so a slow drift along a weakly constrained '
             'direction cannot build up for long, s.'))

    def __post_init__(self) -> None:
        check_ranges(self)


PRESETS: dict[str, dict[str, Any]] = {
    'default': {},
    # The published NeuralBoneReg setting: 5000 heads, 1000 Adam iterations at lr 1e-3, coarse
    # 512 points, fine 3000 points for the top 64, no refinement. It is the baseline to beat.
    'paper': dict(num_hypotheses=5000, coarse_points=512, patch_coarse_points=512,
                  coarse_iterations=1000,
                  fine_top_k=64, fine_points=3000, fine_iterations=1000, learning_rate=1e-3,
                  early_stop_tolerance=0.0, coarse_prune_every=0, refine=False,
                  final_candidates=8, optimised_share=1.0),
    # Small and quick, for tests and smoke runs.
    'fast': dict(num_hypotheses=512, coarse_iterations=60, fine_top_k=16, patch_fine_top_k=32,
                 fine_points=512, fine_iterations=40, final_candidates=4),
}


def registration_preset(name: str, **overrides: Any) -> RegistrationConfig:
    """Return the named preset with ``overrides`` applied; unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; expected one of {sorted(PRESETS)}')
    return RegistrationConfig(**{**PRESETS[name], **overrides})


def section_from_dict(cls: type, values: Mapping[str, Any], section: str | None = None) -> Any:
    """Build one config dataclass from ``{field: value}``; a bad key or value raises ValueError.

    Values are type-checked against the defaults (lists become tuples, ints become floats
    where a float is expected); ``section`` (default ``cls.SECTION``) names them in errors.
    """
    return _build(cls, values, section or cls.SECTION)


#: A float written without a dot, ``1e-3``: a string to PyYAML (YAML 1.1), a double to ROS 2.
EXPONENT_FLOAT = re.compile(r'^[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+$')


def _number_tuple(value: Any, name: str) -> tuple[float, ...]:
    """Return a list of finite numbers as a float tuple; ValueError naming ``name`` otherwise."""
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value):
        raise ValueError(f'{name} must be a list of finite numbers, got {value!r}')
    return tuple(float(v) for v in value)


def _section(values: Any, section: str) -> Mapping[str, Any]:
    """Return ``values`` if it is a mapping (None or empty: {}); ValueError naming ``section``."""
    if not values:
        return {}
    if not isinstance(values, Mapping):
        raise ValueError(f'config section {section!r} must be a mapping of field: value, got '
                         f'{type(values).__name__} {values!r:.80}')
    return values


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    values = _section(values, section)
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f'unknown {section} parameter(s) {unknown}; expected some of {sorted(names)}')
    coerced = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            value = _number_tuple(value, f'{section}.{key}')
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f'{section}.{key} must be true or false, got {value!r}')
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f'{section}.{key} must be an integer, got {value!r}')
        elif isinstance(default, float):
            if isinstance(value, str) and EXPONENT_FLOAT.match(value):
                value = float(value)  # YAML 1.1 reads 1e-3 as a string; ROS 2 as a double
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f'{section}.{key} must be a number, got {value!r}')
            value = float(value)
        elif isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f'{section}.{key} must be a string, got {value!r}')
        coerced[key] = value
    return cls(**coerced)


@dataclass(frozen=True)
class Configs:
    """The three configs of one registrar."""

    udf: UdfConfig = field(default_factory=UdfConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)


def configs_from_dict(values: Mapping[str, Any], preset: str = 'default') -> Configs:
    """Build configs from ``{'udf': {...}, 'train': {...}, 'registration': {...}}``.

    Registration values are applied on top of ``preset``. Unknown sections or keys raise.
    """
    if not isinstance(values, Mapping):
        raise ValueError(f'configs must be a mapping of sections, got {type(values).__name__}')
    unknown = sorted(set(values) - {'udf', 'train', 'registration'})
    if unknown:
        raise ValueError(f'unknown config section(s) {unknown}; expected udf, train, registration')
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
    reg = {**PRESETS[preset], **_section(values.get('registration'), 'registration')}
    return Configs(
        udf=_build(UdfConfig, values.get('udf'), 'udf'),
        train=_build(TrainConfig, values.get('train'), 'train'),
        registration=_build(RegistrationConfig, reg, 'registration'),
    )


def load_yaml_configs(path: str | Path, preset: str = 'default') -> Configs:
    """Read configs from a YAML file (``safe_load``); a ROS params file's sections also work.

    A ROS 2 parameter file (``node_name: {ros__parameters: {...}}``) is accepted: the
    ``udf``, ``train`` and ``registration`` sections are taken from its first node.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f'cannot read config YAML {path}: {exc}') from exc
    if not isinstance(data, dict):
        raise ValueError(f'config YAML {path} must hold a mapping, got {type(data).__name__}')
    for node_values in data.values():
        if isinstance(node_values, dict) and 'ros__parameters' in node_values:
            params = node_values['ros__parameters'] or {}
            if not isinstance(params, dict):
                raise ValueError(f'config YAML {path}: ros__parameters must be a mapping, got '
                                 f'{type(params).__name__}')
            data = {k: v for k, v in params.items() if k in ('udf', 'train', 'registration')}
            break
    return configs_from_dict(data, preset)


def as_dict(config: Any) -> dict[str, Any]:
    """Return a dataclass config as a plain dict (tuples as lists), for YAML and checkpoints."""
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
