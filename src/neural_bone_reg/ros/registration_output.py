"""What the registration node publishes: accepted poses on tf and bone_pose, and diagnostics.

``RegistrationOutput`` turns a ``core.stream.Outcome`` into messages: for an accepted
result, the transform ``parent -> bone_frame`` on tf stamped with the cloud's stamp, the
cloud in the bone frame on ``registered_points`` and, when the result measured its
covariance, ``bone_pose``; for every outcome, a /diagnostics status with the reason and the
result's numbers. Once :meth:`RegistrationOutput.close` returns, nothing more is published
(a solve that ends while the node is destroyed is dropped, not published on a dead handle).

``bone_pose`` and ``registered_points`` are latched (transient local), so that a planner that
subscribes late still gets the current result. A reset or a new model makes it stale: it is
withdrawn then (:meth:`RegistrationOutput.withdraw`), and a late subscriber gets nothing until
the next accepted result.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, TypeVar

from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseWithCovarianceStamped
import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import PointCloud2

from neural_bone_reg.core.se3 import apply_transform, invert_transform
from neural_bone_reg.core.stream import Outcome
from neural_bone_reg.ros.conversions import (bone_pose_with_covariance,
                                             matrix_to_transform_stamped, to_time_msg,
                                             xyz_to_cloud)
from neural_bone_reg.ros.diagnostics import (diagnostic_array, DIAGNOSTICS_TOPIC, ERROR, OK,
                                             WARN)
from neural_bone_reg.ros.qos import DIAGNOSTICS_QOS, LATCHED_QOS
from neural_bone_reg.ros.tf_compat import make_tf_broadcaster, send_transforms

#: Per-frame log messages are throttled to one per this many seconds.
LOG_THROTTLE_S = 2.0
#: Uncertainty fields of a result reported on /diagnostics (core.registrar.RegistrationResult).
UNCERTAINTY_KEYS = ('bound_mm', 'bound_deg', 'uniqueness_z', 'uniqueness_margin_mm', 'noise_mm')

T = TypeVar('T')


def stamp_text(stamp_ns: int) -> str:
    """Return a stamp in nanoseconds as ``sec.nanosec``, as diagnostics carry it."""
    stamp = to_time_msg(stamp_ns)
    return f'{stamp.sec}.{stamp.nanosec:09d}'


def result_values(outcome: Outcome) -> dict[str, Any]:
    """Return the diagnostic values of a solved outcome (accepted or not)."""
    job, result = outcome.job, outcome.result
    values: dict[str, Any] = {
        'frame_id': job.frame_id, 'bone_frame': outcome.bone_frame,
        'stamp': stamp_text(job.stamp_ns), 'n_points': len(job.points), 'n_slices': job.n_slices}
    if result is None:
        return values
    values.update(method=result.method, accepted=result.accepted,
                  residual_mm=float(result.residual_mm),
                  inlier_fraction=float(result.inlier_fraction),
                  ambiguity=float(result.ambiguity), constraint=float(result.constraint),
                  solve_time_s=float(result.time_s))
    for key in UNCERTAINTY_KEYS:  # uncertainty, accepted or not (inf/nan: not measured)
        values[key] = float(getattr(result, key))
    values['guidance'] = str(result.guidance or '')
    if result.method == 'track':
        values.update(step_deg=float(result.step_deg), step_mm=float(result.step_mm))
    for key, value in dict(result.timings or {}).items():
        # Durations end in _s; the rest (iteration counts, anchors) are published as is.
        values[f'time_{key}' if key.endswith('_s') else key] = float(value)
    return values


class RegistrationOutput:
    """The node's publishers, and the one place that decides what goes out."""

    def __init__(self, node: Node) -> None:
        """Create the publishers on ``node``."""
        self._node = node
        self._lock = threading.Lock()
        self._closed = False
        self._tf_broadcaster = make_tf_broadcaster(node)
        self._registered_pub, self._pose_pub = self._latched_publishers()
        self._latched = False  # whether they hold an accepted result (see withdraw)
        self._diag_pub = node.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC,
                                               DIAGNOSTICS_QOS)
        self.model_status: tuple[bytes, str, dict[str, Any]] = (WARN, 'no model yet', {})
        self.loosened_gates: tuple[str, ...] = ()  # see set_gates
        self.n_broadcasts = 0
        self.n_poses = 0  # bone_pose messages published
        self.last_result: Any = None
        self.last_latency_s = float('nan')

    def _latched_publishers(self) -> tuple[Any, Any]:
        """Create the publishers of registered_points and bone_pose."""
        # A result read once (a planner may subscribe after it): reliable, transient local.
        return (self._node.create_publisher(PointCloud2, 'registered_points', LATCHED_QOS),
                self._node.create_publisher(PoseWithCovarianceStamped, 'bone_pose',
                                            LATCHED_QOS))

    def withdraw(self, change: Callable[[], T], why: str) -> T:
        """Run ``change`` (a reset, a new model) and withdraw the latched result it makes stale.

        A transient-local publisher hands its last message to every late subscriber, and ROS
        has no way to unpublish it: the two latched publishers are replaced, and their history
        goes with the old ones (subscribers match the new ones). ``change`` runs under the
        publish lock, so no broadcast falls between it and the withdrawal.
        """
        with self._lock:
            out = change()
            if self._latched and not self._closed:
                for publisher in (self._registered_pub, self._pose_pub):
                    self._node.destroy_publisher(publisher)
                self._registered_pub, self._pose_pub = self._latched_publishers()
                self._latched = False
                self._node.get_logger().info(f'{why}: the latched bone_pose and '
                                             'registered_points were withdrawn')
        return out

    def close(self) -> None:
        """Publish nothing from now on (waits for a publish in progress)."""
        with self._lock:
            self._closed = True

    def diag(self, component: str, level: bytes, message: str,
             values: dict[str, Any] | None = None) -> None:
        """Publish one status ``<node>: component``; 'model' is also kept for the heartbeat."""
        if component == 'model':
            self.model_status = (level, message, dict(values or {}))
        self._publish_diag(component, level, message, values)

    def set_gates(self, loosened: tuple[str, ...]) -> None:
        """Take the confidence settings looser than calibrated (``core.config.loosened_gates``).

        They are logged as a warning, published as the 'gates' status (WARN while any is
        loosened, repeated by the heartbeat) and named in every registration status, so an
        accepted result shows that it passed gates calibration never validated.
        """
        self.loosened_gates = tuple(loosened)
        if loosened:
            self._node.get_logger().warning(self._gates_message())
        self._publish_gates()

    def _gates_message(self) -> str:
        if not self.loosened_gates:
            return 'confidence gates as calibrated'
        return ('confidence gates looser than calibrated, results they accept were never '
                'validated: ' + '; '.join(self.loosened_gates))

    def _publish_gates(self) -> None:
        self._publish_diag('gates', WARN if self.loosened_gates else OK, self._gates_message(),
                           {'loosened_gates': len(self.loosened_gates)})

    def heartbeat(self, counters: dict[str, Any]) -> None:
        """Repeat the model and gates statuses with the counters, as diagnostic_updater does."""
        level, message, values = self.model_status
        self._publish_diag('model', level, message, {**values, **counters})
        self._publish_gates()

    def _publish_diag(self, component: str, level: bytes, message: str,
                      values: dict[str, Any] | None) -> None:
        with self._lock:
            if not self._closed:
                self._diag_pub.publish(diagnostic_array(self._node, component, level, message,
                                                        values))

    def incompatible_qos(self, info: Any, topic: str, policy: str, reliability: str) -> None:
        """Report publishers whose QoS cannot match the cloud subscription (nothing arrives)."""
        message = (f'{info.total_count_change} publisher(s) on {topic} offer a QoS '
                   f'incompatible with this subscription ({policy} policy; subscription: '
                   f'{reliability}): none of their clouds can arrive; expected reliable '
                   'publishers, or set cloud_qos.reliability to best_effort (which loses large '
                   'clouds)')
        self._node.get_logger().error(message, throttle_duration_sec=LOG_THROTTLE_S)
        self.diag('input', ERROR, message, {'incompatible_publishers': info.total_count})

    def message_lost(self, info: Any) -> None:
        """Report clouds the middleware lost."""
        message = (f'{info.total_count_change} cloud(s) lost in transport ({info.total_count} '
                   'so far); large clouds need cloud_qos.reliability reliable and a reliable '
                   'publisher')
        self._node.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self.diag('input', WARN, message, {'clouds_lost': info.total_count})

    def publish(self, outcome: Outcome, now_s: float,
                commit: Callable[[Outcome, Callable[[], str]], tuple[str, str | None]]) -> None:
        """Publish an outcome; ``now_s`` (the stream's clock) dates its latency.

        ``commit`` (``RegistrationStream.commit``) runs the broadcast under the stream's lock
        unless a voiding change came after the solve.
        """
        logger = self._node.get_logger()
        values = result_values(outcome)
        values['loosened_gates'] = '; '.join(self.loosened_gates) or 'none'
        if outcome.result is None:
            message = f'input rejected, no transform broadcast: {outcome.error}'
            logger.warning(message, throttle_duration_sec=LOG_THROTTLE_S)
            self.diag('registration', ERROR, message, values)
            return
        if outcome.lost:
            logger.info(f'tracking lost ({outcome.lost}); registering from scratch',
                        throttle_duration_sec=LOG_THROTTLE_S)
        if outcome.voided:
            self._discarded(outcome.voided, values)
            return
        result = self.last_result = outcome.result
        if not result.accepted:
            values['rejection_reasons'] = reasons = ('; '.join(result.rejection_reasons)
                                                     or 'confidence gates not met')
            message = f'rejected, no transform broadcast: {reasons}'
            if values['guidance']:
                message += f". Where more data would help: {values['guidance']}"
            logger.warning(message, throttle_duration_sec=LOG_THROTTLE_S)
            self.diag('registration', WARN, message, values)
            return
        with self._lock:
            if self._closed:
                return
            voided, values['bone_pose'] = commit(outcome, lambda: self._send(outcome))
            if not voided:
                self.n_broadcasts += 1
        if voided:
            self._discarded(voided, values)
            return
        self.last_latency_s = values['latency_s'] = now_s - outcome.job.received_s
        message = (f'accepted ({result.method}): {outcome.job.frame_id} -> '
                   f'{outcome.bone_frame} broadcast (residual {result.residual_mm:.2f} mm, '
                   f'inliers {result.inlier_fraction:.2f}, 95 % bounds '
                   f'{values["bound_mm"]:.2f} mm {values["bound_deg"]:.2f} deg, uniqueness z '
                   f'{values["uniqueness_z"]:.1f})')
        logger.info(message, throttle_duration_sec=LOG_THROTTLE_S)
        self.diag('registration', OK, message, values)

    def _discarded(self, voided: str, values: dict[str, Any]) -> None:
        """Say that a result was discarded because a ``voided`` change came while it was made."""
        message = (f'result discarded, no transform broadcast: a {voided} arrived while it was '
                   'computed')
        self._node.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self.diag('registration', WARN, message, values)

    def _send(self, outcome: Outcome) -> str:
        """Send tf, registered_points and bone_pose (the caller holds the lock).

        Return what was done with bone_pose: only a measured covariance is published, so a
        result without one goes on tf alone and bone_pose keeps the last known uncertainty.
        """
        job, result, bone_frame = outcome.job, outcome.result, outcome.bone_frame
        stamp = to_time_msg(job.stamp_ns)  # checked on arrival: it cannot wrap
        t_cloud_bone = invert_transform(np.asarray(result.transform, dtype=np.float64))
        send_transforms(self._tf_broadcaster, [matrix_to_transform_stamped(
            t_cloud_bone, job.frame_id, bone_frame, stamp)])
        self._registered_pub.publish(xyz_to_cloud(
            apply_transform(result.transform, job.points), bone_frame, stamp))
        self._latched = True
        covariance = np.asarray(result.covariance)
        if covariance.shape != (6, 6) or not np.isfinite(covariance).all():
            return 'not published: covariance not measured'
        self._pose_pub.publish(bone_pose_with_covariance(result.transform, covariance,
                                                         job.frame_id, stamp))
        self.n_poses += 1
        return 'published'
