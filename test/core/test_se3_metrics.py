"""SE(3) helpers, SO(3) farthest-point coverage, and metrics against hand-computed values."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation
import torch

from neural_bone_reg.core import metrics
from neural_bone_reg.core.se3 import (apply_transform, fps_rotations, geodesic_deg,
                                      invert_transform, make_transform, random_rotations, so3_exp)


def test_so3_exp_matches_scipy_including_tiny_angles():
    rng = np.random.default_rng(1)
    omegas = np.vstack([rng.normal(size=(20, 3)), [[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0]]])
    ours = so3_exp(torch.as_tensor(omegas)).numpy()
    np.testing.assert_allclose(ours, Rotation.from_rotvec(omegas).as_matrix(), atol=1e-10)


def test_transform_inverse_roundtrip():
    rng = np.random.default_rng(2)
    transform = make_transform(random_rotations(1, rng)[0], rng.normal(size=3) * 50)
    points = rng.normal(size=(10, 3))
    back = apply_transform(invert_transform(transform), apply_transform(transform, points))
    np.testing.assert_allclose(back, points, atol=1e-12)


def _covering_radius_deg(rotations: np.ndarray, probes: np.ndarray) -> float:
    """Largest angle from a probe rotation to its nearest sample."""
    q = Rotation.from_matrix(rotations).as_quat()
    p = Rotation.from_matrix(probes).as_quat()
    nearest = np.abs(p @ q.T).max(axis=1)
    return float(np.degrees(2 * np.arccos(np.clip(nearest, -1, 1))).max())


def test_fps_rotations_cover_so3_better_than_random():
    count = 256
    fps = fps_rotations(count, seed=0)
    assert fps.shape == (count, 3, 3)
    np.testing.assert_allclose(fps[0], np.eye(3), atol=1e-12)  # the identity is always tried
    np.testing.assert_allclose(np.einsum('nij,nkj->nik', fps, fps),
                               np.broadcast_to(np.eye(3), fps.shape), atol=1e-9)
    probes = random_rotations(5000, np.random.default_rng(9))
    fps_radius = _covering_radius_deg(fps, probes)
    random_radius = _covering_radius_deg(random_rotations(count, np.random.default_rng(3)), probes)
    # Uniform random samples leave holes; farthest points fill them.
    assert fps_radius < 0.9 * random_radius, (fps_radius, random_radius)
    # Minimum pairwise separation is far larger than random's.
    pair = geodesic_deg(fps[:, None], fps[None])
    np.fill_diagonal(pair, 180.0)
    assert pair.min() > 15.0


def test_metrics_hand_computed():
    truth = np.eye(4)
    est = make_transform(Rotation.from_euler('z', 90, degrees=True).as_matrix(), [3.0, 4.0, 0.0])
    points = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])  # centroid (1, 0, 0)
    assert metrics.rre_deg(est, truth) == pytest.approx(90.0)
    # est sends the centroid to (0, 1, 0) + (3, 4, 0) = (3, 5, 0); truth keeps it at (1, 0, 0).
    assert metrics.rte_mm(est, truth, points) == pytest.approx(np.hypot(2.0, 5.0))
    assert metrics.is_success(4.9, 3.9) and not metrics.is_success(5.0, 1.0)
    assert not metrics.is_success(1.0, 4.0)
    a = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    b = np.array([[0.0, 1.0, 0.0]])
    # a->b: distances 1 and sqrt(101); b->a: 1. Chamfer = ((1 + sqrt(101)) / 2 + 1) / 2.
    assert metrics.chamfer_mm(a, b) == pytest.approx(((1 + np.sqrt(101)) / 2 + 1) / 2)
