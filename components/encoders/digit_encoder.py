"""A small ViT for 8x8 digits: the REPA encoder of the laptop-scale benchmark.

Patch features (B, grid_h * grid_w, feature_dim) form a token grid like a
DINOv2's (patch 2 on 8x8 -> 4x4, the grid of a patch-2 DiT on digits).
`fit_digit_encoder` trains it by supervised classification (linear head on the
mean-pooled patch features) in pure torch; `save_encoder` / `load_digit_encoder`
store it as a weights-only file.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfflow.components.files import atomic_path

# size -> (feature_dim, depth, heads): clearly increasing capacity.
DIGIT_ENCODER_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (32, 2, 2),
    "medium": (64, 4, 4),
    "large": (128, 6, 4),
}
FORMAT_VERSION = 1


class DigitEncoder(nn.Module):
    """encode_patches(images (B, 1, H, W) in [0, 1]) -> (B, grid_h * grid_w, feature_dim).

    size: "small" | "medium" | "large"; patch_size and image_size set the grid;
    seed: parameter initialisation (drawn from a private RNG, the global one is untouched).
    Trainable when built; `freeze()` (and load_digit_encoder) make it frozen and in eval mode.
    """

    def __init__(self, size: str = "small", patch_size: int = 2, image_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        if size not in DIGIT_ENCODER_SIZES:
            raise ValueError(f"DigitEncoder size must be one of {tuple(DIGIT_ENCODER_SIZES)}, got {size!r}")
        for name, value in (("patch_size", patch_size), ("image_size", image_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        self.size, self.patch_size, self.image_size, self.seed = size, patch_size, image_size, seed
        dim, depth, heads = DIGIT_ENCODER_SIZES[size]
        self.feature_dim = dim
        side = image_size // patch_size
        self.grid = (side, side)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embedding = nn.Linear(patch_size * patch_size, dim)
            self.position_embedding = nn.Parameter(0.02 * torch.randn(1, side * side, dim))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
                for _ in range(depth)
            )
        self.norm = nn.LayerNorm(dim)

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 1 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"DigitEncoder takes (B, 1, {self.image_size}, {self.image_size}) images, "
                             f"got {tuple(images.shape)}")
        p = self.patch_size
        patches = F.unfold(images, kernel_size=p, stride=p)  # (B, p*p, L), row-major patch order
        return patches.transpose(1, 2)

    def encode_patches(self, images: torch.Tensor) -> torch.Tensor:
        centred = (images.float() - 0.5) / 0.5  # [0, 1] -> [-1, 1]
        tokens = self.patch_embedding(self.patchify(centred)) + self.position_embedding
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(images)

    def freeze(self) -> "DigitEncoder":
        self.requires_grad_(False)
        return self.eval()

    def save_encoder(self, path: str | os.PathLike) -> Path:
        """Writes {config, state_dict} atomically; load with load_digit_encoder."""
        path = Path(path).expanduser().resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "format_version": FORMAT_VERSION,
            "size": self.size, "patch_size": self.patch_size, "image_size": self.image_size, "seed": self.seed,
            "state_dict": {key: value.detach().cpu() for key, value in self.state_dict().items()},
        }
        with atomic_path(path) as temporary:
            torch.save(payload, temporary)
        return path


def load_digit_encoder(path: str | os.PathLike) -> DigitEncoder:
    """A frozen DigitEncoder (eval mode) from a file written by DigitEncoder.save_encoder."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"digit encoder weights not found at {path}: train one with "
                                f"fit_digit_encoder and save it there with save_encoder")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a DigitEncoder file (format_version {FORMAT_VERSION})")
    encoder = DigitEncoder(payload["size"], payload["patch_size"], payload["image_size"], payload["seed"])
    encoder.load_state_dict(payload["state_dict"])
    return encoder.freeze()


def _accuracy(encoder: DigitEncoder, head: nn.Linear, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            logits = head(encoder.encode_patches(images[start:start + batch_size]).mean(dim=1))
            correct += (logits.argmax(dim=1) == labels[start:start + batch_size]).sum().item()
    return correct / max(images.shape[0], 1)


def _as_images_and_labels(images, labels, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.as_tensor(images, dtype=torch.float32)
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if labels.dim() != 1 or images.shape[0] != labels.shape[0] or images.shape[0] == 0:
        raise ValueError(f"{name}: need (M, 1, H, W) images and (M,) labels, M > 0; "
                         f"got {tuple(images.shape)} and {tuple(labels.shape)}")
    return images, labels


def fit_digit_encoder(
    encoder: DigitEncoder,
    images,
    labels,
    steps: int = 300,
    lr: float = 1e-3,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    test_images=None,
    test_labels=None,
    weight_decay: float = 1e-4,
) -> dict[str, float]:
    """Supervised training with a linear head on mean-pooled patch features (AdamW, cross-entropy).

    images in [0, 1], (M, 1, H, W) or (M, H, W); labels (M,) ints. Minibatch indices come
    from `generator` (required). The head starts at zero (no random draw) and is discarded.
    Returns {"final_loss", "train_accuracy"} and "test_accuracy" when test arrays are given.
    The encoder ends frozen and in eval mode.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (test_images is None) != (test_labels is None):
        raise ValueError("give both test_images and test_labels, or neither")
    images, labels = _as_images_and_labels(images, labels, "training data")
    device = next(encoder.parameters()).device
    images, labels = images.to(device), labels.to(device)
    num_classes = int(labels.max().item()) + 1
    head = nn.Linear(encoder.feature_dim, num_classes).to(device)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)

    encoder.requires_grad_(True)
    encoder.train()
    optimizer = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
    loss = torch.zeros(())
    for _ in range(steps):
        index = torch.randint(images.shape[0], (batch_size,), generator=generator,
                              device=generator.device).to(device)
        logits = head(encoder.encode_patches(images[index]).mean(dim=1))
        loss = F.cross_entropy(logits, labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    encoder.freeze()

    metrics = {"final_loss": float(loss.item()),
               "train_accuracy": _accuracy(encoder, head, images, labels, 256)}
    if test_images is not None:
        test_images, test_labels = _as_images_and_labels(test_images, test_labels, "test data")
        metrics["test_accuracy"] = _accuracy(encoder, head, test_images.to(device), test_labels.to(device), 256)
    return metrics
