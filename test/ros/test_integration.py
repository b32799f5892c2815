"""Cross-process tests: the installed node executables, the package's params files, real DDS.

The preop loader and registration nodes run as child processes started from their console
scripts (the venv's bin/ with ``pip install -e``, or colcon's lib/neural_bone_reg), with
config/*.yaml plus a small test override file. A simulated sweep bag is replayed into them
and the broadcast tf is compared with the bag's true pose. Then every kind of bad input, a
missing mesh and a corrupt checkpoint: each must give an explaining diagnostic, no tf, and a
node that stays up and registers the next good cloud.
"""

from __future__ import annotations

from pathlib import Path
import shutil
import subprocess
import time
from typing import Any, Iterator

from diagnostic_msgs.msg import DiagnosticStatus
from fuzz_support import organised_rgbd_cloud
import numpy as np
from process_support import NodeProcess, Probe, START_TIMEOUT_S
import pytest
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import String

from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform
from neural_bone_reg.ros.bag import play_bag, write_sweep_bag
from neural_bone_reg.ros.conversions import transform_stamped_to_matrix, xyz_to_cloud
from neural_bone_reg.ros.model_info import decode_model_info
from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS, LATCHED_QOS
from neural_bone_reg.ros.tf_compat import TfWaiter
from ros_test_support import (CONFIG_DIR, find_executable, flat_parameters, matched_publisher,
                              MESSAGE_TIMEOUT_S, rotation_error_deg, shared_cache_dir,
                              small_configs, SOLVE_TIMEOUT_S, trained_phantom,
                              write_params_file)

ROBOT_FRAME = 'robot_base'
CLOUD_TOPIC = '/us/points'
MAX_ROTATION_ERROR_DEG = 2.0
MAX_TRANSLATION_ERROR_MM = 2.0

pytestmark = pytest.mark.skipif(find_executable('registration_node') is None
                                or find_executable('preop_loader') is None,
                                reason='node executables not installed: run `make setup` '
                                       '(pip install -e .) or colcon build + source install')


@pytest.fixture(scope='module')
def setup(tmp_path_factory: pytest.TempPathFactory, ros_domain_id: int) -> Iterator[dict]:
    """Train the phantom (session cache), start a preop loader process and a probe."""
    cache = shared_cache_dir(tmp_path_factory.getbasetemp())
    registrar = trained_phantom(cache)
    work = tmp_path_factory.mktemp('integration')
    configs = small_configs()
    preop_params = write_params_file(work / 'preop_test.yaml', {
        'mesh_path': 'phantom', 'cache_dir': str(cache),
        **flat_parameters(configs, ('udf', 'train'))})
    reg_params = write_params_file(work / 'registration_test.yaml', {
        'preset': 'fast', 'sweep': {'min_points': 1500},
        **flat_parameters(configs, ('registration',))})
    probe = Probe()
    procs: list[NodeProcess] = []

    def start(executable: str, name: str, params: list[Path], *extra: str) -> NodeProcess:
        config = CONFIG_DIR / f'{executable}.yaml'
        args = ['--ros-args', '-r', f'__node:={name}', '--params-file', str(config)]
        for path in params:
            args += ['--params-file', str(path)]
        proc = NodeProcess(executable, args + list(extra), work / f'{name}.log')
        procs.append(proc)
        return proc

    loader = start('preop_loader', 'preop_loader', [preop_params])
    state = {'registrar': registrar, 'cache': cache, 'work': work, 'probe': probe,
             'start': start, 'reg_params': reg_params, 'loader': loader, 'procs': procs}
    try:
        yield state
    finally:
        for proc in procs:
            proc.stop()
        probe.close()


def test_preop_loader_process_announces_the_cached_model(setup: dict) -> None:
    probe, loader = setup['probe'], setup['loader']
    msg = probe.models.wait_for(lambda m: True, START_TIMEOUT_S)
    assert msg is not None, loader.log()
    info = decode_model_info(msg.data)
    assert Path(info.checkpoint) == setup['registrar'].checkpoint_path.resolve()
    assert info.sha256 == setup['registrar'].geometry_sha256
    assert info.bone_frame == 'bone' and info.units == 'mm'


