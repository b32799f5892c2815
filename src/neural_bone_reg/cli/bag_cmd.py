"""``neural-bone-reg make-bag`` and ``neural-bone-reg play``: simulated sensors as rosbag2 bags.

``make-bag --sensor us`` (the default) simulates a tracked-ultrasound probe sweep in the robot
frame; ``--sensor rgbd`` an RGB-D camera on a fixed mount, streaming organized clouds in its
optical frame, with the mount on /tf_static.

Heavy imports (trimesh, rclpy, rosbags) happen inside the commands, so that building the parser
costs nothing; the frame, topic and storage defaults therefore repeat those of
:mod:`neural_bone_reg.ros.bag` (a test keeps them equal).
"""

from __future__ import annotations

import argparse
import math
import time

#: Sensors ``make-bag`` simulates: a tracked ultrasound probe sweep, or an RGB-D camera.
SENSORS = ('us', 'rgbd')
DEFAULT_SENSOR = 'us'
#: Defaults of ``make-bag``, shared with its help text.
DEFAULT_FRAMES = 20
DEFAULT_POINTS_PER_FRAME = 300
DEFAULT_RATE_HZ = 10.0
DEFAULT_NOISE_MM = 1.0
DEFAULT_OUTLIER_FRACTION = 0.02
#: Defaults of ``make-bag --sensor rgbd``: 10 s at 15 Hz of a RealSense D435 in its 424 x 240
#: colour mode (1.6 MB a cloud; 640x480 is 4.9 MB) 0.4 m away, looking at an 80 mm exposure
#: of the bone's joint end (0.6 of its half length from the centre; for the phantom femur:
#: head, neck and greater trochanter), the rest under soft tissue.
DEFAULT_RGBD_FRAMES = 150
DEFAULT_RGBD_RATE_HZ = 15.0
DEFAULT_CAMERA_DISTANCE_MM = 400.0
DEFAULT_RESOLUTION = '424x240'
DEFAULT_EXPOSURE_MM = 80.0
DEFAULT_EXPOSURE_OFFSET = 0.6
#: Breathing-like bone motion of the RGB-D stream (amplitudes; 0 = a still bone).
DEFAULT_MOTION_MM = 0.0
DEFAULT_MOTION_DEG = 0.0
#: Wait before playing so that subscribers in other processes discover the publishers (s).
DEFAULT_PLAY_DELAY_S = 1.0
DEFAULT_ROBOT_FRAME = 'robot_base'
DEFAULT_TRUTH_FRAME = 'bone_truth'
DEFAULT_CLOUD_TOPIC = '/us/points'
DEFAULT_CAMERA_FRAME = 'camera_color_optical_frame'
DEFAULT_RGBD_TOPIC = '/camera/depth/color/points'
STORAGES = ('sqlite3', 'mcap')
#: ``play --clock`` without a value publishes /clock at this rate, as ``ros2 bag play``.
DEFAULT_CLOCK_HZ = 40.0
#: The smallest positive rate, delay or clock value taken (a clock at 1e-300 Hz never ticks).
MIN_POSITIVE = 1e-6


def _positive_float(text: str) -> float:
    value = float(text)
    if not MIN_POSITIVE <= value < math.inf:
        raise argparse.ArgumentTypeError(f'must be a finite number of at least {MIN_POSITIVE}, '
                                         f'got {text}')
    return value


def non_negative_float(text: str) -> float:
    """Parse a finite, non-negative number (argparse type; nan and inf are refused)."""
    value = float(text)
    if not 0.0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f'must be finite and non-negative, got {text}')
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f'must be in [0, 1), got {text}')
    return value


def _unit_interval(text: str) -> float:
    value = float(text)
    if not -1.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be in [-1, 1], got {text}')
    return value


