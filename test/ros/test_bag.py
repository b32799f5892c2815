"""Sweep bags: written with rosbags, read back independently, replayed over real DDS."""

import argparse
import threading
import time

import numpy as np
import pytest
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from rclpy.serialization import deserialize_message, serialize_message
from rosbags.rosbag2 import Reader, Writer
from rosbags.typesys import get_typestore, Stores
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import CameraInfo, PointCloud2, PointField
from tf2_msgs.msg import TFMessage
import yaml

from neural_bone_reg.cli import bag_cmd
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.ros import bag
from neural_bone_reg.ros.bag import play_bag, write_sweep_bag
from neural_bone_reg.ros.conversions import (cloud_to_xyz, transform_stamped_to_matrix,
                                             xyz_to_cloud)
from neural_bone_reg.ros.tf_compat import TfWaiter

TF_MESSAGE_HASH = 'RIHS01_e369d0f05a23ae52508854b66f6aa0437f3449d652e8cbf22d5abe85d020f087'
POINT_CLOUD2_HASH = 'RIHS01_9198cabf7da3796ae6fe19c4cb3bdd3525492988c70522628af5daa124bae2b5'
FRAMES = 6
PERIOD_NS = 40_000_000  # 25 Hz
START_NS = 1_700_000_000_000_000_000
#: Generous bound on discovery plus delivery on a loaded 2-core machine (s).
RECEIVE_TIMEOUT_S = 10.0
#: Scheduling slack on the virtual clock (s): only float rounding.
VIRTUAL_SLACK_S = 1e-6


@pytest.fixture(scope='module')
def sweep():
    """Synthetic clouds in the robot frame (mm), with a NaN row, and the true pose."""
    rng = np.random.default_rng(7)
    clouds = [rng.uniform(-150.0, 150.0, size=(40 + i, 3)) for i in range(FRAMES)]
    clouds[2][5] = np.nan
    pose = np.eye(4)
    pose[:3, :3] = Rotation.random(random_state=3).as_matrix()
    pose[:3, 3] = [412.5, -80.25, 230.0]
    stamps = [START_NS + i * PERIOD_NS for i in range(FRAMES)]
    return clouds, stamps, pose


@pytest.fixture(params=bag.STORAGES)
def bag_path(request, tmp_path, sweep):
    clouds, stamps, pose = sweep
    return write_sweep_bag(tmp_path / f'sweep_{request.param}', clouds, stamps, pose,
                           storage=request.param)


def test_written_bag_reads_back_with_rosbags(bag_path, sweep):
    clouds, stamps, pose = sweep
    typestore = get_typestore(Stores.ROS2_KILTED)
    with Reader(bag_path) as reader:
        topics = reader.topics
        assert topics['/us/points'].msgcount == FRAMES
        assert topics['/tf_static'].msgcount == 1
        digests = {c.topic: c.digest for c in reader.connections}
        assert digests == {'/us/points': POINT_CLOUD2_HASH, '/tf_static': TF_MESSAGE_HASH}
        messages = [(c.topic, t, typestore.deserialize_cdr(d, c.msgtype))
                    for c, t, d in reader.messages()]

    assert [m[0] for m in messages] == ['/tf_static'] + ['/us/points'] * FRAMES
    static = messages[0][2].transforms[0]
    assert (static.header.frame_id, static.child_frame_id) == ('robot_base', 'bone_truth')
    translation = static.transform.translation
    np.testing.assert_allclose([translation.x, translation.y, translation.z],
                               pose[:3, 3] / 1000.0, atol=1e-12)  # metres in the bag
    q = static.transform.rotation
    np.testing.assert_allclose(Rotation.from_quat([q.x, q.y, q.z, q.w]).as_matrix(),
                               pose[:3, :3], atol=1e-12)

    for (_, timestamp, msg), cloud, stamp in zip(messages[1:], clouds, stamps):
        assert timestamp == stamp
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == stamp
        assert msg.header.frame_id == 'robot_base'
        assert [f.name for f in msg.fields] == ['x', 'y', 'z'] and msg.point_step == 12
        assert msg.is_dense == bool(np.isfinite(cloud).all())
        xyz = np.frombuffer(msg.data.tobytes(), dtype='<f4').reshape(-1, 3)
        np.testing.assert_allclose(xyz, cloud / 1000.0, rtol=1e-6, equal_nan=True)


