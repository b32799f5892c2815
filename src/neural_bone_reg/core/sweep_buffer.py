"""Bounded accumulation of the clouds of one probe sweep (numpy only, no rclpy).

A tracked-ultrasound sweep arrives as many small slices in one fixed (robot) frame. The
registration stream (``core.stream``) collects them here: slices older than ``max_age_s``
(by their stamps, not by wall time, so a replayed bag behaves like a live one) are dropped,
each slice is voxel downsampled on arrival, and the total is capped at ``max_points`` by
dropping the oldest slices, so memory stays bounded however long the sweep lasts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


def voxel_downsample(points: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Keep the first point in each ``voxel_mm`` cube of an (N,3) array; 0 keeps all."""
    if voxel_mm <= 0.0 or len(points) == 0:
        return points
    keys = np.floor(points / voxel_mm).astype(np.int64)
    _, first = np.unique(keys, axis=0, return_index=True)
    return points[np.sort(first)]


@dataclass(frozen=True)
class SweepSnapshot:
    """The points of a sweep at one moment, and what they came from."""

    points: np.ndarray
    """(N,3) float32 points in ``frame_id``, voxel downsampled."""
    frame_id: str
    """Frame of every slice in the snapshot."""
    newest_stamp_ns: int
    """Stamp of the newest slice, in nanoseconds."""
    n_slices: int
    """Number of slices merged."""


@dataclass(frozen=True)
class SweepPieces:
    """The slices of a sweep at one moment, not merged yet (merging is the costly part)."""

    pieces: tuple[np.ndarray, ...]
    """(M,3) float32 points of each slice, oldest first."""
    frame_id: str
    """Frame of every slice."""
    newest_stamp_ns: int
    """Stamp of the newest slice, in nanoseconds."""
    voxel_mm: float
    """Voxel edge of the merge, mm."""

    def merge(self) -> SweepSnapshot:
        """Return the merged, downsampled points (call it without holding a lock)."""
        merged = np.concatenate(self.pieces, axis=0)
        return SweepSnapshot(points=voxel_downsample(merged, self.voxel_mm),
                             frame_id=self.frame_id, newest_stamp_ns=self.newest_stamp_ns,
                             n_slices=len(self.pieces))


class SweepBuffer:
    """Collect sweep slices of one frame, bounded in age and size."""

    def __init__(self, max_age_s: float, voxel_mm: float, max_points: int) -> None:
        """Create an empty buffer; see the module docstring for the three bounds."""
        if not (0.0 < max_age_s < float('inf') and 0.0 <= voxel_mm < float('inf')
                and max_points >= 1):  # written so that nan fails too
            raise ValueError('max_age_s must be finite and > 0, voxel_mm finite and >= 0 and '
                             f'max_points >= 1, got {max_age_s}, {voxel_mm}, {max_points}')
        self.max_age_s = max_age_s
        self.voxel_mm = voxel_mm
        self.max_points = max_points
        self._slices: deque[tuple[int, np.ndarray]] = deque()
        self._frame_id = ''
        self._n_points = 0

    @property
    def n_points(self) -> int:
        """Return the number of points held (before merging across slices)."""
        return self._n_points

    @property
    def frame_id(self) -> str:
        """Return the frame of the slices held ('' when empty)."""
        return self._frame_id

    def clear(self) -> None:
        """Drop every slice."""
        self._slices.clear()
        self._n_points = 0
        self._frame_id = ''

    def add(self, points: np.ndarray, frame_id: str, stamp_ns: int, *,
            presampled: bool = False) -> bool:
        """Add one slice; return True when it started a new sweep (frame change or time jump).

        ``presampled`` says the caller already voxel downsampled it (outside a lock).
        """
        restarted = False
        newest = self._slices[-1][0] if self._slices else None
        if self._slices and (frame_id != self._frame_id or stamp_ns < newest
                             or stamp_ns - newest > self.max_age_s * 1e9):
            self.clear()
            restarted = True
        self._frame_id = frame_id
        points = np.asarray(points, dtype=np.float32)
        if not presampled:
            points = voxel_downsample(points, self.voxel_mm)
        if len(points) > self.max_points:
            points = points[:self.max_points]
        self._slices.append((stamp_ns, points))
        self._n_points += len(points)
        oldest_kept = stamp_ns - int(self.max_age_s * 1e9)
        while self._slices and (self._slices[0][0] < oldest_kept
                                or self._n_points > self.max_points):
            self._n_points -= len(self._slices.popleft()[1])
        return restarted

    def pieces(self) -> SweepPieces | None:
        """Return the slices held, to merge later (cheap: no copy), or None when empty."""
        if not self._slices:
            return None
        return SweepPieces(pieces=tuple(pts for _, pts in self._slices),
                           frame_id=self._frame_id, newest_stamp_ns=self._slices[-1][0],
                           voxel_mm=self.voxel_mm)

    def snapshot(self) -> SweepSnapshot | None:
        """Return the merged, downsampled points of the sweep, or None when empty."""
        pieces = self.pieces()
        return None if pieces is None else pieces.merge()
