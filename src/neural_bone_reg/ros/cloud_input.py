"""Read an incoming PointCloud2 for the registration stream: checked, in mm, with its frames.

A cloud is refused (InputError, with what was wrong and what was expected) before any
costly conversion when it declares too many points, and then by ``input_checks``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sensor_msgs.msg import PointCloud2

from neural_bone_reg.core.errors import InputError
from neural_bone_reg.ros import input_checks


def read_cloud(msg: PointCloud2, robot_frame: str, bone_frame: str, max_cloud_points: int,
               max_extent_mm: float) -> tuple[np.ndarray, str, int, str]:
    """Return (points mm, parent frame, stamp ns, cloud frame) of a usable cloud.

    The parent frame is ``robot_frame``, or the cloud's own frame where that is ''. Raise
    InputError for an unusable cloud.
    """
    n_declared = int(msg.width) * int(msg.height)
    frame = msg.header.frame_id
    input_checks.check_frame_id(frame)
    if n_declared > max_cloud_points:
        raise InputError(f'cloud declares {n_declared} points (width {msg.width} x height '
                         f'{msg.height}), more than max_cloud_points={max_cloud_points}'
                         '; rejected before conversion')
    parent = robot_frame or frame
    if not parent:
        raise InputError("cloud has an empty frame_id and robot_frame is ''; cannot name "
                         'the parent frame of the transform')
    source = frame or parent  # an empty frame_id is taken to be robot_frame
    stamp_ns = input_checks.check_header(msg, source, bone_frame)
    if source != parent:
        input_checks.check_header(msg, parent, bone_frame)
    # Messages carry metres (REP 103); the arrays and the core work in mm.
    xyz = input_checks.read_points(msg, source, max_extent_mm)
    return xyz, parent, stamp_ns, source


def header_values(msg: PointCloud2) -> dict[str, Any]:
    """Return the header fields a rejection reports; {} where the header itself is broken."""
    try:
        stamp = msg.header.stamp
        return {'frame_id': msg.header.frame_id, 'stamp': f'{stamp.sec}.{stamp.nanosec:09d}',
                'width': msg.width, 'height': msg.height}
    except Exception:  # the report itself must not fail on a broken header
        return {}
