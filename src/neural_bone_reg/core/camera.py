"""A simulated RGB-D camera: organized, noisy, coloured clouds of a bone mesh.

Coordinates follow the camera *optical* frame of REP 103: z forward along the optical axis,
x right and y down in the image. Pixel ``(u, v)`` = (column, row) has its centre at integer
coordinates (as in OpenCV and ``sensor_msgs/CameraInfo``), and the ray through it has the
direction ``((u - cx) / fx, (v - cy) / fy, 1)``. Lengths are in mm, like the rest of the core.

Rendering casts one ray per pixel at the mesh and keeps the nearest hit. It is done with a
vectorised scan of each triangle's pixel footprint (a pixel's ray hits a triangle exactly when
its centre lies inside the triangle's projection, and the hit depth is the ray's intersection
with the triangle's plane), which gives the same hits as ``trimesh.ray`` (a test compares
them) at a few hundredths of its cost: about 0.1 s for a 640 x 480 frame of a bone, where
trimesh's embree-less intersector needs seconds.

The noise model is that of an active stereo sensor such as the RealSense D400 series: the depth
error grows with the square of the depth (``sigma_z = subpixel * z^2 / (f * baseline)``, a
disparity error of ``subpixel`` pixels), points also scatter a little sideways, the depth is
quantised to the sensor's depth unit, and pixels at grazing incidence, next to a silhouette edge
or at random return nothing (NaN).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence

import numpy as np
import trimesh

from neural_bone_reg.core.se3 import invert_transform, make_transform

#: Triangle-pixel pairs examined at once while rendering (bounds the working memory).
RENDER_CHUNK_PAIRS = 2_000_000
#: Slack of the point-in-triangle test in edge-function units (pixels squared), so that a pixel
#: centre on an edge shared by two triangles is not lost to round-off.
INSIDE_EPS = 1e-9
#: A plane whose normal is this close to perpendicular to a ray is treated as missed by it.
MIN_RAY_PLANE_COS = 1e-12
#: Depth difference to a neighbouring pixel that counts as a depth discontinuity (mm).
EDGE_JUMP_MM = 10.0
#: Share of a bone's length at each end compared to find its bulkier end.
END_SHARE = 0.25
#: Albedo of bone under white light (RGB, 0-255): ivory.
BONE_RGB = (236.0, 224.0, 196.0)
#: Share of the light that does not depend on the incidence angle (the rest is Lambertian).
AMBIENT_SHARE = 0.35
#: Sigma of the per-pixel colour noise (0-255 levels).
COLOR_NOISE_LEVELS = 3.0
#: Focal length of a RealSense D435 colour camera in pixels, at this image height.
D435_COLOR_FOCAL_PX = 615.0
D435_COLOR_FOCAL_HEIGHT = 480


@dataclass(frozen=True)
class PinholeCamera:
    """Pinhole intrinsics of an undistorted (rectified) camera.

    The default is a RealSense D435's colour camera at 640 x 480 (55 x 42.5 deg field of view),
    which its depth is aligned to in ``camera_color_optical_frame``. Attributes:
        width, height: image size in pixels.
        fx, fy: focal lengths in pixels.
        cx, cy: principal point in pixels (pixel centres are at integers).
    """

    width: int = 640
    height: int = 480
    fx: float = 615.0
    fy: float = 615.0
    cx: float = 319.5
    cy: float = 239.5

    @classmethod
    def d435_color(cls, width: int = 640, height: int = 480) -> PinholeCamera:
        """Return a RealSense D435 colour camera at ``width`` x ``height`` (42.5 deg tall view).

        Its modes share the vertical field of view, so f = 615 px x height / 480 (640 x 480:
        fx = fy = 615; 424 x 240: 307.5), with the principal point at the image centre.
        """
        focal = D435_COLOR_FOCAL_PX * height / D435_COLOR_FOCAL_HEIGHT
        return cls(width, height, focal, focal, (width - 1) / 2.0, (height - 1) / 2.0)

    def __post_init__(self) -> None:
        if self.width < 1 or self.height < 1:
            raise ValueError(f'camera size must be at least 1 x 1 pixels, got {self.width} x '
                             f'{self.height}')
        if not (0.0 < self.fx < np.inf and 0.0 < self.fy < np.inf):
            raise ValueError(f'focal lengths must be positive, finite pixels, got fx={self.fx}, '
                             f'fy={self.fy}')
        if not (np.isfinite(self.cx) and np.isfinite(self.cy)):
            raise ValueError(f'principal point must be finite, got ({self.cx}, {self.cy})')

    def scaled(self, factor: float) -> PinholeCamera:
        """Return the same camera at ``factor`` times the resolution (same field of view)."""
        if not factor > 0.0:
            raise ValueError(f'scale factor must be positive, got {factor}')
        width = max(int(round(self.width * factor)), 1)
        height = max(int(round(self.height * factor)), 1)
        sx, sy = width / self.width, height / self.height
        return PinholeCamera(width, height, self.fx * sx, self.fy * sy,
                             (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5)

    def ray_directions(self) -> np.ndarray:
        """Return (height, width, 3) ray directions with z = 1, in the optical frame."""
        u, v = np.meshgrid(np.arange(self.width, dtype=np.float64),
                           np.arange(self.height, dtype=np.float64))
        return np.stack([(u - self.cx) / self.fx, (v - self.cy) / self.fy, np.ones_like(u)],
                        axis=-1)

    def project(self, points: np.ndarray) -> np.ndarray:
        """Return the (N, 2) pixel coordinates (u, v) of (N, 3) optical-frame points, z > 0."""
        points = np.asarray(points, dtype=np.float64)
        return np.stack([self.fx * points[:, 0] / points[:, 2] + self.cx,
                         self.fy * points[:, 1] / points[:, 2] + self.cy], axis=-1)


@dataclass(frozen=True)
class DepthNoise:
    """Noise and dropouts of an active-stereo depth sensor (defaults: a RealSense D435).

    Attributes:
        subpixel: RMS disparity error in pixels (Intel quotes 0.08 for a textured scene).
        baseline_mm: stereo baseline (D435: 50 mm; D405: 18 mm).
        depth_fx: focal length of the depth imagers in pixels (D435 at 640 x 480: 385).
            The axial sigma is ``subpixel * z^2 / (depth_fx * baseline_mm)``: 0.66 mm at
            0.4 m and 1.5 mm at 0.6 m for the defaults.
        lateral_px: sigma of the sideways scatter of a point, in pixels at its depth.
        depth_unit_mm: depth quantisation step (the D400 default depth unit is 1 mm); 0 = off.
        min_range_mm, max_range_mm: depths outside this range return nothing.
        max_incidence_deg: surfaces seen more obliquely than this return nothing.
        edge_dropout: probability that a pixel next to a miss or a depth jump returns nothing.
        random_dropout: probability that any pixel returns nothing.
    """

    subpixel: float = 0.08
    baseline_mm: float = 50.0
    depth_fx: float = 385.0
    lateral_px: float = 0.2
    depth_unit_mm: float = 1.0
    min_range_mm: float = 100.0
    max_range_mm: float = 3000.0
    max_incidence_deg: float = 80.0
    edge_dropout: float = 0.5
    random_dropout: float = 0.005

    def __post_init__(self) -> None:
        for name in ('subpixel', 'lateral_px', 'depth_unit_mm', 'min_range_mm'):
            if not 0.0 <= getattr(self, name) < np.inf:
                raise ValueError(f'{name} must be finite and non-negative, got '
                                 f'{getattr(self, name)}')
        for name in ('baseline_mm', 'depth_fx'):
            if not 0.0 < getattr(self, name) < np.inf:
                raise ValueError(f'{name} must be finite and positive, got {getattr(self, name)}')
        if not self.min_range_mm < self.max_range_mm < np.inf:
            raise ValueError(f'max_range_mm ({self.max_range_mm}) must be finite and exceed '
                             f'min_range_mm ({self.min_range_mm})')
        if not 0.0 < self.max_incidence_deg <= 90.0:
            raise ValueError(f'max_incidence_deg must be in (0, 90], got '
                             f'{self.max_incidence_deg}')
        for name in ('edge_dropout', 'random_dropout'):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f'{name} must be in [0, 1), got {getattr(self, name)}')

    def axial_sigma_mm(self, depth_mm: np.ndarray | float) -> np.ndarray:
        """Return the sigma of the depth error at ``depth_mm`` (grows with the depth squared)."""
        depth = np.asarray(depth_mm, dtype=np.float64)
        return self.subpixel * depth ** 2 / (self.depth_fx * self.baseline_mm)

    @classmethod
    def noiseless(cls) -> DepthNoise:
        """Return a model that only keeps the range limits: exact depths, no dropouts."""
        return cls(subpixel=0.0, lateral_px=0.0, depth_unit_mm=0.0, max_incidence_deg=90.0,
                   edge_dropout=0.0, random_dropout=0.0)


class Rendering(NamedTuple):
    """Exact ray hits of one frame: (height, width) arrays, NaN / -1 where a ray misses."""

    depth_mm: np.ndarray   # z of the hit in the optical frame, mm
    face: np.ndarray       # index of the hit triangle, int64
    cos_incidence: np.ndarray  # |cos| of the angle between the ray and the triangle's normal


class RgbdFrame(NamedTuple):
    """One organized RGB-D frame in the camera optical frame."""

    points_mm: np.ndarray  # (height, width, 3) float32, NaN where nothing returned
    rgb: np.ndarray        # (height, width, 3) uint8, black where nothing returned
    valid: np.ndarray      # (height, width) bool: the pixel returned a point


def _check_transform(transform: np.ndarray, name: str) -> np.ndarray:
    matrix = np.asarray(transform, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f'{name} must be a finite 4x4 rigid transform, got shape '
                         f'{matrix.shape}')
    return matrix


def _is_closed_outward(mesh: trimesh.Trimesh) -> bool:
    """Tell whether ``mesh`` is watertight with consistent, outward winding."""
    return bool(mesh.is_watertight and mesh.is_winding_consistent and mesh.volume > 0.0)


def render(mesh: trimesh.Trimesh, camera: PinholeCamera, T_camera_mesh: np.ndarray,
           *, min_depth_mm: float = 1.0) -> Rendering:
    """Cast one ray per pixel at ``mesh`` and return the nearest hits, without noise.

    ``T_camera_mesh`` maps mesh points (mm) into the camera optical frame. Triangles with a
    vertex closer than ``min_depth_mm`` to the camera plane (or behind it) are left out.
    """
    T = _check_transform(T_camera_mesh, 'T_camera_mesh')
    vertices = np.asarray(mesh.vertices, dtype=np.float64) @ T[:3, :3].T + T[:3, 3]
    faces = np.asarray(mesh.faces, dtype=np.int64)
    height, width = camera.height, camera.width
    depth = np.full(height * width, np.inf)
    face_of = np.full(height * width, -1, dtype=np.int64)

    all_tri = vertices[faces]                               # (F, 3, 3)
    all_normals = np.cross(all_tri[:, 1] - all_tri[:, 0], all_tri[:, 2] - all_tri[:, 0])
    keep = (all_tri[:, :, 2] > min_depth_mm).all(axis=1)
    keep &= np.linalg.norm(all_normals, axis=1) > 0.0     # degenerate triangles hit nothing
    if _is_closed_outward(mesh):
        # A ray from outside a closed surface hits a front face first: skip the back faces.
        keep &= np.einsum('ij,ij->i', all_tri[:, 0], all_normals) < 0.0
    index = np.flatnonzero(keep)
    if len(index):
        tri, normals = all_tri[index], all_normals[index]
        uv = camera.project(tri.reshape(-1, 3)).reshape(-1, 3, 2)
        u0 = np.clip(np.ceil(uv[:, :, 0].min(axis=1)), 0, width)
        u1 = np.clip(np.floor(uv[:, :, 0].max(axis=1)), -1, width - 1)
        v0 = np.clip(np.ceil(uv[:, :, 1].min(axis=1)), 0, height)
        v1 = np.clip(np.floor(uv[:, :, 1].max(axis=1)), -1, height - 1)
        box_w = np.maximum(u1 - u0 + 1, 0).astype(np.int64)
        box_h = np.maximum(v1 - v0 + 1, 0).astype(np.int64)
        pairs = box_w * box_h
        ends = np.cumsum(pairs)
        start = 0
        while start < len(index):
            done = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, done + RENDER_CHUNK_PAIRS, side='right')),
                       start + 1)
            _scan(camera, slice(start, stop), index, tri, normals, uv, u0, v0, box_w, pairs,
                  depth, face_of)
            start = stop
    depth = depth.reshape(height, width)
    face_of = face_of.reshape(height, width)
    hit = face_of >= 0
    depth[~hit] = np.nan
    cos = np.full((height, width), np.nan)
    if hit.any():
        rays = camera.ray_directions()[hit]
        face_normals = all_normals[face_of[hit]]
        cos[hit] = np.abs(np.einsum('ij,ij->i', rays, face_normals)) / (
            np.linalg.norm(rays, axis=1) * np.linalg.norm(face_normals, axis=1))
    return Rendering(depth, face_of, cos)


def _scan(camera: PinholeCamera, part: slice, index: np.ndarray, tri: np.ndarray,
          normals: np.ndarray, uv: np.ndarray, u0: np.ndarray, v0: np.ndarray,
          box_w: np.ndarray, pairs: np.ndarray, depth: np.ndarray, face_of: np.ndarray) -> None:
    """Test the pixels of the bounding boxes of triangles ``part``; keep the nearest hits."""
    counts = pairs[part]
    total = int(counts.sum())
    if total == 0:
        return
    local = np.repeat(np.arange(part.start, part.stop), counts)
    offset = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
    cols = u0[local] + offset % box_w[local]
    rows = v0[local] + offset // box_w[local]
    # Point in triangle: the three edge functions have the sign of the triangle's area.
    a, b, c = uv[local, 0], uv[local, 1], uv[local, 2]
    p = np.stack([cols, rows], axis=-1)

    def edge(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
        return ((p1[:, 0] - p0[:, 0]) * (p[:, 1] - p0[:, 1])
                - (p1[:, 1] - p0[:, 1]) * (p[:, 0] - p0[:, 0]))

    sign = np.sign((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1])
                   - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))
    inside = ((edge(a, b) * sign >= -INSIDE_EPS) & (edge(b, c) * sign >= -INSIDE_EPS)
              & (edge(c, a) * sign >= -INSIDE_EPS) & (sign != 0.0))
    if not inside.any():
        return
    local, cols, rows = local[inside], cols[inside], rows[inside]
    rays = np.stack([(cols - camera.cx) / camera.fx, (rows - camera.cy) / camera.fy,
                     np.ones_like(cols)], axis=-1)
    n = normals[local]
    along = np.einsum('ij,ij->i', rays, n)
    ok = np.abs(along) > MIN_RAY_PLANE_COS * np.linalg.norm(n, axis=1)
    z = np.einsum('ij,ij->i', tri[local, 0], n)[ok] / along[ok]
    pixel = (rows[ok] * camera.width + cols[ok]).astype(np.int64)
    faces = index[local[ok]]
    order = np.lexsort((z, pixel))            # by pixel, nearest first
    pixel, z, faces = pixel[order], z[order], faces[order]
    first = np.ones(len(pixel), dtype=bool)
    first[1:] = pixel[1:] != pixel[:-1]
    pixel, z, faces = pixel[first], z[first], faces[first]
    nearer = z < depth[pixel]
    depth[pixel[nearer]] = z[nearer]
    face_of[pixel[nearer]] = faces[nearer]


def _edge_pixels(depth: np.ndarray) -> np.ndarray:
    """Return where a pixel returned and a 4-neighbour did not, or differs by EDGE_JUMP_MM."""
    valid = np.isfinite(depth)
    padded = np.pad(depth, 1, constant_values=np.nan)
    edge = np.zeros_like(valid)
    for dv, du in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        neighbour = padded[1 + dv:1 + dv + depth.shape[0], 1 + du:1 + du + depth.shape[1]]
        with np.errstate(invalid='ignore'):
            edge |= ~np.isfinite(neighbour) | (np.abs(neighbour - depth) > EDGE_JUMP_MM)
    return edge & valid


@dataclass(frozen=True)
class Exposure:
    """The part of the bone the camera can see: surface within ``radius_mm`` of ``centre_mm``.

    Stands for a surgical exposure: the rest of the bone is under soft tissue, which the
    simulated sensor treats as segmented away (it returns nothing there). Mesh frame, mm.
    """

    centre_mm: tuple[float, float, float]
    radius_mm: float

    def __post_init__(self) -> None:
        if not self.radius_mm > 0.0:
            raise ValueError(f'exposure radius must be positive mm, got {self.radius_mm}')
        if len(self.centre_mm) != 3 or not np.isfinite(self.centre_mm).all():
            raise ValueError(f'exposure centre must be 3 finite mm, got {self.centre_mm}')


class DepthCamera:
    """A simulated RGB-D camera: pinhole intrinsics plus a depth noise model.

    Use :meth:`capture` for an organized, noisy, coloured frame of a mesh seen from a pose.
    """

    def __init__(self, camera: Optional[PinholeCamera] = None,
                 noise: Optional[DepthNoise] = None) -> None:
        self.camera = camera if camera is not None else PinholeCamera()
        self.noise = noise if noise is not None else DepthNoise()

    def capture(self, mesh: trimesh.Trimesh, T_camera_mesh: np.ndarray,
                rng: np.random.Generator, exposure: Optional[Exposure] = None) -> RgbdFrame:
        """Return one organized frame of ``mesh`` seen from ``T_camera_mesh`` (mesh -> optical).

        Only the nearest, front-facing surface returns; with ``exposure`` only the part of it
        inside the exposure. Points are in the optical frame in mm, NaN where nothing returned.
        """
        T = _check_transform(T_camera_mesh, 'T_camera_mesh')
        noise = self.noise
        hits = render(mesh, self.camera, T)
        depth = hits.depth_mm.copy()
        with np.errstate(invalid='ignore'):
            valid = np.isfinite(depth) & (depth >= noise.min_range_mm) & (
                depth <= noise.max_range_mm)
            valid &= hits.cos_incidence >= np.cos(np.radians(noise.max_incidence_deg)) - 1e-12
        rays = self.camera.ray_directions()
        if exposure is not None:
            surface = rays * np.where(valid, depth, 0.0)[..., None]
            in_mesh = (surface - T[:3, 3]) @ T[:3, :3]       # optical -> mesh frame
            valid &= np.linalg.norm(in_mesh - np.asarray(exposure.centre_mm), axis=-1) <= (
                exposure.radius_mm)
        depth[~valid] = np.nan
        if noise.edge_dropout > 0.0:
            edge = _edge_pixels(depth)
            valid &= ~(edge & (rng.random(depth.shape) < noise.edge_dropout))
        if noise.random_dropout > 0.0:
            valid &= rng.random(depth.shape) >= noise.random_dropout
        depth[~valid] = np.nan
        # Axial error along the ray (depth), quantised like the sensor's depth image.
        sigma = noise.axial_sigma_mm(np.where(valid, depth, 0.0))
        noisy = depth + rng.normal(size=depth.shape) * sigma
        if noise.depth_unit_mm > 0.0:
            noisy = np.round(noisy / noise.depth_unit_mm) * noise.depth_unit_mm
        points = rays * noisy[..., None]
        if noise.lateral_px > 0.0:
            # A pixel's worth of sideways scatter at depth z is z / f.
            points[..., 0] += rng.normal(size=depth.shape) * noise.lateral_px * noisy / (
                self.camera.fx)
            points[..., 1] += rng.normal(size=depth.shape) * noise.lateral_px * noisy / (
                self.camera.fy)
        points[~valid] = np.nan
        shade = AMBIENT_SHARE + (1.0 - AMBIENT_SHARE) * np.nan_to_num(hits.cos_incidence)
        rgb = np.asarray(BONE_RGB) * shade[..., None] + rng.normal(
            scale=COLOR_NOISE_LEVELS, size=shade.shape + (3,))
        rgb = np.clip(np.round(rgb), 0, 255).astype(np.uint8)
        rgb[~valid] = 0
        return RgbdFrame(points.astype(np.float32), rgb, valid)


# ------------------------------------------------------------------------- poses


def look_at(eye: Sequence[float], target: Sequence[float],
            up: Sequence[float] = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Return T_ref_camera: an optical frame at ``eye`` whose z axis points at ``target``.

    The image's y axis (down) points away from ``up`` as far as it can, x = y cross z is right.
    Raises ValueError when ``up`` is parallel to the viewing direction.
    """
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    if not np.linalg.norm(z) > 0.0:
        raise ValueError('eye and target coincide; expected distinct points')
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9 * max(np.linalg.norm(up), 1.0):
        raise ValueError(f'up {up.tolist()} is parallel to the viewing direction; choose another')
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    return make_transform(np.stack([x, y, z], axis=1), eye)


