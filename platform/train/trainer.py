"""The training loop. It knows only the seams: tokenizer, backbone, objective, data, tracker.

Everything else (sampling grids, evaluation, checkpoint retention) hangs off
callbacks so the loop stays short.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch
from torch import nn

from selfflow.components.backbones.embeddings import check_label_range
from selfflow.components.core import Batch, LossTerms
from selfflow.components.ema import EMA
from selfflow.components.protocols import Objective
from selfflow.platform.config.devices import resolve_device
from selfflow.platform.config.experiment import Experiment
from selfflow.platform.errors import TrainingError, UserError
from selfflow.platform.tracking.base import NullTracker, Tracker
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train import parallel


class TrainingModule(nn.Module):
    """Backbone + objective in one module, so DDP all-reduces the heads' gradients too.

    A list of batches (a joint mixture step) gives one LossTerms per batch, drawn in order from
    the one generator: inside one forward call, because DDP expects one forward per backward."""

    def __init__(self, model: nn.Module, objective: Objective):
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: Batch | list[Batch], teacher: nn.Module | None,
                generator: torch.Generator) -> LossTerms | list[LossTerms]:
        if isinstance(batch, list):
            return [self.objective(part, self.model, teacher, generator) for part in batch]
        return self.objective(batch, self.model, teacher, generator)


def step_logs(batches: list[Batch], outs: list[LossTerms], weights: list[float]) -> dict[str, float]:
    """loss/<term> and diag/<name>: the weighted sum over the step's batches (one batch: its values);
    a mixture's batches also log loss/<modality>/<term> and diag/<modality>/<name>."""
    logs: dict[str, float] = {}
    for batch, out, weight in zip(batches, outs, weights):
        values = {("loss", name): float(value.detach()) for name, value in out.terms.items()}
        values.update({("diag", name): float(value) for name, value in out.diagnostics.items()})
        for (head, name), value in values.items():
            key = f"{head}/{name}"
            logs[key] = logs.get(key, 0.0) + weight * value if len(outs) > 1 else value
            if batch.modality is not None:  # a mixture: each modality's terms and diagnostics also on their own
                logs[f"{head}/{batch.modality}/{name}"] = value
    return logs


class Callback(Protocol):
    def on_step_end(self, trainer: "Trainer", logs: dict[str, float]) -> None: ...


@dataclass
class RunningMeans:
    """Means of logged values since the last flush, each over the steps that logged it (a mixture's
    per-modality terms appear only on their modality's steps); saved in checkpoints so that a
    resumed run logs exactly what an uninterrupted one would."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
        self.count += 1

    def flush(self) -> dict[str, float]:
        means = {key: value / max(self.counts.get(key, self.count), 1) for key, value in self.sums.items()}
        self.sums, self.count, self.counts = {}, 0, {}
        return means


class MetricMemory:
    """Wraps the tracker and remembers the newest value of every logged metric
    (callbacks log through it too), so checkpoint retention can rank by any metric."""

    def __init__(self, tracker: Tracker):
        self.inner = tracker
        self.latest: dict[str, tuple[int, float]] = {}

    def log_metrics(self, metrics, step: int) -> None:
        for key, value in metrics.items():
            self.latest[key] = (int(step), float(value))
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


def lr_factor(warmup_steps: int, total_steps: int, decay: str = "constant", final_fraction: float = 0.0):
    """Multiplier of the base learning rate at each optimizer step (0-based): linear warmup over
    `warmup_steps`, then constant, or a cosine / linear decay reaching `final_fraction` at the last step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if decay == "constant":
            return 1.0
        span = max(1, total_steps - 1 - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress
        return final_fraction + (1.0 - final_fraction) * shape

    return factor


# Devices with a fused AdamW kernel in torch 2.x (it has none for the meta device the tests use).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def fused_adamw_supported(params: Sequence[torch.Tensor]) -> bool:
    """Fused AdamW (one kernel over all parameters instead of a chain of foreach ops) where torch has
    it for every parameter's device and dtype (docs/performance.md)."""
    return all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype.is_floating_point for p in params)


