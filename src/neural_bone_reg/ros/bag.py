"""Write simulated probe sweeps as rosbag2 bags, and replay bags over rclpy, without rosbag2.

Bags are written with ``rosbags`` (pure Python) in rosbag2 format version 9, as sqlite3 or mcap,
with the metadata and offered QoS that ``ros2 bag play`` reads. Messages are serialised by
rclpy, so their CDR is what a live node would send. Replay publishes the recorded CDR bytes
unchanged, with the recorded timing and QoS.
"""

from __future__ import annotations

import importlib
from pathlib import Path
import threading
import time
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import get_typestore, Stores
from tf2_msgs.msg import TFMessage

from neural_bone_reg.ros.conversions import (DEFAULT_UNIT, matrix_to_transform_stamped,
                                             xyz_to_cloud)
from neural_bone_reg.ros.tf_compat import TF_STATIC_TOPIC

DEFAULT_ROBOT_FRAME = 'robot_base'
DEFAULT_TRUTH_FRAME = 'bone_truth'
DEFAULT_CLOUD_TOPIC = '/us/points'
STORAGES = ('sqlite3', 'mcap')
#: rosbag2 metadata version written (Jazzy and later read it).
BAG_VERSION = 9
#: History depth a typical sensor driver offers on its cloud topic.
CLOUD_QOS_DEPTH = 10
#: Depth and reliability of topics replayed from a bag that recorded no QoS.
DEFAULT_REPLAY_DEPTH = 10
_NS_PER_S = 1e9

_UNSET = QosTime(0, 0)  # rmw's "unspecified": the middleware default (infinite)
#: What tf2_ros.StaticTransformBroadcaster offers: keep last 1, reliable, transient local.
TF_STATIC_BAG_QOS = Qos(QosHistory.KEEP_LAST, 1, QosReliability.RELIABLE,
                        QosDurability.TRANSIENT_LOCAL, _UNSET, _UNSET, QosLiveliness.AUTOMATIC,
                        _UNSET, False)
#: What a cloud driver offers. Reliable publishers also serve best-effort (sensor-data QoS)
#: subscribers, so the replayed topic reaches both kinds.
CLOUD_BAG_QOS = Qos(QosHistory.KEEP_LAST, CLOUD_QOS_DEPTH, QosReliability.RELIABLE,
                    QosDurability.VOLATILE, _UNSET, _UNSET, QosLiveliness.AUTOMATIC, _UNSET,
                    False)

#: ``on_published(topic, bag_timestamp_ns)`` is called after each message is published.
OnPublished = Callable[[str, int], None]


def write_sweep_bag(path: str | Path, clouds_robot: Sequence[np.ndarray],
                    stamps_ns: Sequence[int], T_robot_bone: np.ndarray, *,
                    robot_frame: str = DEFAULT_ROBOT_FRAME,
                    truth_frame: str = DEFAULT_TRUTH_FRAME,
                    cloud_topic: str = DEFAULT_CLOUD_TOPIC, storage: str = 'sqlite3',
                    unit: str = DEFAULT_UNIT) -> Path:
    """Write one probe sweep and its true bone pose as a new rosbag2 directory ``path``.

    ``clouds_robot`` are (N_i, 3) points in ``robot_frame`` and ``T_robot_bone`` the true pose
    (bone -> robot), both in ``unit`` (millimetres by default; the bag holds metres). Each cloud
    becomes a ``sensor_msgs/PointCloud2`` on ``cloud_topic``, stamped and recorded at its
    ``stamps_ns`` (strictly increasing, epoch nanoseconds). The pose becomes one
    ``tf2_msgs/TFMessage`` on ``/tf_static`` (parent ``robot_frame``, child ``truth_frame``),
    recorded 1 ns before the first cloud so that every player sends it first.
    """
    path = Path(path)
    if storage not in STORAGES:
        raise ValueError(f'storage must be one of {STORAGES}, got {storage!r}')
    if len(clouds_robot) != len(stamps_ns) or not clouds_robot:
        raise ValueError(f'need one stamp per cloud and at least one cloud, got '
                         f'{len(clouds_robot)} clouds and {len(stamps_ns)} stamps')
    stamps = [int(s) for s in stamps_ns]
    if stamps[0] < 1 or any(b <= a for a, b in zip(stamps, stamps[1:])):
        raise ValueError('stamps_ns must be positive and strictly increasing nanoseconds')
    if path.exists():
        raise FileExistsError(f'{path} exists already; a bag is written into a new directory')
    truth = matrix_to_transform_stamped(T_robot_bone, robot_frame, truth_frame, stamps[0] - 1,
                                        unit=unit)
    clouds = [serialize_message(xyz_to_cloud(cloud, robot_frame, stamp, unit=unit))
              for cloud, stamp in zip(clouds_robot, stamps)]

    typestore = get_typestore(Stores.ROS2_KILTED)
    with Writer(path, version=BAG_VERSION,
                storage_plugin=StoragePlugin[storage.upper()]) as writer:
        tf_static = writer.add_connection(TF_STATIC_TOPIC, 'tf2_msgs/msg/TFMessage',
                                          typestore=typestore,
                                          offered_qos_profiles=[TF_STATIC_BAG_QOS])
        points = writer.add_connection(cloud_topic, 'sensor_msgs/msg/PointCloud2',
                                       typestore=typestore, offered_qos_profiles=[CLOUD_BAG_QOS])
        writer.write(tf_static, stamps[0] - 1, serialize_message(TFMessage(transforms=[truth])))
        for data, stamp in zip(clouds, stamps):
            writer.write(points, stamp, data)
    return path


