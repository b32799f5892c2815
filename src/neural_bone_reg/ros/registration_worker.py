"""The registration node's worker thread: frame lookups, model loads and solves.

The thread asks the core ``RegistrationStream`` for the next work and does it off the
executor: it transforms clouds and sweep slices in another frame than ``robot_frame`` into
it at their own stamps (tf2_ros, at most ``tf_timeout_s``; a failed lookup is an ERROR
diagnostic ``<node>: tf`` and that cloud gives no transform), loads models, and hands each
solve's outcome to ``RegistrationOutput``. Whatever the core raises, the thread goes on.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
import threading
import time
from typing import Any, Callable

import numpy as np
from rclpy.node import Node

from neural_bone_reg.core.config import Configs
from neural_bone_reg.core.errors import CheckpointError, InputError
from neural_bone_reg.core.se3 import apply_transform
from neural_bone_reg.core.stream import Cloud, Registrar, RegistrationStream, Slice
from neural_bone_reg.ros.diagnostics import ERROR, OK
from neural_bone_reg.ros.input_checks import tf_frame
from neural_bone_reg.ros.params import format_configs
from neural_bone_reg.ros.registration_output import (LOG_THROTTLE_S, RegistrationOutput,
                                                     stamp_text)
from neural_bone_reg.ros.tf_lookup import CloudTransformer, TfLookupError

WORKER_THREAD_NAME = 'registration_worker'
#: Seconds the worker is given to finish when the node is destroyed.
WORKER_JOIN_TIMEOUT_S = 5.0


class Cancelled(Exception):
    """Raised inside a training progress callback to abort when the node shuts down."""


@dataclass(frozen=True)
class ModelJob:
    """A model to load: 'checkpoint' or 'mesh' from a path, or a ready 'object'."""

    kind: str
    source: str
    path: str = ''
    sha256: str = ''
    bone_frame: str = ''
    registrar: Registrar | None = None

    @classmethod
    def from_parameters(cls, checkpoint: str, mesh_path: str) -> ModelJob | None:
        """Return the model the ``checkpoint`` (first) or ``mesh_path`` parameter names."""
        if checkpoint:
            return cls('checkpoint', f'checkpoint parameter {checkpoint}', path=checkpoint)
        if mesh_path:
            return cls('mesh', f'mesh_path parameter {mesh_path}', path=mesh_path)
        return None


class RegistrationWorker:
    """Run the stream's work in a thread; the node sets the public fields it changes."""

    def __init__(self, node: Node, stream: RegistrationStream, output: RegistrationOutput, *,
                 configs: Configs, device: str | None, cache_dir: str | None) -> None:
        """Prepare the worker; :meth:`start` starts its thread."""
        self._node = node
        self._stream = stream
        self._output = output
        self.configs = configs
        self._device = device
        self._cache_dir = cache_dir
        self.robot_frame = ''
        self.bone_frame_param = ''
        self.tf_timeout_s = 0.0
        self.transformer: CloudTransformer | None = None
        self.model_bone_frame = ''
        self.model_source = ''
        self.max_extent_mm = float('inf')
        self._thread = threading.Thread(target=self._run, name=WORKER_THREAD_NAME, daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float) -> bool:
        """Close the stream and join the thread; return False if it is still solving."""
        self._stream.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        return not self._thread.is_alive()

    def bone_frame(self) -> str:
        """Return the child frame: the parameter, else the model's, else 'bone'."""
        return self.bone_frame_param or self.model_bone_frame or 'bone'

    def _run(self) -> None:
        while True:
            try:
                work = self._stream.next_work()
            except Exception as exc:  # merging a sweep failed: report it, wait for more
                self._report_error(exc)
                continue
            if work is None:
                return
            try:
                if work.slices:
                    self._add_slices(work.slices, work.generation)
                if work.task is not None:
                    work.task()
                if work.registration is not None and self._stream.apply_registration(
                        work.registration):  # also after a model load: not dropped
                    self._node.get_logger().info('registration config applied:\n' + format_configs(
                        self.configs, ('registration',)))
                if work.job is not None:
                    self._solve(work.job, work.epoch, work.voids)
            except Cancelled:
                return
            except Exception as exc:  # keep the worker alive whatever the core raises
                self._report_error(exc)

    def _report_error(self, exc: Exception) -> None:
        """End the track and report an unexpected error of the worker's work."""
        self._stream.end_track()
        self._node.get_logger().error(f'worker error: {type(exc).__name__}: {exc}')
        self._output.diag('registration', ERROR, f'internal error: {type(exc).__name__}: {exc}')

    def _solve(self, job: Cloud, epoch: int, voids: int) -> None:
        if job.source_frame:  # a cloud in another frame than robot_frame
            try:
                job = replace(job, points=self._to_parent(
                    job.points, job.frame_id, job.source_frame, job.stamp_ns), source_frame='')
            except TfLookupError as exc:
                self._tf_failed(exc, job.source_frame, job.stamp_ns, 'cloud not solved')
                return
        bone_frame = self.bone_frame()
        if tf_frame(job.frame_id) == tf_frame(bone_frame):
            message = (f'cloud frame {job.frame_id!r} is the bone frame {bone_frame!r}: a '
                       'transform from a frame to itself; cloud not solved, no transform '
                       'broadcast (set robot_frame or bone_frame apart)')
            self._node.get_logger().error(message, throttle_duration_sec=LOG_THROTTLE_S)
            self._output.diag('registration', ERROR, message, {'frame_id': job.frame_id})
            return
        outcome = self._stream.solve(job, epoch, bone_frame, voids)
        self._output.publish(outcome, self._stream.clock(), self._stream.commit)

    def _add_slices(self, slices: tuple[Slice, ...], generation: int) -> None:
        """Transform slices (each at its own stamp) and hand them to the sweep.

        A reset or a new sweep config while they are looked up drops them: the remaining ones
        are not looked up (a lookup may wait ``tf_timeout_s`` each), and none enters the sweep.
        """
        ready = []
        for index, piece in enumerate(slices):
            if not self._stream.takes_slices_of(generation):
                ready.extend(slices[index:])  # add_slices drops (and counts) them all
                break
            if piece.source_frame != piece.parent:
                try:
                    piece = replace(piece, source_frame=piece.parent, points=self._to_parent(
                        piece.points, piece.parent, piece.source_frame, piece.stamp_ns))
                except TfLookupError as exc:
                    self._tf_failed(exc, piece.source_frame, piece.stamp_ns,
                                    'sweep slice left out of the sweep')
                    continue
            ready.append(piece)
        for frame in self._stream.add_slices(ready, generation):
            self._node.get_logger().info(f'new sweep in frame {frame!r} (frame change, time '
                                         'jump or gap longer than sweep.max_age_s)')

    def _to_parent(self, points: np.ndarray, parent: str, source: str,
                   stamp_ns: int) -> np.ndarray:
        """Return ``points`` (mm, in ``source``) in ``parent`` at ``stamp_ns``; TfLookupError."""
        transformer = self.transformer or CloudTransformer(None)
        matrix = transformer.lookup_mm(parent, source, stamp_ns, self.tf_timeout_s)
        return apply_transform(matrix, points).astype(np.float32)

    def _tf_failed(self, exc: TfLookupError, source: str, stamp_ns: int, outcome: str) -> None:
        failures = self._stream.lookup_failed()
        message = f'{exc}; {outcome}, no transform broadcast'
        self._node.get_logger().warning(message, throttle_duration_sec=LOG_THROTTLE_S)
        self._output.diag('tf', ERROR, message,
                          {'frame_id': source, 'robot_frame': self.robot_frame,
                           'stamp': stamp_text(stamp_ns), 'tf_failures': failures})

    def _train_progress(self) -> Callable[[int, int, float], None]:
        def progress(step: int, total: int, loss: float) -> None:
            if self._stream.closed:
                raise Cancelled()
            self._node.get_logger().info(f'training UDF: step {step}/{total}, loss {loss:.4g}',
                                         throttle_duration_sec=LOG_THROTTLE_S)
        return progress

    def _loaded(self, job: ModelJob) -> Registrar:
        from neural_bone_reg import BoneRegistrar

        if job.kind == 'object':
            return job.registrar
        if job.kind == 'checkpoint':
            registrar = BoneRegistrar.from_checkpoint(job.path, device=self._device,
                                                      registration=self.configs.registration)
            if job.sha256 and registrar.geometry_sha256 != job.sha256:
                raise CheckpointError(
                    f'checkpoint {job.path} is of mesh sha256 {registrar.geometry_sha256[:12]}, '
                    f'but the model message announced {job.sha256[:12]}')
            return registrar
        return BoneRegistrar.from_mesh(job.path, device=self._device, cache_dir=self._cache_dir,
                                       configs=self.configs, progress=self._train_progress())

    def load_model(self, job: ModelJob) -> None:
        """Load (or train) a model, warm it up and hand it to the stream; report either way."""
        from neural_bone_reg.core.registrar import MAX_CLOUD_TO_BONE_EXTENT

        logger = self._node.get_logger()
        keeping = (f'keeping {self.model_source}' if self._stream.registrar is not None
                   else 'no model loaded')
        started = time.monotonic()
        try:
            registrar = self._loaded(job)
        except (InputError, CheckpointError, OSError, ValueError, RuntimeError) as exc:
            message = f'cannot load model from {job.source}: {exc} ({keeping})'
            logger.error(message)
            self._output.diag('model', ERROR, message)
            return
        try:  # the first real solve then skips torch's start-up
            logger.info(f'solver warmed up in {registrar.warm_up():.2f} s')
        except (InputError, ValueError, RuntimeError) as exc:
            logger.warning(f'solver warm-up failed (harmless): {exc}')
        surface = np.asarray(registrar.surface_points)
        self.max_extent_mm = (MAX_CLOUD_TO_BONE_EXTENT * float(np.linalg.norm(np.ptp(
            surface, axis=0))) if len(surface) else float('inf'))
        self.model_bone_frame, self.model_source = job.bone_frame, job.source
        self._output.withdraw(lambda: self._stream.use_registrar(registrar), 'new model')
        message = f'model loaded from {job.source} in {time.monotonic() - started:.2f} s'
        logger.info(message)
        self._output.diag('model', OK, message,
                          {'checkpoint': str(registrar.checkpoint_path or ''),
                           'mesh_sha256': registrar.geometry_sha256})

    def counters(self) -> dict[str, Any]:
        """Return the heartbeat's counters of the stream and the output."""
        counts = self._stream.counts()
        return {'clouds_received': counts.received, 'inputs_rejected': counts.rejected_inputs,
                'clouds_dropped': counts.dropped, 'solves': counts.solves,
                'broadcasts': self._output.n_broadcasts, 'tracked': counts.tracked,
                'tf_failures': counts.tf_failures, 'bone_poses': self._output.n_poses,
                'worker_busy': self._stream.busy, 'sweep_points': self._stream.sweep_points}
