"""Reading meshes and clouds, and clear errors for every kind of bad input."""

import numpy as np
import pytest
import trimesh

from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.io import check_points, load_cloud, load_mesh


@pytest.fixture
def patch():
    rng = np.random.default_rng(0)
    return rng.uniform(-30, 30, size=(500, 3))


@pytest.mark.parametrize('suffix', ['.xyz', '.txt', '.npy', '.ply', '.pcd'])
def test_cloud_formats_roundtrip(tmp_path, patch, suffix):
    path = tmp_path / f'cloud{suffix}'
    if suffix == '.npy':
        np.save(path, patch)
    elif suffix in ('.ply',):
        trimesh.PointCloud(patch).export(path)
    elif suffix == '.pcd':
        header = ('# .PCD v0.7\nVERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n'
                  f'WIDTH {len(patch)}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\n'
                  f'POINTS {len(patch)}\nDATA ascii\n')
        path.write_text(header + '\n'.join(' '.join(f'{v:.6f}' for v in p) for p in patch))
    else:
        np.savetxt(path, patch)
    loaded = load_cloud(path)
    assert loaded.shape == patch.shape
    np.testing.assert_allclose(loaded, patch, atol=1e-4)


@pytest.mark.parametrize('points, message', [
    (np.empty((0, 3)), 'empty'),
    (np.full((50, 3), np.nan), 'empty'),
    (np.zeros((50, 2)), 'expected \\(N, 3\\)'),
    (np.array([['a', 'b', 'c']]), 'dtype'),
    (np.ones((50, 3), dtype=complex), 'expected real numbers'),  # else imaginary parts dropped
    ([[1.0, 2.0, 3.0], [4.0, 5.0]], 'not an array of points'),  # ragged rows
    (np.random.default_rng(0).uniform(0, 0.1, size=(500, 3)), 'metres'),
    (np.random.default_rng(0).uniform(0, 1e7, size=(500, 3)), 'expected mm'),
])
def test_bad_clouds_name_the_problem(points, message):
    with pytest.raises(InputError, match=message):
        check_points(points)


def test_nan_rows_are_dropped_and_too_few_rejected(patch):
    with_nan = patch.copy()
    with_nan[::2] = np.nan
    assert len(check_points(with_nan)) == len(patch) // 2
    with pytest.raises(InputError, match='at least 400'):
        check_points(with_nan, min_points=400)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match='does not exist'):
        load_mesh(tmp_path / 'nope.stl')
    with pytest.raises(InputError, match='does not exist'):
        load_cloud(tmp_path / 'nope.xyz')
    junk = tmp_path / 'junk.stl'
    junk.write_bytes(b'\x00\x01garbage' * 3)
    with pytest.raises(InputError, match='junk.stl'):
        load_mesh(junk)
    text = tmp_path / 'words.xyz'
    text.write_text('hello world again\n')
    with pytest.raises(InputError, match='cannot read cloud'):
        load_cloud(text)
    with pytest.raises(InputError, match='suffix'):
        load_mesh(tmp_path / 'mesh.vtk') if (tmp_path / 'mesh.vtk').write_text('x') else None


def test_mesh_in_metres_is_rejected(tmp_path):
    small = trimesh.creation.icosphere(radius=0.02)
    path = tmp_path / 'bone_in_metres.stl'
    small.export(path)
    with pytest.raises(InputError, match='millimetres'):
        load_mesh(path)


def test_json_output_is_strict_json():
    import json

    from neural_bone_reg.core.io import dumps_json, json_safe

    value = {'z': float('nan'), 'bound': np.inf, 'n': np.int64(3), 'ok': np.bool_(True),
             'row': np.array([1.5, -np.inf]), 'nested': [{'m2': np.float32('nan')}], 7: 'x'}
    assert json_safe(value) == {'z': None, 'bound': None, 'n': 3, 'ok': True,
                                'row': [1.5, None], 'nested': [{'m2': None}], '7': 'x'}
    text = dumps_json(value)
    assert 'NaN' not in text and 'Infinity' not in text
    assert json.loads(text)['row'] == [1.5, None]
