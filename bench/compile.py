"""Item 9, torch.compile: compiled / eager training step time, FM and Self-Flow, digits and S.

Each variant runs in its own child process (bench/procs.py: dynamo's caches and settings are per
process) under the bench's cpu_shared environment and thread count: eager as configured, and
`TrainConfig.compile = 'step'` (student, EMA teacher and objective compiled in place; inductor on
the CPU). Compile time is the compiled child's first step minus the eager child's first step, with
a fresh inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary folder: what a first run pays).
Steps are then timed interleaved across all children, after a few warm-up steps (recompilations).
"""
from __future__ import annotations

import os
import tempfile
import time

import torch

from bench import workloads as setup
from bench.core import (BenchContext, Section, Table, Target, describe_rates, interleaved, paired_ratio,
                        paired_ratio_interval, samples_per_s)
from bench.procs import StepWorker
from bench.settings import CPU_SHARED

KEY = "compile"
MODE = "step"
TARGET_RATIO = 0.75


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    threads = torch.get_num_threads()
    scratch = str(ctx.cache_dir / "scratch")
    configs = [setup.digits(objective="fm"), setup.digits(objective="selfflow")]
    if not ctx.quick:
        configs += [setup.s_size(objective="fm", batch_size=4), setup.s_size(objective="selfflow", batch_size=4)]
    compiled_extra = (f"TrainConfig.compile = '{MODE}'",)
    first_call: dict[str, float] = {}
    workers: dict[str, StepWorker] = {}
    with tempfile.TemporaryDirectory(prefix="selfflow-inductor-") as cache:
        env = {**CPU_SHARED, "TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": os.path.join(cache, "triton")}
        try:
            for config in configs:
                for variant, chosen in (("eager", config), ("compiled", config.with_(extra=compiled_extra))):
                    name = f"{config.name}/{config.objective}/{variant}"
                    ctx.log(f"[compile] {name}: first step")
                    workers[name] = StepWorker(chosen, env, threads, scratch)
                    tick = time.perf_counter()
                    workers[name]()
                    first_call[name] = time.perf_counter() - tick
            repeats = ctx.pick(8, 2)
            ctx.log(f"[compile] {len(workers)} children, {repeats} interleaved rounds")
            # Warm-up steps outside the timing: Self-Flow's per-token levels change the gathered
            # modulation's row count every step, and dynamo recompiles once before it treats it as dynamic.
            timings = interleaved(workers, repeats=repeats, warmup=ctx.pick(4, 3))
        finally:
            for worker in workers.values():
                worker.close()
    rows, targets = [], []
    for config in configs:
        base = f"{config.name}/{config.objective}"
        eager, compiled = timings[f"{base}/eager"], timings[f"{base}/compiled"]
        ratio, interval = paired_ratio(compiled, eager), paired_ratio_interval(compiled, eager)
        compile_s = first_call[f"{base}/compiled"] - first_call[f"{base}/eager"]
        rates = {"eager": samples_per_s(config.batch_size, eager.median),
                 "compiled": samples_per_s(config.batch_size, compiled.median)}
        rows.append([f"{config.name} {config.objective} ({config.describe().split(', ', 1)[1]})", eager.median * 1e3,
                     rates["eager"], compiled.median * 1e3, rates["compiled"], ratio, compile_s])
        ctx.results.record(KEY, "compiled_over_eager", ratio, "ratio", config=config.name, objective=config.objective,
                           mode=MODE, interval_95=list(interval), compile_seconds=compile_s,
                           eager_samples_per_s=rates["eager"], compiled_samples_per_s=rates["compiled"],
                           threads=threads, repeats=repeats, statistic="median of paired ratios")
        if config.name == "digits":
            targets.append(Target(f"compiled / eager step time, digits {config.objective}", ratio, TARGET_RATIO,
                                  "<=", f"compile time {compile_s:.0f} s (fresh inductor cache)", interval=interval,
                                  absolute=describe_rates(rates),
                                  record={"item": KEY, "metric": "compiled_over_eager", "config": "digits",
                                          "objective": config.objective}))
    return Section(
        key=KEY,
        title="torch.compile: compiled / eager training step",
        command="python -m bench --only compile",
        meaning=(
            f"`TrainConfig.compile = '{MODE}'` (the student and the EMA teacher compiled in place with "
            "`nn.Module.compile`, and the objective; inductor, CPU) against the same config eager, each in its "
            f"own child process ({threads} threads, cpu_shared environment), interleaved; ratios are medians of "
            "paired ratios. Compile time: the compiled child's first step minus the eager child's, with a fresh "
            "inductor cache. What cannot be one graph: the label range check (a value-dependent branch: checked "
            "on the host when compiled), the DiT's gathered modulation (torch.unique, a value-dependent size: "
            "the graph splits there; tracing it whole failed in inductor's backward at S), the teacher on a second thread (teacher_thread 'auto' at 2 threads: its "
            "forward is a separate graph) and the bmm attention kernel's host-side choice."
        ),
        tables=[Table(["config", "eager ms", "eager samples/s", "compiled ms", "compiled samples/s",
                       "compiled / eager", "compile s"], rows)],
        targets=targets,
        seconds=time.perf_counter() - started,
    )
