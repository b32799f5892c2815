"""Registration metrics as in the NeuralBoneReg paper."""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from neural_bone_reg.core.se3 import apply_transform, rotation_angle_deg

#: Recall thresholds of the paper: a registration is a success below both.
RECALL_RRE_DEG = 5.0
RECALL_RTE_MM = 4.0


def rre_deg(t_est: np.ndarray, t_gt: np.ndarray) -> float:
    """Return the relative rotation error: the angle of ``R_est R_gt^T`` in degrees."""
    return rotation_angle_deg(t_est[:3, :3] @ t_gt[:3, :3].T)


def rte_mm(t_est: np.ndarray, t_gt: np.ndarray, points: np.ndarray) -> float:
    """Return the distance between where T_est and T_gt send the cloud's centroid, in mm."""
    centroid = np.asarray(points, dtype=np.float64).mean(axis=0, keepdims=True)
    difference = apply_transform(t_est, centroid) - apply_transform(t_gt, centroid)
    return float(np.linalg.norm(difference))


def is_success(rre: float, rte: float) -> bool:
    """Return whether a trial counts towards recall (RRE < 5 deg and RTE < 4 mm)."""
    return rre < RECALL_RRE_DEG and rte < RECALL_RTE_MM


def chamfer_mm(points_a: np.ndarray, points_b: np.ndarray) -> float:
    """Return the symmetric Chamfer distance: the mean of both mean nearest distances, in mm."""
    d_ab, _ = cKDTree(points_b).query(points_a)
    d_ba, _ = cKDTree(points_a).query(points_b)
    return float((d_ab.mean() + d_ba.mean()) / 2.0)
