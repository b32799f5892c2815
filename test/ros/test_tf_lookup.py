"""tf lookups of clouds in another frame than robot_frame (issue 8, item 3).

The node's logic is tested against a stand-in with the ``tf2_ros.Buffer`` interface the node
uses (``lookup_transform(target, source, time, timeout)``, ``can_transform``), which raises
tf2's own exception classes where tf2_ros exists and same-named stand-ins where it does not.
The real Buffer is exercised where tf2_ros is installed.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
import numpy as np
import pytest
from rclpy.duration import Duration
from rclpy.time import Time
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2
from std_srvs.srv import Trigger
from test_nodes import cloud, FAKE_T, patch_points, registration_node, ScriptedRegistrar
from tf2_msgs.msg import TFMessage

from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform
from neural_bone_reg.ros import tf_lookup
from neural_bone_reg.ros.conversions import (matrix_to_transform_stamped,
                                             transform_stamped_to_matrix)
from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS, DIAGNOSTICS_QOS
from neural_bone_reg.ros.tf_compat import DYNAMIC_LISTENER_QOS
from neural_bone_reg.ros.tf_lookup import CloudTransformer, TfLookupError
from ros_test_support import (Collector, find_status, matched_publisher, MESSAGE_TIMEOUT_S,
                              SOLVE_TIMEOUT_S, status_values)

if tf_lookup.tf2_ros is not None:  # the real classes, as the node catches them
    LookupException = tf_lookup.tf2_ros.LookupException
    ConnectivityException = tf_lookup.tf2_ros.ConnectivityException
    ExtrapolationException = tf_lookup.tf2_ros.ExtrapolationException
else:  # same-named stand-ins; the node catches them by its generic fallback
    class LookupException(Exception):  # noqa: N818 - tf2's name
        """Stand-in for tf2.LookupException."""

    class ConnectivityException(Exception):  # noqa: N818 - tf2's name
        """Stand-in for tf2.ConnectivityException."""

    class ExtrapolationException(Exception):  # noqa: N818 - tf2's name
        """Stand-in for tf2.ExtrapolationException."""

_NS = 1_000_000_000
#: The sensor mount: T_robot_camera (mm), a rotation and an offset.
MOUNT = make_transform(Rotation.from_euler('xyz', [30.0, -20.0, 110.0], degrees=True)
                       .as_matrix(), np.array([150.0, -40.0, 620.0]))


class StandInBuffer:
    """The part of ``tf2_ros.Buffer`` the node uses, over scripted transforms.

    ``transforms[(target, source)]`` is a function of the stamp (ns) returning T_target_source
    in mm; stamps outside ``[first_ns, last_ns]`` extrapolate, as tf2 refuses to.
    """

    def __init__(self, first_ns: int = 0, last_ns: int = 10**6 * _NS) -> None:
        self.transforms: dict[tuple[str, str], Callable[[int], np.ndarray]] = {}
        self.first_ns, self.last_ns = first_ns, last_ns
        self.calls: list[tuple[str, str, int, float]] = []
        self.fail_with: BaseException | None = None

    def _check(self, target: str, source: str, time: Any, timeout: Any) -> None:
        assert isinstance(time, Time), f'time must be rclpy.time.Time, got {type(time)}'
        assert isinstance(timeout, Duration), f'timeout must be Duration, got {type(timeout)}'
        if self.fail_with is not None:
            raise self.fail_with
        if (target, source) not in self.transforms:
            raise LookupException(f'"{source}" passed to lookupTransform argument source_frame '
                                  'does not exist. ')
        if not self.first_ns <= time.nanoseconds <= self.last_ns:
            raise ExtrapolationException('Lookup would require extrapolation into the future.')

    def can_transform(self, target: str, source: str, time: Time,
                      timeout: Duration = Duration()) -> bool:
        try:
            self._check(target, source, time, timeout)
        except (LookupException, ExtrapolationException, ConnectivityException):
            return False
        return True

    def lookup_transform(self, target: str, source: str, time: Time,
                         timeout: Duration = Duration()) -> Any:
        self.calls.append((target, source, time.nanoseconds, timeout.nanoseconds / 1e9))
        self._check(target, source, time, timeout)
        return matrix_to_transform_stamped(self.transforms[(target, source)](time.nanoseconds),
                                           target, source, time.nanoseconds)


# ---------------------------------------------------------------------------- unit


def test_lookup_uses_rclpy_time_and_duration_and_returns_mm() -> None:
    buffer = StandInBuffer()
    buffer.transforms[('robot', 'camera')] = lambda ns: MOUNT
    transformer = CloudTransformer(buffer)
    matrix = transformer.lookup_mm('robot', 'camera', 5 * _NS + 7, 0.25)
    np.testing.assert_allclose(matrix, MOUNT, atol=1e-9)
    assert buffer.calls == [('robot', 'camera', 5 * _NS + 7, 0.25)]


@pytest.mark.parametrize('error,name', [
    (LookupException('"camera" passed to lookupTransform does not exist'), 'LookupException'),
    (ConnectivityException('not part of the same tree'), 'ConnectivityException'),
    (ExtrapolationException('extrapolation into the future'), 'ExtrapolationException'),
])
def test_every_tf_failure_becomes_an_explained_lookup_error(error: BaseException,
                                                            name: str) -> None:
    buffer = StandInBuffer()
    buffer.fail_with = error
    with pytest.raises(TfLookupError) as info:
        CloudTransformer(buffer).lookup_mm('robot', 'camera', 3 * _NS, 0.1)
    message = str(info.value)
    assert name in message and str(error) in message
    assert "'camera' -> 'robot'" in message and '3.000000000' in message
    assert 'tf_timeout_s=0.1' in message


def test_without_a_buffer_the_lookup_names_what_is_missing() -> None:
    with pytest.raises(TfLookupError, match=r'tf2_ros is not importable: install ros-.*'
                                            r'-tf2-ros-py, or publish the cloud in robot_frame'):
        CloudTransformer(None).lookup_mm('robot', 'camera', 0, 0.1)


@pytest.mark.skipif(tf_lookup.tf2_ros is not None, reason='tf2_ros is installed here')
def test_without_tf2_ros_the_node_has_no_buffer_and_a_generic_fallback() -> None:
    transformer = CloudTransformer.for_node(None)  # no Buffer is made, so no node is needed
    assert transformer.buffer is None and transformer.errors == (Exception,)


@pytest.mark.skipif(tf_lookup.tf2_ros is None, reason='tf2_ros is not installed (PyPI-only)')
def test_with_tf2_ros_the_node_catches_tf2s_transform_exception(
        ros_context: Any, make_node: Callable[..., Any]) -> None:
    transformer = CloudTransformer.for_node(make_node('tf_lookup_probe'))
    assert transformer.errors == (tf_lookup.tf2_ros.TransformException,)
    with pytest.raises(TfLookupError, match='LookupException'):
        transformer.lookup_mm('robot', 'nowhere', 0, 0.05)


# ---------------------------------------------------------------------------- node


def _tf_node(ros_context: Any, spin: Any, buffer: Any, **params: Any) -> Any:
    node = spin(registration_node(ros_context, robot_frame='robot', **params))
    node.use_tf_buffer(buffer)
    return node


def test_a_cloud_in_another_frame_is_transformed_into_robot_frame_at_its_stamp(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    buffer = StandInBuffer()
    buffer.transforms[('robot', 'camera')] = lambda ns: MOUNT
    node = _tf_node(ros_context, spin, buffer, mode='single', tf_timeout_s=0.3)
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    tf = Collector(probe, TFMessage, '/tf', DYNAMIC_LISTENER_QOS)
    pub = matched_publisher(probe, PointCloud2, '/points', CLOUD_PUBLISHER_QOS)
    points = patch_points(4)
    pub.publish(cloud(points, frame='camera', stamp_ns=7 * _NS))
    msg = tf.wait_for(lambda m: True, SOLVE_TIMEOUT_S)
    assert msg is not None, 'no tf for a cloud in the camera frame'
    sent = msg.transforms[0]
    assert (sent.header.frame_id, sent.child_frame_id) == ('robot', 'bone')
    assert sent.header.stamp.sec == 7
    np.testing.assert_allclose(transform_stamped_to_matrix(sent), invert_transform(FAKE_T),
                               atol=1e-6)
    np.testing.assert_allclose(scripted.calls[0], apply_transform(MOUNT, points), atol=1e-3)
    assert buffer.calls == [('robot', 'camera', 7 * _NS, 0.3)]


def _wait_for_tf_error(diags: Collector, frame: str) -> Any:
    array = diags.wait_for(lambda a: find_status(a, ': tf', frame_id=frame) is not None,
                           SOLVE_TIMEOUT_S)
    assert array is not None, f'no tf diagnostic for the cloud in {frame}'
    return find_status(array, ': tf', frame_id=frame)


def test_a_failed_lookup_is_explained_gives_no_tf_and_the_node_goes_on(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    buffer = StandInBuffer(first_ns=0, last_ns=20 * _NS)
    buffer.transforms[('robot', 'camera')] = lambda ns: MOUNT
    node = _tf_node(ros_context, spin, buffer, mode='single')
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    tf = Collector(probe, TFMessage, '/tf', DYNAMIC_LISTENER_QOS)
    assert diags.wait_for(lambda a: True, MESSAGE_TIMEOUT_S) is not None  # matched
    for frame, stamp_s, needle in (('lidar', 5, 'LookupException'),
                                   ('camera', 30, 'ExtrapolationException')):
        node.on_points(cloud(patch_points(1), frame=frame, stamp_ns=stamp_s * _NS))
        assert node.wait_idle(SOLVE_TIMEOUT_S)
        status = _wait_for_tf_error(diags, frame)
        assert status.level == DiagnosticStatus.ERROR
        assert needle in status.message and 'no transform broadcast' in status.message
        assert status_values(status)['robot_frame'] == 'robot'
    assert scripted.calls == [] and node.n_broadcasts == 0 and node.n_tf_failures == 2
    node.on_points(cloud(patch_points(1), frame='camera', stamp_ns=6 * _NS))
    assert tf.wait_for(lambda m: True, SOLVE_TIMEOUT_S) is not None, 'the node did not go on'
    assert [m.transforms[0].header.stamp.sec for m in tf.messages] == [6]


@pytest.mark.skipif(tf_lookup.tf2_ros is not None, reason='tf2_ros is installed here')
def test_without_tf2_ros_a_cloud_in_another_frame_says_what_is_missing(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    node = spin(registration_node(ros_context, mode='single', robot_frame='robot'))
    node.use_registrar(ScriptedRegistrar())
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    assert diags.wait_for(lambda a: True, MESSAGE_TIMEOUT_S) is not None
    node.on_points(cloud(patch_points(1), frame='camera'))
    status = _wait_for_tf_error(diags, 'camera')
    assert 'tf2_ros is not importable' in status.message and 'tf2-ros-py' in status.message
    node.on_points(cloud(patch_points(1), frame='robot'))  # in robot_frame: no lookup needed
    assert node.wait_idle(SOLVE_TIMEOUT_S) and node.n_broadcasts == 1


def test_each_sweep_slice_is_transformed_at_its_own_stamp(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    """A probe moving through the robot frame: slices only line up with their own stamps."""
    def probe_pose(ns: int) -> np.ndarray:  # T_robot_probe, 10 mm per second along x
        return make_transform(MOUNT[:3, :3], MOUNT[:3, 3] + [10.0 * ns / _NS, 0.0, 0.0])

    buffer = StandInBuffer(first_ns=0, last_ns=200 * _NS)
    buffer.transforms[('robot', 'probe')] = probe_pose
    node = _tf_node(ros_context, spin, buffer, mode='sweep',
                    **{'sweep.min_points': 900, 'sweep.voxel_mm': 0.0, 'sweep.settle_s': 0.0})
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    slices = sim.simulate_sweep(sim.make_phantom_mesh(), np.random.default_rng(0), n_frames=4,
                                points_per_frame=300)
    stamps = [(100 + i) * _NS for i in range(4)]
    for piece, stamp in zip(slices, stamps):  # points in the robot frame -> the probe frame
        node.on_points(cloud(apply_transform(invert_transform(probe_pose(stamp)), piece),
                             frame='probe', stamp_ns=stamp))
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert scripted.calls, 'the sweep was never solved'
    merged = scripted.calls[-1]
    assert len(merged) == 1200  # every slice, each moved by the probe pose at its stamp
    np.testing.assert_allclose(merged, np.concatenate(slices), atol=1e-3)
    assert [call[2] for call in buffer.calls] == stamps
    assert node.n_dropped == 0, 'slices merged into a later solve are not dropped clouds'


def test_a_sweep_slice_whose_lookup_fails_is_left_out_and_explained(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    buffer = StandInBuffer(first_ns=0, last_ns=102 * _NS)
    buffer.transforms[('robot', 'probe')] = lambda ns: MOUNT
    node = _tf_node(ros_context, spin, buffer, mode='sweep',
                    **{'sweep.min_points': 600, 'sweep.voxel_mm': 0.0, 'sweep.settle_s': 0.0})
    scripted = ScriptedRegistrar()
    node.use_registrar(scripted)
    diags = Collector(probe, DiagnosticArray, '/diagnostics', DIAGNOSTICS_QOS)
    assert diags.wait_for(lambda a: True, MESSAGE_TIMEOUT_S) is not None
    slices = sim.simulate_sweep(sim.make_phantom_mesh(), np.random.default_rng(1), n_frames=3,
                                points_per_frame=300)
    for i, stamp_s in enumerate((101, 103, 102)):  # the slice at 103 s extrapolates
        node.on_points(cloud(slices[i], frame='probe', stamp_ns=stamp_s * _NS))
        assert node.wait_idle(SOLVE_TIMEOUT_S)
    status = _wait_for_tf_error(diags, 'probe')
    assert 'ExtrapolationException' in status.message and 'slice' in status.message
    assert len(scripted.calls) == 1 and len(scripted.calls[0]) == 600
    assert node.n_tf_failures == 1


class HeldBuffer(StandInBuffer):
    """A StandInBuffer whose every lookup waits until the test lets it go (a slow tf)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Semaphore(0)
        self.go = threading.Semaphore(0)

    def lookup_transform(self, target: str, source: str, time: Time,
                         timeout: Duration = Duration()) -> Any:
        self.entered.release()
        assert self.go.acquire(timeout=SOLVE_TIMEOUT_S), 'the test never let the lookup go'
        return super().lookup_transform(target, source, time, timeout)


