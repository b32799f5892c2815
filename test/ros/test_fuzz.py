"""Fuzz the registration node: hostile clouds by class, floods, then one good cloud (issue 10).

One ``registration_node`` process (mode single, preset fast, the small test search, the
package's params file otherwise: default cloud QoS) gets, from this process over real DDS:
every case of ``fuzz_support`` (headers, stamps, sizes, field tables, values, seeded random
mutants), malformed raw CDR, degenerate geometry, a best-effort publisher its reliable
subscription cannot match, and floods at 200 Hz. It must stay alive, broadcast no tf for any
of them, explain each with a diagnostic, and then register a good 640 x 480 RGB-D cloud.
Seeded (``NEURAL_BONE_REG_FUZZ_SEED`` picks another seed for exploration) and bounded: about
a minute on two cores once the phantom model is cached.
"""

from __future__ import annotations

import os
import time
from typing import Any, Iterator, Optional

from diagnostic_msgs.msg import DiagnosticStatus
from fuzz_support import (BASE_SEC, Case, degenerate, flood, good_points_m, hostile_cases,
                          organised_rgbd_cloud)
import numpy as np
from process_support import NodeProcess, Probe, START_TIMEOUT_S
import pytest
from rclpy.duration import Duration
from rclpy.qos import qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sensor_msgs.msg import PointCloud2

from neural_bone_reg.ros.conversions import transform_stamped_to_matrix
from neural_bone_reg.ros.diagnostics import MAX_MESSAGE_CHARS
from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS
from ros_test_support import (CONFIG_DIR, find_executable, flat_parameters,
                              matched_publisher, MESSAGE_TIMEOUT_S, rotation_error_deg,
                              shared_cache_dir, small_configs, SOLVE_TIMEOUT_S, status_values,
                              trained_phantom, write_params_file)

FUZZ_SEED = int(os.environ.get('NEURAL_BONE_REG_FUZZ_SEED', '10'))
#: Seeded random mutants on top of the listed cases.
N_RANDOM = 60
#: Clouds in each flood, and their rate.
FLOOD_SIZE = 300
FLOOD_RATE_HZ = 200.0
#: Raw CDR messages (truncated or garbage) sent among the flood; the middleware drops them.
N_RAW = 20
NODE = 'registration_fuzz'
TOPIC = '/fuzz/points'
GOOD_FRAME = 'fuzz_good'
#: Seconds for the diagnostic of an input refused on arrival.
INPUT_TIMEOUT_S = MESSAGE_TIMEOUT_S
#: Heartbeats with unchanged counters after which a flood counts as fully handled.
SETTLED_HEARTBEATS = 2
MAX_ROTATION_ERROR_DEG = 2.0
MAX_TRANSLATION_ERROR_MM = 2.0
#: Phrases no diagnostic of a cloud on the metre wire may use (issue 10).
MISLEADING = ('Is it in metres', 'expected mm', 'empty (or all NaN)')

pytestmark = pytest.mark.skipif(find_executable('registration_node') is None,
                                reason='node executables not installed: run `make setup` '
                                       '(pip install -e .) or colcon build + source install')


@pytest.fixture(scope='module')
def fuzz(tmp_path_factory: pytest.TempPathFactory, ros_domain_id: int) -> Iterator[dict]:
    """Start a registration node process on the cached phantom checkpoint, and a probe."""
    cache = shared_cache_dir(tmp_path_factory.getbasetemp())
    registrar = trained_phantom(cache)
    work = tmp_path_factory.mktemp('fuzz')
    params = write_params_file(work / 'fuzz.yaml', {
        'preset': 'fast', 'mode': 'single', 'checkpoint': str(registrar.checkpoint_path),
        **flat_parameters(small_configs(), ('registration',))})
    probe = Probe('fuzz_probe')
    node = NodeProcess('registration_node', [
        '--ros-args', '-r', f'__node:={NODE}', '--params-file',
        str(CONFIG_DIR / 'registration_node.yaml'), '--params-file', str(params),
        '-r', f'points:={TOPIC}', '-r', 'model:=/fuzz/model'], work / f'{NODE}.log')
    try:
        loaded = probe.wait_diag(f'{NODE}: model', START_TIMEOUT_S, level=DiagnosticStatus.OK)
        assert loaded is not None, node.log()
        pub = matched_publisher(probe.node, PointCloud2, TOPIC, CLOUD_PUBLISHER_QOS)
        yield {'probe': probe, 'node': node, 'pub': pub, 'bad_frames': set(),
               'degenerate_frames': set()}
    finally:
        code = node.stop()
        probe.close()
        assert code == 0, f'the node exited with {code}\n' + node.log()


