"""Item 7, scaling of cost with work: Self-Flow step time vs tokens per sample and vs model width.

Each sweep changes one thing (tokens per sample via the image side with patch 2, or the
hidden width at fixed depth 6) and fits step_time ~ a * x^b by least squares in log-log
space: b is the exponent a user multiplies by to predict a sweep's cost. The matmul FLOPs
per step are listed too: time / FLOPs approaches a constant once a config is large enough
to be compute-bound, and the FLOP count then predicts the time.

It runs at one intra-op thread, the CPU presets' count (TrainConfig.num_threads = 1), the way a
sweep's trials run here: one thread each, side by side. A cold `make bench` runs it while the
sampling model trains in a child process on the other core (a neighbouring trial, in effect), so
that training's wait costs no extra time.
"""
from __future__ import annotations

import time

import torch

from bench import workloads as setup
from bench.core import BenchContext, Section, Table, fit_power_law, interleaved
from bench.flops import count_flops

KEY = "scaling"
THREADS = 1


def sweep(ctx: BenchContext, name: str, configs: list[setup.BenchConfig], xs: list[float], repeats: int):
    trainers = [setup.build_trainer(config, scratch=ctx.cache_dir / "scratch") for config in configs]
    batches = [setup.synthetic_batch(config) for config in configs]
    flops = [count_flops(lambda t=t, b=b: t.train_step(b))[0] for t, b in zip(trainers, batches)]
    timings = interleaved({str(i): (lambda t=t, b=b: t.train_step(b)) for i, (t, b) in enumerate(zip(trainers, batches))},
                          repeats=repeats, warmup=1)
    seconds = [timings[str(i)].median for i in range(len(configs))]
    exponent, _ = fit_power_law(xs, seconds)
    tail_exponent, _ = fit_power_law(xs[-2:], seconds[-2:])
    flop_exponent, _ = fit_power_law(xs, flops)
    rows = []
    for config, x, step, flop in zip(configs, xs, seconds, flops):
        rows.append([config.describe(), x, step * 1e3, flop / 1e9, flop / step / 1e9])
        ctx.results.record(KEY, "step_seconds", step, "s", sweep=name, x=x, describe=config.describe(),
                           step_flops=flop, repeats=repeats, statistic="median of interleaved repeats",
                           threads=torch.get_num_threads())
    ctx.results.record(KEY, "exponent", exponent, "", sweep=name, tail_exponent=tail_exponent,
                       flop_exponent=flop_exponent, xs=xs, threads=torch.get_num_threads())
    return rows, exponent, tail_exponent, flop_exponent


def run(ctx: BenchContext) -> Section:
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return measure(ctx)
    finally:
        torch.set_num_threads(previous)


def measure(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    training_alongside = ctx.background_running()
    batch = 32
    sides = ctx.pick([8, 16, 32, 64], [8, 16, 32])
    token_configs = [setup.digits(objective="selfflow", batch_size=batch, data_shape=(1, side, side))
                     for side in sides]
    widths = ctx.pick([64, 128, 256, 512], [64, 128, 256])
    width_configs = [setup.digits(objective="selfflow", batch_size=batch, data_shape=(1, 16, 16), hidden_dim=width)
                     for width in widths]
    repeats = ctx.pick(3, 2)  # the 1,024-token point alone is ~12 s a step; 3 keeps make bench under 20 min
    tables, targets_notes = [], []
    summary_rows = []
    for name, configs, xs, label in (
        ("tokens", token_configs, [float(c.num_tokens) for c in token_configs], "tokens per sample"),
        ("width", width_configs, [float(w) for w in widths], "hidden width D"),
    ):
        ctx.log(f"[scaling] {name}: {len(configs)} points, {repeats} interleaved repeats")
        rows, exponent, tail, flop_exponent = sweep(ctx, name, configs, xs, repeats)
        tables.append(Table(["config (Self-Flow step)", label, "step ms", "GFLOP per step", "achieved GFLOP/s"],
                            rows, title=f"Step time vs {label} (batch {batch})"))
        summary_rows.append([label, exponent, tail, flop_exponent])
    tables.insert(0, Table(["step time vs", "fitted exponent (all points)", "exponent (last two points)",
                            "FLOP exponent"], summary_rows, title="Fitted exponents: step_time ~ x^b"))
    return Section(
        key=KEY,
        title="Scaling of cost with work",
        command="python -m bench --only scaling",
        meaning=(
            f"Self-Flow training steps (Trainer.train_step) at {THREADS} intra-op thread (the CPU presets' count, "
            "as a sweep's trials run here side by side) on synthetic batches of 32; one sweep over tokens per "
            "sample (1 x s x s images, patch 2: s = 8 gives 16 tokens) at DiT-tiny width 96, one over the width "
            "at 64 tokens and depth 6. Times are medians of interleaved repeats. The exponent over all points "
            "mixes the overhead-bound small end with the compute-bound large end; the last-two-points exponent "
            "is the one to use when extrapolating upwards. Expected at the compute-bound end: about 1 in tokens "
            "(plus attention's N^2 term) and about 2 in width (parameters grow as D^2). To predict a config's "
            "cost: its matmul GFLOP per step (counted as in item 4) divided by the achieved GFLOP/s of the "
            "nearest measured config."
        ),
        tables=tables,
        notes=targets_notes + (["Measured while the sampling model trained in a child process (1 thread) on the "
                                "other core, as a neighbouring sweep trial would."] if training_alongside else []),
        seconds=time.perf_counter() - started,
    )
