"""``neural-bone-reg demo``: the whole pipeline end to end, as separate processes over real DDS.

On a private DDS domain (random ROS_DOMAIN_ID, localhost-only discovery) the demo starts the
preop loader, the registration node and a bag replay as child processes, waits for the
bone transform on tf, and compares it with the true pose recorded in the bag. Without
``--bag`` it first simulates the sensor with ``make-bag``: a tracked-ultrasound sweep in the
robot frame (``--sensor us``, registered as one sweep), or an RGB-D camera stream in the
camera's optical frame (``--sensor rgbd``, registered once and then tracked frame to frame).
For a camera, the node broadcasts camera -> bone (it does no tf lookups here), and the demo
composes it with the camera mount from the bag's /tf_static to compare robot -> bone with the
truth. The exit code is 0 only when the transform was accepted (only accepted results reach
tf) and lies within 2 degrees and 2 mm of the truth. The child processes are always
terminated.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Optional

#: Acceptance of the demo: the error of the broadcast pose against the bag's truth.
MAX_ROTATION_ERROR_DEG = 2.0
MAX_TRANSLATION_ERROR_MM = 2.0
#: Default seconds to wait for the transform, training the bone model included.
DEFAULT_TIMEOUT_S = 1200.0
#: Domain ids the demo draws from (Fast DDS ports stay valid up to 232).
DOMAIN_ID_RANGE = (1, 200)
#: Seconds given to a child process to exit after SIGINT, then after SIGTERM.
CHILD_EXIT_TIMEOUT_S = 10.0
#: Seconds the replay waits, after its cloud topic has matched every expected subscriber, for
#: the replay publishers themselves to be matched (same participant: endpoint discovery only).
REPLAY_DELAY_S = 1.0
#: Seconds the replay waits for the registration node and the demo to subscribe to the clouds.
#: A new participant's discovery can take a few seconds on a loaded machine (a missed initial
#: announcement is repeated only after the lease period).
REPLAY_DISCOVERY_TIMEOUT_S = 30.0
#: Seconds between two printed training progress messages.
PROGRESS_PERIOD_S = 15.0
#: Seconds to wait for the diagnostics that follow a transform.
MESSAGE_WAIT_S = 5.0
#: Lines of a child's log printed when something fails.
LOG_TAIL_LINES = 25
DEFAULT_TRUTH_FRAME = 'bone_truth'
BONE_FRAME = 'bone'
PACKAGE = 'neural_bone_reg'
#: What ``--sensor`` simulates (``make-bag --sensor``), and the node mode each bag gets by
#: default: a probe sweep is accumulated; camera frames (organized clouds) are registered
#: once and then tracked at the camera rate from the newest frame, without backlog.
SENSORS = ('us', 'rgbd')
MODES = ('auto', 'sweep', 'single', 'track')
SWEEP_MODE, CAMERA_MODE = 'sweep', 'track'
#: Fast DDS transports for camera-sized messages (MBs at video rate): shared memory and TCP
#: for data, UDP for discovery. Set for --sensor rgbd unless the environment chooses its own.
LARGE_DATA_TRANSPORTS = ('FASTDDS_BUILTIN_TRANSPORTS', 'LARGE_DATA')


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``demo`` command to the CLI's subparsers."""
    demo = subparsers.add_parser(
        'demo', help='run preop loader, registration node and a sweep replay over ROS 2',
        description='End-to-end demo over real DDS on a private domain: train or load the bone '
                    'model, replay a probe sweep bag, wait for the bone pose on tf and compare '
                    "it with the true pose on the bag's /tf_static. Exit 0 only if the pose "
                    f'is within {MAX_ROTATION_ERROR_DEG:g} deg and {MAX_TRANSLATION_ERROR_MM:g} '
                    'mm of the truth.')
    demo.add_argument('--mesh', help='preoperative bone mesh (STL/PLY/OBJ, mm); default: the '
                                     'embedded phantom femur')
    demo.add_argument('--bag', help='bag with the true pose on /tf_static or /tf (from '
                                    '`make-bag`); default: simulate one from --mesh')
    demo.add_argument('--timeout', type=float, default=DEFAULT_TIMEOUT_S,
                      help='seconds to wait for the transform, training included '
                           f'(default {DEFAULT_TIMEOUT_S:g})')
    demo.add_argument('--sensor', choices=SENSORS, default='us',
                      help='what to simulate without --bag: a tracked-ultrasound sweep (us, '
                           'the default) or an RGB-D camera stream (rgbd)')
    demo.add_argument('--mode', choices=MODES, default='auto',
                      help=f"registration node mode (default auto: '{SWEEP_MODE}' for sweep "
                           f"bags, '{CAMERA_MODE}' for organized camera clouds)")
    demo.add_argument('--seed', type=int, default=0, help='seed of the simulated sensor')
    demo.add_argument('--make-bag-args', default='', metavar='ARGS',
                      help='extra make-bag options for the simulated bag, as one string '
                           "(e.g. '--resolution 320x240 --frames 30')")
    demo.add_argument('--truth-frame', default=DEFAULT_TRUTH_FRAME,
                      help=f'child frame of the true pose in the bag (default '
                           f'{DEFAULT_TRUTH_FRAME})')
    demo.add_argument('--cache-dir', default='',
                      help='model cache folder (default: $NEURAL_BONE_REG_CACHE or '
                           '~/.cache/neural_bone_reg)')
    demo.add_argument('--device', default='auto', choices=('auto', 'cpu', 'cuda'))
    demo.add_argument('--preset', default='', choices=('', 'default', 'paper', 'fast'),
                      help="registration preset for the node (default: the params file's)")
    demo.add_argument('--preop-params', action='append', default=[], metavar='YAML',
                      help='extra params file for the preop loader, after the package one '
                           '(repeatable; e.g. a smaller train.* for a quick run)')
    demo.add_argument('--registration-params', action='append', default=[], metavar='YAML',
                      help='extra params file for the registration node (repeatable)')
    demo.add_argument('--keep', action='store_true',
                      help='keep the work folder (bag, logs) instead of deleting it')
    demo.set_defaults(func=run_demo)