class Trainer:
    def __init__(
        self,
        experiment: Experiment,
        data: Iterator[dict[str, torch.Tensor]],
        run_dir: str | Path,
        tracker: Tracker | None = None,
        callbacks: Sequence[Callback] = (),
        rank: int = 0,
        world_size: int = 1,
        wrap_module=None,
        progress: bool = True,
        device: torch.device | str | None = None,
    ):
        self.experiment = experiment
        self.config = experiment.train
        self.data = data
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.tracker = MetricMemory(tracker or NullTracker())
        self.callbacks = list(callbacks)
        self.rank, self.world_size = rank, world_size
        self.progress = progress and rank == 0

        # Ray Train passes its worker's device; otherwise TrainConfig.device decides.
        self.device = torch.device(device) if device is not None else resolve_device(self.config.device)
        self.module = TrainingModule(experiment.model, experiment.objective).to(self.device)
        self.ema = EMA(experiment.model, decay=self.config.ema_decay)  # a copy: on the same device
        # DDP (or anything else) wraps the training module; the EMA tracks the bare backbone.
        self.step_module = wrap_module(self.module) if wrap_module else self.module
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            trainable, lr=self.config.lr, betas=tuple(self.config.betas), weight_decay=self.config.weight_decay,
            fused=fused_adamw_supported(trainable),
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_factor(self.config.warmup_steps, self.config.steps, self.config.lr_decay, self.config.final_lr_fraction),
        )
        # On the CPU whatever the device: components draw on the generator's device and move the
        # draws, so a run's random stream does not depend on where it trains.
        self.generator = torch.Generator().manual_seed(self.config.seed * 1000 + rank)
        self.step = 0
        self.skipped = 0
        self.running = RunningMeans()
        self.mlflow_run_id: str | None = getattr(self.tracker, "run_id", None)
        self.retention = ckpt.Retention(
            self.checkpoint_dir, self.config.keep_checkpoints, self.config.keep_best_metric, self.config.keep_best_mode
        )
        self._warned_best_metric = False
        self._gathered_generators: list[torch.Tensor] | None = None

    @property
    def model(self) -> nn.Module:
        return self.experiment.model

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model

    # ---- one step -------------------------------------------------------------------------
    def make_batch(self, raw: dict[str, torch.Tensor]) -> Batch:
        """Raw data moved to the training device, then tokenized there (tokenizers return tokens on
        their input's device)."""
        modality = raw.get("modality")
        cond = raw.get("y") if self.experiment.num_classes > 0 else None
        if cond is not None and self.device.type != "cpu":
            try:  # on the host: the label embedder checks CPU labels only
                check_label_range(cond, self.experiment.num_classes)
            except ValueError as error:
                raise UserError(f"batch {error}") from None
            cond = cond.to(self.device, non_blocking=True)
        x0 = self.experiment.tokenizer_for(modality).encode(raw["x"].to(self.device, non_blocking=True))
        return Batch(x0=x0, cond=cond, modality=modality)

    def train_step(self, raw: dict[str, Any]) -> dict[str, float]:
        """One optimizer step on a batch, or on a joint mixture step {'parts': [batch per modality],
        'weights': [...]} whose loss is the weighted sum of the parts' losses (platform/mixture.py)."""
        self.step_module.train()
        joint = "parts" in raw
        batches = [self.make_batch(part) for part in raw["parts"]] if joint else [self.make_batch(raw)]
        precision = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.config.bf16 else nullcontext()
        with precision:
            outs: list[LossTerms] = self.step_module(batches, self.ema.model, self.generator)
        weights = [float(w) for w in raw["weights"]] if joint else [1.0]
        loss = sum(w * out.total() for w, out in zip(weights, outs)) if joint else outs[0].total()
        bad = [f"{batch.modality}/{name}" if joint else name for batch, out in zip(batches, outs)
               for name, value in out.terms.items() if not torch.isfinite(value.detach()).all()]
        if self.any_rank_non_finite(bool(bad)):
            return self._non_finite(f"loss term '{bad[0]}'" if bad else "loss term on another rank")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainable = [p for p in self.module.parameters() if p.requires_grad]
        # clip_grad_norm_ in two halves: a non-finite norm is caught before clipping
        # spreads it to every gradient, so the message names the parameter it came from.
        grad_norm = nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
        if torch.isfinite(grad_norm):
            nn.utils.clip_grads_with_norm_(trainable, self.config.grad_clip if self.config.grad_clip > 0 else math.inf,
                                           grad_norm)
        else:
            bad = [name for name, p in self.module.named_parameters()
                   if p.grad is not None and not torch.isfinite(p.grad).all()]
            self.optimizer.zero_grad(set_to_none=True)
            more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
            return self._non_finite(f"gradient of '{bad[0]}'{more}" if bad else "gradient norm")
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.module.model)
        logs = step_logs(batches, outs, weights)
        logs["loss/total"] = float(loss.detach())
        logs["train/grad_norm"] = float(grad_norm)
        return logs

    def any_rank_non_finite(self, local: bool) -> bool:
        """Whether this rank (or, under data parallelism, any rank) saw a non-finite loss term: ranks
        agree, so that every rank skips or stops together instead of waiting in backward's gradient
        all-reduce. (Non-finite gradients need no vote: the all-reduce spreads them to every rank.)"""
        return parallel.any_rank(local, self.device) if self.world_size > 1 else local

    def replica_divergence(self) -> float:
        """Largest difference between ranks' parameter fingerprints (0.0: replicas identical)."""
        if self.world_size == 1:
            return 0.0
        fingerprint = parallel.parameter_fingerprint(self.module) + parallel.parameter_fingerprint(self.ema.model)
        everyone = parallel.all_gather_objects(fingerprint, self.world_size)
        return max(abs(a - b) for other in everyone[1:] for a, b in zip(everyone[0], other))

    def _non_finite(self, what: str) -> dict[str, float]:
        if self.config.nan_policy == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return {}  # nothing enters the running means; train/skipped_batches counts it
        last_good = ckpt.latest(self.checkpoint_dir)
        kept = f"last good checkpoint kept: {last_good}" if last_good else "no checkpoint written yet"
        raise TrainingError(f"non-finite {what} at step {self.step + 1}; stopping ({kept})")

    # ---- the loop -------------------------------------------------------------------------
    def fit(self) -> dict[str, float]:
        config = self.config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=config.steps, initial=self.step, desc=self.experiment.name, dynamic_ncols=True)
        last: dict[str, float] = {}
        tick, ticked_batches = time.perf_counter(), 0
        while self.step < config.steps:
            raw = next(self.data)
            logs = self.train_step(raw)
            self.step += 1
            ticked_batches += len(raw["parts"]) if "parts" in raw else 1  # a joint mixture step: several
            if logs:
                self.running.add(logs)
            if self.step % config.log_every == 0 or self.step == config.steps:
                elapsed = time.perf_counter() - tick
                metrics = self.running.flush()
                metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
                if config.nan_policy == "skip":
                    metrics["train/skipped_batches"] = float(self.skipped)
                samples = ticked_batches * config.batch_size * self.world_size
                metrics["train/samples_per_s"] = samples / max(elapsed, 1e-9)
                self.tracker.log_metrics(metrics, step=self.step)
                last = metrics
                tick, ticked_batches = time.perf_counter(), 0
                if bar is not None:
                    bar.set_postfix(loss=f"{metrics.get('loss/total', float('nan')):.4f}",
                                    sps=f"{metrics['train/samples_per_s']:.0f}")
            for callback in self.callbacks:
                callback.on_step_end(self, logs)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return last

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else {}
        return {
            "step": self.step,
            "model": self.module.model.state_dict(),
            "objective": self.module.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            # Every rank's objective generator (gathered before rank 0 writes), so a restarted group
            # continues each rank's stream exactly.
            "rank_generators": list(self._gathered_generators or [self.generator.get_state()]),
            "data": data_state,
            "running": {"sums": dict(self.running.sums), "count": self.running.count,
                        "counts": dict(self.running.counts)},
            "skipped": self.skipped,
            "mlflow_run_id": self.mlflow_run_id or "",
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "checkpoint") -> None:
        ckpt.load_model_state(self.module.model, state["model"], "backbone", source)
        ckpt.load_model_state(self.module.objective, state["objective"], "objective", source)
        ckpt.load_model_state(self.ema.model, state["ema"]["model"], "EMA backbone", source)
        self.ema.updates = int(state["ema"]["updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        generators = state.get("rank_generators") or []
        if len(generators) == self.world_size:
            self.generator.set_state(generators[self.rank])
        elif self.world_size > 1:
            raise UserError(f"checkpoint {source} holds generator states of {len(generators)} workers, "
                            f"this run has {self.world_size}: resume with --workers {len(generators) or 1}")
        if state.get("data") and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        running = state["running"]  # checkpoints before per-key counts: every key counted every step
        self.running = RunningMeans(dict(running["sums"]), int(running["count"]), dict(running.get("counts", {})))
        self.skipped = int(state.get("skipped", 0))
        self.step = int(state["step"])
        self.mlflow_run_id = state.get("mlflow_run_id") or None

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the full state; a collective under data parallelism (every rank calls it)."""
        if self.world_size > 1:
            self._gathered_generators = parallel.all_gather_objects(self.generator.get_state(), self.world_size)
        if self.rank != 0:
            return None
        path = ckpt.save_atomic(self.state_dict(), ckpt.step_path(self.checkpoint_dir, self.step))
        problem = ckpt.verify(path)
        if problem is not None:  # a disk hiccup: keep every older checkpoint, stop loudly
            path.replace(path.with_name(path.name + ".corrupt"))
            raise TrainingError(f"checkpoint {path} failed verification after writing ({problem}); older ones kept")
        self.retention.after_save(self.step, self._best_metric_value())
        return path

    def _best_metric_value(self) -> float | None:
        metric = self.config.keep_best_metric
        if not metric:
            return None
        if metric in self.tracker.latest:
            return self.tracker.latest[metric][1]
        if self.tracker.latest and not self._warned_best_metric:
            self._warned_best_metric = True
            logged = ", ".join(sorted(self.tracker.latest))
            print(f"selfflow: warning: TrainConfig.keep_best_metric '{metric}' has not been logged by step "
                  f"{self.step} (logged: {logged}); keeping only the newest checkpoints until it is",
                  file=sys.stderr, flush=True)
        return None

    def resume(self, path: str | Path | None = None) -> bool:
        """Load the given checkpoint, or the newest in this run's folder. False if none."""
        ckpt.clean_temp_files(self.checkpoint_dir)
        path = Path(path) if path else ckpt.latest(self.checkpoint_dir)
        if path is None:
            return False
        self.load_state_dict(ckpt.load(path), source=path)
        return True
