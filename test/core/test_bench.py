"""The bench protocol (core.bench): patches, floors, search misses, coverage; se3 exp/log."""

from dataclasses import dataclass

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from neural_bone_reg.core import bench, sim
from neural_bone_reg.core.config import RegistrationConfig
from neural_bone_reg.core.refine import SurfaceModel
from neural_bone_reg.core.registrar import BoneRegistrar
from neural_bone_reg.core.se3 import (apply_transform, invert_transform, make_transform,
                                      random_rotations, se3_exp, se3_log)

#: bench_trial(cloud, seed, trial, noise) of the code before patches existed (commit e27aa25),
#: on ``default_rng(123).normal(scale=30, size=(50, 3))``: the truth's top 3x4 rows and the
#: first two moved points. Patches must leave these moves exactly as they were.
REFERENCE_TRIALS = (
    (0, 0, 0.0,
     [[-0.881990190630414, 0.2225804671774729, 0.41539287338949876, -54.99559852065617],
      [-0.36878989765988845, -0.8747560869204938, -0.3143179914983467, 36.577122528356256],
      [0.293406399070871, -0.43041808050615593, 0.8536117155695915, -38.01018037346589]],
     [[17.71363029505287, 14.293283739243542, 90.91104546543401],
      [-34.097758465535904, -2.4292193935024784, 75.30615327552204]]),
    (5, 3, 0.0,
     [[0.9303903882722613, -0.27790941982609835, 0.2390399125303393, -63.5605391405516],
      [-0.197369959157494, -0.9292895285117724, -0.312195565984748, 62.094890613427815],
      [0.308899376225916, 0.24328445608030408, -0.9194530160899743, -31.85994925296072]],
     [[67.73810963540876, 75.69104812590422, -33.88861775404723],
      [86.54668920060044, 24.731053234331316, -17.860797191816715]]),
    (7, 2147483647, 0.0,
     [[0.26155595039772955, -0.8109444924416656, -0.5234095098391602, -15.08656143430692],
      [-0.11367691959748688, 0.5126308076256609, -0.8510506524431369, -21.7782202186063],
      [0.958470679135448, 0.2820969430029187, 0.041895966226369374, -73.24908888954425]],
     [[102.20350925811022, 48.900272435901115, 3.178407025575442],
      [86.65529926835853, 33.910229899470195, -49.177362164217946]]),
    (3, 1, 2.0,
     [[-0.7722390586548946, -0.6165772939287415, 0.15322949095821095, 27.98099021383663],
      [0.6079543218182912, -0.6471111996601178, 0.460041995753545, -66.61416582845092],
      [-0.18449492911802126, 0.44841892900049773, 0.8745753742495743, 6.6646668728806375]],
     [[73.4343782032373, 12.782587862041165, 44.80599892371481],
      [70.43709158098507, -42.95150841329362, 48.89003021082152]]),
)


def _reference_cloud() -> np.ndarray:
    return np.random.default_rng(123).normal(scale=30.0, size=(50, 3))


# -- se3 exp / log --------------------------------------------------------------------------


