"""Write simulated probe sweeps and RGB-D streams as rosbag2 bags, and replay bags over rclpy.

Bags are written with ``rosbags`` (pure Python) in rosbag2 format version 9, as sqlite3 or mcap,
with the metadata and offered QoS that ``ros2 bag play`` reads. Messages are serialised by
rclpy, so their CDR is what a live node would send. Replay publishes the recorded CDR bytes
unchanged, with the recorded timing and QoS, and optionally ``/clock`` as ``ros2 bag play
--clock`` does (neither needs rosbag2).
"""

from __future__ import annotations

from contextlib import contextmanager
import importlib
from pathlib import Path
import shutil
import threading
import time
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
from rclpy.node import Node
from rclpy.publisher import Publisher
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.interfaces import (Qos, QosDurability, QosHistory, QosLiveliness, QosReliability,
                                QosTime)
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer
from rosbags.rosbag2.writer import CompressionFormat, CompressionMode
from rosbags.typesys import get_typestore, Stores
from sensor_msgs.msg import CameraInfo
from tf2_msgs.msg import TFMessage

from neural_bone_reg.ros.conversions import (DEFAULT_UNIT, matrix_to_transform_stamped,
                                             organized_xyzrgb_cloud, to_time_msg, xyz_to_cloud)
from neural_bone_reg.ros.conversions import pack_rgb  # noqa: F401 - bag.pack_rgb is public
from neural_bone_reg.ros.tf_compat import TF_STATIC_TOPIC, TF_TOPIC

DEFAULT_ROBOT_FRAME = 'robot_base'
DEFAULT_TRUTH_FRAME = 'bone_truth'
DEFAULT_CLOUD_TOPIC = '/us/points'
#: Frame and topics of a RealSense driver with depth aligned to colour (realsense2_camera).
DEFAULT_CAMERA_FRAME = 'camera_color_optical_frame'
DEFAULT_RGBD_TOPIC = '/camera/depth/color/points'
DEFAULT_CAMERA_INFO_TOPIC = '/camera/color/camera_info'
#: ``/clock`` as ``ros2 bag play --clock`` publishes it.
CLOCK_TOPIC = '/clock'
#: Rate of /clock when ``--clock`` is given without a value (ros2bag's play verb: 40 Hz).
DEFAULT_CLOCK_HZ = 40.0
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

#: What tf2_ros.TransformBroadcaster offers on /tf: keep last 100, reliable, volatile.
TF_BAG_QOS = Qos(QosHistory.KEEP_LAST, 100, QosReliability.RELIABLE, QosDurability.VOLATILE,
                 _UNSET, _UNSET, QosLiveliness.AUTOMATIC, _UNSET, False)
#: rclcpp::ClockQoS, what rosbag2's player publishes /clock with: keep last 1, best effort,
#: volatile (rmw_qos_profile_sensor_data with depth 1). rclpy's TimeSource subscribes with
#: depth 1, best effort.
CLOCK_QOS = QoSProfile(depth=1, reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
#: ``on_published(topic, bag_timestamp_ns)`` is called after each message is published.
OnPublished = Callable[[str, int], None]


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """Return the (..., 3) uint8 colours of float32 packed ``rgb`` values (inverse of pack_rgb)."""
    bits = np.ascontiguousarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 0xFF, (bits >> 8) & 0xFF, bits & 0xFF],
                    axis=-1).astype(np.uint8)


def camera_info(width: int, height: int, fx: float, fy: float, cx: float, cy: float,
                frame_id: str, stamp: Any) -> CameraInfo:
    """Return the CameraInfo of a rectified pinhole camera (no distortion, plumb_bob)."""
    msg = CameraInfo()
    msg.header.frame_id = frame_id
    msg.header.stamp = to_time_msg(stamp)
    msg.width, msg.height = int(width), int(height)
    msg.distortion_model = 'plumb_bob'
    msg.d = [0.0] * 5
    msg.k = [float(fx), 0.0, float(cx), 0.0, float(fy), float(cy), 0.0, 0.0, 1.0]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [float(fx), 0.0, float(cx), 0.0, 0.0, float(fy), float(cy), 0.0, 0.0, 0.0, 1.0, 0.0]
    return msg


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
    stamps = _check_stamps(stamps_ns, len(clouds_robot), 'cloud')
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


