"""Message <-> array conversions, in process and without DDS."""

import array
import functools

from builtin_interfaces.msg import Time
import numpy as np
import pytest
from rclpy.serialization import deserialize_message, serialize_message
from rclpy.time import Time as RclpyTime
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, PointField

from neural_bone_reg.core.errors import InputError
from neural_bone_reg.ros import conversions
from neural_bone_reg.ros.conversions import (
    _read_xyz_fallback, cloud_to_xyz, matrix_to_transform_stamped, transform_stamped_to_matrix,
    xyz_to_cloud)

STAMP_NS = 1_700_000_000_123_456_789


def _readers():
    """Both code paths, in the message's metres: the public function and the numpy fallback."""
    return [pytest.param(functools.partial(cloud_to_xyz, unit='m'), id='cloud_to_xyz'),
            pytest.param(_read_xyz_fallback, id='fallback')]


def _cloud(points, *, extra=None, order=('x', 'y', 'z'), point_step=None, float_type='f4',
           big_endian=False, height=1, row_padding=0):
    """Build a PointCloud2 by hand with an arbitrary layout (the thing under test)."""
    points = np.asarray(points, dtype=np.float64)
    datatype = PointField.FLOAT32 if float_type == 'f4' else PointField.FLOAT64
    size = np.dtype(float_type).itemsize
    names = list(order) + ([] if extra is None else ['intensity'])
    offsets = {name: i * size for i, name in enumerate(names)}
    point_step = point_step or size * len(names)
    endian = '>' if big_endian else '<'
    formats = [endian + float_type] * len(names)
    dtype = np.dtype({'names': names, 'formats': formats,
                      'offsets': [offsets[n] for n in names], 'itemsize': point_step})
    width = len(points) // height
    rows = np.zeros((height, width), dtype=dtype)
    for i, name in enumerate('xyz'):
        rows[name] = points[:, i].reshape(height, width)
    if extra is not None:
        rows['intensity'] = np.asarray(extra).reshape(height, width)
    raw = rows.view(np.uint8).reshape(height, width * point_step)
    raw = np.hstack([raw, np.full((height, row_padding), 0xAB, np.uint8)])
    msg = PointCloud2(height=height, width=width, point_step=point_step,
                      row_step=width * point_step + row_padding, is_bigendian=big_endian,
                      is_dense=bool(np.isfinite(points).all()))
    msg.fields = [PointField(name=n, offset=offsets[n], datatype=datatype, count=1)
                  for n in names]
    msg.data = array.array('B', raw.tobytes())
    return msg


@pytest.fixture
def points():
    return np.random.default_rng(0).uniform(-0.3, 0.3, size=(50, 3))


@pytest.mark.parametrize('read', _readers())
def test_standard_layout(read, points):
    xyz = read(_cloud(points))
    assert xyz.dtype == np.float32 and xyz.shape == (50, 3)
    np.testing.assert_allclose(xyz, points, atol=1e-7)


@pytest.mark.parametrize('read', _readers())
def test_nonstandard_order_offsets_and_padding(read, points):
    intensity = np.arange(len(points), dtype=np.float64)
    msg = _cloud(points, extra=intensity, order=('z', 'x', 'y'), point_step=32)
    assert [f.name for f in msg.fields] == ['z', 'x', 'y', 'intensity']
    np.testing.assert_allclose(read(msg), points, atol=1e-7)


@pytest.mark.parametrize('read', _readers())
def test_float64_fields(read, points):
    xyz = read(_cloud(points, float_type='f8'))
    assert xyz.dtype == np.float32
    np.testing.assert_allclose(xyz, points, atol=1e-7)


@pytest.mark.parametrize('read', _readers())
@pytest.mark.parametrize('float_type', ['f4', 'f8'])
def test_big_endian(read, points, float_type):
    msg = _cloud(points, float_type=float_type, big_endian=True, extra=np.ones(len(points)))
    np.testing.assert_allclose(read(msg), points, atol=1e-7)


@pytest.mark.parametrize('read', _readers())
def test_nonfinite_rows_dropped(read, points):
    points[[3, 10]] = np.nan
    points[20, 1] = np.inf
    msg = _cloud(points)
    assert not msg.is_dense
    xyz = read(msg)
    keep = np.isfinite(points).all(axis=1)
    assert xyz.shape == (47, 3)
    np.testing.assert_allclose(xyz, points[keep], atol=1e-7)


