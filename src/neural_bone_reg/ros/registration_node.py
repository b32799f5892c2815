"""ROS 2 node: register intraoperative bone clouds to the preoperative model, broadcast on tf.

Inputs: sensor_msgs/PointCloud2 on the relative topic ``points`` (QoS from the ``cloud_qos.*``
parameters: reliable by default, as large clouds need) and the preop loader's latched
``model`` topic (or the ``checkpoint`` / ``mesh_path`` parameters).
Outputs, ONLY for results that pass every confidence gate: the transform
``robot_frame -> bone_frame`` on tf, stamped with the cloud's header stamp, the same pose with
its covariance on ``bone_pose`` (geometry_msgs/PoseWithCovarianceStamped, metres and radians,
latched) when the result measured one, and the cloud mapped into the bone frame on
``registered_points``. Every outcome, accepted or not, and every rejected input is reported on
/diagnostics with the reason, the result's 95 % bounds and uniqueness, and for a refused
result where more data would help (``guidance``). No input can stop the
node: anything a message provokes while it is read is a rejected input (``input_checks``).

Modes: 'sweep' accumulates the slices of a probe sweep and registers the sweep; 'single'
registers each cloud globally; 'track' registers the first cloud globally, then follows the
bone from frame to frame by local refinement from the last accepted pose (video rate). It
registers globally again whenever a frame fails the gates, the frame or bone changes, a stamp
goes backwards, more than ``track.max_gap_s`` passes between frames, the last global
registration is older than ``track.max_age_s``, and after a reset, ``~/register_now``, or a
mode, model or registration parameter change.

Frames: a cloud whose frame_id differs from ``robot_frame`` is transformed into robot_frame
at its own header stamp with tf2_ros (``tf_lookup``), in the worker, waiting at most
``tf_timeout_s``; each sweep slice is transformed at its own stamp. A failed lookup (or a
missing tf2_ros) is reported on /diagnostics and that cloud gives no transform.

Threading: the subscription callback only converts the cloud and stores it in a depth-1
slot (modes 'single' and 'track') or in a bounded inbox of sweep slices (mode 'sweep'); a
worker thread transforms and downsamples slices into the sweep buffer, loads models and
solves, always on the newest data, so the executor never blocks and no backlog builds up.

Convention: ``RegistrationResult.transform`` maps cloud points into the bone frame, so it is
T_bone_cloud; the tf transform (parent = cloud/robot frame, child = bone frame) is its inverse.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import os
import sys
import threading
import time
from typing import Any, Callable

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String
from std_srvs.srv import Trigger

from neural_bone_reg.core.errors import CheckpointError, InputError
from neural_bone_reg.core.runtime import configure_threads, MAX_THREADS
from neural_bone_reg.core.se3 import apply_transform, invert_transform
from neural_bone_reg.ros import input_checks
from neural_bone_reg.ros import params as ros_params
from neural_bone_reg.ros.conversions import (bone_pose_with_covariance,
                                             matrix_to_transform_stamped, to_time_msg,
                                             xyz_to_cloud)
from neural_bone_reg.ros.diagnostics import (cap_text, diagnostic_array, DIAGNOSTICS_TOPIC,
                                             ERROR, OK, WARN)
from neural_bone_reg.ros.model_info import decode_model_info
from neural_bone_reg.ros.node_main import run_node
from neural_bone_reg.ros.qos import (cloud_qos, DEFAULT_CLOUD_DEPTH, DEFAULT_CLOUD_HISTORY,
                                     DEFAULT_CLOUD_RELIABILITY, DIAGNOSTICS_QOS, LATCHED_QOS,
                                     MAX_CLOUD_DEPTH)
from neural_bone_reg.ros.sweep_buffer import SweepBuffer, voxel_downsample
from neural_bone_reg.ros.tf_compat import make_tf_broadcaster, send_transforms
from neural_bone_reg.ros.tf_lookup import CloudTransformer, TfLookupError

try:  # rclpy >= Iron; Humble has the same classes in rclpy.qos_event
    from rclpy.event_handler import qos_policy_name_from_kind, SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - depends on the ROS distribution
    try:
        from rclpy.qos_event import qos_policy_name_from_kind, SubscriptionEventCallbacks
    except ImportError:
        SubscriptionEventCallbacks = qos_policy_name_from_kind = None

NODE_NAME = 'registration_node'
MODES = ('sweep', 'single', 'track')
DEVICES = ('auto', 'cpu', 'cuda')
CONFIG_SECTIONS = ('udf', 'train', 'registration')
STREAM_SECTIONS = ('sweep', 'track')
#: Per-frame log messages are throttled to one per this many seconds.
LOG_THROTTLE_S = 2.0
#: Seconds the worker is given to finish when the node is destroyed.
WORKER_JOIN_TIMEOUT_S = 5.0
WORKER_THREAD_NAME = 'registration_worker'
#: Period of the /diagnostics heartbeat that repeats the model status for late joiners, s.
DIAGNOSTICS_PERIOD_S = 1.0
#: Uncertainty fields of a result reported on /diagnostics (core.registrar.RegistrationResult).
UNCERTAINTY_KEYS = ('bound_mm', 'bound_deg', 'uniqueness_z', 'uniqueness_margin_mm')
#: Default and largest wait for a tf lookup of a cloud in another frame than robot_frame, s.
DEFAULT_TF_TIMEOUT_S = 0.2
MAX_TF_TIMEOUT_S = 10.0
#: Hard upper bound of the max_cloud_points parameter.
MAX_CLOUD_POINTS_LIMIT = 100_000_000


class _Cancelled(Exception):
    """Raised inside a training progress callback to abort when the node shuts down."""


@dataclass(frozen=True)
class _Job:
    """One registration request: points in ``frame_id`` and where they came from."""

    points: np.ndarray
    frame_id: str
    stamp_ns: int
    received_monotonic: float
    n_slices: int = 1
    source_frame: str = ''
    """Frame the points are in when it is not ``frame_id`` (a tf lookup is due); else ''."""


@dataclass(frozen=True)
class _Slice:
    """One sweep slice as received: in ``source_frame``, for the sweep in ``parent``."""

    points: np.ndarray
    source_frame: str
    parent: str
    stamp_ns: int
    received_monotonic: float


@dataclass(frozen=True)
class _Track:
    """The last accepted pose that the next frame may be tracked from."""

    transform: np.ndarray
    frame_id: str
    bone_frame: str
    stamp_ns: int
    received_monotonic: float
    anchor_monotonic: float
    """When the global registration this track started from was received."""


@dataclass(frozen=True)
class _ModelJob:
    """A model to load in the worker: 'checkpoint' or 'mesh' from a path, or a ready object."""

    kind: str
    path: str = ''
    sha256: str = ''
    bone_frame: str = ''
    registrar: Any = None
    source: str = ''


class RegistrationNode(Node):
    """Register clouds against the bone model in a worker; broadcast only accepted poses."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        """Declare and validate parameters, create the interfaces and start the worker."""
        super().__init__(node_name, **kwargs)
        self._declare_parameters()
        # Before any torch work: the inter-op pool can only be sized before it first runs.
        threads = configure_threads(self.get_parameter('threads.intra_op').value,
                                    self.get_parameter('threads.inter_op').value)
        self._cloud_qos = cloud_qos(self.get_parameter('cloud_qos.reliability').value,
                                    self.get_parameter('cloud_qos.history').value,
                                    self.get_parameter('cloud_qos.depth').value)
        self._mode = self._checked_choice('mode', MODES)
        self._device_name = self._checked_choice('device', DEVICES)
        self._preset = self.get_parameter('preset').value
        self._configs = ros_params.build_configs(self, CONFIG_SECTIONS, self._preset)
        self._device = self._resolve_device(self._device_name)
        self._robot_frame = self.get_parameter('robot_frame').value
        self._bone_frame_param = self.get_parameter('bone_frame').value
        self._check_frames(self._robot_frame, self._bone_frame_param)
        self._max_cloud_points = self.get_parameter('max_cloud_points').value
        self._sweep_min_points = self.get_parameter('sweep.min_points').value
        self._sweep_settle_s = self.get_parameter('sweep.settle_s').value
        self._sweep_max_wait_s = self.get_parameter('sweep.max_wait_s').value
        self._track_max_gap_s = self.get_parameter('track.max_gap_s').value
        self._track_max_age_s = self.get_parameter('track.max_age_s').value
        self._tf_timeout_s = self.get_parameter('tf_timeout_s').value
        self._tf: CloudTransformer | None = None
        self._sweep = self._make_sweep_buffer({})
        self.get_logger().info(
            f'mode={self._mode} device={self._device_name} preset={self._preset} '
            f'robot_frame={self._robot_frame!r} bone_frame={self._bone_frame_param!r} '
            f'max_cloud_points={self._max_cloud_points} sweep.min_points='
            f'{self._sweep_min_points} sweep.max_age_s={self._sweep.max_age_s} '
            f'sweep.voxel_mm={self._sweep.voxel_mm} sweep.max_points={self._sweep.max_points} '
            f'sweep.settle_s={self._sweep_settle_s} sweep.max_wait_s={self._sweep_max_wait_s} '
            f'track.max_gap_s={self._track_max_gap_s} track.max_age_s={self._track_max_age_s} '
            f'tf_timeout_s={self._tf_timeout_s} '
            f'cloud_qos.reliability={self.get_parameter("cloud_qos.reliability").value} '
            f'cloud_qos.history={self.get_parameter("cloud_qos.history").value} '
            f'cloud_qos.depth={self._cloud_qos.depth} '
            f'threads.intra_op={threads[0]} threads.inter_op={threads[1]} (in use)\n'
            + ros_params.format_configs(self._configs, ('registration',)))

        # State shared with the worker, guarded by _cond.
        self._cond = threading.Condition()
        self._stop = False
        self._pending: _Job | None = None
        self._inbox: deque[_Slice] = deque()  # sweep slices the worker has not taken yet
        self._inbox_points = 0
        self._last_job: _Job | None = None
        self._sweep_dirty = False
        self._sweep_force = False
        self._sweep_received = 0.0
        self._sweep_dirty_since = 0.0
        self._model_job: _ModelJob | None = None
        self._pending_registration = None
        self._registrar: Any = None
        self._model_bone_frame = ''
        self._model_source = ''
        self._max_extent_mm = float('inf')
        self._track: _Track | None = None
        # Bumped (under _cond) whenever the track must end: reset, mode, model or config
        # change. A solve stores its pose as the new track only if the epoch did not move.
        self._track_epoch = 0
        self._busy = False
        # Counters, read by tests and diagnostics.
        self.n_received = 0
        self.n_rejected_inputs = 0
        self.n_dropped = 0
        self.n_solves = 0
        self.n_broadcasts = 0
        self.n_poses = 0  # bone_pose messages published
        self.n_tf_failures = 0  # clouds or slices whose tf lookup failed
        self.n_tracked = 0
        self.n_lost = 0  # clouds the middleware reports lost (message_lost events)
        self.n_incompatible = 0  # publishers whose QoS cannot match (incompatible_qos events)
        self.last_result: Any = None
        self.last_latency_s = float('nan')
        self.last_input_age_s = float('nan')

        self._tf_broadcaster = make_tf_broadcaster(self)
        self._registered_pub = self.create_publisher(PointCloud2, 'registered_points',
                                                     LATCHED_QOS)
        # A result read once (a planner may subscribe after it): reliable, transient local.
        self._pose_pub = self.create_publisher(PoseWithCovarianceStamped, 'bone_pose',
                                               LATCHED_QOS)
        self._diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC,
                                               DIAGNOSTICS_QOS)
        events = {}
        if SubscriptionEventCallbacks is not None:  # unsupported events are skipped by rclpy
            events['event_callbacks'] = SubscriptionEventCallbacks(
                incompatible_qos=self.on_incompatible_qos, message_lost=self.on_message_lost)
        self._points_sub = self.create_subscription(PointCloud2, 'points', self.on_points,
                                                    self._cloud_qos, **events)
        self._model_sub = self.create_subscription(String, 'model', self.on_model, LATCHED_QOS)
        self._model_status: tuple[bytes, str, dict[str, Any]] = (
            WARN, f'waiting for a model on {self.resolve_topic_name("model")}', {})
        self._diag_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self.on_diagnostics_timer)
        self._register_srv = self.create_service(Trigger, '~/register_now',
                                                 self.on_register_now)
        self._reset_srv = self.create_service(Trigger, '~/reset', self.on_reset)
        self.add_on_set_parameters_callback(self.on_set_parameters)
        self._ensure_tf()

        checkpoint = self.get_parameter('checkpoint').value
        mesh_path = self.get_parameter('mesh_path').value
        if checkpoint:
            self._model_job = _ModelJob('checkpoint', path=checkpoint,
                                        source=f'checkpoint parameter {checkpoint}')
        elif mesh_path:
            self._model_job = _ModelJob('mesh', path=mesh_path,
                                        source=f'mesh_path parameter {mesh_path}')
        else:
            self.get_logger().info('waiting for a model on the latched topic '
                                   f'{self.resolve_topic_name("model")}')
        self._worker = threading.Thread(target=self._run_worker, name=WORKER_THREAD_NAME,
                                        daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------- parameters

    def _declare_parameters(self) -> None:
        declare = ros_params.declare
        declare(self, 'mode', 'sweep',
                "'sweep': accumulate the slices of a probe sweep and register the sweep; "
                "'single': register each cloud on its own; 'track': register the first cloud, "
                'then follow the bone frame to frame from the last accepted pose (video rate), '
                'falling back to a full registration whenever a frame fails the gates.')
        declare(self, 'robot_frame', '',
                "Parent frame of the broadcast transform; '' uses each cloud's frame_id. "
                'A cloud in another frame is transformed into it at its stamp (tf2_ros).')
        declare(self, 'tf_timeout_s', DEFAULT_TF_TIMEOUT_S,
                'Longest wait for the tf of a cloud in another frame than robot_frame, at the '
                'cloud stamp, s (in the worker); on timeout that cloud gives no transform.',
                value_range=(0.0, MAX_TF_TIMEOUT_S))
        declare(self, 'bone_frame', '',
                "Child frame of the broadcast transform; '' takes the model's bone_frame "
                "(or 'bone' for a model loaded from a parameter).")
        declare(self, 'checkpoint', '',
                'UDF checkpoint to load at start; empty waits for the model topic.',
                read_only=True)
        declare(self, 'mesh_path', '',
                'Bone mesh (mm) to train or load from cache_dir at start, if no checkpoint.',
                read_only=True)
        declare(self, 'cache_dir', '',
                "Checkpoint cache folder for mesh_path; '' uses the package default.",
                read_only=True)
        declare(self, 'device', 'auto', "Torch device: 'auto', 'cpu' or 'cuda'.",
                read_only=True)
        declare(self, 'preset', 'default',
                'Registration preset (default, paper, fast); registration.* parameters left '
                'at their defaults take the preset value.', read_only=True)
        declare(self, 'max_cloud_points', 2_000_000,
                'Clouds with more points (width x height) are rejected before conversion.',
                value_range=(1, MAX_CLOUD_POINTS_LIMIT))
        declare(self, 'cloud_qos.reliability', DEFAULT_CLOUD_RELIABILITY,
                "QoS reliability of the cloud subscription: 'reliable' (matches reliable "
                'publishers only; delivered every cloud up to 24 MB across processes) or '
                "'best_effort' (matches every publisher; across processes Fast DDS delivered "
                'clouds of 0.3 MB but rarely or never larger ones; see the README). Read-only.',
                read_only=True)
        declare(self, 'cloud_qos.history', DEFAULT_CLOUD_HISTORY,
                "QoS history of the cloud subscription: 'keep_last' (cloud_qos.depth clouds) or "
                "'keep_all'. Read-only.", read_only=True)
        declare(self, 'cloud_qos.depth', DEFAULT_CLOUD_DEPTH,
                'QoS depth of the cloud subscription (keep_last): clouds held before the '
                'callback takes them. Read-only.', value_range=(1, MAX_CLOUD_DEPTH),
                read_only=True)
        declare(self, 'threads.intra_op', 0,
                'Torch intra-op threads of the solver; 0 = auto (half the CPUs available, 1-4). '
                'Read-only.', value_range=(0, MAX_THREADS), read_only=True)
        declare(self, 'threads.inter_op', 0,
                'Torch inter-op threads; 0 = auto (1: the solver runs one graph at a time). '
                'Read-only.', value_range=(0, MAX_THREADS), read_only=True)
        ros_params.declare_config_parameters(self, STREAM_SECTIONS + CONFIG_SECTIONS)

    @staticmethod
    def _check_frames(robot_frame: str, bone_frame: str) -> None:
        """Raise ValueError for frame parameters tf cannot take, or a bone frame = robot frame."""
        input_checks.check_frame_id(robot_frame, 'parameter robot_frame')
        input_checks.check_frame_id(bone_frame, 'parameter bone_frame')
        if bone_frame and input_checks.tf_frame(robot_frame) == input_checks.tf_frame(bone_frame):
            raise ValueError(f'parameters robot_frame and bone_frame are both {robot_frame!r}; '
                             'expected different frames (a frame cannot be registered to itself)')

    def _checked_choice(self, name: str, choices: tuple[str, ...]) -> str:
        value = self.get_parameter(name).value
        if value not in choices:
            raise ValueError(f'parameter {name!r} must be one of {choices}, got {value!r}')
        return value

    @staticmethod
    def _resolve_device(name: str) -> str | None:
        if name == 'cuda':
            import torch
            if not torch.cuda.is_available():
                raise ValueError("parameter 'device' is 'cuda' but torch sees no CUDA device")
        return None if name == 'auto' else name

    def _make_sweep_buffer(self, changes: dict[str, Any]) -> SweepBuffer:
        def value(name: str) -> Any:
            return changes[name] if name in changes else self.get_parameter(name).value
        return SweepBuffer(max_age_s=float(value('sweep.max_age_s')),
                           voxel_mm=float(value('sweep.voxel_mm')),
                           max_points=int(value('sweep.max_points')))

    def on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Validate a runtime parameter change as a whole, then apply it."""
        changes = {p.name: p.value for p in parameters}
        try:
            if 'mode' in changes and changes['mode'] not in MODES:
                raise ValueError(f"parameter 'mode' must be one of {MODES}, "
                                 f"got {changes['mode']!r}")
            self._check_frames(changes.get('robot_frame', self._robot_frame),
                               changes.get('bone_frame', self._bone_frame_param))
            configs = ros_params.build_configs(self, CONFIG_SECTIONS, self._preset, changes)
            sweep = (self._make_sweep_buffer(changes)
                     if any(k.startswith('sweep.') for k in changes) else None)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        with self._cond:
            if configs.registration != self._configs.registration:
                self._pending_registration = configs.registration
                self._end_track()  # the track's poses were accepted under the old gates
            self._configs = configs
            if sweep is not None:
                self._sweep = sweep
                self._sweep_dirty = False
            if changes.get('mode', self._mode) != self._mode:
                self._end_track()
            self._mode = changes.get('mode', self._mode)
            self._track_max_gap_s = changes.get('track.max_gap_s', self._track_max_gap_s)
            self._track_max_age_s = changes.get('track.max_age_s', self._track_max_age_s)
            self._robot_frame = changes.get('robot_frame', self._robot_frame)
            self._tf_timeout_s = changes.get('tf_timeout_s', self._tf_timeout_s)
            self._bone_frame_param = changes.get('bone_frame', self._bone_frame_param)
            self._max_cloud_points = changes.get('max_cloud_points', self._max_cloud_points)
            self._sweep_min_points = changes.get('sweep.min_points', self._sweep_min_points)
            self._sweep_settle_s = changes.get('sweep.settle_s', self._sweep_settle_s)
            self._sweep_max_wait_s = changes.get('sweep.max_wait_s', self._sweep_max_wait_s)
            self._cond.notify_all()
        self._ensure_tf()
        self.get_logger().info(f'parameters changed: {changes}')
        return SetParametersResult(successful=True)

    def _ensure_tf(self) -> None:
        """Create the tf2_ros Buffer and listener once a robot_frame asks for lookups."""
        if self._robot_frame and self._tf is None:
            self._tf = CloudTransformer.for_node(self)

    def use_tf_buffer(self, buffer: Any) -> None:
        """Look up cloud frames in ``buffer`` (anything with tf2_ros.Buffer's lookup_transform)."""
        self._tf = CloudTransformer(buffer)

    # ----------------------------------------------------------------- callbacks

    def on_points(self, msg: PointCloud2) -> None:
        """Convert and store one cloud (cheap checks only; the worker solves).

        Whatever a message provokes while it is checked and converted, it is refused with an
        ERROR diagnostic and never reaches the solver or tf; the node never dies on input.
        """
        received = time.monotonic()
        self.n_received += 1
        try:
            xyz, parent, stamp_ns, source = self._read_cloud(msg)
            # How old the cloud is on arrival by this node's clock: sensor and transport delay.
            self.last_input_age_s = (self.get_clock().now().nanoseconds - stamp_ns) / 1e9
            self._store_cloud(xyz, parent, stamp_ns, received, source)
        except InputError as exc:
            self._reject_input(msg, str(exc))
        except Exception as exc:  # a message no check foresaw: refuse it, keep running
            self._reject_input(msg, f'cannot read the cloud ({type(exc).__name__}: {exc}); '
                                    'expected a well-formed sensor_msgs/PointCloud2')

    def _store_cloud(self, xyz: np.ndarray, parent: str, stamp_ns: int, received: float,
                     source: str) -> None:
        """Hand a checked cloud to the worker: the depth-1 slot, or the sweep inbox.

        Nothing costly happens here: tf lookups and voxel downsampling are the worker's. The
        inbox holds at most sweep.max_points points; older slices beyond it are dropped.
        """
        points = xyz.astype(np.float32)
        lookup = source if source != parent else ''
        with self._cond:
            if self._mode != 'sweep':
                if self._pending is not None:
                    self.n_dropped += 1
                self._pending = _Job(points, parent, stamp_ns, received, source_frame=lookup)
                self._last_job = self._pending
            else:
                self._inbox.append(_Slice(points, source, parent, stamp_ns, received))
                self._inbox_points += len(points)
                while len(self._inbox) > 1 and self._inbox_points > self._sweep.max_points:
                    self._inbox_points -= len(self._inbox.popleft().points)
                    self.n_dropped += 1
                self._sweep_received = received
            self._cond.notify_all()

    def _read_cloud(self, msg: PointCloud2) -> tuple[np.ndarray, str, int, str]:
        """Return (points mm, parent frame, stamp ns, cloud frame) of a usable cloud.

        Raises InputError for an unusable one.
        """
        n_declared = int(msg.width) * int(msg.height)
        frame = msg.header.frame_id
        input_checks.check_frame_id(frame)
        if n_declared > self._max_cloud_points:
            raise InputError(f'cloud declares {n_declared} points (width {msg.width} x height '
                             f'{msg.height}), more than max_cloud_points={self._max_cloud_points}'
                             '; rejected before conversion')
        parent = self._robot_frame or frame
        if not parent:
            raise InputError("cloud has an empty frame_id and robot_frame is ''; cannot name "
                             'the parent frame of the transform')
        source = frame or parent  # an empty frame_id is taken to be robot_frame
        stamp_ns = input_checks.check_header(msg, source, self._bone_frame())
        if source != parent:
            input_checks.check_header(msg, parent, self._bone_frame())
        # Messages carry metres (REP 103); the arrays and the core work in mm.
        xyz = input_checks.read_points(msg, source, self._max_extent_mm)
        return xyz, parent, stamp_ns, source

    def on_incompatible_qos(self, info: Any) -> None:
        """Report a publisher whose QoS cannot match the cloud subscription (nothing arrives)."""
        self.n_incompatible = int(info.total_count)
        policy = (qos_policy_name_from_kind(info.last_policy_kind)
                  if qos_policy_name_from_kind is not None else str(info.last_policy_kind))
        message = (f'{info.total_count_change} publisher(s) on '
                   f'{self._points_sub.topic_name} offer a QoS incompatible with this '
                   f'subscription ({policy} policy; subscription: '
                   f'{self.get_parameter("cloud_qos.reliability").value}): none of their clouds '
                   'can arrive; expected reliable publishers, or set cloud_qos.reliability to '
                   'best_effort (which loses large clouds)')
        self.get_logger().error(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._publish_diag('input', ERROR, message, {'incompatible_publishers': info.total_count})

    def on_message_lost(self, info: Any) -> None:
        """Count clouds the middleware reports lost, and say so."""
        self.n_lost = int(info.total_count)
        message = (f'{info.total_count_change} cloud(s) lost in transport ({info.total_count} '
                   'so far); large clouds need cloud_qos.reliability reliable and a reliable '
                   'publisher')
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._publish_diag('input', WARN, message, {'clouds_lost': info.total_count})

    def on_model(self, msg: String) -> None:
        """Queue the announced checkpoint for loading in the worker."""
        try:
            info = decode_model_info(msg.data)
            input_checks.check_frame_id(info.bone_frame, "the model's bone_frame")
        except ValueError as exc:
            self._publish_diag('model', ERROR, f'ignored model message: {exc}')
            self.get_logger().error(f'ignored model message: {exc}')
            return
        self.get_logger().info(f'model announced: {info.checkpoint} (mesh sha256 '
                               f'{info.sha256[:12]}, bone_frame {info.bone_frame!r})')
        with self._cond:
            self._model_job = _ModelJob('checkpoint', path=info.checkpoint, sha256=info.sha256,
                                        bone_frame=info.bone_frame,
                                        source=f'model topic: {info.checkpoint}')
            self._cond.notify_all()

    def use_registrar(self, registrar: Any, bone_frame: str = '', source: str = 'API') -> None:
        """Hand a ready registrar (anything with ``register(points)``) to the worker."""
        with self._cond:
            self._model_job = _ModelJob('object', registrar=registrar, bone_frame=bone_frame,
                                        source=source)
            self._cond.notify_all()

    def on_register_now(self, request: Trigger.Request,
                        response: Trigger.Response) -> Trigger.Response:
        """Queue a solve of the current sweep (or the last cloud) now, ignoring min_points."""
        with self._cond:
            if self._registrar is None and self._model_job is None:
                response.success, response.message = False, 'no model loaded yet'
            elif self._mode != 'sweep':
                if self._last_job is None:
                    response.success, response.message = False, 'no valid cloud received yet'
                else:
                    self._pending = self._last_job
                    self._end_track()  # track mode: a full registration, not a re-track
                    response.success = True
                    response.message = f'queued {len(self._last_job.points)} points'
            elif self._sweep.n_points == 0 and not self._inbox:
                response.success, response.message = False, 'the sweep is empty'
            else:
                self._sweep_dirty = self._sweep_force = True
                response.success = True
                held = self._sweep.n_points + self._inbox_points
                response.message = f'queued the sweep ({held} points)'
            self._cond.notify_all()
        return response

    def on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Drop the accumulated sweep and any queued cloud."""
        with self._cond:
            dropped = (self._sweep.n_points + self._inbox_points
                       + (0 if self._pending is None else 1))
            self._sweep.clear()
            self._inbox.clear()
            self._inbox_points = 0
            self._sweep_dirty = self._sweep_force = False
            self._pending = self._last_job = None
            self._end_track()
        response.success = True
        response.message = f'cleared the sweep and queue ({dropped} points/clouds)'
        self.get_logger().info(response.message)
        return response

    # ----------------------------------------------------------------- worker

    def _work_delay(self) -> float | None:
        """Return seconds until queued work is due (0: now), or None without work."""
        if (self._model_job is not None or self._pending_registration is not None
                or self._inbox):
            return 0.0
        if self._registrar is None:
            return None
        if self._mode != 'sweep':
            return 0.0 if self._pending is not None else None
        if not self._sweep_dirty:
            return None
        if self._sweep_force:
            return 0.0
        due = min(self._sweep_received + self._sweep_settle_s,
                  self._sweep_dirty_since + self._sweep_max_wait_s)
        return max(0.0, due - time.monotonic())

    def _has_work(self) -> bool:
        return self._work_delay() is not None

    def _take_job(self) -> _Job | None:
        """Take the newest work under the lock (the caller holds _cond)."""
        if self._mode != 'sweep':
            job, self._pending = self._pending, None
            return job
        self._sweep_dirty = False
        force, self._sweep_force = self._sweep_force, False
        snap = self._sweep.snapshot()
        if snap is None or (len(snap.points) < self._sweep_min_points and not force):
            return None
        return _Job(snap.points, snap.frame_id, snap.newest_stamp_ns, self._sweep_received,
                    snap.n_slices)

    def _run_worker(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                while not self._stop and self._work_delay() != 0.0:
                    self._cond.wait(self._work_delay())  # None: until notified
                if self._stop:
                    return
                self._busy = True
                slices, self._inbox, self._inbox_points = self._inbox, deque(), 0
                model_job, self._model_job = self._model_job, None
                new_registration, self._pending_registration = self._pending_registration, None
                job = (None if slices or model_job or new_registration  # those first
                       else self._take_job())
                epoch = self._track_epoch  # with the job: a later reset or change voids it
            try:
                if slices:
                    self._add_slices(slices)
                if model_job is not None:
                    self._load_model(model_job)
                if new_registration is not None:  # also after a model load: not dropped
                    self._apply_registration_config(new_registration)
                if job is not None:
                    self._solve(job, epoch)
            except _Cancelled:
                return
            except Exception as exc:  # keep the worker alive whatever the core raises
                with self._cond:
                    self._end_track()
                self.get_logger().error(f'worker error: {type(exc).__name__}: {exc}')
                self._publish_diag('registration', ERROR,
                                   f'internal error: {type(exc).__name__}: {exc}')

    def _add_slices(self, slices: deque[_Slice]) -> None:
        """Transform (tf, at each slice's stamp) and downsample slices into the sweep buffer."""
        for piece in slices:
            points = piece.points
            if piece.source_frame != piece.parent:
                try:
                    points = self._to_parent(points, piece.parent, piece.source_frame,
                                             piece.stamp_ns)
                except TfLookupError as exc:
                    self._report_tf_failure(exc, piece.source_frame, piece.stamp_ns,
                                            'sweep slice left out of the sweep')
                    continue
            points = voxel_downsample(points, self._sweep.voxel_mm)  # outside the lock
            with self._cond:
                if self._sweep.add(points, piece.parent, piece.stamp_ns, presampled=True):
                    self.get_logger().info(f'new sweep in frame {piece.parent!r} (frame change, '
                                           'time jump or gap longer than sweep.max_age_s)')
                due = self._sweep.n_points >= self._sweep_min_points
                if due and not self._sweep_dirty:
                    self._sweep_dirty_since = piece.received_monotonic
                self._sweep_dirty = due or self._sweep_force

    def _to_parent(self, points: np.ndarray, parent: str, source: str,
                   stamp_ns: int) -> np.ndarray:
        """Return ``points`` (mm, in ``source``) in ``parent`` at ``stamp_ns``; TfLookupError."""
        transformer = self._tf or CloudTransformer(None)
        matrix = transformer.lookup_mm(parent, source, stamp_ns, self._tf_timeout_s)
        return apply_transform(matrix, points).astype(np.float32)

    def _report_tf_failure(self, exc: TfLookupError, source: str, stamp_ns: int,
                           outcome: str) -> None:
        with self._cond:
            self.n_tf_failures += 1
            self._end_track()
        stamp = to_time_msg(stamp_ns)
        message = f'{exc}; {outcome}, no transform broadcast'
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._publish_diag('tf', ERROR, message,
                           {'frame_id': source, 'robot_frame': self._robot_frame,
                            'stamp': f'{stamp.sec}.{stamp.nanosec:09d}',
                            'tf_failures': self.n_tf_failures})

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until the worker has nothing queued or running; return False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and not self._has_work(),
                                       timeout=timeout_s)

    def _train_progress(self) -> Callable[[int, int, float], None]:
        def progress(step: int, total: int, loss: float) -> None:
            if self._stop:
                raise _Cancelled()
            self.get_logger().info(f'training UDF: step {step}/{total}, loss {loss:.4g}',
                                   throttle_duration_sec=LOG_THROTTLE_S)
        return progress

    def _load_model(self, job: _ModelJob) -> None:
        from neural_bone_reg import BoneRegistrar

        keeping = f'keeping {self._model_source}' if self._registrar else 'no model loaded'
        started = time.monotonic()
        try:
            if job.kind == 'object':
                registrar = job.registrar
            elif job.kind == 'checkpoint':
                registrar = BoneRegistrar.from_checkpoint(
                    job.path, device=self._device, registration=self._configs.registration)
                if job.sha256 and registrar.geometry_sha256 != job.sha256:
                    raise CheckpointError(
                        f'checkpoint {job.path} is of mesh sha256 '
                        f'{registrar.geometry_sha256[:12]}, but the model message announced '
                        f'{job.sha256[:12]}')
            else:
                cache_dir = self.get_parameter('cache_dir').value or None
                registrar = BoneRegistrar.from_mesh(
                    job.path, device=self._device, cache_dir=cache_dir, configs=self._configs,
                    progress=self._train_progress())
        except (InputError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
            message = f'cannot load model from {job.source}: {exc} ({keeping})'
            self.get_logger().error(message)
            self._publish_diag('model', ERROR, message)
            return
        warm_up = getattr(registrar, 'warm_up', None)
        if warm_up is not None:  # the first real solve then skips torch's start-up
            try:
                self.get_logger().info(f'solver warmed up in {warm_up():.2f} s')
            except (InputError, ValueError, RuntimeError) as exc:
                self.get_logger().warning(f'solver warm-up failed (harmless): {exc}')
        surface = getattr(registrar, 'surface_points', None)
        max_extent_mm = float('inf')
        if surface is not None and len(surface):
            from neural_bone_reg.core.registrar import MAX_CLOUD_TO_BONE_EXTENT
            max_extent_mm = MAX_CLOUD_TO_BONE_EXTENT * float(
                np.linalg.norm(np.ptp(np.asarray(surface), axis=0)))
        with self._cond:
            self._registrar = registrar
            self._max_extent_mm = max_extent_mm
            self._model_bone_frame = job.bone_frame
            self._model_source = job.source
            self._end_track()
            if self._mode == 'sweep' and self._sweep.n_points >= self._sweep_min_points:
                self._sweep_dirty = True
        message = f'model loaded from {job.source} in {time.monotonic() - started:.2f} s'
        self.get_logger().info(message)
        self._publish_diag('model', OK, message,
                           {'checkpoint': getattr(registrar, 'checkpoint_path', ''),
                            'mesh_sha256': getattr(registrar, 'geometry_sha256', '')})

    def _apply_registration_config(self, config: Any) -> None:
        registrar = self._registrar
        if registrar is None or not hasattr(registrar, 'with_config'):
            return
        registrar = registrar.with_config(config)
        with self._cond:
            self._registrar = registrar
            self._end_track()  # also voids a track set between the change and now
        self.get_logger().info('registration config applied:\n'
                               + ros_params.format_configs(self._configs, ('registration',)))

    def _bone_frame(self) -> str:
        return self._bone_frame_param or self._model_bone_frame or 'bone'

    def _solve(self, job: _Job, epoch: int) -> None:
        registrar = self._registrar
        if job.source_frame:  # a cloud in another frame than robot_frame
            try:
                job = _Job(self._to_parent(job.points, job.frame_id, job.source_frame,
                                           job.stamp_ns),
                           job.frame_id, job.stamp_ns, job.received_monotonic, job.n_slices)
            except TfLookupError as exc:
                self._report_tf_failure(exc, job.source_frame, job.stamp_ns, 'cloud not solved')
                return
        stamp = to_time_msg(job.stamp_ns)  # checked on arrival: it cannot wrap
        bone_frame = self._bone_frame()
        context = {'frame_id': job.frame_id, 'bone_frame': bone_frame,
                   'stamp': f'{stamp.sec}.{stamp.nanosec:09d}', 'n_points': len(job.points),
                   'n_slices': job.n_slices}
        with self._cond:
            track = self._usable_track(job, bone_frame) if self._track_epoch == epoch else None
        try:
            result = self._track_or_register(registrar, job, track)
        except InputError as exc:
            with self._cond:
                self._end_track()
                self.n_rejected_inputs += 1
            self.n_solves += 1
            message = f'input rejected, no transform broadcast: {exc}'
            self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
            self._publish_diag('registration', ERROR, message, context)
            return
        self.n_solves += 1
        self.last_result = result
        method = getattr(result, 'method', 'global')
        values = {**context, 'method': method, 'accepted': result.accepted,
                  'residual_mm': float(result.residual_mm),
                  'inlier_fraction': float(result.inlier_fraction),
                  'ambiguity': float(result.ambiguity),
                  'constraint': float(getattr(result, 'constraint', float('nan'))),
                  'solve_time_s': float(getattr(result, 'time_s', float('nan')))}
        for key in UNCERTAINTY_KEYS:  # uncertainty, accepted or not (inf/nan: not measured)
            values[key] = float(getattr(result, key, float('nan')))
        guidance = values['guidance'] = str(getattr(result, 'guidance', '') or '')
        if method == 'track':
            values.update(step_deg=float(result.step_deg), step_mm=float(result.step_mm))
        for key, value in dict(getattr(result, 'timings', {}) or {}).items():
            # Durations end in _s; the rest (iteration counts, anchors) are published as is.
            values[f'time_{key}' if key.endswith('_s') else key] = float(value)
        if result.accepted:
            t_cloud_bone = invert_transform(np.asarray(result.transform, dtype=np.float64))
            send_transforms(self._tf_broadcaster, [matrix_to_transform_stamped(
                t_cloud_bone, job.frame_id, bone_frame, stamp)])
            self._registered_pub.publish(xyz_to_cloud(
                apply_transform(result.transform, job.points), bone_frame, stamp))
            values['bone_pose'] = self._publish_pose(result, job.frame_id, stamp)
            self.n_broadcasts += 1
            self.last_latency_s = time.monotonic() - job.received_monotonic
            values['latency_s'] = self.last_latency_s
            with self._cond:
                if self._mode == 'track' and self._track_epoch == epoch:
                    anchor = (track.anchor_monotonic if method == 'track' and track
                              else job.received_monotonic)
                    self._track = _Track(np.asarray(result.transform, dtype=np.float64),
                                         job.frame_id, bone_frame, job.stamp_ns,
                                         job.received_monotonic, anchor)
            message = (f'accepted ({method}): {job.frame_id} -> {bone_frame} broadcast '
                       f'(residual {result.residual_mm:.2f} mm, inliers '
                       f'{result.inlier_fraction:.2f}, 95 % bounds {values["bound_mm"]:.2f} mm '
                       f'{values["bound_deg"]:.2f} deg, uniqueness z '
                       f'{values["uniqueness_z"]:.1f})')
            self.get_logger().info(message, throttle_duration_sec=LOG_THROTTLE_S)
            self._publish_diag('registration', OK, message, values)
        else:
            with self._cond:
                self._end_track()
            reasons = '; '.join(result.rejection_reasons) or 'confidence gates not met'
            values['rejection_reasons'] = reasons
            message = f'rejected, no transform broadcast: {reasons}'
            if guidance:
                message += f'. Where more data would help: {guidance}'
            self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
            self._publish_diag('registration', WARN, message, values)

    def _publish_pose(self, result: Any, parent: str, stamp: Any) -> str:
        """Publish an accepted result on bone_pose; return what was done, for diagnostics.

        Only a measured covariance is published: a result without one (a registrar that does
        not measure it) goes on tf alone, and bone_pose keeps the last pose whose uncertainty
        is known.
        """
        covariance = np.asarray(getattr(result, 'covariance', np.full((6, 6), np.inf)))
        if covariance.shape != (6, 6) or not np.isfinite(covariance).all():
            return 'not published: covariance not measured'
        self._pose_pub.publish(bone_pose_with_covariance(result.transform, covariance, parent,
                                                         stamp))
        self.n_poses += 1
        return 'published'

    def _end_track(self) -> None:
        """Forget the track and void any solve in flight (the caller holds _cond)."""
        self._track = None
        self._track_epoch += 1

    def _usable_track(self, job: _Job, bone_frame: str) -> _Track | None:
        """Return the track ``job`` may follow, or None (the caller holds _cond).

        Same frames, stamped after the track and within track.max_gap_s of it (by stamp and
        by arrival, so unstamped clouds cannot keep a track alive), and anchored by a full
        registration less than track.max_age_s ago.
        """
        track = self._track if self._mode == 'track' else None
        if track is None:
            return None
        gap_ns = job.stamp_ns - track.stamp_ns
        if (track.frame_id != job.frame_id or track.bone_frame != bone_frame
                or not 0 <= gap_ns <= self._track_max_gap_s * 1e9
                or job.received_monotonic - track.received_monotonic > self._track_max_gap_s
                or job.received_monotonic - track.anchor_monotonic > self._track_max_age_s):
            return None
        return track

    def _track_or_register(self, registrar: Any, job: _Job, track: _Track | None) -> Any:
        """Track ``job`` from ``track`` when given; register it from scratch otherwise.

        A tracked frame that fails the gates (or whose tracking raises anything but a bad-input
        error) is registered from scratch at once, so a lost track costs one global solve and
        never a broadcast of the tracked pose.
        """
        if track is not None and hasattr(registrar, 'track'):
            try:
                result = registrar.track(job.points, track.transform)
            except InputError:
                raise
            except Exception as exc:  # any other failure to track means: register afresh
                result = None
                reasons = f'{type(exc).__name__}: {exc}'
            else:
                reasons = '; '.join(result.rejection_reasons)
            if result is not None and result.accepted:
                self.n_tracked += 1
                return result
            self.get_logger().info(f'tracking lost ({reasons}); registering from scratch',
                                   throttle_duration_sec=LOG_THROTTLE_S)
        return registrar.register(job.points)

    # ----------------------------------------------------------------- helpers

    def _reject_input(self, msg: PointCloud2, reason: str) -> None:
        with self._cond:  # the worker counts rejections too
            self.n_rejected_inputs += 1
        message = cap_text(f'input rejected, no transform broadcast: {reason}')
        try:
            stamp = msg.header.stamp
            values = {'frame_id': msg.header.frame_id,
                      'stamp': f'{stamp.sec}.{stamp.nanosec:09d}',
                      'width': msg.width, 'height': msg.height}
        except Exception:  # the report itself must not fail on a broken header
            values = {}
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._publish_diag('input', ERROR, message, values)

    def on_diagnostics_timer(self) -> None:
        """Repeat the model status, as diagnostic_updater does, for late subscribers."""
        level, message, values = self._model_status
        counters = {'clouds_received': self.n_received, 'inputs_rejected': self.n_rejected_inputs,
                    'clouds_dropped': self.n_dropped, 'solves': self.n_solves,
                    'broadcasts': self.n_broadcasts, 'tracked': self.n_tracked,
                    'clouds_lost': self.n_lost, 'incompatible_publishers': self.n_incompatible,
                    'tf_failures': self.n_tf_failures, 'bone_poses': self.n_poses,
                    'last_input_age_s': self.last_input_age_s,
                    'worker_busy': self._busy,
                    'sweep_points': self._sweep.n_points}
        self._diag_pub.publish(diagnostic_array(self, 'model', level, message,
                                                {**values, **counters}))

    def _publish_diag(self, component: str, level: bytes, message: str,
                      values: dict[str, Any] | None = None) -> None:
        if component == 'model':
            self._model_status = (level, message, dict(values or {}))
        self._diag_pub.publish(diagnostic_array(self, component, level, message, values))

    def destroy_node(self) -> None:
        """Stop the worker (aborting any training), then destroy the node."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._worker.is_alive() and self._worker is not threading.current_thread():
            self._worker.join(WORKER_JOIN_TIMEOUT_S)
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the registration node until shutdown; return 2 for invalid parameters.

    A solve still running after the worker's join timeout cannot be interrupted; leaving the
    interpreter normally would then abort (std::terminate on torch's joinable threads, exit
    -6), so the process ends at once with its code instead: the solve's result is unwanted.
    """
    code = run_node(RegistrationNode, NODE_NAME, args)
    if any(t.name == WORKER_THREAD_NAME and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == '__main__':
    raise SystemExit(main())
