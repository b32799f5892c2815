"""Frame-to-frame tracking: local refinement from the previous pose, with its own gates."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
import trimesh

from neural_bone_reg.core import metrics, sim
from neural_bone_reg.core.confidence import precision_bounds
from neural_bone_reg.core.errors import InputError
from neural_bone_reg.core.refine import constraint_ratio, SurfaceModel
from neural_bone_reg.core.se3 import apply_transform, invert_transform, make_transform


def _small_motion(rng: np.random.Generator, angle_deg: float, shift_mm: float,
                  centre: np.ndarray) -> np.ndarray:
    """Return a rotation by ``angle_deg`` about ``centre`` followed by a ``shift_mm`` shift."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    rotation = Rotation.from_rotvec(np.radians(angle_deg) * axis).as_matrix()
    return make_transform(rotation, centre - rotation @ centre + shift_mm * direction)


@pytest.fixture(scope='module')
def moved_cloud(phantom_mesh):
    """Return a partial phantom cloud in a random robot frame and its true transform."""
    rng = np.random.default_rng(21)
    cloud = sim.simulate_partial_cloud(phantom_mesh, rng, n_points=2000)
    pose = sim.random_pose(rng)  # bone -> robot
    return apply_transform(pose, cloud), invert_transform(pose)


def test_track_follows_a_small_motion(phantom_registrar, moved_cloud):
    cloud, truth = moved_cloud
    # The last frame's pose: 4 deg and 4 mm away.
    prior = truth @ _small_motion(np.random.default_rng(1), 4.0, 4.0, cloud.mean(axis=0))
    res = phantom_registrar.track(cloud, prior)
    assert res.method == 'track'
    assert res.accepted, res.summary()
    assert np.isnan(res.ambiguity)
    assert metrics.rre_deg(res.transform, truth) < 0.5
    assert metrics.rte_mm(res.transform, truth, cloud) < 0.5
    assert res.step_deg == pytest.approx(4.0, abs=0.5)
    assert res.step_mm == pytest.approx(4.0, abs=0.5)


def test_tracking_does_not_depend_on_the_global_refinement_settings(phantom_registrar,
                                                                    moved_cloud):
    cloud, truth = moved_cloud
    no_refine = phantom_registrar.with_config(
        replace(phantom_registrar.config, refine=False, refine_iterations=0,
                refine_tolerance_mm=5.0))
    prior = truth @ _small_motion(np.random.default_rng(1), 4.0, 4.0, cloud.mean(axis=0))
    res = no_refine.track(cloud, prior)
    assert res.accepted, res.summary()
    assert metrics.rre_deg(res.transform, truth) < 0.5


def test_track_judges_precision_at_the_configured_target_as_register_does(
        phantom_registrar, moved_cloud):
    """A planned drill entry far from the sweep: the tracked bound there, not at the centroid."""
    cloud, truth = moved_cloud
    prior = truth @ _small_motion(np.random.default_rng(1), 4.0, 4.0, cloud.mean(axis=0))
    at_centroid = phantom_registrar.track(cloud, prior)
    assert at_centroid.accepted, at_centroid.summary()
    centroid = apply_transform(at_centroid.transform, cloud).mean(axis=0)
    far = centroid + np.array([0.0, 0.0, 400.0])
    targeted = phantom_registrar.with_config(replace(
        phantom_registrar.config, precision_at_target=True, precision_target_mm=tuple(far)))
    res = targeted.track(cloud, prior)
    expected = precision_bounds(res.covariance, far).bound_mm
    assert res.bound_mm == pytest.approx(expected) and res.bound_mm > at_centroid.bound_mm
    assert not res.accepted and any('at the target' in r for r in res.rejection_reasons)


def test_track_reports_a_jump_as_lost(phantom_registrar, moved_cloud):
    cloud, truth = moved_cloud
    prior = truth @ _small_motion(np.random.default_rng(2), 60.0, 30.0, cloud.mean(axis=0))
    res = phantom_registrar.track(cloud, prior)
    assert not res.accepted
    # Either ICP cannot bridge the jump (a poor fit) or it does and the step gate refuses it.
    expected = ('tracking lost', 'residual', 'inlier', 'did not settle')
    assert any(word in reason for reason in res.rejection_reasons for word in expected), \
        res.summary()


