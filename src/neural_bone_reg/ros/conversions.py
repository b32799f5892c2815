"""Convert between ROS messages and numpy arrays; the one module that knows message layouts.

Units: messages carry metres (REP 103), so that tf users such as the robot controller, rviz
and MoveIt read them right; arrays carry the package's unit, millimetres, the unit of the core.
Every function converts on the way through. Pass ``unit='m'`` to keep metres in the array.
"""

from __future__ import annotations

import array
import sys
from typing import Any, Sequence, TYPE_CHECKING, Union

from builtin_interfaces.msg import Time
from geometry_msgs.msg import PoseWithCovarianceStamped, TransformStamped
import numpy as np
from numpy.lib import recfunctions
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, PointField

from neural_bone_reg.core.confidence import covariance_in_parent
from neural_bone_reg.core.errors import InputError

if TYPE_CHECKING:
    import rclpy.time

try:  # Real ROS 2 installs have it; the PyPI wheels do not.
    from sensor_msgs_py import point_cloud2 as _point_cloud2
except ImportError:  # pragma: no cover - depends on the installation
    _point_cloud2 = None

#: Array units per metre, by the names that ``unit`` takes.
UNITS_PER_M = {'mm': 1000.0, 'm': 1.0}
#: The unit of arrays unless told otherwise: the core's.
DEFAULT_UNIT = 'mm'
#: Largest deviation of R^T R from I and of the bottom row from [0 0 0 1] that a 4x4 matrix
#: may have and still count as rigid (float32 round-off stays far below).
RIGID_TOLERANCE = 1e-4

XYZ = ('x', 'y', 'z')
#: Most fields a cloud may declare: x, y, z and every channel of any sensor fit with room to
#: spare; a table of thousands is hostile, and costs a Python loop per message.
MAX_FIELDS = 256
#: Largest point_step accepted, bytes: far above any sensor's point, and it keeps the numpy
#: view of the data within a C int itemsize (point_step >= 2**31 once crashed numpy).
MAX_POINT_STEP = 65_536
#: Field names that may repeat: padding (PCL names it '_'; some drivers leave it empty).
PADDING_NAMES = ('', '_')
#: Fields listed by name in a message at most; the rest are counted.
MAX_LISTED_FIELDS = 8
#: Characters of one field name shown in a message at most.
MAX_LISTED_NAME_CHARS = 32
#: Largest magnitude a float32 holds; FLOAT64 coordinates beyond it cannot be read as float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
_NS_PER_S = 1_000_000_000
#: Largest builtin_interfaces/Time: sec is an int32, nanosec < 1e9. Later stamps would wrap.
MAX_STAMP_NS = (2**31 - 1) * _NS_PER_S + _NS_PER_S - 1
_FLOAT_TYPES = {PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}
_DATATYPE_NAMES = {
    PointField.INT8: 'INT8', PointField.UINT8: 'UINT8', PointField.INT16: 'INT16',
    PointField.UINT16: 'UINT16', PointField.INT32: 'INT32', PointField.UINT32: 'UINT32',
    PointField.FLOAT32: 'FLOAT32', PointField.FLOAT64: 'FLOAT64',
}
_DATATYPE_SIZES = {
    PointField.INT8: 1, PointField.UINT8: 1, PointField.INT16: 2, PointField.UINT16: 2,
    PointField.INT32: 4, PointField.UINT32: 4, PointField.FLOAT32: 4, PointField.FLOAT64: 8,
}

#: What a stamp may be given as: a message, an ``rclpy.time.Time``, or integer nanoseconds.
Stamp = Union[Time, 'rclpy.time.Time', int]


