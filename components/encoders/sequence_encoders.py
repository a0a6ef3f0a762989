"""REPA encoders for the laptop-scale audio and video benchmarks: small transformers trained here.

`SpokenDigitEncoder`: waveforms (B, 1, T) in [-1, 1] -> log-magnitude STFT frames (Hann window
`n_fft`, hop `hop_length`, centred; the last frame dropped) -> one token per frame -> patch features
(B, frames, feature_dim) on the 1-D grid (frames,).
`ClipEncoder`: clips (B, 1, F, H, W) in [0, 1] -> (pf, ph, pw) patches -> one token per patch ->
patch features (B, F/pf * H/ph * W/pw, feature_dim) on the 3-D grid (F/pf, H/ph, W/pw), row-major.

Both are the DigitEncoder's recipe on another input (sizes small / medium / large share its
widths and depths): a linear patch embedding, learned positions, pre-norm transformer layers, a final
LayerNorm. `fit_sequence_encoder` trains either by supervised classification (a linear head on the
mean-pooled features, AdamW, cross-entropy; minibatches from an explicit generator);
`save_sequence_encoder` / `load_sequence_encoder` store them as weights-only files.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.encoders.digit_encoder import DIGIT_ENCODER_SIZES
from selfflow.components.files import atomic_path
from selfflow.components.tokenizers.patchify import Patchify

FORMAT_VERSION = 1


class _SequenceEncoder(nn.Module):
    """Shared trunk: tokens (B, N, in_dim) -> features (B, N, feature_dim). Subclasses define `tokens`."""

    kind = ""

    def __init__(self, size: str, in_dim: int, num_tokens: int, seed: int) -> None:
        super().__init__()
        if size not in DIGIT_ENCODER_SIZES:
            raise ValueError(f"{type(self).__name__} size must be one of {tuple(DIGIT_ENCODER_SIZES)}, got {size!r}")
        dim, depth, heads = DIGIT_ENCODER_SIZES[size]
        self.size, self.seed, self.feature_dim = size, seed, dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embedding = nn.Linear(in_dim, dim)
            self.position_embedding = nn.Parameter(0.02 * torch.randn(1, num_tokens, dim))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
                for _ in range(depth)
            )
        self.norm = nn.LayerNorm(dim)

    def tokens(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def config(self) -> dict:
        raise NotImplementedError

    def encode_patches(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.patch_embedding(self.tokens(inputs)) + self.position_embedding
        for block in self.blocks:
            hidden = block(hidden)
        return self.norm(hidden)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(inputs)

    def freeze(self) -> "_SequenceEncoder":
        self.requires_grad_(False)
        return self.eval()


class SpokenDigitEncoder(_SequenceEncoder):
    """encode_patches(waveforms (B, 1, samples) in [-1, 1]) -> (B, samples / hop_length, feature_dim)."""

    kind = "spoken_digits"

    def __init__(self, size: str = "small", samples: int = 5120, n_fft: int = 256, hop_length: int = 128,
                 seed: int = 0) -> None:
        for name, value in (("samples", samples), ("n_fft", n_fft), ("hop_length", hop_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if samples % hop_length:
            raise ValueError(f"samples {samples} is not a multiple of hop_length {hop_length}")
        frames = samples // hop_length
        super().__init__(size, n_fft // 2 + 1, frames, seed)
        self.samples, self.n_fft, self.hop_length = samples, n_fft, hop_length
        self.grid = (frames,)
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)

    def config(self) -> dict:
        return {"size": self.size, "samples": self.samples, "n_fft": self.n_fft, "hop_length": self.hop_length,
                "seed": self.seed}

    def tokens(self, audio: torch.Tensor) -> torch.Tensor:
        if audio.dim() != 3 or tuple(audio.shape[1:]) != (1, self.samples):
            raise ValueError(f"SpokenDigitEncoder takes waveforms (B, 1, {self.samples}), got {tuple(audio.shape)}")
        spectrum = torch.stft(audio[:, 0].float(), self.n_fft, self.hop_length, window=self.window.to(audio.device),
                              return_complex=True)
        # log(1e-3 + |X|) spans about [-7, 4] on speech; the affine centres it for the first layer.
        logs = ((spectrum.abs()[..., :self.grid[0]] + 1e-3).log() + 1.5) / 4.0
        return logs.transpose(1, 2)  # (B, frames, bins)


class ClipEncoder(_SequenceEncoder):
    """encode_patches(clips (B, 1, F, H, W) in [0, 1]) -> (B, prod(grid), feature_dim), grid = clip / patch."""

    kind = "clips"

    def __init__(self, size: str = "small", clip_shape: Sequence[int] = (1, 8, 16, 16),
                 patch_size: Sequence[int] = (2, 4, 4), seed: int = 0) -> None:
        patchify = Patchify(tuple(clip_shape), tuple(patch_size))
        super().__init__(size, patchify.token_dim, math.prod(patchify.grid), seed)
        self.patchify, self.clip_shape, self.patch_size = patchify, tuple(clip_shape), tuple(patch_size)
        self.grid = patchify.grid

    def config(self) -> dict:
        return {"size": self.size, "clip_shape": list(self.clip_shape), "patch_size": list(self.patch_size),
                "seed": self.seed}

    def tokens(self, clips: torch.Tensor) -> torch.Tensor:
        if clips.dim() != 5 or tuple(clips.shape[1:]) != self.clip_shape:
            raise ValueError(f"ClipEncoder takes clips (B, {', '.join(map(str, self.clip_shape))}), "
                             f"got {tuple(clips.shape)}")
        return self.patchify((clips.float() - 0.5) / 0.5)  # [0, 1] -> [-1, 1]


ENCODER_KINDS = {cls.kind: cls for cls in (SpokenDigitEncoder, ClipEncoder)}


def save_sequence_encoder(encoder: _SequenceEncoder, path: str | os.PathLike) -> Path:
    """Writes {format_version, kind, config, state_dict} atomically; load with load_sequence_encoder."""
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format_version": FORMAT_VERSION, "kind": encoder.kind, "config": encoder.config(),
               "state_dict": {key: value.detach().cpu() for key, value in encoder.state_dict().items()}}
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    return path


def load_sequence_encoder(path: str | os.PathLike) -> _SequenceEncoder:
    """A frozen SpokenDigitEncoder or ClipEncoder (eval mode) from a file written by save_sequence_encoder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights not found at {path}: train one with fit_sequence_encoder "
                                f"and save it there with save_sequence_encoder")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION \
            or payload.get("kind") not in ENCODER_KINDS:
        raise ValueError(f"{path} is not a spoken-digit or clip encoder file (format_version {FORMAT_VERSION})")
    with torch.device("cpu"):
        encoder = ENCODER_KINDS[payload["kind"]](**payload["config"])
    encoder.load_state_dict(payload["state_dict"])
    return encoder.freeze()


