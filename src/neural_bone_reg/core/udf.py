"""Per-patient neural unsigned distance field (UDF): model, training, checkpoint and cache.

The field is an MLP ``R^3 -> R+`` fitted to one bone only, supervised by exact point-to-mesh
distances (libigl) when a mesh is given, or self-supervised by nearest-surface-point distances
when only a surface point cloud is. The fast backend of the registration is a dense grid of the
same supervision distances (exact near the surface, see :func:`exact_grid`); both are kept in
the checkpoint with the surface samples and normals used for refinement, so a registrar can be
rebuilt from the checkpoint alone.
"""

from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import logging
import math
from pathlib import Path
import time
from typing import Callable

import numpy as np
import torch
from torch import nn
import trimesh

from neural_bone_reg.core.config import as_dict, section_from_dict, TrainConfig, UdfConfig
from neural_bone_reg.core.errors import CheckpointError, InputError
from neural_bone_reg.core.fields import DistanceGrid, GridField
from neural_bone_reg.core.io import (check_points, file_sha256, load_cloud, load_mesh,
                                     write_atomically)

LOG = logging.getLogger(__name__)

#: Checkpoint format. 2: the grid holds the supervision distances (exact near the surface);
#: 1: the grid was the MLP sampled on it. Both have the same contents and both are read.
FORMAT_VERSION = 2
#: The checkpoint versions this build can load.
READABLE_FORMAT_VERSIONS = (1, 2)
CHECKPOINT_KIND = 'neural_bone_reg.udf'
#: The UDF's accuracy is reported within this distance of the surface (mm).
ACCURACY_BAND_MM = 10.0
#: Held-out points used for the accuracy report.
ACCURACY_SAMPLES = 20_000
#: Points per forward pass when evaluating the field in bulk.
EVAL_CHUNK = 65_536
#: Grid voxels within this distance of the surface (to about a voxel) get exact distances, mm:
#: the band where accuracy is measured. A wider band costs exact queries and gains nothing
#: measurable: the far-field distances just beyond it are within about 0.05 mm already.
EXACT_BAND_MM = ACCURACY_BAND_MM
#: Surface samples per voxel face area that mark the grid's surface voxels.
GRID_SURFACE_SAMPLES_PER_VOXEL_AREA = 4.0
#: Voxels per chunk when filling the grid's far field (bounds the temporary memory).
GRID_CHUNK = 1 << 20
#: Most voxels a distance grid may have: 7 times a pelvis box at 1.5 mm (6.8 million). Far
#: more is a mesh in another unit than mm, or a stray part far from the bone.
MAX_GRID_VOXELS = 50_000_000
#: Without a progress callback or bar, training logs every this many percent.
LOG_EVERY_PERCENT = 10
#: The learning rate rises linearly to its peak over this share of the steps ...
WARMUP_FRACTION = 0.02
#: ... then decays (cosine) to this fraction of the peak.
FINAL_LR_FRACTION = 0.02

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

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        """Return the MLP's input (..., 3 + 6 F): normalised points (..., 3) in mm, lifted."""
        x = (points - self.center) / self.scale
        if not self.config.num_frequencies:
            return x
        angles = x[..., None] * self.frequencies  # (..., 3, F)
        return torch.cat([x, torch.sin(angles).flatten(-2), torch.cos(angles).flatten(-2)], dim=-1)

    def normalised_distance(self, encoded: torch.Tensor) -> torch.Tensor:
        """Return the distance (...,) in units of ``scale`` at encoded points (..., 3 + 6 F)."""
        return self.mlp(encoded).squeeze(-1).abs()

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Return the unsigned distance (...,) in mm at points (..., 3) in mm."""
        return self.normalised_distance(self.encode(points)) * self.scale


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
        self._tree = None
        if mesh is not None:
            import igl
            self._vertices = np.ascontiguousarray(mesh.vertices, dtype=np.float64)
            self._faces = np.ascontiguousarray(mesh.faces, dtype=np.int64)
            self._tree = igl.AABB()  # built once, queried by every call
            self._tree.init(self._vertices, self._faces)
        else:
            from scipy.spatial import cKDTree
            self._surface = np.asarray(surface, dtype=np.float64)
            self._kdtree = cKDTree(self._surface)

    def query(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return distances (N,) and closest surface points (N, 3) of points (N, 3), in mm."""
        points = np.ascontiguousarray(points, dtype=np.float64)
        if self._tree is not None:
            sq, _, closest = self._tree.squared_distance(self._vertices, self._faces, points)
            return np.sqrt(np.maximum(sq, 0.0)), closest
        dist, idx = self._kdtree.query(points, workers=-1)
        return dist, self._surface[idx]

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """Return distances (N,) of points (N, 3), in mm."""
        return self.query(points)[0]


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