def principal_axes(mesh: trimesh.Trimesh) -> tuple[np.ndarray, np.ndarray]:
    """Return the surface centroid (3,) and the principal axes (3, 3 rows, longest first).

    The long axis points to the bulkier end of the bone (more surface in the outer quarter of
    its length: the head and trochanters of a proximal femur), the others complete a
    right-handed frame, so the axes do not depend on the mesh's vertex order.
    """
    points = np.asarray(mesh.triangles_center)
    weights = np.asarray(mesh.area_faces)
    centre = (points * weights[:, None]).sum(axis=0) / weights.sum()
    centred = (points - centre) * np.sqrt(weights)[:, None]
    axes = np.linalg.svd(centred, full_matrices=False)[2]
    along = (points - centre) @ axes[0]
    quarter = END_SHARE * float(np.ptp(along))
    if weights[along > along.max() - quarter].sum() < weights[along < along.min() + quarter].sum():
        axes[0] = -axes[0]
    second = (points - centre) @ axes[1]
    if (weights * second ** 3).sum() < 0.0:  # skewness fixes the second axis's sign
        axes[1] = -axes[1]
    axes[2] = np.cross(axes[0], axes[1])
    return centre, axes


def side_view(mesh: trimesh.Trimesh, rng: np.random.Generator, distance_mm: float = 400.0,
              target_mm: Optional[Sequence[float]] = None,
              max_elevation_deg: float = 30.0) -> np.ndarray:
    """Return a seeded T_mesh_camera looking at the bone from the side, ``distance_mm`` away.

    The view direction is perpendicular to the bone's long axis up to ``max_elevation_deg``,
    at a random azimuth about it, aimed at ``target_mm`` (default: the surface centroid), with
    the long axis across the image's width (the wider side). This is how a camera over an
    operating table sees an exposed long bone; looking down the shaft is not.
    """
    if not distance_mm > 0.0:
        raise ValueError(f'distance_mm must be positive, got {distance_mm}')
    if not 0.0 <= max_elevation_deg < 90.0:
        raise ValueError(f'max_elevation_deg must be in [0, 90), got {max_elevation_deg}')
    centre, axes = principal_axes(mesh)
    target = centre if target_mm is None else np.asarray(target_mm, dtype=np.float64)
    long_axis, second, third = axes
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    elevation = np.radians(rng.uniform(-max_elevation_deg, max_elevation_deg))
    across = np.cos(azimuth) * second + np.sin(azimuth) * third
    view = np.cos(elevation) * across + np.sin(elevation) * long_axis   # camera -> target
    eye = target - distance_mm * view
    # The long axis maps to the image's x: make `up` the image's -y, perpendicular to it.
    up = np.cross(view, long_axis)
    return look_at(eye, target, up)


