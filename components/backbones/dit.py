"""DiT/SiT transformer velocity model with per-token timestep conditioning.

Every block's adaLN-Zero modulation (shift, scale, gate for attention and MLP)
and the final layer's (shift, scale) come from c = TimeEmb(t) + LabelEmb(cond).
t is (B,) (one level per sample: plain DiT) or (B, N) (one level per token, as
Dual-Timestep Scheduling needs). With per-token t the default path computes the
modulation only for the distinct (sample, level) pairs and gathers it to the
tokens, so its cost does not grow with N.
"""
from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention, Mlp
from torch import nn

from selfflow.components.backbones.attention import TokenAttention
from selfflow.components.backbones.embeddings import (
    LabelEmbedder,
    TimestepEmbedder,
    sincos_position_embedding,
)
from selfflow.components.core import BackboneOutput

# timm's Attention (1.0.31 here) takes a boolean `attn_mask` (True = may attend) on both its
# fused (SDPA) and manual paths, so no wrapper is needed; older releases lack the argument.
_ATTENTION_TAKES_MASK = "attn_mask" in inspect.signature(Attention.forward).parameters


def modulate(x: torch.Tensor, shift: torch.Tensor, one_plus_scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, with (1 + scale) formed per conditioning row, not per token."""
    # Not torch.addcmul: its backward was slower than mul + add's on the CPU (docs/performance.md).
    return x * one_plus_scale + shift


@dataclass
class TokenConditioning:
    """Conditioning rows plus the rule that spreads a per-row result over the (B, N) tokens.

    rows: (R, D) conditioning vectors; R is B (per sample), U (distinct
    (sample, level) pairs, `token_to_row` maps each of the B * N tokens to
    its row) or B * N (per token).
    """

    rows: torch.Tensor
    batch: int
    tokens: int
    per_sample: bool
    token_to_row: torch.Tensor | None = None

    def to_tokens(self, per_row: torch.Tensor) -> torch.Tensor:
        """(R, K) computed from the rows -> tensor broadcastable to (B, N, K)."""
        if self.per_sample:
            return per_row.unsqueeze(1)
        if self.token_to_row is not None:
            # embedding, not index_select: the same gather with the same result, but its backward
            # (a deterministic per-row sum) is cheaper than index_select's index_add (docs/performance.md).
            per_row = F.embedding(self.token_to_row, per_row)
        return per_row.view(self.batch, self.tokens, per_row.shape[-1])

    def modulation(self, per_row: torch.Tensor, parts: int, scale_parts: Sequence[int]) -> list[torch.Tensor]:
        """An adaLN layer's (R, parts * D) output -> `parts` tensors broadcastable to (B, N, D), with
        1 added to the scale parts.

        The "1 +" happens on the R rows, before spreading to tokens, so it costs R * D instead of
        B * N * D per scale; the spreading stays one gather (splitting it per part costs one more
        op per part, each paying an OpenMP thread wake-up on small shapes).
        """
        if not self.per_sample and self.token_to_row is None:  # one row per token: nothing to save
            chunks = list(self.to_tokens(per_row).chunk(parts, dim=-1))
            for index in scale_parts:
                chunks[index] = 1 + chunks[index]
            return chunks
        offset = per_row.new_zeros(parts, per_row.shape[-1] // parts)
        offset[list(scale_parts)] = 1.0
        return list(self.to_tokens(per_row + offset.reshape(-1)).chunk(parts, dim=-1))


@dataclass(frozen=True)
class TokenRoute:
    """The per-layout layers around the shared blocks: what turns tokens of one layout into the
    hidden width and back. A plain DiT has one; MultiModalDiT one per modality."""

    num_tokens: int
    input_projection: nn.Module
    position_embedding: torch.Tensor
    final_layer: nn.Module
    condition_offset: torch.Tensor | None = None  # added to every conditioning row


# The MLP's activation. DiT/SiT use tanh-approximated GELU (keep it to load their weights); exact
# (erf) GELU is the same function to within 5e-4 and was cheaper forward + backward on the CPU build
# we measured (docs/performance.md), so the CPU presets choose it.
MLP_ACTIVATIONS = {"gelu_tanh": partial(nn.GELU, approximate="tanh"), "gelu": nn.GELU}


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero; modulation is given per token."""

    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool,
                 mlp_activation: str = "gelu_tanh", attention_kernel: str = "sdpa") -> None:
        super().__init__()
        if mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(f"mlp_activation must be one of {sorted(MLP_ACTIVATIONS)}, got {mlp_activation!r}")
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.attn = TokenAttention(
            hidden_dim, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm,
            norm_layer=nn.LayerNorm if qk_norm else None, kernel=attention_kernel,
        )
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_dim, hidden_features=int(hidden_dim * mlp_ratio),
                       act_layer=MLP_ACTIVATIONS[mlp_activation])
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 6 * hidden_dim))

    # Positions of the (1 + scale) parts in the adaLN output (shift, scale, gate) x (attention, MLP).
    SCALE_PARTS = (1, 4)

    def forward(self, x: torch.Tensor, modulation: Sequence[torch.Tensor], attn_mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, N, D); modulation: shift, 1 + scale, gate for attention then MLP, each broadcastable
        to (B, N, D) (TokenConditioning.modulation); attn_mask (B, 1, N, N) bool or None."""
        shift_attn, one_plus_scale_attn, gate_attn, shift_mlp, one_plus_scale_mlp, gate_mlp = modulation
        attended = modulate(self.norm1(x), shift_attn, one_plus_scale_attn)
        attended = self.attn(attended) if attn_mask is None else self.attn(attended, attn_mask=attn_mask)
        x = x + gate_attn * attended
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, one_plus_scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) per token, then a linear map back to the token dimension."""

    def __init__(self, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, out_dim)

    SCALE_PARTS = (1,)

    def forward(self, x: torch.Tensor, modulation: Sequence[torch.Tensor]) -> torch.Tensor:
        """modulation: shift and 1 + scale, each broadcastable to (B, N, D)."""
        shift, one_plus_scale = modulation
        return self.linear(modulate(self.norm(x), shift, one_plus_scale))


