"""How far a registration can be trusted: degeneracy, uniqueness, pose covariance, precision.

Ultrasound (and depth-camera) points are not independent samples of the surface: segmentation
and tracking errors are shared by neighbouring points. Every statistic here therefore treats
the points in one cubic *cluster* of edge ``cluster_mm`` as one correlated group and takes its
spread from the variation *between* clusters (cluster-robust, "sandwich" statistics):

* :func:`uniqueness_z`: how many standard errors the best pose fits better than the best
  distinct alternative, per-point truncated distances compared cluster by cluster.
* :func:`pose_covariance`: the covariance of the pose error, sandwich form, plus the
  Gauss-Newton term so that directions the data do not constrain at all stay uncertain.
* :func:`rigid_error_covariance`: a rigid error the whole cloud shares (the probe's tracking),
  which no statistic of the cloud's own residuals can see.
* :func:`precision_bounds`: the 95 % bounds that covariance implies at a point.

Convention of the covariance (the package's): the error of ``T`` (cloud -> bone) is a small
rigid motion applied on the LEFT, in the bone frame, ``T_true ~ exp(delta) @ T``, with
``delta = (tx, ty, tz, rx, ry, rz)`` in mm and rad. A bone-frame point ``p`` then moves by
``v + omega x p``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from neural_bone_reg.core.errors import InputError

#: Points closer than this (mm) count as one point for the degeneracy test.
DISTINCT_VOXEL_MM = 0.5
#: Fewer distinct points than this cannot be a surface patch that pins six degrees of freedom.
MIN_DISTINCT_POINTS = 50
#: The cloud's width along its second principal axis (between the 2nd and 98th percentile)
#: must reach this (mm): thinner is a line (collinear points), not a patch.
MIN_SECOND_AXIS_MM = 5.0
#: Percentiles bounding the principal-axis widths (robust to a few stray points).
SPREAD_PERCENTILES = (2.0, 98.0)
#: A standard error below this (mm) is not trusted: the uniqueness ratio's floor.
MIN_STANDARD_ERROR_MM = 0.02
#: Chi-square quantiles of the 95 % regions: 3 dof (a point, a rotation), 6 dof (the pose).
CHI2_95_3DOF = float(stats.chi2.ppf(0.95, 3))
CHI2_95_6DOF = float(stats.chi2.ppf(0.95, 6))
#: Relative floor of the information matrix's eigenvalues: below it a direction is free.
INFORMATION_FLOOR = 1e-12
#: Median absolute deviation to the standard deviation of a gaussian.
MAD_TO_SIGMA = 1.4826
#: Parameters of a rigid pose, for the small-sample correction of the sandwich.
POSE_DOF = 6


def check_geometry(points: np.ndarray, name: str = 'cloud') -> None:
    """Raise InputError when ``points`` (N, 3) mm cannot pin a rigid pose on any surface.

    Refuses clouds of too few distinct points (repeated points, a few clusters) and clouds
    with no width along their second principal axis (collinear points). A thin, planar patch
    passes: whether its pose is determined is the covariance's question, not the geometry's.
    """
    pts = np.asarray(points, dtype=np.float64)
    distinct = len(np.unique(voxel_keys(pts, DISTINCT_VOXEL_MM)))
    if distinct < MIN_DISTINCT_POINTS:
        raise InputError(
            f'{name} has only {distinct} distinct points ({DISTINCT_VOXEL_MM} mm apart) among '
            f'{len(pts)}; expected a surface patch of at least {MIN_DISTINCT_POINTS} distinct '
            'points (repeated or clustered points cannot pin six degrees of freedom)')
    centred = pts - pts.mean(axis=0)
    _, _, axes = np.linalg.svd(centred[:: max(len(centred) // 20000, 1)], full_matrices=False)
    projected = centred @ axes.T
    low, high = np.percentile(projected, SPREAD_PERCENTILES, axis=0)
    widths = high - low
    if widths[1] < MIN_SECOND_AXIS_MM:
        raise InputError(
            f'{name} is a line: {widths[0]:.1f} mm long but only {widths[1]:.2f} mm wide '
            f'across it; expected a surface patch at least {MIN_SECOND_AXIS_MM} mm wide in two '
            'directions (collinear points cannot pin a rotation about their line)')


def voxel_keys(points: np.ndarray, edge_mm: float) -> np.ndarray:
    """Return one int64 per point (N,) naming its cube of edge ``edge_mm``, in x, y, z order.

    Equal keys are equal cubes, and keys sort as the cubes' integer coordinates do
    (lexicographically), so ``np.unique`` on them matches ``np.unique(..., axis=0)`` on the
    coordinates, several times faster.
    """
    cells = np.floor(np.asarray(points, dtype=np.float64) / edge_mm).astype(np.int64)
    if not len(cells):
        return np.zeros(0, dtype=np.int64)
    cells -= cells.min(axis=0)
    span = cells.max(axis=0) + 1
    return (cells[:, 0] * span[1] + cells[:, 1]) * span[2] + cells[:, 2]


def cluster_labels(points: np.ndarray, cluster_mm: float) -> tuple[np.ndarray, int]:
    """Return each point's cluster index (N,) on a grid of edge ``cluster_mm``, and the count."""
    _, labels = np.unique(voxel_keys(points, cluster_mm), return_inverse=True)
    labels = labels.reshape(-1)
    return labels, int(labels.max()) + 1 if len(labels) else 0


