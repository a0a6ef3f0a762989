"""The evaluation suite: generation quality, representation probes, stratified loss -> MLflow.

`EvalSuite` is what `build_experiment.evaluation` binds to (experiments/eval/*.gin).
During training its callback evaluates the EMA model every `every` steps (and at
the last step); `selfflow eval` runs the same code on a finished run and logs into
the same MLflow run at the checkpoint's step.

Logged (step = training step), named so that the MLflow UI's chart sections (one per name up to
its last '/') each hold one kind of figure:
  eval/fd                  Fréchet distance, N generated samples vs the test split, evaluator features
  eval/fd_data_floor       the same with N real train images in place of samples (what a perfect model scores)
  eval/fd_tokenizer_floor  the same real train images after the tokenizer's encode and decode (what a perfect
                           model in the tokenizer's space scores: the data floor for lossless tokenizers)
  eval/sample_class_acc    share of samples of class c the evaluator labels c (class-conditional models)
  eval/precision, recall   k-NN precision/recall on evaluator features
  eval/evaluator_test_acc  the evaluator's own test accuracy (is it competent?)
  probe/{linear,knn}/best, probe/linear/best_block   the headline of the probes
  probe_grid/{linear,knn}/t{level}_block{k}          every cell (the heatmap's numbers), one section per kind
  loss_by_t/t{lo}-{hi}, loss_by_t/overall            held-out loss per t interval [lo, hi)
  timing/eval/*_seconds, timing/eval/cpu_seconds, timing/eval/generated_samples
                           the cost of this evaluation (wall; CPU of this process; samples generated)
Step images (the UI's image view): eval/probe_heatmap, eval/loss_by_t.
Artifacts (folder `eval`): the same PNGs, the metrics as JSON.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from selfflow.components.files import write_text_atomic
from selfflow.components.metrics.evaluator import batched_outputs
from selfflow.components.metrics.plots import plot_loss_by_t, plot_probe_heatmap
from selfflow.components.metrics.probes import ProbeResults, probe_backbone
from selfflow.components.metrics.sample_quality import class_accuracy, knn_precision_recall
from selfflow.components.metrics.stratified import StratifiedLoss, stratified_flow_loss
from selfflow.platform.errors import ConfigError
from selfflow.platform.evaluate.eval_data import (EvalData, as_images, fixed_subset, generation_labels,
                                                   load_eval_data)
from selfflow.platform.evaluate.evaluators import ClassifierEvaluator, LoadedEvaluator
from selfflow.platform.evaluate.generation import generate

if TYPE_CHECKING:  # torchmetrics is imported when an evaluation runs, not with the gin registry
    from selfflow.components.metrics.frechet import FrechetDistance

log = logging.getLogger("selfflow.evaluation")

DEFAULT_PROBE_LEVELS = (0.0, 0.25, 0.5, 0.75)
TIMING = "timing/eval/"  # the cost of an evaluation, apart from its quality figures under eval/
STEP_IMAGES = {"probes": "eval/probe_heatmap", "loss_by_t": "eval/loss_by_t"}  # file name start -> image key


@dataclass
class EvalContext:
    """Everything an evaluation reuses across steps: data, evaluator, reference features."""

    data: EvalData
    evaluator: LoadedEvaluator
    reference: FrechetDistance
    test_features: torch.Tensor
    data_floor: dict[int, float]
    tokenizer_floor: dict[int, float] = field(default_factory=dict)


# ---- the suite -----------------------------------------------------------------------------------


class EvalSuite:
    """Periodic evaluation of the EMA model; gin binds it to `build_experiment.evaluation`.

    every: evaluate every `every` steps (None: TrainConfig.eval_every; 0: only at the end);
    at_end: also evaluate at the last training step; min_steps: training runs shorter than
    this are smoke tests and skip evaluation (`selfflow eval` still evaluates them).
    Generation: `num_samples` samples from fixed noise (seed `sample_seed`, the same at every
    evaluation, so curves compare like with like), labels drawn like the test split, no CFG
    unless `cfg_scale` says otherwise (None: the experiment's own SamplingConfig.cfg_scale).
    Probes: `probe_levels` x blocks (`probe_blocks`, None = all), linear + kNN (k = `knn_k`,
    0 = off), fitted on `probe_train_samples` train items, scored on `probe_test_samples` test
    items (None = the whole split; fixed seeded subsets otherwise).
    Stratified loss: `loss_buckets` buckets, `loss_draws` draws per test item and bucket, on
    `loss_samples` test items (None = all).
    cache_dir: where trained evaluators live (None: `<run_dir>/../.cache/evaluators`).
    """

    def __init__(
        self,
        evaluator: Any = None,
        every: int | None = None,
        at_end: bool = True,
        min_steps: int = 100,
        num_samples: int = 500,
        sample_seed: int = 2024,
        sample_batch: int = 500,
        cfg_scale: float | None = 1.0,
        precision_recall_k: int = 5,
        generation: bool = True,
        probes: bool = True,
        probe_levels: Sequence[float] = DEFAULT_PROBE_LEVELS,
        probe_blocks: Sequence[int] | None = None,
        probe_train_samples: int | None = None,
        probe_test_samples: int | None = None,
        knn_k: int = 10,
        probe_seed: int = 0,
        stratified: bool = True,
        loss_buckets: int = 10,
        loss_draws: int = 1,
        loss_samples: int | None = None,
        loss_seed: int = 0,
        cache_dir: str | None = None,
    ):
        for name, value, low in (("num_samples", num_samples, 2), ("sample_batch", sample_batch, 1),
                                 ("loss_buckets", loss_buckets, 1), ("loss_draws", loss_draws, 1),
                                 ("knn_k", knn_k, 0), ("precision_recall_k", precision_recall_k, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"EvalSuite.{name} must be an int >= {low}, got {value!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ConfigError(f"EvalSuite.every must be None or an int >= 0, got {every!r}")
        if not all(0.0 <= float(level) <= 1.0 for level in probe_levels) or not probe_levels:
            raise ConfigError(f"EvalSuite.probe_levels must be levels in [0, 1], got {tuple(probe_levels)}")
        for name, value in (("probe_train_samples", probe_train_samples), ("probe_test_samples", probe_test_samples),
                            ("loss_samples", loss_samples)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 2):
                raise ConfigError(f"EvalSuite.{name} must be None or an int >= 2, got {value!r}")
        self.evaluator = evaluator if evaluator is not None else ClassifierEvaluator()
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 0:
            raise ConfigError(f"EvalSuite.min_steps must be an int >= 0, got {min_steps!r}")
        self.every, self.at_end, self.min_steps = every, bool(at_end), min_steps
        self.num_samples, self.sample_seed, self.sample_batch = num_samples, int(sample_seed), sample_batch
        self.cfg_scale, self.precision_recall_k = cfg_scale, precision_recall_k
        self.generation, self.probes, self.stratified = bool(generation), bool(probes), bool(stratified)
        self.probe_levels = tuple(float(level) for level in probe_levels)
        self.probe_blocks = tuple(probe_blocks) if probe_blocks else None
        self.probe_train_samples, self.probe_test_samples = probe_train_samples, probe_test_samples
        self.knn_k, self.probe_seed = knn_k, int(probe_seed)
        self.loss_buckets, self.loss_draws, self.loss_seed = loss_buckets, loss_draws, int(loss_seed)
        self.loss_samples = loss_samples
        self.cache_dir = cache_dir
        self._context: EvalContext | None = None
        self._context_key: tuple | None = None

    def due(self, step: int, total_steps: int, default_every: int) -> bool:
        """Whether training evaluates at `step` of `total_steps` (default_every: TrainConfig.eval_every)."""
        if total_steps < self.min_steps:
            return False
        every = self.every if self.every is not None else default_every
        return (self.at_end and step == total_steps) or bool(every and step % every == 0)

    def resolve_cache_dir(self, run_dir: str | os.PathLike) -> Path:
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        return Path(run_dir).resolve().parent / ".cache" / "evaluators"

    # -- shared state -------------------------------------------------------------------------

    def prepare(self, experiment, run_dir: str | os.PathLike) -> EvalContext:
        """Data, evaluator (trained or from the cache) and test-split features; built once per process."""
        data = experiment.data
        key = (str(getattr(data, "root", id(data))), getattr(data, "train_split", ""), getattr(data, "eval_split", ""),
               str(self.resolve_cache_dir(run_dir)))
        if self._context is not None and self._context_key == key:
            return self._context
        from selfflow.components.metrics.frechet import FrechetDistance

        eval_data = load_eval_data(experiment)
        evaluator = self.evaluator.load_or_fit(eval_data, self.resolve_cache_dir(run_dir))
        test_features, _ = batched_outputs(evaluator.network, eval_data.test_images)
        self._context = EvalContext(eval_data, evaluator, FrechetDistance(test_features), test_features, {})
        self._context_key = key
        return self._context

    def _floor_index(self, context: EvalContext, count: int) -> torch.Tensor:
        """The `count` train images both floors use (with replacement when there are fewer)."""
        total = context.data.train_images.shape[0]
        if count <= total:
            return fixed_subset(count, total, self.sample_seed)
        return torch.randint(total, (count,), generator=torch.Generator().manual_seed(self.sample_seed))

    def data_floor(self, context: EvalContext, count: int) -> float:
        """FD of `count` real train images against the test split: what a perfect generator scores."""
        if count not in context.data_floor:
            images = context.data.train_images[self._floor_index(context, count)]
            features, _ = batched_outputs(context.evaluator.network, images)
            context.data_floor[count] = context.reference(features)
        return context.data_floor[count]

    def tokenizer_floor(self, tokenizer, context: EvalContext, count: int) -> float:
        """FD of the same real train images after tokenizer.encode and .decode: what a perfect generator
        of tokens scores. A lossy tokenizer (an autoencoder, a spectrogram without phase) lifts it above
        `data_floor`; a pixel tokenizer leaves it there."""
        if "images" in context.data.fingerprint:  # shards of latents: train_images are the round trip already
            return self.data_floor(context, count)
        if count not in context.tokenizer_floor:
            stored = context.data.train_x[self._floor_index(context, count)]
            images = as_images(tokenizer, stored, context.data.data_range)
            features, _ = batched_outputs(context.evaluator.network, images)
            context.tokenizer_floor[count] = context.reference(features)
        return context.tokenizer_floor[count]

    # -- the three parts ----------------------------------------------------------------------

    def generate_samples(self, experiment, model: nn.Module, context: EvalContext, num_samples: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images clamped to the data range, labels or None) from fixed noise (seed)."""
        from dataclasses import replace


        sampling = experiment.sampling
        if self.cfg_scale is not None:
            sampling = replace(sampling, cfg_scale=float(self.cfg_scale))
        conditional = experiment.num_classes > 0
        labels = generation_labels(context.data.test_y, num_samples, seed) if conditional else None
        generator = torch.Generator().manual_seed(seed)
        images = []
        for start in range(0, num_samples, self.sample_batch):
            count = min(self.sample_batch, num_samples - start)
            batch_labels = labels[start:start + count] if labels is not None else None
            images.append(generate(model, experiment.tokenizer, sampling, batch_labels, num_samples=count,
                                   generator=generator))
        low, high = context.data.data_range
        return torch.cat(images).float().clamp(low, high), labels

    def generation_metrics(self, experiment, model: nn.Module, context: EvalContext,
                           num_samples: int | None = None, seed: int | None = None) -> dict[str, float]:
        num_samples = num_samples or self.num_samples
        seed = self.sample_seed if seed is None else seed
        images, labels = self.generate_samples(experiment, model, context, num_samples, seed)
        features, logits = batched_outputs(context.evaluator.network, images)
        metrics = {"eval/fd": context.reference(features), "eval/fd_data_floor": self.data_floor(context, num_samples),
                   "eval/fd_tokenizer_floor": self.tokenizer_floor(experiment.tokenizer, context, num_samples),
                   f"{TIMING}generated_samples": float(num_samples)}
        if labels is not None and logits is not None and logits.shape[1] == experiment.num_classes:
            metrics["eval/sample_class_acc"] = class_accuracy(logits, labels)
        k = self.precision_recall_k
        if num_samples > k and context.test_features.shape[0] > k:
            quality = knn_precision_recall(context.test_features, features, k=k)
            metrics["eval/precision"], metrics["eval/recall"] = quality["precision"], quality["recall"]
        return metrics

    def probe_results(self, experiment, model: nn.Module, context: EvalContext) -> ProbeResults:
        data, tokenizer = context.data, experiment.tokenizer
        train = fixed_subset(self.probe_train_samples, data.train_x.shape[0], self.probe_seed)
        test = fixed_subset(self.probe_test_samples, data.test_x.shape[0], self.probe_seed + 1)
        with torch.no_grad():
            train_tokens = tokenizer.encode(data.train_x[train])
            test_tokens = tokenizer.encode(data.test_x[test])
        return probe_backbone(model, train_tokens, data.train_y[train], test_tokens, data.test_y[test],
                              levels=self.probe_levels, blocks=self.probe_blocks, seed=self.probe_seed,
                              knn_k=self.knn_k or None)

    def loss_results(self, experiment, model: nn.Module, context: EvalContext) -> StratifiedLoss:
        data = context.data
        subset = fixed_subset(self.loss_samples, data.test_x.shape[0], self.loss_seed)
        with torch.no_grad():
            tokens = experiment.tokenizer.encode(data.test_x[subset])
        cond = data.test_y[subset] if experiment.num_classes > 0 else None
        generator = torch.Generator().manual_seed(self.loss_seed)
        return stratified_flow_loss(model, tokens, cond, generator, self.loss_buckets, self.loss_draws)

    # -- one evaluation -----------------------------------------------------------------------

    def run(self, experiment, model: nn.Module, step: int, tracker, run_dir: str | os.PathLike,
            out_dir: str | os.PathLike | None = None) -> dict[str, float]:
        """Evaluate `model` (the EMA backbone) at `step`; log metrics and artifacts; return the metrics.
        Files go to `out_dir` (default <run_dir>/eval)."""
        model_was_training = model.training
        model.eval()
        try:
            metrics, artifacts = self._measure(experiment, model, step, run_dir,
                                               Path(out_dir) if out_dir else Path(run_dir) / "eval")
        finally:
            model.train(model_was_training)
        tracker.log_metrics(metrics, step=int(step))
        for path in artifacts:
            tracker.log_artifact(path, "eval")
            key = STEP_IMAGES.get(path.name.split("-step")[0])
            if key is not None:
                tracker.log_image(path, key, int(step))
        return metrics

    def _measure(self, experiment, model: nn.Module, step: int, run_dir,
                 out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        started, started_cpu = time.perf_counter(), time.process_time()
        context = self.prepare(experiment, run_dir)
        metrics: dict[str, float] = {}
        fit_cpu = 0.0
        if context.evaluator.fitted_now:
            metrics[f"{TIMING}evaluator_fit_seconds"] = context.evaluator.metrics.get("fit_seconds", 0.0)
            fit_cpu = context.evaluator.metrics.get("fit_cpu_seconds", 0.0)
            context.evaluator.fitted_now = False
        if "test_accuracy" in context.evaluator.metrics:
            metrics["eval/evaluator_test_acc"] = context.evaluator.metrics["test_accuracy"]
        artifacts: list[Path] = []
        if self.generation:
            tick = time.perf_counter()
            metrics.update(self.generation_metrics(experiment, model, context))
            metrics[f"{TIMING}generation_seconds"] = time.perf_counter() - tick
        if self.probes:
            tick = time.perf_counter()
            probes = self.probe_results(experiment, model, context)
            metrics.update(probe_metrics(probes))
            metrics[f"{TIMING}probes_seconds"] = time.perf_counter() - tick
            artifacts.append(plot_probe_heatmap(probes, out_dir / f"probes-step{step:08d}.png", step))
        if self.stratified:
            tick = time.perf_counter()
            losses = self.loss_results(experiment, model, context)
            metrics.update(loss_metrics(losses))
            metrics[f"{TIMING}loss_by_t_seconds"] = time.perf_counter() - tick
            artifacts.append(plot_loss_by_t(losses, out_dir / f"loss_by_t-step{step:08d}.png", step))
        fit = metrics.get(f"{TIMING}evaluator_fit_seconds", 0.0)
        metrics[f"{TIMING}seconds"] = time.perf_counter() - started - fit
        # CPU time of this process (all threads): the cost that wall time hides on a shared machine.
        metrics[f"{TIMING}cpu_seconds"] = time.process_time() - started_cpu - fit_cpu
        artifacts.append(write_json_atomic({"step": int(step), "evaluator": context.evaluator.key,
                                            "metrics": metrics}, out_dir / f"metrics-step{step:08d}.json"))
        return metrics, artifacts


def evaluate(experiment, model: nn.Module, step: int, tracker, run_dir: str | os.PathLike) -> dict[str, float]:
    """One evaluation with the experiment's suite (the default suite when it has none); a mixture
    evaluates each modality with its own suite (platform/evaluate/modalities.py)."""
    if experiment.modalities:
        from selfflow.platform.evaluate.modalities import evaluate_modalities

        suites = experiment.evaluation if isinstance(experiment.evaluation, Mapping) else {}
        return evaluate_modalities({name: suites.get(name) or EvalSuite() for name in experiment.modalities},
                                   experiment, model, step, tracker, run_dir)
    suite = experiment.evaluation if isinstance(experiment.evaluation, EvalSuite) else EvalSuite()
    return suite.run(experiment, model, step, tracker, run_dir)


# ---- metric names and pictures -------------------------------------------------------------------


def level_name(level: float) -> str:
    return f"t{level:g}"


def probe_metrics(results: ProbeResults) -> dict[str, float]:
    metrics: dict[str, float] = {}
    tables = {"linear": results.linear, "knn": results.knn}
    for kind, table in tables.items():
        if table is None:
            continue
        for row, block in enumerate(results.blocks):
            for col, level in enumerate(results.levels):
                metrics[f"probe_grid/{kind}/{level_name(level)}_block{block}"] = float(table[row, col])
        metrics[f"probe/{kind}/best"] = results.best(kind)[0]
    metrics["probe/linear/best_block"] = float(results.best("linear")[1])
    return metrics


def bucket_name(low: float, high: float, buckets: int) -> str:
    """A loss_by_t bucket by its t interval: t0.00-0.10 (enough decimals to tell the edges apart)."""
    digits = max(2, len(str(buckets)))
    return f"t{low:.{digits}f}-{high:.{digits}f}"


def loss_metrics(losses: StratifiedLoss) -> dict[str, float]:
    edges = [float(edge) for edge in losses.edges]
    buckets = len(edges) - 1
    metrics = {f"loss_by_t/{bucket_name(edges[i], edges[i + 1], buckets)}": float(value)
               for i, value in enumerate(losses.means)}
    metrics["loss_by_t/overall"] = losses.overall
    return metrics


def write_json_atomic(content: Any, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=2, sort_keys=True))


