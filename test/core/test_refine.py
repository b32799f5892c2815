"""Surface model and ICP: mean curvature, and the de-biasing of fits to noisy points."""

import numpy as np
import pytest
import trimesh

from neural_bone_reg.core.refine import linearise, refine_icp, SurfaceModel


def _surface(mesh, count=30000, seed=0):
    points, faces = trimesh.sample.sample_surface_even(mesh, count, seed=seed)
    return SurfaceModel.build(points, mesh.face_normals[faces])


def test_mean_curvature_is_one_over_r_on_a_sphere_and_half_that_on_a_cylinder():
    sphere = _surface(trimesh.creation.icosphere(subdivisions=6, radius=20.0))
    assert np.median(sphere.mean_curvature) == pytest.approx(1 / 20.0, rel=0.05)
    cylinder = _surface(trimesh.creation.cylinder(radius=15.0, height=200.0, sections=256))
    side = np.abs(cylinder.points[:, 2]) < 80.0  # away from the caps' edges
    assert np.median(cylinder.mean_curvature[side]) == pytest.approx(1 / 30.0, rel=0.05)
    # Concave is negative: the sphere seen from inside (normals flipped).
    inside = SurfaceModel.build(sphere.points, -sphere.normals)
    assert np.median(inside.mean_curvature) == pytest.approx(-1 / 20.0, rel=0.05)


@pytest.mark.parametrize('noise_mm', [2.0, 3.0])
def test_debiasing_removes_the_curvature_bias_of_a_fit_to_noisy_points(noise_mm):
    """The top half of an ellipsoid (30 x 22 x 16 mm) seen with isotropic noise: the points seem
    sigma^2 times the mean curvature outside the surface, so ICP from the truth pulls the
    surface up towards them; the de-biased ICP does not."""
    mesh = trimesh.creation.icosphere(subdivisions=6)
    mesh.apply_scale((30.0, 22.0, 16.0))
    surface = _surface(mesh)
    rng = np.random.default_rng(3)
    cap = surface.points[surface.points[:, 2] > 0.0]
    cloud = cap[rng.choice(len(cap), 20000)] + rng.normal(scale=noise_mm, size=(20000, 3))
    _, idx = surface.tree.query(cloud)
    expected = noise_mm ** 2 * float(np.mean(surface.mean_curvature[idx]))
    assert 0.15 < expected < 0.5  # mm: the effect is there to be removed
    raw = linearise(surface, cloud, 3.0)
    corrected = linearise(surface, cloud, 3.0, noise_mm ** 2)
    assert np.mean(raw.residual) == pytest.approx(expected, rel=0.2)
    assert abs(np.mean(corrected.residual)) < 0.1 * expected
    # How far each fit moves the cloud's centroid up (the cap's axis): the bias, or about 0.
    centroid = cloud.mean(axis=0)
    lift = []
    for noise_var in (0.0, noise_mm ** 2):
        icp = refine_icp(surface, cloud, np.eye(3), np.zeros(3), 3.0, 60, 1e-3, noise_var)
        lift.append((centroid @ icp.rotation.T + icp.translation - centroid)[2])
    assert lift[0] == pytest.approx(-expected, rel=0.35)
    assert abs(lift[1]) < 0.25 * expected
