"""Dual-Timestep Scheduling: per-token student levels and the teacher's level.

Self-Flow (docs/method.md), for each sample with N tokens:
  t ~ p(t) and s ~ p(t) independently from the SAME distribution, never sorted;
  mask M_i ~ Bernoulli(R_M) per token, R_M in [0, 0.5];
  student level tau_i = s if M_i else t   (each token's marginal is exactly p(t));
  teacher level min(t, s) for ALL tokens.

The ablation modes change only how (t, s, mask) are made; `teacher_time` picks
the teacher's level independently of the mode:
  "selfflow"          the method above (default).
  "sorted"            the wrong variant seen in public ports: after drawing, t and s are
                      sorted so that s >= t, i.e. masked tokens always get the noisier level
                      and unmasked tokens the cleaner one. Per-token marginals are then the
                      laws of max/min of two draws, no longer p(t).
  "window"            s = clip(t - window * u, 0, 1), u ~ U[0, 1]: s lies in [t - window, t].
  "diffusion_forcing" every token draws its own level from p(t) (no two-level structure).
                      `mask` is all True (every token carries its own draw), t is the
                      sample's cleanest token level and s its noisiest, so the default
                      teacher level min(t, s) is the cleanest level any token of the sample
                      has. teacher_time="same" gives the teacher each token's own level.
  "full_masking"      masked tokens are pure noise (level 1); the rest sit at t.

teacher_time:
  "min"   min(t, s), one level per sample (never noisier than any student token);
  "same"  the student's per-token levels (B, N): the teacher sees the student's input;
  "sra"   clip(t - sra_gap * u, 0, 1), u ~ U[0, 1], one level per sample
          (SRA = mask_ratio 0 + teacher_time "sra").

Draw order from the generator (fixed, so runs and tests can replay it):
  t (B,), s (B,) [diffusion_forcing: token levels (B, N) instead], then the mask
  (uniforms (B, N): Bernoulli by threshold, exact_count by ranking),
  then the window offsets (B,) ["window"], then the SRA offsets (B,) [teacher_time "sra"].
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch

MODES = ("selfflow", "sorted", "window", "diffusion_forcing", "full_masking")
TEACHER_TIMES = ("min", "same", "sra")
MAX_MASK_RATIO = 0.5


class TimeDistribution(Protocol):
    def sample(self, shape: Sequence[int], generator: torch.Generator) -> torch.Tensor: ...


@dataclass
class DualTimesteps:
    """One draw of the scheduler for a batch of B samples with N tokens.

    t: (B,) level of unmasked tokens; s: (B,) level of masked tokens;
    mask: (B, N) bool, True = token at level s;
    token_t: (B, N) the student's per-token level;
    teacher_t: (B,) one teacher level per sample, or (B, N) with teacher_time "same".
    """

    t: torch.Tensor
    s: torch.Tensor
    mask: torch.Tensor
    token_t: torch.Tensor
    teacher_t: torch.Tensor

    def to(self, device: torch.device | str) -> "DualTimesteps":
        return DualTimesteps(*(value.to(device) for value in
                               (self.t, self.s, self.mask, self.token_t, self.teacher_t)))


def _check_fraction(name: str, value: float, low: float, high: float, low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if value > high or value < low or (low_open and value == low):
        interval = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return float(value)


class DualTimestepScheduler:
    """Draws (t, s, mask, per-token student levels, teacher level) from one generator.

    time_dist: p(t), anything with sample(shape, generator).
    mask_ratio: R_M in [0, 0.5] (paper: 0.25 images, 0.1 video, 0.5 audio).
    exact_count: mask exactly round(R_M * N) tokens per sample at random positions
        instead of an independent Bernoulli(R_M) per token.
    mode: one of MODES (see the module docstring).
    window: width of the "window" mode, s in [t - window, t].
    teacher_time: one of TEACHER_TIMES.
    sra_gap: width of the SRA teacher offset, teacher level in [t - sra_gap, t].
    mask_ratio_by_modality: {modality: R_M} for mixtures (platform/mixture.py), e.g.
        {'image': 0.25, 'audio': 0.5}; a batch of a modality not named here uses mask_ratio.
    """

    def __init__(
        self,
        time_dist: TimeDistribution,
        mask_ratio: float = 0.25,
        exact_count: bool = False,
        mode: str = "selfflow",
        window: float = 0.2,
        teacher_time: str = "min",
        sra_gap: float = 0.2,
        mask_ratio_by_modality: Mapping[str, float] | None = None,
    ) -> None:
        if not callable(getattr(time_dist, "sample", None)):
            raise TypeError(f"time_dist must have sample(shape, generator), got {type(time_dist).__name__}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if teacher_time not in TEACHER_TIMES:
            raise ValueError(f"teacher_time must be one of {TEACHER_TIMES}, got {teacher_time!r}")
        if mode == "diffusion_forcing" and teacher_time == "sra":
            raise ValueError("teacher_time='sra' needs one student level per sample; "
                             "mode 'diffusion_forcing' has none")
        if not isinstance(exact_count, bool):
            raise TypeError(f"exact_count must be a bool, got {exact_count!r}")
        self.time_dist = time_dist
        self.mask_ratio = _check_fraction("mask_ratio", mask_ratio, 0.0, MAX_MASK_RATIO)
        self.exact_count = exact_count
        self.mode = mode
        self.window = _check_fraction("window", window, 0.0, 1.0, low_open=True)
        self.teacher_time = teacher_time
        self.sra_gap = _check_fraction("sra_gap", sra_gap, 0.0, 1.0)
        self.mask_ratio_by_modality = {
            str(name): _check_fraction(f"mask_ratio_by_modality[{name!r}]", ratio, 0.0, MAX_MASK_RATIO)
            for name, ratio in (mask_ratio_by_modality or {}).items()}

    def mask_ratio_for(self, modality: str | None) -> float:
        """R_M for a batch of `modality` (None: a single-modality run)."""
        return self.mask_ratio_by_modality.get(modality, self.mask_ratio) if modality else self.mask_ratio

    def __repr__(self) -> str:
        return (f"DualTimestepScheduler(time_dist={self.time_dist!r}, mask_ratio={self.mask_ratio}, "
                f"exact_count={self.exact_count}, mode={self.mode!r}, window={self.window}, "
                f"teacher_time={self.teacher_time!r}, sra_gap={self.sra_gap}"
                + (f", mask_ratio_by_modality={self.mask_ratio_by_modality}" if self.mask_ratio_by_modality else "")
                + ")")

    # ----- draws --------------------------------------------------------------------------------

    def _levels(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        levels = self.time_dist.sample(shape, generator)
        if tuple(levels.shape) != shape:
            raise ValueError(f"time_dist.sample returned shape {tuple(levels.shape)}, expected {shape}")
        return levels.float()

    def _uniform(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return torch.rand(shape, generator=generator, device=generator.device)

    def _mask(self, batch_size: int, num_tokens: int, generator: torch.Generator, ratio: float) -> torch.Tensor:
        uniforms = self._uniform((batch_size, num_tokens), generator)
        if not self.exact_count:
            return uniforms < ratio
        count = math.floor(ratio * num_tokens + 0.5)
        # The `count` smallest uniforms of a row sit at uniformly random positions.
        ranks = uniforms.argsort(dim=1).argsort(dim=1)
        return ranks < count

    def sample(self, batch_size: int, num_tokens: int, generator: torch.Generator,
               modality: str | None = None) -> DualTimesteps:
        """Draws for B = batch_size samples of N = num_tokens tokens (on the generator's device);
        `modality` picks a mixture's per-modality mask ratio."""
        for name, value in (("batch_size", batch_size), ("num_tokens", num_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")

        if self.mode == "diffusion_forcing":
            token_t = self._levels((batch_size, num_tokens), generator)
            mask = torch.ones(batch_size, num_tokens, dtype=torch.bool, device=token_t.device)
            t, s = token_t.amin(dim=1), token_t.amax(dim=1)
        else:
            t = self._levels((batch_size,), generator)
            s = self._levels((batch_size,), generator)
            mask = self._mask(batch_size, num_tokens, generator, self.mask_ratio_for(modality)).to(t.device)
            if self.mode == "sorted":
                t, s = torch.minimum(t, s), torch.maximum(t, s)
            elif self.mode == "window":
                offsets = self._uniform((batch_size,), generator).to(t.device)
                s = (t - self.window * offsets).clamp(0.0, 1.0)
            elif self.mode == "full_masking":
                s = torch.ones_like(t)
            token_t = torch.where(mask, s.unsqueeze(1), t.unsqueeze(1))

        if self.teacher_time == "min":
            teacher_t = torch.minimum(t, s)
        elif self.teacher_time == "same":
            teacher_t = token_t.clone()
        else:  # "sra"
            offsets = self._uniform((batch_size,), generator).to(t.device)
            teacher_t = (t - self.sra_gap * offsets).clamp(0.0, 1.0)
        return DualTimesteps(t=t, s=s, mask=mask, token_t=token_t, teacher_t=teacher_t)