@pytest.mark.parametrize('read', _readers())
def test_organised_cloud_with_row_padding(read, points):
    points = points[:48]
    msg = _cloud(points, height=4, row_padding=7, extra=np.zeros(48), point_step=20)
    assert msg.row_step == 12 * 20 + 7
    np.testing.assert_allclose(read(msg), points, atol=1e-7)


@pytest.mark.parametrize('read', _readers())
def test_empty_cloud(read):
    assert read(PointCloud2()).shape == (0, 3)
    assert read(_cloud(np.zeros((0, 3)))).shape == (0, 3)


@pytest.mark.parametrize('read', _readers())
def test_missing_field(read, points):
    msg = _cloud(points)
    msg.fields = msg.fields[:2]
    with pytest.raises(InputError, match=r"no field\(s\) \['z'\].*expected float x, y and z"):
        read(msg)


@pytest.mark.parametrize('read', _readers())
def test_truncated_data(read, points):
    msg = _cloud(points)
    msg.data = msg.data[:-5]
    with pytest.raises(InputError, match=r'595 bytes; expected row_step x height = 600 x 1'):
        read(msg)


@pytest.mark.parametrize('read', _readers())
def test_row_step_too_small(read, points):
    msg = _cloud(points)
    msg.row_step -= 1
    with pytest.raises(InputError, match='row_step'):
        read(msg)


@pytest.mark.parametrize('read', _readers())
def test_unsupported_datatype(read, points):
    msg = _cloud(points)
    msg.fields[1].datatype = PointField.INT16
    with pytest.raises(InputError, match=r"'y' has datatype 3 \(INT16\); expected FLOAT32"):
        read(msg)


@pytest.mark.parametrize('read', _readers())
def test_field_beyond_point_step(read, points):
    msg = _cloud(points)
    msg.fields[2].offset = 10
    with pytest.raises(InputError, match='beyond point_step 12'):
        read(msg)


def test_fallback_is_a_view_when_layout_allows(points):
    msg = _cloud(points)
    xyz = _read_xyz_fallback(msg)
    assert np.shares_memory(xyz, np.frombuffer(msg.data, np.uint8))


def test_public_reader_without_sensor_msgs_py(monkeypatch, points):
    monkeypatch.setattr(conversions, '_point_cloud2', None)
    xyz = cloud_to_xyz(_cloud(points, float_type='f8'), unit='m')
    np.testing.assert_allclose(xyz, points, atol=1e-7)


def test_arrays_are_millimetres_by_default(points):
    xyz = cloud_to_xyz(_cloud(points))
    assert xyz.dtype == np.float32
    np.testing.assert_allclose(xyz, points * 1000.0, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(_read_xyz_fallback(xyz_to_cloud(xyz, 'f', 0)), points, atol=1e-7)


def test_unknown_unit():
    with pytest.raises(ValueError, match=r"unit must be one of \['m', 'mm'\], got 'cm'"):
        xyz_to_cloud(np.zeros((1, 3)), 'f', 0, unit='cm')


@pytest.mark.parametrize('stamp', [STAMP_NS, Time(sec=1_700_000_000, nanosec=123_456_789),
                                   RclpyTime(nanoseconds=STAMP_NS)])
def test_xyz_to_cloud_roundtrip_through_cdr(points, stamp):
    msg = xyz_to_cloud(points * 1000.0, 'robot_base', stamp)  # mm in, metres in the message
    assert msg.is_dense and msg.height == 1 and msg.width == 50 and msg.point_step == 12
    assert msg.header.frame_id == 'robot_base'
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == (1_700_000_000, 123_456_789)
    back = deserialize_message(serialize_message(msg), PointCloud2)
    np.testing.assert_allclose(cloud_to_xyz(back, unit='m'), points, atol=1e-7)
    np.testing.assert_allclose(_read_xyz_fallback(back), points, atol=1e-7)
    np.testing.assert_allclose(cloud_to_xyz(back), points * 1000.0, atol=1e-4)


def test_xyz_to_cloud_keeps_nans(points):
    points[7] = np.nan
    msg = xyz_to_cloud(points, 'f', 0)
    assert not msg.is_dense and msg.width == 50
    assert cloud_to_xyz(msg).shape == (49, 3)


def test_xyz_to_cloud_rejects_bad_shape():
    with pytest.raises(ValueError, match=r'shape \(4, 2\); expected \(N, 3\)'):
        xyz_to_cloud(np.zeros((4, 2)), 'f', 0)


def _random_transform(seed):
    rng = np.random.default_rng(seed)
    transform = np.eye(4)
    transform[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    transform[:3, 3] = rng.uniform(-200.0, 200.0, 3)
    return transform


@pytest.mark.parametrize('seed', range(5))
def test_transform_roundtrip(seed):
    transform = _random_transform(seed)
    msg = matrix_to_transform_stamped(transform, 'robot_base', 'bone', STAMP_NS)  # mm
    assert (msg.header.frame_id, msg.child_frame_id) == ('robot_base', 'bone')
    assert msg.header.stamp.nanosec == 123_456_789
    np.testing.assert_allclose(msg.transform.translation.x, transform[0, 3] / 1000.0)
    back = transform_stamped_to_matrix(msg)
    np.testing.assert_allclose(back, transform, atol=1e-9)
    np.testing.assert_allclose(transform_stamped_to_matrix(msg, unit='m')[:3, 3],
                               transform[:3, 3] / 1000.0, atol=1e-12)


def test_transform_accepts_float32_matrix():
    transform = _random_transform(1).astype(np.float32)
    msg = matrix_to_transform_stamped(transform, 'a', 'b', 0)
    np.testing.assert_allclose(transform_stamped_to_matrix(msg), transform, atol=1e-4)


@pytest.mark.parametrize('bad, match', [
    (np.eye(3), r'shape \(3, 3\)'),
    (np.diag([1.0, 1.0, -1.0, 1.0]), 'not a proper rotation'),
    (np.diag([2.0, 1.0, 1.0, 1.0]), 'not a proper rotation'),
    (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1.0]]), 'bottom row'),
    (np.full((4, 4), np.nan), 'non-finite'),
])
def test_transform_rejects_non_rigid(bad, match):
    with pytest.raises(ValueError, match=match):
        matrix_to_transform_stamped(bad, 'a', 'b', 0)