def uniqueness_z(best: np.ndarray, alternative: np.ndarray, labels: np.ndarray,
                 n_clusters: int) -> tuple[float, float, float]:
    """Return (z, margin, standard error) of ``alternative - best`` per-point costs (mm).

    The margin is the mean per-point difference; its standard error comes from the spread of
    the cluster sums (points within a cluster are correlated, clusters are not), with the
    small-sample factor G / (G - 1), and never below ``MIN_STANDARD_ERROR_MM``. z >> 0: the
    best pose is distinguishable from the alternative given this cloud's noise.
    """
    diff = np.asarray(alternative, dtype=np.float64) - np.asarray(best, dtype=np.float64)
    count = len(diff)
    margin = float(diff.mean())
    sums = np.bincount(labels, weights=diff - margin, minlength=n_clusters)
    factor = n_clusters / max(n_clusters - 1, 1)
    std_error = max(float(np.sqrt(factor * np.sum(sums ** 2)) / count), MIN_STANDARD_ERROR_MM)
    return margin / std_error, margin, std_error


def pose_covariance(points: np.ndarray, normals: np.ndarray, residual: np.ndarray,
                    weight: np.ndarray, labels: np.ndarray, n_clusters: int, *,
                    scale: float = 1.0, systematic_mm: float = 0.0,
                    correlation_mm: float = 50.0) -> np.ndarray:
    """Return the (6, 6) covariance of the pose error (see the module doc) of a converged fit.

    ``points`` are the matched cloud points in the bone frame (M, 3), ``normals`` the surface
    normals they were matched to, ``residual`` their signed point-to-plane distances (mm),
    ``weight`` the robust weights, ``labels`` their clusters. It is ``scale`` times the
    cluster-robust sandwich ``H^-1 B H^-1`` (see :func:`covariance_terms`) plus the error that
    a smooth systematic surface offset of RMS ``systematic_mm`` and correlation length
    ``correlation_mm`` causes (segmentation and tracking errors shared over a whole patch,
    which no statistic within the patch can see).
    """
    sandwich, unit_systematic = covariance_terms(points, normals, residual, weight, labels,
                                                 n_clusters, correlation_mm)
    cov = scale * sandwich + systematic_mm ** 2 * unit_systematic
    return (cov + cov.T) / 2.0


