"""Each target across the full runs on record in the history file (runs/bench/history.jsonl): the drift.

A run's 95% interval covers its own interleaved rounds only. On a shared machine the same ratio
moves between runs by more than that (digits Self-Flow / FM read 1.24 and 1.30 an hour apart), so
the report also shows each target's value over the last few full runs on record: how many met it,
the median of the run values and their range. Only full runs of committed code count (no --quick,
no uncommitted changes); the runs span several commits, so the range mixes drift with changes in
the code, and the report names the commits.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from bench.core import Target

DEFAULT_LAST_RUNS = 10


@dataclass(frozen=True)
class RunValue:
    run_id: str
    git_commit: str
    timestamp: str
    value: float  # NaN: the run measured it but did not reach a value (e.g. no NFE within 10%)


@dataclass(frozen=True)
class TargetHistory:
    """One target's values over the last full runs on record, oldest first."""

    target: Target
    runs: tuple[RunValue, ...]

    @property
    def count(self) -> int:
        return len(self.runs)

    @property
    def met_count(self) -> int:
        return sum(self.target.satisfies(run.value) for run in self.runs)

    @property
    def missing_count(self) -> int:
        """Runs that measured the target but reached no value (NaN)."""
        return sum(math.isnan(run.value) for run in self.runs)

    def _finite(self) -> list[float]:
        return [run.value for run in self.runs if not math.isnan(run.value)]

    @property
    def median(self) -> float:
        values = self._finite()
        return statistics.median(values) if values else float("nan")

    @property
    def value_range(self) -> tuple[float, float]:
        values = self._finite()
        return (min(values), max(values)) if values else (float("nan"), float("nan"))

    @property
    def commits(self) -> tuple[str, str]:
        return (self.runs[0].git_commit[:7], self.runs[-1].git_commit[:7]) if self.runs else ("", "")


def read_records(path: str | Path) -> list[dict]:
    """Every record of a results file; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    records = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
    return records


def _matches(record: Mapping, selector: Mapping) -> bool:
    return all(record.get(key) == value for key, value in selector.items())


def _as_value(record: Mapping, missing_below: float | None) -> float:
    value = float(record["value"])
    return float("nan") if missing_below is not None and value < missing_below else value


def target_history(records: Sequence[Mapping], target: Target, last_runs: int = DEFAULT_LAST_RUNS) -> TargetHistory:
    """The target's value in each of the last `last_runs` full, clean runs whose records match
    target.record (one value per run: a run that recorded it twice keeps its last)."""
    if last_runs < 1:
        raise ValueError(f"last_runs must be >= 1, got {last_runs}")
    if not target.record:
        raise ValueError(f"target {target.name!r} names no record to follow between runs")
    by_run: dict[str, RunValue] = {}
    for record in records:
        if record.get("quick") or record.get("git_dirty") or not _matches(record, target.record):
            continue
        run = RunValue(str(record.get("run_id")), str(record.get("git_commit") or ""), str(record.get("timestamp")),
                       _as_value(record, target.missing_below))
        by_run.pop(run.run_id, None)  # re-inserted: the order is that of each run's last record
        by_run[run.run_id] = run
    runs = sorted(by_run.values(), key=lambda run: run.timestamp)[-last_runs:]
    return TargetHistory(target, tuple(runs))


def histories(records: Sequence[Mapping], targets: Iterable[Target],
              last_runs: int = DEFAULT_LAST_RUNS) -> list[TargetHistory]:
    """target_history of every target that names its record."""
    return [target_history(records, target, last_runs) for target in targets if target.record]