def test_transform_rejects_zero_quaternion():
    msg = matrix_to_transform_stamped(np.eye(4), 'a', 'b', 0)
    msg.transform.rotation.w = 0.0
    with pytest.raises(ValueError, match='not a valid quaternion'):
        transform_stamped_to_matrix(msg)


def test_bad_stamp_type():
    with pytest.raises(TypeError, match='stamp must be'):
        xyz_to_cloud(np.zeros((1, 3)), 'f', 1.5)


class _FakeSensorMsgsPy:
    """Stands in for sensor_msgs_py.point_cloud2 to check which clouds are handed to it."""

    def __init__(self):
        self.calls = 0

    def read_points_numpy(self, cloud, field_names, skip_nans):
        assert field_names == ['x', 'y', 'z'] and skip_nans
        self.calls += 1
        return _read_xyz_fallback(cloud).astype(np.float64)


@pytest.mark.parametrize('layout, used', [
    (dict(), True),
    (dict(float_type='f8'), True),
    (dict(float_type='f8', big_endian=True), False),  # it would swap msg.data in place
    (dict(extra=np.zeros(48), order=('z', 'x', 'y'), point_step=32), True),
    (dict(height=4, row_padding=3), False),  # read_points_numpy ignores row padding
])
def test_sensor_msgs_py_used_where_it_reads_right(monkeypatch, points, layout, used):
    fake = _FakeSensorMsgsPy()
    monkeypatch.setattr(conversions, '_point_cloud2', fake)
    points = points[:48]
    np.testing.assert_allclose(cloud_to_xyz(_cloud(points, **layout), unit='m'), points,
                               atol=1e-7)
    assert fake.calls == int(used)


# ---------------------------------------------------------------------- hostile layouts


def _xyz_fields(*specs):
    """Return PointFields from (name, offset, datatype, count) tuples."""
    return [PointField(name=n, offset=o, datatype=d, count=c) for n, o, d, c in specs]


@pytest.mark.parametrize('read', _readers())
@pytest.mark.parametrize('point_step', [2**31, 2**32 - 1])
def test_huge_point_step_is_an_input_error_not_a_crash(read, point_step):
    msg = _cloud(np.zeros((1, 3)))
    msg.point_step = point_step  # 12 bytes of data: row_step and data cannot agree
    with pytest.raises(InputError, match='row_step'):
        read(msg)
    msg.row_step = point_step
    with pytest.raises(InputError, match='bytes; expected row_step x height'):
        read(msg)


