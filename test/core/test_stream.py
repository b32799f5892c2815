"""The registration stream's rules, driven by a hand-moved clock (no ROS, no solver, no sleep).

A scripted registrar stands in for BoneRegistrar; ``step`` does what the node's worker does
with one piece of work, on the test's thread.
"""

from __future__ import annotations

import inspect
import threading
from typing import Any

import numpy as np
import pytest

from neural_bone_reg.core import stream as stream_module
from neural_bone_reg.core import sweep_buffer as sweep_buffer_module
from neural_bone_reg.core.config import RegistrationConfig, SweepConfig, TrackingConfig
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.registrar import BoneRegistrar, RegistrationResult
from neural_bone_reg.core.stream import Outcome, Registrar, RegistrationStream
from neural_bone_reg.core.sweep_buffer import SweepBuffer, voxel_downsample

_NS = 1_000_000_000
POSE = np.diag([1.0, 1.0, 1.0, 1.0])
POSE[:3, 3] = (5.0, -2.0, 30.0)
#: Bound on waits for another thread (they return at once when the code is right).
THREAD_WAIT_S = 10.0


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start_s: float = 100.0) -> None:
        self.now_s = start_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


class ScriptedRegistrar:
    """A Registrar: ``register`` accepts (or not), ``track`` succeeds while ``track_ok``."""

    checkpoint_path = None
    geometry_sha256 = ''

    def __init__(self) -> None:
        self.surface_points = np.zeros((10, 3), np.float32)
        self.accepted = True
        self.track_ok = True
        self.raises: BaseException | None = None
        self.calls: list[tuple[str, int]] = []  # ('register' | 'track', number of points)
        self.configs: list[RegistrationConfig] = []

    def _result(self, points: np.ndarray, accepted: bool, method: str) -> RegistrationResult:
        return RegistrationResult(transform=POSE.copy(), accepted=accepted, residual_mm=0.5,
                                  inlier_fraction=0.9, ambiguity=0.1,
                                  rejection_reasons=() if accepted else ('scripted',),
                                  n_points=len(points), time_s=0.0, method=method)

    def register(self, points: np.ndarray) -> RegistrationResult:
        self.calls.append(('register', len(points)))
        if self.raises is not None:
            raise self.raises
        return self._result(points, self.accepted, 'global')

    def track(self, points: np.ndarray, prior: np.ndarray) -> RegistrationResult:
        self.calls.append(('track', len(points)))
        return self._result(points, self.track_ok, 'track')

    def with_config(self, config: RegistrationConfig) -> ScriptedRegistrar:
        self.configs.append(config)
        return self

    def warm_up(self) -> float:
        return 0.0


def step(stream: RegistrationStream, bone_frame: str = 'bone') -> tuple[bool, Outcome | None]:
    """Do the work due now as the node's worker does (no frame lookups).

    Return (whether there was work, the outcome of its solve if it had one).
    """
    work = stream.take_work()
    if work is None:
        return False, None
    stream.add_slices(work.slices)
    if work.task is not None:
        work.task()
    if work.registration is not None:
        stream.apply_registration(work.registration)
    outcome = None if work.job is None else stream.solve(work.job, work.epoch, bone_frame)
    stream.finish()
    return True, outcome


def drain(stream: RegistrationStream, max_steps: int = 100) -> list[Outcome]:
    """Step until nothing is due; return the outcomes of the solves."""
    outcomes = []
    for _ in range(max_steps):
        worked, outcome = step(stream)
        if not worked:
            return outcomes
        if outcome is not None:
            outcomes.append(outcome)
    raise AssertionError(f'work still due after {max_steps} steps')


def points(n: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-50.0, 50.0, (n, 3)).astype(np.float32)


def make(mode: str, clock: ManualClock | None = None, **kwargs: Any
         ) -> tuple[RegistrationStream, ScriptedRegistrar]:
    stream = RegistrationStream(mode, clock=clock or ManualClock(), **kwargs)
    registrar = ScriptedRegistrar()
    stream.use_registrar(registrar)
    return stream, registrar


# ---------------------------------------------------------------------------- registrar


