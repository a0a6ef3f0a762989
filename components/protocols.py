"""The seams: the interfaces the engine's trainer, sampler and evaluation are typed with.

Components satisfy them structurally: a researcher's own tokenizer, backbone, objective or sampler
needs no base class, only these methods and attributes (docs/extending.md).
Time convention: x_t = (1 - t) x0 + t eps, t = 0 data, t = 1 noise, v = eps - x0.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from selfflow.components.core import BackboneOutput, Batch, LossTerms

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(x_t of shape (B, N, P), t of shape (B,)) -> velocity (B, N, P)."""


class Tokenizer(Protocol):
    """Maps raw data (images (B,C,H,W), audio (B,C,T), video (B,C,F,H,W)) to tokens.

    encode: raw -> tokens (B, N, P); decode: tokens -> raw. The tokenizer owns its
    normalisation statistics. `latent_shape` is the latent tensor before
    patchifying, e.g. (C, H, W); `token_shape` is (N, P); `grid` is the token grid
    the backbone's positional embedding needs, e.g. (H/p, W/p) or (T/p,).
    """

    latent_shape: tuple[int, ...]
    token_shape: tuple[int, int]
    grid: tuple[int, ...]

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor: ...


class Backbone(Protocol):
    """A transformer velocity model with per-token timestep conditioning.

    t is (B,) (one level per sample) or (B, N) (one level per token).
    return_layers: 1-based block indices whose outputs are returned in `hidden`.
    stop_at: run blocks 1..stop_at only; velocity is then None.
    """

    depth: int
    hidden_dim: int
    num_classes: int

    def __call__(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None,
        *,
        return_layers: Sequence[int] = (),
        stop_at: int | None = None,
        attn_groups: torch.Tensor | None = None,
    ) -> BackboneOutput: ...


class TimeDistribution(Protocol):
    """p(t) on [0, 1]; every draw takes an explicit generator."""

    def sample(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor: ...


class Objective(Protocol):
    """Turns a batch into named loss terms. It is an nn.Module: its own
    parameters (projector heads) are trained with the backbone; frozen external
    encoders have requires_grad False. `teacher` is the EMA backbone (no grad)."""

    def __call__(
        self,
        batch: Batch,
        model: nn.Module,
        teacher: nn.Module | None,
        generator: torch.Generator,
    ) -> LossTerms: ...


class Sampler(Protocol):
    """Integrates a velocity field along an explicit decreasing time grid (1 -> 0)."""

    def __call__(
        self,
        velocity: VelocityFn,
        noise: torch.Tensor,
        grid: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor: ...