def test_se3_exp_log_roundtrip_and_convention():
    rng = np.random.default_rng(0)
    for angle in (0.0, 1e-9, 1e-4, 0.3, 2.0, 3.1):
        axis = rng.normal(size=3)
        delta = np.concatenate([rng.normal(scale=40.0, size=3), angle * axis / np.linalg.norm(
            axis)])
        transform = se3_exp(delta)
        np.testing.assert_allclose(transform[:3, :3], Rotation.from_rotvec(delta[3:]).as_matrix(),
                                   atol=1e-12)
        np.testing.assert_allclose(se3_log(transform), delta, atol=1e-9)
    for _ in range(5):
        transform = make_transform(random_rotations(1, rng)[0], rng.normal(scale=80.0, size=3))
        np.testing.assert_allclose(se3_exp(se3_log(transform)), transform, atol=1e-9)
    # Ordering (translation first, mm) and the V matrix: a pure translation is itself, and a
    # quarter turn about z with rho along x moves along the arc, (2/pi, 2/pi, 0) * |rho|.
    np.testing.assert_allclose(se3_exp(np.array([1.0, 2.0, 3.0, 0, 0, 0]))[:3, 3], [1, 2, 3])
    quarter = se3_exp(np.array([np.pi / 2, 0.0, 0.0, 0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(quarter[:3, 3], [1.0, 1.0, 0.0], atol=1e-12)


def _twist_matrix(delta):
    hat = np.zeros((4, 4))
    hat[:3, :3] = [[0, -delta[5], delta[4]], [delta[5], 0, -delta[3]],
                   [-delta[4], delta[3], 0]]
    hat[:3, 3] = delta[:3]
    return hat


def test_se3_exp_is_the_matrix_exponential_including_small_angles():
    from scipy.linalg import expm

    rng = np.random.default_rng(7)
    for scale in (1e-8, 1e-5, 1e-2, 1.0):
        delta = np.concatenate([rng.normal(scale=30.0, size=3), scale * rng.normal(size=3)])
        np.testing.assert_allclose(se3_exp(delta), expm(_twist_matrix(delta)), atol=1e-10)
    delta = np.array([0.3, -0.2, 0.1, 2e-7, -1e-7, 3e-7])
    transform = se3_exp(delta)
    np.testing.assert_allclose(transform, np.eye(4) + _twist_matrix(delta), atol=1e-7)
    np.testing.assert_allclose(se3_log(transform), delta, atol=1e-15)
    np.testing.assert_array_equal(se3_log(np.eye(4)), np.zeros(6))
    with pytest.raises(ValueError, match='6'):
        se3_exp(np.zeros(5))
    with pytest.raises(ValueError, match='4x4'):
        se3_log(np.eye(3))


# -- the patch protocol ---------------------------------------------------------------------


@pytest.mark.parametrize('seed, trial, noise, truth, first_points', REFERENCE_TRIALS)
def test_moves_are_those_of_before_patches(seed, trial, noise, truth, first_points):
    moved, got = bench.bench_trial(_reference_cloud(), seed, trial, noise)
    np.testing.assert_allclose(got[:3], truth, rtol=0, atol=1e-12)
    np.testing.assert_allclose(moved[:2], first_points, rtol=0, atol=1e-12)


def test_bench_trials_are_seeded_and_follow_the_protocol():
    from neural_bone_reg.core.se3 import rotation_angle_deg

    cloud = _reference_cloud()
    moved_a, truth_a = bench.bench_trial(cloud, 5, 1, 0.0)
    moved_b, truth_b = bench.bench_trial(cloud, 5, 1, 0.0)
    np.testing.assert_array_equal(moved_a, moved_b)
    np.testing.assert_allclose(apply_transform(truth_a, moved_a), cloud, atol=1e-9)
    trials = [bench.bench_trial(cloud, 5, k, 0.0) for k in range(20)]
    shifts = [np.linalg.norm(moved.mean(0) - cloud.mean(0)) for moved, _ in trials]
    assert max(shifts) <= bench.BENCH_MAX_TRANSLATION_MM
    angles = [rotation_angle_deg(truth[:3, :3]) for _, truth in trials]
    assert max(angles) > 90.0  # rotations span SO(3), not a small perturbation


@pytest.mark.parametrize('noise, patch', [(float('nan'), 0.0), (0.0, float('nan')),
                                          (float('inf'), 0.0), (-1.0, 0.0)])
def test_a_trial_refuses_noise_or_patch_sizes_that_are_not_finite_and_positive(noise, patch):
    # nan used to pass the check and run as neither noise nor patch, reported as 'noise nan'.
    with pytest.raises(ValueError, match='must be finite and >= 0 mm'):
        bench.bench_trial(_reference_cloud(), 0, 0, noise, patch)


def test_cli_reexports_the_core_protocol():
    from neural_bone_reg.cli import commands

    assert commands.bench_trial is bench.bench_trial
    assert commands.bench_cases is bench.bench_cases
    assert commands.WARMUP_TRIAL == bench.WARMUP_TRIAL
    with pytest.raises(AttributeError):
        commands.no_such_name  # noqa: B018


def test_patch_is_a_seeded_ball_of_the_cloud_moved_as_the_whole_cloud(phantom_mesh):
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(0), n_points=800,
                                       noise_mm=0.5)
    radius = 30.0
    for trial in range(4):
        moved, truth = bench.bench_trial(cloud, 2, trial, 0.0, patch_mm=radius)
        again, truth_again = bench.bench_trial(cloud, 2, trial, 0.0, patch_mm=radius)
        np.testing.assert_array_equal(moved, again)
        np.testing.assert_array_equal(truth, truth_again)
        back = apply_transform(truth, moved)
        index = bench.patch_indices(cloud, 2, trial, radius)
        np.testing.assert_allclose(back, cloud[index], atol=1e-9)
        # Exactly the points within the radius of one point of the cloud.
        balls = [set(np.flatnonzero(np.linalg.norm(cloud - c, axis=1) <= radius))
                 for c in cloud[index]]
        assert set(index) in balls
        assert 3 < len(index) < len(cloud)
        # Same rotation and shift of the centroid as the whole cloud's move of this trial.
        _, full_truth = bench.bench_trial(cloud, 2, trial, 0.0)
        np.testing.assert_allclose(truth[:3, :3], full_truth[:3, :3], atol=1e-12)
        full_shift = apply_transform(invert_transform(full_truth), cloud.mean(0)[None])[0]
        np.testing.assert_allclose(moved.mean(0) - back.mean(0),
                                   full_shift - cloud.mean(0), atol=1e-9)
    patches = {tuple(bench.patch_indices(cloud, 2, k, radius)[:5]) for k in range(6)}
    assert len(patches) > 3  # the seed point changes with the trial


def test_patch_then_noise(phantom_mesh):
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(1), n_points=2000,
                                       noise_mm=0.0, outlier_fraction=0.0)
    moved, truth = bench.bench_trial(cloud, 4, 0, 2.0, patch_mm=40.0)
    index = bench.patch_indices(cloud, 4, 0, 40.0)
    noise = apply_transform(truth, moved) - cloud[index]
    assert len(index) > 200
    assert 1.8 < noise.std() < 2.2
    with pytest.raises(ValueError, match='patch_mm'):
        bench.bench_trial(cloud, 4, 0, 0.0, patch_mm=-1.0)


# -- floors and the search-miss flag on a registrar stand-in --------------------------------


@dataclass(frozen=True)
class _Result:
    """What a registration result offers the bench, plus the covariance and bounds."""

    transform: np.ndarray
    accepted: bool = True
    residual_mm: float = 0.5
    inlier_fraction: float = 0.9
    ambiguity: float = 0.5
    time_s: float = 0.01
    rejection_reasons: tuple = ()
    covariance: np.ndarray | None = None
    bound_mm: float | None = None
    bound_deg: float | None = None
    uniqueness_z: float | None = None
    noise_mm: float | None = None


class _StandIn(BoneRegistrar):
    """A registrar whose ``register`` returns ``self.answer``; surface, gates and fit are real."""

    def __init__(self, surface: SurfaceModel, bone_points: np.ndarray) -> None:
        self.config = RegistrationConfig()
        self.surface = surface
        self._bone_diagonal = float(np.linalg.norm(np.ptp(bone_points, axis=0)))
        self.answer = None

    def register(self, points):
        self.validate(points)
        return self.answer


def _surface_samples(mesh, count=20_000):
    import trimesh

    points, faces = trimesh.sample.sample_surface(mesh, count, seed=0)
    return points, mesh.face_normals[faces]


@pytest.fixture(scope='module')
def stand_in_case(phantom_mesh):
    points, normals = _surface_samples(phantom_mesh)
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(5), n_points=1500,
                                       noise_mm=0.7, outlier_fraction=0.02)
    return points, normals, cloud


