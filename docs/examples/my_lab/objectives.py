"""Flow matching with a pseudo-Huber loss on the velocity (as in improved consistency training):
sqrt(||v_pred - v||^2 + c^2) - c per token, less sensitive to outliers than the squared error."""
from __future__ import annotations

import gin
import torch
from torch import nn

from selfflow.components.core import Batch, LossTerms
from selfflow.components.objectives.common import draw_noise, drop_labels
from selfflow.components.paths.linear import LinearPath


@gin.register(module="my_lab")
class PseudoHuberFlowObjective(nn.Module):
    """One level t ~ p(t) per sample; loss terms 'flow' (pseudo-Huber, optimised) and 'mse'
    (the squared error, logged for comparison with plain flow matching, weight 0)."""

    def __init__(self, time_dist, c: float = 0.03, label_dropout: float = 0.1, num_classes: int = 0):
        super().__init__()
        if c <= 0:
            raise ValueError(f"PseudoHuberFlowObjective.c must be positive, got {c}")
        self.time_dist, self.c = time_dist, float(c)
        self.label_dropout, self.num_classes = label_dropout, num_classes
        self.path = LinearPath()

    def forward(self, batch: Batch, model: nn.Module, teacher: nn.Module | None,
                generator: torch.Generator) -> LossTerms:
        x0 = batch.x0
        t = self.time_dist.sample((x0.shape[0],), generator).to(x0.device)
        eps = draw_noise(x0, generator)
        cond = drop_labels(batch.cond, self.label_dropout, self.num_classes, generator)
        error = model(self.path.interpolate(x0, eps, t), t, cond).velocity - self.path.velocity_target(x0, eps)
        squared = error.square().sum(dim=-1)  # per token
        huber = (squared + self.c ** 2).sqrt() - self.c
        return LossTerms(terms={"flow": huber.mean(), "mse": squared.mean() / x0.shape[-1]},
                         weights={"flow": 1.0, "mse": 0.0})
