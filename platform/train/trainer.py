"""The training loop. It knows only the seams: tokenizer, backbone, objective, data, tracker.

Everything else (sampling grids, evaluation, checkpoint retention) hangs off
callbacks so the loop stays short.
"""
from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import torch
from torch import nn

from selfflow.components.backbones.embeddings import check_label_range
from selfflow.components.core import Batch, LossTerms
from selfflow.components.ema import EMA
from selfflow.components.protocols import Objective
from selfflow.platform.config.devices import resolve_device
from selfflow.platform.config.experiment import BatchLayout, Experiment
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


def log_value(value: Any) -> torch.Tensor | float:
    """A logged scalar as it stays until a log step: a float64 0-d tensor on its own device (its
    sums are then the host's double-precision sums, bit for bit), or a Python number as it is."""
    if isinstance(value, torch.Tensor):
        value = value.detach()
        return value.to(torch.float32 if value.device.type == "mps" else torch.float64)  # MPS has no float64
    return float(value)


def step_logs(batches: list[Batch], outs: list[LossTerms], weights: list[float]) -> dict[str, Any]:
    """loss/<term> and diag/<name>: the weighted sum over the step's batches (one batch: its values);
    a mixture's batches also log loss/<modality>/<term> and diag/<modality>/<name>. Values stay on
    the device (log_value): nothing is read to the host."""
    logs: dict[str, Any] = {}
    for batch, out, weight in zip(batches, outs, weights):
        values = {("loss", name): log_value(value) for name, value in out.terms.items()}
        values.update({("diag", name): log_value(value) for name, value in out.diagnostics.items()})
        for (head, name), value in values.items():
            key = f"{head}/{name}"
            logs[key] = logs.get(key, 0.0) + weight * value if len(outs) > 1 else value
            if batch.modality is not None:  # a mixture: each modality's terms and diagnostics also on their own
                logs[f"{head}/{batch.modality}/{name}"] = value
    return logs