def _wrong_about_centroid(truth, moved, degrees):
    """Return truth followed by a turn of ``degrees`` about z through the cloud's bone centroid."""
    centre = apply_transform(truth, moved).mean(0)
    turn = Rotation.from_euler('z', degrees, degrees=True).as_matrix()
    return make_transform(turn, centre - turn @ centre) @ truth


def test_a_wrong_pose_that_fits_worse_is_a_search_miss(stand_in_case):
    points, normals, cloud = stand_in_case
    reg = _StandIn(SurfaceModel.build(points, normals), points)
    moved, truth = bench.bench_trial(cloud, 0, 1, 0.0)
    floor = bench.icp_floor(reg, moved, truth)
    assert floor.rre_deg < 1.0 and floor.rte_mm < 1.0 and floor.inlier_fraction > 0.9

    reg.answer = _Result(_wrong_about_centroid(truth, moved, 90.0))
    row = bench.run_trial(reg, cloud, 0, 1)
    assert not row['success'] and row['search_miss'] and not row['same_optimum']
    assert row['fit_residual_mm'] > row['floor_residual_mm']
    assert row['floor_rre_deg'] == pytest.approx(floor.rre_deg)

    reg.answer = _Result(truth)
    row = bench.run_trial(reg, cloud, 0, 1)
    assert row['success'] and not row['search_miss'] and row['same_optimum']


