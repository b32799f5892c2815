"""Frozen configuration dataclasses of the algorithm core, one per subsystem.

Every length is in millimetres, every angle in degrees. ROS parameters and the CLI's YAML
mirror these fields as dotted names (``registration.num_hypotheses``); both build the configs
through :func:`configs_from_dict`, so a bad value fails the same way everywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

DISTANCE_BACKENDS = ('grid', 'neural')


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class UdfConfig:
    """Architecture of the per-patient neural unsigned distance field."""

    hidden_dim: int = 128
    """Width of each hidden layer (the paper: 128)."""
    num_hidden_layers: int = 3
    """Number of hidden layers (the paper: 3)."""
    num_frequencies: int = 6
    """Fourier-feature octaves of the normalised input; 0 feeds raw xyz as the paper does."""

    def __post_init__(self) -> None:
        _check(8 <= self.hidden_dim <= 1024,
               f'udf.hidden_dim must be in [8, 1024], got {self.hidden_dim}')
        _check(1 <= self.num_hidden_layers <= 8,
               f'udf.num_hidden_layers must be in [1, 8], got {self.num_hidden_layers}')
        _check(0 <= self.num_frequencies <= 12,
               f'udf.num_frequencies must be in [0, 12], got {self.num_frequencies}')


@dataclass(frozen=True)
class TrainConfig:
    """How the UDF is fitted to one bone, and how its distance grid is built."""

    iterations: int = 3000
    """Adam steps. Many small steps fit better than few large ones for the same points seen."""
    batch_size: int = 1024
    """Query points per step (each epoch visits every supervision point once)."""
    learning_rate: float = 3e-3
    """Peak Adam learning rate (after a 2 % linear warm-up; cosine-decayed to 2 % of it)."""
    num_samples: int = 200_000
    """Supervision points drawn once around the surface, with exact distances."""
    near_surface_sigma_mm: tuple[float, ...] = (0.5, 2.0, 8.0)
    """Standard deviations of the gaussian offsets from surface samples, in mm."""
    uniform_fraction: float = 0.1
    """Share of supervision points drawn uniformly in the padded bounding box."""
    margin_mm: float = 40.0
    """Padding of the bounding box that the field (and its grid) covers, in mm."""
    grid_voxel_mm: float = 1.5
    """Voxel edge of the distance grid used by the fast backend, in mm."""
    num_surface_points: int = 30_000
    """Surface points with normals kept in the checkpoint for refinement and display."""
    seed: int = 0
    """Seed of sampling and initialisation."""

    def __post_init__(self) -> None:
        _check(1 <= self.iterations <= 1_000_000,
               f'train.iterations must be in [1, 1e6], got {self.iterations}')
        _check(64 <= self.batch_size <= 1_000_000,
               f'train.batch_size must be in [64, 1e6], got {self.batch_size}')
        _check(0.0 < self.learning_rate <= 1.0,
               f'train.learning_rate must be in (0, 1], got {self.learning_rate}')
        _check(1_000 <= self.num_samples <= 10_000_000,
               f'train.num_samples must be in [1e3, 1e7], got {self.num_samples}')
        sigmas = self.near_surface_sigma_mm
        _check(len(sigmas) > 0 and all(s > 0 for s in sigmas),
               f'train.near_surface_sigma_mm must be positive mm values, got {sigmas}')
        _check(0.0 <= self.uniform_fraction < 1.0,
               f'train.uniform_fraction must be in [0, 1), got {self.uniform_fraction}')
        _check(0.0 < self.margin_mm <= 500.0,
               f'train.margin_mm must be in (0, 500], got {self.margin_mm}')
        _check(0.25 <= self.grid_voxel_mm <= 10.0,
               f'train.grid_voxel_mm must be in [0.25, 10] mm, got {self.grid_voxel_mm}')
        _check(1_000 <= self.num_surface_points <= 1_000_000,
               f'train.num_surface_points must be in [1e3, 1e6], got {self.num_surface_points}')


@dataclass(frozen=True)
class RegistrationConfig:
    """NeuralReg search, local refinement and the confidence gates."""

    backend: str = 'grid'
    """Distance backend of the search: 'grid' (UDF distilled to a grid) or 'neural' (the MLP)."""
    num_hypotheses: int = 2048
    """Rigid hypotheses optimised at once; rotations spread over SO(3) by farthest points."""
    latent_dim: int = 32
    """Width of the shared backbone's input embedding per hypothesis."""
    backbone_dim: int = 64
    """Width of the shared backbone MLP feeding the per-hypothesis heads."""
    coarse_points: int = 64
    """Cloud points scored per hypothesis in the coarse stage."""
    coarse_iterations: int = 120
    """Adam steps of the coarse stage."""
    coarse_prune_every: int = 15
    """Every this many coarse steps the worse half of the hypotheses is dropped (0 = never)."""
    coarse_prune_keep: float = 0.5
    """Share of hypotheses kept at each coarse pruning (successive halving)."""
    fine_top_k: int = 32
    """Hypotheses carried from the coarse to the fine stage."""
    fine_points: int = 1024
    """Cloud points scored per hypothesis in the fine stage."""
    fine_iterations: int = 80
    """Adam steps of the fine stage."""
    learning_rate: float = 2e-2
    """Adam learning rate of both stages."""
    translation_scale_mm: float = 50.0
    """Scale of a head's translation output, in mm (so both outputs are of order one)."""
    robust_scale_mm: float = 3.0
    """Scale of the Geman-McClure cost on UDF values; points far beyond it barely count."""
    final_candidates: int = 8
    """Distinct top hypotheses re-scored on the whole cloud and refined."""
    distinct_rotation_deg: float = 10.0
    """Poses closer than this in rotation (and in translation below) count as the same pose."""
    distinct_translation_mm: float = 10.0
    """See distinct_rotation_deg."""
    refine: bool = True
    """Finish with robust point-to-plane ICP against the bone surface."""
    refine_iterations: int = 30
    """Maximum ICP iterations."""
    refine_tolerance_mm: float = 0.01
    """ICP stops once a step moves the cloud centroid and rotation by less than this."""
    inlier_threshold_mm: float = 5.0
    """A point within this distance of the surface after registration is an inlier."""
    max_points: int = 20_000
    """Larger clouds are subsampled (seeded) to this many points for scoring and refinement."""
    min_points: int = 100
    """Fewer valid points than this is an input error."""
    early_stop_tolerance: float = 1e-4
    """A stage stops when its best cost improves less than this (relative) over a window."""
    gate_max_residual_mm: float = 2.0
    """Accept only if the mean inlier distance is at most this."""
    gate_min_inlier_fraction: float = 0.6
    """Accept only if at least this share of points are inliers."""
    refined_candidates: int = 4
    """Distinct candidates refined by ICP and compared by the uniqueness test (at most
    ``final_candidates`` exist)."""
    cluster_mm: float = 10.0
    """Edge of the cubic clusters that confidence statistics treat as one correlated group of
    points (ultrasound errors are shared by neighbours), mm. See ``core.confidence``."""
    covariance_scale: float = 2.0
    """Multiplier of the cluster-robust pose covariance (calibrated on held-out data)."""
    gate_min_uniqueness_z: float = 6.0
    """Accept only if the best pose fits better than the best distinct alternative by at least
    this many standard errors (cluster-robust, so it adapts to the cloud's noise and size)."""
    gate_max_bound_mm: float = 2.0
    """Accept only if the 95 % position bound at the target point is at most this, mm."""
    gate_max_bound_deg: float = 2.0
    """Accept only if the 95 % rotation bound is at most this, degrees."""
    precision_at_target: bool = False
    """Judge the position bound at ``precision_target_mm`` instead of the cloud's centroid."""
    precision_target_mm: tuple[float, ...] = (0.0, 0.0, 0.0)
    """Bone-frame point (x, y, z mm) where the position bound is judged when
    ``precision_at_target``, e.g. a planned drill entry or the implant's centre."""
    track_points: int = 800
    """Tracking: points used by the frame-to-frame ICP and its fit statistics (seeded subset)."""
    track_max_rotation_deg: float = 10.0
    """Tracking: a frame whose pose turned more than this from the previous pose is lost."""
    track_max_translation_mm: float = 10.0
    """Tracking: a frame whose centroid moved more than this from the previous pose is lost."""
    track_min_constraint: float = 0.001
    """Tracking: accept only if the fit pins all six degrees of freedom at least this well.

    Tracking has no ambiguity measure (it searches no alternatives); this is its local stand-in.
    The smallest over the largest eigenvalue of the point-to-plane information matrix, with
    rotations scaled by the cloud's radius (1 = equally constrained in every direction). A
    patch that can slide along or spin about an axis scores near 0. Measured: real ultrasound
    sweeps 0.03-0.09; simulated 20-40 % views 0.004-0.2, except the fibula (thin and long,
    0.0008-0.0011, so about half its frames fall back to global registration); 25 mm patches
    of the real femoral shaft 0.0003-0.0008; the phantom's tapered shaft 0.0008.
    """
    seed: int = 0
    """Seed of sampling and head initialisation."""

    def __post_init__(self) -> None:
        _check(self.backend in DISTANCE_BACKENDS,
               f'registration.backend must be one of {DISTANCE_BACKENDS}, got {self.backend!r}')
        _check(1 <= self.num_hypotheses <= 100_000,
               f'registration.num_hypotheses must be in [1, 1e5], got {self.num_hypotheses}')
        _check(1 <= self.latent_dim <= 512,
               f'registration.latent_dim must be in [1, 512], got {self.latent_dim}')
        _check(1 <= self.backbone_dim <= 1024,
               f'registration.backbone_dim must be in [1, 1024], got {self.backbone_dim}')
        _check(8 <= self.coarse_points <= 100_000,
               f'registration.coarse_points must be in [8, 1e5], got {self.coarse_points}')
        _check(0 <= self.coarse_iterations <= 100_000,
               f'registration.coarse_iterations must be in [0, 1e5], got {self.coarse_iterations}')
        _check(0 <= self.coarse_prune_every <= 100_000,
               'registration.coarse_prune_every must be in [0, 1e5], '
               f'got {self.coarse_prune_every}')
        _check(0.0 < self.coarse_prune_keep < 1.0,
               f'registration.coarse_prune_keep must be in (0, 1), got {self.coarse_prune_keep}')
        _check(1 <= self.fine_top_k <= self.num_hypotheses,
               f'registration.fine_top_k must be in [1, num_hypotheses={self.num_hypotheses}], '
               f'got {self.fine_top_k}')
        _check(8 <= self.fine_points <= 1_000_000,
               f'registration.fine_points must be in [8, 1e6], got {self.fine_points}')
        _check(0 <= self.fine_iterations <= 100_000,
               f'registration.fine_iterations must be in [0, 1e5], got {self.fine_iterations}')
        _check(0.0 < self.learning_rate <= 1.0,
               f'registration.learning_rate must be in (0, 1], got {self.learning_rate}')
        _check(0.0 < self.translation_scale_mm <= 1000.0,
               'registration.translation_scale_mm must be in (0, 1000], '
               f'got {self.translation_scale_mm}')
        _check(0.0 < self.robust_scale_mm <= 100.0,
               f'registration.robust_scale_mm must be in (0, 100] mm, got {self.robust_scale_mm}')
        _check(1 <= self.final_candidates <= self.fine_top_k,
               f'registration.final_candidates must be in [1, fine_top_k={self.fine_top_k}], '
               f'got {self.final_candidates}')
        _check(0.0 < self.distinct_rotation_deg <= 180.0,
               'registration.distinct_rotation_deg must be in (0, 180], '
               f'got {self.distinct_rotation_deg}')
        _check(0.0 < self.distinct_translation_mm <= 1000.0,
               'registration.distinct_translation_mm must be in (0, 1000], '
               f'got {self.distinct_translation_mm}')
        _check(0 <= self.refine_iterations <= 1000,
               'registration.refine_iterations must be in [0, 1000], '
               f'got {self.refine_iterations}')
        _check(0.0 < self.refine_tolerance_mm <= 10.0,
               'registration.refine_tolerance_mm must be in (0, 10], '
               f'got {self.refine_tolerance_mm}')
        _check(0.0 < self.inlier_threshold_mm <= 100.0,
               'registration.inlier_threshold_mm must be in (0, 100], '
               f'got {self.inlier_threshold_mm}')
        _check(3 <= self.min_points <= self.max_points,
               f'registration.min_points must be in [3, max_points={self.max_points}], '
               f'got {self.min_points}')
        _check(self.max_points <= 10_000_000,
               f'registration.max_points must be at most 1e7, got {self.max_points}')
        _check(0.0 <= self.early_stop_tolerance < 1.0,
               'registration.early_stop_tolerance must be in [0, 1), '
               f'got {self.early_stop_tolerance}')
        _check(0.0 < self.gate_max_residual_mm <= 100.0,
               'registration.gate_max_residual_mm must be in (0, 100], '
               f'got {self.gate_max_residual_mm}')
        _check(0.0 <= self.gate_min_inlier_fraction <= 1.0,
               'registration.gate_min_inlier_fraction must be in [0, 1], '
               f'got {self.gate_min_inlier_fraction}')
        _check(1 <= self.refined_candidates <= 64,
               'registration.refined_candidates must be in [1, 64], '
               f'got {self.refined_candidates}')
        _check(0.5 <= self.cluster_mm <= 200.0,
               f'registration.cluster_mm must be in [0.5, 200] mm, got {self.cluster_mm}')
        _check(0.01 <= self.covariance_scale <= 1000.0,
               'registration.covariance_scale must be in [0.01, 1000], '
               f'got {self.covariance_scale}')
        _check(0.0 <= self.gate_min_uniqueness_z <= 1000.0,
               'registration.gate_min_uniqueness_z must be in [0, 1000], '
               f'got {self.gate_min_uniqueness_z}')
        _check(0.0 < self.gate_max_bound_mm <= 1000.0,
               'registration.gate_max_bound_mm must be in (0, 1000] mm, '
               f'got {self.gate_max_bound_mm}')
        _check(0.0 < self.gate_max_bound_deg <= 180.0,
               'registration.gate_max_bound_deg must be in (0, 180] deg, '
               f'got {self.gate_max_bound_deg}')
        target = self.precision_target_mm
        _check(len(target) == 3 and all(abs(float(v)) <= 1e6 for v in target),
               'registration.precision_target_mm must be three bone-frame mm coordinates '
               f'within 1e6, got {target}')
        _check(6 <= self.track_points <= self.max_points,
               f'registration.track_points must be in [6, max_points={self.max_points}], '
               f'got {self.track_points}')
        _check(0.0 < self.track_max_rotation_deg <= 180.0,
               'registration.track_max_rotation_deg must be in (0, 180], '
               f'got {self.track_max_rotation_deg}')
        _check(0.0 < self.track_max_translation_mm <= 1000.0,
               'registration.track_max_translation_mm must be in (0, 1000], '
               f'got {self.track_max_translation_mm}')
        _check(0.0 < self.track_min_constraint < 1.0,
               'registration.track_min_constraint must be in (0, 1), '
               f'got {self.track_min_constraint}')


