"""The simulated RGB-D camera: geometry, optical-frame convention, noise and dropouts."""

import time

import numpy as np
import pytest
import trimesh

from neural_bone_reg.core import camera as cam
from neural_bone_reg.core import sim
from neural_bone_reg.core.se3 import invert_transform

#: A small camera for fast tests: 160 x 120, same field of view as the default.
SMALL = cam.PinholeCamera.d435_color(160, 120)
NOISELESS = cam.DepthNoise.noiseless()


def facing_plane(depth_mm: float, half_mm: float = 2000.0) -> trimesh.Trimesh:
    """Return a square at z = depth_mm in the camera frame, its normal towards the camera."""
    h = half_mm
    vertices = [[-h, -h, depth_mm], [h, -h, depth_mm], [h, h, depth_mm], [-h, h, depth_mm]]
    # Wound so that the normal points to -z (towards a camera at the origin looking along +z).
    return trimesh.Trimesh(vertices, [[0, 2, 1], [0, 3, 2]], process=False)


def test_plane_depth_and_optical_frame_convention():
    frame = cam.DepthCamera(SMALL, NOISELESS).capture(facing_plane(400.0), np.eye(4),
                                                      np.random.default_rng(0))
    assert frame.points_mm.shape == (120, 160, 3) and frame.rgb.shape == (120, 160, 3)
    assert frame.points_mm.dtype == np.float32 and frame.rgb.dtype == np.uint8
    assert frame.valid.all()
    np.testing.assert_allclose(frame.points_mm[..., 2], 400.0, atol=1e-3)  # z is depth
    # x grows to the right (columns), y grows downwards (rows): REP 103 optical frame.
    u, v = 150, 10
    expected = [(u - SMALL.cx) / SMALL.fx * 400.0, (v - SMALL.cy) / SMALL.fy * 400.0, 400.0]
    np.testing.assert_allclose(frame.points_mm[v, u], expected, atol=1e-3)
    assert frame.points_mm[v, u, 0] > 0.0 and frame.points_mm[v, u, 1] < 0.0
    assert frame.points_mm[110, 5, 0] < 0.0 and frame.points_mm[110, 5, 1] > 0.0


def test_sphere_silhouette_nan_outside_and_nearest_surface():
    radius, distance = 50.0, 400.0
    sphere = trimesh.creation.icosphere(subdivisions=5, radius=radius)
    sphere.apply_translation([0.0, 0.0, distance])
    frame = cam.DepthCamera(SMALL, NOISELESS).capture(sphere, np.eye(4), np.random.default_rng(0))
    centre = frame.points_mm[int(SMALL.cy), int(SMALL.cx)]
    assert abs(centre[2] - (distance - radius)) < 0.2  # the near side, not the far one
    assert np.isnan(frame.points_mm[0, 0]).all() and not frame.valid[0, 0]
    assert (frame.rgb[~frame.valid] == 0).all()
    hits = frame.points_mm[frame.valid].astype(np.float64)
    np.testing.assert_allclose(np.linalg.norm(hits - [0.0, 0.0, distance], axis=1), radius,
                               atol=0.2)
    # Silhouette: a disc of angular radius asin(r / d).
    angle = np.arcsin(radius / distance)
    expected_px = np.pi * (SMALL.fx * np.tan(angle)) ** 2
    assert abs(frame.valid.sum() - expected_px) < 0.05 * expected_px


def test_render_matches_trimesh_ray_casting():
    pytest.importorskip('rtree')  # trimesh's embree-less intersector needs it
    mesh = sim.make_phantom_mesh()
    rng = np.random.default_rng(2)
    t_camera_mesh = invert_transform(cam.side_view(mesh, rng, 350.0))
    small = SMALL.scaled(0.5)
    ours = cam.render(mesh, small, t_camera_mesh).depth_mm

    moved = mesh.copy()
    moved.apply_transform(t_camera_mesh)
    rays = small.ray_directions().reshape(-1, 3)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    locations, ray_index, _ = trimesh.ray.ray_triangle.RayMeshIntersector(
        moved).intersects_location(np.zeros_like(rays), rays, multiple_hits=False)
    theirs = np.full(len(rays), np.nan)
    theirs[ray_index] = locations[:, 2]
    theirs = theirs.reshape(ours.shape)

    assert np.isfinite(theirs).sum() > 100
    assert (np.isfinite(ours) == np.isfinite(theirs)).all()
    both = np.isfinite(ours)
    np.testing.assert_allclose(ours[both], theirs[both], atol=1e-6)


