"""In-process tests of preop_loader and registration_node over real rclpy and DDS.

Parameters (declared, described, ranged, rejected when invalid), the worker's latest-only
queue, the tf direction and units, and the diagnostics of bad input. Most tests hand the
registration node a scripted registrar so they test the node, not the solver; the tests at the
end use the real phantom model (trained once per session, see ros_test_support).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
import threading
import time
from types import SimpleNamespace
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from geometry_msgs.msg import PoseWithCovarianceStamped
import numpy as np
import pytest
from rcl_interfaces.msg import ParameterType
from rclpy.exceptions import InvalidParameterValueException
from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, qos_profile_sensor_data, ReliabilityPolicy
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import String
from std_srvs.srv import Trigger
from tf2_msgs.msg import TFMessage
import yaml

from neural_bone_reg import RegistrationResult
from neural_bone_reg.core import sim
from neural_bone_reg.core.confidence import covariance_in_parent
from neural_bone_reg.core.config import (RegistrationConfig, SweepConfig, TrackingConfig,
                                         TrainConfig, UdfConfig)
from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform
from neural_bone_reg.ros import input_checks
from neural_bone_reg.ros import registration_node as registration_node_module
from neural_bone_reg.ros import registration_worker
from neural_bone_reg.ros.conversions import (cloud_to_xyz, pose_with_covariance_to_arrays,
                                             transform_stamped_to_matrix, xyz_to_cloud)
from neural_bone_reg.ros.diagnostics import (cap_text, MAX_MESSAGE_CHARS, MAX_VALUE_CHARS,
                                             printable)
from neural_bone_reg.ros.model_info import decode_model_info
from neural_bone_reg.ros.preop_loader import PreopLoader
from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS, DIAGNOSTICS_QOS, LATCHED_QOS
from neural_bone_reg.ros.registration_node import RegistrationNode
from neural_bone_reg.ros.tf_compat import DYNAMIC_LISTENER_QOS, TfWaiter
from ros_test_support import (Collector, CONFIG_DIR, find_status, matched_publisher,
                              MESSAGE_TIMEOUT_S,
                              rotation_error_deg, shared_cache_dir, small_configs,
                              SOLVE_TIMEOUT_S, status_values, TEST_REGISTRATION, TEST_TRAIN,
                              TEST_UDF, trained_phantom, wait_for_status)

#: A rigid transform T_bone_cloud the scripted registrar returns.
FAKE_T = np.array([[0.0, -1.0, 0.0, 12.0],
                   [1.0, 0.0, 0.0, -30.0],
                   [0.0, 0.0, 1.0, 250.0],
                   [0.0, 0.0, 0.0, 1.0]])


class ScriptedRegistrar:
    """Stand-in for BoneRegistrar (a ``core.stream.Registrar``): records calls, can block,
    returns a fixed result; it does not track (``ScriptedTracker`` does)."""

    checkpoint_path = None
    geometry_sha256 = ''

    def __init__(self, accepted: bool = True, reasons: tuple[str, ...] = (),
                 block: bool = False, surface_points: np.ndarray | None = None,
                 uncertainty: dict[str, Any] | None = None) -> None:
        self.calls: list[np.ndarray] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not block:
            self.release.set()
        self.accepted = accepted
        self.reasons = reasons
        #: RegistrationResult fields of the confidence (covariance, bounds, guidance).
        self.uncertainty = dict(uncertainty or {})
        self.surface_points = (surface_points if surface_points is not None
                               else np.asarray(sim.make_phantom_mesh().vertices, np.float32))

    def register(self, points: np.ndarray) -> RegistrationResult:
        self.calls.append(np.array(points, copy=True))
        self.started.set()
        if not self.release.wait(SOLVE_TIMEOUT_S):
            raise RuntimeError('test never released the scripted registrar')
        return RegistrationResult(transform=FAKE_T.copy(), accepted=self.accepted,
                                  residual_mm=0.8, inlier_fraction=0.95,
                                  ambiguity=0.9 if not self.accepted else 0.1,
                                  rejection_reasons=self.reasons, n_points=len(points),
                                  time_s=0.01, timings={'coarse_s': 0.005},
                                  **self.uncertainty)

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        return RegistrationResult(transform=FAKE_T.copy(), accepted=False, residual_mm=9.0,
                                  inlier_fraction=0.0, ambiguity=float('nan'),
                                  rejection_reasons=('scripted: does not track',),
                                  n_points=len(points), time_s=0.0, method='track')

    def with_config(self, config: RegistrationConfig) -> ScriptedRegistrar:
        return self

    def warm_up(self) -> float:
        return 0.0


@pytest.fixture(scope='session')
def phantom_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train the phantom once into the session cache; return the folder."""
    folder = shared_cache_dir(tmp_path_factory.getbasetemp())
    trained_phantom(folder)
    return folder


def registration_node(ros_context: Any, clock: Any = None, **params: Any) -> RegistrationNode:
    """Create a registration node with parameter overrides (dotted names allowed).

    ``clock`` (seconds) replaces the stream's monotonic clock: the test moves it by hand.
    """
    overrides = [Parameter(name, value=value) for name, value in params.items()]
    return RegistrationNode(context=ros_context, parameter_overrides=overrides, clock=clock)