@torch.no_grad()
def _accuracy(encoder: _SequenceEncoder, head: nn.Linear, inputs: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 256) -> float:
    correct = sum(int((head(encoder.encode_patches(inputs[start:start + batch_size]).mean(dim=1)).argmax(dim=1)
                       == labels[start:start + batch_size]).sum())
                  for start in range(0, inputs.shape[0], batch_size))
    return correct / max(inputs.shape[0], 1)


def fit_sequence_encoder(
    encoder: _SequenceEncoder,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    generator: torch.Generator,
    steps: int = 600,
    lr: float = 1e-3,
    batch_size: int = 64,
    weight_decay: float = 1e-4,
    test_inputs: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
) -> dict[str, float]:
    """Supervised training with a linear head (zero-initialised, discarded) on mean-pooled features.

    inputs: what encode_patches takes (waveforms or clips), labels (M,) ints; minibatch indices come
    from `generator`. Returns final_loss, train_accuracy (and test_accuracy with test arrays); the
    encoder ends frozen, in eval mode.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    inputs, labels = torch.as_tensor(inputs, dtype=torch.float32), torch.as_tensor(labels, dtype=torch.int64)
    if labels.dim() != 1 or inputs.shape[0] != labels.shape[0] or inputs.shape[0] == 0:
        raise ValueError(f"need as many labels as inputs (> 0), got {tuple(inputs.shape)} and {tuple(labels.shape)}")
    if (test_inputs is None) != (test_labels is None):
        raise ValueError("give both test_inputs and test_labels, or neither")
    with torch.random.fork_rng(devices=[]):  # nn.Linear's init draws; the head is zeroed anyway
        head = nn.Linear(encoder.feature_dim, int(labels.max()) + 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    encoder.requires_grad_(True)
    encoder.train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(inputs.shape[0], (batch_size,), generator=generator)
        loss = F.cross_entropy(head(encoder.encode_patches(inputs[index]).mean(dim=1)), labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.freeze()
    metrics = {"final_loss": float(loss.detach()), "train_accuracy": _accuracy(encoder, head, inputs, labels)}
    if test_inputs is not None:
        metrics["test_accuracy"] = _accuracy(encoder, head, torch.as_tensor(test_inputs, dtype=torch.float32),
                                             torch.as_tensor(test_labels, dtype=torch.int64))
    return metrics
