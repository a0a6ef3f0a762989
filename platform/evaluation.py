"""The evaluation suite: generation quality, representation probes, stratified loss -> MLflow.

`EvalSuite` is what `build_experiment.evaluation` binds to (experiments/eval/*.gin).
During training its callback evaluates the EMA model every `every` steps (and at
the last step); `selfflow eval` runs the same code on a finished run and logs into
the same MLflow run at the checkpoint's step.

Logged (step = training step):
  eval/fd                  Fréchet distance, N generated samples vs the test split, evaluator features
  eval/fd_data_floor       the same with N real train images in place of samples (what a perfect model scores)
  eval/sample_class_acc    share of samples of class c the evaluator labels c (class-conditional models)
  eval/precision, recall   k-NN precision/recall on evaluator features
  eval/evaluator_test_acc  the evaluator's own test accuracy (is it competent?)
  probe/{linear,knn}/block{k}/t{level}, probe/{linear,knn}/best, probe/linear/best_block
  loss_by_t/bucket{i}, loss_by_t/overall
  eval/seconds*, eval/cpu_seconds   the cost of this evaluation (wall; CPU of this process)
Artifacts (folder `eval`): probe heatmap and loss-by-t PNGs, the metrics as JSON.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from torch import nn

from selfflow.components.files import write_text_atomic
from selfflow.components.metrics.evaluator import (
    ClipClassifierCNN,
    DigitClassifierCNN,
    SpectrogramClassifierCNN,
    accuracy,
    batched_outputs,
    fit_classifier,
)
from selfflow.components.metrics.plots import plot_loss_by_t, plot_probe_heatmap
from selfflow.components.metrics.probes import ProbeResults, probe_backbone
from selfflow.components.metrics.sample_quality import class_accuracy, knn_precision_recall
from selfflow.components.metrics.stratified import StratifiedLoss, stratified_flow_loss
from selfflow.platform import checkpoint as ckpt
from selfflow.platform.errors import CheckpointError, ConfigError, UserError

if TYPE_CHECKING:  # torchmetrics is imported when an evaluation runs, not with the gin registry
    from selfflow.components.metrics.frechet import FrechetDistance

log = logging.getLogger("selfflow.evaluation")

EVALUATOR_FORMAT = 1
DEFAULT_PROBE_LEVELS = (0.0, 0.25, 0.5, 0.75)


# ---- evaluator networks --------------------------------------------------------------------------


@dataclass
class LoadedEvaluator:
    """An evaluator ready to use: `network.features(images)` (and `network.head` for logits)."""

    network: nn.Module
    key: str
    metrics: dict[str, float]
    path: Path | None
    fitted_now: bool = False


class ClassifierEvaluator:
    """Recipe of a dataset's evaluator: a small CNN classifier trained here (DigitClassifierCNN for
    images (C, H, W), ClipClassifierCNN for clips (C, F, H, W), SpectrogramClassifierCNN for waveforms (C, T)).

    The trained network is cached in `<cache_dir>/<key>.pt`, key = content hash of this
    recipe, the network's shape and the data (index files and array bytes): the same
    config on the same data is trained once and shared by every run.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        steps: int = 600,
        batch_size: int = 128,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        max_shift: int = 1,
        seed: int = 0,
    ):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"ClassifierEvaluator.steps must be a positive int, got {steps!r}")
        if max_shift < 0:
            raise ConfigError(f"ClassifierEvaluator.max_shift must be >= 0, got {max_shift}")
        self.channels = [int(c) for c in channels]
        self.steps, self.batch_size, self.lr = steps, int(batch_size), float(lr)
        self.weight_decay, self.max_shift, self.seed = float(weight_decay), int(max_shift), int(seed)

    def recipe(self) -> dict[str, Any]:
        return {"kind": "DigitClassifierCNN", "format": EVALUATOR_FORMAT, "channels": self.channels,
                "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr,
                "weight_decay": self.weight_decay, "max_shift": self.max_shift, "seed": self.seed}

    def build(self, data: "EvalData") -> DigitClassifierCNN | ClipClassifierCNN | SpectrogramClassifierCNN:
        shape = tuple(data.test_images.shape[1:])
        if len(shape) == 2:
            return SpectrogramClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], samples=shape[1],
                                            channels=self.channels, data_range=data.data_range, seed=self.seed)
        if len(shape) not in (3, 4) or shape[-1] != shape[-2]:
            raise ConfigError(f"ClassifierEvaluator needs waveforms (C, T), square images (C, H, W) or clips "
                              f"(C, F, H, W), the data holds {shape}")
        if len(shape) == 4:
            return ClipClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], frames=shape[1],
                                     image_size=shape[2], channels=self.channels, data_range=data.data_range,
                                     seed=self.seed)
        return DigitClassifierCNN(num_classes=data.num_classes, in_channels=shape[0], image_size=shape[1],
                                  channels=self.channels, data_range=data.data_range, seed=self.seed)

    def load_or_fit(self, data: "EvalData", cache_dir: Path) -> LoadedEvaluator:
        if data.num_classes < 2:
            raise ConfigError("ClassifierEvaluator needs labelled data with >= 2 classes")
        network = self.build(data)
        key = content_hash({"recipe": self.recipe(), "network": network.config(), "data": data.fingerprint})
        path = Path(cache_dir) / f"{key}.pt"
        if path.is_file():
            try:
                stored = ckpt.load(path)
                if stored.get("format") != EVALUATOR_FORMAT or stored.get("key") != key:
                    raise CheckpointError(f"{path} belongs to another evaluator")
                network.load_state_dict(stored["state_dict"])
                network.requires_grad_(False).eval()
                return LoadedEvaluator(network, key, dict(stored["metrics"]), path)
            except (CheckpointError, KeyError, RuntimeError) as error:
                log.warning("evaluator cache %s unusable (%s): training it again", path, error)
        started, started_cpu = time.perf_counter(), time.process_time()
        generator = torch.Generator().manual_seed(self.seed)
        metrics = fit_classifier(network, data.train_images, data.train_y, generator=generator, steps=self.steps,
                                 batch_size=self.batch_size, lr=self.lr, weight_decay=self.weight_decay,
                                 max_shift=self.max_shift)
        metrics["test_accuracy"] = accuracy(network, data.test_images, data.test_y)
        metrics["fit_seconds"] = time.perf_counter() - started
        metrics["fit_cpu_seconds"] = time.process_time() - started_cpu
        ckpt.save_atomic({"format": EVALUATOR_FORMAT, "key": key, "recipe": json.dumps(self.recipe()),
                          "state_dict": network.state_dict(), "metrics": metrics}, path)
        log.info("trained evaluator %s: test accuracy %.3f -> %s", key, metrics["test_accuracy"], path)
        return LoadedEvaluator(network, key, metrics, path, fitted_now=True)


