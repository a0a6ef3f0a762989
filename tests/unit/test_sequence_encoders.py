"""REPA encoders for audio and video: tokens re-derived from torch.stft / Patchify, grids, a weights-only
save/load round trip, supervised fitting, one-line errors; and REPA's 3-D token-grid resize."""
import pytest
import torch

from selfflow.components.encoders.sequence_encoders import (
    ClipEncoder,
    SpokenDigitEncoder,
    fit_sequence_encoder,
    load_sequence_encoder,
    save_sequence_encoder,
)
from selfflow.components.objectives.repa import resize_token_grid
from selfflow.components.tokenizers.patchify import Patchify


def test_spoken_digit_encoder_tokens_are_log_stft_frames():
    encoder = SpokenDigitEncoder("small", samples=1024, n_fft=128, hop_length=64)
    audio = torch.randn(2, 1, 1024, generator=torch.Generator().manual_seed(0)) * 0.1
    spectrum = torch.stft(audio[:, 0], 128, 64, window=torch.hann_window(128), return_complex=True).abs()
    expected = ((spectrum[..., :16] + 1e-3).log() + 1.5) / 4.0
    assert torch.allclose(encoder.tokens(audio), expected.transpose(1, 2), atol=1e-6)
    assert encoder.grid == (16,) and encoder.feature_dim == 32
    assert encoder.encode_patches(audio).shape == (2, 16, 32)
    with pytest.raises(ValueError, match=r"waveforms \(B, 1, 1024\)"):
        encoder.encode_patches(torch.zeros(2, 1, 1000))


def test_clip_encoder_tokens_are_clip_patches_on_a_3d_grid():
    encoder = ClipEncoder("medium", clip_shape=(1, 4, 8, 8), patch_size=(2, 4, 4))
    clips = torch.rand(3, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(encoder.tokens(clips), Patchify((1, 4, 8, 8), (2, 4, 4))(clips * 2 - 1))
    assert encoder.grid == (2, 2, 2) and encoder.encode_patches(clips).shape == (3, 8, 64)
    with pytest.raises(ValueError, match=r"clips \(B, 1, 4, 8, 8\)"):
        encoder.encode_patches(torch.zeros(3, 1, 4, 8))


def test_save_and_load_round_trip(tmp_path):
    for encoder, inputs in ((SpokenDigitEncoder("small", samples=512, n_fft=64, hop_length=32), torch.randn(2, 1, 512)),
                            (ClipEncoder("small", clip_shape=(1, 2, 8, 8), patch_size=(1, 4, 4)), torch.rand(2, 1, 2, 8, 8))):
        path = save_sequence_encoder(encoder.freeze(), tmp_path / f"{encoder.kind}.pt")
        loaded = load_sequence_encoder(path)
        assert type(loaded) is type(encoder) and not loaded.training
        assert torch.equal(loaded.encode_patches(inputs), encoder.encode_patches(inputs))
    with pytest.raises(FileNotFoundError, match="encoder weights not found"):
        load_sequence_encoder(tmp_path / "absent.pt")
    torch.save({"format_version": 1, "kind": "images"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a spoken-digit or clip encoder file"):
        load_sequence_encoder(tmp_path / "other.pt")


def test_fit_learns_a_separable_task_and_draws_only_from_its_generator():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    clips = torch.zeros(40, 1, 2, 8, 8)
    clips[labels == 1, :, :, :4] = 1.0  # class 1: the top half lit
    encoder = ClipEncoder("small", clip_shape=(1, 2, 8, 8), patch_size=(1, 4, 4))
    state = torch.random.get_rng_state()
    metrics = fit_sequence_encoder(encoder, clips, labels, generator=generator, steps=30, batch_size=16, lr=3e-3,
                                   test_inputs=clips[:10], test_labels=labels[:10])
    assert torch.equal(torch.random.get_rng_state(), state)
    assert metrics["train_accuracy"] == 1.0 and metrics["test_accuracy"] == 1.0
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_resize_token_grid_in_3d():
    constant = torch.ones(2, 64, 3) * torch.tensor([1.0, -2.0, 0.5])
    resized = resize_token_grid(constant, (4, 4, 4), (8, 4, 4))
    assert resized.shape == (2, 128, 3)
    torch.testing.assert_close(resized, constant[:, :1].expand_as(resized))
    ramp = torch.arange(4.0).repeat_interleave(16).view(1, 64, 1)  # rises along time only
    stretched = resize_token_grid(ramp, (4, 4, 4), (8, 4, 4)).view(8, 16)
    assert torch.all(stretched[1:, 0] >= stretched[:-1, 0]) and torch.all(stretched == stretched[:, :1])
    pooled = resize_token_grid(ramp, (4, 4, 4), (1, 4, 4))  # tube tokens: the mean over time
    torch.testing.assert_close(pooled, torch.full((1, 16, 1), 1.5))
    with pytest.raises(ValueError, match="two 1-D, 2-D or 3-D grids"):
        resize_token_grid(constant, (4, 4, 4), (64,))