def test_a_reset_stops_the_lookups_of_the_slices_the_worker_holds(
        ros_context: Any, spin: Callable[[Any], Any], probe: Any) -> None:
    """Each held slice's lookup may wait tf_timeout_s: after a reset, none more is made."""
    buffer = HeldBuffer()
    buffer.transforms[('robot', 'probe')] = lambda ns: MOUNT
    node = _tf_node(ros_context, spin, buffer, mode='sweep',
                    **{'sweep.min_points': 10_000, 'sweep.voxel_mm': 0.0})
    node.use_registrar(ScriptedRegistrar())
    slices = [patch_points(seed) for seed in range(5)]
    node.on_points(cloud(slices[0], frame='probe', stamp_ns=100 * _NS))
    assert buffer.entered.acquire(timeout=SOLVE_TIMEOUT_S)  # the worker holds slice 0 ...
    for i in range(1, 5):  # ... while four more wait, to be taken together next
        node.on_points(cloud(slices[i], frame='probe', stamp_ns=(100 + i) * _NS))
    buffer.go.release()
    assert buffer.entered.acquire(timeout=SOLVE_TIMEOUT_S)  # slice 1 of the four is looked up
    node.on_reset(Trigger.Request(), Trigger.Response())
    buffer.go.release()
    assert node.wait_idle(SOLVE_TIMEOUT_S)
    assert [call[2] // _NS for call in buffer.calls] == [100, 101], 'slices 2-4 looked up'
    assert node._worker.counters()['sweep_points'] == 0 and node.n_dropped == 4
