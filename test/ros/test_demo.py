"""End-to-end tests of ``neural-bone-reg demo`` (child processes over real DDS).

The demo runs with the package's params files plus small test overrides and the session's
cached phantom model, so each run takes tens of seconds instead of training for minutes.
"""

from __future__ import annotations

from pathlib import Path
import subprocess
import time

import numpy as np
import pytest

from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform, make_transform
from neural_bone_reg.ros.bag import write_sweep_bag
from ros_test_support import (find_executable, flat_parameters, shared_cache_dir,
                              small_configs, trained_phantom, write_params_file)

#: Wall-clock limit of one demo run in the tests (model cached, small registration config).
DEMO_TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(find_executable('neural-bone-reg') is None,
                                reason='neural-bone-reg is not installed: run `make setup`')


@pytest.fixture(scope='module')
def demo_args(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Return the demo options that use the session cache and small configs."""
    cache = shared_cache_dir(tmp_path_factory.getbasetemp())
    trained_phantom(cache)
    work = tmp_path_factory.mktemp('demo')
    configs = small_configs()
    preop = write_params_file(work / 'preop.yaml', flat_parameters(configs, ('udf', 'train')))
    registration = write_params_file(work / 'registration.yaml', {
        'preset': 'fast', **flat_parameters(configs, ('registration',))})
    return ['--cache-dir', str(cache), '--preop-params', str(preop),
            '--registration-params', str(registration), '--timeout', str(DEMO_TIMEOUT_S - 30)]


def run_demo(*args: str) -> subprocess.CompletedProcess:
    """Run the demo CLI and return the finished process."""
    return subprocess.run([find_executable('neural-bone-reg'), 'demo', *args],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)


def test_demo_registers_the_simulated_sweep_and_reports_latency(demo_args: list[str]) -> None:
    result = run_demo(*demo_args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert 'PASSED' in output
    assert 'to the transform on tf: ' in output  # the latency is always reported
    assert 'error against the truth' in output


def test_demo_registers_and_tracks_a_simulated_rgbd_stream(demo_args: list[str]) -> None:
    # A small camera (320 x 240) for 2 s at 15 Hz keeps the bag and the run small.
    result = run_demo('--sensor', 'rgbd', '--seed', '1', '--make-bag-args',
                      '--resolution 320x240 --frames 30', *demo_args)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert ('organized clouds on /camera/depth/color/points in frame '
            "'camera_color_optical_frame'") in output
    assert "registration node mode 'track'" in output
    # The node broadcast camera -> bone; the demo composed it with the mount on /tf_static.
    assert 'transform camera_color_optical_frame -> bone on tf' in output
    assert 'composed with the mount robot_base -> camera_color_optical_frame' in output
    assert 'to the transform on tf: ' in output and 'PASSED' in output


def test_demo_fails_when_the_pose_disagrees_with_the_truth(
        demo_args: list[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    pose = sim.random_pose(rng)
    sweep = sim.simulate_sweep(sim.make_phantom_mesh(), rng)
    wrong_truth = pose @ make_transform(np.eye(3), np.array([0.0, 0.0, 5.0]))  # 5 mm off
    start = time.time_ns()
    bag = write_sweep_bag(tmp_path / 'bag', [apply_transform(pose, c) for c in sweep],
                          [start + i * 50_000_000 for i in range(len(sweep))], wrong_truth)
    result = run_demo('--bag', str(bag), *demo_args)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert 'outside the tolerance' in output


def test_demo_fails_clearly_for_a_missing_mesh(demo_args: list[str], tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    pose = sim.random_pose(rng)
    sweep = sim.simulate_sweep(sim.make_phantom_mesh(), rng, n_frames=3)
    bag = write_sweep_bag(tmp_path / 'bag', [apply_transform(pose, c) for c in sweep],
                          [time.time_ns() + i for i in range(len(sweep))], pose)
    missing = tmp_path / 'missing_femur.stl'
    result = run_demo('--bag', str(bag), '--mesh', str(missing), *demo_args)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert 'did not provide a model' in output and str(missing) in output
