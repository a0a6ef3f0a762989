"""Helpers shared by the objectives: label dropout, noise, alignment losses, layer choice."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

ALIGNMENT_LOSSES = ("cosine", "l1", "smooth_l1")


def check_generator(generator: torch.Generator) -> None:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
    return num_classes


def drop_labels(
    labels: torch.Tensor | None, probability: float, num_classes: int, generator: torch.Generator
) -> torch.Tensor | None:
    """Replaces each label by the null class `num_classes` with the given probability.

    One uniform per label is drawn from `generator` (on its device) even when
    probability is 0, so the generator stream does not depend on the knob.
    None (unconditional data) passes through without a draw.
    """
    if labels is None:
        return None
    if num_classes < 1:
        raise ValueError(f"labels were given but num_classes={num_classes}: set the objective's num_classes")
    uniforms = torch.rand(labels.shape, generator=generator, device=generator.device).to(labels.device)
    return torch.where(uniforms < probability, torch.full_like(labels, num_classes), labels)


def draw_noise(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """eps ~ N(0, I) shaped and typed like `like`, drawn on the generator's device."""
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=torch.float32)
    return noise.to(device=like.device, dtype=like.dtype)


def check_model_matches(model: nn.Module, hidden_dim: int | None, depth: int | None, num_classes: int,
                        role: str = "model") -> None:
    """Fails early when the objective was configured for a different backbone."""
    expected = {"hidden_dim": hidden_dim, "depth": depth, "num_classes": num_classes}
    for name, value in expected.items():
        actual = getattr(model, name, None)
        if value is not None and actual is not None and actual != value:
            raise ValueError(f"the objective expects {role}.{name}={value}, but the {role} has {actual}")


# ----- alignment losses: (B, N, D) prediction vs (B, N, D) target -> scalar ------------------------


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape:
        raise ValueError(f"alignment prediction {tuple(prediction.shape)} and target "
                         f"{tuple(target.shape)} differ in shape")


def token_cosine(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per token over the last (hidden) dimension."""
    _check_pair(prediction, target)
    return F.cosine_similarity(prediction, target, dim=-1, eps=1e-8)


def cosine_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens and batch of 1 - cos(prediction_i, target_i)."""
    return (1.0 - token_cosine(prediction, target)).mean()


def l1_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all elements of |prediction - target|."""
    _check_pair(prediction, target)
    return (prediction - target).abs().mean()


def smooth_l1_alignment_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over all elements of the Huber-like smooth L1 (beta = 1)."""
    _check_pair(prediction, target)
    return F.smooth_l1_loss(prediction, target, reduction="mean", beta=1.0)


def alignment_loss(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    losses = {"cosine": cosine_alignment_loss, "l1": l1_alignment_loss, "smooth_l1": smooth_l1_alignment_loss}
    if kind not in losses:
        raise ValueError(f"alignment loss must be one of {ALIGNMENT_LOSSES}, got {kind!r}")
    return losses[kind]


# ----- layers -------------------------------------------------------------------------------------


def resolve_layer(spec: float | int, depth: int, name: str = "layer") -> int:
    """A 1-based block index from a depth ratio (float in (0, 1]) or an absolute index (int).

    Ratios round half up and clamp to 1..depth: 0.3 and 0.7 of depth 28 give 8 and 20.
    Absolute indices must already lie in 1..depth.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be a positive int, got {depth!r}")
    if isinstance(spec, bool):
        raise TypeError(f"{name} must be a ratio (float) or a block index (int), got {spec!r}")
    if isinstance(spec, int):
        if not 1 <= spec <= depth:
            raise ValueError(f"{name}={spec} is not a block index in 1..{depth}")
        return spec
    if isinstance(spec, float):
        if not math.isfinite(spec) or not 0.0 < spec <= 1.0:
            raise ValueError(f"{name}={spec!r} as a ratio must lie in (0, 1]; pass an int for a block index")
        return min(max(math.floor(spec * depth + 0.5), 1), depth)
    raise TypeError(f"{name} must be a ratio (float) or a block index (int), got {spec!r}")


def flow_matching_loss(prediction: torch.Tensor | None, target: torch.Tensor) -> torch.Tensor:
    """mean over all elements of (prediction - target)^2."""
    if prediction is None:
        raise ValueError("the model returned no velocity (was stop_at set on the student?)")
    if prediction.shape != target.shape:
        raise ValueError(f"velocity {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return (prediction.float() - target.float()).square().mean()
