"""A per-token MLP velocity model with adaLN conditioning and no attention: a baseline that shows
how much of a result the transformer's token mixing carries. It satisfies the Backbone seam
(components/protocols.py): forward(x, t, cond, *, return_layers, stop_at, attn_groups)."""
from __future__ import annotations

import gin
import torch
from torch import nn

from selfflow.components.backbones.embeddings import LabelEmbedder, TimestepEmbedder
from selfflow.components.core import BackboneOutput


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.modulation = nn.Linear(width, 3 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(c).chunk(3, dim=-1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


@gin.register(module="my_lab")
class TokenMLP(nn.Module):
    """Tokens (B, N, in_dim) -> velocity (B, N, in_dim); t is (B,) or per token (B, N)."""

    def __init__(self, in_dim: int, grid: tuple, num_classes: int = 0, hidden_dim: int = 64, depth: int = 4):
        super().__init__()
        self.in_dim, self.hidden_dim, self.depth, self.num_classes = in_dim, hidden_dim, depth, num_classes
        self.num_tokens = 1
        for size in grid:
            self.num_tokens *= int(size)
        self.embed = nn.Linear(in_dim, hidden_dim)
        self.position = nn.Parameter(torch.zeros(1, self.num_tokens, hidden_dim))
        self.time = TimestepEmbedder(hidden_dim)
        self.label = LabelEmbedder(num_classes, hidden_dim) if num_classes else None
        self.blocks = nn.ModuleList(_Block(hidden_dim) for _ in range(depth))
        self.out = nn.Linear(hidden_dim, in_dim)

    def forward(self, x, t, cond=None, *, return_layers=(), stop_at=None, attn_groups=None) -> BackboneOutput:
        del attn_groups  # no attention to separate
        t = t if t.dim() == 2 else t[:, None].expand(-1, x.shape[1])
        c = self.time(t.reshape(-1)).reshape(*t.shape, -1)
        if self.label is not None and cond is not None:
            c = c + self.label(cond)[:, None, :]
        h = self.embed(x) + self.position
        hidden = {}
        for index, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if index in return_layers:
                hidden[index] = h
            if stop_at == index:
                return BackboneOutput(velocity=None, hidden=hidden)
        return BackboneOutput(velocity=self.out(h), hidden=hidden)
