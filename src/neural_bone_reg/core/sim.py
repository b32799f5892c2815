"""Simulation for tests and the demo: a procedural phantom bone and intraoperative clouds.

The phantom is a proximal-femur-like solid (shaft, neck, head, greater and lesser trochanter)
built from hulls of spheres with manifold3d. It is deterministic and asymmetric, so it has a
single correct registration. Clouds mimic what a tracked probe sees: one side of the bone,
20-40 % of the surface, gaussian noise and a tail of outliers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import trimesh

from neural_bone_reg.core.io import write_atomically
from neural_bone_reg.core.runtime import default_cache_dir
from neural_bone_reg.core.se3 import make_transform, random_rotations

PHANTOM_FILENAME = 'phantom_proximal_femur_v1.stl'
#: (centre mm, radius mm) pairs; each inner list is hulled, then all parts are united.
_PHANTOM_PARTS = (
    (((0.0, 0.0, 0.0), 13.0), ((1.0, 2.0, 150.0), 16.0)),            # tapered shaft
    (((1.0, 2.0, 160.0), 15.0), ((-38.0, 9.0, 192.0), 13.0)),        # neck, anteverted
    (((-47.0, 11.0, 200.0), 23.0),),                                  # head
    (((12.0, -3.0, 168.0), 15.0), ((18.0, -7.0, 192.0), 11.0)),      # greater trochanter
    (((-13.0, -9.0, 128.0), 8.0), ((-4.0, -4.0, 124.0), 9.0)),       # lesser trochanter
    (((2.0, 3.0, 2.0), 16.0), ((9.0, -6.0, -4.0), 11.0)),            # asymmetric distal flare
)
#: Sphere tessellation of the phantom (segments around a circle).
_PHANTOM_SEGMENTS = 48
#: Cloud points farther than this behind the visible side are hidden from the probe (mm).
_VISIBILITY_SLACK_MM = 2.0


def make_phantom_mesh() -> trimesh.Trimesh:
    """Return the deterministic phantom proximal femur, in mm (about 80 x 60 x 230 mm)."""
    import manifold3d

    solid = None
    for part in _PHANTOM_PARTS:
        spheres = [manifold3d.Manifold.sphere(radius, _PHANTOM_SEGMENTS).translate(centre)
                   for centre, radius in part]
        piece = manifold3d.Manifold.batch_hull(spheres) if len(spheres) > 1 else spheres[0]
        solid = piece if solid is None else solid + piece
    out = solid.to_mesh()
    mesh = trimesh.Trimesh(np.asarray(out.vert_properties)[:, :3], np.asarray(out.tri_verts),
                           process=True)
    trimesh.repair.fix_normals(mesh)
    return mesh


def phantom_mesh_path(cache_dir: str | Path | None = None) -> Path:
    """Write the phantom STL once into ``cache_dir`` and return its path."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PHANTOM_FILENAME
    if not path.is_file():
        write_atomically(path, make_phantom_mesh().export)
    return path


