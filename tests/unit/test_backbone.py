"""DiT backbone: per-token conditioning paths agree with each other and with a formula-level reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from selfflow.components.backbones import (
    DIT_SIZES,
    DiT,
    count_parameters,
    dit_from_size,
    sincos_position_embedding,
)

torch.set_num_threads(1)

GRID = (3, 4)
IN_DIM = 5
NUM_CLASSES = 7
BATCH = 4
N = math.prod(GRID)


def make_model(seed: int = 0, grid: tuple[int, ...] = GRID, num_classes: int = NUM_CLASSES, randomise: bool = True,
               **options) -> DiT:
    model = DiT(in_dim=IN_DIM, grid=grid, hidden_dim=48, depth=3, num_heads=4, num_classes=num_classes, **options)
    generator = torch.Generator().manual_seed(seed)
    model.reset_parameters(generator)
    if randomise:
        randomise_zero_init(model, generator)
    return model.eval()


def randomise_zero_init(model: DiT, generator: torch.Generator) -> None:
    """adaLN-Zero leaves outputs at 0; random modulation and a strong time embedding make equalities meaningful."""
    linears = [block.ada_ln[-1] for block in model.blocks]
    linears += [model.final_layer.ada_ln[-1], model.final_layer.linear]
    linears += [layer for layer in model.time_embedder.mlp if isinstance(layer, torch.nn.Linear)]
    with torch.no_grad():
        for linear in linears:
            torch.nn.init.normal_(linear.weight, std=0.15, generator=generator)
            torch.nn.init.normal_(linear.bias, std=0.1, generator=generator)


def inputs(seed: int, grid: tuple[int, ...] = GRID, batch: int = BATCH):
    generator = torch.Generator().manual_seed(seed)
    tokens = math.prod(grid)
    x = torch.randn(batch, tokens, IN_DIM, generator=generator)
    t = torch.rand(batch, generator=generator)
    labels = torch.randint(0, NUM_CLASSES + 1, (batch,), generator=generator)
    return x, t, labels, generator


def two_level_t(batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    t = torch.rand(batch, 1, generator=generator)
    s = torch.rand(batch, 1, generator=generator)
    mask = torch.rand(batch, tokens, generator=generator) < 0.25
    return torch.where(mask, s, t)


# ----- formula-level reference (independent of the module's forward code) -----------------------

def reference_position_2d(height: int, width: int, dim: int) -> torch.Tensor:
    pairs = dim // 4
    omega = 10000.0 ** (-torch.arange(pairs, dtype=torch.float64) / pairs)
    rows = []
    for i in range(height):
        for j in range(width):
            rows.append(torch.cat([torch.sin(i * omega), torch.cos(i * omega),
                                   torch.sin(j * omega), torch.cos(j * omega)]))
    return torch.stack(rows).float()


def reference_forward(model: DiT, x, t, labels, attn_groups=None, gelu_approximate="tanh"):
    """Plain per-token DiT written from the equations; returns (velocity, [h_1, ..., h_depth])."""
    batch, tokens, _ = x.shape
    levels = t if t.dim() == 2 else t[:, None].expand(batch, tokens)
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = 1000.0 * levels[..., None] * freqs
    features = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    first, _, second = model.time_embedder.mlp
    c = second(F.silu(first(features)))
    if labels is not None:
        c = c + model.label_embedder.table.weight[labels][:, None, :]

    def layer_norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    h = model.input_projection(x) + reference_position_2d(*GRID, model.hidden_dim)
    heads = model.num_heads
    head_dim = model.hidden_dim // heads
    hidden = []
    for block in model.blocks:
        linear = block.ada_ln[-1]
        modulation = F.linear(F.silu(c), linear.weight, linear.bias)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = modulation.chunk(6, -1)
        a = layer_norm(h) * (1 + scale_a) + shift_a
        q, k, v = block.attn.qkv(a).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if attn_groups is not None:
            same = attn_groups[:, None, :, None] == attn_groups[:, None, None, :]
            scores = scores.masked_fill(~same, float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, tokens, -1)
        h = h + gate_a * block.attn.proj(attended)
        m = layer_norm(h) * (1 + scale_m) + shift_m
        h = h + gate_m * block.mlp.fc2(F.gelu(block.mlp.fc1(m), approximate=gelu_approximate))
        hidden.append(h)
    linear = model.final_layer.ada_ln[-1]
    shift, scale = F.linear(F.silu(c), linear.weight, linear.bias).chunk(2, -1)
    velocity = model.final_layer.linear(layer_norm(h) * (1 + scale) + shift)
    return velocity, hidden


# ----- tests -------------------------------------------------------------------------------------

def test_untrained_model_outputs_zeros():
    model = make_model(randomise=False)
    x, t, labels, _ = inputs(0)
    out = model(x, t, labels)
    assert out.velocity.shape == x.shape
    assert torch.count_nonzero(out.velocity) == 0


def test_position_embedding_matches_formula_and_is_a_buffer():
    model = make_model()
    expected = reference_position_2d(*GRID, model.hidden_dim)
    torch.testing.assert_close(model.position_embedding, expected, atol=1e-6, rtol=0)
    assert "position_embedding" not in dict(model.named_parameters())
    one_d = sincos_position_embedding((6,), 8)
    omega = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    pos = torch.arange(6, dtype=torch.float64)[:, None] * omega
    torch.testing.assert_close(one_d, torch.cat([pos.sin(), pos.cos()], -1).float())
    three_d = sincos_position_embedding((2, 3, 4), 48)
    assert three_d.shape == (24, 48)
    assert torch.unique(three_d, dim=0).shape[0] == 24  # every token has its own position


@pytest.mark.parametrize("per_token", [False, True])
def test_matches_formula_level_reference(per_token):
    model = make_model(seed=1)
    x, t, labels, generator = inputs(1)
    if per_token:
        t = two_level_t(BATCH, N, generator)
    expected_velocity, expected_hidden = reference_forward(model, x, t, labels)
    out = model(x, t, labels, return_layers=(1, 2, 3))
    torch.testing.assert_close(out.velocity, expected_velocity, atol=1e-5, rtol=1e-5)
    for k in (1, 2, 3):
        torch.testing.assert_close(out.hidden[k], expected_hidden[k - 1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gathered", [True, False])
def test_exact_gelu_option_matches_the_reference_and_differs_from_tanh(gathered):
    model = make_model(seed=1, mlp_activation="gelu", gathered_modulation=gathered)
    x, _, labels, generator = inputs(1)
    t = two_level_t(BATCH, N, generator)
    expected_velocity, _ = reference_forward(model, x, t, labels, gelu_approximate="none")
    velocity = model(x, t, labels).velocity
    torch.testing.assert_close(velocity, expected_velocity, atol=1e-5, rtol=1e-5)
    tanh_velocity, _ = reference_forward(model, x, t, labels, gelu_approximate="tanh")
    assert not torch.allclose(velocity, tanh_velocity, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="mlp_activation must be one of"):
        make_model(mlp_activation="relu")


def test_digits_preset_uses_exact_gelu_and_imagenet_presets_keep_dits():
    import gin

    from selfflow.platform.config import bootstrap as gin_config

    def activations(preset: str) -> set[str]:
        gin_config.parse([preset], finalize=False)
        model = gin.get_configurable("DiT")(in_dim=4, grid=(2, 2), num_classes=10)
        return {module.approximate for module in model.modules() if isinstance(module, torch.nn.GELU)}

    assert activations("backbones/dit_tiny.gin") == {"none"}
    assert activations("backbones/dit_S.gin") == {"tanh"}
    gin.clear_config()


@pytest.mark.parametrize("gathered", [True, False])
def test_scalar_t_equals_expanded_t(gathered):
    model = make_model(seed=2, gathered_modulation=gathered)
    x, t, labels, _ = inputs(2)
    scalar = model(x, t, labels).velocity
    expanded = model(x, t[:, None].expand(BATCH, N), labels).velocity
    torch.testing.assert_close(expanded, scalar, atol=1e-5, rtol=0)
    assert scalar.abs().max() > 1e-2  # the comparison is not between zeros


@pytest.mark.parametrize("levels", ["two_per_sample", "random_per_token"])
def test_gathered_equals_naive(levels):
    model = make_model(seed=3)
    x, t_scalar, labels, generator = inputs(3)
    if levels == "two_per_sample":
        t = two_level_t(BATCH, N, generator)
    else:
        t = torch.rand(BATCH, N, generator=generator)
    gathered = model(x, t, labels, return_layers=(1, 2)).velocity
    model.gathered_modulation = False
    naive = model(x, t, labels, return_layers=(1, 2)).velocity
    torch.testing.assert_close(gathered, naive, atol=1e-5, rtol=1e-5)
    # The per-token levels must matter, otherwise the equality proves nothing.
    assert (gathered - model(x, t_scalar, labels).velocity).abs().max() > 1e-2


@pytest.mark.parametrize("levels", ["two_per_sample", "random_per_token"])
def test_gathered_gradients_equal_naive(levels):
    """The gathered path's backward (rows summed over their tokens) gives every parameter the
    gradient of the per-token reference, in float64 to a tight tolerance."""
    model = make_model(seed=11).double()
    x, _, labels, generator = inputs(11)
    x = x.double()
    t = two_level_t(BATCH, N, generator) if levels == "two_per_sample" else torch.rand(BATCH, N, generator=generator)
    grads = {}
    for gathered in (True, False):
        model.gathered_modulation = gathered
        model.zero_grad(set_to_none=True)
        out = model(x, t.double(), labels, return_layers=(2,))
        (out.velocity.square().mean() + out.hidden[2].sin().mean()).backward()
        grads[gathered] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, reference in grads[False].items():
        torch.testing.assert_close(grads[True][name], reference, atol=1e-12, rtol=1e-10, msg=name)
    ada_ln = grads[True]["blocks.0.ada_ln.1.weight"]
    assert ada_ln.abs().max() > 1e-3  # the per-token modulation's weights do get a gradient


def test_gathered_path_embeds_only_distinct_sample_level_pairs():
    model = make_model(seed=4)
    x, _, labels, generator = inputs(4)
    t = two_level_t(BATCH, N, generator)
    t[0] = 0.5  # one sample with a single level
    seen_rows = []
    def record_rows(_module, args, _output):
        seen_rows.append(args[0].shape[:-1].numel())

    hook = model.time_embedder.mlp.register_forward_hook(record_rows)
    model(x, t, labels)
    expected = sum(torch.unique(t[b]).numel() for b in range(BATCH))
    assert seen_rows == [expected] and expected < BATCH * N
    model.gathered_modulation = False
    model(x, t, labels)
    hook.remove()
    assert seen_rows[-1] == BATCH * N


def test_return_layers_and_stop_at():
    model = make_model(seed=5)
    x, _, labels, generator = inputs(5)
    t = two_level_t(BATCH, N, generator)
    full = model(x, t, labels, return_layers=(1, 2, 3))
    assert set(full.hidden) == {1, 2, 3}
    single = model(x, t, labels, return_layers=(2,))
    assert set(single.hidden) == {2}
    torch.testing.assert_close(single.hidden[2], full.hidden[2], atol=0, rtol=0)
    torch.testing.assert_close(single.velocity, full.velocity, atol=0, rtol=0)
    early = model(x, t, labels, return_layers=(1, 2), stop_at=2)
    assert early.velocity is None
    torch.testing.assert_close(early.hidden[2], full.hidden[2], atol=0, rtol=0)
    torch.testing.assert_close(early.hidden[1], full.hidden[1], atol=0, rtol=0)
    implicit = model(x, t, labels, stop_at=2)
    assert set(implicit.hidden) == {2} and implicit.velocity is None
    assert not torch.equal(full.hidden[1], full.hidden[2])


@pytest.mark.parametrize("bad", [{"return_layers": (0,)}, {"return_layers": (4,)}, {"return_layers": (1.0,)},
                                 {"stop_at": 0}, {"stop_at": 4}, {"stop_at": True},
                                 {"return_layers": (3,), "stop_at": 2}])
def test_bad_layer_indices_raise(bad):
    model = make_model()
    x, t, labels, _ = inputs(0)
    with pytest.raises(ValueError, match="return_layers|stop_at"):
        model(x, t, labels, **bad)


def test_attention_groups_separate_tokens():
    model = make_model(seed=6)
    x, _, labels, generator = inputs(6)
    groups = (torch.rand(BATCH, N, generator=generator) < 0.4).long()
    groups[:, 0], groups[:, 1] = 0, 1  # both groups present in every sample
    t = torch.where(groups.bool(), 0.8, 0.2)
    perturbed = x + torch.randn(x.shape, generator=generator) * groups[..., None]
    group0 = groups == 0

    separated = model(x, t, labels, attn_groups=groups).velocity
    separated_perturbed = model(perturbed, t, labels, attn_groups=groups).velocity
    torch.testing.assert_close(separated_perturbed[group0], separated[group0], atol=1e-6, rtol=0)
    assert (separated_perturbed[~group0] - separated[~group0]).abs().max() > 1e-3

    joint = model(x, t, labels).velocity
    joint_perturbed = model(perturbed, t, labels).velocity
    assert (joint_perturbed[group0] - joint[group0]).abs().max() > 1e-3

    expected, _ = reference_forward(model, x, t, labels, attn_groups=groups)
    torch.testing.assert_close(separated, expected, atol=1e-5, rtol=1e-5)


def test_attention_groups_validation():
    model = make_model()
    x, t, labels, _ = inputs(0)
    with pytest.raises(ValueError, match="attn_groups"):
        model(x, t, labels, attn_groups=torch.zeros(BATCH, N + 1, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_groups"):
        model(x, t, labels, attn_groups=torch.zeros(BATCH, N))


@pytest.mark.parametrize("grid", [(10,), (2, 2, 3)])
def test_one_and_three_dimensional_grids(grid):
    model = make_model(seed=7, grid=grid)
    x, _, labels, generator = inputs(7, grid=grid)
    tokens = math.prod(grid)
    t = two_level_t(BATCH, tokens, generator)
    out = model(x, t, labels, return_layers=(1,))
    assert out.velocity.shape == (BATCH, tokens, IN_DIM) and torch.isfinite(out.velocity).all()
    model.gathered_modulation = False
    torch.testing.assert_close(model(x, t, labels).velocity, out.velocity, atol=1e-5, rtol=1e-5)


def test_labels_null_class_and_unconditional():
    model = make_model(seed=8)
    x, t, _, _ = inputs(8)
    null = torch.full((BATCH,), NUM_CLASSES)
    real = torch.zeros(BATCH, dtype=torch.long)
    assert not torch.allclose(model(x, t, null).velocity, model(x, t, real).velocity)
    for bad in (NUM_CLASSES + 1, -1):
        with pytest.raises(ValueError, match=f"label {bad} out of range"):
            model(x, t, torch.tensor([0, 1, bad, 2]))
    with pytest.raises(ValueError, match="cond is required"):
        model(x, t, None)
    with pytest.raises(ValueError, match="integer"):
        model(x, t, null.float())

    unconditional = make_model(seed=8, num_classes=0)
    assert unconditional.label_embedder is None
    assert unconditional(x, t).velocity.shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, null)


def test_bad_shapes_raise():
    model = make_model()
    x, t, labels, _ = inputs(0)
    with pytest.raises(ValueError, match="x must be"):
        model(x[:, :-1], t, labels)
    with pytest.raises(ValueError, match="t must be"):
        model(x, t[:-1], labels)
    with pytest.raises(TypeError, match="t must be a float"):
        model(x, (t * 10).long(), labels)
    with pytest.raises(ValueError, match="hidden_dim"):
        DiT(in_dim=4, grid=(4, 4), hidden_dim=50, depth=1, num_heads=4)
    with pytest.raises(ValueError, match="grid"):
        DiT(in_dim=4, grid=(4, 0), hidden_dim=48, depth=1, num_heads=4)


def test_xl2_parameter_count_on_meta_device():
    # DiT-XL/2 on 32x32x4 latents: patch 2 -> in_dim 16, grid 16x16; the paper reports 675M.
    count = count_parameters("XL", in_dim=16, grid=(16, 16), num_classes=1000)
    assert abs(count - 675e6) / 675e6 < 0.01
    assert set(DIT_SIZES) == {"tiny", "S", "B", "L", "XL"}
    with pytest.raises(ValueError, match="unknown DiT size"):
        count_parameters("XXL", 16, (16, 16), 1000)


def test_tiny_preset_builds_for_digits():
    model = dit_from_size("tiny", in_dim=4, grid=(4, 4), num_classes=10)
    assert (model.hidden_dim, model.depth, model.num_tokens) == (96, 6, 16)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


@pytest.mark.parametrize("gathered", [True, False])
def test_gradients_reach_every_parameter(gathered):
    model = make_model(seed=9, gathered_modulation=gathered, qk_norm=True).train()
    x, _, labels, generator = inputs(9)
    t = two_level_t(BATCH, N, generator)
    out = model(x, t, labels, return_layers=(2,))
    (out.velocity.square().mean() + out.hidden[2].mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