def _grid_surface(mesh: trimesh.Trimesh | None, cloud: np.ndarray | None, voxel_mm: float,
                  rng: np.random.Generator) -> np.ndarray:
    """Return surface samples that mark every surface voxel of a grid ``voxel_mm`` apart."""
    if mesh is None:
        return np.asarray(cloud, dtype=np.float64)
    count = int(math.ceil(GRID_SURFACE_SAMPLES_PER_VOXEL_AREA * mesh.area / voxel_mm ** 2))
    points, _ = trimesh.sample.sample_surface(mesh, max(count, 1), seed=int(rng.integers(1 << 31)))
    return points


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


def learning_rates(config: TrainConfig) -> list[float]:
    """Return the learning rate of every step: a linear warm-up, then a cosine decay."""
    peak, steps = config.learning_rate, config.iterations
    warmup = max(1, int(WARMUP_FRACTION * steps))
    rates = []
    for step in range(steps):
        if step < warmup:
            rates.append(peak * (step + 1) / warmup)
            continue
        progress = (step - warmup) / max(steps - warmup - 1, 1)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        rates.append(peak * (FINAL_LR_FRACTION + (1.0 - FINAL_LR_FRACTION) * cosine))
    return rates


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Return Adam with one fused kernel per step where this torch has it for the device."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # torch < 2.4 fuses on CUDA only
        return torch.optim.Adam(params, lr=lr, foreach=True)