def test_point_step_beyond_the_limit_with_consistent_data():
    step = conversions.MAX_POINT_STEP + 4
    msg = _cloud(np.zeros((1, 3)))
    msg.point_step = msg.row_step = step
    msg.data = array.array('B', bytes(step))
    with pytest.raises(InputError, match=f'point_step is {step} bytes; expected at most'):
        cloud_to_xyz(msg)


@pytest.mark.parametrize('read', _readers())
@pytest.mark.parametrize('count', [0, 2, 3])
def test_xyz_count_other_than_one_is_refused(read, points, count):
    msg = _cloud(points, extra=np.zeros(len(points)), point_step=32)
    msg.fields[0].count = count  # x; count 3 still fits in the 32-byte point
    with pytest.raises(InputError, match=f"'x' has count {count}; expected 1"):
        read(msg)


def test_a_field_whose_count_overruns_the_point_is_refused(points):
    msg = _cloud(points, extra=np.zeros(len(points)))
    msg.fields[3].count = 3  # intensity at 12, point_step 16
    with pytest.raises(InputError, match=r"'intensity' at offset 12 \(3 x 4 bytes\) lies "
                                         'beyond point_step 16'):
        cloud_to_xyz(msg)


@pytest.mark.parametrize('offset', [16, 2**32 - 1])
def test_a_field_offset_beyond_the_point_is_refused(points, offset):
    msg = _cloud(points, extra=np.zeros(len(points)))
    msg.fields[3].offset = offset
    with pytest.raises(InputError, match='beyond point_step 16'):
        cloud_to_xyz(msg)


def test_duplicate_field_names_are_refused(points):
    msg = _cloud(points)
    # The campaign's case: x@0, x@4, y@4, z@8 read y as x.
    msg.fields = _xyz_fields(('x', 0, 7, 1), ('x', 4, 7, 1), ('y', 4, 7, 1), ('z', 8, 7, 1))
    with pytest.raises(InputError, match=r"two fields named 'x' \(at offsets 0 and 4\)"):
        cloud_to_xyz(msg)


def test_repeated_padding_names_are_fine(points):
    msg = _cloud(points, point_step=20)
    msg.fields += _xyz_fields(('_', 12, PointField.UINT8, 4), ('_', 16, PointField.UINT8, 4))
    np.testing.assert_allclose(cloud_to_xyz(msg, unit='m'), points, atol=1e-7)


@pytest.mark.parametrize('big_endian', [False, True])
def test_reading_leaves_the_message_unchanged(points, big_endian):
    # sensor_msgs_py byteswaps a cloud of the other byte order in place, in msg.data itself,
    # which other subscribers and a recorder share: such clouds must not go through it.
    msg = _cloud(points, big_endian=big_endian)
    before = bytes(msg.data)
    np.testing.assert_allclose(cloud_to_xyz(msg, unit='m'), points, atol=1e-7)
    assert bytes(msg.data) == before


# sensor_msgs_py's dtype_from_fields asserts on each of these layouts (a repeated column name,
# a field of count 0); where it is installed the cloud must still be read, by the fallback.
@pytest.mark.parametrize('extra', [
    (('_', 12, PointField.UINT8, 1), ('_', 13, PointField.UINT8, 1)),
    (('rgb', 12, PointField.UINT8, 2), ('rgb_0', 14, PointField.UINT8, 1)),
    (('', 12, PointField.UINT8, 1), ('unnamed_field_3', 13, PointField.UINT8, 1)),
    (('pad', 12, PointField.UINT8, 0),),
])
def test_layouts_that_sensor_msgs_py_asserts_on_are_read(points, extra):
    msg = _cloud(points, point_step=20)
    msg.fields += _xyz_fields(*extra)
    np.testing.assert_allclose(cloud_to_xyz(msg, unit='m'), points, atol=1e-7)


@pytest.mark.parametrize('datatype', [0, 9, 255])
def test_invalid_datatype_codes_are_refused(points, datatype):
    msg = _cloud(points, extra=np.zeros(len(points)))
    msg.fields[3].datatype = datatype
    with pytest.raises(InputError, match=f"'intensity' has datatype {datatype}, which is no "
                                         'PointField type'):
        cloud_to_xyz(msg)


def test_overlapping_coordinates_are_refused(points):
    msg = _cloud(points, float_type='f8')
    msg.fields[1].offset = 4  # y inside the 8 bytes of x
    with pytest.raises(InputError, match="'x' and 'y' overlap"):
        cloud_to_xyz(msg)


