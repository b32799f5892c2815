"""Per-patient neural unsigned distance field (UDF): model, training, checkpoint and cache.

The field is an MLP ``R^3 -> R+`` fitted to one bone only, supervised by exact point-to-mesh
distances (libigl) when a mesh is given, or self-supervised by nearest-surface-point distances
when only a surface point cloud is. After training it is distilled once to a dense grid, the
fast backend of the registration; both are kept in the checkpoint with the surface samples and
normals used for refinement, so a registrar can be rebuilt from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import logging
import math
import os
from pathlib import Path
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
import trimesh

from neural_bone_reg.core.config import as_dict, TrainConfig, UdfConfig
from neural_bone_reg.core.errors import CheckpointError, InputError

LOG = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_KIND = 'neural_bone_reg.udf'
#: The UDF's accuracy is reported within this distance of the surface (mm).
ACCURACY_BAND_MM = 10.0
#: Held-out points used for the accuracy report.
ACCURACY_SAMPLES = 20_000
#: Points per forward pass when evaluating the field in bulk (grid distillation).
EVAL_CHUNK = 65_536
#: Without a progress callback or bar, training logs every this many percent.
LOG_EVERY_PERCENT = 10
#: The learning rate decays (cosine) to this fraction of its initial value.
FINAL_LR_FRACTION = 0.05

ProgressCallback = Callable[[int, int, float], None]


class NeuralUDF(nn.Module):
    """MLP unsigned distance field of one bone; input and output in mm.

    Inputs are normalised by the bounding-box centre and largest half-extent (as in the
    official code), lifted with Fourier features, and the output is ``|mlp(x)| * scale``.
    """

    def __init__(self, config: UdfConfig, center: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.config = config
        self.register_buffer('center', center.detach().clone().float().reshape(3))
        self.register_buffer('scale', torch.tensor(float(scale)))
        frequencies = math.pi * 2.0 ** torch.arange(config.num_frequencies, dtype=torch.float32)
        self.register_buffer('frequencies', frequencies)
        in_dim = 3 + 6 * config.num_frequencies
        layers: list[nn.Module] = []
        for i in range(config.num_hidden_layers):
            layer_in_dim = in_dim if i == 0 else config.hidden_dim
            layers += [nn.Linear(layer_in_dim, config.hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(config.hidden_dim, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Return the unsigned distance (...,) in mm at points (..., 3) in mm."""
        x = (points - self.center) / self.scale
        if self.config.num_frequencies:
            angles = x[..., None] * self.frequencies  # (..., 3, F)
            encoded = [x, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)]
            x = torch.cat(encoded, dim=-1)
        return self.mlp(x).squeeze(-1).abs() * self.scale


@dataclass(frozen=True)
class DistanceGrid:
    """The UDF sampled on a regular grid: ``values[i, j, k]`` at ``origin + voxel * (i, j, k)``."""

    origin: np.ndarray
    voxel_mm: float
    values: np.ndarray


@dataclass
class UdfModel:
    """A trained field with everything a registrar needs; see :func:`train_udf`."""

    field: NeuralUDF
    grid: DistanceGrid
    surface_points: np.ndarray
    surface_normals: np.ndarray
    geometry_sha256: str
    udf_config: UdfConfig
    train_config: TrainConfig
    accuracy: dict[str, float]
    train_time_s: float
    checkpoint_path: Path | None = None


def geometry_sha256(path: str | Path) -> str:
    """Return the hex sha256 of the source geometry file."""
    from neural_bone_reg.core.io import file_sha256
    return file_sha256(path)


