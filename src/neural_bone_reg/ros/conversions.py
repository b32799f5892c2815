"""Convert between ROS messages and numpy arrays; the one module that knows message layouts.

Units: messages carry metres (REP 103), so that tf users such as the robot controller, rviz
and MoveIt read them right; arrays carry the package's unit, millimetres, the unit of the core.
Every function converts on the way through. Pass ``unit='m'`` to keep metres in the array.
"""

from __future__ import annotations

import array
import sys
from typing import TYPE_CHECKING, Union

from builtin_interfaces.msg import Time
from geometry_msgs.msg import TransformStamped
import numpy as np
from numpy.lib import recfunctions
from scipy.spatial.transform import Rotation
from sensor_msgs.msg import PointCloud2, PointField

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
_NS_PER_S = 1_000_000_000
_FLOAT_TYPES = {PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}
_DATATYPE_NAMES = {
    PointField.INT8: 'INT8', PointField.UINT8: 'UINT8', PointField.INT16: 'INT16',
    PointField.UINT16: 'UINT16', PointField.INT32: 'INT32', PointField.UINT32: 'UINT32',
    PointField.FLOAT32: 'FLOAT32', PointField.FLOAT64: 'FLOAT64',
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
        if ns < 0:
            raise ValueError(f'stamp must be non-negative nanoseconds, got {ns}')
        return Time(sec=ns // _NS_PER_S, nanosec=ns % _NS_PER_S)
    raise TypeError(f'stamp must be builtin_interfaces/Time, rclpy.time.Time or int ns, '
                    f'got {type(stamp).__name__}')


def units_per_m(unit: str) -> float:
    """Return how many ``unit`` make a metre; raise ValueError for an unknown unit."""
    try:
        return UNITS_PER_M[unit]
    except KeyError:
        raise ValueError(f'unit must be one of {sorted(UNITS_PER_M)}, got {unit!r}') from None


def _xyz_dtype(msg: PointCloud2) -> np.dtype:
    """Return a structured dtype of one point holding only x, y, z, or raise InputError."""
    by_name = {field.name: field for field in msg.fields}
    missing = [name for name in XYZ if name not in by_name]
    if missing:
        raise InputError(f'PointCloud2 has no field(s) {missing} (it has '
                         f'{[field.name for field in msg.fields]}); expected float x, y and z')
    endian = '>' if msg.is_bigendian else '<'
    formats, offsets = [], []
    for name in XYZ:
        field = by_name[name]
        if field.datatype not in _FLOAT_TYPES:
            kind = _DATATYPE_NAMES.get(field.datatype, 'unknown')
            raise InputError(f'PointCloud2 field {name!r} has datatype {field.datatype} ({kind}); '
                             f'expected FLOAT32 ({PointField.FLOAT32}) or FLOAT64 '
                             f'({PointField.FLOAT64})')
        dtype = np.dtype(endian + _FLOAT_TYPES[field.datatype])
        if field.offset + dtype.itemsize > msg.point_step:
            raise InputError(f'PointCloud2 field {name!r} at offset {field.offset} '
                             f'({dtype.itemsize} bytes) lies beyond point_step {msg.point_step}; '
                             'expected every field inside one point')
        formats.append(dtype)
        offsets.append(field.offset)
    return np.dtype({'names': list(XYZ), 'formats': formats, 'offsets': offsets,
                     'itemsize': msg.point_step})


def _check_size(msg: PointCloud2) -> None:
    """Raise InputError unless data, row_step, point_step, width and height agree."""
    packed_row = msg.width * msg.point_step
    if msg.row_step < packed_row:
        raise InputError(f'PointCloud2 row_step {msg.row_step} is less than width x point_step = '
                         f'{msg.width} x {msg.point_step} = {packed_row}; expected at least that')
    expected = msg.row_step * msg.height
    if len(msg.data) != expected:
        raise InputError(f'PointCloud2 data has {len(msg.data)} bytes; expected row_step x height '
                         f'= {msg.row_step} x {msg.height} = {expected} (point_step '
                         f'{msg.point_step}, width {msg.width}): truncated or inconsistent cloud')


def _finite_rows(xyz: np.ndarray) -> np.ndarray:
    """Return the rows of (N, 3) ``xyz`` whose coordinates are all finite."""
    finite = np.isfinite(xyz).all(axis=1)
    return xyz if finite.all() else xyz[finite]


def _read_xyz_fallback(msg: PointCloud2) -> np.ndarray:
    """Return finite (N, 3) float32 x y z read with a numpy view over ``msg.data``.

    Honours field offsets and order, FLOAT32 and FLOAT64, ``is_bigendian``, padding inside a
    point (``point_step``) and at the end of each row (``row_step``) of organised clouds. The
    result shares memory with ``msg.data`` when the layout allows (packed native float32 x y z
    and no invalid points); copy it before writing to it.
    """
    if msg.width * msg.height == 0:
        return np.zeros((0, 3), np.float32)
    dtype = _xyz_dtype(msg)
    _check_size(msg)
    return _view_xyz(msg, dtype)


def _view_xyz(msg: PointCloud2, dtype: np.dtype) -> np.ndarray:
    """Return the finite x y z of a validated cloud whose points have structured ``dtype``."""
    points = np.ndarray(shape=(msg.height, msg.width), dtype=dtype,
                        buffer=np.frombuffer(msg.data, dtype=np.uint8),
                        strides=(msg.row_step, msg.point_step))
    xyz = recfunctions.structured_to_unstructured(points, dtype=np.float32)
    return _finite_rows(xyz.reshape(-1, 3))


def _sensor_msgs_py_can_read(msg: PointCloud2) -> bool:
    """Tell whether ``read_points_numpy`` reads ``msg`` right.

    It ignores row padding and insists that the first field of the cloud has the same datatype
    as the fields read, so such clouds go to the fallback instead.
    """
    by_name = {field.name: field.datatype for field in msg.fields}
    kinds = {by_name[name] for name in XYZ}
    return (msg.row_step == msg.width * msg.point_step and len(kinds) == 1
            and msg.fields[0].datatype in kinds)


def cloud_to_xyz(msg: PointCloud2, *, unit: str = DEFAULT_UNIT) -> np.ndarray:
    """Return the finite points of a PointCloud2 (metres) as float32 (N, 3) x y z in ``unit``.

    Rows with a NaN or infinite coordinate are dropped; an empty cloud gives shape (0, 3).
    Raises InputError naming the problem when x, y or z is missing or not FLOAT32/FLOAT64, or
    when the data length does not match ``row_step x height``. With ``unit='m'`` the result
    may share memory with ``msg.data``.
    """
    per_m = units_per_m(unit)
    if msg.width * msg.height == 0:
        return np.zeros((0, 3), np.float32)
    dtype = _xyz_dtype(msg)  # the same errors whichever reader runs
    _check_size(msg)
    if _point_cloud2 is not None and _sensor_msgs_py_can_read(msg):
        xyz = _point_cloud2.read_points_numpy(msg, field_names=list(XYZ), skip_nans=True)
        xyz = _finite_rows(np.asarray(xyz, dtype=np.float32).reshape(-1, 3))
    else:
        xyz = _view_xyz(msg, dtype)
    return xyz * np.float32(per_m) if per_m != 1.0 else xyz


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