# ------------------------------------------------------------------------- files and processes


def find_executable(name: str) -> str:
    """Return an installed node executable: colcon's lib/<pkg>, the venv's bin, or PATH."""
    prefixes = [Path(sys.prefix)]
    prefixes += [Path(p) for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p]
    for prefix in prefixes:
        for candidate in (prefix / 'lib' / PACKAGE / name, prefix / 'bin' / name):
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f'cannot find the {name} executable; run `make setup` '
                                '(pip install -e .) or source a colcon install')
    return found


def find_config(name: str) -> Path:
    """Return config/<name> from the installed share folder, else from the source tree."""
    try:
        from ament_index_python.packages import get_package_share_directory
        path = Path(get_package_share_directory(PACKAGE)) / 'config' / name
        if path.is_file():
            return path
    except Exception:  # not indexed (pip -e install): fall back to the source tree
        pass
    path = Path(__file__).resolve().parents[3] / 'config' / name
    if not path.is_file():
        raise FileNotFoundError(f'cannot find config/{name} (installed share or source tree)')
    return path


class Child:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f'{name}.log'
        self._log = open(self.log_path, 'wb')
        self.popen = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)

    def alive(self) -> bool:
        """Tell whether the process still runs."""
        return self.popen.poll() is None

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the process's output."""
        self._log.flush()
        text = self.log_path.read_text(errors='replace').splitlines()
        return '\n'.join(f'  [{self.name}] {line}' for line in text[-lines:])

    def stop(self) -> Optional[int]:
        """Stop the process: SIGINT, then SIGTERM, then SIGKILL; return its exit code."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.popen.poll() is not None:
                break
            self.popen.send_signal(sig)
            try:
                self.popen.wait(CHILD_EXIT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                continue
        self._log.close()
        return self.popen.returncode


def read_bag(path: Path, truth_frame: str) -> dict[str, Any]:
    """Return what the demo needs from a bag: its cloud topic and frame, the cloud count and
    last stamp, whether clouds are organized, the true pose and the cloud frame's mount.

    The truth is ``truth_frame`` on /tf_static (``truth``) or, for a moving bone, on /tf by
    stamp (``truth_by_stamp``). ``mount`` is T_parent_cloudframe with the truth's parent: the
    identity when the clouds are in that frame, else the static transform between the two
    recorded on /tf_static (a camera mount), or None when the bag has none.
    """
    import numpy as np
    from sensor_msgs.msg import PointCloud2
    from tf2_msgs.msg import TFMessage

    from neural_bone_reg.ros.bag import deserialized, open_bag
    from neural_bone_reg.ros.conversions import cloud_to_xyz, transform_stamped_to_matrix

    info: dict[str, Any] = {'truth': None, 'robot_frame': '', 'last_stamp_ns': None, 'count': 0,
                            'truth_by_stamp': {}, 'organized': False, 'truth_parent': ''}
    point_sum, point_count = 0.0, 0
    static: dict[tuple[str, str], Any] = {}
    with open_bag(path) as reader:
        clouds = [c for c in reader.connections if c.msgtype == 'sensor_msgs/msg/PointCloud2']
        if len({c.topic for c in clouds}) != 1:
            raise ValueError(f'bag {path} must hold exactly one PointCloud2 topic, has '
                             f'{sorted({c.topic for c in clouds})}')
        info['topic'] = clouds[0].topic
        for _, _, data in reader.messages(connections=clouds):
            cloud = deserialized(data, PointCloud2, info['topic'])
            header = cloud.header
            points = cloud_to_xyz(cloud)
            point_sum = point_sum + points.astype('float64').sum(axis=0)
            point_count += len(points)
            stamp = _stamp_ns(header.stamp)
            info['count'] += 1
            info['robot_frame'] = header.frame_id
            info['organized'] = info['organized'] or cloud.height > 1
            if info['last_stamp_ns'] is None or stamp > info['last_stamp_ns']:
                info['last_stamp_ns'] = stamp
        for topic in ('/tf_static', '/tf'):
            connections = [c for c in reader.connections if c.topic == topic]
            if not connections:
                continue  # (rosbags reads every topic for an empty list)
            for _, _, data in reader.messages(connections=connections):
                for transform in deserialized(data, TFMessage, topic).transforms:
                    matrix = transform_stamped_to_matrix(transform)
                    parent = transform.header.frame_id
                    if transform.child_frame_id == truth_frame:
                        info['truth_parent'] = parent
                        if topic == '/tf_static':
                            info['truth'] = matrix
                        else:
                            info['truth_by_stamp'][_stamp_ns(transform.header.stamp)] = matrix
                    elif topic == '/tf_static':
                        static[(parent, transform.child_frame_id)] = matrix
    if info['count'] == 0 or point_count == 0:
        raise ValueError(f'bag {path} holds no clouds (or only empty ones)')
    info['centroid'] = point_sum / point_count
    parent, frame = info['truth_parent'], info['robot_frame']
    info['mount'] = np.eye(4) if parent in ('', frame) else static.get((parent, frame))
    return info


# ------------------------------------------------------------------------- the demo


class _Watcher:
    """The demo's own node: latched model, tf, diagnostics and the cloud topic."""

    def __init__(self, cloud_topic: str, robot_frame: str) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import qos_profile_sensor_data
        from sensor_msgs.msg import PointCloud2
        from std_msgs.msg import String
        from tf2_msgs.msg import TFMessage

        from neural_bone_reg.ros.qos import DIAGNOSTICS_QOS, LATCHED_QOS
        from neural_bone_reg.ros.tf_compat import DYNAMIC_LISTENER_QOS

        self.robot_frame = robot_frame
        self.cond = threading.Condition()
        self.model: Optional[str] = None
        self.cloud_times: dict[int, float] = {}
        self.transforms: list[tuple[float, Any]] = []
        self.statuses: dict[str, Any] = {}
        self.heartbeats: list[tuple[float, dict[str, str]]] = []
        self.results: dict[str, Any] = {}
        self.node = rclpy.create_node('neural_bone_reg_demo')
        self.node.create_subscription(String, 'model', self.on_model, LATCHED_QOS)
        self.node.create_subscription(TFMessage, '/tf', self.on_tf, DYNAMIC_LISTENER_QOS)
        self.node.create_subscription(DiagnosticArray, '/diagnostics', self.on_diagnostics,
                                      DIAGNOSTICS_QOS)
        self.node.create_subscription(PointCloud2, cloud_topic, self.on_cloud,
                                      qos_profile_sensor_data)
        self.executor = SingleThreadedExecutor()
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def on_model(self, msg: Any) -> None:
        with self.cond:
            self.model = msg.data
            self.cond.notify_all()

    def on_cloud(self, msg: Any) -> None:
        received = time.monotonic()
        with self.cond:
            self.cloud_times.setdefault(_stamp_ns(msg.header.stamp), received)

    def on_tf(self, msg: Any) -> None:
        received = time.monotonic()
        with self.cond:
            for transform in msg.transforms:
                if (transform.header.frame_id == self.robot_frame
                        and transform.child_frame_id == BONE_FRAME):
                    self.transforms.append((received, transform))
            self.cond.notify_all()

    def on_diagnostics(self, msg: Any) -> None:
        with self.cond:
            for status in msg.status:
                self.statuses[status.name] = status
                if status.name.endswith('registration_node: registration'):
                    values = {kv.key: kv.value for kv in status.values}
                    self.results[values.get('stamp', '')] = status
                if status.name.endswith('registration_node: model'):
                    self.heartbeats.append(
                        (time.monotonic(), {kv.key: kv.value for kv in status.values}))
            self.cond.notify_all()

    def wait(self, predicate: Any, timeout_s: float, children: list[Child]) -> bool:
        """Wait for ``predicate()`` (under the lock); False on timeout or a child's death."""
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while not predicate():
                if any(not c.alive() for c in children):
                    return False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 1.0))  # re-check the children once a second
        return True

    def status(self, name_part: str) -> Any:
        for name, status in self.statuses.items():
            if name_part in name:
                return status
        return None

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(CHILD_EXIT_TIMEOUT_S)
        self.node.destroy_node()