def test_track_step_gate(phantom_registrar, moved_cloud):
    cloud, truth = moved_cloud
    tight = phantom_registrar.with_config(
        replace(phantom_registrar.config, track_max_rotation_deg=1.0))
    prior = truth @ _small_motion(np.random.default_rng(3), 4.0, 0.0, cloud.mean(axis=0))
    res = tight.track(cloud, prior)
    assert not res.accepted
    assert any('tracking lost' in reason for reason in res.rejection_reasons), res.summary()


def test_sliding_shaft_patch_is_under_constrained(phantom_registrar, phantom_mesh):
    # A plain cylindrical stretch of the shaft: ICP can slide along and spin about its axis.
    pts = np.asarray(phantom_mesh.sample(40_000, seed=3))
    shaft = pts[(pts[:, 2] > 50) & (pts[:, 2] < 100)][:3000]
    res = phantom_registrar.track(shaft, np.eye(4))
    assert not res.accepted
    assert any('under-constrained' in reason for reason in res.rejection_reasons), res.summary()
    assert res.constraint < phantom_registrar.config.track_min_constraint


def test_constraint_ratio_separates_sliding_surfaces_from_a_patch(phantom_registrar,
                                                                  moved_cloud):
    cloud, truth = moved_cloud
    patch = constraint_ratio(phantom_registrar.surface, cloud, truth[:3, :3], truth[:3, 3], 3.0)
    assert 0.01 < patch <= 1.0
    # A band of a straight cylinder can slide along and spin about its axis: no constraint.
    cylinder = trimesh.creation.cylinder(radius=15.0, height=200.0, sections=256)
    points, faces = trimesh.sample.sample_surface_even(cylinder, 30_000, seed=1)
    surface = SurfaceModel.build(points, cylinder.face_normals[faces])
    side = points[np.abs(cylinder.face_normals[faces][:, 2]) < 0.5]
    band = side[np.abs(side[:, 2]) < 40.0]
    assert constraint_ratio(surface, band, np.eye(3), np.zeros(3), 3.0) < 1e-6
    # A cloud that touches nothing scores 0.
    assert constraint_ratio(surface, band, np.eye(3), np.array([500.0, 0.0, 0.0]), 3.0) == 0.0


@pytest.mark.parametrize('prior, message', [
    (np.eye(3), '4x4'),
    (np.full((4, 4), np.nan), 'finite'),
    (np.diag([2.0, 1.0, 1.0, 1.0]), 'rigid'),
    (np.diag([-1.0, 1.0, 1.0, 1.0]), 'rigid'),
])
def test_bad_prior_raises(phantom_registrar, moved_cloud, prior, message):
    with pytest.raises(InputError, match=message):
        phantom_registrar.track(moved_cloud[0], prior)


def test_global_result_reports_constraint(phantom_registrar, moved_cloud):
    res = phantom_registrar.register(moved_cloud[0])
    assert res.method == 'global'
    assert res.constraint >= phantom_registrar.config.track_min_constraint  # informative only
    assert res.summary()['constraint'] == res.constraint


def test_a_cloud_noisier_than_the_calibrated_range_is_refused(phantom_registrar, phantom_mesh):
    rng = np.random.default_rng(5)
    pose = sim.random_pose(rng)
    noisy = apply_transform(pose, sim.simulate_partial_cloud(phantom_mesh, rng, noise_mm=7.0,
                                                             n_points=2000))
    res = phantom_registrar.track(noisy, invert_transform(pose))
    gate = phantom_registrar.config.gate_max_noise_mm
    assert res.noise_mm > gate, res.summary()
    assert not res.accepted
    assert [r for r in res.rejection_reasons if r.startswith('too noisy')
            and f'{res.noise_mm:.2f} mm > {gate} mm' in r], res.rejection_reasons
    # The same cloud, with the gate above its noise: that reason goes (others may stay).
    wide = phantom_registrar.with_config(replace(phantom_registrar.config,
                                                 gate_max_noise_mm=3 * res.noise_mm))
    again = wide.track(noisy, invert_transform(pose))
    assert not [r for r in again.rejection_reasons if r.startswith('too noisy')]