def to_time_msg(stamp: Stamp) -> Time:
    """Return ``stamp`` as ``builtin_interfaces/Time``.

    Accepts a ``Time`` message, anything with ``to_msg()`` (``rclpy.time.Time``) or integer
    nanoseconds since the epoch.
    """
    if isinstance(stamp, Time):
        return stamp
    if hasattr(stamp, 'to_msg'):
        return stamp.to_msg()
    if isinstance(stamp, (int, np.integer)) and not isinstance(stamp, bool):
        ns = int(stamp)
        if not 0 <= ns <= MAX_STAMP_NS:
            raise ValueError(f'stamp must be nanoseconds in [0, {MAX_STAMP_NS}] (what '
                             f'builtin_interfaces/Time holds), got {ns}')
        return Time(sec=ns // _NS_PER_S, nanosec=ns % _NS_PER_S)
    raise TypeError(f'stamp must be builtin_interfaces/Time, rclpy.time.Time or int ns, '
                    f'got {type(stamp).__name__}')


def stamp_to_ns(stamp: Time) -> int:
    """Return a message stamp as nanoseconds, or raise InputError if ROS time cannot hold it.

    ROS time is non-negative and ``nanosec`` is below one second. rclpy raises on a negative
    ``sec`` and silently carries ``nanosec`` >= 1e9 into the seconds, which could push a
    transform's stamp past the int32 ``sec`` (it once went out as -2147483645.29).
    """
    sec, nanosec = int(stamp.sec), int(stamp.nanosec)
    if sec < 0 or not 0 <= nanosec < _NS_PER_S:
        raise InputError(f'header.stamp is sec {sec}, nanosec {nanosec}, which ROS time cannot '
                         f'represent; expected sec >= 0 and 0 <= nanosec < {_NS_PER_S}')
    return sec * _NS_PER_S + nanosec


def describe_fields(fields: Sequence[PointField], limit: int = MAX_LISTED_FIELDS) -> str:
    """Return a short list of a field table for messages: names, the rest counted."""
    names = [repr(_short(field.name)) for field in fields[:limit]]
    more = len(fields) - len(names)
    return '[' + ', '.join(names) + (f', ... and {more} more' if more > 0 else '') + ']'


def _short(text: str, limit: int = MAX_LISTED_NAME_CHARS) -> str:
    """Return ``text`` cut to ``limit`` characters, with '...' where it was cut."""
    return text if len(text) <= limit else text[:limit] + '...'


def units_per_m(unit: str) -> float:
    """Return how many ``unit`` make a metre; raise ValueError for an unknown unit."""
    try:
        return UNITS_PER_M[unit]
    except KeyError:
        raise ValueError(f'unit must be one of {sorted(UNITS_PER_M)}, got {unit!r}') from None


def check_layout(msg: PointCloud2) -> None:
    """Raise InputError unless the field table and sizes of ``msg`` describe readable x y z.

    Checks, in Python integers (no overflow): at most MAX_FIELDS fields, point_step at most
    MAX_POINT_STEP, every field a known datatype lying inside one point (offset + count x size
    <= point_step), no repeated name (except padding), x y z present with count 1, FLOAT32 or
    FLOAT64 and not overlapping, and data, row_step, point_step, width and height in agreement.
    A cloud that declares no points passes when it carries no more data than that says.
    """
    _check_size(msg)
    if msg.width * msg.height == 0:
        return
    fields = msg.fields
    if len(fields) > MAX_FIELDS:
        raise InputError(f'PointCloud2 declares {len(fields)} fields {describe_fields(fields)}; '
                         f'expected at most {MAX_FIELDS} (x, y, z and the channels of a sensor)')
    if msg.point_step > MAX_POINT_STEP:
        raise InputError(f'PointCloud2 point_step is {msg.point_step} bytes; expected at most '
                         f'{MAX_POINT_STEP} (one point of x, y, z and its channels)')
    seen: dict[str, PointField] = {}
    for field in fields:
        name = _short(field.name)
        size = _DATATYPE_SIZES.get(field.datatype)
        if size is None:
            raise InputError(f'PointCloud2 field {name!r} has datatype {field.datatype}, which is '
                             'no PointField type; expected INT8 (1) ... FLOAT64 (8)')
        end = field.offset + field.count * size
        if end > msg.point_step:
            raise InputError(
                f'PointCloud2 field {name!r} at offset {field.offset} ({field.count} x {size} '
                f'bytes) lies beyond point_step {msg.point_step}; expected every field inside '
                'one point')
        if field.name in seen and field.name not in PADDING_NAMES:
            raise InputError(f'PointCloud2 has two fields named {name!r} (at offsets '
                             f'{seen[field.name].offset} and {field.offset}); expected each name '
                             'once')
        seen[field.name] = field
    missing = [name for name in XYZ if name not in seen]
    if missing:
        raise InputError(f'PointCloud2 has no field(s) {missing} (it has '
                         f'{describe_fields(fields)}); expected float x, y and z')
    spans = []
    for name in XYZ:
        field = seen[name]
        if field.datatype not in _FLOAT_TYPES:
            kind = _DATATYPE_NAMES[field.datatype]
            raise InputError(f'PointCloud2 field {name!r} has datatype {field.datatype} ({kind}); '
                             f'expected FLOAT32 ({PointField.FLOAT32}) or FLOAT64 '
                             f'({PointField.FLOAT64})')
        if field.count != 1:
            raise InputError(f'PointCloud2 field {name!r} has count {field.count}; expected 1 '
                             '(one coordinate per point)')
        spans.append((field.offset, field.offset + _DATATYPE_SIZES[field.datatype], name))
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
        if start < end:
            raise InputError(f'PointCloud2 fields {first!r} and {second!r} overlap (bytes '
                             f'{start}-{end - 1}); expected separate coordinates')


def _xyz_dtype(msg: PointCloud2, swap_bytes: bool = False) -> np.dtype:
    """Return a structured dtype of one point holding only x, y, z of a checked cloud."""
    big = bool(msg.is_bigendian) != swap_bytes
    endian = '>' if big else '<'
    by_name = {field.name: field for field in msg.fields}
    formats = [np.dtype(endian + _FLOAT_TYPES[by_name[name].datatype]) for name in XYZ]
    return np.dtype({'names': list(XYZ), 'formats': formats,
                     'offsets': [by_name[name].offset for name in XYZ],
                     'itemsize': msg.point_step})


def _check_size(msg: PointCloud2) -> None:
    """Raise InputError unless data, row_step, point_step, width and height agree."""
    packed_row = msg.width * msg.point_step
    if msg.row_step < packed_row:
        raise InputError(f'PointCloud2 row_step {msg.row_step} is less than width x point_step = '
                         f'{msg.width} x {msg.point_step} = {packed_row}; expected at least that')
    if msg.width * msg.height == 0:
        if len(msg.data) > msg.row_step * msg.height:
            raise InputError(f'PointCloud2 declares no points (width {msg.width} x height '
                             f'{msg.height}) but carries {len(msg.data)} bytes of data; expected '
                             'width and height to count the points')
        return
    expected = msg.row_step * msg.height
    if len(msg.data) != expected:
        raise InputError(f'PointCloud2 data has {len(msg.data)} bytes; expected row_step x height '
                         f'= {msg.row_step} x {msg.height} = {expected} (point_step '
                         f'{msg.point_step}, width {msg.width}): truncated or inconsistent cloud')


def _finite_rows(xyz: np.ndarray) -> np.ndarray:
    """Return the finite rows of (N, 3) ``xyz`` as float32 (a view when nothing changes).

    Raises InputError when finite float64 coordinates are too large for float32, rather than
    letting them turn into infinities that would be dropped as if they were missing returns.
    """
    finite = np.isfinite(xyz).all(axis=1)
    if not finite.all():
        xyz = xyz[finite]
    if xyz.dtype != np.float32:
        peak = float(np.abs(xyz).max()) if len(xyz) else 0.0
        if peak > FLOAT32_MAX:
            n_over = int((np.abs(xyz) > FLOAT32_MAX).any(axis=1).sum())
            raise InputError(f'PointCloud2 has {n_over} points with coordinates up to '
                             f'{peak:.3g} m, beyond what float32 holds ({FLOAT32_MAX:.3g}); '
                             'expected metres (REP 103)')
        xyz = xyz.astype(np.float32)
    return xyz


def _scaled(xyz: np.ndarray, per_m: float) -> np.ndarray:
    """Return float32 metres ``xyz`` in the unit of ``per_m``; InputError where that overflows."""
    if per_m == 1.0:
        return xyz
    peak = float(np.abs(xyz).max()) if len(xyz) else 0.0
    if peak * per_m > FLOAT32_MAX:
        raise InputError(f'PointCloud2 has coordinates up to {peak:.3g} m, too large to convert '
                         f'to float32 in units of 1/{per_m:g} m; expected metres (REP 103)')
    return xyz * np.float32(per_m)


def _read_xyz_fallback(msg: PointCloud2) -> np.ndarray:
    """Return finite (N, 3) float32 x y z read with a numpy view over ``msg.data``.

    Honours field offsets and order, FLOAT32 and FLOAT64, ``is_bigendian``, padding inside a
    point (``point_step``) and at the end of each row (``row_step``) of organised clouds. The
    result shares memory with ``msg.data`` when the layout allows (packed native float32 x y z
    and no invalid points); copy it before writing to it.
    """
    check_layout(msg)
    if msg.width * msg.height == 0:
        return np.zeros((0, 3), np.float32)
    return _view_xyz(msg, _xyz_dtype(msg))


def _view_xyz(msg: PointCloud2, dtype: np.dtype) -> np.ndarray:
    """Return the finite x y z of a checked cloud whose points have structured ``dtype``."""
    points = np.ndarray(shape=(msg.height, msg.width), dtype=dtype,
                        buffer=np.frombuffer(msg.data, dtype=np.uint8),
                        strides=(msg.row_step, msg.point_step))
    wide = any(dtype.fields[name][0].itemsize > 4 for name in XYZ)
    xyz = recfunctions.structured_to_unstructured(
        points, dtype=np.float64 if wide else np.float32)
    return _finite_rows(xyz.reshape(-1, 3))


def byteswapped_xyz(msg: PointCloud2, *, unit: str = DEFAULT_UNIT) -> np.ndarray:
    """Return the finite points of a cloud read with the other byte order than it declares.

    For diagnosis only: when the points read as declared are absurd and these are plausible,
    ``is_bigendian`` is likely wrong. Raises InputError like :func:`cloud_to_xyz`.
    """
    per_m = units_per_m(unit)
    check_layout(msg)
    if msg.width * msg.height == 0:
        return np.zeros((0, 3), np.float32)
    xyz = _view_xyz(msg, _xyz_dtype(msg, swap_bytes=True))
    return _scaled(xyz, per_m)


def _sensor_msgs_py_can_read(msg: PointCloud2) -> bool:
    """Tell whether ``read_points_numpy`` reads ``msg`` right.

    It ignores row padding, insists that the first field of the cloud has the same datatype
    as the fields read, asserts on any field of count 0 or on a repeated column name (the
    padding ``_`` that check_layout allows twice, or ``rgb`` of count 2 beside ``rgb_0``), and
    swaps a cloud of the other byte order in place, in the message's own buffer (which other
    subscribers and a recorder share). Such clouds go to the fallback instead.
    """
    by_name = {field.name: field.datatype for field in msg.fields}
    kinds = {by_name[name] for name in XYZ}
    native = bool(msg.is_bigendian) == (sys.byteorder == 'big')
    return (native and msg.row_step == msg.width * msg.point_step and len(kinds) == 1
            and msg.fields[0].datatype in kinds and _columns_unique(msg.fields))


def _columns_unique(fields) -> bool:
    """Tell whether sensor_msgs_py's dtype_from_fields names every column of ``fields`` once.

    It names a field of count n > 1 ``name_0`` ... ``name_{n-1}`` and an unnamed field
    ``unnamed_field_<index>``, and refuses a count of 0.
    """
    columns: set[str] = set()
    for index, field in enumerate(fields):
        if field.count < 1:
            return False
        name = field.name or f'unnamed_field_{index}'
        names = [name] if field.count == 1 else [f'{name}_{a}' for a in range(field.count)]
        if columns.intersection(names):
            return False
        columns.update(names)
    return True


def cloud_to_xyz(msg: PointCloud2, *, unit: str = DEFAULT_UNIT) -> np.ndarray:
    """Return the finite points of a PointCloud2 (metres) as float32 (N, 3) x y z in ``unit``.

    Rows with a NaN or infinite coordinate are dropped; an empty cloud gives shape (0, 3).
    Raises InputError naming the problem when the layout is unreadable (see
    :func:`check_layout`) or finite coordinates overflow float32. With ``unit='m'`` the result
    may share memory with ``msg.data``.
    """
    per_m = units_per_m(unit)
    check_layout(msg)  # the same errors whichever reader runs
    if msg.width * msg.height == 0:
        return np.zeros((0, 3), np.float32)
    if _point_cloud2 is not None and _sensor_msgs_py_can_read(msg):
        xyz = _point_cloud2.read_points_numpy(msg, field_names=list(XYZ), skip_nans=True)
        xyz = _finite_rows(np.asarray(xyz).reshape(-1, 3))
    else:
        xyz = _view_xyz(msg, _xyz_dtype(msg))
    return _scaled(xyz, per_m)


def xyz_to_cloud(points: np.ndarray, frame_id: str, stamp: Stamp, *,
                 unit: str = DEFAULT_UNIT) -> PointCloud2:
    """Return an unorganised float32 x y z PointCloud2 (metres) of (N, 3) ``points`` in ``unit``.

    Points are written as given, NaNs included; ``is_dense`` says whether all are finite.
    """
    per_m = units_per_m(unit)
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f'points has shape {points.shape}; expected (N, 3)')
    xyz = np.ascontiguousarray(points / per_m if per_m != 1.0 else points, dtype=np.float32)
    itemsize = xyz.dtype.itemsize
    msg = PointCloud2()
    msg.header.frame_id = frame_id
    msg.header.stamp = to_time_msg(stamp)
    msg.height = 1
    msg.width = len(xyz)
    msg.fields = [PointField(name=name, offset=i * itemsize, datatype=PointField.FLOAT32,
                             count=1) for i, name in enumerate(XYZ)]
    msg.is_bigendian = sys.byteorder == 'big'
    msg.point_step = 3 * itemsize
    msg.row_step = msg.point_step * msg.width
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = array.array('B', xyz.tobytes())
    return msg