def _check_stamps(stamps_ns: Sequence[int], count: int, what: str) -> list[int]:
    if len(stamps_ns) != count or not count:
        raise ValueError(f'need one stamp per {what} and at least one {what}, got {count} '
                         f'{what}s and {len(stamps_ns)} stamps')
    stamps = [int(s) for s in stamps_ns]
    if stamps[0] < 1 or any(b <= a for a, b in zip(stamps, stamps[1:])):
        raise ValueError('stamps_ns must be positive and strictly increasing nanoseconds')
    return stamps


class RgbdFrameData(NamedTuple):
    """One RGB-D frame for :func:`write_rgbd_bag`: organized points and colours."""

    points: np.ndarray  # (height, width, 3) in the camera optical frame, NaN where none
    rgb: np.ndarray     # (height, width, 3) uint8


def write_rgbd_bag(path: str | Path, frames: Iterable[RgbdFrameData], stamps_ns: Sequence[int],
                   T_robot_camera: np.ndarray, T_robot_bone: np.ndarray | Sequence[np.ndarray],
                   intrinsics: tuple[int, int, float, float, float, float], *,
                   robot_frame: str = DEFAULT_ROBOT_FRAME,
                   camera_frame: str = DEFAULT_CAMERA_FRAME,
                   truth_frame: str = DEFAULT_TRUTH_FRAME,
                   cloud_topic: str = DEFAULT_RGBD_TOPIC,
                   info_topic: str = DEFAULT_CAMERA_INFO_TOPIC, storage: str = 'sqlite3',
                   compress: bool = False, unit: str = DEFAULT_UNIT) -> Path:
    """Write an RGB-D camera stream and the true bone pose as a new rosbag2 directory ``path``.

    Each frame becomes an organized x y z rgb ``sensor_msgs/PointCloud2`` in ``camera_frame``
    on ``cloud_topic`` and a ``sensor_msgs/CameraInfo`` (``intrinsics`` = width, height, fx,
    fy, cx, cy) on ``info_topic``, stamped and recorded at its ``stamps_ns``. The camera mount
    ``T_robot_camera`` (camera -> robot) goes on ``/tf_static`` (parent ``robot_frame``, child
    ``camera_frame``), recorded 1 ns before the first frame, as a driver's static broadcaster
    would. The truth ``T_robot_bone`` (bone -> robot, child ``truth_frame``) joins it there
    when it is one 4x4 matrix (a still bone); a sequence of one matrix per frame (a moving
    bone) goes on ``/tf`` instead, each stamped and recorded with its frame. Lengths are in
    ``unit`` (mm by default); the bag holds metres. ``frames`` is consumed one at a time, so a
    long stream need not fit in memory; there must be one per stamp. ``compress`` compresses
    each message with zstd (rosbag2's ``--compression-mode message --compression-format
    zstd``, which ``ros2 bag play`` reads): organized clouds are mostly NaN and shrink about
    60-fold. A bag that fails half-way is removed.
    """
    path = Path(path)
    if storage not in STORAGES:
        raise ValueError(f'storage must be one of {STORAGES}, got {storage!r}')
    stamps = _check_stamps(stamps_ns, len(stamps_ns), 'frame')
    truth = np.asarray(T_robot_bone, dtype=np.float64)
    moving = truth.ndim == 3
    if moving and len(truth) != len(stamps):
        raise ValueError(f'T_robot_bone holds {len(truth)} poses for {len(stamps)} frames; '
                         'expected one 4x4 matrix or one per frame')
    if path.exists():
        raise FileExistsError(f'{path} exists already; a bag is written into a new directory')
    width, height, fx, fy, cx, cy = intrinsics
    static = [matrix_to_transform_stamped(T_robot_camera, robot_frame, camera_frame,
                                          stamps[0] - 1, unit=unit)]
    if not moving:
        static.append(matrix_to_transform_stamped(truth, robot_frame, truth_frame,
                                                  stamps[0] - 1, unit=unit))
    dynamic = ([serialize_message(TFMessage(transforms=[matrix_to_transform_stamped(
        pose, robot_frame, truth_frame, stamp, unit=unit)])) for pose, stamp in zip(truth, stamps)]
        if moving else [])
    writer = Writer(path, version=BAG_VERSION, storage_plugin=StoragePlugin[storage.upper()])
    if compress:
        writer.set_compression(CompressionMode.MESSAGE, CompressionFormat.ZSTD)
    try:
        _write_rgbd(writer, frames, stamps, static, dynamic, (width, height, fx, fy, cx, cy),
                    camera_frame, cloud_topic, info_topic, unit)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def _write_rgbd(writer: Writer, frames: Iterable[RgbdFrameData], stamps: list[int],
                static: list, dynamic: list[bytes],
                intrinsics: tuple[int, int, float, float, float, float], camera_frame: str,
                cloud_topic: str, info_topic: str, unit: str) -> None:
    """Write the messages of :func:`write_rgbd_bag` (the caller handles failures)."""
    width, height, fx, fy, cx, cy = intrinsics
    typestore = get_typestore(Stores.ROS2_KILTED)
    with writer:
        tf_static = writer.add_connection(TF_STATIC_TOPIC, 'tf2_msgs/msg/TFMessage',
                                          typestore=typestore,
                                          offered_qos_profiles=[TF_STATIC_BAG_QOS])
        tf = (writer.add_connection(TF_TOPIC, 'tf2_msgs/msg/TFMessage', typestore=typestore,
                                    offered_qos_profiles=[TF_BAG_QOS]) if dynamic else None)
        info = writer.add_connection(info_topic, 'sensor_msgs/msg/CameraInfo',
                                     typestore=typestore, offered_qos_profiles=[CLOUD_BAG_QOS])
        points = writer.add_connection(cloud_topic, 'sensor_msgs/msg/PointCloud2',
                                       typestore=typestore, offered_qos_profiles=[CLOUD_BAG_QOS])
        writer.write(tf_static, stamps[0] - 1, serialize_message(TFMessage(transforms=static)))
        count = 0
        for frame in frames:
            if count == len(stamps):
                raise ValueError(f'got more frames than the {len(stamps)} stamps; expected one '
                                 'per stamp')
            stamp = stamps[count]
            if np.shape(frame.points)[:2] != (height, width):
                raise ValueError(f'frame {count} has shape {np.shape(frame.points)}, which does '
                                 f'not match the camera ({height} x {width})')
            if tf is not None:
                writer.write(tf, stamp, dynamic[count])
            writer.write(info, stamp, serialize_message(
                camera_info(width, height, fx, fy, cx, cy, camera_frame, stamp)))
            writer.write(points, stamp, serialize_message(organized_xyzrgb_cloud(
                frame.points, frame.rgb, camera_frame, stamp, unit=unit)))
            count += 1
        if count != len(stamps):
            raise ValueError(f'got {count} frames for {len(stamps)} stamps; expected one per '
                             'stamp')


