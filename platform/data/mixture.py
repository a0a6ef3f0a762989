"""Modality mixtures: one model trained on several datasets (images, audio, video) at once.

A mixture experiment binds, per modality name, a dataset (`MixtureData.parts`), a tokenizer
(`build_experiment.tokenizer = {'image': ..., 'audio': ...}`) and, optionally, an evaluation
suite (`build_experiment.evaluation = {...}`); the backbone is a MultiModalDiT built from the
tokenizers' layouts. `MixtureData.per_step` picks how steps use the modalities: 'one' (default)
draws one modality per step (weights `MixtureData.weights`, a seeded draw that every rank repeats
identically) and trains on a batch of it; 'all' trains every step on one batch of each modality,
on the `weights`-weighted mean of their losses (one backward, one optimizer step). Everything that
works on one modality (evaluation, sample grids, `selfflow eval`/`sample`) runs per modality on
`Experiment.view(name)`: the same model seen with that modality's tokenizer and data
(platform/evaluate/modalities.py).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import torch

from selfflow.platform.errors import ConfigError

PER_STEP = ("one", "all")


def _weights(names: tuple[str, ...], weights: Mapping[str, float] | None) -> torch.Tensor:
    if weights is None:
        return torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)
    if set(weights) != set(names):
        raise ConfigError(f"MixtureData.weights must give a weight to each of {list(names)}, got {sorted(weights)}")
    values = [weights[name] for name in names]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 for v in values) \
            or sum(values) <= 0:
        raise ConfigError(f"MixtureData.weights must be finite numbers >= 0 with a positive sum, got {dict(weights)}")
    total = float(sum(values))
    return torch.tensor([v / total for v in values], dtype=torch.float64)


class MixtureData:
    """Several datasets, one per modality name, trained on together.

    parts: {modality name: a data source (ShardData)}; names sort into the mixture's order.
    weights: {name: weight}, normalised to sum to 1; None = equal. per_step 'one': the probability
        of drawing each modality for a step; 'all': each modality's weight in the step's loss.
    per_step: 'one' (a batch of one drawn modality per step) or 'all' (a batch of every modality).
    All parts must have the same number of classes: the label embedding is shared (class c of
    every modality is the same word or digit).
    """

    def __init__(self, parts: Mapping[str, Any], weights: Mapping[str, float] | None = None, per_step: str = "one"):
        if not isinstance(parts, Mapping) or len(parts) < 1:
            raise ConfigError(f"MixtureData.parts must map modality names to datasets, got {parts!r}")
        if per_step not in PER_STEP:
            raise ConfigError(f"MixtureData.per_step must be one of {', '.join(PER_STEP)}, got {per_step!r}")
        self.per_step = per_step
        self.parts = {name: parts[name] for name in sorted(parts)}
        self.names = tuple(self.parts)
        self.probabilities = _weights(self.names, weights)
        classes = {name: int(getattr(part, "num_classes", 0)) for name, part in self.parts.items()}
        if len(set(classes.values())) != 1:
            raise ConfigError(f"MixtureData.parts must have the same number of classes, got {classes}")
        self.num_classes = next(iter(classes.values()))
        self.dataset = "+".join(str(getattr(part, "dataset", name)) for name, part in self.parts.items())
        self.modality = "mixture(" + "+".join(self.names) + ")"

    def loader(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> "MixtureLoader":
        loaders = {name: part.loader(batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
                   for name, part in self.parts.items()}
        if self.per_step == "all":
            return JointLoader(loaders, self.probabilities)
        return MixtureLoader(loaders, self.probabilities, seed)


class JointLoader:
    """Infinite steps {'parts': [one batch per modality, each with its 'modality'], 'weights': [...]},
    in the mixture's name order. The trainer trains on their weighted loss in one step. Resumable:
    state_dict holds every part's position (in the same layout as MixtureLoader's)."""

    def __init__(self, loaders: Mapping[str, Iterator], weights: torch.Tensor):
        self.loaders = dict(loaders)
        self.names = tuple(self.loaders)
        if weights.shape != (len(self.names),):
            raise ValueError(f"need one weight per part ({len(self.names)}), got {tuple(weights.shape)}")
        self.weights = [float(w) for w in weights]

    def __iter__(self) -> "JointLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        parts = [dict(next(self.loaders[name]), modality=name) for name in self.names]
        return {"parts": parts, "weights": list(self.weights)}

    def state_dict(self) -> dict[str, Any]:
        return {"parts": part_positions(self.loaders)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load_part_positions(self.loaders, state)


def part_positions(loaders: Mapping[str, Iterator]) -> dict[str, Any]:
    return {name: loader.state_dict() if hasattr(loader, "state_dict") else {} for name, loader in loaders.items()}


def load_part_positions(loaders: Mapping[str, Iterator], state: Mapping[str, Any]) -> None:
    if set(state.get("parts", {})) != set(loaders):
        raise ValueError(f"checkpoint data position names parts {sorted(state.get('parts', {}))}, "
                         f"this mixture has {list(loaders)}")
    for name, loader in loaders.items():
        if state["parts"][name] and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(state["parts"][name])


class MixtureLoader:
    """Infinite batches {'x', 'y', 'modality'}: each from the part a seeded draw picks.

    The draw's generator depends on the seed only, not the rank: under data parallelism every
    rank trains the same modality at every step, so gradient all-reduce sees the same layers.
    Resumable: state_dict holds the draw generator and every part's position.
    """

    def __init__(self, loaders: Mapping[str, Iterator], probabilities: torch.Tensor, seed: int):
        self.loaders = dict(loaders)
        self.names = tuple(self.loaders)
        if probabilities.shape != (len(self.names),):
            raise ValueError(f"need one probability per part ({len(self.names)}), got {tuple(probabilities.shape)}")
        self.probabilities = probabilities
        self.generator = torch.Generator().manual_seed(int(seed) * 7919 + 17)

    def __iter__(self) -> "MixtureLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        index = int(torch.multinomial(self.probabilities, 1, generator=self.generator))
        name = self.names[index]
        batch = dict(next(self.loaders[name]))
        batch["modality"] = name
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.generator.get_state(), "parts": part_positions(self.loaders)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "draws" not in state:
            raise ValueError("checkpoint data position has no modality draw state: it was written with "
                             "MixtureData.per_step = 'all'")
        load_part_positions(self.loaders, state)
        self.generator.set_state(state["draws"])