class DiT(nn.Module):
    """Transformer velocity model on tokens (B, N, in_dim), N = prod(grid).

    forward(x, t, cond, *, return_layers, stop_at, attn_groups) -> BackboneOutput
      t: (B,) or (B, N) levels in [0, 1] (not range-checked: that would force a device sync).
      cond: (B,) integer labels in [0, num_classes] (num_classes = CFG null class), or
        None when num_classes == 0.
      return_layers: 1-based blocks whose outputs go into `hidden`.
      stop_at: run blocks 1..stop_at only; velocity is None and hidden[stop_at] is included.
      attn_groups: (B, N) integer ids; a token attends only to tokens with its id.
    attention_kernel: "sdpa" (default), "auto" or "bmm" (components/backbones/attention.py).
    """

    def __init__(
        self,
        in_dim: int,
        grid: tuple[int, ...],
        hidden_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        gathered_modulation: bool = True,
        qk_norm: bool = False,
        mlp_activation: str = "gelu_tanh",
        attention_kernel: str = "sdpa",
    ) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("depth", depth),
                            ("num_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")

        self.in_dim = in_dim
        self.grid = tuple(grid)
        self.hidden_dim = hidden_dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.num_tokens = math.prod(self.grid)
        self.gathered_modulation = gathered_modulation

        self.input_projection = nn.Linear(in_dim, hidden_dim)
        self.register_buffer("position_embedding", sincos_position_embedding(self.grid, hidden_dim),
                             persistent=False)
        self.time_embedder = TimestepEmbedder(hidden_dim)
        self.label_embedder = LabelEmbedder(num_classes, hidden_dim) if num_classes > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, num_heads, mlp_ratio, qk_norm, mlp_activation,
                                             attention_kernel) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_dim, in_dim)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """DiT's scheme: xavier linears, N(0, 0.02) embeddings, zero adaLN and output (adaLN-Zero).

        Pass a generator for an initialisation that does not touch the global RNG.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight, generator=generator)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for layer in self.time_embedder.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=0.02, generator=generator)
        if self.label_embedder is not None:
            nn.init.normal_(self.label_embedder.table.weight, std=0.02, generator=generator)
        zero_linears = [block.ada_ln[-1] for block in self.blocks]
        for final_layer in self.final_layers_all():
            zero_linears += [final_layer.ada_ln[-1], final_layer.linear]
        for linear in zero_linears:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    # ----- input checks -------------------------------------------------------------------------

    def final_layers_all(self) -> list["FinalLayer"]:
        """Every output layer (one here; one per modality in MultiModalDiT)."""
        return [self.final_layer]

    def route(self, x: torch.Tensor) -> TokenRoute:
        """The layers around the shared blocks for tokens shaped like x."""
        if x.dim() != 3 or x.shape[1:] != (self.num_tokens, self.in_dim):
            raise ValueError(
                f"x must be (B, {self.num_tokens}, {self.in_dim}) for grid {self.grid}, got {tuple(x.shape)}"
            )
        return TokenRoute(self.num_tokens, self.input_projection, self.position_embedding, self.final_layer)

    def _check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, tokens: int) -> None:
        batch = x.shape[0]
        if t.shape not in ((batch,), (batch, tokens)):
            raise ValueError(f"t must be ({batch},) or ({batch}, {tokens}), got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"t must be a float tensor of levels in [0, 1], got dtype {t.dtype}")
        if self.num_classes == 0 and cond is not None:
            raise ValueError("cond was given but the model is unconditional (num_classes=0)")
        if self.num_classes > 0:
            if cond is None:
                raise ValueError(
                    f"cond is required (num_classes={self.num_classes}); pass {self.num_classes} for the null class"
                )
            if cond.shape != (batch,):
                raise ValueError(f"cond must be ({batch},), got {tuple(cond.shape)}")

    def _check_layers(self, return_layers: Sequence[int], stop_at: int | None) -> int:
        """Returns the number of blocks to run."""
        def valid(k: object) -> bool:
            return isinstance(k, numbers.Integral) and not isinstance(k, bool) and 1 <= k <= self.depth

        if stop_at is not None and not valid(stop_at):
            raise ValueError(f"stop_at must be a block index in 1..{self.depth}, got {stop_at!r}")
        last = self.depth if stop_at is None else stop_at
        for k in return_layers:
            if not valid(k):
                raise ValueError(f"return_layers entry {k!r} is not a block index in 1..{self.depth}")
            if k > last:
                raise ValueError(f"return_layers entry {k} lies beyond stop_at={stop_at}")
        return last

    def _attention_mask(self, attn_groups: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor | None:
        if attn_groups is None:
            return None
        if attn_groups.shape != (batch, tokens):
            raise ValueError(f"attn_groups must be ({batch}, {tokens}), got {tuple(attn_groups.shape)}")
        if attn_groups.dtype.is_floating_point or attn_groups.dtype.is_complex:
            raise TypeError(f"attn_groups must hold integer group ids, got dtype {attn_groups.dtype}")
        if not _ATTENTION_TAKES_MASK:
            raise RuntimeError("attn_groups needs a timm whose Attention.forward takes attn_mask; upgrade timm")
        # (B, 1, N, N), True where query and key share a group; broadcast over heads.
        return (attn_groups.unsqueeze(2) == attn_groups.unsqueeze(1)).unsqueeze(1)

    # ----- conditioning -------------------------------------------------------------------------

    def conditioning(self, t: torch.Tensor, cond: torch.Tensor | None, tokens: int | None = None,
                     offset: torch.Tensor | None = None) -> TokenConditioning:
        """Builds c = TimeEmb(t) + LabelEmb(cond) (+ `offset`, a (D,) vector such as a modality
        embedding) at the granularity the modulation needs."""
        batch = t.shape[0]
        labels = None if self.label_embedder is None else self.label_embedder(cond)
        if offset is not None:
            labels = offset.expand(batch, -1) if labels is None else labels + offset
        if t.dim() == 1:
            rows = self.time_embedder(t)
            if labels is not None:
                rows = rows + labels
            return TokenConditioning(rows, batch, tokens or self.num_tokens, per_sample=True)

        tokens = t.shape[1]
        if not self.gathered_modulation:
            rows = self.time_embedder(t)
            if labels is not None:
                rows = rows + labels.unsqueeze(1)
            return TokenConditioning(rows.reshape(batch * tokens, -1), batch, tokens, per_sample=False)

        # One int64 key per token: sample index in the high 32 bits, the float32 bit pattern of its
        # level in the low 32 (exact, unlike sample + t, which rounds tiny levels away). The time
        # embedder casts t to float32, so equal keys mean equal embeddings.
        levels = t.float().reshape(-1)
        sample_index = torch.arange(batch, device=t.device).repeat_interleave(tokens)
        level_bits = levels.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        keys, token_to_row = torch.unique((sample_index << 32) | level_bits, return_inverse=True)
        row_levels = levels.new_empty(keys.shape[0]).scatter_(0, token_to_row, levels)
        rows = self.time_embedder(row_levels)
        if labels is not None:
            rows = rows + labels.index_select(0, keys >> 32)
        return TokenConditioning(rows, batch, tokens, per_sample=False, token_to_row=token_to_row)

    # ----- forward ------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        *,
        return_layers: Sequence[int] = (),
        stop_at: int | None = None,
        attn_groups: torch.Tensor | None = None,
    ) -> BackboneOutput:
        route = self.route(x)
        self._check_inputs(x, t, cond, route.num_tokens)
        last_block = self._check_layers(return_layers, stop_at)
        wanted = set(return_layers)
        if stop_at is not None:
            wanted.add(stop_at)
        attn_mask = self._attention_mask(attn_groups, x.shape[0], route.num_tokens)

        conditioning = self.conditioning(t, cond, route.num_tokens, route.condition_offset)
        h = route.input_projection(x) + route.position_embedding.to(x.dtype)
        hidden: dict[int, torch.Tensor] = {}
        for index, block in enumerate(self.blocks[:last_block], start=1):
            modulation = conditioning.modulation(block.ada_ln(conditioning.rows), 6, block.SCALE_PARTS)
            h = block(h, modulation, attn_mask)
            if index in wanted:
                hidden[index] = h
        if stop_at is not None:
            return BackboneOutput(velocity=None, hidden=hidden)
        final = route.final_layer
        velocity = final(h, conditioning.modulation(final.ada_ln(conditioning.rows), 2, final.SCALE_PARTS))
        return BackboneOutput(velocity=velocity, hidden=hidden)
