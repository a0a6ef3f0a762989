"""The batched-matmul attention kernel against the formula softmax(q k^T / sqrt(d) + mask) v."""
from __future__ import annotations

import pytest
import torch
from timm.layers import Attention

from selfflow.components.backbones.attention import BMM_MAX_TOKENS, TokenAttention, batched_matmul_attention
from selfflow.components.backbones.dit import DiT


def reference_attention(q, k, v, scale, mask=None):
    scores = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


def group_mask(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    groups = torch.randint(0, 2, (batch, tokens), generator=generator)
    return (groups.unsqueeze(2) == groups.unsqueeze(1)).unsqueeze(1)  # (B, 1, N, N), as DiT builds it


def qkv_from_projection(batch, heads, tokens, head_dim, generator, dtype=torch.float64):
    """q, k, v as permuted views of one projection output, the layout the attention layer sees."""
    projected = torch.randn(batch, tokens, 3 * heads * head_dim, generator=generator, dtype=dtype,
                            requires_grad=True)
    q, k, v = projected.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return projected, q, k, v


@pytest.mark.parametrize("masked", [False, True])
def test_forward_and_gradients_match_the_formula(masked):
    generator = torch.Generator().manual_seed(0)
    batch, heads, tokens, head_dim = 3, 2, 5, 4
    scale = head_dim ** -0.5
    mask = group_mask(batch, tokens, generator) if masked else None
    upstream = torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float64)

    projected, q, k, v = qkv_from_projection(batch, heads, tokens, head_dim, generator)
    out = batched_matmul_attention(q, k, v, scale, mask)
    (grad,) = torch.autograd.grad(out, projected, upstream)

    projected_ref = projected.detach().clone().requires_grad_(True)
    q, k, v = projected_ref.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    expected = reference_attention(q, k, v, scale, mask)
    (expected_grad,) = torch.autograd.grad(expected, projected_ref, upstream)

    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    if masked:  # a key outside the query's group has no influence
        assert not torch.equal(out, reference_attention(q, k, v, scale).detach())


def test_gradcheck():
    generator = torch.Generator().manual_seed(1)
    _, q, k, v = qkv_from_projection(2, 2, 3, 2, generator)
    mask = group_mask(2, 3, generator)
    assert torch.autograd.gradcheck(lambda q, k, v: batched_matmul_attention(q, k, v, 0.7, mask), (q, k, v))


def copies(kernel_a: str, kernel_b: str, **kwargs) -> tuple[TokenAttention, TokenAttention]:
    # Seeded weights: with unseeded ones, 11 of 300 draws put one float32 gradient entry of the
    # qk-norm layer 1-7e-6 off timm's (rounding, not a kernel error: the float64 tests are exact).
    with torch.random.fork_rng():
        torch.manual_seed(0)
        first = TokenAttention(16, num_heads=4, qkv_bias=True, kernel=kernel_a, **kwargs)
    second = TokenAttention(16, num_heads=4, qkv_bias=True, kernel=kernel_b, **kwargs)
    second.load_state_dict(first.state_dict())
    return first, second


@pytest.mark.parametrize("qk_norm", [False, True])
def test_bmm_kernel_matches_timm_sdpa_layer(qk_norm):
    generator = torch.Generator().manual_seed(2)
    extra = {"qk_norm": True, "norm_layer": torch.nn.LayerNorm} if qk_norm else {}
    bmm, sdpa = copies("bmm", "sdpa", **extra)
    x = torch.randn(3, 7, 16, generator=generator)
    mask = group_mask(3, 7, generator)
    for attn_mask in (None, mask):
        out_bmm = bmm(x, attn_mask=attn_mask)
        out_sdpa = sdpa(x, attn_mask=attn_mask)
        torch.testing.assert_close(out_bmm, out_sdpa, rtol=1e-5, atol=1e-6)
        grads_bmm = torch.autograd.grad(out_bmm.square().sum(), list(bmm.parameters()))
        grads_sdpa = torch.autograd.grad(out_sdpa.square().sum(), list(sdpa.parameters()))
        for a, b in zip(grads_bmm, grads_sdpa):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_picks_bmm_for_short_cpu_calls_with_threads(monkeypatch):
    assert DiT(4, (4, 4), hidden_dim=16, depth=1, num_heads=4).blocks[0].attn.kernel == "sdpa"  # the default
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    layer = TokenAttention(16, num_heads=4, kernel="auto")
    assert layer.uses_bmm(torch.zeros(2, BMM_MAX_TOKENS, 16))
    assert not layer.uses_bmm(torch.zeros(2, BMM_MAX_TOKENS + 1, 16))
    assert not layer.uses_bmm(torch.zeros(2, 4, 16, device="meta"))
    assert layer.uses_bmm(torch.zeros(2, 4, 16, requires_grad=True))  # training, too
    with torch.no_grad():
        assert layer.uses_bmm(torch.zeros(2, 4, 16, requires_grad=True))  # e.g. the EMA teacher
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert not layer.uses_bmm(torch.zeros(2, 4, 16))  # one thread: no gain measured forward-only
    assert not layer.uses_bmm(torch.zeros(2, 4, 16, requires_grad=True))
    assert not TokenAttention(16, num_heads=4, kernel="sdpa").uses_bmm(torch.zeros(2, 4, 16))
    dropout = TokenAttention(16, num_heads=4, kernel="bmm", attn_drop=0.1)
    assert not dropout.uses_bmm(torch.zeros(2, 4, 16))  # training with attention dropout: timm's path
    assert dropout.eval().uses_bmm(torch.zeros(2, 4, 16))


def test_bad_kernel_and_device_are_refused():
    with pytest.raises(ValueError, match="'flash'"):
        TokenAttention(16, num_heads=4, kernel="flash")
    with pytest.raises(ValueError, match="CPU only.*meta"):
        TokenAttention(16, num_heads=4, kernel="bmm")(torch.zeros(2, 4, 16, device="meta"))


def test_state_dict_keys_are_timms():
    assert set(TokenAttention(16, num_heads=4, qkv_bias=True).state_dict()) == \
        set(Attention(16, num_heads=4, qkv_bias=True).state_dict())


def test_bf16_autocast_runs_and_stays_close():
    generator = torch.Generator().manual_seed(3)
    layer = TokenAttention(16, num_heads=4, qkv_bias=True, kernel="bmm")
    x = torch.randn(2, 6, 16, generator=generator, requires_grad=True)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_dit_with_either_kernel_computes_the_same_velocity_and_gradients():
    generator = torch.Generator().manual_seed(4)
    models = {kernel: DiT(4, (4, 4), hidden_dim=32, depth=2, num_heads=4, num_classes=3,
                          attention_kernel=kernel).double() for kernel in ("bmm", "sdpa")}
    for module in models["bmm"].modules():  # non-zero adaLN and output layers, so every path matters
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.2, generator=generator)
    models["sdpa"].load_state_dict(models["bmm"].state_dict())
    x = torch.randn(3, 16, 4, generator=generator, dtype=torch.float64)
    t = torch.rand(3, 16, generator=generator, dtype=torch.float64)
    cond = torch.tensor([0, 1, 3])
    groups = torch.randint(0, 2, (3, 16), generator=generator)
    results = {}
    for kernel, model in models.items():
        velocity = model(x, t, cond, attn_groups=groups).velocity
        results[kernel] = (velocity, torch.autograd.grad(velocity.square().sum(), list(model.parameters())))
    torch.testing.assert_close(results["bmm"][0], results["sdpa"][0], rtol=1e-10, atol=1e-10)
    for a, b in zip(results["bmm"][1], results["sdpa"][1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
