"""ROS 2 lifecycle node: prepare the preoperative bone model and announce it on latched topics.

on_configure checks the parameters, creates the publishers and starts a worker thread that
trains the bone's neural distance field (or loads it from ``cache_dir``); the executor never
waits on it and progress is logged (throttled) and published on /diagnostics. Once the model
is ready and the node is active, it publishes on latched topics (reliable, transient local,
depth 1):

* ``model`` (std_msgs/String): JSON ``{checkpoint, sha256, units: 'mm', bone_frame,
  format_version}`` that the registration node loads;
* ``bone_surface`` (sensor_msgs/PointCloud2): the bone surface samples in ``bone_frame``.

With ``autostart`` (the default) the node configures and activates itself on start, so it
also runs where no lifecycle manager exists; set it to false to drive it with
``ros2 lifecycle set`` or a lifecycle manager. A missing or bad mesh or a corrupt checkpoint
is logged, published on /diagnostics at ERROR level, and the node stays up.

``mesh_path`` is required; the literal value ``phantom`` selects the package's embedded
phantom proximal femur (written once into ``cache_dir``), for demos and tests.

Each configure starts a worker of a new *generation*; cleanup, shutdown and destruction end the
current one. A worker that did not stop within ``WORKER_JOIN_TIMEOUT_S`` (a checkpoint load or
an exact-distance pass does not check for cancellation) is abandoned: when it finishes, its
generation is no longer current, so it publishes nothing and changes no status.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.time import Time
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String

from neural_bone_reg.core.errors import CheckpointError, InputError
from neural_bone_reg.core.runtime import configure_threads, MAX_THREADS
from neural_bone_reg.ros import params as ros_params
from neural_bone_reg.ros.conversions import xyz_to_cloud
from neural_bone_reg.ros.diagnostics import diagnostic_array, DIAGNOSTICS_TOPIC, ERROR, OK, WARN
from neural_bone_reg.ros.input_checks import check_frame_id
from neural_bone_reg.ros.model_info import encode_model_info, ModelInfo
from neural_bone_reg.ros.node_main import run_node
from neural_bone_reg.ros.qos import DIAGNOSTICS_QOS, LATCHED_QOS

NODE_NAME = 'preop_loader'
PHANTOM = 'phantom'
DEVICES = ('auto', 'cpu', 'cuda')
CONFIG_SECTIONS = ('udf', 'train')
#: Training progress is logged and published at most once per this many seconds.
PROGRESS_PERIOD_S = 2.0
#: Period of the /diagnostics heartbeat that repeats the model status for late joiners, s.
DIAGNOSTICS_PERIOD_S = 1.0
#: Seconds the worker is given to stop when the node cleans up or shuts down.
WORKER_JOIN_TIMEOUT_S = 10.0


class _Cancelled(Exception):
    """Raised inside the training progress callback to abort training."""


class PreopLoader(LifecycleNode):
    """Train or load the bone model in a worker and publish it latched once ready."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        """Declare the parameters and the diagnostics publisher only (cheap)."""
        super().__init__(node_name, **kwargs)
        declare = ros_params.declare
        declare(self, 'mesh_path', '',
                "Preoperative bone mesh (STL/PLY/OBJ, mm). Required; 'phantom' selects the "
                'embedded phantom femur.', read_only=True)
        declare(self, 'bone_frame', 'bone', 'tf frame of the mesh, announced with the model.',
                read_only=True)
        declare(self, 'cache_dir', '',
                "Checkpoint cache folder (keyed by mesh sha256 + config); '' uses "
                '$NEURAL_BONE_REG_CACHE or ~/.cache/neural_bone_reg.', read_only=True)
        declare(self, 'device', 'auto', "Torch device for training: 'auto', 'cpu' or 'cuda'.",
                read_only=True)
        declare(self, 'autostart', True,
                'Configure and activate on start, without a lifecycle manager.', read_only=True)
        declare(self, 'threads.intra_op', 0,
                'Torch intra-op threads for training; 0 = auto (half the CPUs available, 1-4).',
                value_range=(0, MAX_THREADS), read_only=True)
        declare(self, 'threads.inter_op', 0,
                'Torch inter-op threads; 0 = auto (1).', value_range=(0, MAX_THREADS),
                read_only=True)
        ros_params.declare_config_parameters(self, CONFIG_SECTIONS)
        # Diagnostics live outside the lifecycle so a failed configure is reported too.
        self._diag_pub = self.create_publisher(DiagnosticArray, DIAGNOSTICS_TOPIC,
                                               DIAGNOSTICS_QOS)
        self._model_status: tuple[bytes, str, dict[str, Any]] = (
            WARN, 'starting: not configured yet', {})
        self._diag_timer = self.create_timer(DIAGNOSTICS_PERIOD_S, self.on_diagnostics_timer)
        self._lock = threading.Lock()
        #: Bumped (under the lock) by every configure and every stop; a worker whose generation
        #: is not the current one is stale and must not publish or report.
        self._generation = 0
        self._worker: threading.Thread | None = None
        self._model_pub = None
        self._surface_pub = None
        self._model_msg: String | None = None
        self._surface_msg: PointCloud2 | None = None
        self._active = False
        self._last_progress = 0.0
        self.failure: str | None = None
        self.model_info: ModelInfo | None = None
        self.ready = threading.Event()

    # ----------------------------------------------------------------- lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate parameters, create the latched publishers and start the worker."""
        try:
            mesh_path = self.get_parameter('mesh_path').value
            cache_dir = self.get_parameter('cache_dir').value or None
            device = self.get_parameter('device').value
            bone_frame = self.get_parameter('bone_frame').value
            if not mesh_path:
                raise ValueError("parameter 'mesh_path' is required: a bone mesh in mm, or "
                                 f'{PHANTOM!r} for the embedded phantom')
            if device not in DEVICES:
                raise ValueError(f"parameter 'device' must be one of {DEVICES}, got {device!r}")
            if not bone_frame:
                raise ValueError("parameter 'bone_frame' must not be empty")
            check_frame_id(bone_frame, "parameter 'bone_frame'")  # as the consumer checks it
            configs = ros_params.build_configs(self, CONFIG_SECTIONS)
            threads = configure_threads(self.get_parameter('threads.intra_op').value,
                                        self.get_parameter('threads.inter_op').value)
        except ValueError as exc:
            self._fail(f'configure failed: {exc}')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(
            f'mesh_path={mesh_path} bone_frame={bone_frame} cache_dir={cache_dir} '
            f'device={device} threads.intra_op={threads[0]} threads.inter_op={threads[1]} '
            '(in use)\n' + ros_params.format_configs(configs, CONFIG_SECTIONS))
        self.failure = None
        self._model_pub = self.create_lifecycle_publisher(String, 'model', LATCHED_QOS)
        self._surface_pub = self.create_lifecycle_publisher(PointCloud2, 'bone_surface',
                                                            LATCHED_QOS)
        with self._lock:
            self._generation += 1
            generation = self._generation
        self._worker = threading.Thread(
            target=self._prepare_model, name=f'preop_worker_{generation}', daemon=True,
            args=(generation, mesh_path, cache_dir, None if device == 'auto' else device,
                  bone_frame, configs))
        self._worker.start()
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Enable the publishers and publish the model if it is ready."""
        result = super().on_activate(state)
        with self._lock:
            self._active = True
            self._publish_model_locked()
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop publishing (the latched samples stay with their readers)."""
        with self._lock:
            self._active = False
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Abort any training and destroy the publishers."""
        self._stop_worker()
        with self._lock:
            self._model_msg = self._surface_msg = None
            self.model_info = None
            self.ready.clear()
        for pub in (self._model_pub, self._surface_pub):
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
        self._model_pub = self._surface_pub = None
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Abort any training."""
        self._stop_worker()
        return super().on_shutdown(state)

    # ----------------------------------------------------------------- worker

    def _stop_worker(self) -> None:
        """End the current worker's generation, then give it WORKER_JOIN_TIMEOUT_S to return."""
        with self._lock:
            self._generation += 1
        worker, self._worker = self._worker, None
        if worker is not None and worker.is_alive():
            worker.join(WORKER_JOIN_TIMEOUT_S)
            if worker.is_alive():
                self.get_logger().warning(
                    f'the model worker did not stop within {WORKER_JOIN_TIMEOUT_S} s; it is '
                    'abandoned, and its result will be dropped')

    def _is_current(self, generation: int) -> bool:
        return generation == self._generation

    def _on_progress(self, generation: int, step: int, total: int, loss: float) -> None:
        if not self._is_current(generation):
            raise _Cancelled()
        now = time.monotonic()
        if now - self._last_progress >= PROGRESS_PERIOD_S or step >= total:
            self._last_progress = now
            message = f'training the bone distance field: step {step}/{total}, loss {loss:.4g}'
            self.get_logger().info(message)
            self._set_status(OK, message, {'step': step, 'total': total, 'loss': loss},
                             generation=generation)

    def _prepare_model(self, generation: int, mesh_path: str, cache_dir: str | None,
                       device: str | None, bone_frame: str, configs: Any) -> None:
        from neural_bone_reg import BoneRegistrar
        from neural_bone_reg.core import sim

        started = time.monotonic()
        try:
            if mesh_path == PHANTOM:
                mesh_path = str(sim.phantom_mesh_path(cache_dir))
            self._set_status(WARN, f'preparing the bone model from {mesh_path}',
                             {'mesh_path': mesh_path}, generation=generation)
            registrar = BoneRegistrar.from_mesh(
                mesh_path, device=device, cache_dir=cache_dir, configs=configs,
                progress=functools.partial(self._on_progress, generation))
        except _Cancelled:
            self.get_logger().info('model preparation cancelled')
            return
        except (InputError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
            kind = ('corrupt or foreign checkpoint' if isinstance(exc, CheckpointError)
                    else 'unusable mesh' if isinstance(exc, InputError) else 'error')
            self._fail(f'cannot prepare the bone model from {mesh_path} ({kind}): {exc}',
                       generation=generation)
            return
        except Exception as exc:  # never leave the status at 'preparing' (MemoryError, ...)
            self._fail(f'cannot prepare the bone model from {mesh_path} (internal error): '
                       f'{type(exc).__name__}: {exc}', generation=generation)
            return
        info = ModelInfo(checkpoint=str(registrar.checkpoint_path.resolve()),
                         sha256=registrar.geometry_sha256, bone_frame=bone_frame)
        # The surface is static geometry: stamp zero means "valid at any time" to tf users.
        # Published in metres (REP 103), like every cloud and tf of the package.
        surface = xyz_to_cloud(registrar.surface_points, bone_frame, Time().to_msg())
        message = (f'bone model ready in {time.monotonic() - started:.1f} s: '
                   f'{info.checkpoint} ({len(registrar.surface_points)} surface points)')
        with self._lock:
            if not self._is_current(generation):
                self.get_logger().info(
                    f'dropping the model of an abandoned worker ({info.checkpoint}): the node '
                    'was cleaned up or reconfigured while it ran')
                return
            self.model_info = info
            self._model_msg = String(data=encode_model_info(info))
            self._surface_msg = surface
            self._publish_model_locked()
            # The status says ready before ``ready`` is set: whoever sees one sees the other.
            self._model_status = (OK, message, {'checkpoint': info.checkpoint,
                                                'mesh_sha256': info.sha256,
                                                'bone_frame': bone_frame})
            self.ready.set()
        self.get_logger().info(message)
        self.on_diagnostics_timer()

    def _publish_model_locked(self) -> None:
        if self._active and self._model_msg is not None:
            self._model_pub.publish(self._model_msg)
            self._surface_pub.publish(self._surface_msg)

    def _fail(self, message: str, generation: int | None = None) -> None:
        """Record and report a failure; a stale worker's (``generation``) is dropped."""
        with self._lock:
            if generation is not None and not self._is_current(generation):
                return
            self.failure = message
        self.get_logger().error(message)
        self._set_status(ERROR, message, generation=generation)

    def _set_status(self, level: bytes, message: str, values: dict[str, Any] | None = None,
                    generation: int | None = None) -> None:
        """Set the model status and publish it; a stale worker's (``generation``) is dropped."""
        with self._lock:
            if generation is not None and not self._is_current(generation):
                return
            self._model_status = (level, message, dict(values or {}))
        self.on_diagnostics_timer()

    def on_diagnostics_timer(self) -> None:
        """Publish the model status now; a timer repeats it for late subscribers."""
        level, message, values = self._model_status
        self._diag_pub.publish(diagnostic_array(self, 'model', level, message, values))

    def destroy_node(self) -> None:
        """Abort any training, then destroy the node."""
        self._stop_worker()
        super().destroy_node()


def _autostart(node: PreopLoader) -> None:
    if node.get_parameter('autostart').value:
        if node.trigger_configure() == TransitionCallbackReturn.SUCCESS:
            node.trigger_activate()


def main(args: list[str] | None = None) -> int:
    """Run the preop loader until shutdown; return 2 for invalid parameters."""
    return run_node(PreopLoader, NODE_NAME, args, on_start=_autostart)


if __name__ == '__main__':
    raise SystemExit(main())
