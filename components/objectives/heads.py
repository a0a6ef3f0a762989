"""Projector heads on student features (trained with the objective, dropped at inference)."""
from __future__ import annotations

import torch
from torch import nn

HEAD_KINDS = ("two_layer", "repa")
REPA_HIDDEN_WIDTH = 2048  # REPA's projector width


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ProjectorHead(nn.Module):
    """Token-wise MLP (..., dim_in) -> (..., dim_out).

    kind "two_layer" (official Self-Flow): Linear(D, W) -> SiLU -> Linear(W, D_out), W = 2 D.
    kind "repa" (REPA): Linear(D, W) -> SiLU -> Linear(W, W) -> SiLU -> Linear(W, D_out), W = 2048.
    hidden_width overrides W. PyTorch's default Linear init (as both references use).
    """

    def __init__(self, dim_in: int, dim_out: int, kind: str = "two_layer", hidden_width: int | None = None) -> None:
        super().__init__()
        _positive_int("dim_in", dim_in)
        _positive_int("dim_out", dim_out)
        if kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {kind!r}")
        if hidden_width is None:
            hidden_width = 2 * dim_in if kind == "two_layer" else REPA_HIDDEN_WIDTH
        _positive_int("hidden_width", hidden_width)
        self.kind = kind
        self.dim_in, self.dim_out, self.hidden_width = dim_in, dim_out, hidden_width
        layers: list[nn.Module] = [nn.Linear(dim_in, hidden_width), nn.SiLU()]
        if kind == "repa":
            layers += [nn.Linear(hidden_width, hidden_width), nn.SiLU()]
        layers.append(nn.Linear(hidden_width, dim_out))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.dim_in:
            raise ValueError(f"projector expects features of width {self.dim_in}, got {tuple(features.shape)}")
        return self.mlp(features)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim_in={self.dim_in}, hidden_width={self.hidden_width}, dim_out={self.dim_out}"
