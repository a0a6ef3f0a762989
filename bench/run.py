"""`make bench`: the performance benchmarks, one report.

    python -m bench --out BENCHMARKS.md            # everything (< 20 min here)
    python -m bench --quick --out BENCHMARKS.quick.md   # smoke sizes (< 3 min)
    python -m bench --only objective,overhead      # some items, printed only

Items (one module each, bench/<item>.py): objective cost, platform overhead, data
path, compute efficiency, sampling quality vs NFE, memory, scaling of cost with work, host
settings (stock vs cpu_shared), torch.compile, data parallelism, checkpoint writes.
Every measurement is appended to the history file (runs/bench/history.jsonl, git-ignored), which
the report's "Between runs" table reads; a full run (every item, not --quick) also rewrites
bench/results.jsonl with its own records (committed beside BENCHMARKS.md, which is generated from
this run). Nothing fails on time: the report says which targets are met.
"""
from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Sequence

from selfflow.platform import host

# The benchmarks run under the opt-in cpu_shared host preset (train/cpu_shared.gin), applied before
# torch loads OpenMP, as the CLI does; items that compare settings start child processes.
host.apply_before_torch("cpu_shared")
host.keep_freed_memory()

import torch  # noqa: E402

from bench.core import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_HISTORY,
    DEFAULT_RESULTS,
    BenchContext,
    ResultsLog,
    Section,
    machine_info,
    new_run_info,
)
from bench.history import histories, read_records  # noqa: E402
from bench.report import render_report, render_section  # noqa: E402
from selfflow.components.files import write_text_atomic  # noqa: E402

ITEMS = ("objective", "overhead", "data", "compute", "sampling", "memory", "scaling", "settings", "compile",
         "parallel", "checkpoint")
# Memory and scaling run before sampling so that the sampling model, when it is not cached, trains
# in a child process (1 thread) meanwhile: memory measures peak RSS, which CPU contention does not
# change, and scaling runs at 1 thread on the other core, as a sweep's trials do here (together they
# save ~3 min of a cold run). The report keeps the ITEMS order.
RUN_ORDER = ("objective", "overhead", "data", "compute", "memory", "scaling", "sampling", "settings", "compile",
             "parallel", "checkpoint")
OVERLAP_MODEL_TRAINING = ("memory", "scaling")


def run_item(name: str, ctx: BenchContext) -> Section:
    module = importlib.import_module(f"bench.{name}")
    return module.run(ctx)


def parse_items(text: str | None) -> list[str]:
    if not text:
        return list(ITEMS)
    chosen = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in chosen if item not in ITEMS]
    if unknown:
        raise SystemExit(f"bench: unknown item(s) {unknown}; choose from {', '.join(ITEMS)}")
    return [item for item in ITEMS if item in chosen]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes: every item, a few repeats (< 3 min)")
    parser.add_argument("--out", default=None, help="write the Markdown report here (e.g. BENCHMARKS.md)")
    parser.add_argument("--only", default=None, help=f"comma-separated items out of: {', '.join(ITEMS)}")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS),
                        help="JSON-lines file a full run rewrites with its records ('' = none)")
    parser.add_argument("--history", default=str(DEFAULT_HISTORY),
                        help="JSON-lines file every run appends to; the Between runs table reads it ('' = none)")
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="cache folder (trained models, shards)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = torch's default)")
    args = parser.parse_args(argv)
    items = parse_items(args.only)
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    run_info = new_run_info(args.quick, command.strip())
    machine = machine_info()
    earlier_records = []  # the report follows targets across the runs on record
    history = Path(args.history) if args.history else None
    if history is not None and not history.exists() and args.results and Path(args.results).exists():
        history.parent.mkdir(parents=True, exist_ok=True)  # a fresh clone: history starts at the committed run
        history.write_text(Path(args.results).read_text())
    if history is not None and history.exists():
        try:  # a bad file fails now, not after the run
            earlier_records = read_records(history)
        except ValueError as error:
            raise SystemExit(f"bench: {error}") from None
    results = ResultsLog(history, run_info)
    results.record("machine", "info", 0, "", **machine, command=run_info["command"])
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ctx = BenchContext(quick=args.quick, results=results, cache_dir=cache, command=run_info["command"],
                       machine=machine, log=lambda text: print(text, file=sys.stderr, flush=True))

    started = time.perf_counter()
    sections: dict[str, Section] = {}
    try:
        for name in sorted(items, key=RUN_ORDER.index):
            if name in OVERLAP_MODEL_TRAINING and "sampling" in items and not ctx.background:
                from bench.sampling import start_background_training
                start_background_training(ctx)
            ctx.log(f"== {name} ==")
            section = sections[name] = run_item(name, ctx)
            print(render_section(items.index(name) + 1, section), flush=True)
            ctx.log(f"== {name}: {section.seconds:.0f} s (total {time.perf_counter() - started:.0f} s) ==")
    finally:
        for job in ctx.background.values():
            job.stop()  # an item failed or was interrupted: no orphan trainer
    total = time.perf_counter() - started
    results.record("run", "total_seconds", total, "s", items=items)
    if args.results and not args.quick and list(items) == list(ITEMS):  # the last full run's records only
        write_text_atomic(args.results, "".join(json.dumps(record, sort_keys=True, default=str) + "\n"
                                                for record in results.records))
    if args.out:
        # Atomic: an interrupted bench never leaves half a report.
        chosen = [sections[name] for name in items]
        targets = [target for section in chosen for target in section.targets]
        followed = histories(earlier_records + results.records, targets) if history is not None else []
        path = write_text_atomic(args.out, render_report(chosen, machine, run_info, total, followed))
        ctx.log(f"report written to {path} ({total / 60:.1f} min)")
    return 0