def test_a_wrong_pose_that_fits_better_is_not_a_search_miss(stand_in_case):
    points, normals, cloud = stand_in_case
    moved, truth = bench.bench_trial(cloud, 0, 2, 0.0)
    # A second "bone" far away that holds an exact copy of this very cloud: the wrong pose
    # that lands the cloud there fits better than the truth can (no noise left).
    elsewhere = make_transform(np.eye(3), np.array([1000.0, 0.0, 0.0]))
    wrong = elsewhere @ truth
    copy = apply_transform(wrong, moved)
    reg = _StandIn(SurfaceModel.build(np.vstack([points, copy]),
                                      np.vstack([normals, np.tile([0.0, 0.0, 1.0],
                                                                  (len(copy), 1))])), points)
    reg.answer = _Result(wrong)
    row = bench.run_trial(reg, cloud, 0, 2)
    assert not row['success'] and not row['search_miss']
    assert row['fit_residual_mm'] < row['floor_residual_mm']
    assert row['fit_inlier_fraction'] >= row['floor_inlier_fraction']


def test_search_miss_needs_all_three_conditions():
    floor = (1.0, 0.8)
    assert bench.is_search_miss(False, (1.5, 0.8), floor)
    assert bench.is_search_miss(False, (1.5, 0.5), floor)
    assert not bench.is_search_miss(True, (1.5, 0.5), floor)    # correct
    assert not bench.is_search_miss(False, (1.0, 0.5), floor)   # not a higher residual
    assert not bench.is_search_miss(False, (1.5, 0.81), floor)  # more inliers
    # ICP stopping a hair apart in one optimum is the same fit, not a miss.
    assert not bench.is_search_miss(False, (1.0 + 0.8 * bench.SAME_FIT_RESIDUAL_MM, 0.8), floor)


def test_case_floor_and_input_error_rows(stand_in_case):
    points, normals, cloud = stand_in_case
    reg = _StandIn(SurfaceModel.build(points, normals), points)
    floor = bench.floor_of_case(reg, cloud)
    assert floor.rre_deg < 1.0 and floor.rte_mm < 1.0 and floor.iterations >= 1
    assert set(floor.summary()) >= {'rre_deg', 'rte_mm', 'transform'}
    reg.answer = _Result(np.eye(4))
    row = bench.run_trial(reg, cloud, 0, 0, patch_mm=0.5)  # a few points: below min_points
    assert 'input_error' in row and not row['accepted'] and not row['search_miss']
    summary = bench.summarise([row])
    assert summary['input_errors'] == 1 and summary['accepted_correct'] == 0.0


