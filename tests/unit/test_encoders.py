"""REPA encoders: timm weights from local files only, and the digit ViT (sizes, training, save/load)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from selfflow.components.encoders import DigitEncoder, PatchEncoder, TimmEncoder, fit_digit_encoder, load_digit_encoder

torch.set_num_threads(1)

VIT = "vit_tiny_patch16_224"  # 192 wide, patch 16; built at 32 px -> a 2x2 grid


def tiny_vit(seed: int = 0, img_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(VIT, pretrained=False, img_size=img_size).eval()  # keeps its 1000-class head


def test_missing_weights_file_gives_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "dinov2_vitb14.safetensors"
    with pytest.raises(FileNotFoundError) as error:
        TimmEncoder(VIT, weights_path=str(missing), image_size=32)
    message = str(error.value)
    assert str(missing) in message and "\n" not in message and VIT in message


def test_empty_hub_cache_gives_a_clear_error_and_never_downloads(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        TimmEncoder(VIT, cache_dir=str(tmp_path), image_size=32)
    message = str(error.value)
    assert "timm/vit_tiny_patch16_224" in message and str(tmp_path) in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nothing was fetched


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_loads_local_weights_and_returns_patch_tokens(tmp_path: Path, fmt: str) -> None:
    source = tiny_vit()
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    path = tmp_path / ("vit.safetensors" if fmt == "safetensors" else "vit.pt")
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)

    encoder = TimmEncoder(VIT, weights_path=str(path), image_size=32)
    assert isinstance(encoder, PatchEncoder)
    assert encoder.grid == (2, 2) and encoder.feature_dim == 192
    own = encoder.model.state_dict()
    for key, value in own.items():
        assert torch.equal(value, state[key]), key

    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = encoder.encode_patches(images)
    assert tokens.shape == (3, 4, 192)
    mean = torch.tensor(source.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(source.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = source.forward_features((images - mean) / std)[:, source.num_prefix_tokens:]
    torch.testing.assert_close(tokens, expected)


def test_frozen_resizes_and_expands_grey_input(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(path))
    encoder = TimmEncoder(VIT, weights_path=str(path), image_size=48)  # position table resampled 2x2 -> 3x3
    assert encoder.grid == (3, 3)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training and not encoder.model.training
    digits = torch.rand(2, 1, 8, 8)
    assert encoder.encode_patches(digits).shape == (2, 9, 192)
    with pytest.raises(ValueError, match="channels"):
        encoder.encode_patches(torch.rand(2, 2, 8, 8))


def test_loads_from_a_local_hub_cache(tmp_path: Path) -> None:
    source = tiny_vit(seed=4)
    repo = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    encoder = TimmEncoder(VIT, cache_dir=str(tmp_path), image_size=32)
    assert encoder.weights_file == snapshot / "model.safetensors"
    torch.testing.assert_close(encoder.model.pos_embed, source.pos_embed)


# ----- digit encoder ----------------------------------------------------------------------------


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images, torch.tensor(bunch.target, dtype=torch.int64)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_digit_encoder_sizes_grow_and_give_a_token_grid() -> None:
    small, medium, large = (DigitEncoder(size) for size in ("small", "medium", "large"))
    assert count(small) < count(medium) < count(large)
    assert count(medium) > 3 * count(small) and count(large) > 3 * count(medium)
    assert small.grid == (4, 4)
    assert small.encode_patches(torch.rand(5, 1, 8, 8)).shape == (5, 16, small.feature_dim)
    assert isinstance(small, PatchEncoder)
    with pytest.raises(ValueError, match="images"):
        small.encode_patches(torch.rand(5, 8, 8))
    with pytest.raises(ValueError, match="size"):
        DigitEncoder("huge")


def test_digit_encoder_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(1)
    expected = torch.rand(2)
    torch.manual_seed(1)
    first, second = DigitEncoder("small", seed=3), DigitEncoder("small", seed=3)
    assert torch.equal(torch.rand(2), expected)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(DigitEncoder("small", seed=4).position_embedding, first.position_embedding)


def test_fitting_on_digits_beats_chance_and_round_trips(tmp_path: Path) -> None:
    images, labels = digits()
    order = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    encoder = DigitEncoder("small", seed=0)
    metrics = fit_digit_encoder(encoder, images[train], labels[train], steps=200, lr=3e-3, batch_size=32,
                                generator=torch.Generator().manual_seed(0),
                                test_images=images[test], test_labels=labels[test])
    assert metrics["train_accuracy"] > 0.6 and metrics["test_accuracy"] > 0.5  # chance is 0.1
    assert np.isfinite(metrics["final_loss"])
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())

    path = encoder.save_encoder(tmp_path / "encoders" / "digits_small.pt")
    loaded = load_digit_encoder(path)
    assert loaded.size == "small" and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_patches(images[:8]), encoder.encode_patches(images[:8]))


def test_loading_a_missing_digit_encoder_says_where(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="digits_medium.pt"):
        load_digit_encoder(tmp_path / "digits_medium.pt")
    bad = tmp_path / "bad.pt"
    torch.save({"weights": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="DigitEncoder"):
        load_digit_encoder(bad)
