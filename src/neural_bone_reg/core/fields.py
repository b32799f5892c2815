"""Distance backends of the registration: the neural UDF, or the UDF distilled to a grid.

Both map points (..., 3) in mm to unsigned distances (...,) in mm and are differentiable.
"""

from __future__ import annotations

import torch

from neural_bone_reg.core.udf import DistanceGrid


class GridField:
    """Trilinear lookup in a distilled distance grid, continued linearly outside it.

    Outside the grid the value is the clamped lookup plus the distance to the grid box, so
    points far from the bone still feel a gradient towards it. The lookup gathers the eight
    corners from the flat grid and differentiates only the interpolation weights, which is
    several times faster on the CPU than ``grid_sample``'s backward pass.
    """

    def __init__(self, grid: DistanceGrid, device: torch.device | str = 'cpu') -> None:
        values = torch.as_tensor(grid.values, dtype=torch.float32, device=device).contiguous()
        nx, ny, nz = values.shape
        self._flat = values.reshape(-1)
        self._strides = (ny * nz, nz, 1)
        self._lo = torch.as_tensor(grid.origin, dtype=torch.float32, device=device)
        self._counts = torch.tensor([nx, ny, nz], dtype=torch.float32, device=device)
        self._hi = self._lo + (self._counts - 1) * grid.voxel_mm
        self._voxel = float(grid.voxel_mm)

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        """Return distances (...,) in mm at points (..., 3) in mm."""
        clamped = torch.maximum(torch.minimum(points, self._hi), self._lo)
        outside = (points - clamped).norm(dim=-1)
        u = (clamped - self._lo) / self._voxel
        base = torch.minimum(u.detach().floor(), self._counts - 2)
        frac = u - base
        base = base.long()
        sx, sy, sz = self._strides
        idx = base[..., 0] * sx + base[..., 1] * sy + base[..., 2] * sz
        fx, fy, fz = frac.unbind(-1)
        v = self._flat

        def lerp_z(offset: torch.Tensor) -> torch.Tensor:
            low = v[offset]
            return low + (v[offset + sz] - low) * fz

        c00 = lerp_z(idx)
        c01 = lerp_z(idx + sy)
        c10 = lerp_z(idx + sx)
        c11 = lerp_z(idx + sx + sy)
        c0 = c00 + (c01 - c00) * fy
        c1 = c10 + (c11 - c10) * fy
        return c0 + (c1 - c0) * fx + outside