def _diagnostic(probe: Probe, case: Case, timeout_s: float, start: int) -> Optional[Any]:
    """Return the node's non-heartbeat status whose stamp is the case's marker, or None."""
    def match(array: Any) -> Optional[Any]:
        for status in array.status:
            if (status.name.startswith(f'/{NODE}: ') and not status.name.endswith(': model')
                    and status_values(status).get('stamp') == case.marker):
                return status
        return None
    array = probe.diags.wait_for(lambda a: match(a) is not None, timeout_s, start)
    return None if array is None else match(array)


def _problems(case: Case, status: Optional[Any]) -> list[str]:
    """Return what is wrong with the node's answer to a case ([] if nothing)."""
    if status is None:
        return [f'{case.name}: no diagnostic']
    problems = []
    if status.level not in (DiagnosticStatus.ERROR, DiagnosticStatus.WARN) or (
            case.stage == 'input' and status.level != DiagnosticStatus.ERROR):
        problems.append(f'{case.name}: level {status.level!r}: {status.message}')
    if 'no transform broadcast' not in status.message or len(status.message) > MAX_MESSAGE_CHARS:
        problems.append(f'{case.name}: unexplained or too long: {status.message[:200]}')
    if case.group != 'degenerate' and any(p in status.message for p in MISLEADING):
        problems.append(f'{case.name}: misleading: {status.message[:300]}')
    return problems


def test_every_hostile_cloud_is_explained_and_gets_no_tf(fuzz: dict) -> None:
    probe, node, pub = fuzz['probe'], fuzz['node'], fuzz['pub']
    cases = hostile_cases(FUZZ_SEED, N_RANDOM)
    problems: list[str] = []
    started = time.monotonic()
    for case in cases:
        start = probe.diags.count()
        pub.publish(case.msg)
        timeout = INPUT_TIMEOUT_S if case.stage == 'input' else SOLVE_TIMEOUT_S
        problems += _problems(case, _diagnostic(probe, case, timeout, start))
        fuzz['bad_frames'].add(case.msg.header.frame_id)
        assert node.alive(), f'the node died on {case.name}\n' + node.log()
    elapsed = time.monotonic() - started
    assert not problems, f'{len(problems)} of {len(cases)} cases:\n' + '\n'.join(problems)
    assert not probe.parents_seen(), f'tf broadcast for hostile input: {probe.parents_seen()}'
    assert elapsed < len(cases) * INPUT_TIMEOUT_S  # informative bound; each takes milliseconds


def test_malformed_cdr_and_an_incompatible_publisher_do_not_stop_the_node(fuzz: dict) -> None:
    probe, node, pub = fuzz['probe'], fuzz['node'], fuzz['pub']
    good = organised_rgbd_cloud(good_points_m(1)[1], 'fuzz_raw', 1)
    raw = serialize_message(good)
    rng = np.random.default_rng(FUZZ_SEED)
    for i in range(N_RAW):  # truncated, or garbage after the header: rmw must drop them
        cut = int(rng.integers(1, len(raw)))
        pub.publish(raw[:cut] if i % 2 else raw[:64] + rng.bytes(int(rng.integers(0, 4096))))
        # One at a time: back to back, MB-sized samples fill the reliable writer's history on
        # a loaded machine and the fuzzer's own publish fails (seen in CI), not the node.
        pub.wait_for_all_acked(Duration(seconds=MESSAGE_TIMEOUT_S))
    start = probe.diags.count()
    best_effort = probe.node.create_publisher(PointCloud2, TOPIC, qos_profile_sensor_data)
    status = probe.wait_diag(f'{NODE}: input', MESSAGE_TIMEOUT_S, level=DiagnosticStatus.ERROR,
                             start=start)
    assert status is not None and 'incompatible' in status.message, node.log()
    beat = probe.next_heartbeat(NODE)
    assert int(beat.get('incompatible_publishers', 0)) >= 1, beat
    probe.node.destroy_publisher(best_effort)
    assert node.alive(), node.log()