class InceptionEvaluator:
    """Inception-v3 features from a local weights file (ImageNet-scale runs); nothing is trained.

    weights_path: e.g. pt_inception-2015-12-05-6726825d.pth (flavour 'fid', needs torch-fidelity;
    FD comparable to published FID) or torchvision's inception_v3_google-0cc3c7bd.pth
    (flavour 'torchvision'). See components/metrics/inception.py.
    """

    def __init__(self, weights_path: str = "", flavour: str = "fid"):
        if not weights_path:
            raise ConfigError("InceptionEvaluator.weights_path must name a local Inception-v3 weights file")
        self.weights_path, self.flavour = os.path.expanduser(weights_path), flavour

    def load_or_fit(self, data: "EvalData", cache_dir: Path) -> LoadedEvaluator:
        from selfflow.components.metrics.inception import InceptionFeatures

        try:
            network = InceptionFeatures(self.weights_path, self.flavour, data.data_range)
        except (FileNotFoundError, ValueError) as error:
            raise UserError(str(error)) from None
        key = f"inception-{self.flavour}-{Path(self.weights_path).name}"
        return LoadedEvaluator(network, key, {}, Path(self.weights_path))


def content_hash(content: Any) -> str:
    """Short sha256 of a JSON-able value (keys sorted): the evaluator cache key."""
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class EvalData:
    """Both splits as tensors, plus what identifies them.

    *_x: the data as stored (what the tokenizer encodes); *_images: what the evaluator sees,
    in the space of generated samples: the data itself when it is stored as images (pixel
    and autoencoder tokenizers: FD is then measured against real images), decoder
    reconstructions decode(encode(x)) when the shards hold latents.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    train_images: torch.Tensor
    test_images: torch.Tensor
    num_classes: int
    data_range: tuple[float, float]
    fingerprint: dict[str, str]


def _digest(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def load_eval_data(experiment) -> EvalData:
    data = experiment.data
    if not callable(getattr(data, "arrays", None)):
        raise ConfigError(f"evaluation needs data with arrays(split); {type(data).__name__} has none")
    train_split = getattr(data, "train_split", "train")
    test_split = getattr(data, "eval_split", "test")
    train_x, train_y = data.arrays(train_split)
    test_x, test_y = data.arrays(test_split)
    fingerprint = {"train_arrays": _digest(train_x, train_y), "test_arrays": _digest(test_x, test_y)}
    root = getattr(data, "root", None)
    if root is not None:
        from selfflow.platform.data.loader import resolve_index_path

        for split in (train_split, test_split):
            index = resolve_index_path(root, split)
            if index.is_file():
                fingerprint[f"{split}_index"] = hashlib.sha256(index.read_bytes()).hexdigest()
    num_classes = int(getattr(data, "num_classes", 0)) or int(max(train_y.max(), test_y.max()) + 1)
    low, high = (float(v) for v in getattr(experiment.tokenizer, "data_range", (0.0, 1.0)))
    train_x = torch.from_numpy(np.asarray(train_x, dtype=np.float32))
    test_x = torch.from_numpy(np.asarray(test_x, dtype=np.float32))
    stored_as_images = stores_images(experiment.tokenizer, test_x)
    if not stored_as_images:
        fingerprint["images"] = f"decoded by {experiment.tokenizer!r}"

    def images(x: torch.Tensor) -> torch.Tensor:
        return x.clamp(low, high) if stored_as_images else as_images(experiment.tokenizer, x, (low, high))

    return EvalData(
        train_x=train_x,
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=test_x,
        test_y=torch.from_numpy(np.asarray(test_y, dtype=np.int64)),
        train_images=images(train_x),
        test_images=images(test_x),
        num_classes=num_classes,
        data_range=(low, high),
        fingerprint=fingerprint,
    )


@torch.no_grad()
def stores_images(tokenizer, data: torch.Tensor) -> bool:
    """True when decoded samples have the stored data's shape (the shards hold images, not latents)."""
    return tuple(tokenizer.decode(tokenizer.encode(data[:1])).shape) == tuple(data[:1].shape)


