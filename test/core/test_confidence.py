"""Confidence statistics: degeneracy, uniqueness, cluster-robust covariance against Monte Carlo."""

import numpy as np
import pytest
import trimesh

from neural_bone_reg.core import confidence
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.refine import linearise, refine_icp, SurfaceModel


def _ellipsoid_surface(radii=(40.0, 25.0, 15.0), count=20000, seed=0):
    mesh = trimesh.creation.icosphere(subdivisions=5)
    mesh.apply_scale(radii)
    points, faces = trimesh.sample.sample_surface_even(mesh, count, seed=seed)
    return SurfaceModel.build(points, mesh.face_normals[faces]), mesh


def _patch(mesh, centre, radius, count, rng):
    points, faces = trimesh.sample.sample_surface(mesh, 60 * count, seed=int(rng.integers(1e9)))
    keep = np.linalg.norm(points - centre, axis=1) <= radius
    pick = rng.choice(np.flatnonzero(keep), count, replace=False)
    return points[pick], mesh.face_normals[faces[pick]]


def test_three_distinct_points_are_refused():
    base = np.array([[100.0, 100.0, 100.0], [150.0, 100.0, 100.0], [100.0, 160.0, 120.0]])
    with pytest.raises(InputError, match='distinct points'):
        confidence.check_geometry(np.repeat(base, 700, axis=0))


def test_collinear_points_are_refused():
    line = np.linspace(0.0, 1.0, 2000)[:, None] * np.array([[80.0, 20.0, 5.0]])
    with pytest.raises(InputError, match='line'):
        confidence.check_geometry(line + 1e-3 * np.random.default_rng(0).normal(size=line.shape))


def test_surface_patch_passes_the_geometry_check():
    _, mesh = _ellipsoid_surface()
    points, _ = _patch(mesh, np.array([40.0, 0.0, 0.0]), 20.0, 800, np.random.default_rng(1))
    confidence.check_geometry(points)  # does not raise


def test_uniqueness_z_separates_a_worse_fit_and_not_an_equal_one():
    rng = np.random.default_rng(0)
    points = rng.uniform(0.0, 100.0, size=(4000, 3))
    labels, count = confidence.cluster_labels(points, 10.0)
    best = np.abs(rng.normal(scale=1.0, size=4000))
    same = np.abs(rng.normal(scale=1.0, size=4000))
    worse = best + 0.5
    z_same, _, _ = confidence.uniqueness_z(best, same, labels, count)
    z_worse, margin, _ = confidence.uniqueness_z(best, worse, labels, count)
    assert abs(z_same) < 4.0
    assert z_worse > 20.0 and margin == pytest.approx(0.5)


def test_uniqueness_z_shrinks_when_errors_are_shared_within_clusters():
    rng = np.random.default_rng(1)
    points = rng.uniform(0.0, 100.0, size=(4000, 3))
    labels, count = confidence.cluster_labels(points, 25.0)  # 64 clusters of about 60 points
    best = np.zeros(4000)
    # The alternative is worse by 0.2 mm on average, but with an error shared per cluster.
    alternative = 0.2 + rng.normal(scale=1.0, size=count)[labels]
    z_clustered, _, _ = confidence.uniqueness_z(best, alternative, labels, count)
    z_naive, _, _ = confidence.uniqueness_z(best, alternative, np.arange(4000), 4000)
    assert z_clustered < z_naive / 3.0


def test_covariance_matches_monte_carlo_on_a_patch_with_known_noise():
    surface, mesh = _ellipsoid_surface()
    rng = np.random.default_rng(2)
    sigma = 1.0
    errors, predicted = [], []
    for _ in range(60):
        points, normals = _patch(mesh, np.array([30.0, 15.0, 6.0]), 30.0, 600, rng)
        noisy = points + normals * rng.normal(scale=sigma, size=(len(points), 1))
        icp = refine_icp(surface, noisy, np.eye(3), np.zeros(3), 3.0, 50, 1e-5)
        moved = noisy @ icp.rotation.T + icp.translation
        lin = linearise(surface, moved, 3.0)
        labels, count = confidence.cluster_labels(lin.points, 5.0)
        predicted.append(confidence.pose_covariance(lin.points, lin.normals, lin.residual,
                                                    lin.weight, labels, count))
        # The error of the estimate as a left motion in the bone frame: T_true = I.
        rotvec = _rotvec(icp.rotation.T)
        translation = -icp.rotation.T @ icp.translation
        errors.append(np.r_[translation, rotvec])
    errors = np.asarray(errors)
    mean_cov = np.mean(predicted, axis=0)
    empirical = np.cov(errors.T)
    # Same size along the weakest and the strongest direction, within Monte Carlo scatter.
    ratio = np.trace(np.linalg.solve(mean_cov, empirical)) / 6.0
    assert 0.5 < ratio < 2.0, ratio
    inside = [confidence.mahalanobis2(e, c) <= confidence.CHI2_95_6DOF
              for e, c in zip(errors, predicted)]
    assert np.mean(inside) >= 0.85