def gradient_norms(grads: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(total 2-norm, per-tensor 2-norms), the total computed as nn.utils.get_total_norm does for
    tensors of one device and dtype (stacked per-tensor norms), so clipping is unchanged; the
    per-tensor norms name a non-finite gradient without another pass over the gradients."""
    from torch.utils._foreach_utils import _has_foreach_support  # the test get_total_norm applies

    if not grads:
        zero = torch.zeros((), device=next(iter(grads), torch.empty(0)).device)
        return zero, zero.reshape(0)
    if _has_foreach_support(list(grads), grads[0].device):
        norms = torch._foreach_norm(list(grads), 2.0)
    else:
        norms = [torch.linalg.vector_norm(g, 2.0) for g in grads]
    stacked = torch.stack([norm.to(grads[0].device) for norm in norms])
    return torch.linalg.vector_norm(stacked, 2.0), stacked


class Callback(Protocol):
    def on_step_end(self, trainer: "Trainer", logs: dict[str, float]) -> None: ...


class RunningMeans:
    """Means of logged values since the last flush, each over the steps that logged it (a mixture's
    per-modality terms appear only on their modality's steps) and counted only for applied steps.

    The sums stay on the device in float64 (one index_add per step; a skipped step adds zeros) and
    are read in `flush`, on log steps: sums of doubles in step order, the same numbers the host
    would add. Saved in checkpoints so that a resumed run logs exactly what an uninterrupted one would.
    """

    def __init__(self, sums: dict[str, float] | None = None, count: int = 0, counts: dict[str, int] | None = None):
        self.keys: list[str] = []
        self._slot: dict[str, int] = {}
        self._index: dict[tuple[str, ...], torch.Tensor] = {}
        self._sums: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._count: int | torch.Tensor = int(count)
        self._restored = (dict(sums or {}), dict(counts or {}))

    def _grow(self, keys: Sequence[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        new = [key for key in keys if key not in self._slot]
        if new or self._sums is None:
            for key in new:
                self._slot[key] = len(self.keys)
                self.keys.append(key)
            size = len(self.keys)
            sums = torch.zeros(size, dtype=dtype, device=device)
            counts = torch.zeros(size, dtype=torch.int64, device=device)
            if self._sums is not None:
                sums[: self._sums.numel()] = self._sums
                counts[: self._counts.numel()] = self._counts
            self._sums, self._counts = sums, counts
        index = self._index.get(tuple(keys))
        if index is None:
            index = self._index[tuple(keys)] = torch.tensor([self._slot[key] for key in keys], device=device)
        return index

    def add(self, values: dict[str, Any], apply: torch.Tensor | None = None) -> None:
        """Add one step's values; `apply` (a 0-d bool tensor) False leaves everything as it was."""
        if not values:
            return
        keys = list(values)
        first = next((v for v in values.values() if isinstance(v, torch.Tensor)), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None else torch.float64
        if self._sums is None and self._restored[0]:  # a checkpoint's sums: in place before the first add
            restored_sums, restored_counts = self._restored
            self._grow(list(restored_sums), device, dtype)
            self._sums.copy_(torch.tensor([restored_sums[k] for k in self.keys], dtype=dtype))
            self._counts.copy_(torch.tensor([restored_counts.get(k, int(self._count)) for k in self.keys]))
        index = self._grow(keys, device, dtype)
        row = torch.stack([v.to(dtype) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=dtype, device=device)
                           for v in values.values()])
        if apply is None:
            self._sums.index_add_(0, index, row)
            self._counts.index_add_(0, index, torch.ones_like(index))
            self._count = self._count + 1
        else:
            self._sums.index_add_(0, index, torch.where(apply, row, torch.zeros_like(row)))
            self._counts.index_add_(0, index, apply.to(torch.int64).expand(len(keys)))
            self._count = self._count + apply.to(torch.int64)

    def read(self) -> tuple[dict[str, float], int, dict[str, int]]:
        """(sums, steps counted, per-key counts) on the host: one device-to-host read."""
        if self._sums is None:
            sums, counts = self._restored
            count = int(self._count)
            return dict(sums), count, {key: int(counts.get(key, count)) for key in sums}
        values = torch.cat([self._sums.to(torch.float64), self._counts.to(torch.float64),
                            torch.as_tensor(self._count, dtype=torch.float64, device=self._sums.device).reshape(1)])
        host = values.tolist()
        size = len(self.keys)
        sums = {key: host[i] for i, key in enumerate(self.keys)}
        counts = {key: int(host[size + i]) for i, key in enumerate(self.keys)}
        return sums, int(host[-1]), counts

    def flush(self) -> dict[str, float]:
        sums, _, counts = self.read()
        self.__init__()
        return {key: value / max(counts[key], 1) for key, value in sums.items() if counts[key] > 0}

    def state(self) -> dict[str, Any]:
        sums, count, counts = self.read()
        return {"sums": {k: v for k, v in sums.items() if counts[k] > 0}, "count": count,
                "counts": {k: v for k, v in counts.items() if v > 0}}


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
    """The loop: global batch = workers x micro-batch x accumulation (TrainConfig.layout), one
    optimizer step per global batch.

    Host syncs: a step reads nothing from the device. Logged values accumulate there (RunningMeans)
    and the non-finite guard decides there: the optimizer step is masked (AdamW's fused kernel takes
    a found_inf flag, as under torch.amp's GradScaler) and so is the EMA update. Reads happen at log
    steps, at checkpoints and at the end (`check_finite`, `RunningMeans.flush`): nan_policy 'raise'
    then stops naming the first bad step, 'skip' counts the skipped steps. Without a fused AdamW
    (the meta device, foreach AdamW) the step reads one flag to skip the update."""

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
        self.layout = self.config.layout(world_size)
        self.progress = progress and rank == 0

        # Ray Train passes its worker's device; otherwise TrainConfig.device decides.
        self.device = torch.device(device) if device is not None else resolve_device(self.config.device)
        self.module = TrainingModule(experiment.model, experiment.objective).to(self.device)
        self.ema = EMA(experiment.model, decay=self.config.ema_decay)  # a copy: on the same device
        compile_modules(self.config.compile, self.module, self.ema.model)
        # DDP (or anything else) wraps the training module; the EMA tracks the bare backbone.
        self.step_module = wrap_module(self.module) if wrap_module else self.module
        self.trainable = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=self.config.lr, betas=tuple(self.config.betas), weight_decay=self.config.weight_decay,
            fused=fused_adamw_supported(self.trainable),
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lr_factor(self.config.warmup_steps, self.config.steps, self.config.lr_decay, self.config.final_lr_fraction),
        )
        # On the CPU whatever the device: components draw on the generator's device and move the
        # draws, so a run's random stream does not depend on where it trains. One generator per
        # micro-batch slot of the global batch (slot = rank x accumulation + micro-step, seeded
        # seed * 1000 + slot): the draws of a micro-batch depend on its place in the global batch,
        # not on how the batch is split between workers and accumulation steps.
        accumulation = self.layout.accumulation
        self.generators = [torch.Generator().manual_seed(self.config.seed * 1000 + rank * accumulation + i)
                           for i in range(accumulation)]
        self.step = 0
        self._skipped: int | torch.Tensor = 0
        # nan_policy 'raise': (step, loss term names, gradient names, flags) not read yet
        self._pending: list[tuple[int, list[str], list[str], torch.Tensor]] = []
        self.last_applied: torch.Tensor | None = None
        self.running = RunningMeans()
        self.mlflow_run_id: str | None = getattr(self.tracker, "run_id", None)
        self.retention = ckpt.Retention(
            self.checkpoint_dir, self.config.keep_checkpoints, self.config.keep_best_metric, self.config.keep_best_mode
        )
        self.writer = ckpt.CheckpointWriter(background=self.config.checkpoint_mode == "background",
                                             keep_buffers=self.config.checkpoint_host_buffers == "reuse")
        self.checkpointed_step: int | None = None  # the step of the newest write_checkpoint (every rank)
        self._warned_best_metric = False
        self._gathered_generators: list[torch.Tensor] | None = None

    @property
    def model(self) -> nn.Module:
        return self.experiment.model

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.model

    @property
    def generator(self) -> torch.Generator:
        """The first micro-batch slot's generator (the only one without accumulation)."""
        return self.generators[0]

    @property
    def skipped(self) -> int:
        """Steps skipped under nan_policy 'skip' (reads the device counter)."""
        return int(self._skipped)

    # ---- one step -------------------------------------------------------------------------
    def make_batch(self, raw: dict[str, torch.Tensor]) -> Batch:
        """Raw data moved to the training device, then tokenized there (tokenizers return tokens on
        their input's device)."""
        modality = raw.get("modality")
        cond = raw.get("y") if self.experiment.num_classes > 0 else None
        if cond is not None and (self.device.type != "cpu" or self.config.compile != "none"):
            try:  # on the host: the label embedder checks CPU labels only, and not when compiled
                check_label_range(cond, self.experiment.num_classes)
            except ValueError as error:
                raise UserError(f"batch {error}") from None
            cond = cond.to(self.device, non_blocking=True)
        x0 = self.experiment.tokenizer_for(modality).encode(raw["x"].to(self.device, non_blocking=True))
        return Batch(x0=x0, cond=cond, modality=modality)

    def train_step(self, raw: dict[str, Any] | Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One optimizer step. `raw` is a batch, a joint mixture step {'parts': [batch per modality],
        'weights': [...]} whose loss is the weighted sum of the parts' losses (platform/data/mixture.py),
        or a list of those: the micro-batches of one accumulation window, each drawn from its slot's
        generator, the gradient the mean of theirs (DDP all-reduces once, at the last one).

        Returns the step's logged values (0-d device tensors, means over the micro-batches), read
        by nobody until a log step; `last_applied` says on the device whether the update happened."""
        micro = [raw] if isinstance(raw, Mapping) else list(raw)
        if not 1 <= len(micro) <= len(self.generators):
            raise ValueError(f"train_step takes 1 to {len(self.generators)} micro-batches, got {len(micro)}")
        self.step_module.train()
        self.optimizer.zero_grad(set_to_none=True)
        count = len(micro)
        logs: dict[str, Any] = {}
        seen: dict[str, int] = {}
        names: list[str] = []
        finite: list[torch.Tensor] = []
        for index, part in enumerate(micro):
            accumulate = index < count - 1 and hasattr(self.step_module, "no_sync")
            with self.step_module.no_sync() if accumulate else nullcontext():
                batches, outs, weights, loss = self._forward(part, self.generators[index])
                (loss if count == 1 else loss / count).backward()
            joint = "parts" in part
            for batch, out in zip(batches, outs):
                for name, value in out.terms.items():
                    names.append(f"{batch.modality}/{name}" if joint else name)
                    finite.append(torch.isfinite(value.detach()).all())
            values = step_logs(batches, outs, weights)
            values["loss/total"] = log_value(loss)
            for key, value in values.items():
                logs[key] = logs[key] + value if key in logs else value
                seen[key] = seen.get(key, 0) + 1
        if count > 1:
            logs = {key: value / seen[key] for key, value in logs.items()}
        terms_ok = torch.stack(finite).all()
        # Ranks must agree: a non-finite loss on one rank skips (or stops) the step on every rank.
        # (Non-finite gradients need no vote: the all-reduce spreads them to every rank.)
        everywhere_ok = ~parallel.any_rank_tensor(~terms_ok) if self.world_size > 1 else terms_ok
        grads = [p.grad for p in self.trainable if p.grad is not None]
        grad_norm, norms = gradient_norms(grads)
        applied = everywhere_ok & torch.isfinite(grad_norm)
        # Clipping with a non-finite norm spoils only gradients of a step that is not applied.
        nn.utils.clip_grads_with_norm_(self.trainable, self.config.grad_clip if self.config.grad_clip > 0 else math.inf,
                                       grad_norm)
        self._masked_optimizer_step(applied)
        self.lr_schedule.step()
        self.ema.update(self.module.model, apply=applied)
        if self.config.nan_policy == "skip":
            self._skipped = self._skipped + (~applied).to(torch.int64)
        else:
            grad_names = [name for name, p in self.module.named_parameters() if p.requires_grad and p.grad is not None]
            flags = torch.cat([torch.stack(finite), everywhere_ok.reshape(1), torch.isfinite(norms)])
            self._pending.append((self.step + 1, names, grad_names, flags))
        self.last_applied = applied
        logs["train/grad_norm"] = log_value(grad_norm)
        return logs

    def _forward(self, raw: dict[str, Any], generator: torch.Generator):
        joint = "parts" in raw
        batches = [self.make_batch(part) for part in raw["parts"]] if joint else [self.make_batch(raw)]
        precision = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.config.bf16 else nullcontext()
        with precision:
            outs: list[LossTerms] = self.step_module(batches, self.ema.model, generator)
        weights = [float(w) for w in raw["weights"]] if joint else [1.0]
        loss = sum(w * out.total() for w, out in zip(weights, outs)) if joint else outs[0].total()
        return batches, outs, weights, loss

    def _masked_optimizer_step(self, applied: torch.Tensor) -> None:
        """optimizer.step() when `applied`, else nothing changes (parameters, moments, step count)."""
        if all(group.get("fused") for group in self.optimizer.param_groups):
            self.optimizer.found_inf = (~applied).to(torch.float32)  # read by the fused kernel on the device
            self.optimizer.step()
        elif bool(applied):  # no fused kernel: the one host read of the step
            self.optimizer.step()

    def check_finite(self) -> None:
        """Read the non-finite flags of the steps since the last check (one device-to-host read).
        nan_policy 'raise': stop with the first bad step's loss term or gradient, in one line."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        flat = torch.cat([flags for *_, flags in pending]).tolist()
        offset = 0
        for step, term_names, grad_names, flags in pending:
            values = flat[offset: offset + flags.numel()]  # loss terms, everywhere-ok, gradients
            offset += flags.numel()
            terms = len(term_names)
            term_ok, everywhere_ok, grad_ok = values[:terms], values[terms], values[terms + 1:]
            bad_terms = [name for name, ok in zip(term_names, term_ok) if not ok]
            if bad_terms or not everywhere_ok:
                self._stop(f"loss term '{bad_terms[0]}'" if bad_terms else "loss term on another rank", step)
            bad = [name for name, ok in zip(grad_names, grad_ok) if not ok]
            if bad:
                more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
                self._stop(f"gradient of '{bad[0]}'{more}", step)

    def _stop(self, what: str, step: int) -> None:
        try:
            self.writer.wait()
        except TrainingError:
            pass
        last_good = ckpt.latest(self.checkpoint_dir)
        kept = f"last good checkpoint kept: {last_good}" if last_good else "no checkpoint written yet"
        raise TrainingError(f"non-finite {what} at step {step}; stopping ({kept})")

    def replica_divergence(self) -> float:
        """Largest difference between ranks' parameter fingerprints (0.0: replicas identical)."""
        if self.world_size == 1:
            return 0.0
        fingerprint = parallel.parameter_fingerprint(self.module) + parallel.parameter_fingerprint(self.ema.model)
        everyone = parallel.all_gather_objects(fingerprint, self.world_size)
        return max(abs(a - b) for other in everyone[1:] for a, b in zip(everyone[0], other))

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
        layout = self.layout
        try:
            while self.step < config.steps:
                micro = [next(self.data) for _ in range(layout.accumulation)]
                logs = self.train_step(micro if layout.accumulation > 1 else micro[0])
                self.step += 1
                # a joint mixture step holds several batches
                ticked_batches += sum(len(raw["parts"]) if "parts" in raw else 1 for raw in micro)
                self.running.add(logs, self.last_applied)
                if self.step % config.log_every == 0 or self.step == config.steps:
                    self.check_finite()
                    self.writer.raise_if_failed()
                    elapsed = time.perf_counter() - tick
                    metrics = self.running.flush()
                    metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
                    if config.nan_policy == "skip":
                        metrics["train/skipped_batches"] = float(self.skipped)
                    samples = ticked_batches * layout.micro_batch * self.world_size
                    metrics["train/samples_per_s"] = samples / max(elapsed, 1e-9)
                    metrics.update({"train/global_batch": float(layout.global_batch),
                                    "train/micro_batch": float(layout.micro_batch),
                                    "train/accumulation_steps": float(layout.accumulation)})
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
            self.check_finite()
            self.writer.wait()
        except BaseException:
            self.close(failed=True)
            raise
        else:
            self.close()
        finally:
            if bar is not None:
                bar.close()
        return last

    def close(self, failed: bool = False) -> None:
        """Let a checkpoint being written finish and the callbacks that hold work in flight
        (background evaluations) end it: waiting for it after a normal end, dropping it after a
        failure (whose error is the one to see)."""
        try:
            self.writer.wait()
        except TrainingError as error:
            if not failed:
                raise
            print(f"selfflow: warning: {error}", file=sys.stderr, flush=True)
        for callback in self.callbacks:
            finish = getattr(callback, "on_train_end", None)
            if finish is not None:
                finish(self, failed=failed)

    # ---- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else {}
        layout = self.layout
        return {
            "step": self.step,
            "model": self.module.model.state_dict(),
            "objective": self.module.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "generator": self.generator.get_state(),
            # Every micro-batch slot's generator (rank-major; gathered before rank 0 writes), so a
            # restarted group continues each stream exactly.
            "rank_generators": list(self._gathered_generators or [g.get_state() for g in self.generators]),
            "batch_layout": {"global_batch": layout.global_batch, "workers": layout.workers,
                             "micro_batch": layout.micro_batch, "accumulation": layout.accumulation},
            "data": data_state,
            "running": self.running.state(),
            "skipped": self.skipped,
            "mlflow_run_id": self.mlflow_run_id or "",
        }

    def load_state_dict(self, state: dict[str, Any], source: str | Path = "checkpoint") -> None:
        saved_layout = state.get("batch_layout")
        layout = self.layout
        if saved_layout and (saved_layout["micro_batch"], saved_layout["accumulation"], saved_layout["workers"]) != (
                layout.micro_batch, layout.accumulation, layout.workers):
            was = BatchLayout(**saved_layout).describe()
            raise UserError(f"checkpoint {source} was written with {was}; this run has {layout.describe()}: "
                            f"resume with the same TrainConfig.batch_size, TrainConfig.micro_batch and --workers")
        ckpt.load_model_state(self.module.model, state["model"], "backbone", source)
        ckpt.load_model_state(self.module.objective, state["objective"], "objective", source)
        ckpt.load_model_state(self.ema.model, state["ema"]["model"], "EMA backbone", source)
        self.ema.updates = int(state["ema"]["updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        generators = state.get("rank_generators") or []
        slots = self.world_size * len(self.generators)
        if len(generators) == slots:
            first = self.rank * len(self.generators)
            for generator, saved in zip(self.generators, generators[first:first + len(self.generators)]):
                generator.set_state(saved)
        elif slots > 1:
            raise UserError(f"checkpoint {source} holds generator states of {len(generators)} micro-batch slots, "
                            f"this run has {slots} ({layout.describe()}): resume with --workers {len(generators) or 1}")
        if state.get("data") and hasattr(self.data, "load_state_dict"):
            self.data.load_state_dict(state["data"])
        running = state["running"]  # checkpoints before per-key counts: every key counted every step
        self.running = RunningMeans(dict(running["sums"]), int(running["count"]), dict(running.get("counts", {})))
        self._skipped = int(state.get("skipped", 0))
        self._pending = []
        self.step = int(state["step"])
        self.mlflow_run_id = state.get("mlflow_run_id") or None

    def save_checkpoint(self) -> Path | None:
        """Write the full state, then apply retention once it is verified; a collective under data
        parallelism (every rank calls it)."""
        path = self.write_checkpoint()
        if path is not None:
            self.apply_retention()
        return path

    def apply_retention(self) -> None:
        """Record this step's value of keep_best_metric and, once this step's checkpoint is
        verified, delete what retention no longer keeps (rank 0)."""
        step, value = self.step, self._best_metric_value()
        self.writer.then(lambda _: self.retention.after_save(step, value))

    def write_checkpoint(self) -> Path | None:
        """Rank 0 writes and verifies the full state (no deletions), on a background thread unless
        TrainConfig.checkpoint_mode is 'blocking': the loop waits only for the copy to host memory.
        Returns the path being written (`writer.wait()` waits for it). A collective under data
        parallelism (every rank calls it)."""
        self.check_finite()  # never a checkpoint with a bad step in it
        self.checkpointed_step = self.step
        if self.world_size > 1:
            everyone = parallel.all_gather_objects([g.get_state() for g in self.generators], self.world_size)
            self._gathered_generators = [state for rank_states in everyone for state in rank_states]
        if self.rank != 0:
            return None
        path = ckpt.step_path(self.checkpoint_dir, self.step)
        self.writer.submit(self.state_dict(), path)
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


def compile_modules(mode: str, module: TrainingModule, ema_model: nn.Module) -> None:
    """TrainConfig.compile: 'backbone' compiles the student and the EMA teacher (which sampling
    uses too) in place (nn.Module.compile: state dict keys unchanged); 'step' also the objective.
    DiT's gathered modulation sizes its rows with torch.unique (a value-dependent size): dynamo
    splits the graph there, and the row count becomes a dynamic size after the first recompilation."""
    if mode == "none":
        return
    module.model.compile()
    ema_model.compile()
    if mode == "step":
        module.objective.compile()