def test_sweep_bag_is_registered_within_2_deg_and_2_mm(setup: dict) -> None:
    probe, work = setup['probe'], setup['work']
    node = setup['start']('registration_node', 'registration_sweep', [setup['reg_params']],
                          '-r', f'points:={CLOUD_TOPIC}')
    rng = np.random.default_rng(2024)
    t_robot_bone = sim.random_pose(rng)
    sweep = sim.simulate_sweep(sim.make_phantom_mesh(), rng, n_frames=20, points_per_frame=300)
    start_ns = time.time_ns()
    stamps = [start_ns + i * 50_000_000 for i in range(len(sweep))]
    bag = write_sweep_bag(work / 'sweep_bag', [apply_transform(t_robot_bone, c) for c in sweep],
                          stamps, t_robot_bone, robot_frame=ROBOT_FRAME, cloud_topic=CLOUD_TOPIC)
    model_loaded = probe.wait_diag('registration_sweep: model', START_TIMEOUT_S,
                                   level=DiagnosticStatus.OK)
    assert model_loaded is not None, node.log()
    waiter = TfWaiter(probe.node, ROBOT_FRAME, 'bone')
    sent = play_bag(bag, node=probe.node, delay_s=0.5)
    assert sent == len(sweep) + 1
    last = xyz_to_cloud(np.zeros((1, 3)), ROBOT_FRAME, stamps[-1]).header.stamp
    transform = probe.wait_tf(ROBOT_FRAME, 'bone', SOLVE_TIMEOUT_S, stamp=last)
    assert transform is not None, 'no tf for the complete sweep\n' + node.log()
    assert waiter.wait(MESSAGE_TIMEOUT_S) is not None
    estimate = transform_stamped_to_matrix(transform)
    rotation_error = rotation_error_deg(estimate[:3, :3], t_robot_bone[:3, :3])
    translation_error = float(np.linalg.norm(estimate[:3, 3] - t_robot_bone[:3, 3]))
    assert rotation_error < MAX_ROTATION_ERROR_DEG, rotation_error
    assert translation_error < MAX_TRANSLATION_ERROR_MM, translation_error
    assert node.alive()