def test_a_noisy_cloud_is_tracked_with_its_fit_de_biased(phantom_registrar, phantom_mesh,
                                                         monkeypatch):
    from neural_bone_reg.core import registrar as registrar_module

    # Noise on a curved surface pushes points outwards on average: a plain fit sinks into a
    # convex bone. Above NOISY_CLOUD_MM the tracked fit is refined again, de-biased for the
    # measured noise, as register's is; a clean cloud gets one plain ICP.
    rng = np.random.default_rng(8)
    clean = sim.simulate_partial_cloud(phantom_mesh, rng, noise_mm=0.5, n_points=2000)
    pose = sim.random_pose(rng)
    calls = []
    plain_icp = registrar_module.refine_icp

    def spy(*args, **kwargs):
        calls.append(args[7] if len(args) > 7 else kwargs.get('noise_var_mm2', 0.0))
        return plain_icp(*args, **kwargs)

    monkeypatch.setattr(registrar_module, 'refine_icp', spy)
    phantom_registrar.track(apply_transform(pose, clean), invert_transform(pose))
    assert calls == [0.0]
    calls.clear()
    noisy = clean + rng.normal(scale=3.0, size=clean.shape)
    phantom_registrar.track(apply_transform(pose, noisy), invert_transform(pose))
    assert len(calls) == 2 and calls[0] == 0.0 and 2.0 ** 2 < calls[1] < 4.5 ** 2
    monkeypatch.setattr(registrar_module, 'refine_icp', plain_icp)

    # Over seeded 4 mm clouds, tracked from the truth, the de-biased fit moves the clean
    # surface less (RMS over its points) than the plain fit does.
    def rms_errors(noisy_cloud_mm):
        monkeypatch.setattr(registrar_module, 'NOISY_CLOUD_MM', noisy_cloud_mm)
        errors = []
        for seed in range(12):
            rng = np.random.default_rng(100 + seed)
            clean = sim.simulate_partial_cloud(phantom_mesh, rng, noise_mm=0.5, n_points=2000)
            noisy = clean + rng.normal(scale=4.0, size=clean.shape)
            pose = sim.random_pose(rng)
            res = phantom_registrar.track(apply_transform(pose, noisy), invert_transform(pose))
            moved = apply_transform(res.transform @ pose, clean)
            errors.append(np.sqrt(np.mean(np.sum((moved - clean) ** 2, axis=1))))
        return np.mean(errors)

    assert rms_errors(registrar_module.NOISY_CLOUD_MM) < 0.95 * rms_errors(np.inf)


def _prior(moved_cloud, angle_deg=4.0, shift_mm=4.0, seed=1):
    cloud, truth = moved_cloud
    return truth @ _small_motion(np.random.default_rng(seed), angle_deg, shift_mm,
                                 cloud.mean(axis=0))


def test_a_pure_translation_past_the_step_limit_is_lost(phantom_registrar, moved_cloud):
    """The translation limit refuses on its own: a 5 mm slide, no turn, with a 2 mm limit."""
    cloud, truth = moved_cloud
    strict = phantom_registrar.with_config(replace(phantom_registrar.config,
                                                   track_max_translation_mm=2.0))
    res = strict.track(cloud, _prior(moved_cloud, 0.0, 5.0))
    assert res.step_deg < 2.0 and res.step_mm > 2.0
    assert [r.split(':')[0] for r in res.rejection_reasons] == ['tracking lost']


def test_a_tracked_frame_is_refused_on_its_rotation_bound_alone(phantom_registrar, moved_cloud):
    cloud, _ = moved_cloud
    res = phantom_registrar.track(cloud, _prior(moved_cloud))
    tight = phantom_registrar.with_config(replace(phantom_registrar.config,
                                                  gate_max_bound_deg=res.bound_deg * 0.99))
    refused = tight.track(cloud, _prior(moved_cloud))
    assert len(refused.rejection_reasons) == 1
    assert refused.rejection_reasons[0].startswith('imprecise: 95 % rotation bound')


def test_tracking_icp_that_has_not_settled_is_refused(phantom_registrar, moved_cloud, monkeypatch):
    from neural_bone_reg.core import registrar as registrar_module

    monkeypatch.setattr(registrar_module, 'TRACK_ICP_ITERATIONS', 1)
    cloud, _ = moved_cloud
    res = phantom_registrar.track(cloud, _prior(moved_cloud))
    assert not res.accepted and any('did not settle' in r for r in res.rejection_reasons)


def test_an_unmeasured_constraint_refuses_a_tracked_frame(phantom_registrar, moved_cloud,
                                                          monkeypatch):
    from neural_bone_reg.core import registrar as registrar_module

    monkeypatch.setattr(registrar_module, 'constraint_from_linearisation',
                        lambda lin: float('nan'))
    cloud, _ = moved_cloud
    res = phantom_registrar.track(cloud, _prior(moved_cloud))
    assert not res.accepted and any('under-constrained' in r for r in res.rejection_reasons)
