"""tf broadcasting and waiting across nodes over real DDS, in one process."""

import json
from pathlib import Path
import sys
import threading
import time

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, ReliabilityPolicy
from scipy.spatial.transform import Rotation
from tf2_msgs.msg import TFMessage

from neural_bone_reg.ros.conversions import (
    matrix_to_transform_stamped, transform_stamped_to_matrix)
from neural_bone_reg.ros.tf_compat import (
    make_static_tf_broadcaster, make_tf_broadcaster, send_transforms, STATIC_LISTENER_QOS,
    StaticTfBroadcaster, TF_STATIC_TOPIC, TF_TOPIC, TfBroadcaster, TfWaiter)

#: The official type hash of tf2_msgs/msg/TFMessage (ros2/geometry2); real listeners need it.
TF_MESSAGE_HASH = 'RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087'
#: Generous bound on discovery plus delivery on a loaded 2-core machine (s).
RECEIVE_TIMEOUT_S = 10.0
#: Period of the timer that keeps re-sending a dynamic transform until it is received (s).
RESEND_PERIOD_S = 0.05


def _pose(seed):
    transform = np.eye(4)
    transform[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    transform[:3, 3] = np.random.default_rng(seed).uniform(-1.0, 1.0, 3)
    return transform


def _static(seed, child):
    """Return the static transform robot_base -> child of pose ``seed``."""
    return matrix_to_transform_stamped(_pose(seed), 'robot_base', child, 0)


def _wait_until(predicate, timeout_s=RECEIVE_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    idle = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            return False
        idle.wait(RESEND_PERIOD_S)
    return True


def test_generated_tf2_msgs_has_official_type_hash():
    import tf2_msgs.msg

    share = Path(tf2_msgs.__file__).parents[4] / 'share'  # <prefix>/lib/pythonX.Y/site-packages/
    candidates = [share, Path(sys.prefix) / 'share']
    path = next((p / 'tf2_msgs/msg/TFMessage.json' for p in candidates
                 if (p / 'tf2_msgs/msg/TFMessage.json').is_file()), None)
    if path is None:
        pytest.skip('no share/tf2_msgs/msg/TFMessage.json next to tf2_msgs')
    hashes = {entry['type_name']: entry['hash_string']
              for entry in json.loads(path.read_text())['type_hashes']}
    assert hashes['tf2_msgs/msg/TFMessage'] == TF_MESSAGE_HASH


def test_broadcasters_offer_tf2_ros_qos_and_hash(make_node):
    node = make_node('qos_probe')
    make_tf_broadcaster(node)
    make_static_tf_broadcaster(node)

    def info(topic):
        return [i for i in node.get_publishers_info_by_topic(topic) if i.node_name == 'qos_probe']

    assert _wait_until(lambda: info(TF_TOPIC) and info(TF_STATIC_TOPIC))
    dynamic, static = info(TF_TOPIC)[0], info(TF_STATIC_TOPIC)[0]
    assert str(dynamic.topic_type_hash) == TF_MESSAGE_HASH
    assert dynamic.topic_type == 'tf2_msgs/msg/TFMessage'
    assert dynamic.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    assert dynamic.qos_profile.durability == DurabilityPolicy.VOLATILE
    assert static.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    assert static.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL


def test_dynamic_transform_reaches_another_node(make_node):
    pose = _pose(0)
    sender = make_node('tf_sender')
    broadcaster = make_tf_broadcaster(sender)
    msg = matrix_to_transform_stamped(pose, 'robot_base', 'bone', 1_000_000_123)
    # /tf is volatile: keep sending until discovery has matched and one arrives.
    sender.create_timer(RESEND_PERIOD_S, lambda: send_transforms(broadcaster, msg))
    waiter = TfWaiter(make_node('tf_receiver'), 'robot_base', 'bone')

    got = waiter.wait(RECEIVE_TIMEOUT_S)

    assert got is not None
    assert (got.header.stamp.sec, got.header.stamp.nanosec) == (1, 123)
    np.testing.assert_allclose(transform_stamped_to_matrix(got), pose, atol=1e-12)


def test_static_transforms_reach_late_joiners(make_node):
    # Only what every tf2_ros_py version does: each send latches all child frames sent so far.
    broadcaster = make_static_tf_broadcaster(make_node('static_sender'))
    send_transforms(broadcaster, _static(1, 'bone_truth'))
    send_transforms(broadcaster, [_static(2, 'probe')])

    # Created after all sends: only the latched (transient local, depth 1) message can reach it.
    late = make_node('late_joiner')
    received = []
    late.create_subscription(TFMessage, TF_STATIC_TOPIC, received.append, STATIC_LISTENER_QOS)
    truth = TfWaiter(late, 'robot_base', 'bone_truth')
    probe = TfWaiter(late, 'robot_base', 'probe')

    np.testing.assert_allclose(
        transform_stamped_to_matrix(truth.wait(RECEIVE_TIMEOUT_S)), _pose(1), atol=1e-12)
    np.testing.assert_allclose(
        transform_stamped_to_matrix(probe.wait(RECEIVE_TIMEOUT_S)), _pose(2), atol=1e-12)
    assert _wait_until(lambda: received)
    assert sorted(t.child_frame_id for t in received[-1].transforms) == ['bone_truth', 'probe']


def test_fallback_static_broadcaster_keeps_the_first_transform_per_child(make_node):
    # Kilted's tf2_ros_py (geometry2 #634) ignores a later transform for a child frame already
    # sent; the fallback does the same. (Rolling replaces it since geometry2 #820.)
    broadcaster = StaticTfBroadcaster(make_node('fallback_static_sender'))
    broadcaster.send_transform(_static(1, 'bone_truth'))
    broadcaster.sendTransform([_static(2, 'probe'), _static(3, 'bone_truth')])

    late = make_node('fallback_late_joiner')
    received = []
    late.create_subscription(TFMessage, TF_STATIC_TOPIC, received.append, STATIC_LISTENER_QOS)

    assert _wait_until(lambda: received)
    latched = {t.child_frame_id: transform_stamped_to_matrix(t) for t in received[-1].transforms}
    assert sorted(latched) == ['bone_truth', 'probe']
    np.testing.assert_allclose(latched['bone_truth'], _pose(1), atol=1e-12)
    np.testing.assert_allclose(latched['probe'], _pose(2), atol=1e-12)


def test_fallback_broadcasters_offer_tf2_ros_names():
    # Code written against tf2_ros (sendTransform) runs unchanged on the fallback.
    assert TfBroadcaster.sendTransform is TfBroadcaster.send_transform
    assert StaticTfBroadcaster.sendTransform is StaticTfBroadcaster.send_transform


def test_waiter_ignores_other_frames_and_times_out(make_node, ros_executor):
    broadcaster = make_static_tf_broadcaster(make_node('other_sender'))
    send_transforms(broadcaster, matrix_to_transform_stamped(np.eye(4), 'robot_base', 'x', 0))
    node = make_node('patient_waiter')
    other = TfWaiter(node, 'robot_base', 'x')
    assert other.wait(RECEIVE_TIMEOUT_S) is not None
    waiter = TfWaiter(node, 'bone', 'robot_base')  # the inverse direction does not match

    start = time.monotonic()
    assert waiter.wait(0.3) is None
    assert 0.25 < time.monotonic() - start < 5.0

    other.clear()
    assert other.latest is None
    ros_executor.stop()  # destroying while spinning races in rclpy (rclpy#1355)
    other.destroy()


class _CamelCaseBroadcaster:
    """Mimics tf2_ros's broadcaster interface."""

    def __init__(self):
        self.sent = []

    def sendTransform(self, transforms):  # noqa: N802 - tf2_ros's name
        self.sent.append(transforms)


def test_send_transforms_with_tf2_ros_interface():
    fake = _CamelCaseBroadcaster()
    msg = matrix_to_transform_stamped(np.eye(4), 'a', 'b', 0)
    send_transforms(fake, msg)
    send_transforms(fake, (msg, msg))
    assert fake.sent == [[msg], [msg, msg]]