def _fail(message: str, children: list[Child]) -> int:
    print(f'demo: FAILED: {message}', file=sys.stderr)
    for child in children:
        print(f'--- last output of {child.name} '
              f'({"running" if child.alive() else f"exit {child.popen.returncode}"}):',
              file=sys.stderr)
        print(child.tail(), file=sys.stderr)
    return 1


def run_demo(args: argparse.Namespace) -> int:
    """Run the end-to-end demo; return 0 only for an accepted pose within tolerance."""
    domain_id = random.SystemRandom().randint(*DOMAIN_ID_RANGE)
    os.environ['ROS_DOMAIN_ID'] = str(domain_id)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    env = dict(os.environ)
    work = Path(tempfile.mkdtemp(prefix='neural_bone_reg_demo_'))
    children: list[Child] = []
    print(f'demo: ROS_DOMAIN_ID={domain_id}, localhost only; work folder {work}')
    state: dict[str, Any] = {}
    try:
        return _run(args, env, work, children, state)
    finally:
        watcher = state.get('watcher')
        for child in reversed(children):
            child.stop()
        if watcher is not None:
            watcher.close()
        if state.get('rclpy'):
            import rclpy
            rclpy.try_shutdown()
        if args.keep:
            print(f'demo: kept {work}')
        else:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, env: dict[str, str], work: Path, children: list[Child],
         state: dict[str, Any]) -> int:
    import numpy as np

    from neural_bone_reg.core.metrics import rre_deg, rte_mm
    from neural_bone_reg.core.se3 import apply_transform, invert_transform
    from neural_bone_reg.ros.conversions import transform_stamped_to_matrix
    from neural_bone_reg.ros.model_info import decode_model_info

    started = time.monotonic()
    mesh = str(Path(args.mesh).resolve()) if args.mesh else 'phantom'
    if args.bag:
        bag = Path(args.bag)
    else:
        bag = work / f'{args.sensor}_bag'
        argv = [sys.executable, '-m', 'neural_bone_reg.cli.main', 'make-bag', '--out', str(bag),
                '--sensor', args.sensor, '--seed', str(args.seed), '--truth-frame',
                args.truth_frame, *shlex.split(args.make_bag_args)]
        if args.mesh:
            argv += ['--mesh', mesh]
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout + result.stderr, file=sys.stderr)
            return _fail('make-bag failed', children)
        print(f'demo: {result.stdout.strip()}')
    try:
        info = read_bag(bag, args.truth_frame)
    except (OSError, ValueError) as exc:
        return _fail(f'cannot read bag {bag}: {exc}', children)
    robot_frame = info['robot_frame']  # the frame of the clouds: the node broadcasts from it
    mode = args.mode if args.mode != 'auto' else (CAMERA_MODE if info['organized']
                                                  else SWEEP_MODE)
    where = ('/tf_static' if info['truth'] is not None
             else '/tf (per frame)' if info['truth_by_stamp'] else 'MISSING')
    print(f"demo: bag {bag}: {info['count']} {'organized ' if info['organized'] else ''}clouds "
          f"on {info['topic']} in frame {robot_frame!r}; truth {args.truth_frame} on {where}; "
          f'registration node mode {mode!r}')
    if info['organized'] and LARGE_DATA_TRANSPORTS[0] not in env:
        os.environ[LARGE_DATA_TRANSPORTS[0]] = env[LARGE_DATA_TRANSPORTS[0]] = (
            LARGE_DATA_TRANSPORTS[1])
        print(f'demo: camera-sized clouds: {"=".join(LARGE_DATA_TRANSPORTS)} for every process '
              '(Fast DDS shared memory + TCP for large data)')

    import rclpy
    rclpy.init()  # after the transports are chosen: the participant reads them once
    state['rclpy'] = True
    watcher = state['watcher'] = _Watcher(info['topic'], robot_frame)
    common = ['-p', f'device:={args.device}']
    if args.cache_dir:
        common += ['-p', f'cache_dir:={args.cache_dir}']
    preop_files = [find_config('preop_loader.yaml'), *args.preop_params]
    registration_files = [find_config('registration_node.yaml'), *args.registration_params]
    children.append(Child('preop_loader', [
        find_executable('preop_loader'), '--ros-args', *_params_files(preop_files),
        '-p', f'mesh_path:={mesh}', '-p', f'bone_frame:={BONE_FRAME}', *common], env, work))
    registration_args = [
        find_executable('registration_node'), '--ros-args',
        *_params_files(registration_files), '-p', f'robot_frame:={robot_frame}',
        '-p', f'bone_frame:={BONE_FRAME}', '-p', f'mode:={mode}',
        '-r', f"points:={info['topic']}", *common]
    if args.preset:
        registration_args += ['-p', f'preset:={args.preset}']
    children.append(Child('registration_node', registration_args, env, work))

    print(f'demo: preparing the bone model from {mesh} (training takes minutes on a CPU the '
          'first time; later runs load it from the cache)')
    shown = {'message': '', 'time': 0.0}

    def model_ready() -> bool:
        status = watcher.status('preop_loader: model')
        now = time.monotonic()
        if (status is not None and status.message != shown['message']
                and now - shown['time'] >= PROGRESS_PERIOD_S):
            print(f'demo: preop_loader: {status.message}', flush=True)
            shown.update(message=status.message, time=now)
        return watcher.model is not None or bool(_error(watcher, 'preop_loader'))
    ready = watcher.wait(model_ready, args.timeout, children)
    if not ready or watcher.model is None:
        reason = _error(watcher, 'preop_loader') or 'no model announced in time'
        return _fail(f'the preop loader did not provide a model: {reason}', children)
    model = decode_model_info(watcher.model)
    print(f'demo: model ready after {time.monotonic() - started:.1f} s: {model.checkpoint}')
    loaded = watcher.wait(lambda: _loaded(watcher), args.timeout, children)
    if not loaded:
        return _fail('the registration node did not load the model', children)

    children.append(Child('bag_play', [
        sys.executable, '-m', 'neural_bone_reg.cli.demo_cmd', 'replay', str(bag), info['topic'],
        '2'], env, work))
    last_ns = info['last_stamp_ns']
    remaining = max(args.timeout - (time.monotonic() - started), 1.0)
    player = children[-1]
    replay_end: list[float] = []

    def done() -> bool:
        """Tell whether the sweep's last cloud got its tf, or the node settled without it."""
        if any(_stamp_ns(t.header.stamp) == last_ns for _, t in watcher.transforms):
            return True
        if player.alive():
            return False
        if not replay_end:
            replay_end.append(time.monotonic())
        # Clouds are best effort: if the last one never reached the node, stop once the node
        # reports an idle worker and no new solve in two heartbeats after the replay ended.
        after = [values for t, values in watcher.heartbeats if t > replay_end[0]]
        return (len(after) >= 2 and all(v.get('worker_busy') == 'False' for v in after[-2:])
                and after[-1].get('solves') == after[-2].get('solves'))
    watcher.wait(done, remaining, children[:2])
    status = watcher.status('registration_node: registration')
    with watcher.cond:
        final = [(r, t) for r, t in watcher.transforms if _stamp_ns(t.header.stamp) == last_ns]
        newest = max(watcher.transforms, key=lambda rt: _stamp_ns(rt[1].header.stamp),
                     default=None)
        counters = watcher.heartbeats[-1][1] if watcher.heartbeats else {}
        picked = final[0] if final else newest
        cloud_received = (None if picked is None
                          else watcher.cloud_times.get(_stamp_ns(picked[1].header.stamp)))
    if picked is None:
        why = (f'last registration status: {status.message}' if status is not None
               else 'no registration result was reported')
        return _fail(f'no accepted transform on tf within {args.timeout:g} s ({why}; the node '
                     f"received {counters.get('clouds_received', '?')} of {info['count']} "
                     'clouds)', children)
    received, transform = picked
    key = f'{transform.header.stamp.sec}.{transform.header.stamp.nanosec:09d}'
    watcher.wait(lambda: key in watcher.results, MESSAGE_WAIT_S, children[:2])
    status = watcher.results.get(key, status)
    beats = len(watcher.heartbeats)
    watcher.wait(lambda: len(watcher.heartbeats) > beats, MESSAGE_WAIT_S, children[:2])
    counters = watcher.heartbeats[-1][1] if watcher.heartbeats else counters
    if not final:
        print(f"demo: note: the node received {counters.get('clouds_received', '?')} of "
              f"{info['count']} clouds (a volatile topic may drop some) and its newest accepted "
              'transform is for an earlier cloud than the last one of the bag')
    estimate = transform_stamped_to_matrix(transform)
    np.set_printoptions(precision=4, suppress=True)
    print(f'demo: transform {robot_frame} -> {BONE_FRAME} on tf (T_{robot_frame}_bone, mm):')
    print(estimate)
    if status is not None:
        values = {kv.key: kv.value for kv in status.values}
        print('demo: ' + ', '.join(f'{k} {values[k]}' for k in
                                   ('method', 'residual_mm', 'inlier_fraction', 'ambiguity',
                                    'constraint', 'n_points', 'n_slices', 'solve_time_s',
                                    'latency_s') if k in values))
    tracked = counters.get('tracked')
    print(f"demo: the registration node received {counters.get('clouds_received', '?')} of "
          f"{info['count']} clouds and solved {counters.get('solves', '?')} times"
          + (f' ({tracked} of them tracked frame to frame)' if mode == 'track' and tracked
             else '')
          + (f"; it skipped {counters['clouds_dropped']} clouds that a newer one replaced "
             'while it solved (no backlog)' if mode != 'sweep' and 'clouds_dropped' in counters
             else ''))
    if mode != 'sweep':
        print(f'demo: {_results_summary(watcher)}')
    which = 'the last cloud of the bag' if final else 'its cloud'
    node_latency = ({kv.key: kv.value for kv in status.values}.get('latency_s')
                    if status is not None else None)
    if cloud_received is not None:
        print(f'demo: latency from {which} to the transform on tf: '
              f'{received - cloud_received:.3f} s')
    elif node_latency is not None:
        # The demo's own best-effort cloud subscription missed that cloud: use the node's clock.
        print(f'demo: latency from {which} to the transform on tf: {float(node_latency):.3f} s '
              '(measured by the registration node from receipt to broadcast)')
    stamp_ns = _stamp_ns(transform.header.stamp)
    truth = info['truth'] if info['truth'] is not None else info['truth_by_stamp'].get(stamp_ns)
    if truth is None:
        return _fail(f'the bag has no true pose ({args.truth_frame} on /tf_static, or on /tf '
                     'at the stamp of the transform): the result cannot be checked', children)
    mount = info['mount']
    if mount is None:
        return _fail(f"the bag's /tf_static has no transform {info['truth_parent']} -> "
                     f'{robot_frame} (the sensor mount): the result cannot be checked',
                     children)
    centroid = info['centroid'][None, :]
    if robot_frame != info['truth_parent']:
        # A camera: the node broadcast camera -> bone; the bag's mount gives robot -> camera.
        estimate = mount @ estimate
        centroid = apply_transform(mount, centroid)
        print(f"demo: composed with the mount {info['truth_parent']} -> {robot_frame} from "
              f"/tf_static: T_{info['truth_parent']}_bone (mm):")
        print(estimate)
    # The paper's errors: RRE, and RTE where both poses send the clouds' centroid (the bone,
    # not the frame origin, which may lie far away in CT coordinates).
    rotation_error = rre_deg(estimate, truth)
    translation_error = rte_mm(invert_transform(estimate), invert_transform(truth), centroid)
    origin_error = float(np.linalg.norm(truth[:3, 3] - estimate[:3, 3]))
    print(f'demo: error against the truth: rotation {rotation_error:.3f} deg, translation '
          f'{translation_error:.3f} mm at the centroid of the clouds (limits '
          f'{MAX_ROTATION_ERROR_DEG:g} deg, {MAX_TRANSLATION_ERROR_MM:g} mm); '
          f'{origin_error:.3f} mm at the bone frame origin')
    if rotation_error > MAX_ROTATION_ERROR_DEG or translation_error > MAX_TRANSLATION_ERROR_MM:
        return _fail('the accepted transform is outside the tolerance', children)
    print(f'demo: PASSED in {time.monotonic() - started:.1f} s')
    return 0