def random_pose(rng: np.random.Generator, max_translation_mm: float = 100.0) -> np.ndarray:
    """Draw a rigid transform: rotation uniform on SO(3), |t| uniform in [0, max] mm."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    return make_transform(random_rotations(1, rng)[0],
                          direction * rng.uniform(0.0, max_translation_mm))


def _visible_patch(mesh: trimesh.Trimesh, rng: np.random.Generator, coverage: float,
                   n_dense: int) -> tuple[np.ndarray, np.ndarray]:
    """Return dense surface samples on the side a probe sees, and the view direction."""
    points, faces = trimesh.sample.sample_surface_even(mesh, n_dense, seed=rng.integers(1 << 31))
    if len(points) < n_dense // 2:  # sample_surface_even may return fewer; top up uniformly
        seed = rng.integers(1 << 31)
        extra, extra_faces = trimesh.sample.sample_surface(mesh, n_dense, seed=seed)
        points, faces = np.vstack([points, extra]), np.concatenate([faces, extra_faces])
    normals = mesh.face_normals[faces]
    view = rng.normal(size=3)
    view /= np.linalg.norm(view)
    # Front-facing points, ranked by how directly they face the probe, and near a random centre.
    facing = normals @ view
    centre = points[np.argmax(facing + 0.1 * rng.normal(size=len(points)))]
    score = facing - np.linalg.norm(points - centre, axis=1) / np.linalg.norm(mesh.extents)
    keep = np.argsort(-score)[: max(int(coverage * len(points)), 3)]
    return points[keep], view


def _check_view(coverage: float, outlier_fraction: float) -> None:
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f'coverage must be in (0, 1], got {coverage}')
    if not 0.0 <= outlier_fraction < 1.0:
        raise ValueError(f'outlier_fraction must be in [0, 1), got {outlier_fraction}')


def simulate_partial_cloud(mesh: trimesh.Trimesh, rng: np.random.Generator, coverage: float = 0.3,
                           noise_mm: float = 1.0, outlier_fraction: float = 0.05,
                           n_points: int = 2000, outlier_range_mm: float = 20.0) -> np.ndarray:
    """Return an (n_points, 3) partial view of ``mesh`` in the mesh frame.

    ``coverage`` of the surface on one side is sampled, gaussian noise of ``noise_mm`` is added,
    and ``outlier_fraction`` of the points are pushed up to ``outlier_range_mm`` off the surface.
    """
    _check_view(coverage, outlier_fraction)
    patch, _ = _visible_patch(mesh, rng, coverage, n_dense=max(4 * n_points, 20_000))
    choice = rng.choice(len(patch), size=n_points, replace=len(patch) < n_points)
    cloud = patch[choice]
    if noise_mm > 0:
        cloud = cloud + rng.normal(scale=noise_mm, size=(n_points, 3))
    n_out = int(round(outlier_fraction * n_points))
    if n_out:
        idx = rng.choice(n_points, size=n_out, replace=False)
        offsets = rng.normal(size=(n_out, 3))
        lengths = rng.uniform(5.0, outlier_range_mm, size=n_out)
        offsets *= (lengths / np.linalg.norm(offsets, axis=1))[:, None]
        cloud[idx] += offsets
    return cloud


def simulate_sweep(mesh: trimesh.Trimesh, rng: np.random.Generator, n_frames: int = 20,
                   points_per_frame: int = 300, noise_mm: float = 1.0,
                   outlier_fraction: float = 0.02, coverage: float = 0.3) -> list[np.ndarray]:
    """Return the clouds of one probe sweep over the visible side, in the mesh frame.

    The visible patch is cut into ``n_frames`` consecutive slabs along its longest axis, as a
    probe moved along the bone would see it; together the frames cover ``coverage`` of it.
    """
    if n_frames < 1 or points_per_frame < 1:
        raise ValueError('need n_frames >= 1 and points_per_frame >= 1, '
                         f'got {n_frames}, {points_per_frame}')
    _check_view(coverage, outlier_fraction)
    n_dense = max(4 * n_frames * points_per_frame, 20_000)
    patch, _ = _visible_patch(mesh, rng, coverage, n_dense=n_dense)
    centred = patch - patch.mean(axis=0)
    axis = np.linalg.svd(centred, full_matrices=False)[2][0]
    order = np.argsort(centred @ axis)
    frames = []
    for slab in np.array_split(order, n_frames):
        pick = patch[rng.choice(slab, size=points_per_frame, replace=len(slab) < points_per_frame)]
        pick = pick + rng.normal(scale=noise_mm, size=pick.shape) if noise_mm > 0 else pick
        n_out = int(round(outlier_fraction * points_per_frame))
        if n_out:
            idx = rng.choice(points_per_frame, size=n_out, replace=False)
            pick[idx] += rng.normal(scale=8.0, size=(n_out, 3))
        frames.append(pick)
    return frames