def test_systematic_term_matches_monte_carlo_of_a_smooth_surface_offset():
    # A cap of the ellipsoid whose points all sit on a smooth random offset field b(x) along
    # the normals (RMS 0.5 mm, gaussian correlation 15 mm), with no point noise: the
    # linearised least-squares pose error of each draw must spread as the systematic term says.
    surface, mesh = _ellipsoid_surface()
    rng = np.random.default_rng(5)
    points, normals = _patch(mesh, np.array([30.0, 15.0, 6.0]), 30.0, 400, rng)
    rms, length = 0.5, 15.0
    labels, count = confidence.cluster_labels(points, 5.0)
    weight = np.ones(len(points))
    _, unit = confidence.covariance_terms(points, normals, np.zeros(len(points)), weight,
                                          labels, count, length)
    gap2 = np.sum((points[:, None] - points[None]) ** 2, axis=-1)
    root = np.linalg.cholesky(rms ** 2 * np.exp(-0.5 * gap2 / length ** 2)
                              + 1e-9 * np.eye(len(points)))
    jac = np.hstack([normals, np.cross(points, normals)])  # (v, omega) about the origin
    draws = []
    for _ in range(3000):
        offset = root @ rng.normal(size=len(points))
        # A point pushed out by b along n is pulled back by the pose: J delta = -b.
        draws.append(-np.linalg.lstsq(jac, offset, rcond=None)[0])
    empirical = np.cov(np.asarray(draws).T)
    predicted = rms ** 2 * unit
    ratio = np.trace(np.linalg.solve(predicted, empirical)) / 6.0
    assert 0.7 < ratio < 1.4, ratio
    # A patch with no correlated offset gets no systematic term, and it adds to the sandwich.
    flat = confidence.pose_covariance(points, normals, np.full(len(points), 0.3), weight,
                                      labels, count)
    both = confidence.pose_covariance(points, normals, np.full(len(points), 0.3), weight,
                                      labels, count, systematic_mm=rms, correlation_mm=length)
    np.testing.assert_allclose(both - flat, predicted, rtol=1e-6, atol=1e-12)


def test_noise_level_is_the_spread_within_clusters():
    rng = np.random.default_rng(6)
    points = rng.uniform(0.0, 100.0, size=(6000, 3))
    labels, count = confidence.cluster_labels(points, 10.0)
    shared = rng.normal(scale=3.0, size=count)[labels]  # systematic: one offset per cluster
    for sigma in (0.5, 2.0, 4.0):
        residual = shared + rng.normal(scale=sigma, size=len(points))
        assert confidence.noise_level(residual, labels, count) == pytest.approx(sigma, rel=0.1)


def test_surface_points_do_not_sort_noisy_points_by_their_offset():
    # Clusters of the noisy points themselves split a cluster across the normal by each
    # point's offset, and the within-cluster spread shrinks; on the surface they do not.
    surface, mesh = _ellipsoid_surface()
    rng = np.random.default_rng(7)
    points, normals = _patch(mesh, np.array([30.0, 15.0, 6.0]), 30.0, 3000, rng)
    noisy = points + rng.normal(scale=4.0, size=points.shape)
    lin = linearise(surface, noisy, 3.0)
    by_points = confidence.noise_level(lin.residual, *confidence.cluster_labels(lin.points, 10.0))
    by_surface = confidence.noise_level(lin.residual,
                                        *confidence.cluster_labels(lin.surface_points, 10.0))
    assert by_surface == pytest.approx(4.0, rel=0.15)
    assert by_points < 0.85 * by_surface