def _good_cloud(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pose = sim.random_pose(rng)
    return pose, apply_transform(pose, np.vstack(sim.simulate_sweep(sim.make_phantom_mesh(), rng)))


def _bad_clouds() -> dict[str, PointCloud2]:
    _, good = _good_cloud(1)
    bad: dict[str, PointCloud2] = {}
    bad['empty'] = xyz_to_cloud(np.zeros((0, 3)), 'bad_empty', 1)
    bad['nan'] = xyz_to_cloud(np.full((800, 3), np.nan), 'bad_nan', 1)
    no_x = xyz_to_cloud(good, 'bad_fields', 1)
    no_x.fields = [f for f in no_x.fields if f.name != 'x']
    bad['fields'] = no_x
    ints = xyz_to_cloud(good, 'bad_datatype', 1)
    ints.fields = [PointField(name=f.name, offset=f.offset, datatype=PointField.UINT16, count=1)
                   for f in ints.fields]
    bad['datatype'] = ints
    huge = PointCloud2()
    huge.header.frame_id = 'bad_huge'
    huge.width, huge.height, huge.point_step, huge.row_step = 10_000_000, 1, 12, 120_000_000
    huge.fields = xyz_to_cloud(good, 'x', 1).fields
    bad['huge'] = huge
    bad['units'] = xyz_to_cloud(good * 1000.0, 'bad_units', 1)  # mm numbers on a metre wire
    # A different bone of a similar size: an ellipsoid is no femur.
    blob = np.random.default_rng(3).normal(size=(4000, 3))
    blob = blob / np.linalg.norm(blob, axis=1, keepdims=True) * (30.0, 40.0, 90.0)
    bad['foreign'] = xyz_to_cloud(blob + (300.0, 0.0, 0.0), 'bad_foreign', 1)
    return bad


def _single_node(setup: dict) -> tuple[NodeProcess, Any]:
    """Start (once) a registration node in single mode; return it and a cloud publisher."""
    probe = setup['probe']
    if 'single' not in setup:
        setup['single'] = setup['start'](
            'registration_node', 'registration_single', [setup['reg_params']],
            '-p', 'mode:=single', '-r', 'points:=/single/points')
        assert probe.wait_diag('registration_single: model', START_TIMEOUT_S,
                               level=DiagnosticStatus.OK) is not None, setup['single'].log()
        setup['single_pub'] = matched_publisher(probe.node, PointCloud2, '/single/points',
                                                CLOUD_PUBLISHER_QOS)
        setup['bad_frames'] = []
    return setup['single'], setup['single_pub']


@pytest.mark.parametrize('case', ['empty', 'nan', 'fields', 'datatype', 'huge', 'units',
                                  'foreign'])
def test_bad_input_is_explained_and_gets_no_tf(setup: dict, case: str) -> None:
    probe = setup['probe']
    node, pub = _single_node(setup)
    bad = _bad_clouds()[case]
    frame = bad.header.frame_id
    setup['bad_frames'].append(frame)
    start = probe.diags.count()
    probe.deliver('registration_single', pub, bad)
    status = probe.wait_diag('registration_single', SOLVE_TIMEOUT_S, frame_id=frame,
                             start=start)
    assert status is not None, f'no diagnostic for the {case} cloud\n' + node.log()
    expected = DiagnosticStatus.WARN if case == 'foreign' else DiagnosticStatus.ERROR
    assert status.level in (expected, DiagnosticStatus.ERROR), status.message
    assert 'no transform broadcast' in status.message and len(status.message) > 40
    assert frame not in probe.parents_seen(), f'tf broadcast for the {case} cloud'
    assert node.alive()


def test_after_every_bad_input_the_node_registers_the_next_good_cloud(setup: dict) -> None:
    probe = setup['probe']
    node, pub = _single_node(setup)
    pose, good = _good_cloud(17)
    probe.deliver('registration_single', pub, xyz_to_cloud(good, 'good_after_bad_inputs', 1))
    transform = probe.wait_tf('good_after_bad_inputs', 'bone', SOLVE_TIMEOUT_S)
    assert transform is not None, 'no tf for the good cloud\n' + node.log()
    estimate = transform_stamped_to_matrix(transform)
    assert rotation_error_deg(estimate[:3, :3], pose[:3, :3]) < MAX_ROTATION_ERROR_DEG
    assert np.linalg.norm(estimate[:3, 3] - pose[:3, 3]) < MAX_TRANSLATION_ERROR_MM
    assert not set(setup['bad_frames']) & probe.parents_seen(), 'tf for a bad input'
    assert node.alive()


def test_missing_mesh_is_reported_and_the_loader_stays_up(setup: dict) -> None:
    probe, work = setup['probe'], setup['work']
    missing = work / 'no_such_femur.stl'
    loader = setup['start']('preop_loader', 'preop_missing', [], '-p', f'mesh_path:={missing}',
                            '-p', f'cache_dir:={work}', '-r', 'model:=/missing/model')
    status = probe.wait_diag('preop_missing: model', START_TIMEOUT_S,
                             level=DiagnosticStatus.ERROR)
    assert status is not None, loader.log()
    assert str(missing) in status.message and 'does not exist' in status.message
    assert loader.alive()


def test_corrupt_checkpoint_is_reported_and_nodes_recover(setup: dict) -> None:
    probe, work, registrar = setup['probe'], setup['work'], setup['registrar']
    corrupt_cache = work / 'corrupt_cache'
    corrupt_cache.mkdir()
    phantom = sim.phantom_mesh_path(setup['cache'])
    shutil.copy(phantom, corrupt_cache / phantom.name)
    corrupt = corrupt_cache / registrar.checkpoint_path.name
    corrupt.write_bytes(registrar.checkpoint_path.read_bytes()[:5000])  # truncated file
    configs = small_configs()
    params = write_params_file(work / 'preop_corrupt.yaml', {
        'mesh_path': str(corrupt_cache / phantom.name), 'cache_dir': str(corrupt_cache),
        **flat_parameters(configs, ('udf', 'train'))})
    loader = setup['start']('preop_loader', 'preop_corrupt', [params],
                            '-r', 'model:=/corrupt/model')
    status = probe.wait_diag('preop_corrupt: model', START_TIMEOUT_S,
                             level=DiagnosticStatus.ERROR)
    assert status is not None, loader.log()
    assert 'checkpoint' in status.message and str(corrupt) in status.message
    assert loader.alive()
    # The registration node given the corrupt checkpoint reports it, waits for a model on its
    # topic, and registers once a good model is announced there.
    node = setup['start']('registration_node', 'registration_corrupt', [setup['reg_params']],
                          '-p', 'mode:=single', '-p', f'checkpoint:={corrupt}',
                          '-r', 'model:=/corrupt/model', '-r', 'points:=/corrupt/points')
    status = probe.wait_diag('registration_corrupt: model', START_TIMEOUT_S,
                             level=DiagnosticStatus.ERROR)
    assert status is not None, node.log()
    assert str(corrupt) in status.message
    good_model = probe.models.wait_for(lambda m: True, MESSAGE_TIMEOUT_S)
    model_pub = probe.node.create_publisher(String, '/corrupt/model', LATCHED_QOS)
    model_pub.publish(good_model)
    assert probe.wait_diag('registration_corrupt: model', START_TIMEOUT_S,
                           level=DiagnosticStatus.OK) is not None, node.log()
    pose, good = _good_cloud(11)
    pub = matched_publisher(probe.node, PointCloud2, '/corrupt/points', CLOUD_PUBLISHER_QOS)
    probe.deliver('registration_corrupt', pub, xyz_to_cloud(good, 'good_after_corrupt', 1))
    assert probe.wait_tf('good_after_corrupt', 'bone', SOLVE_TIMEOUT_S) is not None, node.log()


def test_invalid_parameters_stop_the_node_with_a_clear_message(setup: dict) -> None:
    exe = find_executable('registration_node')
    result = subprocess.run(
        [exe, '--ros-args', '-r', '__node:=registration_invalid', '-p',
         'registration.fine_top_k:=4096'], capture_output=True, text=True,
        timeout=START_TIMEOUT_S)
    assert result.returncode == 2, result.stderr
    assert 'fine_top_k' in result.stderr + result.stdout


def test_a_640x480_rgbd_cloud_from_another_process_reaches_the_node(setup: dict) -> None:
    """Acceptance (issue 10): 4.9 MB organised xyz + rgb, default cloud QoS, registered."""
    probe = setup['probe']
    node, pub = _single_node(setup)
    pose, good = _good_cloud(23)
    msg = organised_rgbd_cloud(good / 1000.0, 'good_rgbd', time.time_ns(), seed=23)
    assert (msg.height, msg.width, msg.point_step, len(msg.data)) == (480, 640, 16, 4_915_200)
    before = probe.clouds_received('registration_single')
    probe.deliver('registration_single', pub, msg)
    assert probe.clouds_received('registration_single') > before, 'the cloud never arrived'
    transform = probe.wait_tf('good_rgbd', 'bone', SOLVE_TIMEOUT_S)
    assert transform is not None, 'no tf for the RGB-D cloud\n' + node.log()
    estimate = transform_stamped_to_matrix(transform)
    assert rotation_error_deg(estimate[:3, :3], pose[:3, :3]) < MAX_ROTATION_ERROR_DEG
    assert np.linalg.norm(estimate[:3, 3] - pose[:3, 3]) < MAX_TRANSLATION_ERROR_MM


def test_sigint_during_a_solve_exits_cleanly(setup: dict) -> None:
    """A solve longer than the worker's join timeout once aborted the exit (code -6)."""
    probe = setup['probe']
    checkpoint = setup['registrar'].checkpoint_path
    node = setup['start']('registration_node', 'registration_slow', [], '-p', 'mode:=single',
                          '-p', f'checkpoint:={checkpoint}',
                          # A search that takes many seconds on any machine: every one of
                          # 8192 starts optimised for 400 steps.
                          '-p', 'registration.num_hypotheses:=8192',
                          '-p', 'registration.optimised_share:=1.0',
                          '-p', 'registration.coarse_iterations:=400',
                          '-r', 'points:=/slow/points', '-r', 'model:=/slow/model')
    assert probe.wait_diag('registration_slow: model', START_TIMEOUT_S,
                           level=DiagnosticStatus.OK) is not None, node.log()
    pub = matched_publisher(probe.node, PointCloud2, '/slow/points', CLOUD_PUBLISHER_QOS)
    probe.deliver('registration_slow', pub, xyz_to_cloud(_good_cloud(29)[1], 'slow', 1))
    beat = probe.next_heartbeat('registration_slow')
    assert beat.get('worker_busy') == 'True', beat
    setup['procs'].remove(node)
    assert node.stop() == 0, node.log()


def test_nodes_exit_cleanly_on_sigint(setup: dict) -> None:
    for proc in setup['procs']:
        assert proc.alive(), proc.log()
    codes = {proc.log_path.stem: proc.stop() for proc in setup['procs']}
    assert all(code == 0 for code in codes.values()), codes
