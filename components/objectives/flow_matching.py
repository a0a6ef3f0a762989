"""Vanilla flow matching: L_gen = mean || f(x_t, t, y) - (eps - x0) ||^2 on the linear path."""
from __future__ import annotations

import torch
from torch import nn

from selfflow.components.core import Batch, LossTerms
from selfflow.components.objectives.common import (
    check_generator,
    check_model_matches,
    check_num_classes,
    check_probability,
    draw_noise,
    drop_labels,
    flow_matching_loss,
)
from selfflow.components.paths.linear import LinearPath
from selfflow.components.schedules.dual import TimeDistribution


class FlowMatchingObjective(nn.Module):
    """One level t ~ p(t) per sample, all tokens at t; no teacher.

    Draw order from the generator: t (B,), eps (B, N, P), label-dropout uniforms (B,).
    num_classes: the backbone's class count (0 = unconditional); dropped labels
    become the null class `num_classes` with probability `label_dropout`.
    """

    def __init__(self, time_dist: TimeDistribution, label_dropout: float = 0.1, num_classes: int = 0) -> None:
        super().__init__()
        if not callable(getattr(time_dist, "sample", None)):
            raise TypeError(f"time_dist must have sample(shape, generator), got {type(time_dist).__name__}")
        self.time_dist = time_dist
        self.label_dropout = check_probability("label_dropout", label_dropout)
        self.num_classes = check_num_classes(num_classes)
        self.path = LinearPath()

    def forward(self, batch: Batch, model: nn.Module, teacher: nn.Module | None,
                generator: torch.Generator) -> LossTerms:
        del teacher  # vanilla flow matching has none
        check_generator(generator)
        check_model_matches(model, None, None, self.num_classes)
        x0 = batch.x0
        t = self.time_dist.sample((x0.shape[0],), generator).to(device=x0.device, dtype=torch.float32)
        eps = draw_noise(x0, generator)
        cond = drop_labels(batch.cond, self.label_dropout, self.num_classes, generator)
        prediction = model(self.path.interpolate(x0, eps, t), t, cond).velocity
        flow = flow_matching_loss(prediction, self.path.velocity_target(x0, eps))
        return LossTerms(terms={"flow": flow}, weights={"flow": 1.0},
                         diagnostics={"t_mean": t.detach().float().mean()})
