"""The configurations the benchmarks measure, built through the shipped gin files.

A BenchConfig is a digits experiment file plus bindings: "digits" is the shipped
DiT-tiny digits experiment (batch 128); "S" is DiT-S/2 at the ImageNet-256 latent shape
(4 x 32 x 32 -> 256 tokens of 16). Timing runs on synthetic batches of the right shape
(timing does not depend on the values), so no data set is needed except for the data-path
and sampling items.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import torch

from selfflow.platform.train.trainer import Trainer

OBJECTIVE_FILES = {"fm": "digits/fm.gin", "selfflow": "digits/selfflow.gin"}
SIZES = {  # (hidden_dim, depth, num_heads), as components/backbones/sizes.py
    "tiny": (96, 6, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
}
# Self-Flow's fast paths, each switched off: full-depth teacher, modulation computed for every
# token, the teacher's forward on the main thread, before the student's (not beside it).
EARLY_EXIT_OFF = "SelfFlowObjective.early_exit = False"
GATHERED_MODULATION_OFF = "DiT.gathered_modulation = False"
TEACHER_THREAD_OFF = "SelfFlowObjective.teacher_thread = 'never'"
TEACHER_THREAD_ALWAYS = "SelfFlowObjective.teacher_thread = 'always'"  # even where 'auto' would not
SLOW_PATHS = (EARLY_EXIT_OFF, GATHERED_MODULATION_OFF, TEACHER_THREAD_OFF)
# Not a fast path of the method: a cheaper, rounded target (SelfFlowObjective.teacher_precision).
TEACHER_BFLOAT16 = "SelfFlowObjective.teacher_precision = 'bfloat16'"


@dataclass(frozen=True)
class BenchConfig:
    """One measured configuration: objective, backbone size, data shape, batch, extra bindings."""

    name: str
    objective: str = "fm"
    size: str = "tiny"
    data_shape: tuple[int, ...] = (1, 8, 8)
    batch_size: int = 128
    hidden_dim: int | None = None  # overrides the size's width (scaling sweeps)
    extra: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVE_FILES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVE_FILES)}, got {self.objective!r}")
        if self.size not in SIZES:
            raise ValueError(f"size must be one of {sorted(SIZES)}, got {self.size!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def num_tokens(self) -> int:
        return math.prod(side // 2 for side in self.data_shape[1:])

    @property
    def width(self) -> int:
        return self.hidden_dim or SIZES[self.size][0]

    def gin_files(self) -> list[str]:
        return [OBJECTIVE_FILES[self.objective]]

    def gin_params(self, data_root: str | Path | None = None) -> list[str]:
        _, depth, heads = SIZES[self.size]
        width = self.width
        if width % heads:
            heads = max(h for h in range(1, heads + 1) if width % h == 0)
        params = [
            f"DiT.hidden_dim = {width}", f"DiT.depth = {depth}", f"DiT.num_heads = {heads}",
            f"TrainConfig.batch_size = {self.batch_size}",
            f"PixelTokenizer.data_shape = {tuple(self.data_shape)}",
            f"ShardData.data_shape = {tuple(self.data_shape)}",
            "build_experiment.evaluation = None",
            "TrainConfig.eval_every = 0",
            "TrainConfig.checkpoint_every = 0",
            "TrainConfig.num_threads = 0",  # the bench process sets threads (--threads), Trainer.fit keeps them
        ]
        if data_root is not None:
            params.append(f"ShardData.root = '{data_root}'")
        return params + list(self.extra)

    def with_(self, **changes) -> "BenchConfig":
        return replace(self, **changes)

    def describe(self) -> str:
        shape = "x".join(str(d) for d in self.data_shape)
        return (f"{self.objective}, DiT-{self.size} (D={self.width}), {shape} -> {self.num_tokens} tokens, "
                f"batch {self.batch_size}")

    def key(self) -> str:
        text = json.dumps({"files": self.gin_files(), "params": self.gin_params()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def digits(objective: str = "fm", batch_size: int = 128, **changes) -> BenchConfig:
    return BenchConfig(name="digits", objective=objective, batch_size=batch_size, **changes)


def s_size(objective: str = "fm", batch_size: int = 4, **changes) -> BenchConfig:
    return BenchConfig(name="S", objective=objective, size="S", data_shape=(4, 32, 32), batch_size=batch_size,
                       **changes)


def build_experiment_for(config: BenchConfig, extra: Sequence[str] = (), data_root: str | Path | None = None):
    from selfflow.platform.config import bootstrap as gin_config
    from selfflow.platform.config.experiment import build_from_gin

    gin_config.parse(config.gin_files(), config.gin_params(data_root) + list(extra))
    return build_from_gin()


def build_trainer(config: BenchConfig, extra: Sequence[str] = (), scratch: str | Path = "runs/.cache/bench/scratch",
                  data=None, data_root: str | Path | None = None, model: torch.nn.Module | None = None) -> Trainer:
    """A Trainer of the config (no tracker, no callbacks, no progress bar).

    model: train this backbone object instead of a new one. Timed comparisons share one backbone:
    separately allocated copies of the same weights differed by up to ~10% in step time here
    (memory placement), which would otherwise pass for a difference between the variants."""
    experiment = build_experiment_for(config, extra, data_root)
    if model is not None:
        experiment.model = model
    return Trainer(experiment, data if data is not None else iter(()), Path(scratch), progress=False)


def synthetic_batch(config: BenchConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A raw batch {'x', 'y'} of the config's data shape, values in the data range [0, 1]."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "x": torch.rand((config.batch_size, *config.data_shape), generator=generator),
        "y": torch.randint(0, 10, (config.batch_size,), generator=generator),
    }


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
