"""The neural-bone-reg CLI: register and bench end to end on the phantom, and errors."""

import json
from typing import Any

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


def strict_json(text: str) -> Any:
    """Parse JSON as strict parsers do: NaN and Infinity are not JSON."""
    def refuse(constant: str) -> None:
        raise AssertionError(f'{constant} in the JSON output: strict parsers reject it')
    return json.loads(text, parse_constant=refuse)


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
    saved = strict_json((tmp_path / 'cloud.registration.json').read_text())
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
    record = strict_json(out_json.read_text())
    summary = record['summary']
    assert set(summary) >= {'recall', 'rre_mean_deg', 'rte_mean_mm', 'time_median_s'}
    assert summary['recall'] == 1.0 and len(record['trials']) == 2
    assert out_png.stat().st_size > 10_000
    assert 'overall' in capsys.readouterr().out


def test_bench_patch_json_has_floors_misses_and_coverage(tmp_path, phantom_path, phantom_mesh,
                                                         cache_dir, small_config_yaml, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    (data / 'phantom.stl').write_bytes(phantom_path.read_bytes())
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(4))
    np.savetxt(data / 'phantom.xyz', cloud)
    out_json = tmp_path / 'patch.json'
    code = main(['bench', '--data', str(data), '--trials', '1', '--seed', '1',
                 '--patch-mm', '50', '--noise-mm', '0.5', '--json', str(out_json),
                 '--cache-dir', str(cache_dir), '--config', str(small_config_yaml),
                 '--preset', 'fast', '--device', 'cpu'])
    assert code == 0
    out = capsys.readouterr().out
    assert 'misses' in out and 'phantom floor' in out
    assert 'reachable (own floor correct): ' in out and 'refused, by the tests failed' in out
    record = strict_json(out_json.read_text())
    assert record['protocol']['patch_mm'] == 50.0 and record['protocol']['noise_mm'] == 0.5
    floor = record['floors']['phantom']
    assert floor['rre_deg'] < 2.0 and floor['rte_mm'] < 2.0
    for summary in (record['summary'], record['per_case']['phantom']):
        assert set(summary) >= {'accepted_correct', 'correct_rejected', 'wrong_accepted',
                                'search_misses', 'coverage_trial_floor',
                                'coverage_case_floor', 'bound_median_mm', 'reachable',
                                'correct_refused_by', 'wrong_refused_by'}
        assert summary['trials'] == 1
    for row in record['trials']:
        assert 100 <= row['n_points'] < len(cloud)
        assert {'floor_rre_deg', 'floor_rte_mm', 'search_miss', 'same_optimum',
                'mahalanobis2_trial_floor', 'inside95_case_floor'} <= set(row)
        # A small patch can slide on the surface: its floor is what the data allows, not zero.
        assert np.isfinite(row['floor_rre_deg']) and np.isfinite(row['floor_rte_mm'])


def test_cli_errors_exit_2(tmp_path, capsys):
    code = main(['register', '--mesh', str(tmp_path / 'missing.stl'), '--cloud', 'x.xyz'])
    assert code == 2
    assert 'does not exist' in capsys.readouterr().err
    # The cloud and the output folder are checked before any UDF training (no mesh needed).
    np.savetxt(tmp_path / 'cloud.xyz', np.random.default_rng(0).normal(size=(100, 3)))
    for argv, needle in (
            (['--cloud', str(tmp_path / 'none.xyz')], 'none.xyz'),
            (['--cloud', str(tmp_path / 'cloud.xyz'), '--out', str(tmp_path / 'no' / 'r.json')],
             'does not exist')):
        code = main(['register', '--mesh', str(tmp_path / 'missing.stl'), *argv])
        assert code == 2 and needle in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(['register', '--mesh', 'm.stl', '--cloud', 'c.xyz', '--device', 'tpu'])
    assert exit_info.value.code == 2 and 'invalid choice' in capsys.readouterr().err


@pytest.mark.parametrize('flag, value', [('--noise-mm', 'nan'), ('--patch-mm', 'inf'),
                                         ('--noise-mm', '-1')])
def test_bench_refuses_a_noise_or_patch_size_not_finite_and_positive(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(['bench', '--data', 'd', flag, value])
    assert exit_info.value.code == 2 and 'must be finite and non-negative' in (
        capsys.readouterr().err)