def image_to_cloud(xyz: np.ndarray, frame_id: str, stamp: Stamp, *,
                   rgb: np.ndarray | None = None, unit: str = DEFAULT_UNIT) -> PointCloud2:
    """Return an organised PointCloud2 (metres) of an (H, W, 3) image of points in ``unit``.

    Pixels without a return hold NaN. With ``rgb`` ((H, W, 3) uint8) each point also has the
    packed ``rgb`` FLOAT32 field of PCL and RGB-D drivers (0x00RRGGBB), 16 bytes per point.
    """
    per_m = units_per_m(unit)
    xyz = np.asarray(xyz)
    if xyz.ndim != 3 or xyz.shape[2] != 3:
        raise ValueError(f'xyz has shape {xyz.shape}; expected (H, W, 3)')
    height, width = xyz.shape[:2]
    names = list(XYZ) + ([] if rgb is None else ['rgb'])
    layout = np.dtype({'names': names, 'formats': ['<f4'] * len(names),
                       'offsets': [4 * i for i in range(len(names))], 'itemsize': 4 * len(names)})
    points = np.zeros((height, width), layout)
    for i, name in enumerate(XYZ):
        points[name] = xyz[..., i] / per_m
    if rgb is not None:
        rgb = np.asarray(rgb, dtype=np.uint32)
        if rgb.shape != xyz.shape:
            raise ValueError(f'rgb has shape {rgb.shape}; expected {xyz.shape} (uint8)')
        packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
        points['rgb'] = packed.astype('<u4').view('<f4')
    msg = PointCloud2()
    msg.header.frame_id = frame_id
    msg.header.stamp = to_time_msg(stamp)
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(names)]
    msg.is_bigendian = False
    msg.point_step = layout.itemsize
    msg.row_step = msg.point_step * width
    msg.is_dense = bool(np.isfinite(xyz).all())
    msg.data = points.tobytes()
    return msg