# -- covariance coverage --------------------------------------------------------------------

_COVARIANCE = np.diag([1.0, 4.0, 9.0, 1e-4, 4e-4, 9e-4])


def test_mahalanobis_of_a_known_delta():
    delta = np.array([1.0, 2.0, 3.0, 0.01, 0.02, 0.03])
    assert bench.mahalanobis_sq(_COVARIANCE, delta) == pytest.approx(6.0)
    rotated = Rotation.random(random_state=3).as_matrix()
    spin = np.zeros((6, 6))
    spin[:3, :3] = spin[3:, 3:] = rotated
    assert bench.mahalanobis_sq(spin @ _COVARIANCE @ spin.T, spin @ delta) == pytest.approx(6.0)
    assert bench.mahalanobis_sq(np.diag([1.0] * 5 + [0.0]), delta) == float('inf')
    with pytest.raises(ValueError, match='6, 6'):
        bench.mahalanobis_sq(np.eye(3), delta[:3])
    estimate = make_transform(Rotation.random(random_state=4).as_matrix(), [10.0, -20.0, 5.0])
    np.testing.assert_allclose(bench.pose_error(se3_exp(delta) @ estimate, estimate), delta,
                               atol=1e-12)


def test_coverage_against_both_floors(stand_in_case):
    points, normals, cloud = stand_in_case
    reg = _StandIn(SurfaceModel.build(points, normals), points)
    case = bench.floor_of_case(reg, cloud)
    delta = np.array([1.0, 2.0, 3.0, 0.01, 0.02, 0.03])  # Mahalanobis^2 6 under _COVARIANCE
    rows = []
    for trial, scale, accepted in ((0, 1.0, True), (1, 2.0, True), (2, 3.0, False)):
        moved, truth = bench.bench_trial(cloud, 0, trial, 0.0)
        floor = bench.icp_floor(reg, moved, truth)
        estimate = se3_exp(-scale * delta) @ floor.transform
        reg.answer = _Result(estimate, accepted=accepted, covariance=_COVARIANCE,
                             bound_mm=float(trial), bound_deg=0.5, uniqueness_z=7.5 + trial,
                             noise_mm=1.25)
        row = bench.run_trial(reg, cloud, 0, trial, case_floor=case)
        assert row['uniqueness_z'] == 7.5 + trial and row['measured_noise_mm'] == 1.25
        np.testing.assert_allclose(row['delta_trial_floor'], scale * delta, atol=1e-9)
        assert row['mahalanobis2_trial_floor'] == pytest.approx(6.0 * scale ** 2)
        assert row['inside95_trial_floor'] == (6.0 * scale ** 2 <= bench.CHI2_6DOF_95)
        expected = bench.mahalanobis_sq(_COVARIANCE,
                                        bench.pose_error(case.transform @ truth, estimate))
        assert row['mahalanobis2_case_floor'] == pytest.approx(expected)
        rows.append(row)
    summary = bench.summarise(rows)
    assert summary['covariance_trials'] == 2  # accepted only
    assert summary['coverage_trial_floor'] == 0.5
    assert summary['bound_median_mm'] == 0.5 and summary['bound_median_deg'] == 0.5
    # Without a covariance, or with an unknown (inf) one, coverage is not measured (None).
    for unknown in (None, np.full((6, 6), np.inf)):
        reg.answer = _Result(np.eye(4), covariance=unknown)
        plain = bench.run_trial(reg, cloud, 0, 0, case_floor=case)
        assert plain['mahalanobis2_trial_floor'] is None and plain['covariance'] is None
        summary = bench.summarise([plain])
        assert summary['coverage_trial_floor'] is None
        assert summary['accepted_without_covariance'] == 1
    reg.answer = _Result(np.eye(4), covariance=np.eye(3))
    with pytest.raises(ValueError, match='6, 6'):
        bench.run_trial(reg, cloud, 0, 0)