PRESETS: dict[str, dict[str, Any]] = {
    'default': {},
    # The published NeuralBoneReg setting: 5000 heads, 1000 Adam iterations at lr 1e-3, coarse
    # 512 points, fine 3000 points for the top 64, no refinement. It is the baseline to beat.
    'paper': dict(num_hypotheses=5000, coarse_points=512, coarse_iterations=1000,
                  fine_top_k=64, fine_points=3000, fine_iterations=1000, learning_rate=1e-3,
                  early_stop_tolerance=0.0, coarse_prune_every=0, refine=False,
                  final_candidates=8),
    # Small and quick, for tests and smoke runs.
    'fast': dict(num_hypotheses=512, coarse_iterations=60, fine_top_k=16, fine_points=512,
                 fine_iterations=40, final_candidates=4),
}


def registration_preset(name: str, **overrides: Any) -> RegistrationConfig:
    """Return the named preset with ``overrides`` applied; unknown names raise ValueError."""
    if name not in PRESETS:
        raise ValueError(f'unknown preset {name!r}; expected one of {sorted(PRESETS)}')
    return RegistrationConfig(**{**PRESETS[name], **overrides})


def _build(cls: type, values: Mapping[str, Any], section: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(
            f'unknown {section} parameter(s) {unknown}; expected some of {sorted(names)}')
    coerced = {}
    for key, value in values.items():
        default = getattr(cls(), key)
        if isinstance(default, tuple):
            value = tuple(value)
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise ValueError(f'{section}.{key} must be true or false, got {value!r}')
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f'{section}.{key} must be an integer, got {value!r}')
        elif isinstance(default, float):
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
    unknown = sorted(set(values) - {'udf', 'train', 'registration'})
    if unknown:
        raise ValueError(f'unknown config section(s) {unknown}; expected udf, train, registration')
    reg = {**PRESETS.get(preset, {}), **dict(values.get('registration') or {})}
    if preset not in PRESETS:
        raise ValueError(f'unknown preset {preset!r}; expected one of {sorted(PRESETS)}')
    return Configs(
        udf=_build(UdfConfig, dict(values.get('udf') or {}), 'udf'),
        train=_build(TrainConfig, dict(values.get('train') or {}), 'train'),
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
            data = {k: v for k, v in params.items() if k in ('udf', 'train', 'registration')}
            break
    return configs_from_dict(data, preset)


def as_dict(config: Any) -> dict[str, Any]:
    """Return a dataclass config as a plain dict (tuples as lists), for YAML and checkpoints."""
    values = dataclasses.asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
