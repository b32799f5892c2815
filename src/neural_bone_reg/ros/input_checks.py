"""Checks of an incoming cloud's header and points, phrased for the user who sent it.

The registration node refuses, with a message saying what was wrong and what was expected,
every cloud that must not lead to a transform: a frame id tf would not take (or the bone
frame itself: a self-transform), a stamp that ROS time cannot represent, an unreadable
layout (:func:`conversions.check_layout`), and points no bone patch could be. Messages speak
of the wire, which carries metres (REP 103); the returned arrays are in mm, for the core.
"""

from __future__ import annotations

import numpy as np
from sensor_msgs.msg import PointCloud2

from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.io import check_points
from neural_bone_reg.ros.conversions import byteswapped_xyz, cloud_to_xyz, stamp_to_ns

#: Longest frame id accepted, characters (tf frame names are short identifiers).
MAX_FRAME_ID_CHARS = 256
#: Characters of a frame id quoted in a message at most.
MAX_QUOTED_FRAME_CHARS = 64
#: Characters a frame id may hold: printable ASCII without spaces, as tf tools expect.
_FRAME_ID_CHARS = frozenset(chr(c) for c in range(0x21, 0x7f))


def quoted(frame_id: str) -> str:
    """Return ``repr(frame_id)``, cut for messages where it is long."""
    if len(frame_id) <= MAX_QUOTED_FRAME_CHARS:
        return repr(frame_id)
    return repr(frame_id[:MAX_QUOTED_FRAME_CHARS]) + f'... ({len(frame_id)} characters)'


def tf_frame(frame_id: str) -> str:
    """Return a frame id as tf2 stores it: without a leading '/'."""
    return frame_id.lstrip('/')


def check_frame_id(frame_id: str, what: str = 'header.frame_id') -> None:
    """Raise InputError unless ``frame_id`` is '' or a short printable-ASCII frame name."""
    if len(frame_id) > MAX_FRAME_ID_CHARS:
        raise InputError(f'{what} has {len(frame_id)} characters ({quoted(frame_id)}); expected '
                         f'a frame name of at most {MAX_FRAME_ID_CHARS}')
    if frame_id and (not set(frame_id) <= _FRAME_ID_CHARS or not tf_frame(frame_id)):
        raise InputError(f'{what} {ascii(frame_id[:MAX_QUOTED_FRAME_CHARS])} is not a tf frame '
                         "name; expected printable ASCII without spaces, such as 'camera_link'")


def check_header(msg: PointCloud2, parent: str, bone_frame: str) -> int:
    """Return the cloud's stamp in nanoseconds, or raise InputError for an unusable header.

    ``parent`` is the frame the transform would be broadcast from (the cloud's frame or
    robot_frame) and ``bone_frame`` the child frame in effect: equal frames would put a
    frame-to-itself transform on tf.
    """
    if tf_frame(parent) == tf_frame(bone_frame):
        raise InputError(f'cloud is in frame {quoted(parent)}, which is the bone frame (the '
                         'child frame of the transform): a frame cannot be registered to itself; '
                         'expected the frame of the sensor or robot')
    return stamp_to_ns(msg.header.stamp)


def check_extent(xyz_mm: np.ndarray, frame: str, max_extent_mm: float) -> None:
    """Raise InputError when a cloud is wider than the bone could look (wrong units)."""
    extent = float(np.linalg.norm(np.ptp(xyz_mm, axis=0)))
    if extent > max_extent_mm:
        raise InputError(
            f'cloud in frame {quoted(frame)} spans {extent / 1000.0:.3g} m but the bone is at '
            f'most {max_extent_mm / 1000.0:.3g} m across; expected a patch of this bone with '
            'coordinates in metres (REP 103). Was it published in mm?')


def _check_values(xyz_mm: np.ndarray, msg: PointCloud2, frame: str,
                  max_extent_mm: float) -> np.ndarray:
    """Return the checked float64 points, or raise InputError saying what is wrong."""
    if msg.width * msg.height == 0:
        raise InputError(f'cloud in frame {quoted(frame)} is empty: it declares no points (width '
                         f'{msg.width} x height {msg.height}, {len(msg.data)} bytes of data); '
                         'expected at least 1 point')
    if len(xyz_mm) == 0:
        raise InputError(f'all {msg.width * msg.height} points of the cloud in frame '
                         f'{quoted(frame)} have a NaN or infinite coordinate (all NaN or inf: no '
                         'returns); expected finite x y z in metres')
    xyz = check_points(xyz_mm, name=f'cloud in frame {quoted(frame)}', min_points=1,
                       report_unit='m')
    check_extent(xyz, frame, max_extent_mm)
    return xyz


def byte_order_hint(msg: PointCloud2, frame: str, max_extent_mm: float) -> str:
    """Return a hint when the cloud read with the other byte order is plausible, else ''."""
    try:
        swapped = _check_values(byteswapped_xyz(msg), msg, frame, max_extent_mm)
    except InputError:
        return ''
    extent = float(np.linalg.norm(np.ptp(swapped, axis=0))) / 1000.0
    return (f'Read with the other byte order, its {len(swapped)} points are plausible (spanning '
            f'{extent:.3g} m): is is_bigendian ({bool(msg.is_bigendian)}) wrong?')


def read_points(msg: PointCloud2, frame: str, max_extent_mm: float) -> np.ndarray:
    """Return the finite points of a cloud as float64 (N, 3) mm, or raise InputError.

    Refuses unreadable layouts, clouds without a finite point, coordinates no bone in a robot
    frame has, clouds too small to be a bone patch and clouds wider than ``max_extent_mm``;
    where the other byte order would give plausible points, the message says so.
    """
    try:
        return _check_values(cloud_to_xyz(msg), msg, frame, max_extent_mm)
    except InputError as exc:  # a layout error reads no better swapped: no hint then
        hint = byte_order_hint(msg, frame, max_extent_mm)
        if hint:
            raise InputError(f'{exc} {hint}') from exc
        raise