class ManualClock:
    """A clock for the node's stream that moves only when told to."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


def cloud(points_mm: np.ndarray, frame: str = 'robot', stamp_ns: int = 1_000_000_000
          ) -> PointCloud2:
    """Return a PointCloud2 (metres on the wire) of mm points."""
    return xyz_to_cloud(np.asarray(points_mm, np.float32), frame, stamp_ns)


def patch_points(seed: int = 0, n: int = 400) -> np.ndarray:
    """Return a partial phantom cloud in the mesh frame (mm)."""
    rng = np.random.default_rng(seed)
    return sim.simulate_partial_cloud(sim.make_phantom_mesh(), rng, n_points=n).astype(np.float32)


# ---------------------------------------------------------------------------- parameters


def test_every_config_field_is_a_described_ranged_parameter(ros_context: Any) -> None:
    node = registration_node(ros_context)
    try:
        for section, cls in (('udf', UdfConfig), ('train', TrainConfig),
                             ('registration', RegistrationConfig)):
            for field in dataclasses.fields(cls):
                name = f'{section}.{field.name}'
                assert node.has_parameter(name), name
                desc = node.describe_parameter(name)
                assert desc.description and desc.description != name, name
                value = getattr(cls(), field.name)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    assert desc.integer_range or desc.floating_point_range, name
        for name in ('checkpoint', 'mesh_path', 'cache_dir', 'device', 'preset'):
            assert node.describe_parameter(name).read_only, name
        assert node.describe_parameter('mode').type == ParameterType.PARAMETER_STRING
        assert node.get_parameter('registration.num_hypotheses').value == \
            RegistrationConfig().num_hypotheses
    finally:
        node.destroy_node()


def test_preset_and_overrides_build_the_config(ros_context: Any) -> None:
    node = registration_node(ros_context, preset='fast', **{'registration.fine_top_k': 5})
    try:
        config = node._configs.registration
        assert config.num_hypotheses == 512  # from the preset
        assert config.fine_top_k == 5  # the explicit parameter wins
    finally:
        node.destroy_node()


def test_a_runtime_override_of_a_preset_is_used_even_at_the_default(ros_context: Any) -> None:
    default = RegistrationConfig().num_hypotheses
    node = registration_node(ros_context, preset='fast')
    try:
        assert node._configs.registration.num_hypotheses == 512  # the preset's
        assert node.set_parameters([Parameter('registration.num_hypotheses',
                                              value=default)])[0].successful
        assert node._configs.registration.num_hypotheses == default  # as set, as read back
        # Another change later does not bring the preset's value back.
        assert node.set_parameters([Parameter('registration.fine_top_k', value=8)])[0].successful
        config = node._configs.registration
        assert (config.num_hypotheses, config.fine_top_k) == (default, 8)
        assert config.coarse_iterations == 60  # still the preset's where nothing was set
    finally:
        node.destroy_node()


@pytest.mark.parametrize('name,value,expected', [
    ('registration.num_hypotheses', 0, 'registration.num_hypotheses'),
    ('sweep.voxel_mm', -1.0, 'sweep.voxel_mm'),
    ('max_cloud_points', 0, 'max_cloud_points'),
])
def test_out_of_range_parameter_is_rejected_at_start(ros_context: Any, name: str, value: Any,
                                                     expected: str) -> None:
    with pytest.raises(InvalidParameterValueException, match=expected.replace('.', r'\.')):
        registration_node(ros_context, **{name: value})


@pytest.mark.parametrize('params,expected', [
    ({'registration.fine_top_k': 64, 'registration.num_hypotheses': 32}, 'fine_top_k'),
    ({'registration.backend': 'voxels'}, 'registration.backend'),
    ({'mode': 'burst'}, "'mode'"),
    ({'device': 'tpu'}, "'device'"),
    ({'preset': 'fastest'}, 'preset'),
])
def test_inconsistent_parameters_are_rejected_with_the_field_named(
        ros_context: Any, params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        registration_node(ros_context, **params)


def test_runtime_parameter_changes_are_validated(ros_context: Any) -> None:
    node = registration_node(ros_context)
    try:
        bad = node.set_parameters([Parameter('registration.fine_top_k', value=5000)])[0]
        assert not bad.successful and 'fine_top_k' in bad.reason
        assert node.get_parameter('registration.fine_top_k').value == 32
        read_only = node.set_parameters([Parameter('device', value='cpu')])[0]
        assert not read_only.successful
        # udf.* / train.* shape the mesh_path model trained at start: not accepted and ignored.
        for name, value in (('udf.hidden_dim', 32), ('train.iterations', 10)):
            refused = node.set_parameters([Parameter(name, value=value)])[0]
            assert not refused.successful and 'read-only' in refused.reason.lower()
        assert not node.set_parameters([Parameter('mode', value='burst')])[0].successful
        ok = node.set_parameters([Parameter('registration.fine_top_k', value=16),
                                  Parameter('sweep.min_points', value=50)])
        assert all(r.successful for r in ok)
        assert node._configs.registration.fine_top_k == 16
        assert node.stream.sweep_config.min_points == 50
    finally:
        node.destroy_node()


@pytest.mark.parametrize('filename,node_cls,sections', [
    ('registration_node.yaml', RegistrationNode, ('udf', 'train', 'registration')),
    ('preop_loader.yaml', PreopLoader, ('udf', 'train')),
])
def test_params_files_cover_every_parameter_with_the_core_defaults(
        ros_context: Any, filename: str, node_cls: type, sections: tuple[str, ...]) -> None:
    text = (CONFIG_DIR / filename).read_text()
    params = yaml.safe_load(text)['/**']['ros__parameters']
    flat: dict[str, Any] = {}

    def walk(prefix: str, values: dict[str, Any]) -> None:
        for key, value in values.items():
            if isinstance(value, dict):
                walk(f'{prefix}{key}.', value)
            else:
                flat[f'{prefix}{key}'] = value
    walk('', params)
    baseline = Node('baseline', context=ros_context)
    node = node_cls(context=ros_context)
    try:
        declared = set(node._parameters) - set(baseline._parameters)
        assert set(flat) == declared, 'params file and declared parameters differ'
        for section in sections:
            defaults = dataclasses.asdict({'udf': UdfConfig, 'train': TrainConfig,
                                           'registration': RegistrationConfig}[section]())
            for key, default in defaults.items():
                value = flat[f'{section}.{key}']
                expected = list(default) if isinstance(default, tuple) else default
                assert value == expected, f'{filename}: {section}.{key}={value} != {expected}'
    finally:
        node.destroy_node()
        baseline.destroy_node()
    # Every parameter line is preceded by a comment line.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped and not stripped.startswith('#') and not stripped.endswith(':'):
            assert lines[i - 1].strip().startswith('#'), f'{filename}:{i + 1} has no comment'


def test_params_files_are_what_the_generator_writes(tmp_path: Path) -> None:
    """config/*.yaml are generated from the dataclasses' metadata: rerun the script if not."""
    script = CONFIG_DIR.parent / 'scripts' / 'gen_params_yaml.py'
    spec = importlib.util.spec_from_file_location('gen_params_yaml', script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(tmp_path)
    for name in ('registration_node.yaml', 'preop_loader.yaml'):
        assert (tmp_path / name).read_text() == (CONFIG_DIR / name).read_text(), (
            f'config/{name} is out of date: run scripts/gen_params_yaml.py')


def test_sweep_and_track_parameters_are_described_from_the_metadata(ros_context: Any) -> None:
    node = registration_node(ros_context)
    try:
        for section, cls in (('sweep', SweepConfig), ('track', TrackingConfig)):
            for field in dataclasses.fields(cls):
                desc = node.describe_parameter(f'{section}.{field.name}')
                assert desc.description.startswith(field.metadata['doc']), field.name
                low, high = field.metadata['range']
                ranges = desc.integer_range or desc.floating_point_range
                assert (ranges[0].from_value, ranges[0].to_value) == (low, high), field.name
                assert node.get_parameter(f'{section}.{field.name}').value == \
                    getattr(cls(), field.name)
    finally:
        node.destroy_node()


# ---------------------------------------------------------------------------- worker


def test_worker_keeps_only_the_latest_cloud_and_never_blocks_the_executor(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single', bone_frame='bone'))
    scripted = ScriptedRegistrar(block=True)
    node.use_registrar(scripted)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    waiter = TfWaiter(probe, 'robot', 'bone')
    clouds = {name: patch_points(seed) for seed, name in enumerate('ABCD')}
    stamps = {name: (10 + i) * 1_000_000_000 for i, name in enumerate('ABCD')}
    pub.publish(cloud(clouds['A'], stamp_ns=stamps['A']))
    assert scripted.started.wait(MESSAGE_TIMEOUT_S), 'the worker never started on cloud A'
    for name in 'BCD':
        pub.publish(cloud(clouds[name], stamp_ns=stamps[name]))
    # The callback runs while the worker is stuck in register(): the executor is free.
    received = node.stream.wait_for(lambda counts: counts.received >= 4, MESSAGE_TIMEOUT_S)
    assert node.stream.counts().dropped == 2  # B and C replaced before the worker took them
    assert received, f'callbacks blocked: only {node.stream.counts().received} clouds received'
    assert len(scripted.calls) == 1
    scripted.release.set()
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert len(scripted.calls) == 2, 'B and C must be dropped, never queued'
    np.testing.assert_allclose(scripted.calls[1], clouds['D'], atol=1e-3)
    assert node.n_dropped == 2
    transform = waiter.wait(MESSAGE_TIMEOUT_S)
    while transform is not None and (transform.header.stamp.sec != 13):
        waiter.clear()
        transform = waiter.wait(MESSAGE_TIMEOUT_S)
    assert transform is not None, 'no tf for the latest cloud'
    # tf carries T_cloud_bone = inverse(T_bone_cloud), translation in metres on the wire.
    assert abs(transform.transform.translation.z - invert_transform(FAKE_T)[2, 3] / 1000) < 1e-9
    np.testing.assert_allclose(transform_stamped_to_matrix(transform), invert_transform(FAKE_T),
                               atol=1e-6)


def test_registered_points_are_the_cloud_in_the_bone_frame(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single', bone_frame='femur'))
    node.use_registrar(ScriptedRegistrar())
    out = Collector(probe, PointCloud2, '/registered_points', LATCHED_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    points = patch_points(3)
    pub.publish(cloud(points, frame='tracker'))
    msg = out.wait_for(lambda m: True, SOLVE_TIMEOUT_S)
    assert msg is not None and msg.header.frame_id == 'femur'
    np.testing.assert_allclose(cloud_to_xyz(msg), apply_transform(FAKE_T, points), atol=1e-2)


def test_rejected_result_gives_a_warning_and_no_tf(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar(accepted=False,
                                         reasons=('ambiguity 0.90 > gate 0.80',)))
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    waiter = TfWaiter(probe, 'robot', 'bone')
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(1)))
    status = wait_for_status(diags, 'registration', DiagnosticStatus.WARN, SOLVE_TIMEOUT_S)
    assert status is not None, 'no WARN diagnostic for a rejected result'
    assert 'ambiguity 0.90 > gate 0.80' in status.message
    assert status_values(status)['accepted'] == 'False'
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert node.n_broadcasts == 0
    assert waiter.latest is None


#: A known pose covariance (mm, rad; core convention) with cross terms, and its bounds.
_CROSS = np.array([0.01, 0.0, 0.02, 1e-4, 0.0, 0.0])
KNOWN_COVARIANCE = np.diag([0.04, 0.09, 0.16, 1e-6, 4e-6, 9e-6]) + np.outer(_CROSS, _CROSS)
KNOWN_UNCERTAINTY = {'covariance': KNOWN_COVARIANCE, 'bound_mm': 1.37, 'bound_deg': 0.55,
                     'uniqueness_z': 8.25, 'uniqueness_margin_mm': 0.61, 'noise_mm': 1.8}


def test_an_accepted_result_publishes_bone_pose_with_its_covariance(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single', bone_frame='femur'))
    node.use_registrar(ScriptedRegistrar(uncertainty=KNOWN_UNCERTAINTY))
    poses = Collector(probe, PoseWithCovarianceStamped, '/bone_pose', LATCHED_QOS)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(2), frame='tracker', stamp_ns=42_000_000_123))
    msg = poses.wait_for(lambda m: True, SOLVE_TIMEOUT_S)
    assert msg is not None, 'no bone_pose for an accepted result'
    assert msg.header.frame_id == 'tracker'  # the parent frame of the broadcast tf
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (42, 123)
    # The pose is tf's (the bone in the cloud frame), in metres on the wire.
    assert abs(msg.pose.pose.position.z - invert_transform(FAKE_T)[2, 3] / 1000.0) < 1e-9
    pose, covariance = pose_with_covariance_to_arrays(msg)
    np.testing.assert_allclose(pose, invert_transform(FAKE_T), atol=1e-9)
    np.testing.assert_allclose(covariance, covariance_in_parent(FAKE_T, KNOWN_COVARIANCE),
                               rtol=1e-9, atol=1e-15)
    wire = np.asarray(msg.pose.covariance).reshape(6, 6)
    np.testing.assert_allclose(wire[:3, :3], covariance[:3, :3] * 1e-6, rtol=1e-12)
    array = diags.wait_for(lambda a: find_status(a, ': registration', level=DiagnosticStatus.OK)
                           is not None, MESSAGE_TIMEOUT_S)
    assert array is not None
    values = status_values(find_status(array, ': registration', level=DiagnosticStatus.OK))
    assert (values['bound_mm'], values['bound_deg'], values['uniqueness_z'],
            values['uniqueness_margin_mm'], values['noise_mm']) == (
                '1.37', '0.55', '8.25', '0.61', '1.8')
    assert values['bone_pose'] == 'published' and values['guidance'] == ''
    assert node.output.n_poses == 1


def test_gates_looser_than_calibrated_are_a_warning_and_named_in_every_result(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    node = spin(registration_node(ros_context, mode='single',
                                  **{'registration.gate_min_uniqueness_z': 3.0}))
    node.use_registrar(ScriptedRegistrar(uncertainty=KNOWN_UNCERTAINTY))
    status = wait_for_status(diags, ': gates', DiagnosticStatus.WARN, MESSAGE_TIMEOUT_S)
    assert status is not None, 'no WARN gates status for a loosened uniqueness gate'
    assert 'registration.gate_min_uniqueness_z=3 (calibrated at 6' in status.message
    # An accepted result still goes out (the operator chose the gate), and says so.
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(2)))
    array = diags.wait_for(lambda a: find_status(a, ': registration', level=DiagnosticStatus.OK)
                           is not None, SOLVE_TIMEOUT_S)
    values = status_values(find_status(array, ': registration', level=DiagnosticStatus.OK))
    assert values['loosened_gates'].startswith('registration.gate_min_uniqueness_z=3')
    # Back to the calibrated value: the gates status turns OK; a stricter one stays OK.
    assert node.set_parameters([Parameter('registration.gate_min_uniqueness_z',
                                          value=8.0)])[0].successful
    array = diags.wait_for(lambda a: find_status(a, ': gates', level=DiagnosticStatus.OK)
                           is not None, MESSAGE_TIMEOUT_S)
    assert array is not None and node.output.loosened_gates == ()


def test_an_accepted_result_without_a_covariance_goes_on_tf_but_not_on_bone_pose(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar())  # covariance all inf: not measured
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    waiter = TfWaiter(probe, 'robot', 'bone')
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(2)))
    assert waiter.wait(SOLVE_TIMEOUT_S) is not None
    array = diags.wait_for(lambda a: find_status(a, ': registration', level=DiagnosticStatus.OK)
                           is not None, MESSAGE_TIMEOUT_S)
    values = status_values(find_status(array, ': registration', level=DiagnosticStatus.OK))
    assert 'covariance not measured' in values['bone_pose']
    assert node.output.n_poses == 0 and node.n_broadcasts == 1


def _subscribers_matched(publisher: Any, count: int) -> bool:
    """Wait until ``publisher`` is matched by at least ``count`` subscriptions."""
    deadline = time.monotonic() + MESSAGE_TIMEOUT_S
    while publisher.get_subscription_count() < count:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


#: Stamps of the results before and after the change (no other test uses them: a node of an
#: earlier test may linger in discovery for a moment).
STALE_NS, FRESH_NS = 771_000_000_123, 772_000_000_456


def _stamp_ns(msg: Any) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


@pytest.mark.parametrize('change', ['reset', 'model'])
def test_a_reset_or_new_model_withdraws_the_latched_pose(
        change: str, ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    """Latched for late subscribers while it stands; a late subscriber after the change gets
    no stale pose, and the next accepted result reaches every subscriber."""
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar(uncertainty=KNOWN_UNCERTAINTY))
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(2), stamp_ns=STALE_NS))
    assert node.stream.wait_for(lambda counts: counts.solves >= 1, SOLVE_TIMEOUT_S)
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.output.n_poses == 1
    early = Collector(probe, PoseWithCovarianceStamped, '/bone_pose', LATCHED_QOS)
    assert early.wait_for(lambda m: True, MESSAGE_TIMEOUT_S) is not None, 'not latched'
    if change == 'reset':
        node.on_reset(Trigger.Request(), Trigger.Response())
    else:
        node.use_registrar(ScriptedRegistrar(uncertainty=KNOWN_UNCERTAINTY))
        assert node.wait_idle(SOLVE_TIMEOUT_S)
    late = Collector(probe, PoseWithCovarianceStamped, '/bone_pose', LATCHED_QOS)
    late_points = Collector(probe, PointCloud2, '/registered_points', LATCHED_QOS)
    assert _subscribers_matched(node.output._pose_pub, 2)  # early and late
    assert _subscribers_matched(node.output._registered_pub, 1)
    time.sleep(0.5)  # a latched sample reaches a matched late subscriber within ms
    stale = [m for m in late.messages + late_points.messages if _stamp_ns(m) == STALE_NS]
    assert not stale, f'a stale pose after the {change}'
    pub.publish(cloud(patch_points(3), stamp_ns=FRESH_NS))
    for collector in (late, early, late_points):
        assert collector.wait_for(lambda m: _stamp_ns(m) == FRESH_NS, SOLVE_TIMEOUT_S)


def test_a_refused_result_publishes_no_bone_pose_and_says_where_data_would_help(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    guidance = ('least constrained: translation along bone-frame [0.0, 0.0, 1.0], rotation '
                'about [0.0, 0.0, 1.0]; extend the sweep across that direction; candidate poses '
                'disagree most (23 mm) near bone point [10.0, -4.0, 180.0] mm: add points there')
    assert len(guidance) > MAX_VALUE_CHARS  # must not be cut like a frame id
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar(
        accepted=False, reasons=('imprecise: 95 % bound 3.10 mm (gate 2.0 mm)',),
        uncertainty={**KNOWN_UNCERTAINTY, 'bound_mm': 3.1, 'guidance': guidance}))
    poses = Collector(probe, PoseWithCovarianceStamped, '/bone_pose', LATCHED_QOS)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(2)))
    status = wait_for_status(diags, 'registration', DiagnosticStatus.WARN, SOLVE_TIMEOUT_S)
    assert status is not None, 'no WARN diagnostic for a refused result'
    values = status_values(status)
    assert values['guidance'] == guidance and guidance in status.message
    assert values['bound_mm'] == '3.1' and values['uniqueness_z'] == '8.25'
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert node.output.n_poses == 0 and poses.messages == [] and node.n_broadcasts == 0


def _bad_clouds() -> dict[str, PointCloud2]:
    good = patch_points(5)
    empty = cloud(np.zeros((0, 3)), frame='bad_empty')
    nan = cloud(np.full((500, 3), np.nan), frame='bad_nan')
    no_z = cloud(good, frame='bad_fields')
    no_z.fields = [f for f in no_z.fields if f.name != 'z']
    ints = cloud(good, frame='bad_datatype')
    ints.fields = [PointField(name=f.name, offset=f.offset, datatype=PointField.INT32, count=1)
                   for f in ints.fields]
    huge = PointCloud2()  # declares 10 M points but carries no data: must not be converted
    huge.header.frame_id = 'bad_huge'
    huge.width, huge.height, huge.point_step = 10_000_000, 1, 12
    huge.row_step = 120_000_000
    huge.fields = cloud(good).fields
    truncated = cloud(good, frame='bad_truncated')
    truncated.data = truncated.data[:-7]
    millimetres = cloud(good * 1000.0, frame='bad_units')  # mm values on a metre wire
    shrunk = cloud(good / 1000.0, frame='bad_shrunk')  # converted to metres twice
    bad = {'empty': empty, 'nan': nan, 'fields': no_z, 'datatype': ints, 'huge': huge,
           'truncated': truncated, 'units': millimetres, 'shrunk': shrunk}
    # What a fuzz campaign found (issue 10), and their kin.
    bad['self_frame'] = cloud(good, frame='/bone')  # tf strips the '/': bone -> bone
    bad['stamp_negative'] = cloud(good, frame='bad_stamp_negative')
    bad['stamp_negative'].header.stamp.sec = -1
    bad['stamp_wrap'] = cloud(good, frame='bad_stamp_wrap')
    bad['stamp_wrap'].header.stamp.sec, bad['stamp_wrap'].header.stamp.nanosec = (
        2**31 - 1, 2**32 - 1)
    bad['point_step'] = cloud(good[:1], frame='bad_point_step')
    bad['point_step'].point_step = 2**32 - 1
    bad['count'] = cloud(good, frame='bad_count')
    bad['count'].fields[0].count = 3
    bad['duplicate'] = cloud(good, frame='bad_duplicate')
    bad['duplicate'].fields = [PointField(name=n, offset=o, datatype=PointField.FLOAT32, count=1)
                               for n, o in (('x', 0), ('x', 4), ('y', 4), ('z', 8))]
    bad['many_fields'] = cloud(good, frame='bad_many_fields')
    bad['many_fields'].fields = [PointField(name=f'field_{i}', offset=0, datatype=1, count=1)
                                 for i in range(10_000)]
    bad['float64_overflow'] = cloud(good, frame='bad_float64')
    wide = np.full((500, 3), 1e300).astype('<f8')
    bad['float64_overflow'].fields = [PointField(name=n, offset=8 * i, datatype=8, count=1)
                                      for i, n in enumerate('xyz')]
    bad['float64_overflow'].point_step, bad['float64_overflow'].row_step = 24, 24 * 500
    bad['float64_overflow'].is_bigendian = False
    bad['float64_overflow'].data = wide.tobytes()
    bad['endianness'] = cloud(good, frame='bad_endianness')
    bad['endianness'].is_bigendian = not bad['endianness'].is_bigendian
    bad['gigantic'] = cloud(good + 1e10, frame='bad_gigantic')  # 1e7 m from the origin
    bad['frame_huge'] = cloud(good, frame='f' * 100_000)
    bad['frame_non_ascii'] = cloud(good, frame='kamera_\u00fc')
    return bad


@pytest.mark.parametrize('case,needle', [
    ('empty', 'empty'), ('nan', 'all NaN'), ('fields', "'z'"), ('datatype', 'INT32'),
    ('huge', 'max_cloud_points'), ('truncated', 'bytes'), ('units', 'mm?'),
    ('shrunk', 'divided by 1000 twice'), ('self_frame', 'is the bone frame'),
    ('stamp_negative', 'ROS time cannot represent'), ('stamp_wrap', 'ROS time cannot'),
    ('point_step', 'row_step'), ('count', "'x' has count 3"),
    ('duplicate', "two fields named 'x'"), ('many_fields', '10000 fields'),
    ('float64_overflow', 'beyond what float32 holds'), ('endianness', 'is_bigendian'),
    ('gigantic', 'expected metres (REP 103)'), ('frame_huge', '100000 characters'),
    ('frame_non_ascii', 'not a tf frame name'),
])
def test_bad_input_gives_an_error_diagnostic_no_tf_and_the_node_goes_on(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, case: str,
        needle: str) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    assert node.wait_idle(MESSAGE_TIMEOUT_S)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    bad = _bad_clouds()[case]
    frame = cap_text(printable(bad.header.frame_id), MAX_VALUE_CHARS)  # as the diagnostic says
    tf = Collector(probe, TFMessage, '/tf', DYNAMIC_LISTENER_QOS)
    pub.publish(bad)
    array = diags.wait_for(lambda a: find_status(a, 'input', frame_id=frame) is not None,
                           MESSAGE_TIMEOUT_S)
    assert array is not None, f'no diagnostic for the {case} cloud'
    status = find_status(array, 'input', frame_id=frame)
    assert status.level == DiagnosticStatus.ERROR
    assert needle in status.message, status.message
    assert len(status.message) <= MAX_MESSAGE_CHARS
    if case != 'units':  # clouds on the metre wire are not asked whether they are in metres
        assert 'Is it in metres' not in status.message and 'expected mm' not in status.message
    assert scripted.calls == [], 'bad input reached the solver'
    assert node.stream.counts().rejected_inputs == 1
    pub.publish(cloud(patch_points(6), frame='good'))
    assert tf.wait_for(lambda m: m.transforms[0].header.frame_id == 'good',
                       SOLVE_TIMEOUT_S) is not None, 'the next good cloud was not registered'
    assert [m.transforms[0].header.frame_id for m in tf.messages] == ['good']


def test_on_points_never_raises_whatever_the_message_provokes(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    # The two inputs that crashed the node (issue 10), called straight from the executor's
    # point of view: the callback must return, not raise.
    step = cloud(patch_points(), frame='crash_point_step')
    step.width, step.point_step, step.data = 1, 2**32 - 1, step.data[:12]
    node.on_points(step)
    stamp = cloud(patch_points(), frame='crash_stamp')
    stamp.header.stamp.sec = -1
    node.on_points(stamp)
    # Anything no check foresaw is still a rejected input with its cause named.
    monkeypatch.setattr(input_checks, 'read_points',
                        lambda *args: (_ for _ in ()).throw(RuntimeError('unforeseen')))
    node.on_points(cloud(patch_points(), frame='crash_unforeseen'))
    for frame, needle in (('crash_point_step', 'row_step'), ('crash_stamp', 'ROS time'),
                          ('crash_unforeseen', 'RuntimeError: unforeseen')):
        array = diags.wait_for(lambda a: find_status(a, 'input', frame_id=frame) is not None,
                               MESSAGE_TIMEOUT_S)
        assert array is not None, f'no diagnostic for {frame}'
        status = find_status(array, 'input', frame_id=frame)
        assert status.level == DiagnosticStatus.ERROR and needle in status.message
    assert node.stream.counts().rejected_inputs == 3 and scripted.calls == []


def test_cloud_qos_parameters_build_the_subscription(ros_context: Any) -> None:
    node = registration_node(ros_context)
    try:
        qos = node._points_sub.qos_profile
        assert (qos.reliability, qos.history, qos.depth) == (
            ReliabilityPolicy.RELIABLE, HistoryPolicy.KEEP_LAST, 5)
        assert not node.set_parameters([Parameter('cloud_qos.depth', value=3)])[0].successful
    finally:
        node.destroy_node()
    node = registration_node(ros_context, **{'cloud_qos.reliability': 'best_effort',
                                             'cloud_qos.history': 'keep_all'})
    try:
        qos = node._points_sub.qos_profile
        assert (qos.reliability, qos.history) == (ReliabilityPolicy.BEST_EFFORT,
                                                  HistoryPolicy.KEEP_ALL)
    finally:
        node.destroy_node()


@pytest.mark.parametrize('params,error,expected', [
    ({'cloud_qos.reliability': 'sometimes'}, ValueError, 'cloud_qos.reliability'),
    ({'cloud_qos.history': 'keep_some'}, ValueError, 'cloud_qos.history'),
    ({'cloud_qos.depth': 0}, InvalidParameterValueException, r'cloud_qos\.depth'),
    ({'threads.intra_op': -1}, InvalidParameterValueException, r'threads\.intra_op'),
    ({'robot_frame': 'bone', 'bone_frame': '/bone'}, ValueError, 'robot_frame and bone_frame'),
    ({'robot_frame': 'robot base'}, ValueError, 'parameter robot_frame'),
])
def test_bad_qos_thread_and_frame_parameters_are_rejected_at_start(
        ros_context: Any, params: dict[str, Any], error: type, expected: str) -> None:
    with pytest.raises(error, match=expected):
        registration_node(ros_context, **params)


def test_thread_parameters_configure_torch_at_start(
        ros_context: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def configure(intra: int, inter: int) -> tuple[int, int]:
        calls.append((intra, inter))
        return intra or 2, inter or 1
    monkeypatch.setattr(registration_node_module, 'configure_threads', configure)
    node = registration_node(ros_context, **{'threads.intra_op': 3})
    try:
        assert calls == [(3, 0)]
        assert not node.set_parameters([Parameter('threads.intra_op', value=1)])[0].successful
    finally:
        node.destroy_node()


def test_an_incompatible_publisher_and_lost_clouds_show_in_diagnostics(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single'))  # reliable by default
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    probe.create_publisher(PointCloud2, '/points', qos_profile_sensor_data)  # best effort
    array = diags.wait_for(lambda a: find_status(a, 'input', level=DiagnosticStatus.ERROR)
                           is not None, MESSAGE_TIMEOUT_S)
    assert array is not None, 'no diagnostic for an incompatible publisher'
    message = find_status(array, 'input').message
    assert 'incompatible' in message and 'RELIABILITY' in message and 'best_effort' in message
    node.on_message_lost(SimpleNamespace(total_count=3, total_count_change=3))
    array = diags.wait_for(lambda a: find_status(a, 'input', level=DiagnosticStatus.WARN)
                           is not None, MESSAGE_TIMEOUT_S)
    assert array is not None and '3 cloud(s) lost' in find_status(array, 'input').message

    def counters(a: Any) -> bool:
        status = find_status(a, 'model')
        return status is not None and status_values(status).get('clouds_lost') == '3'
    heartbeat = diags.wait_for(counters, 3 * MESSAGE_TIMEOUT_S)
    assert heartbeat is not None, 'the heartbeat does not count lost clouds'
    assert status_values(find_status(heartbeat, 'model'))['incompatible_publishers'] == '1'


def test_a_cloud_in_another_frame_than_robot_frame_needs_a_tf_lookup(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    """With no tf for the cloud's frame (here: none at all), the cloud gives no transform."""
    node = spin(registration_node(ros_context, mode='single', robot_frame='world',
                                  tf_timeout_s=0.05))
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(), frame='camera'))
    array = diags.wait_for(lambda a: find_status(a, ': tf', frame_id='camera') is not None,
                           SOLVE_TIMEOUT_S)
    assert array is not None, 'no tf diagnostic for a cloud outside robot_frame'
    status = find_status(array, ': tf', frame_id='camera')
    assert status.level == DiagnosticStatus.ERROR
    assert "'camera' -> 'world'" in status.message, status.message
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert scripted.calls == [] and node.n_broadcasts == 0 and node.n_tf_failures == 1


def test_robot_frame_cannot_become_the_models_bone_frame(ros_context: Any) -> None:
    node = registration_node(ros_context, mode='single')
    try:
        node.use_registrar(ScriptedRegistrar(), bone_frame='femur')
        assert node.wait_idle(SOLVE_TIMEOUT_S)
        refused = node.set_parameters([Parameter('robot_frame', value='femur')])[0]
        assert not refused.successful and "model's bone_frame" in refused.reason
        # With a bone_frame parameter, that is the child: then 'femur' is a fine parent.
        assert node.set_parameters([Parameter('bone_frame', value='bone'),
                                    Parameter('robot_frame', value='femur')])[0].successful
    finally:
        node.destroy_node()


def test_a_bone_frame_changed_to_a_waiting_clouds_frame_gives_no_self_transform(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    """robot_frame '': each cloud's frame is the parent; the child must still differ."""
    node = spin(registration_node(ros_context, mode='single', robot_frame='',
                                  bone_frame='bone'))
    scripted = ScriptedRegistrar(block=True)
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    node.on_points(cloud(patch_points(), frame='cam', stamp_ns=1_000_000_000))
    assert scripted.started.wait(SOLVE_TIMEOUT_S)
    node.on_points(cloud(patch_points(1), frame='cam', stamp_ns=2_000_000_000))  # waits
    assert node.set_parameters([Parameter('bone_frame', value='cam')])[0].successful
    scripted.release.set()
    array = diags.wait_for(lambda a: find_status(a, 'registration', level=DiagnosticStatus.ERROR)
                           is not None, SOLVE_TIMEOUT_S)
    assert array is not None, 'no ERROR diagnostic for a cloud in the bone frame'
    assert 'is the bone frame' in find_status(array, 'registration').message
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    # The solve in flight (cam -> bone) was voided by the frame change; the waiting one refused.
    assert len(scripted.calls) == 1 and node.n_broadcasts == 0


def test_sweep_mode_accumulates_slices_until_min_points(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='sweep',
                                  **{'sweep.min_points': 1000, 'sweep.voxel_mm': 0.0}))
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    waiter = TfWaiter(probe, 'robot', 'bone')
    rng = np.random.default_rng(0)
    slices = sim.simulate_sweep(sim.make_phantom_mesh(), rng, n_frames=5, points_per_frame=300)
    for i, piece in enumerate(slices[:3]):
        pub.publish(cloud(piece, stamp_ns=(100 + i) * 10**8))
    assert node.stream.wait_for(lambda counts: counts.received >= 3, MESSAGE_TIMEOUT_S)
    assert node.wait_idle(MESSAGE_TIMEOUT_S)
    assert scripted.calls == [], 'solved before sweep.min_points were collected'
    pub.publish(cloud(slices[3], stamp_ns=103 * 10**8))
    transform = waiter.wait(SOLVE_TIMEOUT_S)
    assert transform is not None
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert len(scripted.calls[-1]) == 1200, 'the solve must see all four slices'
    assert (transform.header.stamp.sec, transform.header.stamp.nanosec) == (10, 300_000_000)


def test_services_answer_while_a_cloud_is_being_converted(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Clouds have a callback group of their own: a long conversion holds nothing else."""
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar())
    converting, release = threading.Event(), threading.Event()
    read_cloud = registration_node_module.read_cloud

    def slow_read_cloud(*args: Any, **kwargs: Any) -> Any:
        converting.set()
        release.wait(SOLVE_TIMEOUT_S)  # a huge cloud being converted
        return read_cloud(*args, **kwargs)
    monkeypatch.setattr(registration_node_module, 'read_cloud', slow_read_cloud)
    reset = probe.create_client(Trigger, '/registration_node/reset')
    assert reset.wait_for_service(MESSAGE_TIMEOUT_S)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points()))
    try:
        assert converting.wait(MESSAGE_TIMEOUT_S), 'the cloud never reached on_points'
        future = reset.call_async(Trigger.Request())
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(MESSAGE_TIMEOUT_S), 'the reset service waited for the conversion'
        assert future.result().success
    finally:
        release.set()
    assert node.stream.wait_for(lambda counts: counts.received >= 1, MESSAGE_TIMEOUT_S)


def test_register_now_and_reset_services(ros_context: Any, spin: Callable[[Any], Any],
                                         probe: Any, ros_executor: Any) -> None:
    node = spin(registration_node(ros_context, mode='sweep', **{'sweep.min_points': 5000}))
    scripted = ScriptedRegistrar()
    register_now = probe.create_client(Trigger, '/registration_node/register_now')
    reset = probe.create_client(Trigger, '/registration_node/reset')
    assert register_now.wait_for_service(MESSAGE_TIMEOUT_S)

    def call(client: Any) -> Any:
        future = client.call_async(Trigger.Request())
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        assert done.wait(MESSAGE_TIMEOUT_S)
        return future.result()

    assert not call(register_now).success  # no model yet
    node.use_registrar(scripted)
    assert node.wait_idle(MESSAGE_TIMEOUT_S)
    response = call(register_now)
    assert not response.success and 'empty' in response.message
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    pub.publish(cloud(patch_points(n=300)))
    assert node.stream.wait_for(lambda counts: counts.received >= 1, MESSAGE_TIMEOUT_S)
    assert node.wait_idle(MESSAGE_TIMEOUT_S) and scripted.calls == []
    assert call(register_now).success
    assert node.wait_idle(SOLVE_TIMEOUT_S) and len(scripted.calls) == 1
    assert call(reset).success
    response = call(register_now)
    assert not response.success and 'empty' in response.message


class ScriptedTracker(ScriptedRegistrar):
    """A scripted registrar that can also track; ``track_ok`` decides the tracked results."""

    def __init__(self) -> None:
        super().__init__()
        self.track_ok = True
        self.priors: list[np.ndarray] = []

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        self.priors.append(np.array(prior, copy=True))
        reasons = () if self.track_ok else ('tracking lost: moved 30.0 deg',)
        return RegistrationResult(transform=FAKE_T.copy(), accepted=self.track_ok,
                                  residual_mm=0.7, inlier_fraction=0.97,
                                  ambiguity=float('nan'), rejection_reasons=reasons,
                                  n_points=len(points), time_s=0.002, constraint=0.05,
                                  method='track', step_deg=0.4, step_mm=0.3)


def test_track_mode_tracks_from_the_last_accepted_pose_and_falls_back(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='track', **{'track.max_gap_s': 2.0}))
    scripted = ScriptedTracker()
    node.use_registrar(scripted)
    assert node.wait_idle(MESSAGE_TIMEOUT_S)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    # A heartbeat first: the subscription is matched before the frames' diagnostics go out.
    assert diags.wait_for(lambda a: True, MESSAGE_TIMEOUT_S) is not None

    def frame(stamp_s: float, frame_id: str = 'robot') -> None:
        # Called directly (not over DDS) so that every frame is solved, in order.
        node.on_points(cloud(patch_points(n=300), frame=frame_id,
                             stamp_ns=int(stamp_s * 1e9)))
        assert node.wait_idle(SOLVE_TIMEOUT_S)

    frame(1.0)  # nothing to track from: a global registration
    assert (len(scripted.calls), len(scripted.priors)) == (1, 0)
    frame(1.033)  # tracked from the accepted pose
    assert (len(scripted.calls), len(scripted.priors)) == (1, 1)
    np.testing.assert_array_equal(scripted.priors[0], FAKE_T)
    scripted.track_ok = False
    frame(1.066)  # the track is lost: registered from scratch at once
    assert (len(scripted.calls), len(scripted.priors)) == (2, 2)
    scripted.track_ok = True
    frame(5.0)  # a gap longer than track.max_gap_s: no tracking across it
    assert (len(scripted.calls), len(scripted.priors)) == (3, 2)
    frame(5.03, frame_id='other_robot')  # another frame: no tracking across it either
    assert (len(scripted.calls), len(scripted.priors)) == (4, 2)
    assert node.n_broadcasts == 5 and node.stream.counts().tracked == 1
    array = diags.wait_for(
        lambda a: (find_status(a, 'registration') is not None
                   and status_values(find_status(a, 'registration')).get('method') == 'track'),
        MESSAGE_TIMEOUT_S)
    assert array is not None, 'no diagnostic of a tracked frame'
    values = status_values(find_status(array, 'registration'))
    assert values['accepted'] == 'True' and float(values['constraint']) == 0.05

    scripted.accepted = False  # a rejected global result ends tracking: nothing to track from
    frame(5.06, frame_id='other_robot')  # tracked (the previous frame was accepted) ...
    assert len(scripted.priors) == 3
    scripted.track_ok = False
    frame(5.09, frame_id='other_robot')  # ... lost, and the fallback is rejected
    frame(5.12, frame_id='other_robot')
    assert (len(scripted.calls), len(scripted.priors)) == (6, 4)
    assert node.n_broadcasts == 6


def test_track_ends_on_reset_mode_and_config_changes_and_stale_frames(
        ros_context: Any, spin: Callable[[Any], Any]) -> None:
    clock = ManualClock()
    node = spin(registration_node(ros_context, clock=clock, mode='track'))
    scripted = ScriptedTracker()
    node.use_registrar(scripted)
    assert node.wait_idle(MESSAGE_TIMEOUT_S)
    stamp = [1.0]
    points = patch_points(n=300)

    def frame(step_s: float = 0.03) -> tuple[int, int]:
        stamp[0] += step_s
        node.on_points(cloud(points, stamp_ns=int(stamp[0] * 1e9)))
        assert node.wait_idle(SOLVE_TIMEOUT_S)
        return len(scripted.calls), len(scripted.priors)

    assert frame() == (1, 0) and frame() == (1, 1)  # registered, then tracked
    node.on_reset(Trigger.Request(), Trigger.Response())
    assert frame() == (2, 1) and frame() == (2, 2)
    assert node.set_parameters([Parameter('mode', value='single')])[0].successful
    assert node.set_parameters([Parameter('mode', value='track')])[0].successful
    assert frame() == (3, 2)
    assert node.set_parameters([Parameter('registration.gate_max_residual_mm',
                                          value=1.5)])[0].successful
    assert frame() == (4, 2)  # the gates changed: poses accepted under the old ones are void
    assert frame() == (4, 3)
    assert frame(-0.01) == (5, 3)  # a stamp going back is not tracked
    assert frame() == (5, 4)
    assert node.set_parameters([Parameter('track.max_age_s', value=0.1)])[0].successful
    clock.advance(0.2)
    assert frame() == (6, 4)  # the last full registration is too old: re-anchored
    assert node.set_parameters([Parameter('track.max_age_s', value=30.0),
                                Parameter('track.max_gap_s', value=1.0)])[0].successful
    assert frame() == (6, 5)
    clock.advance(1.2)
    assert frame() == (7, 5)  # stamps 30 ms apart, but it arrived 1.2 s after the last one
    assert frame() == (7, 6)
    node.on_register_now(Trigger.Request(), Trigger.Response())
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert (len(scripted.calls), len(scripted.priors)) == (8, 6)  # a full registration
    assert node.n_broadcasts == 14


def test_a_reset_during_a_solve_voids_its_result_and_its_track(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='track'))
    scripted = ScriptedTracker()
    scripted.release.clear()  # the first solve blocks until released
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    waiter = TfWaiter(probe, 'robot', 'bone')
    node.on_points(cloud(patch_points(n=300), stamp_ns=1_000_000_000))
    assert scripted.started.wait(SOLVE_TIMEOUT_S)
    node.on_reset(Trigger.Request(), Trigger.Response())  # while the solve runs
    scripted.release.set()
    # The probe slipped, say: what was computed from the clouds before the reset never goes out.
    status = wait_for_status(diags, 'registration', DiagnosticStatus.WARN, SOLVE_TIMEOUT_S)
    assert status is not None, 'no WARN diagnostic for a voided result'
    assert 'result discarded, no transform broadcast: a reset arrived' in status.message
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 0
    node.on_points(cloud(patch_points(n=300), stamp_ns=1_030_000_000))
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 1
    assert (len(scripted.calls), len(scripted.priors)) == (2, 0)  # registered, not tracked
    assert waiter.wait(SOLVE_TIMEOUT_S) is not None


@pytest.mark.parametrize('name, value', [('robot_frame', 'table'), ('bone_frame', 'femur')])
def test_a_frame_change_during_a_solve_voids_its_result(
        name: str, value: str, ros_context: Any, spin: Callable[[Any], Any],
        probe: Any) -> None:
    """Else it would go out as the old parent -> child beside the new frames' poses."""
    node = spin(registration_node(ros_context, mode='single'))
    scripted = ScriptedTracker()
    scripted.release.clear()  # the first solve blocks until released
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    node.on_points(cloud(patch_points(n=300), frame='robot'))
    assert scripted.started.wait(SOLVE_TIMEOUT_S)
    assert node.set_parameters([Parameter(name, value=value)])[0].successful
    scripted.release.set()
    status = wait_for_status(diags, 'registration', DiagnosticStatus.WARN, SOLVE_TIMEOUT_S)
    assert status is not None, 'no WARN diagnostic for a voided result'
    assert 'a frame change arrived' in status.message
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 0
    # The same parameter set again changes nothing: the next solve stands.
    assert node.set_parameters([Parameter(name, value=value)])[0].successful
    node.on_points(cloud(patch_points(n=300), frame='table' if name == 'robot_frame'
                         else 'robot'))
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 1


def test_a_reset_between_the_solve_and_its_broadcast_voids_it(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    node.use_registrar(ScriptedRegistrar())
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    solve = node.stream.solve

    def solve_then_reset(*args: Any) -> Any:
        outcome = solve(*args)
        node.on_reset(Trigger.Request(), Trigger.Response())  # after the solve's own check
        return outcome
    monkeypatch.setattr(node.stream, 'solve', solve_then_reset)
    node.on_points(cloud(patch_points()))
    status = wait_for_status(diags, 'registration', DiagnosticStatus.WARN, SOLVE_TIMEOUT_S)
    assert status is not None, 'no WARN diagnostic for a result voided before its broadcast'
    assert 'result discarded, no transform broadcast: a reset arrived' in status.message
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 0


def test_the_worker_survives_an_error_while_taking_work(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    merged, failures = node.stream._merged, []

    def merge_fails_once(*args: Any) -> Any:
        if not failures:
            failures.append(1)
            raise MemoryError('scripted: merging the sweep failed')
        return merged(*args)
    monkeypatch.setattr(node.stream, '_merged', merge_fails_once)
    node.on_points(cloud(patch_points()))
    array = diags.wait_for(lambda a: 'merging the sweep failed' in getattr(
        find_status(a, 'registration', level=DiagnosticStatus.ERROR), 'message', ''),
        SOLVE_TIMEOUT_S)
    assert array is not None, 'no ERROR diagnostic for the failed take'
    node.on_points(cloud(patch_points(1), stamp_ns=2_000_000_000))  # the worker goes on
    assert node.stream.wait_for(lambda counts: counts.solves >= 1, SOLVE_TIMEOUT_S)
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 1


@pytest.mark.parametrize('worker_ends', ['during the join', 'after the join timed out'])
def test_destroying_the_node_during_a_solve_is_clean(
        ros_context: Any, monkeypatch: pytest.MonkeyPatch, worker_ends: str) -> None:
    """No exception in any thread, nothing published once destroy_node began, worker joined."""
    monkeypatch.setattr(registration_worker, 'WORKER_JOIN_TIMEOUT_S',
                        SOLVE_TIMEOUT_S if worker_ends == 'during the join' else 0.2)
    errors: list[Any] = []
    monkeypatch.setattr(threading, 'excepthook', errors.append)
    node = registration_node(ros_context, mode='single')
    scripted = ScriptedRegistrar(block=True)
    node.use_registrar(scripted)
    node.on_points(cloud(patch_points()))
    assert scripted.started.wait(SOLVE_TIMEOUT_S), 'the solve never started'
    destroying = threading.Event()
    late: list[Any] = []
    for pub in list(node.publishers):
        def publish(msg: Any, _original: Callable[[Any], None] = pub.publish) -> None:
            if destroying.is_set():
                late.append(msg)
            _original(msg)
        monkeypatch.setattr(pub, 'publish', publish)
    close = node.output.close

    def close_then_release() -> None:  # the solve ends while destroy_node joins the worker
        close()
        if worker_ends == 'during the join':
            scripted.release.set()
    monkeypatch.setattr(node.output, 'close', close_then_release)
    worker = next(t for t in threading.enumerate()
                  if t.name == registration_worker.WORKER_THREAD_NAME)
    destroying.set()
    node.destroy_node()
    scripted.release.set()  # an abandoned solve ends later on its own
    worker.join(SOLVE_TIMEOUT_S)
    assert not worker.is_alive(), 'the worker did not end'
    assert late == [], f'published after destroy_node: {[type(m).__name__ for m in late]}'
    assert errors == [], f'exceptions in threads: {[e.exc_value for e in errors]}'
    assert len(scripted.calls) == 1


# ---------------------------------------------------------------------------- model topic


def test_bad_model_messages_are_reported_and_the_node_keeps_running(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, tmp_path: Path) -> None:
    node = spin(registration_node(ros_context, mode='single'))
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    model_pub = probe.create_publisher(String, '/model', LATCHED_QOS)
    model_pub.publish(String(data='not json'))
    assert diags.wait_for(lambda a: find_status(a, 'model', level=DiagnosticStatus.ERROR)
                          is not None, MESSAGE_TIMEOUT_S) is not None
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'\x00garbage' * 100)
    start = diags.count()
    model_pub.publish(String(data=json.dumps({
        'checkpoint': str(corrupt), 'sha256': 'ab' * 32, 'units': 'mm', 'bone_frame': 'bone',
        'format_version': 1})))
    array = diags.wait_for(
        lambda a: str(corrupt) in getattr(find_status(a, 'model', level=DiagnosticStatus.ERROR),
                                          'message', ''), SOLVE_TIMEOUT_S, start=start)
    assert array is not None, 'no ERROR diagnostic naming the corrupt checkpoint'
    assert 'corrupt' in find_status(array, 'model').message
    assert node.stream.registrar is None
    start = diags.count()  # a bone frame tf cannot take would become the child frame
    model_pub.publish(String(data=json.dumps({
        'checkpoint': str(corrupt), 'sha256': 'ab' * 32, 'units': 'mm',
        'bone_frame': 'b' * 10_000, 'format_version': 1})))
    array = diags.wait_for(lambda a: find_status(a, 'model', level=DiagnosticStatus.ERROR)
                           is not None, MESSAGE_TIMEOUT_S, start=start)
    assert array is not None and "model's bone_frame" in find_status(array, 'model').message
    assert len(find_status(array, 'model').message) <= MAX_MESSAGE_CHARS
    for text, needle in (('[' * 5000, 'nested too deep'), (' ' * 70_000, 'characters')):
        start = diags.count()  # JSON nested past the recursion limit, or far too long
        model_pub.publish(String(data=text))
        array = diags.wait_for(lambda a: needle in getattr(
            find_status(a, 'model', level=DiagnosticStatus.ERROR), 'message', ''),
            MESSAGE_TIMEOUT_S, start=start)
        assert array is not None, f'no ERROR diagnostic saying {needle!r}'
    assert node.set_parameters([Parameter('robot_frame', value='world')])[0].successful
    start = diags.count()  # a model whose bone frame is robot_frame: tf frame -> itself
    model_pub.publish(String(data=json.dumps({
        'checkpoint': str(corrupt), 'sha256': 'ab' * 32, 'units': 'mm',
        'bone_frame': 'world', 'format_version': 1})))
    array = diags.wait_for(lambda a: 'is robot_frame' in getattr(
        find_status(a, 'model', level=DiagnosticStatus.ERROR), 'message', ''),
        MESSAGE_TIMEOUT_S, start=start)
    assert array is not None, "no ERROR diagnostic for a model's bone_frame = robot_frame"
    node.on_points(cloud(patch_points()))  # and the node still takes clouds
    assert node.stream.wait_for(lambda counts: counts.received >= 1, MESSAGE_TIMEOUT_S)


# ---------------------------------------------------------------------------- preop loader


def test_preop_loader_requires_a_mesh_path(ros_context: Any, spin: Callable[[Any], Any]) -> None:
    node = spin(PreopLoader(context=ros_context))
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'mesh_path' in node.failure


@pytest.mark.parametrize('frame', ['bone frame', 'bone\t', '/'])
def test_preop_loader_refuses_a_bone_frame_the_registration_node_would(
        frame: str, ros_context: Any, spin: Callable[[Any], Any]) -> None:
    """Refused at configure, not after minutes of training and an announced model."""
    node = spin(PreopLoader(context=ros_context, parameter_overrides=[
        Parameter('mesh_path', value='phantom'), Parameter('bone_frame', value=frame)]))
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'bone_frame' in node.failure and 'not a tf frame name' in node.failure


def test_preop_loader_reports_a_missing_mesh_and_stays_up(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, tmp_path: Path) -> None:
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    missing = tmp_path / 'no_such_femur.stl'
    node = spin(PreopLoader(context=ros_context, parameter_overrides=[
        Parameter('mesh_path', value=str(missing)), Parameter('cache_dir', value=str(tmp_path))]))
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    array = diags.wait_for(lambda a: find_status(a, 'model', level=DiagnosticStatus.ERROR)
                           is not None, MESSAGE_TIMEOUT_S)
    assert array is not None
    assert str(missing) in find_status(array, 'model').message
    assert not node.ready.is_set()
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS  # still alive


def test_preop_loader_reports_an_unexpected_error_and_stays_up(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from neural_bone_reg import BoneRegistrar

    def out_of_memory(*args: Any, **kwargs: Any) -> None:
        raise MemoryError('scripted: no memory for the UDF')
    monkeypatch.setattr(BoneRegistrar, 'from_mesh', out_of_memory)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    node = spin(PreopLoader(context=ros_context, parameter_overrides=[
        Parameter('mesh_path', value=str(tmp_path / 'femur.stl')),
        Parameter('cache_dir', value=str(tmp_path))]))
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    array = diags.wait_for(lambda a: 'MemoryError' in getattr(
        find_status(a, 'model', level=DiagnosticStatus.ERROR), 'message', ''),
        MESSAGE_TIMEOUT_S)
    assert array is not None, "the status stayed at 'preparing'"
    assert not node.ready.is_set()


# ---------------------------------------------------------------------------- real model


def test_preop_loader_publishes_the_model_latched(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, phantom_cache: Path) -> None:
    configs = small_configs()
    overrides = [Parameter('mesh_path', value='phantom'),
                 Parameter('cache_dir', value=str(phantom_cache)),
                 Parameter('bone_frame', value='femur_ct')]
    overrides += [Parameter(f'udf.{k}', value=v) for k, v in TEST_UDF.items()]
    overrides += [Parameter(f'train.{k}', value=v) for k, v in TEST_TRAIN.items()]
    node = spin(PreopLoader(context=ros_context, parameter_overrides=overrides))
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    assert node.ready.wait(SOLVE_TIMEOUT_S), node.failure
    # Subscribed only now: the latched samples must still arrive.
    models = Collector(probe, String, '/model', LATCHED_QOS)
    surfaces = Collector(probe, PointCloud2, '/bone_surface', LATCHED_QOS)
    msg = models.wait_for(lambda m: True, MESSAGE_TIMEOUT_S)
    assert msg is not None
    info = decode_model_info(msg.data)
    registrar = trained_phantom(phantom_cache)
    assert Path(info.checkpoint) == registrar.checkpoint_path.resolve()
    assert info.sha256 == registrar.geometry_sha256 and info.bone_frame == 'femur_ct'
    surface = surfaces.wait_for(lambda m: True, MESSAGE_TIMEOUT_S)
    assert surface is not None and surface.header.frame_id == 'femur_ct'
    np.testing.assert_allclose(cloud_to_xyz(surface), registrar.surface_points, atol=1e-2)
    assert configs.train.iterations == TEST_TRAIN['iterations']


def test_registration_node_loads_a_mesh_given_by_parameter(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, phantom_cache: Path) -> None:
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    params = {'mesh_path': str(sim.phantom_mesh_path(phantom_cache)),
              'cache_dir': str(phantom_cache), 'mode': 'single'}
    params.update({f'udf.{k}': v for k, v in TEST_UDF.items()})
    params.update({f'train.{k}': v for k, v in TEST_TRAIN.items()})
    node = spin(registration_node(ros_context, **params))
    array = diags.wait_for(lambda a: find_status(a, 'model', level=DiagnosticStatus.OK)
                           is not None, SOLVE_TIMEOUT_S)
    assert array is not None, 'the mesh given by parameter was not loaded from the cache'
    assert 'mesh_path parameter' in find_status(array, 'model').message
    assert node.stream.registrar.checkpoint_path == trained_phantom(phantom_cache).checkpoint_path


def test_real_registration_of_a_posed_phantom_patch_and_of_a_foreign_bone(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any, phantom_cache: Path,
        tmp_path: Path) -> None:
    registrar = trained_phantom(phantom_cache)
    params = {'mode': 'single', 'checkpoint': str(registrar.checkpoint_path), 'preset': 'fast'}
    params.update({f'registration.{k}': v for k, v in TEST_REGISTRATION.items()})
    spin(registration_node(ros_context, **params))
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    rng = np.random.default_rng(7)
    t_robot_bone = sim.random_pose(rng)
    mesh = sim.make_phantom_mesh()
    sweep = np.vstack(sim.simulate_sweep(mesh, rng))
    good_tf = TfWaiter(probe, 'robot', 'bone')
    pub.publish(cloud(apply_transform(t_robot_bone, sweep), frame='robot'))
    transform = good_tf.wait(SOLVE_TIMEOUT_S)
    assert transform is not None, [s.message for a in diags.messages for s in a.status]
    estimate = transform_stamped_to_matrix(transform)
    assert rotation_error_deg(estimate[:3, :3], t_robot_bone[:3, :3]) < 2.0
    assert np.linalg.norm(estimate[:3, 3] - t_robot_bone[:3, 3]) < 2.0
    # A different bone: a sphere-ish blob of the right size is no femur.
    other = np.random.default_rng(1).normal(size=(3000, 3))
    other = 40.0 * other / np.linalg.norm(other, axis=1, keepdims=True)
    foreign_tf = TfWaiter(probe, 'robot_foreign', 'bone')
    pub.publish(cloud(other, frame='robot_foreign'))
    array = diags.wait_for(
        lambda a: find_status(a, 'registration', frame_id='robot_foreign') is not None,
        SOLVE_TIMEOUT_S)
    assert array is not None
    status = find_status(array, 'registration', frame_id='robot_foreign')
    assert status.level in (DiagnosticStatus.WARN, DiagnosticStatus.ERROR), status.message
    assert 'no transform broadcast' in status.message
    assert foreign_tf.latest is None


def test_real_tracking_of_a_moving_phantom(ros_context: Any, spin: Callable[[Any], Any],
                                           probe: Any, phantom_cache: Path) -> None:
    registrar = trained_phantom(phantom_cache)
    params = {'mode': 'track', 'checkpoint': str(registrar.checkpoint_path), 'preset': 'fast',
              'track.max_gap_s': 600.0}  # the first (global) solve may be slow in CI
    params.update({f'registration.{k}': v for k, v in TEST_REGISTRATION.items()})
    node = spin(registration_node(ros_context, **params))
    waiter = TfWaiter(probe, 'robot', 'bone')
    rng = np.random.default_rng(8)
    patch = sim.simulate_partial_cloud(sim.make_phantom_mesh(), rng, n_points=1500)
    t_robot_bone = sim.random_pose(rng)
    centre = apply_transform(t_robot_bone, patch.mean(axis=0)[None])[0]
    for k in range(6):  # the bone turns 1 deg and shifts 1 mm per frame, at 30 Hz
        turn = Rotation.from_rotvec(np.radians([0.0, 1.0, 0.0])).as_matrix()
        step = make_transform(turn, centre - turn @ centre + [1.0, 0.0, 0.0])
        t_robot_bone = step @ t_robot_bone
        centre = centre + [1.0, 0.0, 0.0]
        node.on_points(cloud(apply_transform(t_robot_bone, patch), frame='robot',
                             stamp_ns=int((1.0 + k / 30.0) * 1e9)))
        assert node.wait_idle(SOLVE_TIMEOUT_S)
        result = node.output.last_result
        assert node.n_broadcasts == k + 1, result.rejection_reasons
        assert result.method == ('global' if k == 0 else 'track')
        estimate = invert_transform(result.transform)  # T_robot_bone, as broadcast
        assert rotation_error_deg(estimate[:3, :3], t_robot_bone[:3, :3]) < 1.0
        assert np.linalg.norm(estimate[:3, 3] - t_robot_bone[:3, 3]) < 1.0
    assert node.stream.counts().tracked == 5
    assert waiter.wait(MESSAGE_TIMEOUT_S) is not None, 'nothing on tf'