def check_rigid(transform: np.ndarray, name: str = 'transform') -> np.ndarray:
    """Return ``transform`` as a float64 4x4 array, or raise ValueError if it is not rigid."""
    matrix = np.asarray(transform, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f'{name} has shape {matrix.shape}; expected a 4x4 rigid transform')
    if not np.isfinite(matrix).all():
        raise ValueError(f'{name} has non-finite entries; expected a 4x4 rigid transform')
    if np.abs(matrix[3] - (0.0, 0.0, 0.0, 1.0)).max() > RIGID_TOLERANCE:
        raise ValueError(f'{name} has bottom row {matrix[3].tolist()}; expected [0, 0, 0, 1]')
    rotation = matrix[:3, :3]
    orthogonality = np.abs(rotation.T @ rotation - np.eye(3)).max()
    if orthogonality > RIGID_TOLERANCE or np.linalg.det(rotation) < 0.0:
        raise ValueError(f'{name} rotation block is not a proper rotation (|R^T R - I| = '
                         f'{orthogonality:.2g}, det = {np.linalg.det(rotation):.3g}); expected '
                         'an orthonormal matrix with det +1')
    return matrix


def matrix_to_transform_stamped(transform: np.ndarray, parent_frame: str, child_frame: str,
                                stamp: Stamp, *, unit: str = DEFAULT_UNIT) -> TransformStamped:
    """Return a rigid 4x4 ``transform`` (translation in ``unit``) as a TransformStamped (metres).

    ``transform`` maps points in ``child_frame`` into ``parent_frame``, as tf's does
    (T_parent_child). Raises ValueError if it is not a proper rigid transform.
    """
    per_m = units_per_m(unit)
    matrix = check_rigid(transform)
    x, y, z, w = Rotation.from_matrix(matrix[:3, :3]).as_quat()
    msg = TransformStamped()
    msg.header.frame_id = parent_frame
    msg.header.stamp = to_time_msg(stamp)
    msg.child_frame_id = child_frame
    tx, ty, tz = (float(v) / per_m for v in matrix[:3, 3])
    msg.transform.translation.x, msg.transform.translation.y = tx, ty
    msg.transform.translation.z = tz
    rot = msg.transform.rotation
    rot.x, rot.y, rot.z, rot.w = float(x), float(y), float(z), float(w)
    return msg