def breathing_motion(n_frames: int, rate_hz: float, amplitude_mm: float,
                     amplitude_deg: float, rng: np.random.Generator,
                     period_s: float = 4.0) -> list[np.ndarray]:
    """Return ``n_frames`` small rigid motions (4x4, about the origin) of a slow oscillation.

    A sinusoid of ``period_s`` along a random direction (``amplitude_mm``) and about a random
    axis (``amplitude_deg``), as respiration moves a patient's bone slightly; frame 0 is the
    identity. Apply them about the bone's centre: ``T(c) @ M @ T(-c)``.
    """
    from scipy.spatial.transform import Rotation

    if n_frames < 1 or not rate_hz > 0.0 or not period_s > 0.0:
        raise ValueError(f'need n_frames >= 1, rate_hz > 0 and period_s > 0, got {n_frames}, '
                         f'{rate_hz}, {period_s}')
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    motions = []
    for i in range(n_frames):
        phase = np.sin(2.0 * np.pi * (i / rate_hz) / period_s)
        rotation = Rotation.from_rotvec(axis * np.radians(amplitude_deg) * phase).as_matrix()
        motions.append(make_transform(rotation, direction * amplitude_mm * phase))
    return motions


# ------------------------------------------------------------------------- a camera stream


@dataclass(frozen=True)
class RgbdScene:
    """A camera on a fixed mount over a bone, as in an operating room. Lengths in mm.

    Attributes:
        width, height: image size of the D435-like colour camera the depth is aligned to.
        distance_mm: from the camera to the point it looks at (D400 sweet spot 0.3-0.6 m).
        max_elevation_deg: the view is perpendicular to the bone's long axis up to this.
        exposure_mm: radius of the exposed bone around the point the camera looks at; the rest
            is under soft tissue and segmented away. 0 = the whole bone is visible.
        exposure_offset: where along the long axis the camera looks, as a share of the bone's
            half length from its centre: 0 the middle of the bone, 1 its bulkier end (the
            joint end of a proximal femur), -1 the other end.
        motion_mm, motion_deg: amplitudes of a slow breathing-like motion of the bone.
        motion_period_s: its period.
        max_translation_mm: the bone's random pose in the robot frame is this far off at most.
        noise: the depth sensor's noise model.
    """

    width: int = 640
    height: int = 480
    distance_mm: float = 400.0
    max_elevation_deg: float = 30.0
    exposure_mm: float = 0.0
    exposure_offset: float = 0.0
    motion_mm: float = 0.0
    motion_deg: float = 0.0
    motion_period_s: float = 4.0
    max_translation_mm: float = 100.0
    noise: DepthNoise = field(default_factory=DepthNoise)

    def __post_init__(self) -> None:
        for name in ('distance_mm', 'motion_period_s'):
            if not getattr(self, name) > 0.0:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}')
        for name in ('exposure_mm', 'motion_mm', 'motion_deg', 'max_translation_mm'):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f'{name} must be non-negative, got {getattr(self, name)}')
        if not -1.0 <= self.exposure_offset <= 1.0:
            raise ValueError(f'exposure_offset must be in [-1, 1], got {self.exposure_offset}')
        PinholeCamera.d435_color(self.width, self.height)  # validates the size

    @property
    def moving(self) -> bool:
        """Tell whether the bone moves during the stream."""
        return self.motion_mm > 0.0 or self.motion_deg > 0.0