def _resolution(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT such as 640x480, got {text}')
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f'width and height must be at least 1, got {text}')
    return width, height


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {text}')
    return value


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``make-bag`` and ``play`` commands to the CLI's subparsers."""
    make = subparsers.add_parser(
        'make-bag', help='simulate a probe sweep or an RGB-D stream of a bone as a rosbag2 bag',
        description='Draw a random true bone pose (seeded) and simulate a sensor looking at the '
                    'bone. --sensor us: a tracked-probe sweep, mapped into the robot frame. '
                    '--sensor rgbd: an RGB-D camera on a fixed mount (on /tf_static) streaming '
                    'organized x y z rgb clouds in its optical frame, plus CameraInfo. The '
                    'clouds are sensor_msgs/PointCloud2 (metres); the true pose goes on '
                    '/tf_static (on /tf, per frame, for a moving bone).')
    make.add_argument('--sensor', choices=SENSORS, default=DEFAULT_SENSOR,
                      help=f'what to simulate (default {DEFAULT_SENSOR})')
    make.add_argument('--mesh', help='bone surface (STL/PLY/OBJ, mm); default: the phantom femur')
    make.add_argument('--out', required=True, help='bag directory to create (must not exist)')
    make.add_argument('--storage', choices=STORAGES, default='sqlite3')
    make.add_argument('--frames', type=_positive_int,
                      help=f'clouds in the bag (default {DEFAULT_FRAMES}; rgbd '
                           f'{DEFAULT_RGBD_FRAMES})')
    make.add_argument('--rate-hz', type=_positive_float,
                      help=f'cloud rate (default {DEFAULT_RATE_HZ} Hz; rgbd '
                           f'{DEFAULT_RGBD_RATE_HZ} Hz)')
    make.add_argument('--seed', type=int, default=0, help='seed of the pose and the sensor')
    make.add_argument('--robot-frame', default=DEFAULT_ROBOT_FRAME,
                      help=f'robot frame: parent of the truth and the camera mount, and the '
                           f'frame of probe clouds (default {DEFAULT_ROBOT_FRAME})')
    make.add_argument('--truth-frame', default=DEFAULT_TRUTH_FRAME,
                      help=f'child frame of the true pose (default {DEFAULT_TRUTH_FRAME})')
    make.add_argument('--topic',
                      help=f'cloud topic (default {DEFAULT_CLOUD_TOPIC}; rgbd '
                           f'{DEFAULT_RGBD_TOPIC})')
    probe = make.add_argument_group('--sensor us')
    probe.add_argument('--points-per-frame', type=_positive_int,
                       help=f'points per cloud (default {DEFAULT_POINTS_PER_FRAME})')
    probe.add_argument('--noise-mm', type=non_negative_float,
                       help=f'gaussian noise sigma (default {DEFAULT_NOISE_MM} mm)')
    probe.add_argument('--outliers', type=_fraction,
                       help=f'outlier fraction per cloud (default {DEFAULT_OUTLIER_FRACTION})')
    camera = make.add_argument_group('--sensor rgbd')
    camera.add_argument('--resolution', type=_resolution,
                        help='image size WIDTHxHEIGHT of a D435-like colour camera (42.5 deg '
                             f'tall field of view; default {DEFAULT_RESOLUTION})')
    camera.add_argument('--distance-mm', type=_positive_float,
                        help=f'camera to bone distance (default {DEFAULT_CAMERA_DISTANCE_MM:g})')
    camera.add_argument('--exposure-mm', type=non_negative_float,
                        help='radius of the exposed bone around the point the camera looks at '
                             '(the rest is under soft tissue, segmented away); 0 = the whole '
                             f'bone is visible (default {DEFAULT_EXPOSURE_MM:g})')
    camera.add_argument('--exposure-offset', type=_unit_interval,
                        help='where along the long axis the camera looks, as a share of the '
                             "bone's half length from its centre: 1 its bulkier (joint) end, -1 "
                             f'the other (default {DEFAULT_EXPOSURE_OFFSET:g})')
    camera.add_argument('--motion-mm', type=non_negative_float,
                        help='amplitude of a slow breathing-like bone motion (4 s period); '
                             'the truth then goes on /tf per frame (default '
                             f'{DEFAULT_MOTION_MM:g})')
    camera.add_argument('--motion-deg', type=non_negative_float,
                        help=f'rotation amplitude of that motion (default {DEFAULT_MOTION_DEG:g})')
    camera.add_argument('--compress', action=argparse.BooleanOptionalAction,
                        help='compress each message with zstd, as `ros2 bag record '
                             '--compression-mode message --compression-format zstd` (organized '
                             'clouds are mostly NaN: about 60 times smaller; default on)')
    camera.add_argument('--camera-frame',
                        help=f'optical frame of the clouds (default {DEFAULT_CAMERA_FRAME})')
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
    play.add_argument('--delay', type=non_negative_float, default=DEFAULT_PLAY_DELAY_S,
                      help='seconds to wait before playing (each loop), e.g. for discovery '
                           f'(default {DEFAULT_PLAY_DELAY_S})')
    play.add_argument('--clock', type=_positive_float, nargs='?', const=DEFAULT_CLOCK_HZ,
                      default=0.0, metavar='HZ',
                      help='publish /clock (rosgraph_msgs/Clock) at HZ for use_sim_time, as '
                           '`ros2 bag play --clock`: the time starts at the first message of '
                           'the bag and runs at --rate; a recorded /clock is not replayed '
                           f'(HZ default {DEFAULT_CLOCK_HZ:g})')
    play.set_defaults(func=run_play)


