"""``neural-bone-reg make-bag`` and ``neural-bone-reg play``: simulated sweeps as rosbag2 bags.

Heavy imports (trimesh, rclpy, rosbags) happen inside the commands, so that building the parser
costs nothing; the frame, topic and storage defaults therefore repeat those of
:mod:`neural_bone_reg.ros.bag` (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import time

#: Defaults of ``make-bag``, shared with its help text.
DEFAULT_FRAMES = 20
DEFAULT_POINTS_PER_FRAME = 300
DEFAULT_RATE_HZ = 10.0
DEFAULT_NOISE_MM = 1.0
DEFAULT_OUTLIER_FRACTION = 0.02
#: Wait before playing so that subscribers in other processes discover the publishers (s).
DEFAULT_PLAY_DELAY_S = 1.0
DEFAULT_ROBOT_FRAME = 'robot_base'
DEFAULT_TRUTH_FRAME = 'bone_truth'
DEFAULT_CLOUD_TOPIC = '/us/points'
STORAGES = ('sqlite3', 'mcap')


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f'must be positive, got {text}')
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {text}')
    return value


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``make-bag`` and ``play`` commands to the CLI's subparsers."""
    make = subparsers.add_parser(
        'make-bag', help='simulate a probe sweep over a bone and write it as a rosbag2 bag',
        description='Draw a random true bone pose (seeded), simulate a tracked-probe sweep over '
                    'the bone, map it into the robot frame and write a rosbag2 bag: the clouds '
                    'as sensor_msgs/PointCloud2 (metres) and the true pose on /tf_static.')
    make.add_argument('--mesh', help='bone surface (STL/PLY/OBJ, mm); default: the phantom femur')
    make.add_argument('--out', required=True, help='bag directory to create (must not exist)')
    make.add_argument('--storage', choices=STORAGES, default='sqlite3')
    make.add_argument('--frames', type=_positive_int, default=DEFAULT_FRAMES,
                      help=f'clouds in the sweep (default {DEFAULT_FRAMES})')
    make.add_argument('--points-per-frame', type=_positive_int, default=DEFAULT_POINTS_PER_FRAME,
                      help=f'points per cloud (default {DEFAULT_POINTS_PER_FRAME})')
    make.add_argument('--rate-hz', type=_positive_float, default=DEFAULT_RATE_HZ,
                      help=f'cloud rate (default {DEFAULT_RATE_HZ} Hz)')
    make.add_argument('--noise-mm', type=float, default=DEFAULT_NOISE_MM,
                      help=f'gaussian noise sigma (default {DEFAULT_NOISE_MM} mm)')
    make.add_argument('--outliers', type=float, default=DEFAULT_OUTLIER_FRACTION,
                      help=f'outlier fraction per cloud (default {DEFAULT_OUTLIER_FRACTION})')
    make.add_argument('--seed', type=int, default=0, help='seed of the pose and the sweep')
    make.add_argument('--robot-frame', default=DEFAULT_ROBOT_FRAME,
                      help=f'frame of the clouds (default {DEFAULT_ROBOT_FRAME})')
    make.add_argument('--truth-frame', default=DEFAULT_TRUTH_FRAME,
                      help=f'child frame of the true pose (default {DEFAULT_TRUTH_FRAME})')
    make.add_argument('--topic', default=DEFAULT_CLOUD_TOPIC,
                      help=f'cloud topic (default {DEFAULT_CLOUD_TOPIC})')
    make.set_defaults(func=run_make_bag)

    play = subparsers.add_parser(
        'play', help='replay a rosbag2 bag (sqlite3 or mcap) over ROS 2 with recorded timing',
        description="Publish the bag's messages with their recorded timing and QoS, without "
                    'rosbag2 (like `ros2 bag play`).')
    play.add_argument('bag', help='bag directory (or .db3/.mcap file)')
    play.add_argument('--rate', type=_positive_float, default=1.0,
                      help='playback speed factor (default 1.0)')
    play.add_argument('--loop', action='store_true', help='repeat until interrupted')
    play.add_argument('--topics', nargs='+', help='replay only these topics')
    play.add_argument('--delay', type=float, default=DEFAULT_PLAY_DELAY_S,
                      help='seconds to wait for discovery before the first message '
                           f'(default {DEFAULT_PLAY_DELAY_S})')
    play.set_defaults(func=run_play)


def run_make_bag(args: argparse.Namespace) -> int:
    """Simulate a sweep and write it as a bag; return the exit code.

    Bad input raises ValueError (InputError) or OSError, which the CLI's main reports.
    """
    import numpy as np

    from neural_bone_reg.core import sim
    from neural_bone_reg.core.io import load_mesh
    from neural_bone_reg.core.se3 import apply_transform
    from neural_bone_reg.ros.bag import write_sweep_bag

    mesh = load_mesh(args.mesh if args.mesh else sim.phantom_mesh_path())
    rng = np.random.default_rng(args.seed)
    t_robot_bone = sim.random_pose(rng)
    sweep = sim.simulate_sweep(mesh, rng, n_frames=args.frames,
                               points_per_frame=args.points_per_frame, noise_mm=args.noise_mm,
                               outlier_fraction=args.outliers)
    clouds = [apply_transform(t_robot_bone, cloud) for cloud in sweep]
    period_ns = round(1e9 / args.rate_hz)
    start_ns = time.time_ns()
    stamps = [start_ns + i * period_ns for i in range(len(clouds))]
    path = write_sweep_bag(args.out, clouds, stamps, t_robot_bone,
                           robot_frame=args.robot_frame, truth_frame=args.truth_frame,
                           cloud_topic=args.topic, storage=args.storage)
    print(f'wrote {path} ({args.storage}): {len(clouds)} clouds x {args.points_per_frame} '
          f'points on {args.topic} at {args.rate_hz:g} Hz, true pose {args.robot_frame} -> '
          f'{args.truth_frame} on /tf_static')
    return 0


def run_play(args: argparse.Namespace) -> int:
    """Replay a bag over ROS 2 until it ends (or, with --loop, until interrupted)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from neural_bone_reg.ros.bag import play_bag

    rclpy.init()  # try/finally rather than `with rclpy.init()`, which Humble/Jazzy lack
    try:
        count = play_bag(args.bag, rate=args.rate, loop=args.loop, topics=args.topics,
                         delay_s=args.delay)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        rclpy.try_shutdown()
    print(f'published {count} messages from {args.bag}')
    return 0
