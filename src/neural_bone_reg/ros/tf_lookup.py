"""Transform clouds into robot_frame at their stamps through tf2_ros (never a tf of our own).

The registration node calls :meth:`CloudTransformer.lookup_mm` from its worker thread, never
from a callback: ``tf2_ros.Buffer.lookup_transform`` with a timeout polls (sleeps) until the
transform is available or the timeout passes, and then raises one of tf2's exceptions
(``LookupException``, ``ConnectivityException``, ``ExtrapolationException``,
``InvalidArgumentException``, all ``tf2_ros.TransformException``). Each failure becomes a
:class:`TfLookupError` whose message says what was looked up, what failed and what to do.

Where tf2_ros is not importable (the PyPI wheels have none), nothing is looked up: every
lookup raises TfLookupError naming the missing package. A test injects a stand-in with the
Buffer interface used here (``lookup_transform(target, source, time, timeout)``); the errors
it raises are then caught by tf2_ros's TransformException where tf2_ros exists, and by a
generic fallback (any Exception) where it does not.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.time import Time

from neural_bone_reg.ros.conversions import transform_stamped_to_matrix

try:  # Real ROS 2 installs have it; the PyPI wheels do not.
    import tf2_ros
except ImportError:  # pragma: no cover - depends on the installation
    tf2_ros = None

_NS_PER_S = 1_000_000_000


def missing_tf2_ros_reason() -> str:
    """Return why no lookup is possible without tf2_ros, and what to do about it."""
    distro = os.environ.get('ROS_DISTRO') or '<distro>'
    return (f'tf2_ros is not importable: install ros-{distro}-tf2-ros-py, or publish the '
            "cloud in robot_frame (or set robot_frame to '' to register in the cloud's frame)")


def transform_errors() -> tuple[type[BaseException], ...]:
    """Return the exception types a failed lookup raises: tf2's, or any where tf2 is missing."""
    if tf2_ros is not None:
        return (tf2_ros.TransformException,)
    return (Exception,)


class TfLookupError(Exception):
    """A cloud's frame could not be transformed into robot_frame; the message says why."""


class CloudTransformer:
    """Look up T_target_source (mm) at a stamp through a ``tf2_ros.Buffer`` (or a stand-in)."""

    def __init__(self, buffer: Any = None,
                 errors: tuple[type[BaseException], ...] | None = None) -> None:
        """Wrap ``buffer`` (None: no tf available); ``errors`` are caught as failed lookups."""
        self.buffer = buffer
        self.errors = transform_errors() if errors is None else errors
        self._listener: Any = None

    @classmethod
    def for_node(cls, node: Node) -> 'CloudTransformer':
        """Return a transformer with a real Buffer and TransformListener on ``node``.

        Without tf2_ros the transformer has no buffer, and every lookup explains that.
        """
        if tf2_ros is None:
            return cls(None)
        buffer = tf2_ros.Buffer(node=node)
        transformer = cls(buffer)
        transformer._listener = tf2_ros.TransformListener(buffer, node)
        return transformer

    def lookup_mm(self, target: str, source: str, stamp_ns: int, timeout_s: float) -> np.ndarray:
        """Return the 4x4 T_target_source (mm) at ``stamp_ns``, waiting up to ``timeout_s``.

        It maps points in ``source`` into ``target``. Raises TfLookupError for any failure.
        """
        stamp = f'{stamp_ns // _NS_PER_S}.{stamp_ns % _NS_PER_S:09d}'
        what = f'tf lookup {source!r} -> {target!r} at stamp {stamp}'
        if self.buffer is None:
            raise TfLookupError(f'{what} impossible: {missing_tf2_ros_reason()}')
        try:
            msg = self.buffer.lookup_transform(target, source, Time(nanoseconds=stamp_ns),
                                               timeout=Duration(seconds=timeout_s))
        except self.errors as exc:
            raise TfLookupError(
                f'{what} failed within tf_timeout_s={timeout_s:g} s '
                f'({type(exc).__name__}: {exc}); expected a tf path from the cloud frame to '
                'robot_frame covering the cloud stamp (is the sensor transform published, '
                'and is use_sim_time consistent?)') from exc
        try:
            return transform_stamped_to_matrix(msg)
        except (ValueError, AttributeError) as exc:
            raise TfLookupError(f'{what} returned an unusable transform: {exc}') from exc