@pytest.mark.parametrize('index', range(3), ids=['three_distinct_points', 'collinear',
                                                 'planar_thin'])
def test_degenerate_clouds_get_no_tf(fuzz: dict, index: int) -> None:
    probe, node, pub = fuzz['probe'], fuzz['node'], fuzz['pub']
    case = degenerate(BASE_SEC + 100_000)[index]
    fuzz['degenerate_frames'].add(case.msg.header.frame_id)
    start = probe.diags.count()
    pub.publish(case.msg)
    status = _diagnostic(probe, case, SOLVE_TIMEOUT_S, start)
    assert not _problems(case, status), _problems(case, status)
    assert case.msg.header.frame_id not in probe.parents_seen(), status.message
    assert node.alive(), node.log()


def _settled_counters(probe: Probe) -> dict[str, str]:
    """Return the heartbeat once its counters stop changing (or the last one seen)."""
    last: dict[str, str] = {}
    same = 0
    deadline = time.monotonic() + SOLVE_TIMEOUT_S
    while same < SETTLED_HEARTBEATS and time.monotonic() < deadline:
        beat = probe.next_heartbeat(NODE)
        keys = ('clouds_received', 'inputs_rejected', 'solves', 'worker_busy')
        same = same + 1 if beat and all(beat.get(k) == last.get(k) for k in keys) else 0
        last = beat or last
    return last


def test_floods_are_refused_without_crash_backlog_or_tf(fuzz: dict) -> None:
    probe, node, pub = fuzz['probe'], fuzz['node'], fuzz['pub']
    messages = flood(hostile_cases(FUZZ_SEED, N_RANDOM), FLOOD_SIZE)
    for round_ in range(2):  # twice: the second flood must find the node as the first left it
        before = _settled_counters(probe)
        period = 1.0 / FLOOD_RATE_HZ
        next_time = time.monotonic()
        for msg in messages:
            pub.publish(msg)
            next_time += period
            time.sleep(max(0.0, next_time - time.monotonic()))
        after = _settled_counters(probe)
        received = int(after['clouds_received']) - int(before['clouds_received'])
        rejected = int(after['inputs_rejected']) - int(before['inputs_rejected'])
        assert 0 < received <= FLOOD_SIZE, (received, before, after)
        assert rejected == received, f'round {round_}: {received} received, {rejected} refused'
        assert after['solves'] == before['solves'], 'a flood cloud reached the solver'
        assert after['broadcasts'] == before['broadcasts']
        assert node.alive(), node.log()
    assert not probe.parents_seen() - fuzz['degenerate_frames']


def test_a_good_rgbd_cloud_then_registers_and_is_broadcast(fuzz: dict) -> None:
    probe, node, pub = fuzz['probe'], fuzz['node'], fuzz['pub']
    pose, points_m = good_points_m(FUZZ_SEED + 1)
    msg = organised_rgbd_cloud(points_m, GOOD_FRAME, time.time_ns(), seed=FUZZ_SEED)
    assert (msg.height, msg.width, len(msg.data)) == (480, 640, 4_915_200)
    probe.deliver(NODE, pub, msg)
    transform = probe.wait_tf(GOOD_FRAME, 'bone', SOLVE_TIMEOUT_S)
    assert transform is not None, 'no tf for the good cloud after the fuzzing\n' + node.log()
    estimate = transform_stamped_to_matrix(transform)
    assert rotation_error_deg(estimate[:3, :3], pose[:3, :3]) < MAX_ROTATION_ERROR_DEG
    assert np.linalg.norm(estimate[:3, 3] - pose[:3, 3]) < MAX_TRANSLATION_ERROR_MM
    assert probe.parents_seen() - fuzz['degenerate_frames'] == {GOOD_FRAME}, (
        'tf for a hostile input')
    assert node.alive(), node.log()