def test_precision_bounds_of_a_known_covariance():
    cov = np.diag([1.0, 4.0, 0.25, 1e-6, 1e-6, 4e-6])
    precision = confidence.precision_bounds(cov, np.zeros(3))
    assert precision.bound_mm == pytest.approx(2.0 * np.sqrt(confidence.CHI2_95_3DOF))
    assert abs(precision.weakest_translation[1]) == pytest.approx(1.0)
    assert precision.bound_deg == pytest.approx(
        np.degrees(2e-3 * np.sqrt(confidence.CHI2_95_3DOF)))
    # Away from the origin the rotation uncertainty adds to the position's.
    far = confidence.precision_bounds(cov, np.array([1000.0, 0.0, 0.0]))
    assert far.bound_mm > precision.bound_mm


def test_free_direction_gets_a_huge_variance():
    # A flat patch: sliding within the plane is not constrained at all.
    rng = np.random.default_rng(3)
    points = np.c_[rng.uniform(-20, 20, size=(500, 2)), np.zeros(500)]
    normals = np.tile([0.0, 0.0, 1.0], (500, 1))
    residual = rng.normal(scale=0.5, size=500)
    labels, count = confidence.cluster_labels(points, 5.0)
    cov = confidence.pose_covariance(points, normals, residual, np.ones(500), labels, count)
    assert cov[0, 0] > 1e6 and cov[2, 2] < 1.0


def _rotvec(rotation):
    from scipy.spatial.transform import Rotation
    return Rotation.from_matrix(rotation).as_rotvec()


def test_covariance_in_parent_matches_sampled_poses():
    from neural_bone_reg.core.se3 import make_transform, se3_exp
    rng = np.random.default_rng(4)
    rotation = _random_rotation(rng)
    transform = make_transform(rotation, np.array([120.0, -40.0, 300.0]))  # cloud -> bone
    root = np.diag([0.5, 1.0, 0.2, 2e-3, 1e-3, 4e-3]) @ _random_rotation6(rng)
    cov = root @ root.T
    samples = rng.multivariate_normal(np.zeros(6), cov, size=4000)
    nominal = np.linalg.inv(transform)  # the bone's pose in the cloud frame
    errors = []
    for delta in samples:
        pose = np.linalg.inv(se3_exp(delta) @ transform)
        turn = pose[:3, :3] @ nominal[:3, :3].T  # fixed-axis (parent frame) rotation error
        errors.append(np.r_[pose[:3, 3] - nominal[:3, 3], _rotvec(turn)])
    empirical = np.cov(np.asarray(errors).T)
    predicted = confidence.covariance_in_parent(transform, cov)
    np.testing.assert_allclose(predicted, empirical, atol=0.06 * np.abs(cov).max())


def test_rigid_error_covariance_matches_sampled_rigid_errors_about_the_centre():
    from scipy.spatial.transform import Rotation

    from neural_bone_reg.core.se3 import make_transform, se3_log

    # A rigid error of the whole cloud: turned about its centre (0.5 deg RMS per axis), then
    # shifted (0.4 mm per axis). Far from the bone origin, the turn moves the origin too.
    rng = np.random.default_rng(6)
    centre = np.array([80.0, -120.0, 40.0])
    deltas = []
    for _ in range(4000):
        turn = Rotation.from_rotvec(rng.normal(0.0, np.radians(0.5), 3)).as_matrix()
        shift = rng.normal(0.0, 0.4, 3)
        deltas.append(se3_log(make_transform(turn, centre + shift - turn @ centre)))
    empirical = np.cov(np.asarray(deltas).T)
    predicted = confidence.rigid_error_covariance(centre, 0.4, 0.5)
    scale = np.sqrt(np.outer(np.diag(predicted), np.diag(predicted)))
    np.testing.assert_allclose(predicted / scale, empirical / scale, atol=0.06)
    # At the centre, the point moves by the translation alone.
    at_centre = confidence.point_covariance(predicted, centre)
    np.testing.assert_allclose(at_centre, 0.16 * np.eye(3), atol=1e-9)
    assert np.allclose(confidence.rigid_error_covariance(centre, 0.0, 0.0), 0.0)


