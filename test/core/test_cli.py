"""The neural-bone-reg CLI: register and bench end to end on the phantom, and errors."""

import json

import numpy as np
import pytest

from neural_bone_reg.cli.main import main
from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform


@pytest.fixture
def small_config_yaml(tmp_path, small_configs):
    import yaml

    from neural_bone_reg.core.config import as_dict

    path = tmp_path / 'small.yaml'
    path.write_text(yaml.safe_dump({'udf': as_dict(small_configs.udf),
                                    'train': as_dict(small_configs.train)}))
    return path


def test_register_prints_and_saves(tmp_path, phantom_path, phantom_mesh, cache_dir,
                                   small_config_yaml, capsys):
    rng = np.random.default_rng(3)
    cloud = apply_transform(sim.random_pose(rng), sim.simulate_partial_cloud(phantom_mesh, rng))
    cloud_path = tmp_path / 'cloud.xyz'
    np.savetxt(cloud_path, cloud)
    code = main(['register', '--mesh', str(phantom_path), '--cloud', str(cloud_path),
                 '--cache-dir', str(cache_dir), '--config', str(small_config_yaml),
                 '--preset', 'fast', '--device', 'cpu'])
    out = capsys.readouterr().out
    assert code == 0, out
    assert 'accepted: True' in out
    saved = json.loads((tmp_path / 'cloud.registration.json').read_text())
    assert np.asarray(saved['transform']).shape == (4, 4) and saved['accepted'] is True


def test_bench_writes_summary_and_plot(tmp_path, phantom_path, phantom_mesh, cache_dir,
                                       small_config_yaml, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'phantom.stl').write_bytes(phantom_path.read_bytes())
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(4))
    np.savetxt(data / 'phantom.xyz', cloud)
    out_json, out_png = tmp_path / 'bench.json', tmp_path / 'bench.png'
    code = main(['bench', '--data', str(data), '--trials', '2', '--seed', '3',
                 '--json', str(out_json), '--plot', str(out_png), '--cache-dir', str(cache_dir),
                 '--config', str(small_config_yaml), '--preset', 'fast', '--device', 'cpu',
                 '--noise-mm', '0.5'])
    assert code == 0
    record = json.loads(out_json.read_text())
    summary = record['summary']
    assert set(summary) >= {'recall', 'rre_mean_deg', 'rte_mean_mm', 'time_median_s'}
    assert summary['recall'] == 1.0 and len(record['trials']) == 2
    assert out_png.stat().st_size > 10_000
    assert 'overall' in capsys.readouterr().out


def test_bench_trials_are_seeded_and_follow_the_protocol(phantom_mesh):
    from neural_bone_reg.cli.commands import bench_trial
    from neural_bone_reg.core.se3 import rotation_angle_deg

    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(0), n_points=500)
    moved_a, truth_a = bench_trial(cloud, 5, 1, 0.0)
    moved_b, truth_b = bench_trial(cloud, 5, 1, 0.0)
    np.testing.assert_array_equal(moved_a, moved_b)
    np.testing.assert_allclose(apply_transform(truth_a, moved_a), cloud, atol=1e-9)
    shifts = [np.linalg.norm(bench_trial(cloud, 5, k, 0.0)[0].mean(0) - cloud.mean(0))
              for k in range(20)]
    assert max(shifts) <= 100.0 and min(shifts) >= 0.0
    angles = [rotation_angle_deg(bench_trial(cloud, 5, k, 0.0)[1][:3, :3]) for k in range(20)]
    assert max(angles) > 90.0  # rotations span SO(3), not a small perturbation


def test_cli_errors_exit_2(tmp_path, capsys):
    code = main(['register', '--mesh', str(tmp_path / 'missing.stl'), '--cloud', 'x.xyz'])
    assert code == 2
    assert 'does not exist' in capsys.readouterr().err