_US_ONLY = ('points_per_frame', 'noise_mm', 'outliers')
_RGBD_ONLY = ('resolution', 'distance_mm', 'exposure_mm', 'exposure_offset', 'motion_mm',
              'motion_deg', 'camera_frame', 'compress')


def run_make_bag(args: argparse.Namespace) -> int:
    """Simulate a sensor and write what it saw as a bag; return the exit code.

    Bad input raises ValueError (InputError) or OSError, which the CLI's main reports.
    """
    wrong = _RGBD_ONLY if args.sensor == 'us' else _US_ONLY
    given = [name for name in wrong if getattr(args, name, None) is not None]
    if given:
        options = ', '.join('--' + name.replace('_', '-') for name in given)
        raise ValueError(f'{options} do(es) not apply to --sensor {args.sensor}')
    if args.sensor == 'rgbd':
        return _make_rgbd_bag(args)
    import numpy as np

    from neural_bone_reg.core import sim
    from neural_bone_reg.core.io import load_mesh
    from neural_bone_reg.core.se3 import apply_transform
    from neural_bone_reg.ros.bag import write_sweep_bag

    frames = args.frames or DEFAULT_FRAMES
    points_per_frame = args.points_per_frame or DEFAULT_POINTS_PER_FRAME
    rate_hz = args.rate_hz or DEFAULT_RATE_HZ
    topic = args.topic or DEFAULT_CLOUD_TOPIC
    mesh = load_mesh(args.mesh if args.mesh else sim.phantom_mesh_path())
    rng = np.random.default_rng(args.seed)
    t_robot_bone = sim.random_pose(rng)
    sweep = sim.simulate_sweep(
        mesh, rng, n_frames=frames, points_per_frame=points_per_frame,
        noise_mm=DEFAULT_NOISE_MM if args.noise_mm is None else args.noise_mm,
        outlier_fraction=DEFAULT_OUTLIER_FRACTION if args.outliers is None else args.outliers)
    clouds = [apply_transform(t_robot_bone, cloud) for cloud in sweep]
    period_ns = round(1e9 / rate_hz)
    start_ns = time.time_ns()
    stamps = [start_ns + i * period_ns for i in range(len(clouds))]
    path = write_sweep_bag(args.out, clouds, stamps, t_robot_bone,
                           robot_frame=args.robot_frame, truth_frame=args.truth_frame,
                           cloud_topic=topic, storage=args.storage)
    print(f'wrote {path} ({args.storage}): {len(clouds)} clouds x {points_per_frame} '
          f'points on {topic} at {rate_hz:g} Hz, true pose {args.robot_frame} -> '
          f'{args.truth_frame} on /tf_static')
    return 0


