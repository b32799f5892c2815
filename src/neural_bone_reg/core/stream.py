"""The registration stream: which clouds to solve, when, and from which pose (no rclpy).

A front end (the ROS node) converts each message into an (N,3) mm array and hands it here;
a worker thread asks :meth:`RegistrationStream.next_work` what to do next and hands the
solve back to :meth:`RegistrationStream.solve`. All state the two threads share lives here,
under one lock, and nothing costly (merging, downsampling, solving) runs under it.

Modes:

* ``'single'``: each cloud is registered on its own. Only the newest cloud waits (a depth-1
  slot): one that arrives while another waits replaces it and is counted as dropped.
* ``'sweep'``: slices go to an inbox (bounded by ``SweepConfig.max_points``; the oldest beyond
  it are dropped and counted), the worker moves them into a :class:`SweepBuffer`, and the
  sweep is solved once it holds ``min_points``, no slice has come for ``settle_s``, or at the
  latest ``max_wait_s`` after new data became due. Slices merged into one solve are not
  dropped clouds.
* ``'track'``: like 'single', but a cloud is tracked (``Registrar.track``) from the last
  accepted pose when it may be (:meth:`RegistrationStream.usable_track`); a frame that fails
  the gates is registered from scratch at once.

The track ends (and a solve in flight can no longer start one) whenever the *epoch* moves: a
reset, ``register_now``, a mode, model or registration config change, a rejected result, bad
input or a failed frame lookup. Times of arrival come from the injected ``clock`` (seconds,
``time.monotonic`` by default), so tests drive the gap and age rules without sleeping; stamps
are the clouds' own, in nanoseconds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path
import threading
import time
from typing import Callable, Iterable, Protocol, runtime_checkable, TYPE_CHECKING, TypeVar

import numpy as np

from neural_bone_reg.core.config import RegistrationConfig, SweepConfig, TrackingConfig
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.sweep_buffer import SweepBuffer, SweepPieces, voxel_downsample

if TYPE_CHECKING:  # torch is imported only where a registrar is made
    from neural_bone_reg.core.registrar import RegistrationResult

MODES = ('sweep', 'single', 'track')
#: A clock: seconds from any fixed origin, never going back.
Clock = Callable[[], float]
T = TypeVar('T')


@runtime_checkable
class Registrar(Protocol):
    """What the stream and its front ends use of a registrar (``BoneRegistrar`` is one)."""

    @property
    def surface_points(self) -> np.ndarray:
        """Return the (M,3) bone surface samples, mm, in the bone frame."""

    @property
    def checkpoint_path(self) -> Path | None:
        """Return the checkpoint the model was loaded from (None: not from a file)."""

    @property
    def geometry_sha256(self) -> str:
        """Return the sha256 of the bone mesh the model was made from."""

    def register(self, points: np.ndarray) -> RegistrationResult:
        """Register (N,3) mm points from no initial guess."""

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        """Refine from the 4x4 ``prior`` (T_bone_cloud) of the previous frame."""

    def with_config(self, config: RegistrationConfig) -> Registrar:
        """Return a registrar of the same model under another registration config."""

    def warm_up(self) -> float:
        """Run a tiny registration so the first real one skips start-up; return seconds."""


@dataclass(frozen=True)
class Cloud:
    """One solve request: (N,3) mm points in ``frame_id`` and where they came from."""

    points: np.ndarray
    frame_id: str
    stamp_ns: int
    received_s: float
    """Arrival time on the stream's clock (for a sweep: of its newest slice)."""
    n_slices: int = 1
    source_frame: str = ''
    """Frame the points are in when it is not ``frame_id`` (a frame lookup is due); else ''."""


@dataclass(frozen=True)
class Slice:
    """One sweep slice as received: in ``source_frame``, for the sweep in ``parent``."""

    points: np.ndarray
    source_frame: str
    parent: str
    stamp_ns: int
    received_s: float


@dataclass(frozen=True)
class Track:
    """The last accepted pose that the next frame may be tracked from."""

    transform: np.ndarray
    frame_id: str
    bone_frame: str
    stamp_ns: int
    received_s: float
    anchor_s: float
    """When the global registration this track started from was received."""


