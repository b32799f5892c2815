"""NeuralReg: thousands of rigid hypotheses optimised at once against a distance field.

Hypotheses are the batch dimension. Each hypothesis ``h`` is ``p' = R_h (p - c) + m_h``, with
``c`` the cloud's centroid and ``m_h`` where that centroid lands; in the standard form
``p' = R_h p + t_h`` with ``t_h = m_h - R_h c``. A shared MLP backbone maps a per-hypothesis
embedding to features; a light linear head per hypothesis turns them into an axis-angle and a
translation offset from the initial pose. The heads start at zero, so the farthest-point
rotations are exactly the poses scored at the first iteration (the official code's random
offset initialisation loses them). The cost is a Geman-McClure robust mean of the UDF.
"""

from __future__ import annotations

from dataclasses import dataclass
import logging
from typing import Callable

import torch
from torch import nn

from neural_bone_reg.core.fields import GridField
from neural_bone_reg.core.se3 import so3_exp

LOG = logging.getLogger(__name__)

DistanceField = Callable[[torch.Tensor], torch.Tensor]
#: The early-stop test compares the mean cost of the best hypotheses over this many steps.
EARLY_STOP_WINDOW = 10


class HypothesisSet(nn.Module):
    """H rigid hypotheses from a shared backbone and zero-initialised per-hypothesis heads."""

    def __init__(self, rotations: torch.Tensor, landing: torch.Tensor, centroid: torch.Tensor,
                 latent_dim: int, backbone_dim: int, translation_scale_mm: float,
                 seed: int) -> None:
        """Start hypothesis h at rotation ``rotations[h]`` with the centroid at ``landing[h]``."""
        super().__init__()
        if rotations.ndim != 3 or rotations.shape[1:] != (3, 3):
            raise ValueError(f'rotations must be (H, 3, 3), got {tuple(rotations.shape)}')
        if landing.shape != (rotations.shape[0], 3):
            raise ValueError(f'landing must be (H, 3) = ({rotations.shape[0]}, 3), '
                             f'got {tuple(landing.shape)}')
        count = rotations.shape[0]
        self.translation_scale_mm = translation_scale_mm
        self.register_buffer('rot0', rotations)
        self.register_buffer('landing0', landing)
        self.register_buffer('centroid', centroid.reshape(3))
        gen = torch.Generator(device='cpu').manual_seed(seed)
        self.latent = nn.Parameter(torch.randn(count, latent_dim, generator=gen).to(rotations))
        first = nn.Linear(latent_dim, backbone_dim)
        second = nn.Linear(backbone_dim, backbone_dim)
        for layer in (first, second):
            bound = 1.0 / layer.in_features ** 0.5
            with torch.no_grad():
                uniform = torch.rand(layer.weight.shape, generator=gen)
                layer.weight.copy_(uniform * 2 * bound - bound)
                layer.bias.zero_()
        self.backbone = nn.Sequential(first, nn.ReLU(), second, nn.Tanh()).to(rotations)
        self.head_weight = nn.Parameter(rotations.new_zeros(count, backbone_dim, 6))
        self.head_bias = nn.Parameter(rotations.new_zeros(count, 6))

    def keep(self, rows: torch.Tensor, optimiser: torch.optim.Optimizer) -> None:
        """Keep only hypotheses ``rows`` (indices into the current ones), Adam state included.

        The pruned heads stop costing anything: their parameters, gradients and optimiser
        moments are dropped, not zeroed. Adam treats every element on its own, so the kept
        hypotheses continue exactly as if nothing had been removed.
        """
        for name in ('rot0', 'landing0'):
            setattr(self, name, getattr(self, name)[rows])
        for name in ('latent', 'head_weight', 'head_bias'):
            old = getattr(self, name)
            new = nn.Parameter(old.detach()[rows].clone())
            state = optimiser.state.pop(old, None)
            if state is not None:
                optimiser.state[new] = {key: (value[rows].clone() if torch.is_tensor(value)
                                              and value.dim() > 0 else value)
                                        for key, value in state.items()}
            for group in optimiser.param_groups:
                group['params'] = [new if param is old else param for param in group['params']]
            setattr(self, name, new)

    def offsets(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """Return the (axis-angle, translation/scale) offsets (A, 6) of the ``active`` heads."""
        pick = slice(None) if active is None else active
        features = self.backbone(self.latent[pick])
        return (torch.einsum('hb,hbk->hk', features, self.head_weight[pick]) / features.shape[-1]
                + self.head_bias[pick])

    def forward(self, active: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return hypotheses R (A, 3, 3) and t (A, 3), ``p' = R p + t``.

        All hypotheses are returned when ``active`` is None.
        """
        pick = slice(None) if active is None else active
        offset = self.offsets(active)
        rotation = so3_exp(offset[:, :3]) @ self.rot0[pick]
        landing = self.landing0[pick] + offset[:, 3:] * self.translation_scale_mm
        return rotation, landing - rotation @ self.centroid


def robust_cost(field: DistanceField, rotation: torch.Tensor, translation: torch.Tensor,
                points: torch.Tensor, scale_mm: float) -> torch.Tensor:
    """Return each hypothesis's Geman-McClure mean of the UDF, shape (H,), in [0, 1).

    ``rho(d) = d^2 / (d^2 + s^2)``: near-quadratic for small distances, saturating for outliers
    (real ultrasound clouds have a 1-2 % tail beyond 15 mm). On a grid field the cost and its
    gradient come from :class:`_GridPoseCost`; any other field goes through autograd.
    """
    if isinstance(field, GridField):
        return _GridPoseCost.apply(rotation, translation, points, field, scale_mm)
    moved = torch.einsum('hij,nj->hni', rotation, points) + translation[:, None, :]
    sq = field(moved).square()
    return (sq / (sq + scale_mm ** 2)).mean(dim=-1)


class _GridPoseCost(torch.autograd.Function):
    """The robust cost of H poses on a grid field with its analytic gradient, in two GEMMs.

    All poses move the points in one matrix product, (N, 3) @ (3, 3H), and the gradient with
    respect to the rotations is one more, (3H, N) @ (N, 3): no autograd graph over the
    (N, H, 3) moved points, the same values up to float rounding.
    """

    @staticmethod
    def forward(ctx, rotation: torch.Tensor, translation: torch.Tensor,  # noqa: D102
                points: torch.Tensor, grid: GridField, scale_mm: float) -> torch.Tensor:
        count, n = rotation.shape[0], points.shape[0]
        moved = torch.addmm(translation.reshape(1, count * 3), points,
                            rotation.reshape(count * 3, 3).T).reshape(n, count, 3)
        wants_gradient = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        value, gradient = grid.lookup(moved, with_gradient=wants_gradient)
        scale_sq = scale_mm ** 2
        denominator = value.square().add_(scale_sq)
        cost = (1.0 - scale_sq / denominator).mean(dim=0)  # d^2 / (d^2 + s^2)
        if wants_gradient:
            # d cost / d moved = rho'(d) grad d / N, with rho'(d) = 2 s^2 d / (d^2 + s^2)^2.
            slope = value.mul_(2.0 * scale_sq / n).div_(denominator.square_())
            ctx.save_for_backward(gradient.mul_(slope.unsqueeze(-1)), points)
        return cost

    @staticmethod
    def backward(ctx, grad_cost: torch.Tensor):  # noqa: D102
        weighted, points = ctx.saved_tensors
        weighted = weighted * grad_cost[None, :, None]
        count = grad_cost.shape[0]
        grad_rotation = (weighted.reshape(points.shape[0], count * 3).T @ points).reshape(
            count, 3, 3)
        return grad_rotation, weighted.sum(dim=0), None, None, None


@dataclass(frozen=True)
class StageResult:
    """Hypotheses after one optimisation stage, with their final costs."""

    rotation: torch.Tensor
    translation: torch.Tensor
    cost: torch.Tensor
    iterations: int
    converged: bool
    survivors: torch.Tensor
    """Indices (into the stage's hypotheses) of the rows above, after any pruning."""


def optimise(hypotheses: HypothesisSet, field: DistanceField, points: torch.Tensor,
             iterations: int, learning_rate: float, scale_mm: float, tolerance: float,
             track_top: int, prune_every: int = 0, prune_keep: float = 0.5,
             min_survivors: int = 1) -> StageResult:
    """Run Adam on all hypotheses at once; stop early when the best ``track_top`` plateau.

    With ``prune_every`` > 0 the stage does successive halving: every ``prune_every`` steps
    only the best ``prune_keep`` share of the hypotheses (never fewer than ``min_survivors``)
    is kept computing, which spends the budget on the hypotheses that are getting somewhere.
    """
    optimiser = torch.optim.Adam(hypotheses.parameters(), lr=learning_rate, foreach=True)
    survivors = torch.arange(hypotheses.rot0.shape[0], device=hypotheses.rot0.device)
    history: list[float] = []
    converged = False
    done = 0
    for done in range(1, iterations + 1):
        rotation, translation = hypotheses()
        cost = robust_cost(field, rotation, translation, points, scale_mm)
        optimiser.zero_grad(set_to_none=True)
        cost.sum().backward()
        optimiser.step()
        cost = cost.detach()
        if prune_every and done % prune_every == 0 and len(survivors) > min_survivors:
            count = max(int(len(survivors) * prune_keep), min_survivors)
            rows = torch.topk(cost, count, largest=False).indices
            hypotheses.keep(rows, optimiser)
            survivors, cost = survivors[rows], cost[rows]
            history.clear()  # the tracked set changed; restart the plateau test
        if tolerance > 0.0:
            k = min(track_top, cost.numel())
            history.append(float(cost.topk(k, largest=False).values.mean()))
            if len(history) > EARLY_STOP_WINDOW:
                before, now = history[-EARLY_STOP_WINDOW - 1], history[-1]
                if before - now < tolerance * max(before, 1e-12):
                    converged = True
                    break
    with torch.no_grad():
        rotation, translation = hypotheses()
        cost = robust_cost(field, rotation, translation, points, scale_mm)
    return StageResult(rotation.detach(), translation.detach(), cost, done, converged, survivors)