class RgbdStream(NamedTuple):
    """A simulated camera stream and its ground truth (all 4x4 in mm).

    ``frames`` renders each frame when it is asked for, once, in order (a long stream need
    not fit in memory); ``list(stream.frames)`` keeps them all.
    """

    frames: Iterator[RgbdFrame]
    camera: PinholeCamera
    T_robot_camera: np.ndarray        # optical frame -> robot (the fixed mount)
    T_robot_bone: list[np.ndarray]    # bone (mesh) -> robot, one per frame


def simulate_rgbd_stream(mesh: trimesh.Trimesh, rng: np.random.Generator, scene: RgbdScene,
                         n_frames: int, rate_hz: float) -> RgbdStream:
    """Return a stream of ``n_frames`` RGB-D frames of ``mesh`` at ``rate_hz`` and its truth.

    The bone's pose in the robot frame is random (rotation uniform on SO(3), translation up to
    ``scene.max_translation_mm``), the camera looks at it from the side (:func:`side_view`) and
    stays put; with motion the bone oscillates slightly about its centre. Seeded by ``rng``.
    """
    if n_frames < 1 or not rate_hz > 0.0:
        raise ValueError(f'need n_frames >= 1 and rate_hz > 0, got {n_frames}, {rate_hz}')
    from neural_bone_reg.core.sim import random_pose

    camera = PinholeCamera.d435_color(scene.width, scene.height)
    depth_camera = DepthCamera(camera, scene.noise)
    t_robot_bone0 = random_pose(rng, scene.max_translation_mm)
    centre, axes = principal_axes(mesh)
    half_length = 0.5 * float(np.ptp((np.asarray(mesh.vertices) - centre) @ axes[0]))
    target = centre + scene.exposure_offset * half_length * axes[0]
    t_bone_camera = side_view(mesh, rng, scene.distance_mm, target,
                              scene.max_elevation_deg)
    exposure = Exposure(tuple(target), scene.exposure_mm) if scene.exposure_mm > 0.0 else None
    t_robot_camera = t_robot_bone0 @ t_bone_camera
    t_camera_robot = invert_transform(t_robot_camera)
    if scene.moving:
        about = make_transform(np.eye(3), centre)
        motions = breathing_motion(n_frames, rate_hz, scene.motion_mm, scene.motion_deg, rng,
                                   scene.motion_period_s)
        poses = [t_robot_bone0 @ about @ m @ invert_transform(about) for m in motions]
    else:
        poses = [t_robot_bone0.copy() for _ in range(n_frames)]
    frames = (depth_camera.capture(mesh, t_camera_robot @ pose, rng, exposure)
              for pose in poses)
    return RgbdStream(frames, camera, t_robot_camera, poses)