@dataclass(frozen=True)
class Work:
    """What the worker does next, in this order: slices, task, registration config, job."""

    slices: tuple[Slice, ...] = ()
    task: Callable[[], None] | None = None
    registration: RegistrationConfig | None = None
    job: Cloud | None = None
    epoch: int = 0
    """The epoch the job was taken in: a later reset or change voids its track."""
    voids: int = 0
    """How many voiding changes the stream had seen when the job was taken (see solve)."""
    generation: int = 0
    """The sweep the slices were taken for: a reset or a new sweep config since drops them."""


@dataclass
class Counters:
    """What the stream has seen; read them with :meth:`RegistrationStream.counts`."""

    received: int = 0
    """Clouds handed to the stream, and clouds refused before (``reject_input``)."""
    rejected_inputs: int = 0
    dropped: int = 0
    """Clouds or slices replaced or pushed out before any solve used them."""
    solves: int = 0
    tracked: int = 0
    tf_failures: int = 0


@dataclass(frozen=True)
class Outcome:
    """What a solve gave: a result, or the input error that refused the cloud."""

    job: Cloud
    bone_frame: str
    result: RegistrationResult | None = None
    error: str = ''
    lost: str = ''
    """Why tracking was given up for a global registration ('' when not tried, or tracked)."""
    voided: str = ''
    """What arrived while it was computed and voids the result (a reset, a model, mode or
    registration config change): never broadcast then. '' when it stands."""
    voids: int = 0
    """The stream's count of voiding changes the result stands against (see :meth:`commit`)."""