def _results_summary(watcher: _Watcher) -> str:
    """Summarise the registration results seen on /diagnostics: count and latency by method."""
    import numpy as np

    with watcher.cond:
        results = [{kv.key: kv.value for kv in status.values}
                   for status in watcher.results.values()]
    parts = []
    rejected = sum(1 for values in results if values.get('accepted') != 'True')
    for method in ('global', 'track'):
        latencies = [float(v['latency_s']) for v in results
                     if v.get('method') == method and v.get('accepted') == 'True'
                     and 'latency_s' in v]
        if latencies:
            parts.append(f'{len(latencies)} accepted {method} (latency from receipt median '
                         f'{np.median(latencies):.3f} s, max {max(latencies):.3f} s)')
    parts.append(f'{rejected} rejected')
    return 'results on /diagnostics: ' + ', '.join(parts)


def _stamp_ns(stamp: Any) -> int:
    """Return a builtin_interfaces/Time as integer nanoseconds."""
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def _params_files(paths: list[Any]) -> list[str]:
    """Return ``--params-file`` arguments for existing files; raise for a missing one."""
    argv = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f'params file {path} does not exist')
        argv += ['--params-file', str(path)]
    return argv


def _error(watcher: _Watcher, node_name: str) -> str:
    """Return the message of an ERROR model status of a node, or ''."""
    from diagnostic_msgs.msg import DiagnosticStatus

    status = watcher.status(f'{node_name}: model')
    return status.message if status is not None and status.level == DiagnosticStatus.ERROR \
        else ''


