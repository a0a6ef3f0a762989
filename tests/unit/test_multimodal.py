"""MultiModalDiT: one trunk, per-modality token layers, chosen by the token layout.

The expected outputs are re-derived from the definition c = TimeEmb(t) + LabelEmb(y) + ModEmb(m):
a plain DiT holding the shared trunk, modality m's token layers, and a label table shifted by
ModEmb(m) must compute exactly what the mixture model computes on m's tokens.
"""
from __future__ import annotations

import pytest
import torch

from selfflow.components.backbones import DiT, MultiModalDiT, modality_layouts, sincos_position_embedding

LAYOUTS = {"image": (4, (4, 4)), "audio": (6, (10,))}
SIZE = dict(hidden_dim=24, depth=3, num_heads=2, num_classes=5)


def mixture_model(seed: int = 0) -> MultiModalDiT:
    torch.manual_seed(seed)
    model = MultiModalDiT(LAYOUTS, **SIZE)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # adaLN-Zero starts at zero: give every weight a value so paths differ
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model


def equivalent_dit(model: MultiModalDiT, name: str) -> DiT:
    """A DiT computing c = TimeEmb + (LabelEmb + ModEmb[name]) with `name`'s token layers."""
    in_dim, grid = model.layouts[name]
    dit = DiT(in_dim, grid, **SIZE)
    shared = {k: v for k, v in model.state_dict().items()
              if k.split(".")[0] in ("time_embedder", "label_embedder", "blocks")}
    dit.load_state_dict(shared, strict=False)
    with torch.no_grad():
        dit.input_projection.load_state_dict(model.input_projections[name].state_dict())
        dit.final_layer.load_state_dict(model.final_layers[name].state_dict())
        index = model.modalities.index(name)
        dit.label_embedder.table.weight.add_(model.modality_embedding.weight[index])
    return dit


@pytest.mark.parametrize("name", ["image", "audio"])
@pytest.mark.parametrize("per_token", [False, True])
def test_each_modality_computes_what_a_dit_with_its_layers_computes(name, per_token):
    model = mixture_model()
    dit = equivalent_dit(model, name)
    in_dim, grid = LAYOUTS[name]
    tokens = int(torch.tensor(grid).prod())
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(4, tokens, in_dim, generator=generator)
    t = torch.rand((4, tokens) if per_token else (4,), generator=generator)
    if per_token:  # two levels per sample, as Dual-Timestep Scheduling gives (the gathered path)
        t = torch.where(torch.rand(4, tokens, generator=generator) < 0.3, t[:, :1], t[:, 1:2])
    y = torch.tensor([0, 3, 5, 1])  # 5 = the null class
    got = model(x, t, y, return_layers=(1, 2))
    want = dit(x, t, y, return_layers=(1, 2))
    torch.testing.assert_close(got.velocity, want.velocity, atol=1e-5, rtol=1e-5)
    for block in (1, 2):
        torch.testing.assert_close(got.hidden[block], want.hidden[block], atol=1e-5, rtol=1e-5)
    early = model(x, t, y, stop_at=2)
    assert early.velocity is None
    torch.testing.assert_close(early.hidden[2], want.hidden[2], atol=1e-5, rtol=1e-5)


def test_position_embeddings_follow_each_modalitys_grid():
    model = MultiModalDiT(LAYOUTS, **SIZE)
    torch.testing.assert_close(model.position_embedding_image, sincos_position_embedding((4, 4), 24))
    torch.testing.assert_close(model.position_embedding_audio, sincos_position_embedding((10,), 24))
    assert not any("position_embedding" in name for name, _ in model.named_parameters())
    assert model.modalities == ("audio", "image")  # sorted: the order every mixture part uses


def test_a_batch_trains_the_trunk_and_only_its_own_modality_layers():
    model = mixture_model()
    x = torch.randn(2, 16, 4)
    model(x, torch.rand(2), torch.tensor([1, 2])).velocity.square().mean().backward()
    assert model.input_projections["image"].weight.grad is not None
    assert model.final_layers["image"].linear.weight.grad is not None
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.input_projections["audio"].weight.grad is None
    assert model.final_layers["audio"].linear.weight.grad is None
    grad = model.modality_embedding.weight.grad
    assert grad[model.modalities.index("image")].abs().sum() > 0
    assert grad[model.modalities.index("audio")].abs().sum() == 0


def test_fresh_model_outputs_zero_velocity_for_every_modality():
    model = MultiModalDiT(LAYOUTS, **SIZE)  # adaLN-Zero: output layers start at zero
    for in_dim, grid in LAYOUTS.values():
        tokens = int(torch.tensor(grid).prod())
        velocity = model(torch.randn(2, tokens, in_dim), torch.rand(2), torch.tensor([0, 1])).velocity
        assert velocity.shape == (2, tokens, in_dim) and torch.count_nonzero(velocity) == 0


def test_layouts_that_cannot_be_told_apart_are_refused():
    with pytest.raises(ValueError, match="'audio' and 'video' both give 64 tokens of dim 32"):
        modality_layouts({"audio": (32, (64,)), "video": (32, (4, 4, 4))})
    with pytest.raises(ValueError, match="modality name 'Image'"):
        modality_layouts({"Image": (4, (4, 4))})
    with pytest.raises(ValueError, match="at least one modality"):
        modality_layouts({})
    with pytest.raises(ValueError, match="layout must be"):
        modality_layouts({"image": (0, (4, 4))})


def test_tokens_of_an_unknown_layout_name_the_known_ones():
    model = MultiModalDiT(LAYOUTS, **SIZE)
    with pytest.raises(ValueError, match=r"matches no modality.*audio: \(B, 10, 6\).*image: \(B, 16, 4\)"):
        model(torch.randn(2, 16, 6), torch.rand(2), torch.tensor([0, 1]))


def test_ema_copy_and_state_dict_round_trip():
    import copy

    model = mixture_model()
    clone = MultiModalDiT(LAYOUTS, **SIZE)
    clone.load_state_dict(copy.deepcopy(model).state_dict())
    x, t, y = torch.randn(2, 10, 6), torch.rand(2), torch.tensor([0, 4])
    torch.testing.assert_close(clone(x, t, y).velocity, model(x, t, y).velocity)
