"""BENCHMARKS.md from one benchmark run: the machine, every item's tables, targets met or not.

The file is generated, never edited by hand: `make bench` rewrites it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from bench.core import Section, Table, Target
from bench.history import DEFAULT_LAST_RUNS, TargetHistory


def format_cell(value: Any) -> str:
    """Numbers with 3-4 significant digits; None and NaN as a dash; text as is (pipes escaped)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        magnitude = abs(value)
        if magnitude == 0:
            return "0"
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.1f}"
        if magnitude >= 1:
            return f"{value:.3g}" if magnitude < 10 else f"{value:.1f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def render_table(table: Table) -> str:
    lines = []
    if table.title:
        lines += [f"**{table.title}**", ""]
    lines.append("| " + " | ".join(table.columns) + " |")
    lines.append("|" + "|".join("---" for _ in table.columns) + "|")
    for row in table.rows:
        lines.append("| " + " | ".join(format_cell(cell) for cell in row) + " |")
    return "\n".join(lines)


def render_interval(target: Target) -> str:
    if target.interval is None:
        return "-"
    low, high = target.interval
    return f"{format_cell(low)}-{format_cell(high)}"


def render_target(target: Target) -> str:
    detail = f" ({target.detail})" if target.detail else ""
    interval = f", 95% interval {render_interval(target)}" if target.interval is not None else ""
    absolute = f"; {target.absolute}" if target.absolute else ""
    return (f"{target.name}: {format_cell(target.value)} (target {target.op} {format_cell(target.threshold)}"
            f"{interval}) -> **{target.verdict}** [setting: {target.setting}{absolute}]{detail}")


def summary_verdict(target: Target) -> str:
    met = "yes" if target.met else "**no**"
    return f"{met}, within noise" if target.within_noise else met


def render_section(number: int, section: Section) -> str:
    parts = [f"## {number}. {section.title}", "", f"Command: `{section.command}`", "", section.meaning.strip(), ""]
    for table in section.tables:
        parts += [render_table(table), ""]
    if section.targets:
        parts += ["Targets:", ""] + [f"- {render_target(target)}" for target in section.targets] + [""]
    if section.notes:
        parts += [f"- {note}" for note in section.notes] + [""]
    parts += [f"_Measured in {section.seconds:.0f} s._", ""]
    return "\n".join(parts)


def render_bfloat16(flags: Sequence[str] | None) -> str:
    if flags is None:
        return "bfloat16 instructions unknown"
    if not flags:
        return "no bfloat16 instructions (bfloat16 matmuls are emulated)"
    return "bfloat16 instructions: " + ", ".join(flags)


def render_history(histories: Sequence[TargetHistory], numbers: Mapping[int, int], counted: bool) -> list[str]:
    """The 'Between runs' table; numbers: id(target) -> its item number; counted: this run is among them."""
    if not histories:
        return []
    this_run = "this one included" if counted else "not this one: it is quick or has uncommitted changes"
    lines = ["### Between runs", "",
             "Each followed target over the last full runs of committed code in the history file "
             "(`runs/bench/history.jsonl`, every run on this machine's record) "
             f"(at most {DEFAULT_LAST_RUNS}, {this_run}): how many met the goal, the median of their values "
             "and the range. "
             "The runs span several commits, so the range holds changes in the code as well as the drift of "
             "the machine.", "",
             "| item | target | runs | met in | median | range | commits |", "|---|---|---|---|---|---|---|"]
    for history in histories:
        target = history.target
        low, high = history.value_range
        spread = "-" if math.isnan(low) else f"{format_cell(low)}-{format_cell(high)}"
        if history.missing_count:
            spread += f" ({history.missing_count} without a value)"
        first, last = history.commits
        commits = first if first == last else f"{first} .. {last}"
        lines.append(f"| {numbers.get(id(target), '-')} | {target.name} | {history.count} | {history.met_count} | "
                     f"{format_cell(history.median)} | {spread} | {commits or '-'} |")
    return lines + [""]


def render_report(sections: Sequence[Section], machine: Mapping[str, Any], run_info: Mapping[str, Any],
                  total_seconds: float, histories: Sequence[TargetHistory] = ()) -> str:
    dirty = " (with uncommitted changes)" if run_info.get("git_dirty") else ""
    mode = "quick (smoke sizes: numbers are indicative only)" if run_info.get("quick") else "full"
    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (`python -m bench`); do not edit by hand, rerun it.",
        f"This run's measurements are in `bench/results.jsonl` (run id `{run_info.get('run_id')}`); every "
        "run's are appended to `runs/bench/history.jsonl`.",
        "",
        f"- Command: `{run_info.get('command')}` ({mode}), started {run_info.get('started')}, "
        f"total {total_seconds / 60:.1f} min",
        f"- Code: git `{str(run_info.get('git_commit'))[:12]}`{dirty}",
        f"- Machine: {machine.get('cpu')}, {machine.get('logical_cpus')} logical CPUs, "
        f"{machine.get('memory_gb')} GB RAM, {machine.get('os')}; {render_bfloat16(machine.get('cpu_bfloat16'))}",
        f"- Software: torch {machine.get('torch')} ({machine.get('torch_threads')} intra-op threads, "
        f"{machine.get('torch_interop_threads')} inter-op), Python {machine.get('python')}",
        f"- Load average when the run started: {machine.get('load_average_at_start')} (the machine is shared; "
        "ratios come from interleaved repeats in one process, see each item)",
        "",
    ]
    targets = [(number, target) for number, section in enumerate(sections, start=1) for target in section.targets]
    if targets:
        lines += ["## Targets", "",
                  "\"95% interval\": bootstrap over the interleaved rounds of one run (see each item); "
                  "\"within noise\" means it reaches across the goal, so this run cannot tell. The drift of "
                  "a shared machine between runs comes on top of it"
                  + (": \"Between runs\" below shows it." if histories else "."), "",
                  "\"setting\": the host settings the target was measured under: `cpu_shared` is the opt-in "
                  "preset (train/cpu_shared.gin) the bench process applies, `stock` is stock PyTorch (child "
                  "processes); item \"Host settings\" measures the headline ratio under both, side by side. "
                  "\"absolute\": the throughput behind the ratio (a ratio can improve by slowing its denominator).",
                  "",
                  "| item | target | measured | 95% interval | goal | met | setting | absolute |",
                  "|---|---|---|---|---|---|---|---|"]
        for number, target in targets:
            lines.append(f"| {number} | {target.name} | {format_cell(target.value)} | {render_interval(target)} | "
                         f"{target.op} {format_cell(target.threshold)} | {summary_verdict(target)} | "
                         f"{target.setting} | {format_cell(target.absolute or None)} |")
        lines.append("")
        counted = not (run_info.get("quick") or run_info.get("git_dirty"))
        lines += render_history(histories, {id(target): number for number, target in targets}, counted)
    for number, section in enumerate(sections, start=1):
        lines.append(render_section(number, section))
    return "\n".join(lines).rstrip() + "\n"

