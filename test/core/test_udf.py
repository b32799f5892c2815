"""UDF training, accuracy, the exact grid, checkpoint save/load, the cache, bad checkpoints."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from neural_bone_reg.core import fields, udf
from neural_bone_reg.core.errors import CheckpointError, InputError


def test_trained_field_is_accurate_near_the_surface(phantom_registrar):
    acc = phantom_registrar.model.accuracy
    # A small, seconds-long training run; the default one reaches about 0.1-0.2 mm.
    assert acc['neural_mae_mm'] < 1.0, acc
    assert acc['grid_mae_mm'] < 1.2, acc
    surface = torch.as_tensor(phantom_registrar.surface_points[:500])
    assert float(phantom_registrar.field('neural')(surface).mean()) < 1.0


def test_self_supervised_from_surface_cloud(tmp_path, phantom_mesh):
    from neural_bone_reg.core.config import TrainConfig, UdfConfig

    cloud = phantom_mesh.sample(20_000, seed=1) if hasattr(phantom_mesh, 'sample') else None
    path = tmp_path / 'surface.npy'
    np.save(path, np.asarray(cloud))
    model = udf.train_or_load(path, tmp_path / 'cache', UdfConfig(hidden_dim=32),
                              TrainConfig(iterations=150, num_samples=10_000, grid_voxel_mm=3.0,
                                          num_surface_points=2_000))
    assert model.accuracy['neural_mae_mm'] < 3.0
    assert model.surface_normals.shape == (2_000, 3)


def test_checkpoint_roundtrip_and_cache_hit(phantom_registrar, phantom_path, cache_dir,
                                            small_configs, monkeypatch):
    path = phantom_registrar.checkpoint_path
    assert path is not None and path.is_file() and path.parent == cache_dir
    assert path.with_suffix('.yaml').is_file()  # the config used is saved beside it
    loaded = udf.load_checkpoint(path, expected_sha256=phantom_registrar.geometry_sha256)
    pts = torch.as_tensor(phantom_registrar.surface_points[:100]) + 3.0
    torch.testing.assert_close(loaded.field(pts), phantom_registrar.model.field(pts))
    np.testing.assert_array_equal(loaded.grid.values, phantom_registrar.model.grid.values)

    def no_training(*args, **kwargs):
        raise AssertionError('the cache should have been used')

    monkeypatch.setattr(udf, 'train_udf', no_training)
    again = udf.train_or_load(phantom_path, cache_dir, small_configs.udf, small_configs.train)
    assert again.checkpoint_path == path


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'this is not a zip file at all')
    with pytest.raises(CheckpointError, match='corrupt'):
        udf.load_checkpoint(bad)


def test_truncated_checkpoint(tmp_path, phantom_registrar):
    data = phantom_registrar.checkpoint_path.read_bytes()
    cut = tmp_path / 'cut.pt'
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match='corrupt'):
        udf.load_checkpoint(cut)


def test_foreign_checkpoints(tmp_path, phantom_registrar):
    foreign = tmp_path / 'foreign.pt'
    torch.save({'state_dict': {'w': torch.zeros(3)}}, foreign)
    with pytest.raises(CheckpointError, match='not a neural_bone_reg UDF'):
        udf.load_checkpoint(foreign)
    # Arbitrary pickled objects are refused by weights_only loading, never executed.
    pickled = tmp_path / 'pickled.pt'
    torch.save({'kind': udf.CHECKPOINT_KIND, 'payload': InputError('x')}, pickled)
    with pytest.raises(CheckpointError):
        udf.load_checkpoint(pickled)
    payload = torch.load(phantom_registrar.checkpoint_path, weights_only=True)
    payload['format_version'] = udf.FORMAT_VERSION + 1
    future = tmp_path / 'future.pt'
    torch.save(payload, future)
    with pytest.raises(CheckpointError, match='format version'):
        udf.load_checkpoint(future)


def _one_weight_nan(state):
    state = dict(state)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[name] = state[name].clone()
    state[name].view(-1)[7] = float('nan')
    return state


def _edited(payload, edit):
    payload = dict(payload)
    edit(payload)
    return payload


@pytest.mark.parametrize('edit, needle', [
    (lambda p: p.update(grid_voxel_mm=-1.0), 'a voxel size that is not positive'),
    (lambda p: p.update(grid_voxel_mm=0.0), 'a voxel size that is not positive'),
    (lambda p: p.update(grid_values=torch.full_like(p['grid_values'], float('nan'))),
     'non-finite grid distances'),
    (lambda p: p.update(grid_origin=torch.zeros(2, dtype=torch.float64)), 'grid origin'),
    (lambda p: p.update(state_dict={**p['state_dict'], 'scale': torch.tensor(0.0)}),
     'a field scale that is not positive'),
    (lambda p: p.update(surface_points=p['surface_points'][:0],
                        surface_normals=p['surface_normals'][:0]), 'no surface samples'),
    (lambda p: p.update(format_version=True), 'not an integer'),
    (lambda p: p.update(mesh_sha256=12345), 'not a string'),
    (lambda p: p.update(accuracy=[1, 2]), 'accuracy record'),
    (lambda p: p.update(train_config={**p['train_config'], 'iterations': True}),
     'inconsistent contents'),
    (lambda p: p.update(state_dict=_one_weight_nan(p['state_dict'])), 'non-finite field weights'),
    (lambda p: p.update(train_time_s='n/a'), 'inconsistent contents'),
])
def test_a_checkpoint_with_unusable_contents_is_refused(tmp_path, phantom_registrar, edit,
                                                        needle):
    payload = torch.load(phantom_registrar.checkpoint_path, weights_only=True)
    bad = tmp_path / 'bad.pt'
    torch.save(_edited(payload, edit), bad)
    with pytest.raises(CheckpointError, match=needle):
        udf.load_checkpoint(bad)


def test_stale_checkpoint_for_another_mesh(phantom_registrar):
    with pytest.raises(CheckpointError, match='stale or foreign'):
        udf.load_checkpoint(phantom_registrar.checkpoint_path, expected_sha256='0' * 64)


def test_missing_mesh(tmp_path):
    with pytest.raises(InputError, match='does not exist'):
        udf.train_or_load(tmp_path / 'missing.stl', tmp_path)


def test_a_mesh_in_micrometres_is_refused_before_any_training(phantom_mesh, monkeypatch):
    """Its grid would need hundreds of GiB, found only after the fit (or an OOM kill)."""
    mesh = phantom_mesh.copy()
    mesh.apply_scale(1000.0)
    fitted = []
    monkeypatch.setattr(udf, '_fit', lambda *args: fitted.append(args))
    with pytest.raises(InputError, match=r'spans 99000 x .* mm: .* Is the mesh in another unit'):
        udf.train_udf(mesh, sha256='0' * 64)
    assert fitted == []
    udf.check_grid_size(np.zeros(3), np.array([340.0, 230.0, 290.0]), 1.5, 40.0)  # a pelvis box


def test_fields_module_does_not_import_udf():
    # The distance backends depend on nothing else in the package: no fields <-> udf circle.
    code = ('import sys, neural_bone_reg.core.fields; '
            "sys.exit(int('neural_bone_reg.core.udf' in sys.modules))")
    assert subprocess.run([sys.executable, '-c', code], check=False).returncode == 0
    assert udf.DistanceGrid is fields.DistanceGrid


def _voxel_centres(grid):
    counts = grid.values.shape
    axes = [grid.origin[i] + grid.voxel_mm * np.arange(n) for i, n in enumerate(counts)]
    return np.stack(np.meshgrid(*axes, indexing='ij'), axis=-1).reshape(-1, 3)


def test_exact_grid_holds_exact_distances_near_the_surface():
    import trimesh

    sphere = trimesh.creation.icosphere(subdivisions=3, radius=20.0)
    supervise = udf._Supervision(sphere, None)
    rng = np.random.default_rng(0)
    lo, hi = sphere.bounds[0] - 15.0, sphere.bounds[1] + 15.0
    surface = udf._grid_surface(sphere, None, 2.0, rng)
    grid = udf.exact_grid(supervise, surface, lo, hi, 2.0, band_mm=6.0)
    assert grid.values.shape == tuple(np.ceil((hi - lo) / 2.0).astype(int) + 1)
    exact = supervise(_voxel_centres(grid))
    values = grid.values.reshape(-1)
    near = exact <= 3.0  # inside the band, whatever the distance transform's voxel error
    assert near.sum() > 1000
    np.testing.assert_allclose(values[near], exact[near], atol=1e-4)
    # Farther out: the distance to a surface point, so never below the exact distance, and
    # close to it.
    assert np.all(values >= exact - 1e-4)
    assert float(np.abs(values - exact).mean()) < 0.15  # 0.08 when written
    # Trilinear lookups between the voxels stay close to the exact distance.
    query = sphere.sample(2000, seed=1) + rng.normal(scale=2.0, size=(2000, 3))
    looked_up = fields.GridField(grid)(torch.as_tensor(query, dtype=torch.float32)).numpy()
    assert float(np.abs(looked_up - supervise(query)).mean()) < 0.3


def test_grid_of_a_surface_cloud_holds_the_cloud_distance():
    import trimesh

    cloud = np.asarray(trimesh.creation.icosphere(subdivisions=4, radius=20.0).vertices)
    supervise = udf._Supervision(None, cloud)
    grid = udf.exact_grid(supervise, cloud, cloud.min(axis=0) - 10, cloud.max(axis=0) + 10, 3.0,
                          band_mm=6.0)
    nearest = supervise(_voxel_centres(grid))
    values = grid.values.reshape(-1)
    near = nearest <= 2.0
    assert near.sum() > 100
    np.testing.assert_allclose(values[near], nearest[near], atol=1e-4)
    assert np.all(values >= nearest - 1e-4)


def test_learning_rate_warms_up_then_decays():
    from neural_bone_reg.core.config import TrainConfig

    config = TrainConfig(iterations=1000, learning_rate=1e-2)
    rates = udf.learning_rates(config)
    warmup = int(udf.WARMUP_FRACTION * 1000)
    assert len(rates) == 1000
    assert rates[0] == pytest.approx(1e-2 / warmup)
    assert rates[warmup - 1] == pytest.approx(1e-2)
    assert max(rates) == pytest.approx(1e-2)
    assert rates[-1] == pytest.approx(1e-2 * udf.FINAL_LR_FRACTION)
    assert all(a >= b for a, b in zip(rates[warmup:], rates[warmup + 1:]))
    assert udf.learning_rates(TrainConfig(iterations=1)) == [TrainConfig().learning_rate]


def test_cache_key_follows_the_training_config_and_format():
    from neural_bone_reg.core.config import TrainConfig, UdfConfig

    base = udf.config_key(UdfConfig(), TrainConfig())
    assert udf.config_key(UdfConfig(), TrainConfig(iterations=2999)) != base
    assert udf.config_key(UdfConfig(), TrainConfig(near_surface_sigma_mm=(0.5, 2.0))) != base
    assert udf.config_key(UdfConfig(hidden_dim=64), TrainConfig()) != base
    assert udf.config_key(UdfConfig(), TrainConfig()) == base


def test_version_1_checkpoint_still_loads(tmp_path, phantom_registrar):
    payload = torch.load(phantom_registrar.checkpoint_path, weights_only=True)
    payload['format_version'] = 1  # the grid then came from the MLP; the contents are the same
    old = tmp_path / 'v1.pt'
    torch.save(payload, old)
    loaded = udf.load_checkpoint(old, expected_sha256=phantom_registrar.geometry_sha256)
    np.testing.assert_array_equal(loaded.grid.values, phantom_registrar.model.grid.values)