def test_metadata_has_what_ros2_bag_play_reads(bag_path):
    info = yaml.safe_load((bag_path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    assert info['version'] == 9
    assert info['message_count'] == FRAMES + 1
    topics = {t['topic_metadata']['name']: t['topic_metadata']
              for t in info['topics_with_message_count']}
    static_qos, = topics['/tf_static']['offered_qos_profiles']
    assert (static_qos['history'], static_qos['depth'], static_qos['reliability'],
            static_qos['durability']) == ('keep_last', 1, 'reliable', 'transient_local')
    cloud_qos, = topics['/us/points']['offered_qos_profiles']
    assert (cloud_qos['reliability'], cloud_qos['durability']) == ('reliable', 'volatile')
    assert topics['/tf_static']['type_description_hash'] == TF_MESSAGE_HASH
    assert topics['/us/points']['type'] == 'sensor_msgs/msg/PointCloud2'


def test_write_rejects_bad_input(tmp_path, sweep):
    clouds, stamps, pose = sweep
    with pytest.raises(ValueError, match='storage must be one of'):
        write_sweep_bag(tmp_path / 'a', clouds, stamps, pose, storage='rosbag1')
    with pytest.raises(ValueError, match='one stamp per cloud'):
        write_sweep_bag(tmp_path / 'b', clouds, stamps[:-1], pose)
    with pytest.raises(ValueError, match='strictly increasing'):
        write_sweep_bag(tmp_path / 'c', clouds, stamps[::-1], pose)
    with pytest.raises(ValueError, match='not a proper rotation'):
        write_sweep_bag(tmp_path / 'd', clouds, stamps, np.diag([1.0, 1.0, -1.0, 1.0]))
    (tmp_path / 'e').mkdir()
    with pytest.raises(FileExistsError, match='exists already'):
        write_sweep_bag(tmp_path / 'e', clouds, stamps, pose)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['e']  # nothing half-written


class _Recorder:
    """Collects clouds from a subscription and signals when ``expected`` have arrived."""

    def __init__(self, node, topic, expected, qos):
        self.clouds, self.arrivals = [], []
        self.expected = expected
        self.done = threading.Event()
        node.create_subscription(PointCloud2, topic, self.on_cloud, qos)

    def on_cloud(self, msg):
        self.clouds.append(msg)
        self.arrivals.append(time.monotonic())
        if len(self.clouds) >= self.expected:
            self.done.set()


def test_replay_over_dds_keeps_order_timing_and_latches_tf_static(bag_path, sweep, make_node):
    clouds, stamps, pose = sweep
    recorder = _Recorder(make_node('cloud_listener'), '/us/points', FRAMES,
                         QoSProfile(depth=FRAMES, reliability=ReliabilityPolicy.RELIABLE))
    published = []
    static_sent = threading.Event()

    def on_published(topic, timestamp):
        published.append((topic, timestamp, time.monotonic()))
        if topic == '/tf_static':
            static_sent.set()

    player = make_node('player')
    rate = 2.0
    called = time.monotonic()
    count = play_bag(bag_path, rate=rate, node=player, on_published=on_published)

    assert count == FRAMES + 1
    assert static_sent.is_set()
    assert recorder.done.wait(RECEIVE_TIMEOUT_S)
    stamps_received = [m.header.stamp.sec * 10**9 + m.header.stamp.nanosec
                       for m in recorder.clouds]
    assert stamps_received == stamps  # all of them, in order
    for msg, cloud in zip(recorder.clouds, clouds):
        np.testing.assert_allclose(cloud_to_xyz(msg), cloud[np.isfinite(cloud).all(axis=1)],
                                   rtol=1e-5, atol=1e-4)
    # Never early over real DDS (a stalled machine can only make it late; the schedule
    # itself is held exactly on a virtual clock below).
    first_stamp = published[0][1]
    for _, timestamp, wall in published:
        assert called + (timestamp - first_stamp) / 1e9 / rate <= wall

    # A node that joins after the replay still gets the latched true pose.
    waiter = TfWaiter(make_node('late_joiner'), 'robot_base', 'bone_truth')
    received = waiter.wait(RECEIVE_TIMEOUT_S)
    assert received is not None
    np.testing.assert_allclose(transform_stamped_to_matrix(received), pose, atol=1e-9)


class _VirtualTime:
    """Stands in for the ``time`` module inside ``bag``: time passes only when told to."""

    def __init__(self):
        self.ns = 5 * 10**12

    def monotonic(self):
        return self.ns / 1e9

    def monotonic_ns(self):
        return self.ns

    def sleep(self, seconds):
        self.ns += max(int(round(seconds * 1e9)), 0)


class _VirtualStop(threading.Event):
    """A stop event whose ``wait`` lets the virtual time pass instead of blocking."""

    def __init__(self, clock):
        super().__init__()
        self._clock = clock

    def wait(self, timeout=None):
        if not self.is_set():
            self._clock.sleep(timeout)
        return self.is_set()


class _VirtualNode:
    """The part of a Node that ``play_bag`` uses, with publishers that log virtual times.

    ``stalls`` maps a publish index to seconds that the publish call takes: a machine that
    stalls the player thread.
    """

    class _Context:
        def ok(self):
            return True

    def __init__(self, clock, stalls=None):
        self.context = self._Context()
        self.log = []
        self._clock, self._stalls = clock, dict(stalls or {})

    def create_publisher(self, msg_type, topic, qos):
        node = self

        class _Publisher:
            def publish(self, data):
                node.log.append((topic, node._clock.monotonic()))
                node._clock.sleep(node._stalls.get(len(node.log) - 1, 0.0))

        return _Publisher()


@pytest.mark.parametrize('rate', [0.5, 2.0])
def test_replay_schedule_is_exact_and_a_stall_does_not_accumulate(bag_path, sweep, rate,
                                                                  monkeypatch):
    clock = _VirtualTime()
    monkeypatch.setattr(bag, 'time', clock)
    _, stamps, _ = sweep
    stall_at, stall_s = 2, 0.3  # the third publish (the second cloud) takes 0.3 s
    node = _VirtualNode(clock, stalls={stall_at: stall_s})
    called = clock.monotonic()
    delay_s = 0.25
    assert play_bag(bag_path, rate=rate, node=node, delay_s=delay_s,
                    stop_event=_VirtualStop(clock)) == FRAMES + 1
    topics = [topic for topic, _ in node.log]
    assert topics == ['/tf_static'] + ['/us/points'] * FRAMES  # recorded order
    start = called + delay_s  # the bag's start (the /tf_static stamp) is due after --delay
    due = [start] + [start + (t - stamps[0]) / 1e9 / rate for t in stamps]
    walls = [wall for _, wall in node.log]
    for index, (wall, when) in enumerate(zip(walls, due)):
        late = wall - when
        assert late >= -VIRTUAL_SLACK_S, (index, late)  # never early
        stalled_until = walls[stall_at] + stall_s
        if index <= stall_at or when >= stalled_until:
            assert late <= VIRTUAL_SLACK_S, (index, late)  # on time
        else:  # due during the stall: sent as soon as it ends, not a period after
            assert wall == pytest.approx(stalled_until, abs=VIRTUAL_SLACK_S), (index, late)


def test_replay_loop_restarts_the_schedule_each_pass(bag_path, sweep, monkeypatch):
    clock = _VirtualTime()
    monkeypatch.setattr(bag, 'time', clock)
    _, stamps, _ = sweep
    node = _VirtualNode(clock)
    stop = _VirtualStop(clock)
    passes = 3

    def stop_after(topic, timestamp):
        if len(node.log) == passes * (FRAMES + 1):
            stop.set()

    delay_s = 0.1
    play_bag(bag_path, rate=1.0, node=node, loop=True, delay_s=delay_s, stop_event=stop,
             on_published=stop_after)
    walls = np.array([wall for _, wall in node.log]).reshape(passes, FRAMES + 1)
    span = (stamps[-1] - stamps[0]) / 1e9
    np.testing.assert_allclose(np.diff(walls[:, 0]), span + delay_s, atol=VIRTUAL_SLACK_S)
    offsets = walls - walls[:, :1]  # each pass keeps the recorded spacing
    np.testing.assert_allclose(offsets, np.tile(offsets[0], (passes, 1)), atol=VIRTUAL_SLACK_S)
    np.testing.assert_allclose(offsets[0, 2:] - offsets[0, 1],
                               (np.array(stamps[1:]) - stamps[0]) / 1e9, atol=VIRTUAL_SLACK_S)


def test_replay_topic_filter_stop_and_loop(bag_path, make_node):
    player = make_node('filtered_player')
    assert play_bag(bag_path, topics=['/tf_static'], node=player) == 1
    with pytest.raises(ValueError, match=r"no topic\(s\) \['/nope'\]"):
        play_bag(bag_path, topics=['/nope'], node=player)
    with pytest.raises(ValueError, match='rate must be positive'):
        play_bag(bag_path, rate=0.0, node=player)

    stop = threading.Event()
    sent = []

    def stop_after_two_passes(topic, timestamp):
        sent.append(topic)
        if len(sent) == 2 * (FRAMES + 1):
            stop.set()

    count = play_bag(bag_path, rate=20.0, node=player, loop=True, stop_event=stop,
                     on_published=stop_after_two_passes)
    assert count == 2 * (FRAMES + 1)


def test_replay_qos_from_recorded_profiles():
    static = bag.replay_qos('/tf_static', [bag.TF_STATIC_BAG_QOS], message_count=3)
    assert static.durability == DurabilityPolicy.TRANSIENT_LOCAL
    assert static.reliability == ReliabilityPolicy.RELIABLE
    assert static.depth == 3  # every recorded static message reaches late joiners
    cloud = bag.replay_qos('/us/points', [bag.CLOUD_BAG_QOS], message_count=100)
    assert (cloud.durability, cloud.depth) == (DurabilityPolicy.VOLATILE, bag.CLOUD_QOS_DEPTH)
    mixed = bag.replay_qos('/x', [bag.CLOUD_BAG_QOS, bag.CLOUD_BAG_QOS._replace(
        reliability=bag.QosReliability.BEST_EFFORT)], message_count=1)
    assert mixed.reliability == ReliabilityPolicy.BEST_EFFORT
    assert bag.replay_qos('/tf_static', [], 1).durability == DurabilityPolicy.TRANSIENT_LOCAL


def _cli(*argv):
    parser = argparse.ArgumentParser(prog='neural-bone-reg')
    bag_cmd.add_parsers(parser.add_subparsers(dest='command', required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_defaults_match_the_library():
    assert (bag_cmd.DEFAULT_ROBOT_FRAME, bag_cmd.DEFAULT_TRUTH_FRAME,
            bag_cmd.DEFAULT_CLOUD_TOPIC, bag_cmd.STORAGES) == (
        bag.DEFAULT_ROBOT_FRAME, bag.DEFAULT_TRUTH_FRAME, bag.DEFAULT_CLOUD_TOPIC, bag.STORAGES)


def test_cli_make_bag_and_play(tmp_path, make_node, capsys):
    trimesh = pytest.importorskip('trimesh')
    mesh = tmp_path / 'ball.stl'
    trimesh.creation.icosphere(subdivisions=3, radius=40.0).export(mesh)
    out = tmp_path / 'bag'
    assert _cli('make-bag', '--mesh', str(mesh), '--out', str(out), '--storage', 'mcap',
                '--frames', '4', '--points-per-frame', '50', '--rate-hz', '50', '--seed', '3',
                '--topic', '/probe/points', '--truth-frame', 'truth') == 0
    assert 'wrote' in capsys.readouterr().out
    with Reader(out) as reader:
        assert reader.topics['/probe/points'].msgcount == 4

    # `play` runs rclpy in the default context, a DDS participant of its own: a real
    # cross-participant replay. --delay gives discovery time before the volatile clouds.
    recorder = _Recorder(make_node('cli_listener'), '/probe/points', 4, QoSProfile(depth=10))
    waiter = TfWaiter(make_node('cli_tf_listener'), 'robot_base', 'truth')
    assert _cli('play', str(out), '--rate', '4', '--delay', '1.0') == 0
    assert 'published 5 messages' in capsys.readouterr().out
    assert recorder.done.wait(RECEIVE_TIMEOUT_S)
    assert waiter.wait(RECEIVE_TIMEOUT_S) is not None

    # Errors propagate as ValueError/OSError for the CLI's main to report.
    with pytest.raises(FileExistsError, match='exists already'):
        _cli('make-bag', '--mesh', str(mesh), '--out', str(out))
    with pytest.raises(InputError, match='does not exist'):
        _cli('make-bag', '--mesh', str(tmp_path / 'missing.stl'), '--out',
             str(tmp_path / 'other'))
    assert not (tmp_path / 'other').exists()


# ------------------------------------------------------------------------- RGB-D bags


RGBD_SIZE = (40, 30)  # width, height: a tiny organized camera keeps the bags small
RGBD_PERIOD_NS = 66_666_667  # 15 Hz


def _rgbd_frames(count, seed=11):
    rng = np.random.default_rng(seed)
    width, height = RGBD_SIZE
    frames = []
    for _ in range(count):
        points = rng.uniform(-50.0, 50.0, size=(height, width, 3))
        points[..., 2] += 400.0
        points[rng.random((height, width)) < 0.3] = np.nan
        rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        frames.append(bag.RgbdFrameData(points, rgb))
    return frames


def _pose(seed, translation):
    pose = np.eye(4)
    pose[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    pose[:3, 3] = translation
    return pose


def test_pack_rgb_is_the_pcl_layout():
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], dtype=np.uint8)
    packed = bag.pack_rgb(rgb)
    assert packed.dtype == np.float32
    assert packed.view(np.uint32).tolist() == [0xFF0000, 0x00FF00, 0x0000FF, 0x010203]
    np.testing.assert_array_equal(bag.unpack_rgb(packed), rgb)
    with pytest.raises(ValueError, match='uint8'):
        bag.pack_rgb(rgb.astype(np.float32))


@pytest.mark.parametrize('moving', [False, True], ids=['still', 'moving'])
def test_rgbd_bag_is_an_organized_xyzrgb_stream_with_static_mount(tmp_path, moving):
    count = 4
    frames = _rgbd_frames(count)
    stamps = [START_NS + i * RGBD_PERIOD_NS for i in range(count)]
    mount = _pose(1, [800.0, -200.0, 600.0])
    truth = _pose(2, [500.0, 0.0, 100.0])
    truths = [truth @ _pose(10 + i, [0.0, 0.0, float(i)]) for i in range(count)]
    width, height = RGBD_SIZE
    intrinsics = (width, height, 38.4, 38.4, 19.5, 14.5)
    path = bag.write_rgbd_bag(tmp_path / 'rgbd', iter(frames), stamps, mount,
                              truths if moving else truth, intrinsics, storage='mcap',
                              compress=moving)
    info = yaml.safe_load((path / 'metadata.yaml').read_text())['rosbag2_bagfile_information']
    # rosbag2 reads the mode case-insensitively (compression_mode_from_string).
    assert (info['compression_mode'].upper(), info['compression_format']) == (
        ('MESSAGE', 'zstd') if moving else ('', ''))
    with Reader(path) as reader:
        topics = reader.topics
        assert topics['/camera/depth/color/points'].msgcount == count
        assert topics['/camera/color/camera_info'].msgcount == count
        assert ('/tf' in topics) == moving
        messages = [(c.topic, t, c, d) for c, t, d in reader.messages()]
    static_qos, = [c for _, _, c, _ in messages if c.topic == '/tf_static'][0].ext.\
        offered_qos_profiles
    assert (static_qos.depth, static_qos.durability) == (1, bag.QosDurability.TRANSIENT_LOCAL)
    assert messages[0][0] == '/tf_static' and messages[0][1] == stamps[0] - 1
    static = {t.child_frame_id: t for t in deserialize_message(
        bytes(messages[0][3]), TFMessage).transforms}
    assert set(static) == ({'camera_color_optical_frame'} if moving
                           else {'camera_color_optical_frame', 'bone_truth'})
    assert all(t.header.frame_id == 'robot_base' for t in static.values())
    np.testing.assert_allclose(transform_stamped_to_matrix(static['camera_color_optical_frame']),
                               mount, atol=1e-9)

    clouds = [(t, deserialize_message(bytes(d), PointCloud2)) for topic, t, _, d in messages
              if topic == '/camera/depth/color/points']
    assert [t for t, _ in clouds] == stamps  # recorded at the camera rate
    for (timestamp, msg), frame in zip(clouds, frames):
        assert msg.header.frame_id == 'camera_color_optical_frame'
        assert msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec == timestamp
        assert (msg.height, msg.width) == (height, width) and not msg.is_dense
        assert [(f.name, f.offset, f.datatype, f.count) for f in msg.fields] == [
            (name, 4 * i, PointField.FLOAT32, 1) for i, name in enumerate('x y z rgb'.split())]
        assert msg.point_step == 16 and msg.row_step == 16 * width
        data = np.frombuffer(msg.data.tobytes(), dtype='<f4').reshape(height, width, 4)
        np.testing.assert_allclose(data[..., :3], frame.points / 1000.0, rtol=1e-6,
                                   equal_nan=True)  # metres, NaN where nothing returned
        np.testing.assert_array_equal(bag.unpack_rgb(data[..., 3]), frame.rgb)
        finite = np.isfinite(frame.points).all(axis=-1)
        np.testing.assert_allclose(cloud_to_xyz(msg), frame.points[finite], rtol=1e-5,
                                   atol=1e-3)
    infos = [deserialize_message(bytes(d), CameraInfo) for topic, _, _, d in messages
             if topic == '/camera/color/camera_info']
    assert (infos[0].width, infos[0].height, infos[0].k[0], infos[0].k[2]) == (
        width, height, 38.4, 19.5)
    if moving:
        dynamic = [(t, deserialize_message(bytes(d), TFMessage).transforms[0])
                   for topic, t, _, d in messages if topic == '/tf']
        assert [t for t, _ in dynamic] == stamps
        for (_, transform), pose in zip(dynamic, truths):
            assert (transform.header.frame_id, transform.child_frame_id) == (
                'robot_base', 'bone_truth')
            np.testing.assert_allclose(transform_stamped_to_matrix(transform), pose, atol=1e-9)


def test_rgbd_bag_rejects_bad_input(tmp_path):
    frames = _rgbd_frames(2)
    stamps = [START_NS, START_NS + RGBD_PERIOD_NS]
    intrinsics = (*RGBD_SIZE, 38.4, 38.4, 19.5, 14.5)
    with pytest.raises(ValueError, match='one 4x4 matrix or one per frame'):
        bag.write_rgbd_bag(tmp_path / 'a', frames, stamps, np.eye(4), [np.eye(4)] * 3,
                           intrinsics)
    with pytest.raises(ValueError, match='frame 0 has shape .* does not match the camera'):
        bag.write_rgbd_bag(tmp_path / 'b', frames, stamps, np.eye(4), np.eye(4),
                           (50, 30, 38.4, 38.4, 19.5, 14.5))
    with pytest.raises(ValueError, match='strictly increasing'):
        bag.write_rgbd_bag(tmp_path / 'c', frames, stamps[::-1], np.eye(4), np.eye(4),
                           intrinsics)
    with pytest.raises(ValueError, match='got 2 frames for 3 stamps'):
        bag.write_rgbd_bag(tmp_path / 'd', frames, [*stamps, stamps[-1] + 1], np.eye(4),
                           np.eye(4), intrinsics)
    with pytest.raises(ValueError, match='more frames than the 1 stamps'):
        bag.write_rgbd_bag(tmp_path / 'e', frames, stamps[:1], np.eye(4), np.eye(4), intrinsics)
    assert not list(tmp_path.iterdir())  # nothing half-written is left


def test_cli_make_rgbd_bag(tmp_path, capsys):
    out = tmp_path / 'rgbd'
    assert _cli('make-bag', '--sensor', 'rgbd', '--out', str(out), '--resolution', '64x48',
                '--frames', '3', '--rate-hz', '30', '--seed', '2') == 0
    assert 'organized 64x48 clouds' in capsys.readouterr().out
    with Reader(out) as reader:
        assert reader.topics['/camera/depth/color/points'].msgcount == 3
        cloud_connection = reader.topics['/camera/depth/color/points'].connections
        msgs = [deserialize_message(bytes(d), PointCloud2)
                for _, _, d in reader.messages(connections=cloud_connection)]
        stamps = [t for _, t, _ in reader.messages(connections=cloud_connection)]
    assert (msgs[0].height, msgs[0].width) == (48, 64)
    assert np.diff(stamps).tolist() == [round(1e9 / 30)] * 2
    assert len(cloud_to_xyz(msgs[0])) > 50  # the phantom is in view
    with pytest.raises(ValueError, match='--points-per-frame do\\(es\\) not apply'):
        _cli('make-bag', '--sensor', 'rgbd', '--out', str(tmp_path / 'x'),
             '--points-per-frame', '10')
    with pytest.raises(ValueError, match='--exposure-mm do\\(es\\) not apply'):
        _cli('make-bag', '--out', str(tmp_path / 'y'), '--exposure-mm', '50')


# ------------------------------------------------------------------------- play --clock


def _clock_ns(msg):
    return msg.clock.sec * 10**9 + msg.clock.nanosec


def test_play_publishes_clock_from_the_bag_start(tmp_path, make_node):
    from rosgraph_msgs.msg import Clock

    # A bag that also recorded a /clock of its own: --clock replaces it, as ros2 bag play.
    path = tmp_path / 'with_clock'
    typestore = get_typestore(Stores.ROS2_KILTED)
    count, period_ns = 10, 50_000_000
    with Writer(path, version=bag.BAG_VERSION) as writer:
        points = writer.add_connection('/us/points', 'sensor_msgs/msg/PointCloud2',
                                       typestore=typestore,
                                       offered_qos_profiles=[bag.CLOUD_BAG_QOS])
        old_clock = writer.add_connection('/clock', 'rosgraph_msgs/msg/Clock',
                                          typestore=typestore)
        for i in range(count):
            stamp = START_NS + i * period_ns
            writer.write(old_clock, stamp, serialize_message(Clock()))
            writer.write(points, stamp, serialize_message(xyz_to_cloud(
                np.zeros((3, 3)), 'robot_base', stamp)))
    clocks = []
    listener = make_node('clock_listener')
    listener.create_subscription(Clock, '/clock', lambda msg: clocks.append(
        (time.monotonic(), _clock_ns(msg))), bag.CLOCK_QOS)
    deadline = time.monotonic() + RECEIVE_TIMEOUT_S
    published = []
    player = make_node('clock_player')
    # Wait for the listener to be discovered by the player's /clock publisher first: the
    # real player does not wait either, so a test must (best-effort, volatile).
    probe = player.create_publisher(Clock, '/clock', bag.CLOCK_QOS)
    while probe.get_subscription_count() < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    player.destroy_publisher(probe)
    rate, clock_hz = 0.5, 50.0
    called = time.monotonic()
    sent = play_bag(path, node=player, rate=rate, clock_hz=clock_hz,
                    on_published=lambda topic, stamp: published.append(
                        (topic, time.monotonic())))
    returned = time.monotonic()
    assert sent == count and {t for t, _ in published} == {'/us/points'}  # recorded /clock: gone
    time.sleep(0.2)  # let the last ticks arrive
    # 50 Hz for 0.9 s, but a loaded machine has stalled the process for 1 s (4 ticks came):
    # the count is not held, only that the clock ticks and advances, by the bounds below.
    assert len(clocks) >= 2, clocks
    # Bounds that hold however the machine stalls: a tick carries the player's time when it
    # was sent, at or before it arrives, and the player's time is the bag's start plus
    # ``rate`` times the wall time since the call (or, after the playback began, since then).
    # A clock that ignores --rate runs past the upper bound; one that is slow, or stops at the
    # start, misses the end.
    slack_ns = 20_000_000
    for arrived, value in clocks:
        assert START_NS <= value <= START_NS + rate * (arrived - called) * 1e9 + slack_ns
    began = published[0][1]  # the clock had jumped back to the bag's start by then
    after = [value for arrived, value in clocks if arrived > began]
    assert after == sorted(after) and after[-1] > after[0]  # it advances
    end_ns = START_NS + (count - 1) * period_ns  # the last message: the ticker outlives it
    assert after[-1] >= end_ns - rate * 1e9 / clock_hz - slack_ns
    assert after[-1] <= START_NS + rate * (returned - began) * 1e9 + slack_ns


def test_cli_play_clock_option():
    parser = argparse.ArgumentParser(prog='neural-bone-reg')
    bag_cmd.add_parsers(parser.add_subparsers(dest='command', required=True))
    assert parser.parse_args(['play', 'b']).clock == 0.0
    assert parser.parse_args(['play', 'b', '--clock']).clock == bag_cmd.DEFAULT_CLOCK_HZ == 40.0
    assert parser.parse_args(['play', 'b', '--clock', '100']).clock == 100.0
    assert bag_cmd.DEFAULT_CLOCK_HZ == bag.DEFAULT_CLOCK_HZ
    with pytest.raises(ValueError, match='clock_hz must be non-negative'):
        play_bag('unused', clock_hz=-1.0)


@pytest.mark.parametrize('argv', [
    ['play', 'b', '--delay', 'inf'], ['play', 'b', '--rate', 'nan'],
    ['play', 'b', '--clock', '1e-300'], ['make-bag', 'out', '--noise-mm', '-1'],
    ['make-bag', 'out', '--outliers', '1.5'],
])
def test_cli_bag_arguments_must_be_finite_and_in_range(argv, capsys):
    parser = argparse.ArgumentParser(prog='neural-bone-reg')
    bag_cmd.add_parsers(parser.add_subparsers(dest='command', required=True))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)
    assert exit_info.value.code == 2 and 'must be' in capsys.readouterr().err


def test_a_broken_bag_is_a_value_error_naming_it(bag_path, tmp_path, make_node):
    from neural_bone_reg.cli.demo_cmd import read_bag

    player = make_node('broken_bag_player')
    for storage_file in [*bag_path.glob('*.db3'), *bag_path.glob('*.mcap')]:
        storage_file.unlink()
    with pytest.raises(ValueError, match=f'cannot read bag {bag_path}'):
        play_bag(bag_path, node=player)
    with pytest.raises(ValueError, match=f'cannot read bag {bag_path}'):
        read_bag(bag_path, 'bone_truth')


def test_foreign_bytes_and_types_are_value_errors():
    cloud_bytes = serialize_message(PointCloud2(height=1, width=0))
    assert isinstance(bag.deserialized(cloud_bytes, PointCloud2, '/points'), PointCloud2)
    with pytest.raises(ValueError, match='a message on /points is not a valid PointCloud2'):
        bag.deserialized(b'\x00\x01\x00\x00garbage', PointCloud2, '/points')
    for name in ('sensor_msgs/PointCloud2', 'neural_bone_reg/cli/main', 'a//b'):
        with pytest.raises(ValueError, match='package/msg/Type'):
            bag._message_type(name)
    assert bag._message_type('sensor_msgs/msg/PointCloud2') is PointCloud2
