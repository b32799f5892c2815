"""NeuralReg hypotheses: the SO(3) initialisation takes effect and survives the first steps."""

import numpy as np
import torch

from neural_bone_reg.core.neural_reg import HypothesisSet, optimise, robust_cost
from neural_bone_reg.core.se3 import fps_rotations, geodesic_deg


def _hypotheses(count=64, seed=0):
    rot0 = torch.as_tensor(fps_rotations(count, seed), dtype=torch.float32)
    centroid = torch.tensor([10.0, -5.0, 3.0])
    landing = torch.zeros(count, 3)
    return HypothesisSet(rot0, landing, centroid, latent_dim=16, backbone_dim=32,
                         translation_scale_mm=50.0, seed=seed), rot0, centroid


def test_initial_hypotheses_are_exactly_the_fps_rotations():
    hyps, rot0, centroid = _hypotheses()
    rotation, translation = hyps()
    torch.testing.assert_close(rotation, rot0)
    # The cloud's centroid lands on the requested point.
    torch.testing.assert_close(rotation @ centroid + translation, torch.zeros(64, 3),
                               atol=1e-5, rtol=0)


def test_fps_spread_survives_the_first_optimisation_steps():
    hyps, rot0, _ = _hypotheses()
    sphere = torch.randn(2000, 3)
    sphere = 30.0 * sphere / sphere.norm(dim=1, keepdim=True)

    def field(points):  # distance to a sphere of radius 30 mm: rotation-invariant on purpose
        return (points.norm(dim=-1) - 30.0).abs()

    stage = optimise(hyps, field, sphere[:64], iterations=3, learning_rate=0.02, scale_mm=3.0,
                     tolerance=0.0, track_top=8)
    moved = geodesic_deg(stage.rotation.double().numpy(), rot0.double().numpy())
    assert moved.max() < 10.0  # each head stays near its own FPS start ...
    rotations = stage.rotation.double().numpy()
    pair = geodesic_deg(rotations[:, None], rotations[None])
    np.fill_diagonal(pair, 180.0)
    assert pair.min() > 10.0  # ... so the set is still spread over SO(3), not collapsed


def test_successive_halving_keeps_the_best():
    hyps, _, _ = _hypotheses(count=64)
    target = torch.randn(500, 3) * 20

    def field(points):
        return (points - 5.0).norm(dim=-1)

    stage = optimise(hyps, field, target[:32], iterations=20, learning_rate=0.02, scale_mm=3.0,
                     tolerance=0.0, track_top=4, prune_every=5, prune_keep=0.5, min_survivors=8)
    assert len(stage.survivors) == 8 and stage.rotation.shape == (8, 3, 3)
    full = robust_cost(field, *hyps(), target[:32], 3.0)
    assert torch.isclose(stage.cost.min(), full.min())