def test_ten_thousand_fields_give_a_short_message(points):
    msg = _cloud(points)
    msg.fields = _xyz_fields(*[(f'f{i}', 0, PointField.UINT8, 1) for i in range(10_000)])
    with pytest.raises(InputError, match='declares 10000 fields') as info:
        cloud_to_xyz(msg)
    assert len(str(info.value)) < 300 and '9992 more' in str(info.value)


def test_missing_field_lists_are_truncated(points):
    msg = _cloud(points)
    msg.fields = _xyz_fields(*[('n' * 500 + str(i), 0, PointField.UINT8, 1) for i in range(200)])
    with pytest.raises(InputError, match=r'no field\(s\)') as info:
        cloud_to_xyz(msg)
    assert len(str(info.value)) < 600


def test_no_points_with_data_is_refused():
    msg = _cloud(np.zeros((4, 3)))
    msg.height, msg.width = 0, 4
    with pytest.raises(InputError, match=r'declares no points \(width 4 x height 0\) but '
                                         'carries 48 bytes'):
        cloud_to_xyz(msg)
    msg.data = array.array('B')
    assert cloud_to_xyz(msg).shape == (0, 3)


@pytest.mark.parametrize('read', _readers())
def test_float64_values_beyond_float32_are_not_called_missing(read, points):
    points[:] = 1e300
    with pytest.raises(InputError, match=r'50 points with coordinates up to 1e\+300 m, beyond '
                                         'what float32 holds'):
        read(_cloud(points, float_type='f8'))


def test_metres_too_large_for_millimetres_are_refused(points):
    points[0] = 3e37  # a float32 in metres, but not in millimetres
    with pytest.raises(InputError, match='too large to convert'):
        cloud_to_xyz(_cloud(points))


@pytest.mark.parametrize('float_type', ['f4', 'f8'])
def test_byteswapped_read_undoes_a_wrong_is_bigendian(points, float_type):
    msg = _cloud(points, float_type=float_type, big_endian=True)
    msg.is_bigendian = False  # the flag lies
    np.testing.assert_allclose(conversions.byteswapped_xyz(msg, unit='m'), points, atol=1e-7)


# ---------------------------------------------------------------------- stamps


@pytest.mark.parametrize('sec, nanosec', [(-1, 0), (-2**31, 0), (0, 1_000_000_000),
                                          (2**31 - 1, 2**32 - 1), (5, 2**32 - 1)])
def test_stamps_ros_time_cannot_represent_are_refused(sec, nanosec):
    with pytest.raises(InputError, match=f'sec {sec}, nanosec {nanosec}, which ROS time cannot '
                                         'represent'):
        conversions.stamp_to_ns(Time(sec=sec, nanosec=nanosec))


def test_the_largest_stamp_round_trips_without_wrapping():
    stamp = Time(sec=2**31 - 1, nanosec=999_999_999)
    ns = conversions.stamp_to_ns(stamp)
    assert ns == conversions.MAX_STAMP_NS
    back = conversions.to_time_msg(ns)
    assert (back.sec, back.nanosec) == (2**31 - 1, 999_999_999)
    with pytest.raises(ValueError, match='stamp must be nanoseconds in'):
        conversions.to_time_msg(ns + 1)


# ---------------------------------------------------------------------------- bone_pose


