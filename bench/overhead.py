"""Item 2, platform overhead: the platform's training loop vs a minimal hand-written PyTorch loop.

Both train vanilla flow matching on the same backbone object (each loop with its own optimizer
and EMA), the same batch, p(t) (uniform), label dropout, AdamW settings, gradient clipping and EMA decay, so
the difference is what the platform adds: gin-built components, Batch/LossTerms objects,
input checks, non-finite checks, per-term logging, running means, callbacks. The bare loop
(no clipping, no EMA) is shown for scale: it is what those two features cost.
"""
from __future__ import annotations

import copy
import itertools
import time

import torch
import torch.nn.functional as F

from bench import workloads as setup
from bench.core import (
    BenchContext,
    Section,
    Table,
    Target,
    describe_rates,
    interleaved,
    paired_ratio,
    paired_ratio_interval,
    samples_per_s,
)

KEY = "overhead"
TARGET_RATIO = 1.05


class HandWrittenLoop:
    """What a researcher writes by hand: FM loss, AdamW, optional clip + EMA. No checks, no logging."""

    def __init__(self, trainer, clip_and_ema: bool = True):
        """Trains the trainer's own backbone object (its own AdamW state and EMA copy): the same
        parameter memory as the platform's step, so placement does not differ between them."""
        config = trainer.config
        self.model = trainer.experiment.model
        self.tokenizer = trainer.experiment.tokenizer
        self.null_class = trainer.experiment.num_classes
        self.label_dropout = getattr(trainer.experiment.objective, "label_dropout", 0.1)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=tuple(config.betas),
                                           weight_decay=config.weight_decay, fused=True)
        self.clip = config.grad_clip if clip_and_ema else 0.0
        self.ema = copy.deepcopy(self.model).requires_grad_(False) if clip_and_ema else None
        self.ema_params = list(self.ema.parameters()) if self.ema is not None else []
        self.decay = config.ema_decay
        self.generator = torch.Generator().manual_seed(0)

    def step(self, raw: dict[str, torch.Tensor]) -> None:
        x0 = self.tokenizer.encode(raw["x"])
        labels = raw["y"]
        batch = x0.shape[0]
        t = torch.rand(batch, generator=self.generator)
        eps = torch.randn(x0.shape, generator=self.generator)
        dropped = torch.rand(batch, generator=self.generator) < self.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, self.null_class), labels)
        t_ = t.view(-1, 1, 1)
        velocity = self.model((1 - t_) * x0 + t_ * eps, t, labels).velocity
        loss = F.mse_loss(velocity, eps - x0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(self.ema_params, self.params, 1.0 - self.decay)


def platform_fit(trainer, steps: int):
    """Run `steps` more steps of the real loop (Trainer.fit: data, step, running means, callbacks)."""
    def call() -> None:
        trainer.config.steps = trainer.step + steps
        trainer.fit()

    return call


def measure_config(ctx: BenchContext, config: setup.BenchConfig, repeats: int, warmup: int, inner: int) -> dict:
    trainer = setup.build_trainer(config, scratch=ctx.cache_dir / "scratch")
    raw = setup.synthetic_batch(config)
    trainer.data = itertools.repeat(raw)
    trainer.config.log_every = 10**9  # the hand loop logs nothing either; the last step still logs once
    hand = HandWrittenLoop(trainer, clip_and_ema=True)
    bare = HandWrittenLoop(trainer, clip_and_ema=False)
    timings = interleaved(
        {
            "platform_fit": platform_fit(trainer, inner),
            "platform_step": lambda: trainer.train_step(raw),
            "hand": lambda: hand.step(raw),
            "bare": lambda: bare.step(raw),
        },
        repeats=repeats, warmup=warmup,
    )
    timings["platform_fit"].samples = [s / inner for s in timings["platform_fit"].samples]
    result = {
        "timings": timings,
        "fit_over_hand": paired_ratio(timings["platform_fit"], timings["hand"]),
        "step_over_hand": paired_ratio(timings["platform_step"], timings["hand"]),
        "hand_over_bare": paired_ratio(timings["hand"], timings["bare"]),
        "fit_over_hand_minima": timings["platform_fit"].minimum / timings["hand"].minimum,
        "fit_over_hand_interval": paired_ratio_interval(timings["platform_fit"], timings["hand"]),
    }
    for name, timing in timings.items():
        ctx.results.record(KEY, "step_seconds", timing.median, "s", config=config.name, variant=name,
                           describe=config.describe(), min=timing.minimum, spread=timing.spread, repeats=repeats,
                           statistic="median of interleaved repeats")
    for name in ("fit_over_hand", "step_over_hand", "hand_over_bare", "fit_over_hand_minima"):
        interval = {"interval_95": list(result["fit_over_hand_interval"])} if name == "fit_over_hand" else {}
        ctx.results.record(KEY, name, result[name], "ratio", config=config.name, repeats=repeats,
                           statistic="ratio of minima" if name.endswith("minima") else "median of paired ratios",
                           **interval)
    return result


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    plans = [(setup.digits(batch_size=128), ctx.pick(20, 5), ctx.pick(3, 1), 1)]
    if not ctx.quick:
        # 8 rounds: at 6, the S ratio moved between 1.00 and 1.08 across identical runs (noise of a
        # 1.7 s step on a shared machine); each extra round costs ~7 s.
        plans.append((setup.s_size(batch_size=4), 8, 1, 1))
    rows, targets = [], []
    for config, repeats, warmup, inner in plans:
        ctx.log(f"[overhead] {config.describe()}, {repeats} interleaved repeats")
        result = measure_config(ctx, config, repeats, warmup, inner)
        timings = result["timings"]
        rows.append([
            f"{config.name} ({config.describe()})",
            timings["platform_fit"].median * 1e3, timings["platform_step"].median * 1e3,
            timings["hand"].median * 1e3, timings["bare"].median * 1e3,
            result["fit_over_hand"], result["fit_over_hand_minima"], result["step_over_hand"],
            result["hand_over_bare"],
        ])
        targets.append(Target(f"platform loop / hand-written loop, {config.name}", result["fit_over_hand"],
                              TARGET_RATIO, "<=", f"train_step alone: {result['step_over_hand']:.3f}",
                              interval=result["fit_over_hand_interval"],
                              absolute=describe_rates({
                                  "platform loop": samples_per_s(config.batch_size, timings["platform_fit"].median),
                                  "hand loop": samples_per_s(config.batch_size, timings["hand"].median)}),
                              record={"item": KEY, "metric": "fit_over_hand", "config": config.name}))
    table = Table(
        ["config", "platform loop ms/step", "platform train_step ms", "hand loop ms", "bare hand loop ms",
         "loop / hand", "loop / hand (min of k)", "train_step / hand", "hand / bare"],
        rows,
    )
    return Section(
        key=KEY,
        title="Platform overhead: trainer vs a hand-written PyTorch loop",
        command="python -m bench --only overhead",
        meaning=(
            "\"platform loop\" is `Trainer.fit` (next batch, `train_step`, running means, callbacks) on an "
            "in-memory batch; \"train_step\" is the step alone; \"hand loop\" is a minimal loop written "
            "directly in PyTorch with the same model, batch, p(t), label dropout, AdamW, gradient clipping and "
            "EMA; \"bare\" drops clipping and EMA. Medians of interleaved repeats; ratios are medians of "
            "per-round paired ratios (the target's 95% interval is a bootstrap over the rounds)."
        ),
        tables=[table],
        targets=targets,
        seconds=time.perf_counter() - started,
    )