def transform_stamped_to_matrix(msg: TransformStamped, *,
                                unit: str = DEFAULT_UNIT) -> np.ndarray:
    """Return the float64 4x4 matrix (T_parent_child, translation in ``unit``) of a message."""
    per_m = units_per_m(unit)
    rot = msg.transform.rotation
    quat = np.array([rot.x, rot.y, rot.z, rot.w], dtype=np.float64)
    if not np.isfinite(quat).all() or np.linalg.norm(quat) == 0.0:
        raise ValueError(f'transform rotation {quat.tolist()} is not a valid quaternion')
    matrix = np.eye(4)
    matrix[:3, :3] = Rotation.from_quat(quat).as_matrix()
    trans = msg.transform.translation
    matrix[:3, 3] = np.array([trans.x, trans.y, trans.z], dtype=np.float64) * per_m
    return matrix


#: Rows and columns of a pose covariance: (x, y, z) then rotations about X, Y, Z.
POSE_DOF = 6


def _pose_covariance_scale(per_m: float) -> np.ndarray:
    """Return the (6,) factors that turn a (length unit, rad) covariance into (m, rad)."""
    return np.array([1.0 / per_m] * 3 + [1.0] * 3)


def bone_pose_with_covariance(transform: np.ndarray, covariance: np.ndarray, parent_frame: str,
                              stamp: Stamp, *, unit: str = DEFAULT_UNIT
                              ) -> PoseWithCovarianceStamped:
    """Return the bone's pose in ``parent_frame`` with its covariance, in ROS conventions.

    ``transform`` is a registration result's T_bone_cloud (cloud points into the bone frame,
    translation in ``unit``) and ``covariance`` its (6, 6) error covariance in the core's
    convention (``core.confidence``: a left motion in the bone frame, ``unit`` and rad). The
    message holds the inverse, the bone's pose in the cloud (parent) frame, as tf does, in
    metres and a quaternion, and the covariance over (x, y, z) of the bone origin and rotations
    about the parent's fixed X, Y, Z axes, row-major, in m^2, m rad and rad^2
    (geometry_msgs/PoseWithCovariance). Raises ValueError for a non-rigid transform or a
    covariance that is not a finite, symmetric (6, 6) matrix.
    """
    per_m = units_per_m(unit)
    t_bone_cloud = check_rigid(transform, 'registration transform')
    cov = np.asarray(covariance, dtype=np.float64)
    if cov.shape != (POSE_DOF, POSE_DOF) or not np.isfinite(cov).all():
        raise ValueError(f'pose covariance has shape {cov.shape} and '
                         f'{int(np.size(cov) - np.isfinite(cov).sum())} non-finite entries; '
                         'expected a finite (6, 6) matrix')
    t_cloud_bone = np.linalg.inv(t_bone_cloud)
    scale = _pose_covariance_scale(per_m)
    cov_parent = covariance_in_parent(t_bone_cloud, cov) * np.outer(scale, scale)
    pose = matrix_to_transform_stamped(t_cloud_bone, parent_frame, '', stamp, unit=unit)
    msg = PoseWithCovarianceStamped()
    msg.header = pose.header
    translation, rotation = pose.transform.translation, pose.transform.rotation
    position = msg.pose.pose.position
    position.x, position.y, position.z = translation.x, translation.y, translation.z
    orientation = msg.pose.pose.orientation
    orientation.x, orientation.y = rotation.x, rotation.y
    orientation.z, orientation.w = rotation.z, rotation.w
    msg.pose.covariance = [float(v) for v in cov_parent.reshape(-1)]
    return msg


