"""Evaluation of a modality mixture: each modality's suite scores the shared model on its own view
(its tokenizer, data and evaluator). Metrics are named <head>/<modality>/<rest> (eval/audio/fd) and
files go to <run_dir>/eval/<modality>."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping


class PrefixedTracker:
    """A tracker view that names metrics and step images `<head>/<modality>/<rest>` (eval/fd ->
    eval/audio/fd) and files artifacts under `<folder>/<modality>`."""

    def __init__(self, inner, modality: str):
        self.inner, self.modality = inner, modality

    def rename(self, key: str) -> str:
        head, _, rest = key.partition("/")
        return f"{head}/{self.modality}/{rest}" if rest else f"{self.modality}/{head}"

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        self.inner.log_metrics({self.rename(key): value for key, value in metrics.items()}, step)

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, f"{artifact_path}/{self.modality}" if artifact_path else self.modality)

    def log_image(self, path, key: str, step: int) -> None:
        self.inner.log_image(path, self.rename(key), step)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def run_modality_suite(suite, modality: str, experiment, model, step: int, tracker, run_dir) -> dict[str, float]:
    """One modality's suite on its view, logged through a PrefixedTracker; returns the prefixed metrics.
    Its files go to <run_dir>/eval/<modality> (its evaluators are cached by run_dir, where a
    single-modality run's are)."""
    prefixed = PrefixedTracker(tracker, modality)
    found = suite.run(experiment.view(modality), model, step, prefixed, run_dir,
                      out_dir=Path(run_dir) / "eval" / modality)
    return {prefixed.rename(key): value for key, value in found.items()}


def evaluate_modalities(suites: Mapping[str, Any], experiment, model, step: int, tracker,
                        run_dir) -> dict[str, float]:
    """Every modality's suite, in name order."""
    metrics: dict[str, float] = {}
    for name in sorted(suites):
        metrics.update(run_modality_suite(suites[name], name, experiment, model, step, tracker, run_dir))
    return metrics