def _make_rgbd_bag(args: argparse.Namespace) -> int:
    """Simulate an RGB-D camera stream (``make-bag --sensor rgbd``) and write it as a bag."""
    import numpy as np

    from neural_bone_reg.core import sim
    from neural_bone_reg.core.io import load_mesh
    from neural_bone_reg.core.camera import RgbdScene, simulate_rgbd_stream
    from neural_bone_reg.ros.bag import RgbdFrameData, write_rgbd_bag

    frames = args.frames or DEFAULT_RGBD_FRAMES
    rate_hz = args.rate_hz or DEFAULT_RGBD_RATE_HZ
    topic = args.topic or DEFAULT_RGBD_TOPIC
    camera_frame = args.camera_frame or DEFAULT_CAMERA_FRAME
    width, height = args.resolution or _resolution(DEFAULT_RESOLUTION)
    scene = RgbdScene(
        width=width, height=height,
        distance_mm=args.distance_mm or DEFAULT_CAMERA_DISTANCE_MM,
        exposure_mm=DEFAULT_EXPOSURE_MM if args.exposure_mm is None else args.exposure_mm,
        exposure_offset=(DEFAULT_EXPOSURE_OFFSET if args.exposure_offset is None
                         else args.exposure_offset),
        motion_mm=DEFAULT_MOTION_MM if args.motion_mm is None else args.motion_mm,
        motion_deg=DEFAULT_MOTION_DEG if args.motion_deg is None else args.motion_deg)
    mesh = load_mesh(args.mesh if args.mesh else sim.phantom_mesh_path())
    rng = np.random.default_rng(args.seed)
    stream = simulate_rgbd_stream(mesh, rng, scene, n_frames=frames, rate_hz=rate_hz)
    period_ns = round(1e9 / rate_hz)
    start_ns = time.time_ns()
    stamps = [start_ns + i * period_ns for i in range(frames)]
    moving = scene.motion_mm > 0.0 or scene.motion_deg > 0.0
    truth = stream.T_robot_bone if moving else stream.T_robot_bone[0]
    cam = stream.camera
    valid = []

    def rendered():  # one frame at a time, while the bag is written
        for frame in stream.frames:
            valid.append(int(frame.valid.sum()))
            yield RgbdFrameData(frame.points_mm, frame.rgb)
    path = write_rgbd_bag(
        args.out, rendered(), stamps, stream.T_robot_camera, truth,
        (cam.width, cam.height, cam.fx, cam.fy, cam.cx, cam.cy), robot_frame=args.robot_frame,
        camera_frame=camera_frame, truth_frame=args.truth_frame, cloud_topic=topic,
        storage=args.storage, compress=True if args.compress is None else args.compress)
    print(f'wrote {path} ({args.storage}): {frames} organized {width}x{height} clouds on '
          f'{topic} in {camera_frame} at {rate_hz:g} Hz ({np.mean(valid):.0f} valid points a '
          'frame on '
          f'average, camera {scene.distance_mm:g} mm away, '
          + (f'{scene.exposure_mm:g} mm exposure' if scene.exposure_mm else 'whole bone in view')
          + f'), camera mount {args.robot_frame} -> '
          f'{camera_frame} on /tf_static, true pose {args.robot_frame} -> {args.truth_frame} '
          f'on {"/tf (moving bone)" if moving else "/tf_static"}')
    return 0


def run_play(args: argparse.Namespace) -> int:
    """Replay a bag over ROS 2 until it ends (or, with --loop, until interrupted)."""
    import rclpy
    from rclpy.executors import ExternalShutdownException

    from neural_bone_reg.ros.bag import play_bag

    rclpy.init()  # try/finally rather than `with rclpy.init()`, which Humble/Jazzy lack
    try:
        count = play_bag(args.bag, rate=args.rate, loop=args.loop, topics=args.topics,
                         delay_s=args.delay, clock_hz=args.clock)
    except (KeyboardInterrupt, ExternalShutdownException):
        return 0
    finally:
        rclpy.try_shutdown()
    print(f'published {count} messages from {args.bag}')
    return 0