def pose_with_covariance_to_arrays(msg: PoseWithCovarianceStamped, *,
                                   unit: str = DEFAULT_UNIT) -> tuple[np.ndarray, np.ndarray]:
    """Return (T_parent_child 4x4 in ``unit``, (6, 6) covariance in ``unit`` and rad)."""
    per_m = units_per_m(unit)
    pose = TransformStamped()
    pose.transform.translation.x = msg.pose.pose.position.x
    pose.transform.translation.y = msg.pose.pose.position.y
    pose.transform.translation.z = msg.pose.pose.position.z
    pose.transform.rotation = msg.pose.pose.orientation
    matrix = transform_stamped_to_matrix(pose, unit=unit)
    scale = 1.0 / _pose_covariance_scale(per_m)
    cov = np.asarray(msg.pose.covariance, dtype=np.float64).reshape(POSE_DOF, POSE_DOF)
    return matrix, cov * np.outer(scale, scale)


#: The packed ``rgb`` field of PCL and the RealSense driver: a float32 whose bits are the
#: uint32 0x00RRGGBB. Layout of an RGB-D camera's organized clouds: x y z rgb, float32, 16 bytes
#: a point.
RGB_FIELD = 'rgb'
XYZRGB_POINT_STEP = 16


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """Return (..., 3) uint8 colours as float32 values of the packed 0x00RRGGBB ``rgb`` field."""
    rgb = np.asarray(rgb)
    if rgb.shape[-1:] != (3,) or rgb.dtype != np.uint8:
        raise ValueError(f'rgb must be (..., 3) uint8, got {rgb.shape} {rgb.dtype}')
    packed = ((rgb[..., 0].astype(np.uint32) << 16) | (rgb[..., 1].astype(np.uint32) << 8)
              | rgb[..., 2].astype(np.uint32))
    return packed.view(np.float32)