@contextmanager
def open_bag(path: str | Path) -> Iterator[Reader]:
    """Open a rosbag2 folder to read; a missing, corrupt or unreadable bag is a ValueError.

    rosbags' own ``ReaderError`` (also raised while messages are read) names no bag; this
    one says which, so the CLI reports it as bad input (exit 2), not as a crash.
    """
    try:
        with Reader(Path(path)) as reader:
            yield reader
    except ReaderError as exc:
        raise ValueError(f'cannot read bag {path}: {exc}') from exc


def deserialized(data: bytes, cls: type, topic: str) -> Any:
    """Return ``data`` of ``topic`` as a ``cls`` message; ValueError naming both otherwise."""
    try:
        return deserialize_message(bytes(data), cls)
    except Exception as exc:  # rclpy raises RMWError, or others, for foreign bytes
        raise ValueError(f'a message on {topic} is not a valid {cls.__name__} '
                         f'({type(exc).__name__}: {exc})') from exc


def _message_type(name: str) -> type:
    """Import a message class from its ROS name, such as ``sensor_msgs/msg/PointCloud2``."""
    parts = name.split('/')
    if len(parts) != 3 or parts[1] != 'msg' or not all(parts):
        raise ValueError(f'cannot replay type {name!r}: expected a ROS 2 message type '
                         "'package/msg/Type'")
    package, kind, message = parts
    try:
        cls = getattr(importlib.import_module(f'{package}.{kind}'), message)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f'cannot replay {name}: its Python message package is not '
                         f'importable ({exc})') from exc
    if not hasattr(cls, '_TYPE_SUPPORT'):
        raise ValueError(f'cannot replay {name}: {package}.{kind}.{message} is not a ROS '
                         'message class')
    return cls


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


