"""Multi-head self-attention for the DiT blocks: timm's Attention plus an optional batched-matmul kernel
for short sequences on the CPU.

Why a hand-written kernel: on tiny shapes (16 tokens, head dim 24, hundreds of sample x head pairs)
PyTorch's CPU scaled_dot_product_attention parallelises poorly over several threads, and timm's unfused
`q @ k^T` path is slow backward, because bmm falls back to one small matmul per (sample, head) when the
incoming gradient is a permuted view. Plain bmm on contiguous (groups, N, d) tensors, backward written
out, was faster on a shared 2-core VM with more than one thread and no faster with one (figures:
BENCHMARKS.md, compute efficiency). "sdpa" (PyTorch's kernel, the default) is used unless a config opts
in: "auto" runs bmm on the CPU with more than one thread for at most BMM_MAX_TOKENS tokens (the
`cpu_shared` host preset selects it), "bmm" forces it.
"""
from __future__ import annotations

import torch
from timm.layers import Attention

from selfflow.components.core import has_spare_cpu_threads

ATTENTION_KERNELS = ("auto", "sdpa", "bmm")
# Longest sequence "auto" sends to the bmm kernel (beyond it SDPA was faster in per-call measurements).
BMM_MAX_TOKENS = 64


class _BatchedMatmulAttention(torch.autograd.Function):
    """softmax(q k^T * scale + mask) v on (G, N, d) tensors, G = batch x heads; mask (G, N, N) bool
    (True = may attend) or None. The backward is the textbook one and keeps every operand contiguous."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, q, k, v, mask, scale: float):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        weights = scores.softmax(dim=-1)
        ctx.save_for_backward(q, k, v, weights)
        ctx.scale = scale
        return torch.bmm(weights, v)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_out):
        q, k, v, weights = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_v = torch.bmm(weights.transpose(1, 2), grad_out)
        grad_weights = torch.bmm(grad_out, v.transpose(1, 2))
        # Softmax backward; masked entries have weight 0, so they get no gradient.
        grad_scores = weights * (grad_weights - (grad_weights * weights).sum(dim=-1, keepdim=True))
        grad_scores.mul_(ctx.scale)
        grad_q = torch.bmm(grad_scores, k)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q)
        return grad_q, grad_k, grad_v, None, None


def batched_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, N, d) q, k, v -> (B, H, N, d); mask broadcastable to (B, H, N, N), bool, True = may attend."""
    batch, heads, tokens, head_dim = q.shape
    groups = batch * heads
    if mask is not None:
        mask = mask.expand(batch, heads, tokens, tokens).reshape(groups, tokens, tokens)
    out = _BatchedMatmulAttention.apply(q.reshape(groups, tokens, head_dim), k.reshape(groups, tokens, head_dim),
                                        v.reshape(groups, tokens, head_dim), mask, scale)
    return out.view(batch, heads, tokens, head_dim)


class TokenAttention(Attention):
    """timm's Attention (same parameters and state-dict keys, so DiT/SiT weights load) with a choice of
    kernel: "sdpa" (the default, timm's path), "auto" (see the module docstring) or "bmm"
    (batched_matmul_attention, CPU only). Attention dropout and timm's gated and scale-norm options always
    take timm's path."""

    def __init__(self, *args, kernel: str = "sdpa", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if kernel not in ATTENTION_KERNELS:
            raise ValueError(f"attention kernel must be one of {ATTENTION_KERNELS}, got {kernel!r}")
        self.kernel = kernel

    def uses_bmm(self, x: torch.Tensor) -> bool:
        if self.kernel == "sdpa" or self.gate is not None or not isinstance(self.norm, torch.nn.Identity):
            return False
        if self.training and self.attn_drop.p > 0:
            return False
        if self.kernel == "bmm":
            if x.device.type != "cpu":
                raise ValueError(f"attention kernel 'bmm' runs on the CPU only, got a tensor on {x.device}; "
                                 f"use 'auto' or 'sdpa'")
            return True
        return x.shape[1] <= BMM_MAX_TOKENS and has_spare_cpu_threads(x.device)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if is_causal or not self.uses_bmm(x):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = batched_matmul_attention(q, k, v, self.scale, attn_mask)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, tokens, self.attn_dim)))

    def extra_repr(self) -> str:
        return f"kernel={self.kernel!r}"
