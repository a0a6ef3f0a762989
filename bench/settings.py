"""Item 8, host settings: the headline ratio (Self-Flow / FM step, digits) and absolute samples/s
under stock PyTorch and under the opt-in cpu_shared preset, side by side in one run.

The bench process itself runs under cpu_shared (bench/run.py applies it before torch loads), so
both settings are measured in child processes here (bench/procs.py), started with each setting's
environment and interleaved round by round: stock (OMP_WAIT_POLICY unset, glibc's allocator
defaults) and cpu_shared (OMP_WAIT_POLICY=PASSIVE, glibc keeps freed memory: the environment
equivalents of platform/host.py's mallopt calls). The gin config is the shipped digits experiment in
both (its teacher thread and attention kernel bindings are part of the experiment, not of the host).
Each child steps FM and Self-Flow interleaved inside itself (as a user's own measurement in one
process would); the two children take turns, one at a time, so that one's idle OpenMP threads
cannot spin beside the other's step.
"""
from __future__ import annotations

import time

import torch

from bench import workloads as setup
from bench.core import (BenchContext, Section, Table, Target, Timing, describe_rates, paired_ratio,
                        paired_ratio_interval, samples_per_s)
from bench.procs import RoundWorker

KEY = "settings"
STOCK = {"OMP_WAIT_POLICY": None, "SELFFLOW_HOST": "stock", "MALLOC_MMAP_MAX_": None, "MALLOC_TRIM_THRESHOLD_": None}
CPU_SHARED = {"OMP_WAIT_POLICY": "PASSIVE", "SELFFLOW_HOST": "cpu_shared", "MALLOC_MMAP_MAX_": "0",
              "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
SETTINGS = {"stock": STOCK, "cpu_shared": CPU_SHARED}
OBJECTIVES = ("fm", "selfflow")
TARGET_RATIO = 1.25  # the objective item's goal, here under each setting


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    threads = torch.get_num_threads()
    scratch = str(ctx.cache_dir / "scratch")
    configs = {objective: setup.digits(objective=objective) for objective in OBJECTIVES}
    repeats = ctx.pick(16, 3)
    ctx.log(f"[settings] 2 child processes (stock, cpu_shared), each stepping FM and Self-Flow interleaved, "
            f"{threads} threads, {repeats} rounds")
    workers = {setting: RoundWorker([configs[o] for o in OBJECTIVES], env, threads, scratch)
               for setting, env in SETTINGS.items()}
    seconds: dict[str, list[float]] = {f"{s}/{o}": [] for s in SETTINGS for o in OBJECTIVES}
    try:
        for _ in range(2):  # warm-up rounds
            for worker in workers.values():
                worker()
        for round_index in range(repeats):  # one child at a time; the order alternates
            order = list(SETTINGS) if round_index % 2 == 0 else list(SETTINGS)[::-1]
            for setting in order:
                for objective, value in zip(OBJECTIVES, workers[setting]()):
                    seconds[f"{setting}/{objective}"].append(value)
    finally:
        for worker in workers.values():
            worker.close()
    timings = {name: Timing(values) for name, values in seconds.items()}
    batch = configs["fm"].batch_size
    rates = {name: samples_per_s(batch, timing.median) for name, timing in timings.items()}
    rows, targets = [], []
    for setting in SETTINGS:
        fm, sf = timings[f"{setting}/fm"], timings[f"{setting}/selfflow"]
        ratio, interval = paired_ratio(sf, fm), paired_ratio_interval(sf, fm)
        rows.append([setting, fm.median * 1e3, rates[f"{setting}/fm"], sf.median * 1e3, rates[f"{setting}/selfflow"],
                     ratio, f"{interval[0]:.3f}-{interval[1]:.3f}"])
        ctx.results.record(KEY, "selfflow_over_fm", ratio, "ratio", setting=setting, config="digits", threads=threads,
                           interval_95=list(interval), fm_samples_per_s=rates[f"{setting}/fm"],
                           selfflow_samples_per_s=rates[f"{setting}/selfflow"], repeats=repeats,
                           statistic="median of paired ratios")
        targets.append(Target(f"Self-Flow / FM step time, digits, {setting} (child processes)", ratio, TARGET_RATIO,
                              "<=", interval=interval, setting=setting,
                              absolute=describe_rates({"FM": rates[f"{setting}/fm"],
                                                       "Self-Flow": rates[f"{setting}/selfflow"]}),
                              record={"item": KEY, "metric": "selfflow_over_fm", "setting": setting}))
    comparison = []
    for objective in OBJECTIVES:
        stock, tuned = timings[f"stock/{objective}"], timings[f"cpu_shared/{objective}"]
        ratio = paired_ratio(stock, tuned)
        comparison.append([objective, stock.median * 1e3, tuned.median * 1e3, ratio])
        ctx.results.record(KEY, "stock_over_cpu_shared", ratio, "ratio", objective=objective, config="digits",
                           threads=threads, stock_seconds=stock.median, cpu_shared_seconds=tuned.median,
                           repeats=repeats, statistic="median of paired ratios")
    return Section(
        key=KEY,
        title="Host settings: stock PyTorch vs the opt-in cpu_shared preset",
        command="python -m bench --only settings",
        meaning=(
            f"The digits FM and Self-Flow steps (`Trainer.train_step`, batch {batch}, {threads} intra-op threads), "
            "interleaved inside each of two child processes that take turns: stock PyTorch (OMP_WAIT_POLICY unset: libgomp spins a while, then sleeps; "
            "glibc's allocator defaults) and the opt-in `cpu_shared` preset (OMP_WAIT_POLICY=PASSIVE, freed memory "
            "kept). samples/s = batch / median step time. The first table gives "
            "the headline ratio under each setting with its absolute throughputs; the second, stock step time / "
            "cpu_shared step time (above 1: the preset is faster here). Every other item runs under cpu_shared "
            "(the bench process applies it), as its targets' setting column says."
        ),
        tables=[Table(["setting", "FM ms", "FM samples/s", "Self-Flow ms", "Self-Flow samples/s", "SF / FM",
                       "SF / FM 95% interval"], rows, title="Self-Flow / FM under each setting"),
                Table(["objective", "stock ms", "cpu_shared ms", "stock / cpu_shared"], comparison,
                      title="The same step under both settings")],
        targets=targets,
        seconds=time.perf_counter() - started,
    )