def _posed_covariance(seed=0):
    """Return a rigid T_bone_cloud (mm) and a random SPD covariance (mm, rad), seeded."""
    rng = np.random.default_rng(seed)
    transform = np.eye(4)
    transform[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    transform[:3, 3] = rng.uniform(-300.0, 300.0, 3)
    factor = np.diag([0.5, 0.5, 0.5, 0.004, 0.004, 0.004]) @ rng.normal(size=(6, 6))
    return transform, factor @ factor.T + np.diag([0.01] * 3 + [1e-6] * 3)


def test_bone_pose_round_trips_in_metres_with_the_parent_frame_covariance():
    transform, covariance = _posed_covariance()
    msg = conversions.bone_pose_with_covariance(transform, covariance, 'robot_base', STAMP_NS)
    assert msg.header.frame_id == 'robot_base'
    assert (msg.header.stamp.sec, msg.header.stamp.nanosec) == divmod(STAMP_NS, 10**9)
    pose_m = np.array([msg.pose.pose.position.x, msg.pose.pose.position.y,
                       msg.pose.pose.position.z])
    # The pose is tf's: the bone in the cloud frame, T_cloud_bone = inverse, in metres.
    t_cloud_bone = np.linalg.inv(transform)
    np.testing.assert_allclose(pose_m, t_cloud_bone[:3, 3] / 1000.0, atol=1e-12)
    matrix, cov = conversions.pose_with_covariance_to_arrays(msg)
    np.testing.assert_allclose(matrix, t_cloud_bone, atol=1e-9)
    expected = conversions.covariance_in_parent(transform, covariance)
    np.testing.assert_allclose(cov, expected, rtol=1e-12, atol=1e-15)
    wire = np.asarray(msg.pose.covariance).reshape(6, 6)  # row-major, m and rad
    np.testing.assert_array_equal(wire, wire.T)
    np.testing.assert_allclose(wire[:3, :3], expected[:3, :3] * 1e-6, rtol=1e-12)
    np.testing.assert_allclose(wire[:3, 3:], expected[:3, 3:] * 1e-3, rtol=1e-12)
    np.testing.assert_allclose(wire[3:, 3:], expected[3:, 3:], rtol=1e-12)
    assert np.linalg.eigvalsh(wire).min() > 0.0
    # Unchanged by serialization (what a subscriber reads).
    back = deserialize_message(serialize_message(msg), type(msg))
    np.testing.assert_array_equal(np.asarray(back.pose.covariance), wire.reshape(-1))


def test_bone_pose_covariance_is_the_spread_of_the_perturbed_poses():
    """Monte Carlo: perturb T_bone_cloud on the left, read the pose as ROS does."""
    from neural_bone_reg.core.se3 import se3_exp
    transform, covariance = _posed_covariance(1)
    msg = conversions.bone_pose_with_covariance(transform, covariance, 'robot', 0)
    wire = np.asarray(msg.pose.covariance).reshape(6, 6)
    rng = np.random.default_rng(2)
    deltas = rng.multivariate_normal(np.zeros(6), covariance, size=4000)
    nominal = np.linalg.inv(transform)
    errors = []
    for delta in deltas:
        pose = np.linalg.inv(se3_exp(delta) @ transform)  # the bone in the cloud frame
        # ROS: position error of the origin (m), rotation error about the parent's fixed axes.
        rotvec = Rotation.from_matrix(pose[:3, :3] @ nominal[:3, :3].T).as_rotvec()
        errors.append(np.concatenate([(pose[:3, 3] - nominal[:3, 3]) / 1000.0, rotvec]))
    sample = np.cov(np.asarray(errors).T)
    scale = np.sqrt(np.diag(wire))
    np.testing.assert_allclose(sample / np.outer(scale, scale), wire / np.outer(scale, scale),
                               atol=0.1)


@pytest.mark.parametrize('covariance,needle', [
    (np.full((6, 6), np.inf), 'non-finite'), (np.eye(3), 'shape'),
])
def test_bone_pose_refuses_an_unmeasured_or_malformed_covariance(covariance, needle):
    with pytest.raises(ValueError, match=needle):
        conversions.bone_pose_with_covariance(np.eye(4), covariance, 'robot', 0)


def test_organized_xyzrgb_cloud_is_read_back_by_cloud_to_xyz() -> None:
    """The RGB-D layout lives with the other conversions (it moved from ros/bag.py)."""
    rng = np.random.default_rng(4)
    points = rng.uniform(-200.0, 200.0, (3, 4, 3)).astype(np.float32)  # mm
    points[1, 2] = np.nan  # a ray that missed
    rgb = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    msg = conversions.organized_xyzrgb_cloud(points, rgb, 'camera_optical', STAMP_NS)
    assert (msg.height, msg.width, msg.point_step, msg.is_dense) == (3, 4, 16, False)
    assert [f.name for f in msg.fields] == ['x', 'y', 'z', conversions.RGB_FIELD]
    assert msg.header.frame_id == 'camera_optical'
    valid = np.isfinite(points).all(axis=-1)
    np.testing.assert_allclose(cloud_to_xyz(msg), points[valid], atol=1e-3)
    data = np.frombuffer(bytes(msg.data), np.float32).reshape(3, 4, 4)
    np.testing.assert_array_equal(data[..., 3].view(np.uint32) >> 16, rgb[..., 0])
    with pytest.raises(ValueError, match='expected'):
        conversions.organized_xyzrgb_cloud(points[0], rgb[0], 'camera_optical', STAMP_NS)