def _fit(field: NeuralUDF, queries: np.ndarray, targets: np.ndarray, config: TrainConfig,
         progress: ProgressCallback | bool | None) -> None:
    """Fit the field's MLP to distances ``targets`` (N,) at ``queries`` (N, 3), in mm.

    The inputs never need gradients, so they are encoded once. Each epoch visits every point
    once in a new seeded order, in contiguous batches (views, not gathers); what is left of
    the steps is all Python and kernel launches, kept to the MLP, the loss and one Adam step.
    """
    device = field.center.device
    with torch.no_grad():
        inputs = field.encode(torch.as_tensor(queries, dtype=torch.float32, device=device))
    # L1 on distances normalised by the field's scale, so the loss is size independent.
    goal = torch.as_tensor(targets, dtype=torch.float32, device=device) / field.scale
    batch = min(config.batch_size, len(inputs))
    per_epoch = len(inputs) // batch
    optimizer = _adam(list(field.mlp.parameters()), config.learning_rate)
    gen = torch.Generator(device='cpu').manual_seed(config.seed)
    scale_mm = float(field.scale)

    bar = None
    if progress is True:
        from tqdm import tqdm
        bar = tqdm(total=config.iterations, desc='training UDF', unit='it', leave=False)
    report_every = max(config.iterations // 100, 1)
    for step, lr in enumerate(learning_rates(config)):
        k = step % per_epoch
        if k == 0:
            order = torch.randperm(len(inputs), generator=gen).to(device)
            epoch_inputs, epoch_goal = inputs[order], goal[order]
        rows = slice(k * batch, (k + 1) * batch)
        loss = (field.normalised_distance(epoch_inputs[rows]) - epoch_goal[rows]).abs().mean()
        for group in optimizer.param_groups:
            group['lr'] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % report_every == 0 or step + 1 == config.iterations:
            value = float(loss.detach())
            if bar is not None:
                bar.update(report_every if (step + 1) % report_every == 0 else
                           (step + 1) % report_every)
                bar.set_postfix(loss_mm=f'{value * scale_mm:.3f}')
            elif callable(progress):
                progress(step + 1, config.iterations, value * scale_mm)
            elif (step + 1) % (report_every * LOG_EVERY_PERCENT) == 0:
                LOG.info('training UDF: %d/%d steps, L1 %.3f mm', step + 1,
                         config.iterations, value * scale_mm)
    if bar is not None:
        bar.close()


def check_grid_size(lo: np.ndarray, hi: np.ndarray, voxel_mm: float, margin_mm: float) -> None:
    """Raise InputError when the distance grid over ``[lo, hi]`` would exceed MAX_GRID_VOXELS.

    Checked before any training: such a grid would otherwise fail (or be killed for its
    memory) only after the fit, with a message that says nothing about the cause.
    """
    counts = np.ceil((np.asarray(hi) - np.asarray(lo)) / voxel_mm) + 1
    voxels = float(np.prod(counts))
    if not voxels <= MAX_GRID_VOXELS:
        extent = ' x '.join(f'{v:.0f}' for v in np.asarray(hi) - np.asarray(lo) - 2 * margin_mm)
        raise InputError(
            f'the bone geometry spans {extent} mm: its {voxel_mm:g} mm distance grid would have '
            f'{voxels:.3g} voxels, more than {MAX_GRID_VOXELS:.3g}; expected one bone in mm '
            '(a whole femur is about 450 mm long). Is the mesh in another unit, or does it '
            'hold a stray part far from the bone?')


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
    check_grid_size(lo, hi, train_config.grid_voxel_mm, train_config.margin_mm)
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
    fit_start = time.perf_counter()
    _fit(field, queries, targets, train_config, progress)
    field.eval()
    LOG.info('UDF fit: %d steps of %d points in %.1f s', train_config.iterations,
             min(train_config.batch_size, len(queries)), time.perf_counter() - fit_start)

    grid_start = time.perf_counter()
    grid = exact_grid(supervise, _grid_surface(mesh, cloud, train_config.grid_voxel_mm, rng),
                      lo, hi, train_config.grid_voxel_mm)
    LOG.info('UDF grid %s: %.1f s', 'x'.join(map(str, grid.values.shape)),
             time.perf_counter() - grid_start)
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


def _voxel_centres(flat: np.ndarray, counts: np.ndarray, lo: np.ndarray,
                   voxel_mm: float) -> np.ndarray:
    """Return the centres (N, 3) in mm of the voxels with flat (C-order) indices ``flat``."""
    return np.stack(np.unravel_index(flat, counts), axis=-1) * voxel_mm + lo


def exact_grid(supervise: _Supervision, surface: np.ndarray, lo: np.ndarray, hi: np.ndarray,
               voxel_mm: float, band_mm: float = EXACT_BAND_MM) -> DistanceGrid:
    """Sample the supervision distance on a regular grid covering [lo, hi], ``voxel_mm`` apart.

    ``surface`` (N, 3) are samples of the surface, denser than the voxels; the voxels holding
    one are the surface voxels. A Euclidean distance transform of them finds the voxels within
    ``band_mm`` of the surface (to about a voxel), and these get the exact distance and
    closest surface point. Every other voxel gets its distance to the closest surface point of
    its nearest band voxel (a second distance transform): a distance to a surface point, so
    never below the exact one, and on the ultrabones meshes within 0.03-0.08 mm of it on
    average (at most 1-2 mm, tens of mm out in concavities), at a fraction of the cost of
    exact queries over the whole box.
    """
    from scipy import ndimage

    lo = np.asarray(lo, dtype=np.float64)
    counts = np.ceil((np.asarray(hi) - lo) / voxel_mm).astype(np.int64) + 1
    shape = tuple(int(n) for n in counts)
    cells = np.clip(np.rint((surface - lo) / voxel_mm).astype(np.int64), 0, counts - 1)
    outside = np.ones(shape, dtype=bool)
    outside[cells[:, 0], cells[:, 1], cells[:, 2]] = False
    in_band = ndimage.distance_transform_edt(outside, sampling=voxel_mm) <= band_mm
    del outside
    band = np.flatnonzero(in_band)
    values = np.empty(int(counts.prod()), dtype=np.float32)
    band_distance, band_closest = supervise.query(_voxel_centres(band, counts, lo, voxel_mm))
    values[band] = band_distance
    nearest = ndimage.distance_transform_edt(~in_band, return_distances=False,
                                             return_indices=True).reshape(3, -1)
    far = np.flatnonzero(~in_band.reshape(-1))
    del in_band
    for i in range(0, len(far), GRID_CHUNK):
        chunk = far[i:i + GRID_CHUNK]
        source = np.ravel_multi_index(tuple(nearest[:, chunk]), shape)
        closest = band_closest[np.searchsorted(band, source)]
        centres = _voxel_centres(chunk, counts, lo, voxel_mm)
        values[chunk] = np.linalg.norm(centres - closest, axis=1)
    return DistanceGrid(origin=lo, voxel_mm=float(voxel_mm), values=values.reshape(shape))


def measure_accuracy(field: NeuralUDF, grid: DistanceGrid, surface: np.ndarray,
                     supervise: Callable[[np.ndarray], np.ndarray],
                     rng: np.random.Generator) -> dict[str, float]:
    """Return the mean absolute error (mm) of field and grid within 10 mm of the surface."""
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
    write_atomically(path, lambda tmp: torch.save(payload, tmp))  # two savers may race
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
    if not isinstance(payload['mesh_sha256'], str) or type(payload['format_version']) is not int:
        raise CheckpointError(f'checkpoint {path} has a mesh_sha256 that is not a string or a '
                              'format_version that is not an integer; delete it to retrain')
    if payload['format_version'] not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f'checkpoint {path} has format version {payload["format_version"]}; '
                              f'this build reads versions {READABLE_FORMAT_VERSIONS}. Retrain it.')
    if expected_sha256 is not None and payload['mesh_sha256'] != expected_sha256:
        trained_on = payload['mesh_sha256'][:12]
        raise CheckpointError(f'checkpoint {path} was trained on geometry {trained_on}..., '
                              f'not on this mesh ({expected_sha256[:12]}...): stale or foreign')
    try:
        # Type-checked and range-checked as a config file is.
        udf_config = section_from_dict(UdfConfig, payload['udf_config'])
        train_config = section_from_dict(TrainConfig, payload['train_config'])
        state = payload['state_dict']
        scale = float(state['scale'])
        field = NeuralUDF(udf_config, state['center'], scale)
        field.load_state_dict(state)
        grid = DistanceGrid(origin=payload['grid_origin'].numpy().astype(np.float64),
                            voxel_mm=float(payload['grid_voxel_mm']),
                            values=payload['grid_values'].numpy().astype(np.float32))
        surface_points = payload['surface_points'].numpy().astype(np.float32)
        surface_normals = payload['surface_normals'].numpy().astype(np.float32)
        train_time_s = float(payload.get('train_time_s', 0.0))
        weights_finite = all(bool(torch.isfinite(value).all()) for value in state.values()
                             if torch.is_tensor(value) and value.is_floating_point())
    except Exception as exc:
        raise CheckpointError(
            f'checkpoint {path} has inconsistent contents ({exc}); delete it to retrain') from exc
    problems = [what for what, bad in (
        ('a grid that is not 3-D', grid.values.ndim != 3),
        ('non-finite grid distances', not np.isfinite(grid.values).all()),
        ('a grid origin that is not 3 finite mm', grid.origin.shape != (3,)
         or not np.isfinite(grid.origin).all()),
        ('a voxel size that is not positive', not 0.0 < grid.voxel_mm < np.inf),
        ('a field scale that is not positive', not 0.0 < scale < np.inf),
        ('non-finite field weights', not weights_finite),
        ('no surface samples', len(surface_points) == 0),
        ('surface samples and normals that do not match', surface_points.shape
         != surface_normals.shape or surface_points.shape[-1:] != (3,)),
        ('non-finite surface samples', not np.isfinite(surface_points).all()
         or not np.isfinite(surface_normals).all()),
    ) if bad]
    if problems:
        raise CheckpointError(f'checkpoint {path} has {", ".join(problems)}; delete it to '
                              'retrain')
    accuracy = payload.get('accuracy') or {}
    if not isinstance(accuracy, dict):
        raise CheckpointError(f'checkpoint {path} has an accuracy record that is not a mapping')
    field.eval()
    return UdfModel(field=field, grid=grid, surface_points=surface_points,
                    surface_normals=surface_normals, geometry_sha256=payload['mesh_sha256'],
                    udf_config=udf_config, train_config=train_config,
                    accuracy=dict(accuracy),
                    train_time_s=train_time_s, checkpoint_path=path)


def train_or_load(mesh_path: str | Path, cache_dir: str | Path,
                  udf_config: UdfConfig | None = None,
                  train_config: TrainConfig | None = None, device: torch.device | str = 'cpu',
                  progress: ProgressCallback | bool | None = None) -> UdfModel:
    """Load the cached UDF of this mesh and config, or train and cache it.

    A mesh (.stl/.ply/.obj) is supervised with exact distances; a point cloud file
    (.xyz/.txt/.npy/.pcd, or a .ply without faces) trains self-supervised.
    """
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
