"""tf broadcasting and a minimal tf wait that work with or without tf2_ros.

tf2_ros is not on PyPI, so where it is missing the broadcasters here publish
``tf2_msgs/TFMessage`` themselves, on the same topics, with the same QoS and the same
semantics as tf2_ros_py of ROS 2 Kilted, the distribution this package targets, so that real
tf2 listeners (rviz, MoveIt, ``tf2_echo``) receive them unchanged. Use
:func:`send_transforms` to send through either kind.
"""

from __future__ import annotations

import threading
from typing import Iterable, Optional, Union

from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile
from tf2_msgs.msg import TFMessage

from neural_bone_reg.ros.qos import reliable_qos

try:  # Real ROS 2 installs have it; the PyPI wheels do not.
    import tf2_ros
except ImportError:  # pragma: no cover - depends on the installation
    tf2_ros = None

TF_TOPIC = '/tf'
TF_STATIC_TOPIC = '/tf_static'
#: tf2_ros's DynamicBroadcasterQoS and DynamicListenerQoS: keep last 100, reliable, volatile.
DYNAMIC_BROADCASTER_QOS = DYNAMIC_LISTENER_QOS = reliable_qos(100, DurabilityPolicy.VOLATILE)
#: tf2_ros's StaticBroadcasterQoS: keep last 1, reliable, transient local (latched).
STATIC_BROADCASTER_QOS = reliable_qos(1, DurabilityPolicy.TRANSIENT_LOCAL)
#: tf2_ros's StaticListenerQoS: keep last 100, reliable, transient local.
STATIC_LISTENER_QOS = reliable_qos(100, DurabilityPolicy.TRANSIENT_LOCAL)

Transforms = Union[TransformStamped, Iterable[TransformStamped]]


def _as_list(transforms: Transforms) -> list[TransformStamped]:
    if isinstance(transforms, TransformStamped):
        return [transforms]
    return list(transforms)


class TfBroadcaster:
    """Publish transforms on ``/tf`` as ``tf2_ros.TransformBroadcaster`` does."""

    def __init__(self, node: Node, qos: QoSProfile = DYNAMIC_BROADCASTER_QOS) -> None:
        self._publisher = node.create_publisher(TFMessage, TF_TOPIC, qos)

    def send_transform(self, transforms: Transforms) -> None:
        """Publish one transform or several in one TFMessage."""
        self._publisher.publish(TFMessage(transforms=_as_list(transforms)))

    sendTransform = send_transform  # noqa: N815 - tf2_ros's name, so callers need not care


class StaticTfBroadcaster:
    """Latch transforms on ``/tf_static`` as Kilted's ``tf2_ros.StaticTransformBroadcaster``.

    With depth 1 only the last message is kept for late joiners, so every message carries all
    static transforms sent so far, one per child frame. As in tf2_ros_py since geometry2 #634
    (Jazzy, Kilted), the *first* transform sent for a child frame is kept and later ones for
    that child frame are ignored: static transforms are immutable (geometry2 #704, #705).
    Rolling's tf2_ros_py replaces them instead since #820 (August 2025, after Kilted branched).
    Code that must run on either sends each child frame once, and puts transforms that change
    on ``/tf``.
    """

    def __init__(self, node: Node, qos: QoSProfile = STATIC_BROADCASTER_QOS) -> None:
        self._publisher = node.create_publisher(TFMessage, TF_STATIC_TOPIC, qos)
        self._by_child: dict[str, TransformStamped] = {}

    def send_transform(self, transforms: Transforms) -> None:
        """Add transforms for child frames not sent before; publish all static transforms.

        A transform for a child frame already sent is ignored, as tf2_ros_py does in Kilted.
        """
        for transform in _as_list(transforms):
            self._by_child.setdefault(transform.child_frame_id, transform)
        self._publisher.publish(TFMessage(transforms=list(self._by_child.values())))

    sendTransform = send_transform  # noqa: N815 - tf2_ros's name, so callers need not care


def make_tf_broadcaster(node: Node):
    """Return ``tf2_ros.TransformBroadcaster(node)`` where tf2_ros exists, else a TfBroadcaster."""
    if tf2_ros is not None:
        return tf2_ros.TransformBroadcaster(node)
    return TfBroadcaster(node)


def make_static_tf_broadcaster(node: Node):
    """Return tf2_ros's StaticTransformBroadcaster or, without tf2_ros, a StaticTfBroadcaster."""
    if tf2_ros is not None:
        return tf2_ros.StaticTransformBroadcaster(node)
    return StaticTfBroadcaster(node)


def send_transforms(broadcaster, transforms: Transforms) -> None:
    """Send one or more TransformStamped through a tf2_ros or a fallback broadcaster."""
    transforms = _as_list(transforms)
    if hasattr(broadcaster, 'send_transform'):
        broadcaster.send_transform(transforms)
    else:
        broadcaster.sendTransform(transforms)


class TfWaiter:
    """Wait for the transform ``parent -> child`` to appear on ``/tf`` or ``/tf_static``.

    A minimal listener for tests and the demo: it subscribes to both topics with tf2_ros's
    listener QoS and keeps the newest transform whose header frame is ``parent`` and whose
    child frame is ``child``. Chains through other frames are not resolved. The node must be
    spun by an executor (in another thread) for :meth:`wait` to see anything.
    """

    def __init__(self, node: Node, parent: str, child: str) -> None:
        self._node = node
        self._parent = parent.lstrip('/')
        self._child = child.lstrip('/')
        self._lock = threading.Lock()
        self._latest: Optional[TransformStamped] = None
        self._received = threading.Event()
        self._subscriptions = [
            node.create_subscription(TFMessage, TF_TOPIC, self.on_tf, DYNAMIC_LISTENER_QOS),
            node.create_subscription(TFMessage, TF_STATIC_TOPIC, self.on_tf,
                                     STATIC_LISTENER_QOS),
        ]

    def on_tf(self, msg: TFMessage) -> None:
        """Keep the newest matching transform of a TFMessage."""
        for transform in msg.transforms:
            if (transform.header.frame_id.lstrip('/') == self._parent
                    and transform.child_frame_id.lstrip('/') == self._child):
                with self._lock:
                    self._latest = transform
                    self._received.set()

    @property
    def latest(self) -> Optional[TransformStamped]:
        """Return the newest matching transform received so far, or None."""
        with self._lock:
            return self._latest

    def wait(self, timeout_s: float) -> Optional[TransformStamped]:
        """Return the newest matching transform, waiting up to ``timeout_s`` for a first one."""
        self._received.wait(timeout_s)
        return self.latest

    def clear(self) -> None:
        """Forget what was received, so that :meth:`wait` waits for the next transform."""
        with self._lock:
            self._latest = None
            self._received.clear()

    def destroy(self) -> None:
        """Destroy the subscriptions (the node stays)."""
        for subscription in self._subscriptions:
            self._node.destroy_subscription(subscription)
        self._subscriptions = []