def _message_type(name: str) -> type:
    """Import a message class from its ROS name, such as ``sensor_msgs/msg/PointCloud2``."""
    package, kind, message = name.split('/')
    try:
        return getattr(importlib.import_module(f'{package}.{kind}'), message)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f'cannot replay {name}: its Python message package is not '
                         f'importable ({exc})') from exc


def replay_qos(topic: str, offered: Sequence[Qos], message_count: int) -> QoSProfile:
    """Return the QoS to replay ``topic`` with, from the profiles its publishers offered.

    Like ``ros2 bag play``: reliable only if every recorded publisher was, transient local only
    if every one was. A transient-local topic keeps all of its recorded messages, so a late
    joiner gets every static transform, not just the last.
    """
    if not offered:
        if topic == TF_STATIC_TOPIC:
            offered = [TF_STATIC_BAG_QOS]
        else:
            return QoSProfile(depth=DEFAULT_REPLAY_DEPTH)
    reliable = all(q.reliability != QosReliability.BEST_EFFORT for q in offered)
    latched = all(q.durability == QosDurability.TRANSIENT_LOCAL for q in offered)
    keep_all = any(q.history == QosHistory.KEEP_ALL for q in offered)
    depth = max([q.depth for q in offered] + [1])
    if latched:
        depth = max(depth, message_count)
    return QoSProfile(
        history=HistoryPolicy.KEEP_ALL if keep_all else HistoryPolicy.KEEP_LAST,
        depth=depth,
        reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


def play_bag(path: str | Path, *, rate: float = 1.0, topics: Optional[Iterable[str]] = None,
             node: Optional[Node] = None, on_published: Optional[OnPublished] = None,
             loop: bool = False, stop_event: Optional[threading.Event] = None,
             delay_s: float = 0.0) -> int:
    """Publish a bag's messages with their recorded timing and QoS; return how many were sent.

    Reads sqlite3 and mcap rosbag2 bags. Messages go out as the recorded CDR bytes, each at
    ``start + (t - t_first) / rate`` on the monotonic clock, so delays never accumulate.
    ``topics`` limits replay to those topics. Without ``node`` a node of its own is created
    (rclpy must be initialised) and destroyed at the end; with ``node`` the publishers stay on
    it, so that transient-local topics such as ``/tf_static`` still reach late joiners. Stops
    early when ``stop_event`` is set or the context shuts down; ``loop`` repeats until then.
    ``delay_s`` waits after creating the publishers, so that subscribers in other processes
    discover them before the first (volatile) message goes out, as ``ros2 bag play --delay``.
    """
    if not rate > 0.0:
        raise ValueError(f'rate must be positive, got {rate}')
    if not delay_s >= 0.0:
        raise ValueError(f'delay_s must be non-negative, got {delay_s}')
    stop = stop_event if stop_event is not None else threading.Event()
    own_node = node is None
    with Reader(Path(path)) as reader:
        connections = reader.connections
        if topics is not None:
            wanted = set(topics)
            unknown = sorted(wanted - {c.topic for c in connections})
            if unknown:
                raise ValueError(f'bag {path} has no topic(s) {unknown}; it has '
                                 f'{sorted({c.topic for c in connections})}')
            connections = [c for c in connections if c.topic in wanted]
        if not connections:
            return 0
        if own_node:
            node = Node('neural_bone_reg_bag_player')
        try:
            topic_infos = reader.topics
            publishers = {}
            for topic in {c.topic for c in connections}:
                info = topic_infos[topic]
                offered = [q for c in info.connections for q in c.ext.offered_qos_profiles]
                publishers[topic] = node.create_publisher(
                    _message_type(info.msgtype), topic, replay_qos(topic, offered, info.msgcount))
            if delay_s > 0.0 and stop.wait(delay_s):
                return 0
            return _publish_timed(reader, connections, publishers, node, rate, loop, stop,
                                  on_published)
        finally:
            if own_node:
                node.destroy_node()


def _publish_timed(reader: Reader, connections: list, publishers: dict[str, Publisher],
                   node: Node, rate: float, loop: bool, stop: threading.Event,
                   on_published: Optional[OnPublished]) -> int:
    """Publish the messages of ``connections`` on schedule, pass after pass; return the count."""
    count = 0
    while True:
        start = time.monotonic()
        first = None
        for connection, timestamp, data in reader.messages(connections=connections):
            first = timestamp if first is None else first
            delay = start + (timestamp - first) / _NS_PER_S / rate - time.monotonic()
            if (delay > 0.0 and stop.wait(delay)) or stop.is_set() or not node.context.ok():
                return count
            publishers[connection.topic].publish(bytes(data))
            count += 1
            if on_published is not None:
                on_published(connection.topic, timestamp)
        if not loop or first is None:
            return count