def _loaded(watcher: _Watcher) -> bool:
    from diagnostic_msgs.msg import DiagnosticStatus

    status = watcher.status('registration_node: model')
    return status is not None and status.level == DiagnosticStatus.OK


def replay_main(argv: list[str]) -> int:
    """Replay a bag once its cloud topic has ``subscribers`` matched subscribers.

    ``python -m neural_bone_reg.cli.demo_cmd replay BAG TOPIC SUBSCRIBERS``: the demo's replay
    process. It first discovers the subscribers with a probe publisher on the cloud topic of
    its own participant, then replays the bag with that participant (helper of the demo; use
    ``neural-bone-reg play`` otherwise).
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException
    from sensor_msgs.msg import PointCloud2

    from neural_bone_reg.ros.bag import play_bag
    from neural_bone_reg.ros.qos import CLOUD_PUBLISHER_QOS

    if len(argv) != 4 or argv[0] != 'replay':
        print('usage: python -m neural_bone_reg.cli.demo_cmd replay BAG TOPIC SUBSCRIBERS',
              file=sys.stderr)
        return 2
    bag, topic, subscribers = argv[1], argv[2], int(argv[3])
    rclpy.init()
    node = rclpy.create_node('neural_bone_reg_demo_replay')
    try:
        # Reliable: it matches the node's reliable cloud subscription as well as best effort.
        probe = node.create_publisher(PointCloud2, topic, CLOUD_PUBLISHER_QOS)
        deadline = time.monotonic() + REPLAY_DISCOVERY_TIMEOUT_S
        while probe.get_subscription_count() < subscribers and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        print(f'replay: {probe.get_subscription_count()} subscriber(s) on {topic}', flush=True)
        count = play_bag(bag, node=node, delay_s=REPLAY_DELAY_S)
        print(f'replay: published {count} messages from {bag}', flush=True)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 130
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(replay_main(sys.argv[1:]))