def _protocol_members() -> dict[str, Any]:
    return {name: member for name, member in vars(Registrar).items()
            if not name.startswith('_') and (callable(member) or isinstance(member, property))}


def test_bone_registrar_satisfies_the_registrar_protocol() -> None:
    """Structurally, without a trained model: every member, with the same parameters."""
    members = _protocol_members()
    assert set(members) == {'surface_points', 'checkpoint_path', 'geometry_sha256',
                            'register', 'track', 'with_config', 'warm_up'}
    for name, member in members.items():
        actual = inspect.getattr_static(BoneRegistrar, name, None)
        assert actual is not None, f'BoneRegistrar has no {name}'
        if isinstance(member, property):
            assert isinstance(actual, property), f'BoneRegistrar.{name} is not a property'
            continue
        expected = list(inspect.signature(member).parameters)
        assert list(inspect.signature(actual).parameters) == expected, name


def test_the_scripted_registrar_is_a_registrar() -> None:
    assert isinstance(ScriptedRegistrar(), Registrar)
    assert not isinstance(object(), Registrar)


# ---------------------------------------------------------------------------- single


def test_single_mode_solves_only_the_newest_cloud_and_counts_the_dropped() -> None:
    stream, registrar = make('single')
    for i in range(3):  # the worker is busy elsewhere: they wait in the depth-1 slot
        stream.add_cloud(points(100 + i), 'robot', (10 + i) * _NS)
    (outcome,) = drain(stream)
    assert outcome.job.stamp_ns == 12 * _NS and len(outcome.job.points) == 102
    counts = stream.counts()
    assert (counts.dropped, counts.solves) == (2, 1)
    assert registrar.calls == [('register', 102)]


def test_a_cloud_in_another_frame_is_marked_for_a_lookup() -> None:
    stream, _ = make('single')
    stream.add_cloud(points(), 'robot', _NS, source_frame='camera')
    work = stream.take_work()
    assert work.job.frame_id == 'robot' and work.job.source_frame == 'camera'
    stream.add_cloud(points(), 'robot', 2 * _NS, source_frame='robot')
    stream.finish()
    assert stream.take_work().job.source_frame == ''


def test_bad_input_found_by_the_solver_is_a_rejected_input_and_ends_the_track() -> None:
    stream, registrar = make('track')
    stream.add_cloud(points(), 'robot', _NS)
    assert drain(stream)[0].result.accepted and stream.track is not None
    registrar.raises = InputError('too few valid points')
    stream.add_cloud(points(), 'robot', 2 * _NS)
    registrar.track_ok = False  # the track is tried, lost, and the fallback raises
    (outcome,) = drain(stream)
    assert outcome.result is None and 'too few' in outcome.error
    assert stream.track is None
    counts = stream.counts()
    assert (counts.rejected_inputs, counts.solves) == (1, 2)


def test_counters_change_only_under_the_lock() -> None:
    """A rejection counted while the worker holds the lock waits for it (no lost update)."""
    stream, _ = make('single')
    done = threading.Event()

    def reject() -> None:
        stream.reject_input()
        done.set()
    with stream._cond:  # what the worker holds while it counts solves and drops
        thread = threading.Thread(target=reject)
        thread.start()
        assert not done.wait(0.05), 'reject_input changed a counter without the lock'
    assert done.wait(THREAD_WAIT_S)
    thread.join()
    assert stream.counts().rejected_inputs == 1


# ---------------------------------------------------------------------------- sweep


def _sweep(clock: ManualClock, **config: Any) -> tuple[RegistrationStream, ScriptedRegistrar]:
    values = {'min_points': 500, 'voxel_mm': 0.0, 'settle_s': 0.3, 'max_wait_s': 2.0}
    return make('sweep', clock, sweep=SweepConfig(**{**values, **config}))


def test_a_sweep_is_solved_once_it_has_min_points_and_has_settled() -> None:
    clock = ManualClock()
    stream, registrar = _sweep(clock)
    stream.add_cloud(points(300, 1), 'robot', 100 * _NS)
    assert drain(stream) == []  # 300 < min_points
    stream.add_cloud(points(300, 2), 'robot', 101 * _NS)
    assert drain(stream) == []  # enough points, but slices still arrive
    clock.advance(0.29)
    assert drain(stream) == []
    clock.advance(0.02)  # settle_s without a new slice
    (outcome,) = drain(stream)
    assert (len(outcome.job.points), outcome.job.n_slices) == (600, 2)
    assert outcome.job.stamp_ns == 101 * _NS
    assert stream.counts().dropped == 0, 'slices merged into one solve are not dropped'