class PlayerClock:
    """The player's ROS time, as rosbag2's TimeControllerClock keeps it.

    It runs at ``rate`` times the monotonic clock from a reference (ROS time, steady time);
    :meth:`jump` takes a new reference. ``ros2 bag play`` starts it at the bag's starting
    time when the player is created and jumps back to it when each pass begins.
    """

    def __init__(self, start_ns: int, rate: float) -> None:
        self._lock = threading.Lock()
        self._rate = rate
        self._ros_ns, self._steady_ns = int(start_ns), time.monotonic_ns()

    def jump(self, ros_ns: int) -> int:
        """Make ``ros_ns`` the time now; return the monotonic ns this was taken at."""
        with self._lock:
            self._ros_ns, self._steady_ns = int(ros_ns), time.monotonic_ns()
            return self._steady_ns

    def now_ns(self) -> int:
        """Return the player's ROS time now, in nanoseconds."""
        with self._lock:
            return self._ros_ns + int(self._rate * (time.monotonic_ns() - self._steady_ns))


class _ClockPublisher:
    """Publish ``rosgraph_msgs/Clock`` on /clock at a fixed wall rate, as rosbag2's player.

    The player's timer runs from its creation until it is destroyed, so /clock also ticks
    during ``--delay`` (from the bag's starting time on, then jumping back to it when playback
    begins), as with ``ros2 bag play --clock``.
    """

    def __init__(self, node: Node, clock: PlayerClock, hz: float) -> None:
        from rosgraph_msgs.msg import Clock

        self._message = Clock
        self._publisher = node.create_publisher(Clock, CLOCK_TOPIC, CLOCK_QOS)
        self._clock, self._period_s = clock, 1.0 / hz
        self._node = node
        self._stop = threading.Event()
        self.count = 0
        self._thread = threading.Thread(target=self._run, name='bag_clock', daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_tick = time.monotonic() + self._period_s
        while not self._stop.wait(max(next_tick - time.monotonic(), 0.0)):
            if not self._node.context.ok():
                return
            self._publisher.publish(self._message(clock=to_time_msg(self._clock.now_ns())))
            self.count += 1
            next_tick += self._period_s

    def close(self) -> None:
        """Stop publishing and destroy the publisher."""
        self._stop.set()
        self._thread.join()
        self._node.destroy_publisher(self._publisher)


def play_bag(path: str | Path, *, rate: float = 1.0, topics: Optional[Iterable[str]] = None,
             node: Optional[Node] = None, on_published: Optional[OnPublished] = None,
             loop: bool = False, stop_event: Optional[threading.Event] = None,
             delay_s: float = 0.0, clock_hz: float = 0.0) -> int:
    """Publish a bag's messages with their recorded timing and QoS; return how many were sent.

    Reads sqlite3 and mcap rosbag2 bags. Messages go out as the recorded CDR bytes, each at
    ``start + (t - t_start) / rate`` on the monotonic clock, where ``t_start`` is the bag's
    starting time (its earliest message, whichever topics are replayed, as rosbag2's player
    seeks to it), so delays never accumulate. ``topics`` limits replay to those topics.
    Without ``node`` a node of its own is created (rclpy must be initialised) and destroyed at
    the end; with ``node`` the publishers stay on it, so that transient-local topics such as
    ``/tf_static`` still reach late joiners. Stops early when ``stop_event`` is set or the
    context shuts down; ``loop`` repeats until then. ``delay_s`` waits after creating the
    publishers, so that subscribers in other processes discover them before the first
    (volatile) message goes out, as ``ros2 bag play --delay``; like it, nothing waits for
    subscribers. ``clock_hz`` > 0 publishes ``/clock`` at that wall rate for nodes with
    ``use_sim_time``, as ``ros2 bag play --clock``: the player's time starts at the bag's
    starting time, advances at ``rate``, and the bag's own ``/clock`` is not replayed.
    """
    if not rate > 0.0:
        raise ValueError(f'rate must be positive, got {rate}')
    if not delay_s >= 0.0:
        raise ValueError(f'delay_s must be non-negative, got {delay_s}')
    if not clock_hz >= 0.0:
        raise ValueError(f'clock_hz must be non-negative (0 = no /clock), got {clock_hz}')
    stop = stop_event if stop_event is not None else threading.Event()
    own_node = node is None
    with open_bag(path) as reader:
        connections = reader.connections
        if topics is not None:
            wanted = set(topics)
            unknown = sorted(wanted - {c.topic for c in connections})
            if unknown:
                raise ValueError(f'bag {path} has no topic(s) {unknown}; it has '
                                 f'{sorted({c.topic for c in connections})}')
            connections = [c for c in connections if c.topic in wanted]
        if clock_hz > 0.0:  # ros2 bag play --clock excludes the recorded /clock
            connections = [c for c in connections if c.topic != CLOCK_TOPIC]
        if not connections:
            return 0
        if own_node:
            node = Node('neural_bone_reg_bag_player')
        clock = PlayerClock(reader.start_time, rate)
        ticker = _ClockPublisher(node, clock, clock_hz) if clock_hz > 0.0 else None
        try:
            topic_infos = reader.topics
            publishers = {}
            for topic in {c.topic for c in connections}:
                info = topic_infos[topic]
                offered = [q for c in info.connections for q in c.ext.offered_qos_profiles]
                publishers[topic] = node.create_publisher(
                    _message_type(info.msgtype), topic, replay_qos(topic, offered, info.msgcount))
            return _publish_timed(reader, connections, publishers, node, clock, loop, stop,
                                  on_published, rate, delay_s)
        finally:
            if ticker is not None:
                ticker.close()
            if own_node:
                node.destroy_node()


def _publish_timed(reader: Reader, connections: list, publishers: dict[str, Publisher],
                   node: Node, clock: PlayerClock, loop: bool, stop: threading.Event,
                   on_published: Optional[OnPublished], rate: float, delay_s: float) -> int:
    """Publish the messages of ``connections`` on schedule, pass after pass; return the count.

    Each pass waits ``delay_s``, then restarts the player's clock at the bag's starting time,
    as rosbag2's player does.
    """
    count = 0
    while True:
        if delay_s > 0.0 and stop.wait(delay_s):
            return count
        start_ns = reader.start_time
        start = clock.jump(start_ns) / _NS_PER_S
        sent = 0
        for connection, timestamp, data in reader.messages(connections=connections):
            delay = start + (timestamp - start_ns) / _NS_PER_S / rate - time.monotonic()
            if (delay > 0.0 and stop.wait(delay)) or stop.is_set() or not node.context.ok():
                return count
            publishers[connection.topic].publish(bytes(data))
            count += 1
            sent += 1
            if on_published is not None:
                on_published(connection.topic, timestamp)
        if not loop or not sent:
            return count