def covariance_terms(points: np.ndarray, normals: np.ndarray, residual: np.ndarray,
                     weight: np.ndarray, labels: np.ndarray, n_clusters: int,
                     correlation_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the two (6, 6) terms of :func:`pose_covariance`: sandwich and unit systematic.

    The sandwich is ``H^-1 B H^-1`` with B from the per-cluster scores, never below the
    Gauss-Newton variance ``s^2 / lambda`` along an eigen-direction of the information ``H``,
    so directions with no information get a huge variance. The systematic term is the
    covariance caused by an offset field ``b(x)`` along the normals with unit variance and a
    gaussian correlation of length ``correlation_mm``: ``H^-1 G^T K G H^-1``, with ``G`` the
    clusters' summed weighted Jacobians and ``K`` the correlation between cluster centres.
    Weak directions of ``H`` (a shaft's axis) amplify it, as they amplify any bias.
    """
    centre = points.mean(axis=0)
    # Jacobian of each residual w.r.t. (v, omega) about the centre (well conditioned).
    jac = np.hstack([normals, np.cross(points - centre, normals)])
    weighted = jac * weight[:, None]
    info = weighted.T @ jac
    eigval, eigvec = np.linalg.eigh(info)
    floor = max(float(eigval[-1]), 1e-300) * INFORMATION_FLOOR
    eigval = np.maximum(eigval, floor)
    scores = np.zeros((n_clusters, POSE_DOF))
    np.add.at(scores, labels, weighted * residual[:, None])
    meat = scores.T @ scores * n_clusters / max(n_clusters - POSE_DOF, 1)
    # The sandwich in the eigenbasis of the information: H^-1 B H^-1.
    sandwich = (eigvec.T @ meat @ eigvec) / np.outer(eigval, eigval)
    # Never less certain than Gauss-Newton along any eigen-direction: where the data carry
    # no information at all, the sandwich is 0/0 and Gauss-Newton's s^2 / lambda is huge.
    sigma2 = float(np.sum(weight * residual ** 2) / max(np.sum(weight), 1e-12))
    sandwich += np.diag(np.maximum(sigma2 / eigval - np.diag(sandwich), 0.0))
    # The systematic term, cluster by cluster.
    gains = np.zeros((n_clusters, POSE_DOF))
    np.add.at(gains, labels, weighted)
    counts = np.bincount(labels, minlength=n_clusters).astype(np.float64)
    centres = np.zeros((n_clusters, 3))
    np.add.at(centres, labels, points)
    centres /= np.maximum(counts, 1.0)[:, None]
    gap2 = np.sum((centres[:, None, :] - centres[None, :, :]) ** 2, axis=-1)
    kernel = np.exp(-0.5 * gap2 / correlation_mm ** 2)
    systematic = (eigvec.T @ (gains.T @ kernel @ gains) @ eigvec) / np.outer(eigval, eigval)
    # Move the rotation centre to the bone-frame origin: v_origin = v_centre + centre x omega.
    shift = np.eye(POSE_DOF)
    shift[:3, 3:] = _skew(centre)
    out = []
    for term in (sandwich, systematic):
        cov = shift @ (eigvec @ term @ eigvec.T) @ shift.T
        out.append((cov + cov.T) / 2.0)
    return out[0], out[1]


def rigid_error_covariance(centre: np.ndarray, translation_mm: float,
                           rotation_deg: float) -> np.ndarray:
    """Return the (6, 6) covariance (module convention) of a rigid error of the whole cloud.

    The error moves the cloud's ``centre`` (bone frame, mm) by ``translation_mm`` RMS per axis
    and turns it about that centre by ``rotation_deg`` RMS per axis, independently: what the
    tracking of the few probe frames of a short sweep shares, seen against the whole sweep.
    """
    rotation = np.radians(rotation_deg) ** 2
    about_centre = np.diag([translation_mm ** 2] * 3 + [rotation] * 3)
    # delta = (v, omega) with v the motion of the origin: v = u + centre x omega.
    shift = np.eye(POSE_DOF)
    shift[:3, 3:] = _skew(np.asarray(centre, dtype=np.float64))
    cov = shift @ about_centre @ shift.T
    return (cov + cov.T) / 2.0


def noise_level(residual: np.ndarray, labels: np.ndarray, n_clusters: int) -> float:
    """Return the point noise (mm): the robust spread of residuals about their cluster's mean.

    What varies within a 10 mm cluster is sensor noise; what the cluster shares is systematic.
    The spread is the median absolute deviation scaled to a gaussian sigma (1.4826), so that
    the far points a robust fit discounts still count as the noise they are.
    """
    counts = np.bincount(labels, minlength=n_clusters)
    means = np.bincount(labels, weights=residual, minlength=n_clusters) / np.maximum(counts, 1)
    size = counts[labels]
    shared = size > 1  # a lone point has no spread about its own mean
    if not shared.any():
        return float('nan')
    # A deviation from a mean of n points is sqrt((n - 1) / n) times the noise: undo it.
    deviation = (residual - means[labels])[shared] * np.sqrt(size[shared] / (size[shared] - 1))
    return float(MAD_TO_SIGMA * np.median(np.abs(deviation)))


def covariance_in_parent(transform: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """Return the covariance of the bone's pose in the cloud (parent) frame, ROS-style (mm, rad).

    ``transform`` maps cloud points into the bone frame and ``covariance`` is its error as in
    the module doc. The bone's pose in the cloud frame is ``transform^-1``; its covariance over
    (x, y, z) of the bone origin and small rotations about the parent's fixed X, Y, Z axes (as
    geometry_msgs/PoseWithCovariance reads it) is the bone-frame covariance rotated into the
    cloud frame: the bone origin moves by ``v`` under ``delta`` and rotations turn with it.
    """
    rotation = np.asarray(transform, dtype=np.float64)[:3, :3].T  # R of cloud <- bone
    block = np.zeros((POSE_DOF, POSE_DOF))
    block[:3, :3] = block[3:, 3:] = rotation
    out = block @ np.asarray(covariance, dtype=np.float64) @ block.T
    return (out + out.T) / 2.0


def point_covariance(covariance: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Return the (3, 3) covariance of where the pose puts a bone-frame ``point`` (mm^2)."""
    jac = np.hstack([np.eye(3), -_skew(np.asarray(point, dtype=np.float64))])
    return jac @ covariance @ jac.T


@dataclass(frozen=True)
class Precision:
    """95 % bounds of a pose at one point, and the directions they are widest along."""

    bound_mm: float
    """Largest semi-axis of the 95 % ellipsoid of the point's position, mm."""
    bound_deg: float
    """Largest semi-axis of the 95 % ellipsoid of the rotation, degrees."""
    weakest_translation: np.ndarray
    """Unit vector (bone frame) along which the point's position is least certain."""
    weakest_rotation_axis: np.ndarray
    """Unit axis (bone frame) about which the rotation is least certain."""


def precision_bounds(covariance: np.ndarray, point: np.ndarray) -> Precision:
    """Return the 95 % position bound at bone-frame ``point`` and the 95 % rotation bound."""
    pos_val, pos_vec = np.linalg.eigh(point_covariance(covariance, point))
    rot_val, rot_vec = np.linalg.eigh(covariance[3:, 3:])
    bound_mm = float(np.sqrt(CHI2_95_3DOF * max(pos_val[-1], 0.0)))
    bound_deg = float(np.degrees(np.sqrt(CHI2_95_3DOF * max(rot_val[-1], 0.0))))
    return Precision(bound_mm, bound_deg, pos_vec[:, -1], rot_vec[:, -1])


def mahalanobis2(delta: np.ndarray, covariance: np.ndarray) -> float:
    """Return ``delta^T covariance^-1 delta`` (pseudo-inverse for singular covariances)."""
    delta = np.asarray(delta, dtype=np.float64)
    return float(delta @ np.linalg.pinv(covariance) @ delta)


def _skew(vector: np.ndarray) -> np.ndarray:
    x, y, z = vector
    return np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
