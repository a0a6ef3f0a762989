"""Item 4, compute efficiency: achieved training FLOP/s as a fraction of measured dense matmul FLOP/s.

Training FLOPs are counted from the step's matmuls (bench_flops.count_flops: forward,
backward, teacher). The ceiling is a large square fp32 matmul in the same process with the
same threads, measured before and after the configs (the better of the two). The step's own
matmuls, recorded and replayed back to back (bench_flops.replay_seconds), split the gap to that
ceiling into what the matrix sizes cost and what everything between them costs. The second
table takes the tiny digits config apart: the same step with one setting changed at a time
(threads, attention kernel, AdamW kernel, MLP activation, allocator, OpenMP wait policy),
interleaved, to show what keeps it below the ceiling.
"""
from __future__ import annotations

import time

import torch

from bench import workloads as setup
from bench.core import BenchContext, Section, Table, interleaved, paired_ratio
from bench.flops import count_flops, dense_matmul_flops_per_s, record_matmuls, replay_seconds

KEY = "compute"
GLIBC_DEFAULTS = {"SELFFLOW_ALLOCATOR": "default"}
GLIBC_TUNED = {"SELFFLOW_ALLOCATOR": "default", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
OMP_DEFAULT = {"OMP_WAIT_POLICY": None}  # libgomp's own default: spin a while, then sleep
OMP_PASSIVE = {"OMP_WAIT_POLICY": "PASSIVE"}


def with_threads(count: int, call):
    def run() -> None:
        previous = torch.get_num_threads()
        torch.set_num_threads(count)
        try:
            call()
        finally:
            torch.set_num_threads(previous)
    return run


def efficiency_rows(ctx: BenchContext, configs: list[setup.BenchConfig], peak: float, repeats: int) -> list[list]:
    """Configs item 1 measured in this run reuse its FLOPs and step times; the rest are timed here."""
    measured = {config.key(): ctx.step_measurements[config.key()] for config in configs
                if config.key() in ctx.step_measurements}
    todo = [config for config in configs if config.key() not in measured]
    trainers: dict = {}
    if todo:
        trainers = {config: setup.build_trainer(config, scratch=ctx.cache_dir / "scratch") for config in todo}
        batches = {config: setup.synthetic_batch(config) for config in todo}
        flops = {config: count_flops(lambda c=config: trainers[c].train_step(batches[c]))[0] for config in todo}
        timings = interleaved({config.key(): (lambda c=config: trainers[c].train_step(batches[c])) for config in todo},
                              repeats=repeats, warmup=1)
        measured.update({config.key(): (flops[config], timings[config.key()]) for config in todo})
    rows = []
    for config in configs:
        flops, timing = measured[config.key()]
        step = timing.median
        achieved = flops / step
        source = "this item" if config in todo else "item 1"
        matmuls = matmuls_alone_seconds(ctx, config, trainers.get(config), repeats=ctx.pick(3, 1))
        rows.append([f"{config.name}: {config.describe()}", flops / 1e9, step * 1e3, achieved / 1e9,
                     achieved / peak, matmuls * 1e3, flops / matmuls / peak, matmuls / step, source])
        ctx.results.record(KEY, "fraction_of_peak", achieved / peak, "ratio", config=config.name,
                           describe=config.describe(), step_flops=flops, step_seconds=step,
                           achieved_flops_per_s=achieved, peak_flops_per_s=peak, repeats=len(timing.samples),
                           step_time_from=source, matmuls_alone_seconds=matmuls)
    return rows


def matmuls_alone_seconds(ctx: BenchContext, config: setup.BenchConfig, trainer=None, repeats: int = 3) -> float:
    """The config's step matmuls (shapes, layouts and order of one recorded step) replayed back to
    back: the step's time if everything between them (elementwise work, dispatch, Python) were free."""
    trainer = trainer or setup.build_trainer(config, scratch=ctx.cache_dir / "scratch")
    batch = setup.synthetic_batch(config)
    trainer.train_step(batch)  # lazily built state (optimizer moments) first: record a steady step
    return replay_seconds(record_matmuls(lambda: trainer.train_step(batch)), repeats=repeats)


def tiny_breakdown(ctx: BenchContext, peak: float, repeats: int) -> Table:
    """The digits Self-Flow step with one knob changed at a time (interleaved).

    In-process variants are compared to the step as configured; the allocator and OpenMP pairs run
    in child processes (those settings act at process start) and are compared child to child."""
    from bench.procs import StepWorker

    config = setup.digits(objective="selfflow")
    raw = setup.synthetic_batch(config)
    scratch = str(ctx.cache_dir / "scratch")
    base = setup.build_trainer(config, scratch=scratch)
    sdpa = setup.build_trainer(config.with_(extra=("DiT.attention_kernel = 'sdpa'",)), scratch=scratch)
    foreach_adamw = setup.build_trainer(config, scratch=scratch)
    for group in foreach_adamw.optimizer.param_groups:  # AdamW.step reads the kernel choice per group
        group["fused"], group["foreach"] = None, True
    tanh_gelu = setup.build_trainer(config.with_(extra=("DiT.mlp_activation = 'gelu_tanh'",)), scratch=scratch)
    teacher_inline = setup.build_trainer(config.with_(extra=(setup.TEACHER_THREAD_OFF,)), scratch=scratch)
    flops = count_flops(lambda: base.train_step(raw))[0]
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 2
    configured = (f"as configured, in process ({threads} thread{'s' if threads > 1 else ''}, attention "
                  f"kernel 'auto', fused AdamW, teacher_thread 'auto')")
    glibc_defaults = "child process, glibc malloc defaults"
    glibc_tuned = "child process, glibc malloc: no mmap for large blocks, trim threshold 1 GiB"
    omp_default = (f"child process, {threads} threads, OpenMP wait policy unset (libgomp spins, then sleeps; "
                   f"teacher_thread 'auto' then runs the teacher inline)")
    omp_default_thread = (f"child process, {threads} threads, OpenMP wait policy unset, the teacher forced onto "
                          f"the second thread (teacher_thread 'always')")
    omp_passive = (f"child process, {threads} threads, OMP_WAIT_POLICY=PASSIVE (the platform's setting; "
                   f"teacher_thread 'auto')")
    workers = {
        glibc_defaults: StepWorker(config, GLIBC_DEFAULTS, threads, scratch),
        glibc_tuned: StepWorker(config, GLIBC_TUNED, threads, scratch),
        omp_default: StepWorker(config, OMP_DEFAULT, threads, scratch),
        omp_default_thread: StepWorker(config.with_(extra=(setup.TEACHER_THREAD_ALWAYS,)), OMP_DEFAULT, threads,
                                       scratch),
        omp_passive: StepWorker(config, OMP_PASSIVE, threads, scratch),
    }
    baseline_of = {glibc_defaults: glibc_defaults, glibc_tuned: glibc_defaults,
                   omp_default: omp_default, omp_default_thread: omp_default, omp_passive: omp_default}
    variants = {
        configured: lambda: base.train_step(raw),
        f"{other} thread{'s' if other > 1 else ''}": with_threads(other, lambda: base.train_step(raw)),
        "attention through PyTorch's SDPA in student and teacher (DiT.attention_kernel = 'sdpa')":
            lambda: sdpa.train_step(raw),
        "AdamW as foreach ops, not the fused kernel": lambda: foreach_adamw.train_step(raw),
        "teacher's forward on the main thread, before the student's (SelfFlowObjective.teacher_thread = 'never')":
            lambda: teacher_inline.train_step(raw),
        "MLP activation: DiT's tanh-approximated GELU (the preset uses exact GELU)":
            lambda: tanh_gelu.train_step(raw),
        **workers,
    }
    try:
        timings = interleaved(variants, repeats=repeats, warmup=1)
    finally:
        peaks = {name: worker.close() for name, worker in workers.items()}
    rows = []
    for name, timing in timings.items():
        reference = baseline_of.get(name, configured)
        relative = paired_ratio(timing, timings[reference])
        rows.append([name, timing.median * 1e3, relative, reference if name != reference else "-",
                     flops / timing.median / peak, peaks.get(name)])
        ctx.results.record(KEY, "tiny_variant_step_seconds", timing.median, "s", variant=name, relative=relative,
                           relative_to=reference, fraction_of_peak=flops / timing.median / peak,
                           peak_rss_mb=peaks.get(name), repeats=repeats)
    return Table(["digits Self-Flow step", "ms", "time ratio", "relative to", "fraction of peak",
                  "child peak RSS MiB"], rows,
                 title="What limits the tiny config (one change at a time, interleaved)")


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    size = ctx.pick(2048, 1024)
    peak_before = dense_matmul_flops_per_s(size, repeats=ctx.pick(5, 3))
    configs = [setup.digits(objective="fm"), setup.digits(objective="selfflow")]
    if not ctx.quick:
        configs += [setup.s_size(objective="fm", batch_size=4), setup.s_size(objective="selfflow", batch_size=4)]
    ctx.log(f"[compute] {len(configs)} configs")
    rows = efficiency_rows(ctx, configs, peak_before, repeats=ctx.pick(6, 2))
    breakdown = None
    if not ctx.quick:  # four child processes (each imports torch): too slow for the quick smoke run
        ctx.log("[compute] tiny config breakdown")
        breakdown = tiny_breakdown(ctx, peak_before, repeats=12)
    peak_after = dense_matmul_flops_per_s(size, repeats=ctx.pick(5, 3))
    peak = max(peak_before, peak_after)
    if peak_after > peak_before:  # the better measurement is the ceiling: rescale the fractions
        for row in rows:
            row[4] *= peak_before / peak_after
            row[6] *= peak_before / peak_after
        for row in breakdown.rows if breakdown is not None else ():
            row[-2] *= peak_before / peak_after
    ctx.results.record(KEY, "dense_matmul_flops_per_s", peak, "FLOP/s", size=size, before=peak_before,
                       after=peak_after, threads=torch.get_num_threads(), statistic="best of repeats")
    table = Table(["config", "GFLOP per step (matmuls)", "step ms", "achieved GFLOP/s", "fraction of matmul peak",
                   "matmuls alone ms", "matmuls alone, fraction of peak", "matmuls alone / step",
                   "step time measured by"],
                  rows, title=f"Dense fp32 matmul peak ({size}x{size}, {torch.get_num_threads()} threads): "
                              f"{peak / 1e9:.1f} GFLOP/s")
    return Section(
        key=KEY,
        title="Compute efficiency: training FLOP/s vs measured matmul FLOP/s",
        command="python -m bench --only compute",
        meaning=(
            "FLOPs per step are counted from the matmuls torch dispatches during one training step (forward, "
            "backward, teacher forward; 2 FLOPs per multiply-add); elementwise work is not counted. Step times "
            "are medians of interleaved repeats; a config item 1 measured in the same run reuses its FLOPs and "
            "step time (same process, threads and step) instead of timing it again. The peak is the best of a "
            "few square fp32 matmuls in this "
            "process, before and after the configs. A fraction near 1 means the step is matmul-bound. "
            "\"Matmuls alone\" replays the matmuls and attention kernels of one recorded step (same shapes, "
            "layouts and order, inputs reused: a bound) back to back, best of a few: their own fraction of peak "
            "is what the matrix sizes allow, and \"matmuls alone / step\" the share of the step they take; the "
            "rest is elementwise work (layer norms, GELU, adaLN modulation, AdamW, EMA), per-op dispatch and "
            "Python. The second "
            "table changes one setting at a time on the digits Self-Flow step, interleaved: the thread count "
            "(with 1 thread, teacher_thread 'auto' runs the teacher inline), "
            "the attention kernel ('auto': batched matmuls with a hand-written backward for these 16 tokens at "
            "2 threads; 'sdpa': PyTorch's scaled_dot_product_attention; "
            "components/backbones/attention.py), AdamW's fused "
            "kernel against its foreach ops, the teacher's forward beside the student's on a second thread "
            "against before it on the main thread, the MLP activation (DiT's tanh-GELU is ~3x the cost of exact "
            "GELU on this CPU build, so the digits preset uses exact GELU), glibc's allocator settings and "
            "OpenMP's wait policy (these two "
            "act at process start, so each pair runs in two child processes and is compared child to child; "
            "with OpenMP's threads spinning while idle, teacher_thread 'auto' keeps the teacher on the main "
            "thread, and the row with the teacher forced onto the second thread shows why)."
        ),
        tables=[table] if breakdown is None else [table, breakdown],
        seconds=time.perf_counter() - started,
    )