def test_axial_noise_has_the_configured_sigma_at_depth():
    noise = cam.DepthNoise(lateral_px=0.0, depth_unit_mm=0.0, edge_dropout=0.0,
                           random_dropout=0.0)
    for depth in (300.0, 600.0):
        frame = cam.DepthCamera(SMALL, noise).capture(facing_plane(depth), np.eye(4),
                                                      np.random.default_rng(1))
        z = frame.points_mm[..., 2][frame.valid].astype(np.float64)
        expected = noise.subpixel * depth ** 2 / (noise.depth_fx * noise.baseline_mm)
        assert noise.axial_sigma_mm(depth) == pytest.approx(expected)
        assert z.mean() == pytest.approx(depth, abs=0.05)
        assert z.std() == pytest.approx(expected, rel=0.03)
    # Grows with the depth squared: 4x the sigma at twice the depth.
    assert noise.axial_sigma_mm(600.0) == pytest.approx(4.0 * noise.axial_sigma_mm(300.0))


def test_lateral_noise_and_depth_quantisation():
    noise = cam.DepthNoise(subpixel=0.0, lateral_px=0.5, depth_unit_mm=1.0, edge_dropout=0.0,
                           random_dropout=0.0)
    depth = 400.3
    frame = cam.DepthCamera(SMALL, noise).capture(facing_plane(depth), np.eye(4),
                                                  np.random.default_rng(2))
    z = frame.points_mm[..., 2]
    np.testing.assert_allclose(z, 400.0, atol=1e-3)  # quantised to the 1 mm depth unit
    ideal = SMALL.ray_directions()[..., 0] * 400.0
    scatter = (frame.points_mm[..., 0] - ideal).ravel()
    assert scatter.std() == pytest.approx(0.5 * 400.0 / SMALL.fx, rel=0.05)


def test_dropouts_range_and_grazing_incidence():
    rng = np.random.default_rng(3)
    # Random dropouts: the configured share of pixels returns nothing.
    noise = cam.DepthNoise(edge_dropout=0.0, random_dropout=0.2)
    frame = cam.DepthCamera(SMALL, noise).capture(facing_plane(400.0), np.eye(4), rng)
    assert (~frame.valid).mean() == pytest.approx(0.2, abs=0.02)
    assert np.isnan(frame.points_mm[~frame.valid]).all()
    # Out of range: nothing.
    near = cam.DepthCamera(SMALL, cam.DepthNoise()).capture(facing_plane(50.0), np.eye(4), rng)
    assert not near.valid.any() and np.isnan(near.points_mm).all()
    # A surface seen more obliquely than max_incidence_deg returns nothing: a plane tilted by
    # 75 deg is seen at 48-83 deg across the part of the 55 deg wide image it fills.
    plane = facing_plane(0.0, half_mm=400.0)  # stays in front of the camera
    tilt = np.eye(4)
    tilt[:3, :3] = trimesh.transformations.rotation_matrix(np.radians(75.0), [0, 1, 0])[:3, :3]
    tilt[:3, 3] = [0.0, 0.0, 400.0]
    exact = cam.render(plane, SMALL, tilt)
    incidence = np.degrees(np.arccos(exact.cos_incidence))
    assert np.nanmin(incidence) < 70.0 and np.nanmax(incidence) > 81.0
    only_angle = cam.DepthNoise(max_incidence_deg=80.0, edge_dropout=0.0, random_dropout=0.0,
                                max_range_mm=1e6)
    grazing = cam.DepthCamera(SMALL, only_angle).capture(plane, tilt, rng)
    seen = np.isfinite(exact.depth_mm)
    np.testing.assert_array_equal(grazing.valid, seen & (incidence <= 80.0))


def test_edge_dropout_thins_the_silhouette():
    sphere = trimesh.creation.icosphere(subdivisions=4, radius=50.0)
    sphere.apply_translation([0.0, 0.0, 400.0])
    rng = np.random.default_rng(4)
    exact = cam.DepthCamera(SMALL, NOISELESS).capture(sphere, np.eye(4), rng)
    edge = cam._edge_pixels(np.where(exact.valid, exact.points_mm[..., 2], np.nan))
    thinned = cam.DepthCamera(SMALL, cam.DepthNoise(edge_dropout=0.5, random_dropout=0.0,
                                                    max_incidence_deg=90.0)).capture(
        sphere, np.eye(4), rng)
    kept_on_edge = thinned.valid[edge].mean()
    assert 0.35 < kept_on_edge < 0.65
    assert thinned.valid[exact.valid & ~edge].all()  # the interior is untouched


def test_exposure_keeps_only_the_exposed_bone():
    mesh = sim.make_phantom_mesh()
    rng = np.random.default_rng(5)
    t_mesh_camera = cam.side_view(mesh, rng, 400.0, target_mm=(-15.0, 3.0, 185.0))
    exposure = cam.Exposure((-15.0, 3.0, 185.0), 40.0)
    frame = cam.DepthCamera(SMALL, NOISELESS).capture(mesh, invert_transform(t_mesh_camera),
                                                      rng, exposure)
    in_mesh = frame.points_mm[frame.valid].astype(np.float64) @ t_mesh_camera[:3, :3].T + (
        t_mesh_camera[:3, 3])
    assert len(in_mesh) > 100
    assert np.linalg.norm(in_mesh - exposure.centre_mm, axis=1).max() <= 40.0 + 1e-6
    # Everything returned lies on the mesh and faces the camera.
    distance = np.abs(trimesh.proximity.signed_distance(mesh, in_mesh[::10]))
    assert distance.max() < 1e-3


