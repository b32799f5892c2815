"""Fixtures shared by all tests: small seeded configs and one trained phantom UDF per session."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ../shared beside the repository, as in CI; tests that read it skip where it is missing.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / 'shared' / 'data'
NO_SHARED_REASON = f'shared data not found at {SHARED_DATA} (expected ../shared beside the repo)'

#: A UDF that trains in seconds on the CPU and still registers the phantom.
SMALL_TRAIN = dict(iterations=400, num_samples=40_000, grid_voxel_mm=2.0,
                   num_surface_points=10_000)
SMALL_UDF = dict(hidden_dim=64)


@pytest.fixture(scope='session')
def shared_data() -> Path:
    """Return ../shared/data, or skip with the reason."""
    if not SHARED_DATA.is_dir():
        pytest.skip(NO_SHARED_REASON)
    return SHARED_DATA


@pytest.fixture(scope='session')
def small_configs():
    """Return Configs with a small UDF and training run and the 'fast' registration preset."""
    from neural_bone_reg.core.config import configs_from_dict

    return configs_from_dict({'udf': SMALL_UDF, 'train': SMALL_TRAIN}, preset='fast')


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory) -> Path:
    """Return a session-private UDF cache folder."""
    return tmp_path_factory.mktemp('udf_cache')


@pytest.fixture(scope='session')
def phantom_path(cache_dir) -> Path:
    """Return the phantom bone STL, written into the session cache."""
    from neural_bone_reg.core import sim

    return sim.phantom_mesh_path(cache_dir)


@pytest.fixture(scope='session')
def phantom_mesh(phantom_path):
    """Return the phantom as a trimesh."""
    from neural_bone_reg.core.io import load_mesh

    return load_mesh(phantom_path)


@pytest.fixture(scope='session')
def phantom_registrar(phantom_path, cache_dir, small_configs):
    """Return a registrar of the phantom with the small configs (trained once per session)."""
    from neural_bone_reg import BoneRegistrar

    return BoneRegistrar.from_mesh(phantom_path, device='cpu', cache_dir=cache_dir,
                                   configs=small_configs)
