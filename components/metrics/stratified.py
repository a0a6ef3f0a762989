"""Held-out flow loss stratified by timestep: where along the path does a model err?

Buckets split [0, 1] into equal intervals; every held-out sample is evaluated
once per bucket at a t drawn uniformly inside it, so every bucket holds the same
number of draws and the mean of the bucket means is a stratified estimate of
E_{t ~ U[0, 1]} || f(x_t, t, y) - (eps - x0) ||^2 (the training loss only when
training used uniform t).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from selfflow.components.core import module_device
from selfflow.components.paths.linear import LinearPath


def bucket_edges(num_buckets: int) -> torch.Tensor:
    """num_buckets + 1 equally spaced edges from 0 to 1."""
    if isinstance(num_buckets, bool) or not isinstance(num_buckets, int) or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}")
    return torch.linspace(0.0, 1.0, num_buckets + 1, dtype=torch.float64)


@dataclass
class StratifiedLoss:
    """Per-bucket mean losses; bucket i covers [edges[i], edges[i + 1]) (the last one includes 1)."""

    edges: torch.Tensor
    means: torch.Tensor
    counts: torch.Tensor
    overall: float

    @property
    def centres(self) -> torch.Tensor:
        return (self.edges[:-1] + self.edges[1:]) / 2


def bucketize_losses(t: torch.Tensor, losses: torch.Tensor, num_buckets: int) -> StratifiedLoss:
    """Group per-draw losses by the bucket of their t; `overall` is the plain mean of all draws.

    An empty bucket has mean NaN and count 0 (the counts-weighted mean of the
    non-empty buckets equals `overall`).
    """
    t, losses = t.detach().double().reshape(-1), losses.detach().double().reshape(-1)
    if t.shape != losses.shape or t.numel() == 0:
        raise ValueError(f"need one loss per t (> 0 draws), got {t.numel()} levels and {losses.numel()} losses")
    if bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"levels must lie in [0, 1], got range [{float(t.min())}, {float(t.max())}]")
    edges = bucket_edges(num_buckets)
    index = torch.clamp((t * num_buckets).floor().long(), max=num_buckets - 1)  # t = 1 joins the last bucket
    counts = torch.bincount(index, minlength=num_buckets)
    sums = torch.zeros(num_buckets, dtype=torch.float64).index_add_(0, index, losses)
    means = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return StratifiedLoss(edges=edges, means=means, counts=counts, overall=float(losses.mean()))


@torch.no_grad()
def stratified_flow_loss(
    model: nn.Module,
    tokens: torch.Tensor,
    cond: torch.Tensor | None,
    generator: torch.Generator,
    num_buckets: int = 10,
    draws_per_bucket: int = 1,
    batch_size: int = 512,
) -> StratifiedLoss:
    """Flow loss of `model` on held-out clean tokens (M, N, P), stratified over t.

    cond: (M,) labels for a class-conditional model (the conditional loss, no
    label dropout), or None. Draw order from `generator`, per bucket and draw:
    t (M,), then eps (M, N, P), on the generator's device. Each batch runs on the
    model's device; the result is on the CPU.
    """
    if draws_per_bucket < 1:
        raise ValueError(f"draws_per_bucket must be >= 1, got {draws_per_bucket}")
    edges = bucket_edges(num_buckets)
    path = LinearPath()
    was_training = model.training
    model.eval()
    device = module_device(model)
    all_t, all_losses = [], []
    for bucket in range(num_buckets):
        low, width = float(edges[bucket]), float(edges[bucket + 1] - edges[bucket])
        for _ in range(draws_per_bucket):
            t = low + width * torch.rand(tokens.shape[0], generator=generator, device=generator.device)
            eps = torch.randn(tokens.shape, generator=generator, device=generator.device)
            for start in range(0, tokens.shape[0], batch_size):
                stop = start + batch_size
                x0 = tokens[start:stop].to(device).float()
                noise, level = eps[start:stop].to(device), t[start:stop].to(device)
                labels = cond[start:stop].to(device) if cond is not None else None
                velocity = model(path.interpolate(x0, noise, level), level, labels).velocity
                target = path.velocity_target(x0, noise)
                all_losses.append((velocity.float() - target).square().flatten(1).mean(dim=1).cpu())
            all_t.append(t.cpu())
    model.train(was_training)
    return bucketize_losses(torch.cat(all_t), torch.cat(all_losses), num_buckets)
