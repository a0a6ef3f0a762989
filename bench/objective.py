"""Item 1, objective cost: a Self-Flow training step over a vanilla flow-matching step.

Same backbone, batch and optimizer; both through the platform's Trainer.train_step
(forward, backward, clipping, AdamW, EMA). Also Self-Flow with its fast paths off
(full-depth teacher, modulation computed for every token, teacher not on a second thread).
The FLOP ratio (counted from the matmuls) is the theory the time ratio is compared to:
about one extra no-grad forward up to block 0.7 D on top of a forward + backward (~3 forwards),
i.e. ~1.23. extra_flop_budget splits it by source: the projector head and the second conditioning
row add to that theory what a shallow model with few tokens per sample cannot hide (digits: 1.308).
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

import torch

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
from bench.flops import count_flops

KEY = "objective"
TARGET_RATIO = 1.25


@contextmanager
def captured_teacher_call(trainer) -> Iterator[dict]:
    """While open, records the (args, kwargs) of each call of the trainer's teacher (its EMA model)
    in the yielded dict under "call": the exact forward the objective ran, to count it alone."""
    seen: dict = {}

    def record(module, args, kwargs) -> None:
        seen["call"] = (args, kwargs)

    handle = trainer.ema.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def teacher_forward_flops(trainer, teacher_call: dict) -> int:
    """Matmul FLOPs of the teacher forward recorded by captured_teacher_call, run again alone."""
    if "call" not in teacher_call:
        raise RuntimeError("the Self-Flow step never called its teacher: nothing to count")
    args, kwargs = teacher_call["call"]
    with torch.no_grad():
        return count_flops(lambda: trainer.ema.model(*args, **kwargs))[0]


def extra_flop_budget(flops: dict[str, int], teacher_flops: int) -> dict[str, float]:
    """Self-Flow's extra matmul FLOPs per step by source, as fractions of FM's step: "modulation"
    (the second adaLN row per sample: DTS only - FM), "teacher" (its no-grad forward to block k) and
    "head" (the projector, forward + backward: Self-Flow - DTS only - teacher).
    flops: whole-step counts of the "fm", "dts_only" and "selfflow" variants. The three add up to the
    FLOP ratio - 1: the floor no overhead work can lower."""
    fm, dts_only, selfflow = flops["fm"], flops["dts_only"], flops["selfflow"]
    return {
        "modulation": (dts_only - fm) / fm,
        "teacher": teacher_flops / fm,
        "head": (selfflow - dts_only - teacher_flops) / fm,
    }


def measure_config(ctx: BenchContext, base: setup.BenchConfig, repeats: int, warmup: int,
                   one_path_at_a_time: bool = True) -> dict:
    """one_path_at_a_time: also time Self-Flow with only one of its fast paths off."""
    variants = {
        "fm": base.with_(objective="fm"),
        "selfflow": base.with_(objective="selfflow"),
        "selfflow_slow": base.with_(objective="selfflow", extra=setup.SLOW_PATHS),
        "selfflow_no_early_exit": base.with_(objective="selfflow", extra=(setup.EARLY_EXIT_OFF,)),
        "selfflow_no_gathered": base.with_(objective="selfflow", extra=(setup.GATHERED_MODULATION_OFF,)),
        "dts_only": base.with_(objective="selfflow", extra=("SelfFlowObjective.gamma = 0.0",)),
        "selfflow_bf16_teacher": base.with_(objective="selfflow", extra=(setup.TEACHER_BFLOAT16,)),
    }
    if not one_path_at_a_time:
        del variants["selfflow_no_early_exit"], variants["selfflow_no_gathered"]
    # Variants train shared backbone objects (see build_trainer): one with the gathered modulation,
    # one without (gathered_modulation is a backbone attribute, early_exit an objective one).
    trainers = {"fm": setup.build_trainer(variants["fm"], scratch=ctx.cache_dir / "scratch")}
    trainers["selfflow_slow"] = setup.build_trainer(variants["selfflow_slow"], scratch=ctx.cache_dir / "scratch")
    gathered, ungathered = trainers["fm"].experiment.model, trainers["selfflow_slow"].experiment.model
    for name, config in variants.items():
        if name not in trainers:
            trainers[name] = setup.build_trainer(config, scratch=ctx.cache_dir / "scratch",
                                                 model=ungathered if name == "selfflow_no_gathered" else gathered)
    raw = setup.synthetic_batch(base)
    with captured_teacher_call(trainers["selfflow"]) as teacher_call:
        flops = {name: count_flops(lambda t=trainer: t.train_step(raw))[0] for name, trainer in trainers.items()}
    budget = extra_flop_budget(flops, teacher_forward_flops(trainers["selfflow"], teacher_call))
    timings = interleaved({name: (lambda t=trainer: t.train_step(raw)) for name, trainer in trainers.items()},
                          repeats=repeats, warmup=warmup)
    ratios = {name: paired_ratio(timings[name], timings["fm"]) for name in variants if name != "fm"}
    flop_ratios = {name: flops[name] / flops["fm"] for name in ratios}
    ratio_of_minima = timings["selfflow"].minimum / timings["fm"].minimum
    interval = paired_ratio_interval(timings["selfflow"], timings["fm"])
    for name in ("fm", "selfflow"):  # the compute item reuses these instead of timing them again
        ctx.step_measurements[variants[name].key()] = (flops[name], timings[name])
    for name, timing in timings.items():
        ctx.results.record(KEY, "step_seconds", timing.median, "s", config=base.name, variant=name,
                           describe=variants[name].describe(), min=timing.minimum, spread=timing.spread,
                           repeats=repeats, statistic="median of interleaved repeats", flops=flops[name])
    for name, ratio in ratios.items():
        minima = ({"ratio_of_minima": ratio_of_minima, "interval_95": list(interval)}
                  if name == "selfflow" else {})
        ctx.results.record(KEY, f"{name}_over_fm", ratio, "ratio", config=base.name,
                           statistic="median of paired ratios", flop_ratio=flop_ratios[name], repeats=repeats,
                           **minima)
    ctx.results.record(KEY, "extra_flops_over_fm", flop_ratios["selfflow"] - 1.0, "fraction of the FM step's FLOPs",
                       config=base.name, fm_flops=flops["fm"], **budget)
    objective = trainers["selfflow"].experiment.objective
    return {"timings": timings, "ratios": ratios, "flop_ratios": flop_ratios, "ratio_of_minima": ratio_of_minima,
            "interval": interval, "flop_budget": budget, "fm_flops": flops["fm"],
            "teacher_blocks": (objective.teacher_layer, objective.depth)}


def run(ctx: BenchContext) -> Section:
    started = time.perf_counter()
    # (config, repeats, warmup, one fast path off at a time). S times its fast paths off together
    # only: its single-path variants cost ~30 s each of make bench's 20 minutes (their ratios on S,
    # 1.48 and 1.62, are in bench/results.jsonl from earlier runs). The teacher thread's own cost is
    # in the compute item's breakdown (digits), not a variant here: ~15 s more. S runs 16 rounds (~6.5 s
    # each): with 8, its target's 95% interval was 0.10 wide (1.24-1.34). Digits runs 40 (~1.4 s each): with
    # 24, 0.15-0.17 wide.
    plans = [(setup.digits(batch_size=128), ctx.pick(40, 4), ctx.pick(3, 1), True)]
    if not ctx.quick:  # the quick smoke run keeps to the digits config (< 3 min for every item)
        plans.append((setup.s_size(batch_size=4), 16, 1, False))
    rows, budget_rows, targets = [], [], []
    for config, repeats, warmup, one_path_at_a_time in plans:
        ctx.log(f"[objective] {config.name}: {config.describe()}, {repeats} interleaved repeats")
        result = measure_config(ctx, config, repeats, warmup, one_path_at_a_time)
        timings, ratios, flop_ratios = result["timings"], result["ratios"], result["flop_ratios"]
        rows.append([
            f"{config.name} ({config.describe().split(', ', 1)[1]})",
            timings["fm"].median * 1e3, timings["selfflow"].median * 1e3, ratios["selfflow"],
            result["ratio_of_minima"], flop_ratios["selfflow"],
            timings["selfflow_slow"].median * 1e3, ratios["selfflow_slow"], flop_ratios["selfflow_slow"],
            ratios.get("selfflow_no_early_exit"), ratios.get("selfflow_no_gathered"),
            ratios["dts_only"], ratios["selfflow_bf16_teacher"], max(t.spread for t in timings.values()),
        ])
        budget, (k, depth) = result["flop_budget"], result["teacher_blocks"]
        floor = flop_ratios["selfflow"]
        budget_rows.append([config.name, result["fm_flops"] / 1e9, budget["modulation"], budget["teacher"],
                            k / (3 * depth), budget["head"], floor])
        floor_note = (f" = 1 + teacher {budget['teacher']:.3f} + head {budget['head']:.3f} + modulation "
                      f"{budget['modulation']:.3f}")
        if floor > TARGET_RATIO:
            floor_note += ", above the goal: only the teacher's thread hiding work can meet it"
        targets.append(Target(f"Self-Flow / FM step time, {config.name}", ratios["selfflow"], TARGET_RATIO, "<=",
                              f"FLOP ratio {floor:.3f}{floor_note}; fast paths off: {ratios['selfflow_slow']:.2f}",
                              interval=result["interval"],
                              absolute=describe_rates({"FM": samples_per_s(config.batch_size, timings["fm"].median),
                                                       "Self-Flow": samples_per_s(config.batch_size,
                                                                                  timings["selfflow"].median)}),
                              record={"item": KEY, "metric": "selfflow_over_fm", "config": config.name}))
    table = Table(
        ["config", "FM ms", "Self-Flow ms", "SF / FM", "SF / FM (min of k)", "FLOP ratio", "SF, fast paths off, ms",
         "off / FM", "FLOP ratio off", "early exit off / FM", "gathered modulation off / FM", "DTS only / FM",
         "SF, bfloat16 teacher / FM", "spread (IQR/median, worst)"],
        rows,
    )
    return Section(
        key=KEY,
        title="Objective cost: Self-Flow step / vanilla FM step",
        command="python -m bench --only objective",
        meaning=(
            "One optimizer step through the platform's `Trainer.train_step` (forward, backward, clipping, AdamW, "
            "EMA update) on a fixed synthetic batch; FM and Self-Flow share backbone, batch and optimizer. "
            "Times are medians of interleaved repeats (variants alternate in one process; the order reverses "
            "every round); ratios are medians of the per-round paired ratios (the target uses these, with a 95% "
            "bootstrap interval over the rounds); \"min of k\" divides the fastest Self-Flow step by the fastest "
            "FM step. \"Fast paths off\" is Self-Flow "
            "with `SelfFlowObjective.early_exit = False` (teacher runs all blocks), "
            "`DiT.gathered_modulation = False` (adaLN modulation computed for every token) and "
            "`SelfFlowObjective.teacher_thread = 'never'` (the teacher's no-grad forward runs on the main thread "
            "before the student's, instead of on a second thread beside it: "
            "components/objectives/teacher_thread.py; item 4 times it alone); the next two columns switch "
            "off one of the first two at a time (digits only; \"-\" for S, whose single-path variants would "
            "add about a minute). \"DTS only\" is "
            "Self-Flow with gamma = 0 (per-token levels, no teacher, no head): the cost of per-token "
            "conditioning alone. \"bfloat16 teacher\" is Self-Flow with `SelfFlowObjective.teacher_precision = "
            "'bfloat16'`: not a fast path of the method but a cheaper, rounded target (its matmuls in bfloat16: "
            "native only where the machine line above lists bfloat16 instructions, else emulated and slower); "
            "the target uses the float32 teacher. The FLOP ratio "
            "counts matmul FLOPs of the whole step: the cost the objective cannot avoid; the time ratio above "
            "it is overhead (elementwise work, the per-token gather, Python)."
        ),
        tables=[table, budget_table(budget_rows)],
        targets=targets,
        seconds=time.perf_counter() - started,
    )


def budget_table(rows: list[list]) -> Table:
    """Where Self-Flow's extra matmul FLOPs go (extra_flop_budget), one row per config."""
    return Table(
        ["config", "FM step GFLOP", "+ per-token modulation", "+ teacher to block k",
         "teacher, theory k / (3 depth)", "+ projector head", "= FLOP ratio"],
        rows,
        title=("Where the extra FLOPs go, as fractions of the FM step's matmul FLOPs (per-token modulation: "
               "DTS only - FM; teacher: its recorded forward counted alone; head: the rest, Self-Flow - "
               "DTS only - teacher). The issue's theory counts the teacher only; the head and the second "
               "conditioning row cost most where the model is shallow and a sample has few tokens."),
    )