@pytest.mark.parametrize('reason, test', [
    ('ambiguous: a distinct pose fits only 0.1 mm worse per point', 'ambiguous'),
    ('imprecise: 95 % bound 2.56 mm at the cloud centroid (gate 2.0 mm)', 'imprecise'),
    ('residual 1.20 mm > 0.90 mm', 'residual'),
    ('inlier fraction 0.41 < 0.50', 'inlier fraction'),
    ('too noisy: measured point noise 5.10 mm > 4.00 mm', 'too noisy'),
    ('no number here', 'no number here'),
])
def test_refusal_test_names_the_failed_test(reason, test):
    assert bench.refusal_test(reason) == test


def test_summary_counts():
    base = dict(n_points=100, time_s=1.0, rre_deg=1.0, rte_mm=1.0, chamfer_mm=1.0,
                floor_rre_deg=1.0, floor_rte_mm=1.0, same_optimum=False, search_miss=False)
    ambiguous = ('ambiguous: a distinct pose (22 deg / 90 mm away) fits only 0.598 mm worse '
                 'per point, 5.4 standard errors (gate 6.0)')
    imprecise = 'imprecise: 95 % rotation bound 2.39 deg (gate 2.0 deg)'
    rows = [dict(base, success=True, accepted=True, same_optimum=True, rejection_reasons=[]),
            dict(base, success=True, accepted=False, rejection_reasons=[ambiguous]),
            dict(base, success=False, accepted=True, rre_deg=90.0),
            dict(base, success=False, accepted=False, search_miss=True, rre_deg=90.0,
                 floor_rre_deg=12.0, rejection_reasons=[imprecise, 'residual 1.20 mm > 0.90 mm',
                                                        ambiguous, imprecise])]
    summary = bench.summarise(rows)
    assert summary['reachable'] == 3  # the last trial's floor is 12 deg off
    assert summary['correct_refused_by'] == {'ambiguous': 1}
    assert summary['wrong_refused_by'] == {'ambiguous+imprecise+residual': 1}
    no_input = dict(base, success=False, accepted=False, input_error='too few points')
    assert bench.summarise([no_input])['wrong_refused_by'] == {'input error': 1}
    assert summary['accepted_correct'] == 0.25
    assert summary['correct_rejected'] == summary['rejected_correct'] == 1
    assert summary['wrong_accepted'] == summary['accepted_wrong'] == 1
    assert summary['search_misses'] == 1 and summary['same_optimum'] == 1
    assert summary['recall'] == 0.5 and summary['rre_mean_deg'] == 1.0
    with pytest.raises(ValueError):
        bench.summarise([])


def test_a_real_registration_rows_have_every_field(phantom_registrar, phantom_mesh):
    cloud = sim.simulate_partial_cloud(phantom_mesh, np.random.default_rng(2), n_points=1500)
    floor, rows = bench.run_case(phantom_registrar, cloud, 1, 1, patch_mm=60.0, warm_up=False)
    row = rows[0]
    assert row['n_points'] < len(cloud) and row['patch_mm'] == 60.0
    assert {'floor_rre_deg', 'floor_rte_mm', 'same_optimum', 'search_miss',
            'mahalanobis2_trial_floor', 'bound_mm'} <= set(row)
    assert floor.rre_deg < 2.0 and floor.rte_mm < 2.0


def test_coverage_uses_the_6_dof_95_percent_region():
    """A pose error of Mahalanobis^2 10 is inside (6 dof: 12.59), though outside 3 dof's 7.81."""
    covariance = np.eye(6)
    estimate = np.eye(4)
    reference = make_transform(np.eye(3), np.array([np.sqrt(10.0), 0.0, 0.0]))
    out = bench._coverage(covariance, reference, estimate)
    assert out['mahalanobis2'] == pytest.approx(10.0) and out['inside95'] is True
    far = make_transform(np.eye(3), np.array([np.sqrt(13.0), 0.0, 0.0]))
    assert bench._coverage(covariance, far, estimate)['inside95'] is False
