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
result where more data would help (``guidance``). No input can stop the node.

Modes ('sweep', 'single', 'track'), the sweep and the tracking rules (``sweep.*``,
``track.*``) are the core ``RegistrationStream``'s: see ``core.stream``. A cloud in another
frame than ``robot_frame`` is transformed into it at its own stamp (each sweep slice at its
own) with tf2_ros in the worker, waiting at most ``tf_timeout_s``; a failed lookup (or a
missing tf2_ros) is reported on /diagnostics and that cloud gives no transform.

Threading: the subscription callback only converts the cloud (``cloud_input``) and hands it
to the stream; a worker thread (``registration_worker``) transforms and downsamples slices,
loads models and solves, always on the newest data, so the executor never blocks and no
backlog builds up. ``registration_output`` publishes; once the node is being destroyed, it
publishes nothing.

Convention: ``RegistrationResult.transform`` maps cloud points into the bone frame, so it is
T_bone_cloud; the tf transform (parent = cloud/robot frame, child = bone frame) is its inverse.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from typing import Any

from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String
from std_srvs.srv import Trigger

from neural_bone_reg.core.config import loosened_gates
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.runtime import configure_threads
from neural_bone_reg.core.stream import check_mode, Clock, MODES, Registrar, RegistrationStream
from neural_bone_reg.ros import input_checks
from neural_bone_reg.ros import params as ros_params
from neural_bone_reg.ros import registration_worker
from neural_bone_reg.ros.cloud_input import header_values, read_cloud
from neural_bone_reg.ros.diagnostics import cap_text, ERROR, WARN
from neural_bone_reg.ros.model_info import decode_model_info
from neural_bone_reg.ros.node_main import run_node
from neural_bone_reg.ros.qos import cloud_qos, LATCHED_QOS
from neural_bone_reg.ros.registration_output import LOG_THROTTLE_S, RegistrationOutput
from neural_bone_reg.ros.registration_params import (check_frames, checked_choice,
                                                     declare_node_parameters, DEVICES,
                                                     in_use_text, resolve_device)
from neural_bone_reg.ros.registration_worker import ModelJob, RegistrationWorker
from neural_bone_reg.ros.tf_lookup import CloudTransformer

try:  # rclpy >= Iron; Humble has the same classes in rclpy.qos_event
    from rclpy.event_handler import qos_policy_name_from_kind, SubscriptionEventCallbacks
except ImportError:  # pragma: no cover - depends on the ROS distribution
    try:
        from rclpy.qos_event import qos_policy_name_from_kind, SubscriptionEventCallbacks
    except ImportError:
        SubscriptionEventCallbacks = qos_policy_name_from_kind = None

NODE_NAME = 'registration_node'
CONFIG_SECTIONS = ('udf', 'train', 'registration')
STREAM_SECTIONS = ('sweep', 'track')
#: Period of the /diagnostics heartbeat that repeats the model status for late joiners, s.
DIAGNOSTICS_PERIOD_S = 1.0
#: Executor threads of the node's process: clouds in one, everything else beside them.
EXECUTOR_THREADS = 2


