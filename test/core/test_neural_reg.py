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


def test_grid_cost_and_gradient_match_autograd_through_the_lookup():
    from neural_bone_reg.core.fields import DistanceGrid, GridField
    from neural_bone_reg.core.se3 import so3_exp

    # The distance to a sphere of radius 20 mm, on a 1.5 mm grid; points inside, near its
    # edge and outside it (where the field continues linearly).
    axis = np.arange(-30.0, 30.01, 1.5)
    x, y, z = np.meshgrid(axis, axis, axis, indexing='ij')
    values = np.abs(np.sqrt(x ** 2 + y ** 2 + z ** 2) - 20.0)
    field = GridField(DistanceGrid(np.array([-30.0, -30.0, -30.0]), 1.5, values))
    generator = torch.Generator().manual_seed(3)
    points = torch.randn(300, 3, generator=generator) * 15.0
    omega = (torch.randn(7, 3, generator=generator) * 0.5).requires_grad_()
    shift = (torch.randn(7, 3, generator=generator) * 10.0).requires_grad_()
    weights = torch.arange(1.0, 8.0)

    def autograd_cost(rotation, translation):
        moved = torch.einsum('hij,nj->hni', rotation, points) + translation[:, None, :]
        sq = field(moved).square()
        return (sq / (sq + 9.0)).mean(dim=-1)

    expected = autograd_cost(so3_exp(omega), shift)
    expected_grads = torch.autograd.grad((expected * weights).sum(), (omega, shift))
    cost = robust_cost(field, so3_exp(omega), shift, points, 3.0)
    grads = torch.autograd.grad((cost * weights).sum(), (omega, shift))
    torch.testing.assert_close(cost, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    with torch.no_grad():  # the prescreen and rescoring path
        torch.testing.assert_close(robust_cost(field, so3_exp(omega), shift, points, 3.0),
                                   expected, atol=1e-6, rtol=1e-5)
