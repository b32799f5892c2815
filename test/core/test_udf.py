"""UDF training, accuracy, checkpoint save/load, the cache, and bad checkpoints."""

import numpy as np
import pytest
import torch

from neural_bone_reg.core import udf
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


def test_stale_checkpoint_for_another_mesh(phantom_registrar):
    with pytest.raises(CheckpointError, match='stale or foreign'):
        udf.load_checkpoint(phantom_registrar.checkpoint_path, expected_sha256='0' * 64)


def test_missing_mesh(tmp_path):
    with pytest.raises(InputError, match='does not exist'):
        udf.train_or_load(tmp_path / 'missing.stl', tmp_path)