def _random_rotation(rng):
    from scipy.spatial.transform import Rotation
    return Rotation.random(random_state=int(rng.integers(1e9))).as_matrix()


def _random_rotation6(rng):
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    return np.eye(6) * 0.7 + 0.3 * q


def test_voxel_keys_group_and_order_like_unique_rows():
    from neural_bone_reg.core.confidence import cluster_labels, voxel_keys

    rng = np.random.default_rng(4)
    points = np.vstack([rng.normal(0.0, 40.0, (3000, 3)) - 500.0, rng.normal(0.0, 2.0, (50, 3))])
    keys = np.floor(points / 7.5).astype(np.int64)
    _, expected = np.unique(keys, axis=0, return_inverse=True)
    labels, count = cluster_labels(points, 7.5)
    np.testing.assert_array_equal(labels, expected.reshape(-1))
    assert count == len(np.unique(keys, axis=0))
    assert len(voxel_keys(np.zeros((0, 3)), 1.0)) == 0


def test_a_linearisation_gives_the_surface_distances_of_its_matches():
    surface, mesh = _ellipsoid_surface()
    rng = np.random.default_rng(6)
    points, normals = _patch(mesh, np.array([30.0, 15.0, 6.0]), 30.0, 500, rng)
    points = points + normals * rng.normal(scale=2.0, size=(len(points), 1))
    points[:20] += 40.0 * normals[:20]  # beyond the matching bound: unmatched
    lin = linearise(surface, points, 3.0)
    got = lin.distances(surface)
    expected = surface.distances(points)
    assert (~lin.valid[:20]).all() and np.isinf(got[:20]).all()
    np.testing.assert_allclose(got[lin.valid], expected[lin.valid], rtol=1e-9, atol=1e-9)
    assert (expected[~lin.valid] > 5.0).all()  # never inliers: the fit statistics agree


def test_uniqueness_standard_error_is_the_cluster_robust_formula():
    """Hand-computed: SE = sqrt(G / (G - 1) * sum of centred cluster sums^2) / N."""
    best = np.zeros(6)
    alternative = np.array([1.0, 1.0, 2.0, 0.0, 3.0, 5.0])
    labels = np.array([0, 0, 1, 1, 2, 2])
    z, margin, std_error = confidence.uniqueness_z(best, alternative, labels, 3)
    sums = np.array([2.0, 2.0, 8.0]) - 2 * 2.0  # cluster sums of diff - margin (margin 2)
    expected = np.sqrt(3 / 2 * np.sum(sums ** 2)) / 6
    assert margin == pytest.approx(2.0)
    assert std_error == pytest.approx(expected) and z == pytest.approx(2.0 / expected)


def test_uniqueness_standard_error_never_falls_below_its_floor():
    """A margin equal in every cluster has no spread: the floor keeps z finite and bounded."""
    labels = np.repeat(np.arange(10), 5)
    z, margin, std_error = confidence.uniqueness_z(np.zeros(50), np.full(50, 0.01), labels, 10)
    assert std_error == confidence.MIN_STANDARD_ERROR_MM
    assert z == pytest.approx(0.01 / confidence.MIN_STANDARD_ERROR_MM)


def test_the_sandwich_carries_the_small_sample_factor_of_its_clusters():
    """Meat x G / (G - 6): the same 8 scored clusters, declared as 8 or as 80 (72 empty).

    Residuals shared within each cluster make the sandwich far larger than the Gauss-Newton
    floor, so the two differ by the factors' ratio alone, (8 / 2) / (80 / 74).
    """
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(8), 50)  # 8 small patches, each facing its own way
    points = rng.normal(scale=40.0, size=(8, 3))[labels] + rng.normal(scale=2.0, size=(400, 3))
    normals = rng.normal(size=(8, 3))[labels] + rng.normal(scale=0.05, size=(400, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    residual = rng.normal(scale=2.0, size=8)[labels] + rng.normal(scale=0.01, size=400)
    weight = np.ones(400)
    few, _ = confidence.covariance_terms(points, normals, residual, weight, labels, 8, 50.0)
    many, _ = confidence.covariance_terms(points, normals, residual, weight, labels, 80, 50.0)
    np.testing.assert_allclose(few, many * (8 / 2) / (80 / 74), rtol=1e-9)