class RegistrationNode(Node):
    """Convert clouds for the core stream, whose worker solves; publish accepted poses."""

    def __init__(self, node_name: str = NODE_NAME, *, clock: Clock | None = None,
                 **kwargs: Any) -> None:
        """Declare and validate parameters, create the interfaces and start the worker.

        ``clock`` (seconds) dates arrivals for the tracking and sweep rules; tests pass one
        they move by hand. It defaults to ``time.monotonic``.
        """
        super().__init__(node_name, **kwargs)
        declare_node_parameters(self)
        # udf.* and train.* matter only for the mesh_path model trained at start.
        ros_params.declare_config_parameters(self, STREAM_SECTIONS + CONFIG_SECTIONS,
                                             read_only=('udf', 'train'))
        value = self._value
        # Before any torch work: the inter-op pool can only be sized before it first runs.
        threads = configure_threads(value('threads.intra_op'), value('threads.inter_op'))
        self._cloud_qos = cloud_qos(value('cloud_qos.reliability'), value('cloud_qos.history'),
                                    value('cloud_qos.depth'))
        check_mode(value('mode'))
        device = checked_choice(self, 'device', DEVICES)
        self._preset = value('preset')
        self._configs = ros_params.build_configs(self, CONFIG_SECTIONS, self._preset)
        #: registration.* parameters set at runtime: overrides of the preset whatever their value.
        self._set_at_runtime: set[str] = set()
        sweep, tracking = (ros_params.build_section(self, name) for name in STREAM_SECTIONS)
        check_frames(value('robot_frame'), value('bone_frame'))
        self._max_cloud_points = value('max_cloud_points')
        self.get_logger().info(in_use_text(self, threads, {
            'sweep': sweep, 'track': tracking, 'registration': self._configs.registration}))
        self._stream = RegistrationStream(value('mode'), sweep, tracking,
                                          **({'clock': clock} if clock else {}))
        self._output = RegistrationOutput(self)
        self._output.set_gates(loosened_gates(self._configs.registration))
        self._worker = RegistrationWorker(
            self, self._stream, self._output, configs=self._configs,
            device=resolve_device(device), cache_dir=value('cache_dir') or None)
        self._set_frames(value('robot_frame'), value('bone_frame'), value('tf_timeout_s'))
        self.n_lost = 0  # clouds the middleware reports lost (message_lost events)
        self.n_incompatible = 0  # publishers whose QoS cannot match (incompatible_qos events)
        self.last_input_age_s = float('nan')
        events = {}
        if SubscriptionEventCallbacks is not None:  # unsupported events are skipped by rclpy
            events['event_callbacks'] = SubscriptionEventCallbacks(
                incompatible_qos=self.on_incompatible_qos, message_lost=self.on_message_lost)
        # Clouds in a callback group of their own: converting a large one (up to
        # max_cloud_points) never holds the services, parameters, model or heartbeat, which
        # run beside it under a multi-threaded executor (``main``); clouds stay in order.
        self._points_sub = self.create_subscription(
            PointCloud2, 'points', self.on_points, self._cloud_qos,
            callback_group=MutuallyExclusiveCallbackGroup(), **events)
        self._model_sub = self.create_subscription(String, 'model', self.on_model, LATCHED_QOS)
        self._output.model_status = (
            WARN, f'waiting for a model on {self.resolve_topic_name("model")}', {})
        self._diag_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self.on_diagnostics_timer)
        self._register_srv = self.create_service(Trigger, '~/register_now',
                                                 self.on_register_now)
        self._reset_srv = self.create_service(Trigger, '~/reset', self.on_reset)
        self.add_on_set_parameters_callback(self.on_set_parameters)
        model = ModelJob.from_parameters(value('checkpoint'), value('mesh_path'))
        if model is not None:
            self._load(model)
        self._worker.start()

    def _value(self, name: str) -> Any:
        return self.get_parameter(name).value

    # State read by tests and tools (the stream's counters: ``stream.counts()``).
    stream = property(lambda self: self._stream)
    output = property(lambda self: self._output)
    n_dropped = property(lambda self: self._stream.counts().dropped)
    n_tf_failures = property(lambda self: self._stream.counts().tf_failures)
    n_broadcasts = property(lambda self: self._output.n_broadcasts)

    def _set_frames(self, robot_frame: str, bone_frame: str, tf_timeout_s: float) -> None:
        """Apply the frame parameters; create the tf2_ros Buffer once lookups may be due."""
        worker = self._worker
        worker.robot_frame, worker.bone_frame_param = robot_frame, bone_frame
        worker.tf_timeout_s = tf_timeout_s
        if robot_frame and worker.transformer is None:
            worker.transformer = CloudTransformer.for_node(self)

    def use_tf_buffer(self, buffer: Any) -> None:
        """Look up cloud frames in ``buffer`` (anything with tf2_ros.Buffer's lookup_transform)."""
        self._worker.transformer = CloudTransformer(buffer)

    def on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        """Validate a runtime parameter change as a whole, then apply it."""
        changes = {p.name: p.value for p in parameters}
        worker = self._worker
        robot_frame = changes.get('robot_frame', worker.robot_frame)
        bone_frame = changes.get('bone_frame', worker.bone_frame_param)
        try:
            check_mode(changes.get('mode', MODES[0]))
            check_frames(robot_frame, bone_frame, worker.model_bone_frame)
            configs = ros_params.build_configs(self, CONFIG_SECTIONS, self._preset, changes,
                                               self._set_at_runtime)
            sweep, tracking = (ros_params.build_section(self, name, changes)
                               if any(k.startswith(f'{name}.') for k in changes) else None
                               for name in STREAM_SECTIONS)
        except ValueError as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        if configs.registration != self._configs.registration:
            self._stream.set_registration(configs.registration)
            self._output.set_gates(loosened_gates(configs.registration))
        self._configs = worker.configs = configs
        self._set_at_runtime |= {name for name in changes if name.startswith('registration.')}
        self._stream.configure(changes.get('mode'), sweep, tracking)
        if (robot_frame, bone_frame) != (worker.robot_frame, worker.bone_frame_param):
            self._stream.change_frames()
        self._set_frames(robot_frame, bone_frame, changes.get('tf_timeout_s',
                                                              worker.tf_timeout_s))
        self._max_cloud_points = changes.get('max_cloud_points', self._max_cloud_points)
        self.get_logger().info(f'parameters changed: {changes}')
        return SetParametersResult(successful=True)

    # ----------------------------------------------------------------- callbacks

    def on_points(self, msg: PointCloud2) -> None:
        """Convert one cloud and hand it to the stream (cheap checks only; the worker solves).

        Whatever a message provokes while it is checked and converted, it is refused with an
        ERROR diagnostic and never reaches the solver or tf; the node never dies on input.
        """
        received = self._stream.clock()
        try:
            worker = self._worker
            xyz, parent, stamp_ns, source = read_cloud(
                msg, worker.robot_frame, worker.bone_frame(), self._max_cloud_points,
                worker.max_extent_mm)
            # How old the cloud is on arrival by this node's clock: sensor and transport delay.
            self.last_input_age_s = (self.get_clock().now().nanoseconds - stamp_ns) / 1e9
            self._stream.add_cloud(xyz, parent, stamp_ns, received, source)
        except InputError as exc:
            self._reject_input(msg, str(exc))
        except Exception as exc:  # a message no check foresaw: refuse it, keep running
            self._reject_input(msg, f'cannot read the cloud ({type(exc).__name__}: {exc}); '
                                    'expected a well-formed sensor_msgs/PointCloud2')

    def _reject_input(self, msg: PointCloud2, reason: str) -> None:
        self._stream.reject_input()
        message = cap_text(f'input rejected, no transform broadcast: {reason}')
        self.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._output.diag('input', ERROR, message, header_values(msg))

    def on_incompatible_qos(self, info: Any) -> None:
        """Report a publisher whose QoS cannot match the cloud subscription (nothing arrives)."""
        self.n_incompatible = int(info.total_count)
        policy = (qos_policy_name_from_kind(info.last_policy_kind)
                  if qos_policy_name_from_kind is not None else str(info.last_policy_kind))
        self._output.incompatible_qos(info, self._points_sub.topic_name, policy,
                                      self._value('cloud_qos.reliability'))

    def on_message_lost(self, info: Any) -> None:
        """Count clouds the middleware reports lost, and say so."""
        self.n_lost = int(info.total_count)
        self._output.message_lost(info)

    def on_model(self, msg: String) -> None:
        """Queue the announced checkpoint for loading in the worker."""
        try:
            info = decode_model_info(msg.data)
            input_checks.check_frame_id(info.bone_frame, "the model's bone_frame")
            check_frames(self._worker.robot_frame, self._worker.bone_frame_param,
                         info.bone_frame)
        except Exception as exc:  # ValueError says what is wrong; anything else must not kill
            reason = str(exc) if isinstance(exc, ValueError) else f'{type(exc).__name__}: {exc}'
            self._output.diag('model', ERROR, f'ignored model message: {reason}')
            self.get_logger().error(f'ignored model message: {reason}')
            return
        self.get_logger().info(f'model announced: {info.checkpoint} (mesh sha256 '
                               f'{info.sha256[:12]}, bone_frame {info.bone_frame!r})')
        self._load(ModelJob('checkpoint', path=info.checkpoint, sha256=info.sha256,
                            bone_frame=info.bone_frame, source=f'model topic: {info.checkpoint}'))

    def use_registrar(self, registrar: Registrar, bone_frame: str = '',
                      source: str = 'API') -> None:
        """Hand a ready registrar (a ``core.stream.Registrar``) to the worker."""
        self._load(ModelJob('object', registrar=registrar, bone_frame=bone_frame, source=source))

    def _load(self, job: ModelJob) -> None:
        self._stream.post(functools.partial(self._worker.load_model, job))

    def on_register_now(self, request: Trigger.Request,
                        response: Trigger.Response) -> Trigger.Response:
        """Queue a solve of the current sweep (or the last cloud) now, ignoring min_points."""
        response.success, response.message = self._stream.register_now()
        return response

    def on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        """Drop the accumulated sweep and any queued cloud."""
        response.success = True
        dropped = self._output.withdraw(self._stream.reset, 'reset')
        response.message = f'cleared the sweep and queue ({dropped} points/clouds)'
        self.get_logger().info(response.message)
        return response

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until the worker has nothing queued or running; return False on timeout."""
        return self._stream.wait_idle(timeout_s)

    def on_diagnostics_timer(self) -> None:
        """Repeat the model status, as diagnostic_updater does, for late subscribers."""
        self._output.heartbeat({**self._worker.counters(), 'clouds_lost': self.n_lost,
                                'incompatible_publishers': self.n_incompatible,
                                'last_input_age_s': self.last_input_age_s})

    def destroy_node(self) -> None:
        """Publish nothing more, stop the worker (aborting any training), destroy the node.

        A solve still running after ``WORKER_JOIN_TIMEOUT_S`` cannot be interrupted: it ends
        on its own, and its result is dropped.
        """
        self._output.close()
        if not self._worker.stop(registration_worker.WORKER_JOIN_TIMEOUT_S):
            self.get_logger().warning('the worker is still solving; its result will be dropped')
        super().destroy_node()


def main(args: list[str] | None = None) -> int:
    """Run the registration node until shutdown; return 2 for invalid parameters.

    A solve still running after the worker's join timeout cannot be interrupted; leaving the
    interpreter normally would then abort (std::terminate on torch's joinable threads, exit
    -6), so the process ends at once with its code instead: the solve's result is unwanted.
    """
    code = run_node(RegistrationNode, NODE_NAME, args, threads=EXECUTOR_THREADS)
    if any(t.name == registration_worker.WORKER_THREAD_NAME and t.is_alive()
           for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == '__main__':
    raise SystemExit(main())