def config_key(udf_config: UdfConfig, train_config: TrainConfig) -> str:
    """Return a short hash of the configs and format version, part of the cache key."""
    blob = json.dumps({'v': FORMAT_VERSION, 'udf': as_dict(udf_config),
                       'train': as_dict(train_config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def cache_path(cache_dir: str | Path, sha256: str, udf_config: UdfConfig,
               train_config: TrainConfig) -> Path:
    """Return where the checkpoint of this geometry and config lives in ``cache_dir``."""
    return Path(cache_dir) / f'udf_{sha256[:16]}_{config_key(udf_config, train_config)}.pt'


class _Supervision:
    """Exact distance to a mesh (libigl), or nearest-sample distance to a surface cloud."""

    def __init__(self, mesh: trimesh.Trimesh | None, surface: np.ndarray) -> None:
        self._mesh = mesh
        self._tree = None
        if mesh is None:
            from scipy.spatial import cKDTree
            self._tree = cKDTree(surface)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        if self._mesh is not None:
            import igl
            sq, _, _ = igl.point_mesh_squared_distance(
                np.ascontiguousarray(points, dtype=np.float64),
                np.ascontiguousarray(self._mesh.vertices, dtype=np.float64),
                np.ascontiguousarray(self._mesh.faces, dtype=np.int64))
            return np.sqrt(np.maximum(sq, 0.0))
        dist, _ = self._tree.query(points, workers=-1)
        return dist


def _surface_samples(mesh: trimesh.Trimesh | None, cloud: np.ndarray | None, count: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return surface points and unit normals; normals from the mesh or by local PCA."""
    if mesh is not None:
        points, faces = trimesh.sample.sample_surface(mesh, count, seed=int(rng.integers(1 << 31)))
        return points, mesh.face_normals[faces]
    from scipy.spatial import cKDTree
    idx = rng.choice(len(cloud), size=min(count, len(cloud)), replace=False)
    points = cloud[idx]
    _, nbrs = cKDTree(cloud).query(points, k=min(16, len(cloud)))
    local = cloud[nbrs] - cloud[nbrs].mean(axis=1, keepdims=True)
    normals = np.linalg.svd(local, full_matrices=False)[2][:, -1]
    return points, normals


def _training_points(surface: np.ndarray, lo: np.ndarray, hi: np.ndarray, config: TrainConfig,
                     rng: np.random.Generator) -> np.ndarray:
    """Draw query points: gaussian shells around the surface plus a uniform share of the box."""
    n_uniform = int(config.uniform_fraction * config.num_samples)
    n_near = config.num_samples - n_uniform
    sigmas = np.asarray(config.near_surface_sigma_mm)
    base = surface[rng.integers(len(surface), size=n_near)]
    scale = sigmas[rng.integers(len(sigmas), size=n_near)][:, None]
    near = base + rng.normal(size=(n_near, 3)) * scale
    uniform = rng.uniform(lo, hi, size=(n_uniform, 3))
    return np.clip(np.vstack([near, uniform]), lo, hi)


def train_udf(mesh: trimesh.Trimesh | None = None, cloud: np.ndarray | None = None, *,
              sha256: str, udf_config: UdfConfig | None = None,
              train_config: TrainConfig | None = None, device: torch.device | str = 'cpu',
              progress: ProgressCallback | bool | None = None) -> UdfModel:
    """Fit the UDF of one bone, from a mesh (exact distances) or a surface cloud (self-supervised).

    ``progress`` is a callback ``(step, total, loss)``, True for a tqdm bar on stderr, or None
    to log progress every 10 %.
    """
    if (mesh is None) == (cloud is None):
        raise ValueError('train_udf needs exactly one of mesh or cloud')
    udf_config = udf_config or UdfConfig()
    train_config = train_config or TrainConfig()
    device = torch.device(device)
    start = time.perf_counter()
    rng = np.random.default_rng(train_config.seed)
    torch.manual_seed(train_config.seed)

    geometry = np.asarray(mesh.vertices if mesh is not None else cloud, dtype=np.float64)
    lo = geometry.min(axis=0) - train_config.margin_mm
    hi = geometry.max(axis=0) + train_config.margin_mm
    dense, _ = _surface_samples(mesh, cloud, max(train_config.num_samples // 2, 10_000), rng)
    surface_points, surface_normals = _surface_samples(
        mesh, cloud, train_config.num_surface_points, rng)
    supervise = _Supervision(mesh, np.asarray(cloud) if cloud is not None else dense)

    queries = _training_points(dense, lo, hi, train_config, rng)
    targets = supervise(queries)
    LOG.info('UDF supervision: %d points, exact distances in %.1f s', len(queries),
             time.perf_counter() - start)

    center = torch.tensor((geometry.min(axis=0) + geometry.max(axis=0)) / 2.0, dtype=torch.float32)
    scale = float((geometry.max(axis=0) - geometry.min(axis=0)).max() / 2.0)
    field = NeuralUDF(udf_config, center, scale).to(device)
    q = torch.as_tensor(queries, dtype=torch.float32, device=device)
    d = torch.as_tensor(targets, dtype=torch.float32, device=device)
    optimizer = torch.optim.Adam(field.parameters(), lr=train_config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, train_config.iterations, eta_min=train_config.learning_rate * FINAL_LR_FRACTION)
    gen = torch.Generator(device='cpu').manual_seed(train_config.seed)

    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=train_config.iterations, desc='training UDF', unit='it', leave=False)
    report_every = max(train_config.iterations // 100, 1)
    for step in range(train_config.iterations):
        idx = torch.randint(len(q), (train_config.batch_size,), generator=gen).to(device)
        # L1 on distances normalised by the field's scale, so the loss is size independent.
        loss = (field(q[idx]) - d[idx]).abs().mean() / field.scale
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % report_every == 0 or step + 1 == train_config.iterations:
            value = float(loss.detach())
            if bar is not None:
                bar.update(report_every if (step + 1) % report_every == 0 else
                           (step + 1) % report_every)
                bar.set_postfix(loss_mm=f'{value * scale:.3f}')
            elif callable(progress):
                progress(step + 1, train_config.iterations, value * scale)
            elif (step + 1) % (report_every * LOG_EVERY_PERCENT) == 0:
                LOG.info('training UDF: %d/%d steps, L1 %.3f mm', step + 1,
                         train_config.iterations, value * scale)
    if bar is not None:
        bar.close()
    field.eval()

    grid = distill_grid(field, lo, hi, train_config.grid_voxel_mm)
    accuracy = measure_accuracy(field, grid, dense, supervise, rng)
    elapsed = time.perf_counter() - start
    LOG.info('UDF trained in %.1f s: MAE %.3f mm (neural), %.3f mm (grid) within %g mm',
             elapsed, accuracy['neural_mae_mm'], accuracy['grid_mae_mm'], ACCURACY_BAND_MM)
    return UdfModel(field=field.cpu(), grid=grid, surface_points=surface_points.astype(np.float32),
                    surface_normals=surface_normals.astype(np.float32), geometry_sha256=sha256,
                    udf_config=udf_config, train_config=train_config, accuracy=accuracy,
                    train_time_s=elapsed)


@torch.no_grad()
def evaluate(field: NeuralUDF, points: np.ndarray) -> np.ndarray:
    """Evaluate the field at (N, 3) points in chunks; returns (N,) float32 mm."""
    device = field.center.device
    out = np.empty(len(points), dtype=np.float32)
    for i in range(0, len(points), EVAL_CHUNK):
        chunk = torch.as_tensor(points[i:i + EVAL_CHUNK], dtype=torch.float32, device=device)
        out[i:i + EVAL_CHUNK] = field(chunk).cpu().numpy()
    return out


def distill_grid(field: NeuralUDF, lo: np.ndarray, hi: np.ndarray,
                 voxel_mm: float) -> DistanceGrid:
    """Sample the field on a regular grid covering [lo, hi] with ``voxel_mm`` spacing."""
    counts = np.ceil((hi - lo) / voxel_mm).astype(int) + 1
    axes = [lo[i] + voxel_mm * np.arange(counts[i]) for i in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1).reshape(-1, 3)
    values = evaluate(field, pts).reshape(*counts)
    return DistanceGrid(origin=lo.astype(np.float64), voxel_mm=float(voxel_mm), values=values)


def measure_accuracy(field: NeuralUDF, grid: DistanceGrid, surface: np.ndarray,
                     supervise: Callable[[np.ndarray], np.ndarray],
                     rng: np.random.Generator) -> dict[str, float]:
    """Return the mean absolute error (mm) of field and grid within 10 mm of the surface."""
    from neural_bone_reg.core.fields import GridField

    base = surface[rng.integers(len(surface), size=ACCURACY_SAMPLES)]
    noise = rng.normal(size=base.shape)
    pts = base + noise * rng.uniform(0, ACCURACY_BAND_MM / 2, size=(len(base), 1))
    exact = supervise(pts)
    keep = exact <= ACCURACY_BAND_MM
    pts, exact = pts[keep], exact[keep]
    neural = evaluate(field, pts)
    with torch.no_grad():
        gridded = GridField(grid)(torch.as_tensor(pts, dtype=torch.float32)).numpy()
    return {
        'neural_mae_mm': float(np.abs(neural - exact).mean()),
        'grid_mae_mm': float(np.abs(gridded - exact).mean()),
        'grid_vs_neural_mae_mm': float(np.abs(gridded - neural).mean()),
        'band_mm': ACCURACY_BAND_MM,
        'samples': int(len(pts)),
    }


def save_checkpoint(model: UdfModel, path: str | Path) -> Path:
    """Write the checkpoint atomically; the config used is saved beside it as YAML."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        'kind': CHECKPOINT_KIND,
        'format_version': FORMAT_VERSION,
        'mesh_sha256': model.geometry_sha256,
        'udf_config': as_dict(model.udf_config),
        'train_config': as_dict(model.train_config),
        'state_dict': model.field.state_dict(),
        'grid_origin': torch.as_tensor(model.grid.origin),
        'grid_voxel_mm': model.grid.voxel_mm,
        'grid_values': torch.as_tensor(model.grid.values),
        'surface_points': torch.as_tensor(model.surface_points),
        'surface_normals': torch.as_tensor(model.surface_normals),
        'accuracy': model.accuracy,
        'train_time_s': model.train_time_s,
    }
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    torch.save(payload, tmp)
    os.replace(tmp, path)
    path.with_suffix('.yaml').write_text(yaml.safe_dump(
        {'udf': payload['udf_config'], 'train': payload['train_config'],
         'mesh_sha256': model.geometry_sha256, 'accuracy': model.accuracy}, sort_keys=False))
    model.checkpoint_path = path
    return path


_REQUIRED = ('kind', 'format_version', 'mesh_sha256', 'udf_config', 'train_config', 'state_dict',
             'grid_origin', 'grid_voxel_mm', 'grid_values', 'surface_points', 'surface_normals')


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> UdfModel:
    """Load a checkpoint with ``weights_only=True``; raise CheckpointError if it is unusable.

    A checkpoint is rejected when it cannot be read, is not a neural_bone_reg UDF, has another
    format version, or (with ``expected_sha256``) was trained on other geometry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'checkpoint {path} does not exist; expected a UDF .pt file')
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ''
        message = (f'checkpoint {path} is corrupt or not a torch file '
                   f'({exc.__class__.__name__}: {first_line}); delete it to retrain')
        raise CheckpointError(message) from exc
    if not isinstance(payload, dict) or payload.get('kind') != CHECKPOINT_KIND:
        kind = payload.get('kind') if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f'checkpoint {path} is not a neural_bone_reg UDF checkpoint '
                              f'(kind {kind!r})')
    missing = [k for k in _REQUIRED if k not in payload]
    if missing:
        raise CheckpointError(
            f'checkpoint {path} lacks {missing}; expected a complete UDF checkpoint')
    if payload['format_version'] != FORMAT_VERSION:
        raise CheckpointError(f'checkpoint {path} has format version {payload["format_version"]}; '
                              f'this build reads version {FORMAT_VERSION}. Retrain it.')
    if expected_sha256 is not None and payload['mesh_sha256'] != expected_sha256:
        trained_on = payload['mesh_sha256'][:12]
        raise CheckpointError(f'checkpoint {path} was trained on geometry {trained_on}..., '
                              f'not on this mesh ({expected_sha256[:12]}...): stale or foreign')
    try:
        udf_config = UdfConfig(**payload['udf_config'])
        train_config = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v
                                      for k, v in payload['train_config'].items()})
        state = payload['state_dict']
        field = NeuralUDF(udf_config, state['center'], float(state['scale']))
        field.load_state_dict(state)
        grid = DistanceGrid(origin=payload['grid_origin'].numpy().astype(np.float64),
                            voxel_mm=float(payload['grid_voxel_mm']),
                            values=payload['grid_values'].numpy().astype(np.float32))
        surface_points = payload['surface_points'].numpy().astype(np.float32)
        surface_normals = payload['surface_normals'].numpy().astype(np.float32)
    except Exception as exc:
        raise CheckpointError(
            f'checkpoint {path} has inconsistent contents ({exc}); delete it to retrain') from exc
    if (grid.values.ndim != 3 or surface_points.shape != surface_normals.shape
            or surface_points.shape[-1:] != (3,)):
        raise CheckpointError(f'checkpoint {path} has malformed grid or surface arrays')
    field.eval()
    return UdfModel(field=field, grid=grid, surface_points=surface_points,
                    surface_normals=surface_normals, geometry_sha256=payload['mesh_sha256'],
                    udf_config=udf_config, train_config=train_config,
                    accuracy=dict(payload.get('accuracy') or {}),
                    train_time_s=float(payload.get('train_time_s', 0.0)), checkpoint_path=path)


def train_or_load(mesh_path: str | Path, cache_dir: str | Path,
                  udf_config: UdfConfig | None = None,
                  train_config: TrainConfig | None = None, device: torch.device | str = 'cpu',
                  progress: ProgressCallback | bool | None = None) -> UdfModel:
    """Load the cached UDF of this mesh and config, or train and cache it.

    A mesh (.stl/.ply/.obj) is supervised with exact distances; a point cloud file
    (.xyz/.txt/.npy/.pcd, or a .ply without faces) trains self-supervised.
    """
    from neural_bone_reg.core.io import check_points, load_cloud, load_mesh

    mesh_path = Path(mesh_path)
    if not mesh_path.is_file():
        raise InputError(f'bone geometry {mesh_path} does not exist; expected a mesh '
                         '(STL, PLY, OBJ) or surface cloud in mm')
    udf_config = udf_config or UdfConfig()
    train_config = train_config or TrainConfig()
    sha = geometry_sha256(mesh_path)
    path = cache_path(cache_dir, sha, udf_config, train_config)
    if path.is_file():
        LOG.info('loading cached UDF %s', path)
        return load_checkpoint(path, expected_sha256=sha)
    mesh = cloud = None
    if mesh_path.suffix.lower() in ('.xyz', '.txt', '.npy', '.pcd'):
        cloud = load_cloud(mesh_path)
    else:
        try:
            mesh = load_mesh(mesh_path)
        except InputError:
            if mesh_path.suffix.lower() != '.ply':
                raise
            cloud = check_points(load_cloud(mesh_path), name=f'surface cloud {mesh_path}')
    model = train_udf(mesh, cloud, sha256=sha, udf_config=udf_config, train_config=train_config,
                      device=device, progress=progress)
    save_checkpoint(model, path)
    return model
