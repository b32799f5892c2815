"""Rigid-transform helpers in numpy and torch.

Convention, used everywhere in this package: a transform ``T`` (4x4) or ``(R, t)`` maps a point
as ``p' = R p + t`` (column vectors). Batched rotations are ``(H, 3, 3)``, translations
``(H, 3)``, points ``(N, 3)``; transformed batches are ``(H, N, 3)``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation
import torch

#: Below this rotation angle (rad) the exponential map uses its Taylor expansion.
SMALL_ANGLE_RAD = 1e-6


def make_transform(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Assemble a 4x4 transform from R (3, 3) and t (3,)."""
    transform = np.eye(4)
    transform[:3, :3] = rotation
    transform[:3, 3] = translation
    return transform


def apply_transform(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Return ``R p + t`` for points (N, 3) under a 4x4 transform, in float64."""
    points = np.asarray(points, dtype=np.float64)
    return points @ transform[:3, :3].T + transform[:3, 3]


def invert_transform(transform: np.ndarray) -> np.ndarray:
    """Return the inverse of a rigid 4x4 transform."""
    rotation = transform[:3, :3]
    return make_transform(rotation.T, -rotation.T @ transform[:3, 3])


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Return the angle of a rotation matrix in degrees, robust to rounding."""
    cos = (np.trace(rotation) - 1.0) / 2.0
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def random_rotations(count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` rotations uniform on SO(3) (Haar measure), shape (count, 3, 3)."""
    return Rotation.random(count, random_state=rng).as_matrix()


def fps_rotations(count: int, seed: int = 0, pool_factor: int = 8) -> np.ndarray:
    """Spread ``count`` rotations over SO(3) by farthest point sampling, shape (count, 3, 3).

    A pool of ``pool_factor * count`` uniform rotations is thinned greedily, with the geodesic
    distance ``2 acos |<q1, q2>|`` between unit quaternions. The first sample is the identity, so
    a cloud already in the right orientation is always among the hypotheses.
    """
    if count < 1:
        raise ValueError(f'need at least one rotation, got {count}')
    rng = np.random.default_rng(seed)
    pool = Rotation.random(max(count * pool_factor, count), random_state=rng).as_quat()
    pool = torch.from_numpy(np.concatenate([[[0.0, 0.0, 0.0, 1.0]], pool]))
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = 0
    # |<q1, q2>| is monotone in the geodesic distance: track the closest chosen one per pool item.
    closest = (pool @ pool[0]).abs()
    for i in range(1, count):
        nxt = torch.argmin(closest)
        chosen[i] = nxt
        closest = torch.maximum(closest, (pool @ pool[nxt]).abs())
    return Rotation.from_quat(pool[chosen].numpy()).as_matrix()


def so3_exp(omega: torch.Tensor) -> torch.Tensor:
    """Map axis-angle vectors (..., 3) to rotation matrices (..., 3, 3) (Rodrigues)."""
    theta2 = (omega * omega).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2.clamp_min(SMALL_ANGLE_RAD ** 2))
    small = theta2 < SMALL_ANGLE_RAD ** 2
    a = torch.where(small, 1.0 - theta2 / 6.0, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24.0, (1.0 - torch.cos(theta)) / theta2.clamp_min(
        SMALL_ANGLE_RAD ** 2))
    x, y, z = omega.unbind(-1)
    zero = torch.zeros_like(x)
    skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], dim=-1).reshape(
        *omega.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(skew)
    return eye + a[..., None] * skew + b[..., None] * (skew @ skew)


def geodesic_deg(rot_a: np.ndarray, rot_b: np.ndarray) -> np.ndarray:
    """Return the angle (deg) of ``R_a R_b^T`` for batches (..., 3, 3)."""
    rel = np.einsum('...ij,...kj->...ik', rot_a, rot_b)
    cos = (np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0
    return np.degrees(np.arccos(np.clip(cos, -1.0, 1.0)))


def _skew(vector: np.ndarray) -> np.ndarray:
    """Return the cross-product matrix (3, 3) of a 3-vector."""
    x, y, z = vector
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])


def _se3_v(phi: np.ndarray) -> np.ndarray:
    """Return the V matrix (3, 3) of SE(3)'s exponential, ``t = V rho``, at rotation ``phi``."""
    theta2 = float(phi @ phi)
    skew = _skew(phi)
    if theta2 < SMALL_ANGLE_RAD ** 2:  # Taylor: I + K/2 + K^2/6
        return np.eye(3) + 0.5 * skew + skew @ skew / 6.0
    theta = np.sqrt(theta2)
    return (np.eye(3) + (1.0 - np.cos(theta)) / theta2 * skew
            + (theta - np.sin(theta)) / (theta2 * theta) * (skew @ skew))


def se3_exp(delta: np.ndarray) -> np.ndarray:
    """Return the 4x4 rigid transform ``exp(delta)`` of a twist (6,) = (tx, ty, tz, rx, ry, rz).

    The translation part ``rho`` is in mm (the unit of the points), the rotation part ``phi``
    an axis-angle vector in rad: ``R = exp([phi]x)``, ``t = V(phi) rho``. As a pose error it is
    applied on the left, ``T_true = se3_exp(delta) @ T_estimate``, so ``delta`` is expressed in
    the frame the transforms map into (the bone frame for a registration).
    """
    delta = np.asarray(delta, dtype=np.float64)
    if delta.shape != (6,) or not np.all(np.isfinite(delta)):
        raise ValueError(f'delta must be a finite (6,) vector (tx, ty, tz, rx, ry, rz), '
                         f'got shape {delta.shape}')
    rho, phi = delta[:3], delta[3:]
    return make_transform(Rotation.from_rotvec(phi).as_matrix(), _se3_v(phi) @ rho)


def se3_log(transform: np.ndarray) -> np.ndarray:
    """Return the twist (6,) = (tx, ty, tz in mm, rx, ry, rz in rad) with ``se3_exp`` = T.

    The inverse of ``se3_exp`` for rotations below pi (at pi the axis sign is arbitrary).
    """
    transform = np.asarray(transform, dtype=np.float64)
    if transform.shape != (4, 4) or not np.all(np.isfinite(transform)):
        raise ValueError(f'transform must be a finite 4x4 matrix, got shape {transform.shape}')
    phi = Rotation.from_matrix(transform[:3, :3]).as_rotvec()
    rho = np.linalg.solve(_se3_v(phi), transform[:3, 3])
    return np.concatenate([rho, phi])