@torch.no_grad()
def as_images(tokenizer, data: torch.Tensor, data_range: tuple[float, float], batch_size: int = 512) -> torch.Tensor:
    """decode(encode(data)) clamped to the data range: real data in the space of generated samples."""
    parts = [tokenizer.decode(tokenizer.encode(data[start:start + batch_size])).float()
             for start in range(0, data.shape[0], batch_size)]
    return torch.cat(parts).clamp(*data_range)


def generation_labels(test_labels: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` labels with the test split's class frequencies: a fixed permutation of the
    test labels, repeated (count = test size gives exactly the test split's classes)."""
    order = torch.randperm(test_labels.shape[0], generator=torch.Generator().manual_seed(seed))
    repeats = -(-count // test_labels.shape[0])
    return test_labels[order].repeat(repeats)[:count]


def fixed_subset(count: int | None, total: int, seed: int) -> torch.Tensor:
    """Indices of a seeded subset of size min(count, total) (all of them, in order, if count is None)."""
    if count is None or count >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].sort().values


@dataclass
class EvalContext:
    """Everything an evaluation reuses across steps: data, evaluator, reference features."""

    data: EvalData
    evaluator: LoadedEvaluator
    reference: FrechetDistance
    test_features: torch.Tensor
    data_floor: dict[int, float]


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

    def callback(self) -> "EvalCallback":
        return EvalCallback(self)

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

    def data_floor(self, context: EvalContext, count: int) -> float:
        """FD of `count` real train images against the test split: what a perfect generator scores."""
        if count not in context.data_floor:
            train = context.data.train_images
            if count <= train.shape[0]:
                index = fixed_subset(count, train.shape[0], self.sample_seed)
            else:  # more samples than train images: draw with replacement
                generator = torch.Generator().manual_seed(self.sample_seed)
                index = torch.randint(train.shape[0], (count,), generator=generator)
            features, _ = batched_outputs(context.evaluator.network, train[index])
            context.data_floor[count] = context.reference(features)
        return context.data_floor[count]

    # -- the three parts ----------------------------------------------------------------------

    def generate_samples(self, experiment, model: nn.Module, context: EvalContext, num_samples: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(images clamped to the data range, labels or None) from fixed noise (seed)."""
        from dataclasses import replace

        from selfflow.platform.sampling import generate

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
                   "eval/num_samples": float(num_samples)}
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
        return metrics

    def _measure(self, experiment, model: nn.Module, step: int, run_dir,
                 out_dir: Path) -> tuple[dict[str, float], list[Path]]:
        started, started_cpu = time.perf_counter(), time.process_time()
        context = self.prepare(experiment, run_dir)
        metrics: dict[str, float] = {}
        fit_cpu = 0.0
        if context.evaluator.fitted_now:
            metrics["eval/seconds_evaluator_fit"] = context.evaluator.metrics.get("fit_seconds", 0.0)
            fit_cpu = context.evaluator.metrics.get("fit_cpu_seconds", 0.0)
            context.evaluator.fitted_now = False
        if "test_accuracy" in context.evaluator.metrics:
            metrics["eval/evaluator_test_acc"] = context.evaluator.metrics["test_accuracy"]
        artifacts: list[Path] = []
        if self.generation:
            tick = time.perf_counter()
            metrics.update(self.generation_metrics(experiment, model, context))
            metrics["eval/seconds_generation"] = time.perf_counter() - tick
        if self.probes:
            tick = time.perf_counter()
            probes = self.probe_results(experiment, model, context)
            metrics.update(probe_metrics(probes))
            metrics["eval/seconds_probes"] = time.perf_counter() - tick
            artifacts.append(plot_probe_heatmap(probes, out_dir / f"probes-step{step:08d}.png", step))
        if self.stratified:
            tick = time.perf_counter()
            losses = self.loss_results(experiment, model, context)
            metrics.update(loss_metrics(losses))
            metrics["eval/seconds_loss_by_t"] = time.perf_counter() - tick
            artifacts.append(plot_loss_by_t(losses, out_dir / f"loss_by_t-step{step:08d}.png", step))
        fit = metrics.get("eval/seconds_evaluator_fit", 0.0)
        metrics["eval/seconds"] = time.perf_counter() - started - fit
        # CPU time of this process (all threads): the cost that wall time hides on a shared machine.
        metrics["eval/cpu_seconds"] = time.process_time() - started_cpu - fit_cpu
        artifacts.append(write_json_atomic({"step": int(step), "evaluator": context.evaluator.key,
                                            "metrics": metrics}, out_dir / f"metrics-step{step:08d}.json"))
        return metrics, artifacts


class EvalCallback:
    """Trainer callback: rank 0 evaluates the EMA model on the suite's cadence."""

    def __init__(self, suite: EvalSuite):
        self.suite = suite
        self.announced = False

    def due(self, step: int, total_steps: int, default_every: int) -> bool:
        if total_steps < self.suite.min_steps:
            return False
        every = self.suite.every if self.suite.every is not None else default_every
        return (self.suite.at_end and step == total_steps) or bool(every and step % every == 0)

    def on_step_end(self, trainer, logs) -> None:
        if trainer.rank != 0:
            return
        if trainer.config.steps < self.suite.min_steps and not self.announced:
            self.announced = True
            log.warning("run of %d steps < EvalSuite.min_steps=%d: no evaluation (run `selfflow eval` on it)",
                        trainer.config.steps, self.suite.min_steps)
        if not self.due(trainer.step, trainer.config.steps, trainer.config.eval_every):
            return
        self.evaluate(trainer)

    def evaluate(self, trainer) -> None:
        self.suite.run(trainer.experiment, trainer.eval_model, trainer.step, trainer.tracker, trainer.run_dir)


def evaluate(experiment, model: nn.Module, step: int, tracker, run_dir: str | os.PathLike) -> dict[str, float]:
    """One evaluation with the experiment's suite (or the default one when it has none)."""
    if experiment.modalities:
        from selfflow.platform.mixture import ModalityEvaluation

        evaluation = experiment.evaluation
        if not isinstance(evaluation, ModalityEvaluation):
            evaluation = ModalityEvaluation({name: EvalSuite() for name in experiment.modalities})
        return evaluation.run(experiment, model, step, tracker, run_dir)
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
                metrics[f"probe/{kind}/block{block}/{level_name(level)}"] = float(table[row, col])
        metrics[f"probe/{kind}/best"] = results.best(kind)[0]
    metrics["probe/linear/best_block"] = float(results.best("linear")[1])
    return metrics


def loss_metrics(losses: StratifiedLoss) -> dict[str, float]:
    metrics = {f"loss_by_t/bucket{i}": float(value) for i, value in enumerate(losses.means)}
    metrics["loss_by_t/overall"] = losses.overall
    return metrics


def write_json_atomic(content: Any, path: Path) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=2, sort_keys=True))


# ---- `selfflow eval` -----------------------------------------------------------------------------


@dataclass
class EvalRunResult:
    metrics: dict[str, float]
    step: int
    run_dir: Path
    mlflow_run_id: str | None
    tracking_uri: str | None


def run_dir_of(run_id: str, tracking_uri: str) -> Path:
    """The run folder recorded in an MLflow run's `run_dir` tag."""
    from mlflow.tracking import MlflowClient

    from selfflow.platform.tracking import _quiet_mlflow

    _quiet_mlflow()
    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as error:
        raise UserError(f"no MLflow run {run_id} at {tracking_uri}: {str(error).splitlines()[0][:160]}") from None
    folder = run.data.tags.get("run_dir")
    if not folder:
        raise UserError(f"MLflow run {run_id} has no run_dir tag: pass --run-dir")
    return Path(folder)


def evaluate_run(
    run_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    tracking: bool = True,
) -> EvalRunResult:
    """Evaluate a finished run's EMA model (newest checkpoint unless given) into its MLflow run."""
    from selfflow.platform.inference import load_for_sampling
    from selfflow.platform.tracking import MLflowTracker, NullTracker, default_tracking_uri

    if run_dir is None and run_id is None:
        raise UserError("eval needs --run-dir or --run-id")
    if tracking_uri is None and (tracking or run_dir is None):
        # A run folder made by `selfflow train` sits in its runs folder, next to mlflow.db.
        if runs_dir is None:
            runs_dir = Path(run_dir).parent if run_dir is not None else "runs"
        tracking_uri = default_tracking_uri(runs_dir)
    if run_dir is None:
        run_dir = run_dir_of(run_id, tracking_uri)
    run_dir = Path(run_dir)
    checkpoint_path = Path(checkpoint) if checkpoint else ckpt.latest(run_dir / "checkpoints")
    experiment, model, step = load_for_sampling(run_dir, checkpoint_path, overrides)
    if experiment.train.num_threads:  # as the run trained: extra threads only spin on a busy machine
        torch.set_num_threads(experiment.train.num_threads)
    if tracking and run_id is None and checkpoint_path is not None:
        run_id = ckpt.load(checkpoint_path).get("mlflow_run_id") or None
        if run_id is None:
            log.warning("checkpoint %s names no MLflow run (trained with --no-tracking?): not logging", checkpoint_path)
    tracker = NullTracker()
    previous_status = None
    if tracking and run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.get_run(run_id)
        previous_status = run.info.status
        name = client.get_experiment(run.info.experiment_id).name
        tracker = MLflowTracker(tracking_uri=tracking_uri, experiment=name, run_id=run_id)
    try:
        metrics = evaluate(experiment, model, step, tracker, run_dir)
    finally:
        if previous_status is not None and previous_status != "RUNNING":
            tracker.client.update_run(run_id, status=previous_status)  # as it was before we logged
    return EvalRunResult(metrics, step, run_dir, run_id if tracking else None, tracking_uri)