def test_a_streaming_sweep_is_solved_at_the_latest_after_max_wait_s() -> None:
    clock = ManualClock()
    stream, registrar = _sweep(clock)
    for i in range(40):  # a slice every 0.125 s: it never settles (settle_s 0.3)
        stream.add_cloud(points(100, i), 'robot', 100 * _NS + i * _NS // 8)
        outcomes = drain(stream)
        if outcomes:
            break
        clock.advance(0.125)
    # Due at the 5th slice (500 points, t = 0.5 s), solved max_wait_s = 2 s later.
    assert i == 20 and len(outcomes) == 1 and outcomes[0].job.n_slices == 21
    assert stream.counts().dropped == 0


def test_the_sweep_inbox_is_bounded_and_counts_what_it_drops() -> None:
    stream, _ = _sweep(ManualClock(), max_points=1000)
    for i in range(5):  # 5 x 300 points arrive before the worker takes any
        stream.add_cloud(points(300, i), 'robot', (100 + i) * _NS)
    work = stream.take_work()
    assert [piece.stamp_ns for piece in work.slices] == [102 * _NS, 103 * _NS, 104 * _NS]
    assert stream.counts().dropped == 2


def test_register_now_solves_a_small_sweep_and_reset_empties_it() -> None:
    stream, registrar = _sweep(ManualClock(), min_points=5000)
    assert stream.register_now() == (False, 'the sweep is empty')
    stream.add_cloud(points(300), 'robot', 100 * _NS)
    assert drain(stream) == []
    ok, message = stream.register_now()
    assert ok and '300 points' in message
    (outcome,) = drain(stream)
    assert len(outcome.job.points) == 300
    assert stream.reset() == 300 and stream.sweep_points == 0
    assert stream.register_now()[0] is False
    assert RegistrationStream('single').register_now() == (False, 'no model loaded yet')


def test_merging_a_sweep_does_not_block_arriving_clouds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Voxel downsampling (np.unique) runs outside the lock: the callback is never held up."""
    stream, _ = _sweep(ManualClock(), settle_s=0.0, voxel_mm=1.0)
    stored: list[tuple[str, bool]] = []

    def downsampler(where: str) -> Any:
        def downsample(pts: np.ndarray, voxel_mm: float) -> np.ndarray:
            if where not in {w for w, _ in stored}:  # a cloud arrives while this runs
                arrival = threading.Thread(target=stream.add_cloud,
                                           args=(points(10, 9), 'robot', 101 * _NS))
                arrival.start()
                arrival.join(THREAD_WAIT_S)
                stored.append((where, not arrival.is_alive()))
            return voxel_downsample(pts, voxel_mm)
        return downsample
    monkeypatch.setattr(stream_module, 'voxel_downsample', downsampler('slice'))
    monkeypatch.setattr(sweep_buffer_module, 'voxel_downsample', downsampler('merge'))
    stream.add_cloud(points(600), 'robot', 100 * _NS)
    assert len(drain(stream)) >= 1
    assert ('merge', True) in stored and ('slice', True) in stored, stored
    assert all(ok for _, ok in stored), f'a cloud waited for the lock during np.unique: {stored}'


def test_configure_replaces_the_sweep_and_checks_the_mode() -> None:
    stream, _ = _sweep(ManualClock())
    stream.add_cloud(points(300), 'robot', 100 * _NS)
    drain(stream)
    assert stream.sweep_points == 300
    stream.configure(sweep=SweepConfig(min_points=10))
    assert stream.sweep_points == 0 and stream.sweep_config.min_points == 10
    with pytest.raises(ValueError, match="'mode'"):
        stream.configure(mode='burst')
    with pytest.raises(ValueError, match="'mode'"):
        RegistrationStream('burst')


# ---------------------------------------------------------------------------- track


def _frames(stream: RegistrationStream, clock: ManualClock, registrar: ScriptedRegistrar):
    stamp = [1.0]

    def frame(step_s: float = 0.03, arrive_s: float = 0.03,
              frame_id: str = 'robot') -> tuple[int, int]:
        stamp[0] += step_s
        clock.advance(arrive_s)
        stream.add_cloud(points(), frame_id, int(stamp[0] * _NS))
        drain(stream)
        kinds = [kind for kind, _ in registrar.calls]
        return kinds.count('register'), kinds.count('track')
    return frame


def test_track_mode_tracks_from_the_last_accepted_pose_and_falls_back() -> None:
    clock = ManualClock()
    stream, registrar = make('track', clock, tracking=TrackingConfig(max_gap_s=2.0))
    frame = _frames(stream, clock, registrar)
    assert frame() == (1, 0)  # nothing to track from: a global registration
    assert frame() == (1, 1)  # tracked
    registrar.track_ok = False
    assert frame() == (2, 2)  # lost: registered from scratch at once
    registrar.track_ok = True
    assert frame(step_s=3.0) == (3, 2)  # a stamp gap longer than max_gap_s
    assert frame(frame_id='other_robot') == (4, 2)  # another frame
    assert frame(frame_id='other_robot') == (4, 3)
    registrar.accepted, registrar.track_ok = False, False
    assert frame(frame_id='other_robot') == (5, 4)  # lost, and the fallback is rejected
    assert frame(frame_id='other_robot') == (6, 4)  # nothing to track from
    assert stream.counts().tracked == 2


def test_the_gap_and_age_rules_follow_the_clock_and_the_stamps() -> None:
    clock = ManualClock()
    stream, registrar = make('track', clock)
    frame = _frames(stream, clock, registrar)
    assert frame() == (1, 0) and frame() == (1, 1)
    assert frame(step_s=-0.01) == (2, 1)  # a stamp going back is not tracked
    assert frame() == (2, 2)
    stream.configure(tracking=TrackingConfig(max_age_s=0.1))
    assert frame(arrive_s=0.2) == (3, 2)  # the last full registration is too old
    assert frame(arrive_s=0.05) == (3, 3)
    stream.configure(tracking=TrackingConfig(max_age_s=30.0, max_gap_s=1.0))
    assert frame(arrive_s=1.2) == (4, 3)  # stamps 30 ms apart, but it arrived 1.2 s later
    assert frame() == (4, 4)
    assert frame(arrive_s=0.5) == (4, 5)  # the anchor is kept while tracking
    assert stream.track.anchor_s == pytest.approx(clock() - 0.53)


def test_the_track_ends_on_reset_register_now_and_mode_model_config_changes() -> None:
    clock = ManualClock()
    stream, registrar = make('track', clock)
    frame = _frames(stream, clock, registrar)
    assert frame() == (1, 0) and frame() == (1, 1)
    stream.reset()
    assert frame() == (2, 1) and frame() == (2, 2)
    stream.configure(mode='single')
    stream.configure(mode='track')
    assert frame() == (3, 2)
    stream.set_registration(RegistrationConfig(gate_max_residual_mm=1.5))
    assert frame() == (4, 2) and registrar.configs == [RegistrationConfig(
        gate_max_residual_mm=1.5)]
    assert frame() == (4, 3)
    stream.use_registrar(registrar)  # a new model
    assert frame() == (5, 3)
    assert stream.register_now()[0]
    drain(stream)
    assert registrar.calls[-1][0] == 'register'
    stream.lookup_failed()
    assert stream.track is None and stream.counts().tf_failures == 1


#: The changes that void a solve in flight, and the reason each gives.
VOIDING_CHANGES = [
    (lambda stream, registrar: stream.reset(), 'reset'),
    (lambda stream, registrar: stream.configure(mode='single'), 'mode change'),
    (lambda stream, registrar: stream.set_registration(RegistrationConfig(
        gate_min_uniqueness_z=8.0)), 'registration config change'),
    (lambda stream, registrar: stream.use_registrar(registrar), 'model change'),
    (lambda stream, registrar: stream.change_frames(), 'frame change'),
]


def test_a_reset_during_a_solve_voids_its_track() -> None:
    stream, registrar = make('track')
    stream.add_cloud(points(), 'robot', _NS)
    work = stream.take_work()
    stream.reset()  # while the solve runs
    outcome = stream.solve(work.job, work.epoch, 'bone')
    assert outcome.result.accepted and stream.track is None


@pytest.mark.parametrize('change, reason', VOIDING_CHANGES)
def test_a_reset_or_change_after_the_job_was_taken_voids_its_result(change, reason) -> None:
    stream, registrar = make('track')
    stream.add_cloud(points(), 'robot', _NS)
    work = stream.take_work()
    change(stream, registrar)  # while the solve runs: judged by the old data or gates
    outcome = stream.solve(work.job, work.epoch, 'bone', work.voids)
    assert outcome.voided == reason and outcome.result.accepted and stream.track is None
    stream.finish()
    # What is taken after the change stands, and the same call without a change too.
    stream.add_cloud(points(), 'robot', _NS + 1)
    work = stream.take_work()
    while work.job is None:  # a queued registration config is applied first
        if work.registration is not None:
            stream.apply_registration(work.registration)
        stream.finish()
        work = stream.take_work()
    outcome = stream.solve(work.job, work.epoch, 'bone', work.voids)
    assert outcome.voided == '' and outcome.result.accepted


@pytest.mark.parametrize('change, reason', VOIDING_CHANGES)
def test_a_change_between_the_solve_and_the_broadcast_voids_it(change, reason) -> None:
    stream, registrar = make('track')
    stream.add_cloud(points(), 'robot', _NS)
    work = stream.take_work()
    outcome = stream.solve(work.job, work.epoch, 'bone', work.voids)
    assert outcome.voided == '' and outcome.result.accepted
    sent = []
    # Standing: the broadcast runs (under the lock) and its value comes back.
    assert stream.commit(outcome, lambda: sent.append(1) or 'published') == ('', 'published')
    change(stream, registrar)  # after the solve, before its broadcast
    assert stream.commit(outcome, lambda: sent.append(2)) == (reason, None)
    assert sent == [1]
    voided = Outcome(outcome.job, 'bone', result=outcome.result, voided='reset',
                     voids=stream._voided)
    assert stream.commit(voided, lambda: sent.append(3)) == ('reset', None) and sent == [1]


def test_a_change_during_the_broadcast_waits_for_it() -> None:
    stream, registrar = make('single')
    stream.add_cloud(points(), 'robot', _NS)
    work = stream.take_work()
    outcome = stream.solve(work.job, work.epoch, 'bone', work.voids)
    started, release, order = threading.Event(), threading.Event(), []

    def send() -> str:
        started.set()
        release.wait(THREAD_WAIT_S)
        order.append('sent')
        return 'published'

    sender = threading.Thread(target=stream.commit, args=(outcome, send))
    sender.start()
    assert started.wait(THREAD_WAIT_S)
    resetter = threading.Thread(target=lambda: order.append(('reset', stream.reset())))
    resetter.start()
    resetter.join(0.2)
    assert resetter.is_alive() and order == []  # the reset waits for the broadcast
    release.set()
    sender.join(THREAD_WAIT_S)
    resetter.join(THREAD_WAIT_S)
    assert order[0] == 'sent' and order[1][0] == 'reset'


@pytest.mark.parametrize('change', [
    lambda stream: stream.reset(),
    lambda stream: stream.configure(sweep=SweepConfig(min_points=100)),
])
def test_slices_taken_before_a_reset_or_new_sweep_do_not_enter_the_next(change) -> None:
    stream, registrar = make('sweep', sweep=SweepConfig(min_points=100))
    stream.add_cloud(points(500), 'robot', _NS)
    work = stream.take_work()
    assert len(work.slices) == 1 and stream.takes_slices_of(work.generation)
    change(stream)  # while the worker looks the slices' frames up
    assert not stream.takes_slices_of(work.generation)
    assert stream.add_slices(work.slices, work.generation) == []
    stream.finish()
    assert stream.sweep_points == 0 and stream.counts().dropped == 1
    assert drain(stream) == []  # nothing is solved from the old slices
    # Slices taken after the change go in.
    stream.add_cloud(points(500, seed=1), 'robot', 2 * _NS)
    work = stream.take_work()
    stream.add_slices(work.slices, work.generation)
    stream.finish()
    assert stream.sweep_points > 0


def test_a_changed_bone_frame_is_not_tracked_across() -> None:
    stream, registrar = make('track')
    stream.add_cloud(points(), 'robot', _NS)
    drain(stream)
    stream.add_cloud(points(), 'robot', _NS + 30_000_000)
    work = stream.take_work()
    stream.solve(work.job, work.epoch, 'femur')
    assert [kind for kind, _ in registrar.calls] == ['register', 'register']


# ---------------------------------------------------------------------------- worker side


def test_next_work_blocks_until_due_and_returns_none_once_closed() -> None:
    clock = ManualClock()
    stream, _ = _sweep(clock)
    outcomes: list[Outcome] = []

    def worker() -> None:  # the node's worker loop, without frame lookups
        while (work := stream.next_work()) is not None:
            stream.add_slices(work.slices)
            if work.job is not None:
                outcomes.append(stream.solve(work.job, work.epoch, 'bone'))
    thread = threading.Thread(target=worker)
    thread.start()
    stream.add_cloud(points(600), 'robot', 100 * _NS)
    assert stream.wait_for(lambda counts: stream.sweep_points == 600 and not stream.busy,
                           THREAD_WAIT_S)
    assert outcomes == []  # due only settle_s later, on the stream's clock
    clock.advance(1.0)
    stream.wake()
    assert stream.wait_idle(THREAD_WAIT_S)
    assert len(outcomes) == 1 and len(outcomes[0].job.points) == 600
    stream.close()
    thread.join(THREAD_WAIT_S)
    assert not thread.is_alive()


def test_wait_idle_waits_for_work_in_flight() -> None:
    stream, _ = make('single')
    stream.add_cloud(points(), 'robot', _NS)
    assert not stream.wait_idle(0.0)
    work = stream.take_work()
    assert stream.busy and not stream.wait_idle(0.0)
    stream.solve(work.job, work.epoch, 'bone')
    stream.finish()
    assert stream.wait_idle(0.0)


def test_posted_tasks_replace_each_other_and_run_first() -> None:
    stream = RegistrationStream('single', clock=ManualClock())
    ran = []
    stream.post(lambda: ran.append('old model'))
    stream.post(lambda: ran.append('new model'))
    assert stream.has_model()
    assert step(stream) == (True, None)
    assert ran == ['new model'] and not stream.has_model()


@pytest.mark.parametrize('bounds', [(float('nan'), 1.0, 10), (1.0, float('nan'), 10),
                                    (float('inf'), 1.0, 10), (0.0, 1.0, 10), (1.0, -1.0, 10),
                                    (1.0, 1.0, 0)])
def test_sweep_buffer_refuses_bounds_that_are_not_finite_and_in_range(bounds) -> None:
    # voxel_mm nan would collapse every slice into one point; max_age_s nan crash add().
    with pytest.raises(ValueError, match='must be finite'):
        SweepBuffer(*bounds)


def test_sweep_buffer_bounds_age_and_size() -> None:
    buffer = SweepBuffer(max_age_s=1.0, voxel_mm=0.0, max_points=1000)
    pts = np.random.default_rng(0).uniform(0, 100, (400, 3)).astype(np.float32)
    buffer.add(pts, 'robot', 0)
    buffer.add(pts + 1, 'robot', 500_000_000)
    assert buffer.n_points == 800
    buffer.add(pts + 2, 'robot', 1_200_000_000)  # the first slice is now 1.2 s old
    assert buffer.n_points == 800 and buffer.snapshot().n_slices == 2
    buffer.add(pts + 3, 'robot', 1_300_000_000)
    buffer.add(pts + 4, 'robot', 1_400_000_000)  # over max_points: the oldest slices drop
    assert buffer.n_points <= 1000
    assert buffer.add(pts, 'other_frame', 1_500_000_000)  # a frame change starts a new sweep
    assert buffer.n_points == 400 and buffer.frame_id == 'other_frame'
    dense = np.zeros((50, 3), np.float32)
    assert len(voxel_downsample(dense, 1.0)) == 1