def organized_xyzrgb_cloud(points: np.ndarray, rgb: np.ndarray, frame_id: str, stamp: Any,
                           *, unit: str = DEFAULT_UNIT) -> PointCloud2:
    """Return an organized x y z rgb PointCloud2 (metres) as an RGB-D camera driver sends it.

    ``points`` is (height, width, 3) in ``unit`` with NaN where the sensor returned nothing,
    ``rgb`` (height, width, 3) uint8. Fields x, y, z and the packed ``rgb`` are float32 at
    offsets 0, 4, 8, 12 (point_step 16, as realsense2_camera and sensor_msgs_py's create_cloud
    lay them out); ``is_dense`` is False whenever a point is NaN.
    """
    points = np.asarray(points)
    if points.ndim != 3 or points.shape[2] != 3:
        raise ValueError(f'points has shape {points.shape}; expected (height, width, 3)')
    if np.shape(rgb) != points.shape:
        raise ValueError(f'rgb has shape {np.shape(rgb)}; expected {points.shape} like points')
    height, width = points.shape[:2]
    per_m = units_per_m(unit)
    data = np.empty((height, width, 4), dtype=np.float32)
    data[..., :3] = points / per_m if per_m != 1.0 else points
    data[..., 3] = pack_rgb(rgb)
    msg = PointCloud2()
    msg.header.frame_id = frame_id
    msg.header.stamp = to_time_msg(stamp)
    msg.height, msg.width = height, width
    msg.fields = [PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                  for i, name in enumerate(('x', 'y', 'z', RGB_FIELD))]
    msg.is_bigendian = sys.byteorder == 'big'
    msg.point_step = XYZRGB_POINT_STEP
    msg.row_step = XYZRGB_POINT_STEP * width
    msg.is_dense = bool(np.isfinite(data[..., :3]).all())
    msg.data = array.array('B', data.tobytes())
    return msg