def test_look_at_and_side_view_poses():
    pose = cam.look_at([0.0, 0.0, 0.0], [1000.0, 0.0, 0.0], up=[0.0, 0.0, 1.0])
    np.testing.assert_allclose(pose[:3, 2], [1.0, 0.0, 0.0])   # z looks at the target
    np.testing.assert_allclose(pose[:3, 1], [0.0, 0.0, -1.0])  # y is down (against up)
    np.testing.assert_allclose(pose[:3, 0], [0.0, -1.0, 0.0])  # x is right
    assert np.linalg.det(pose[:3, :3]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match='parallel'):
        cam.look_at([0, 0, 0], [0, 0, 1], up=[0, 0, 1])

    mesh = sim.make_phantom_mesh()
    centre, axes = cam.principal_axes(mesh)
    for seed in range(5):
        view = cam.side_view(mesh, np.random.default_rng(seed), 450.0, max_elevation_deg=30.0)
        assert np.linalg.norm(view[:3, 3] - centre) == pytest.approx(450.0)
        elevation = np.degrees(np.arcsin(abs(view[:3, 2] @ axes[0])))
        assert elevation <= 30.0 + 1e-6
        assert abs(view[:3, 0] @ axes[0]) == pytest.approx(np.cos(np.radians(elevation)))


def test_stream_is_seeded_and_moves_as_configured():
    mesh = sim.make_phantom_mesh()
    scene = cam.RgbdScene(width=80, height=60, motion_mm=2.0, motion_deg=0.5)
    first = cam.simulate_rgbd_stream(mesh, np.random.default_rng(6), scene, 8, rate_hz=15.0)
    again = cam.simulate_rgbd_stream(mesh, np.random.default_rng(6), scene, 8, rate_hz=15.0)
    first_frames, again_frames = list(first.frames), list(again.frames)
    assert len(first_frames) == 8 and list(first.frames) == []  # rendered once, on demand
    np.testing.assert_array_equal(first_frames[3].points_mm, again_frames[3].points_mm)
    assert first_frames[0].points_mm.shape == (60, 80, 3)
    centre, _ = cam.principal_axes(mesh)
    shifts = [np.linalg.norm(p[:3, :3] @ centre + p[:3, 3] - (first.T_robot_bone[0][:3, :3]
                                                              @ centre
                                                              + first.T_robot_bone[0][:3, 3]))
              for p in first.T_robot_bone]
    assert shifts[0] == 0.0 and 0.0 < max(shifts) <= 2.0 + 1e-9
    still = cam.simulate_rgbd_stream(mesh, np.random.default_rng(6), cam.RgbdScene(
        width=80, height=60), 3, rate_hz=15.0)
    assert all(np.array_equal(p, still.T_robot_bone[0]) for p in still.T_robot_bone)


def test_full_resolution_frame_is_fast():
    mesh = sim.make_phantom_mesh()
    rng = np.random.default_rng(7)
    camera = cam.DepthCamera()
    assert (camera.camera.width, camera.camera.height) == (640, 480)
    t_camera_mesh = invert_transform(cam.side_view(mesh, rng, 400.0))
    camera.capture(mesh, t_camera_mesh, rng)  # warm-up (trimesh caches mesh properties)
    started = time.process_time()  # CPU time: robust to other load on the machine
    frame = camera.capture(mesh, t_camera_mesh, rng)
    assert time.process_time() - started < 1.5
    assert frame.valid.sum() > 5000


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match='focal lengths must be positive'):
        cam.PinholeCamera(fx=0.0)
    with pytest.raises(ValueError, match='focal lengths must be positive, finite'):
        cam.PinholeCamera(fy=float('inf'))  # every ray would be x = 0
    for name in ('baseline_mm', 'depth_fx', 'lateral_px'):
        with pytest.raises(ValueError, match=f'{name} must be finite'):
            cam.DepthNoise(**{name: float('inf')})  # baseline inf: a noiseless depth
    with pytest.raises(ValueError, match='max_range_mm .* finite'):
        cam.DepthNoise(max_range_mm=float('inf'))
    with pytest.raises(ValueError, match='at least 1 x 1'):
        cam.PinholeCamera(width=0)
    with pytest.raises(ValueError, match='max_range_mm'):
        cam.DepthNoise(min_range_mm=500.0, max_range_mm=400.0)
    with pytest.raises(ValueError, match='edge_dropout'):
        cam.DepthNoise(edge_dropout=1.0)
    with pytest.raises(ValueError, match='exposure radius'):
        cam.Exposure((0.0, 0.0, 0.0), 0.0)
    with pytest.raises(ValueError, match='4x4'):
        cam.render(facing_plane(400.0), SMALL, np.eye(3))
    with pytest.raises(ValueError, match='exposure_offset'):
        cam.RgbdScene(exposure_offset=2.0)