class RegistrationStream:
    """Hold the clouds, the sweep and the track between a front end and its worker."""

    def __init__(self, mode: str = 'sweep', sweep: SweepConfig | None = None,
                 tracking: TrackingConfig | None = None, clock: Clock = time.monotonic) -> None:
        """Create an empty stream; ``clock`` gives arrival times in seconds."""
        check_mode(mode)
        self.clock = clock
        self._cond = threading.Condition()
        self._mode = mode
        self._sweep_config = sweep or SweepConfig()
        self._tracking = tracking or TrackingConfig()
        self._sweep = self._new_buffer(self._sweep_config)
        self._counters = Counters()
        self._closed = False
        self._busy = False
        self._registrar: Registrar | None = None
        self._task: Callable[[], None] | None = None
        self._registration: RegistrationConfig | None = None
        self._pending: Cloud | None = None
        self._last: Cloud | None = None
        self._inbox: deque[Slice] = deque()
        self._inbox_points = 0
        self._dirty = self._force = False
        self._sweep_received = self._dirty_since = 0.0
        self._track: Track | None = None
        self._epoch = 0
        self._voided = 0  # counts the changes that void a solve in flight
        self._generation = 0  # counts the sweeps emptied (reset, new sweep config)
        self._void_reason = ''

    @staticmethod
    def _new_buffer(config: SweepConfig) -> SweepBuffer:
        return SweepBuffer(config.max_age_s, config.voxel_mm, config.max_points)

    # ------------------------------------------------------------------ state

    @property
    def mode(self) -> str:
        """Return the mode: 'sweep', 'single' or 'track'."""
        return self._mode

    @property
    def registrar(self) -> Registrar | None:
        """Return the registrar in use (None before the first model)."""
        return self._registrar

    @property
    def sweep_config(self) -> SweepConfig:
        """Return the sweep parameters in use."""
        return self._sweep_config

    @property
    def tracking(self) -> TrackingConfig:
        """Return the tracking parameters in use."""
        return self._tracking

    @property
    def closed(self) -> bool:
        """Return True once :meth:`close` was called."""
        return self._closed

    @property
    def busy(self) -> bool:
        """Return True while the worker holds work it took."""
        return self._busy

    @property
    def sweep_points(self) -> int:
        """Return the points held by the sweep buffer."""
        return self._sweep.n_points

    @property
    def track(self) -> Track | None:
        """Return the pose the next frame may be tracked from, if any."""
        return self._track

    def counts(self) -> Counters:
        """Return a copy of the counters, taken under the lock."""
        with self._cond:
            return Counters(**vars(self._counters))

    # ------------------------------------------------------------------ input side

    def reject_input(self) -> None:
        """Count a message refused before it reached the stream (received, and rejected)."""
        with self._cond:
            self._counters.received += 1
            self._counters.rejected_inputs += 1
            self._cond.notify_all()

    def add_cloud(self, points: np.ndarray, parent: str, stamp_ns: int,
                  received_s: float | None = None, source_frame: str = '') -> None:
        """Store a checked (N,3) mm cloud for the worker: the depth-1 slot, or the sweep inbox.

        ``source_frame`` is the frame the points are in when it is not ``parent``;
        ``received_s`` is its arrival time on :attr:`clock` (default: now). Nothing costly
        happens here: frame lookups and downsampling are the worker's.
        """
        points = np.asarray(points, dtype=np.float32)
        received = self.clock() if received_s is None else received_s
        source = source_frame or parent
        with self._cond:
            self._counters.received += 1
            if self._mode != 'sweep':
                if self._pending is not None:
                    self._counters.dropped += 1
                self._pending = self._last = Cloud(
                    points, parent, stamp_ns, received,
                    source_frame=source if source != parent else '')
            else:
                self._inbox.append(Slice(points, source, parent, stamp_ns, received))
                self._inbox_points += len(points)
                while len(self._inbox) > 1 and self._inbox_points > self._sweep.max_points:
                    self._inbox_points -= len(self._inbox.popleft().points)
                    self._counters.dropped += 1
                self._sweep_received = received
            self._cond.notify_all()

    def post(self, task: Callable[[], None]) -> None:
        """Queue ``task`` (a model load) for the worker; it replaces one not started yet."""
        with self._cond:
            self._task = task
            self._cond.notify_all()

    def has_model(self) -> bool:
        """Return True when a registrar is in use or a model load is queued."""
        return self._registrar is not None or self._task is not None

    def use_registrar(self, registrar: Registrar) -> None:
        """Register with ``registrar`` from now on; the track ends."""
        with self._cond:
            self._registrar = registrar
            self._end_track(void='model change')
            if self._mode == 'sweep' and self._sweep.n_points >= self._sweep_config.min_points:
                self._dirty = True
            self._cond.notify_all()

    def set_registration(self, config: RegistrationConfig) -> None:
        """Queue a registration config for the worker to apply; the track ends at once."""
        with self._cond:
            self._registration = config
            # The track's poses were accepted under the old gates.
            self._end_track(void='registration config change')
            self._cond.notify_all()

    def configure(self, mode: str | None = None, sweep: SweepConfig | None = None,
                  tracking: TrackingConfig | None = None) -> None:
        """Change the mode (the track ends), the sweep (emptied) or the tracking rules."""
        if mode is not None:
            check_mode(mode)
        with self._cond:
            if mode is not None and mode != self._mode:
                self._mode = mode
                self._end_track(void='mode change')
            if sweep is not None:
                self._sweep_config, self._sweep = sweep, self._new_buffer(sweep)
                self._dirty = False
                self._generation += 1
            self._tracking = tracking or self._tracking
            self._cond.notify_all()

    def register_now(self) -> tuple[bool, str]:
        """Queue a solve of the sweep (or of the last cloud) now, ignoring min_points."""
        with self._cond:
            if not self.has_model():
                return False, 'no model loaded yet'
            if self._mode != 'sweep':
                if self._last is None:
                    return False, 'no valid cloud received yet'
                self._pending = self._last
                self._end_track()  # track mode: a full registration, not a re-track
                self._cond.notify_all()
                return True, f'queued {len(self._last.points)} points'
            if self._sweep.n_points == 0 and not self._inbox:
                return False, 'the sweep is empty'
            self._dirty = self._force = True
            self._cond.notify_all()
            return True, f'queued the sweep ({self._sweep.n_points + self._inbox_points} points)'

    def reset(self) -> int:
        """Drop the sweep, the inbox and any queued cloud; return how many points/clouds."""
        with self._cond:
            dropped = (self._sweep.n_points + self._inbox_points
                       + (0 if self._pending is None else 1))
            self._sweep.clear()
            self._inbox.clear()
            self._inbox_points = 0
            self._dirty = self._force = False
            self._pending = self._last = None
            self._generation += 1  # slices the worker holds now are dropped too
            self._end_track(void='reset')
            self._cond.notify_all()
        return dropped

    def change_frames(self) -> None:
        """Say that robot_frame or bone_frame changed: the track ends, a solve in flight is void.

        Its result would go out as the old parent -> old child, beside the new frames' poses.
        """
        with self._cond:
            self._end_track(void='frame change')
            self._cond.notify_all()

    def end_track(self) -> None:
        """Forget the track and void any solve in flight."""
        with self._cond:
            self._end_track()

    def _end_track(self, void: str = '') -> None:
        """End the track; with a ``void`` reason, also void the result of a solve in flight."""
        self._track = None
        self._epoch += 1
        if void:
            self._voided += 1
            self._void_reason = void

    # ------------------------------------------------------------------ worker side

    def _due_in(self) -> float | None:
        """Return seconds until queued work is due (0: now), or None without work."""
        if self._task is not None or self._registration is not None or self._inbox:
            return 0.0
        if self._registrar is None:
            return None
        if self._mode != 'sweep':
            return 0.0 if self._pending is not None else None
        if not self._dirty:
            return None
        if self._force:
            return 0.0
        due = min(self._sweep_received + self._sweep_config.settle_s,
                  self._dirty_since + self._sweep_config.max_wait_s)
        return max(0.0, due - self.clock())

    def _take(self) -> tuple[Work, SweepPieces | None, bool, float]:
        """Take the newest work (the caller holds the lock); a sweep is merged after."""
        self._busy = True
        slices, self._inbox, self._inbox_points = tuple(self._inbox), deque(), 0
        task, self._task = self._task, None
        registration, self._registration = self._registration, None
        work = Work(slices, task, registration, None, self._epoch, self._voided,
                    self._generation)
        if slices or task or registration:  # those first, the solve on the next turn
            return work, None, False, 0.0
        if self._mode != 'sweep':
            job, self._pending = self._pending, None
            return Work(job=job, epoch=self._epoch, voids=self._voided), None, False, 0.0
        self._dirty = False
        force, self._force = self._force, False
        return work, self._sweep.pieces(), force, self._sweep_received

    def _merged(self, work: Work, pieces: SweepPieces | None, force: bool,
                received_s: float) -> Work:
        """Return ``work`` with its sweep merged (outside the lock), if it has enough points."""
        if pieces is None:
            return work
        snap = pieces.merge()
        if len(snap.points) < self._sweep_config.min_points and not force:
            return work
        job = Cloud(snap.points, snap.frame_id, snap.newest_stamp_ns, received_s, snap.n_slices)
        return Work(job=job, epoch=work.epoch, voids=work.voids)

    def take_work(self) -> Work | None:
        """Return the work due now, or None (never blocks); :meth:`finish` it after."""
        with self._cond:
            if self._closed or self._due_in() != 0.0:
                return None
            taken = self._take()
        return self._merged(*taken)

    def next_work(self) -> Work | None:
        """Finish the previous work, block until more is due, and return it; None once closed."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()
            while not self._closed and self._due_in() != 0.0:
                self._cond.wait(self._due_in())  # None: until notified
            if self._closed:
                return None
            taken = self._take()
        return self._merged(*taken)

    def finish(self) -> None:
        """Say the worker is done with the work it took."""
        with self._cond:
            self._busy = False
            self._cond.notify_all()

    def wake(self) -> None:
        """Wake the worker to look at the clock again (after a test clock moved)."""
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out work; a blocked :meth:`next_work` returns None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is queued or running; return False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._busy and self._due_in() is None,
                                       timeout=timeout_s)

    def wait_for(self, predicate: Callable[[Counters], bool], timeout_s: float) -> bool:
        """Block until ``predicate(counters)`` holds; return False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self._counters), timeout=timeout_s)

    def add_slices(self, slices: Iterable[Slice], generation: int | None = None) -> list[str]:
        """Downsample slices already in their parent frame into the sweep buffer.

        Return the frames where a slice started a new sweep (frame change, time jump or a gap
        longer than ``max_age_s``). Downsampling runs outside the lock. ``generation`` is the
        taken work's (``Work.generation``): if a reset or a new sweep config came since, the
        slices belong to the sweep it emptied and are dropped (counted in ``dropped``).
        """
        restarted = []
        for piece in slices:
            points = voxel_downsample(piece.points, self._sweep.voxel_mm)
            with self._cond:
                if generation is not None and generation != self._generation:
                    self._counters.dropped += 1
                    continue
                if self._sweep.add(points, piece.parent, piece.stamp_ns, presampled=True):
                    restarted.append(piece.parent)
                due = self._sweep.n_points >= self._sweep_config.min_points
                if due and not self._dirty:
                    self._dirty_since = piece.received_s
                self._dirty = due or self._force
        return restarted

    def takes_slices_of(self, generation: int) -> bool:
        """Return whether slices taken in ``generation`` (``Work.generation``) still count.

        False once a reset or a new sweep config emptied that sweep, or the stream closed: the
        worker then stops looking up the rest of them (each lookup may wait ``tf_timeout_s``).
        """
        with self._cond:
            return not self._closed and generation == self._generation

    def lookup_failed(self) -> int:
        """Count a cloud or slice whose frame lookup failed (the track ends); return the count."""
        with self._cond:
            self._counters.tf_failures += 1
            self._end_track()
            return self._counters.tf_failures

    def apply_registration(self, config: RegistrationConfig) -> bool:
        """Put ``config`` into the registrar in use; return False when there is none yet."""
        registrar = self._registrar
        if registrar is None:
            return False
        registrar = registrar.with_config(config)
        with self._cond:
            self._registrar = registrar
            self._end_track()  # also voids a track set between the change and now
        return True

    def usable_track(self, job: Cloud, bone_frame: str) -> Track | None:
        """Return the track ``job`` may follow, or None (the caller holds the lock).

        Same frames, stamped after the track and within ``max_gap_s`` of it (by stamp and by
        arrival, so unstamped clouds cannot keep a track alive), and anchored by a full
        registration less than ``max_age_s`` ago.
        """
        track = self._track if self._mode == 'track' else None
        if track is None:
            return None
        gap_ns = job.stamp_ns - track.stamp_ns
        max_gap_s = self._tracking.max_gap_s
        if (track.frame_id != job.frame_id or track.bone_frame != bone_frame
                or not 0 <= gap_ns <= max_gap_s * 1e9
                or job.received_s - track.received_s > max_gap_s
                or job.received_s - track.anchor_s > self._tracking.max_age_s):
            return None
        return track

    def solve(self, job: Cloud, epoch: int, bone_frame: str,
              voids: int | None = None) -> Outcome:
        """Track or register ``job`` (points in ``job.frame_id``) and update the track.

        A reset or a model, mode or registration config change after the job was taken (its
        ``Work.voids``; None: when this call starts) voids the result: the outcome says so in
        ``voided`` and the front end broadcasts nothing of it.

        A tracked frame that fails the gates (or whose tracking raises anything but an
        InputError) is registered from scratch at once, so a lost track costs one global
        solve and never an accepted tracked pose that failed.
        """
        with self._cond:
            registrar = self._registrar
            track = self.usable_track(job, bone_frame) if self._epoch == epoch else None
            voided = self._voided if voids is None else voids
        if registrar is None:
            raise RuntimeError('solve() before any registrar was given')
        lost = ''
        try:
            result = None
            if track is not None:
                try:
                    result = registrar.track(job.points, track.transform)
                except InputError:
                    raise
                except Exception as exc:  # any other failure to track means: register afresh
                    lost = f'{type(exc).__name__}: {exc}'
                else:
                    if not result.accepted:
                        lost = '; '.join(result.rejection_reasons) or 'gates not met'
                        result = None
            if result is None:
                result = registrar.register(job.points)
        except InputError as exc:
            with self._cond:
                self._end_track()
                self._counters.rejected_inputs += 1
                self._counters.solves += 1
            return Outcome(job, bone_frame, error=str(exc), voids=voided)
        with self._cond:
            self._counters.solves += 1
            if result.method == 'track':
                self._counters.tracked += 1
            if self._voided != voided:  # reset or changed while it was computed
                self._end_track()
                return Outcome(job, bone_frame, result=result, lost=lost,
                               voided=self._void_reason, voids=voided)
            if not result.accepted:
                self._end_track()
            elif self._mode == 'track' and self._epoch == epoch:
                anchor = (track.anchor_s if result.method == 'track' and track
                          else job.received_s)
                self._track = Track(np.asarray(result.transform, dtype=np.float64),
                                    job.frame_id, bone_frame, job.stamp_ns, job.received_s,
                                    anchor)
        return Outcome(job, bone_frame, result=result, lost=lost, voids=voided)

    def commit(self, outcome: Outcome, send: Callable[[], T]) -> tuple[str, T | None]:
        """Run ``send`` (the broadcast of ``outcome``) under the stream's lock, if it stands.

        Return ('', what ``send`` returned), or (the reason, None) without calling it when a
        reset or a model, mode or registration config change came after the solve took its
        job: a change between :meth:`solve` and the broadcast voids the result too, and one
        that arrives during ``send`` waits for it.
        """
        with self._cond:
            if outcome.voided or self._voided != outcome.voids:
                return outcome.voided or self._void_reason, None
            return '', send()


def check_mode(mode: str) -> None:
    """Raise ValueError naming the ``mode`` parameter unless it is one of MODES."""
    if mode not in MODES:
        raise ValueError(f"parameter 'mode' must be one of {MODES}, got {mode!r}")
