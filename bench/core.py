"""Benchmark machinery shared by the bench_* items: timing, machine facts, results, report tables.

Timing on a shared machine: the variants of one comparison run interleaved in one process
(A, B, C, then C, B, A, ...), so a change in background load hits all of them alike. A ratio
is the median over repeats of the paired ratio a_r / b_r; absolute times are medians (the
minimum is recorded too). Nothing here asserts on time: the benchmarks measure and report.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform as _stdlib_platform  # the standard library module (this package is selfflow.platform)
import statistics
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Callable, Mapping, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = REPO_ROOT / "bench" / "results.jsonl"  # the last full run's records (committed)
DEFAULT_HISTORY = REPO_ROOT / "runs" / "bench" / "history.jsonl"  # every run's records (git-ignored)
DEFAULT_CACHE = REPO_ROOT / "runs" / ".cache" / "bench"


# ---- timing ----------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Seconds per call of one variant, one entry per repeat."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median (0.1 = the middle half lies within 10%)."""
        if len(self.samples) < 4:
            return (max(self.samples) - min(self.samples)) / self.median
        q1, _, q3 = statistics.quantiles(self.samples, n=4)
        return (q3 - q1) / self.median


def per_round_ratios(numerator: Timing, denominator: Timing) -> list[float]:
    """numerator_r / denominator_r for every round r (both measured in the same round)."""
    if len(numerator.samples) != len(denominator.samples) or not numerator.samples:
        raise ValueError(f"paired ratios need timings of equal, non-zero length, got "
                         f"{len(numerator.samples)} and {len(denominator.samples)}")
    return [a / b for a, b in zip(numerator.samples, denominator.samples)]


def paired_ratio(numerator: Timing, denominator: Timing) -> float:
    """Median over repeats of numerator_r / denominator_r."""
    return statistics.median(per_round_ratios(numerator, denominator))


def paired_ratio_interval(numerator: Timing, denominator: Timing, confidence: float = 0.95,
                          resamples: int = 4000, seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of paired_ratio: the rounds are resampled with replacement.

    It measures how much the median moves with the rounds this run happened to draw; the drift of
    a shared machine between runs comes on top of it.
    """
    if not 0 < confidence < 1 or resamples < 1:
        raise ValueError(f"need 0 < confidence < 1 and resamples >= 1, got {confidence}, {resamples}")
    ratios = torch.tensor(per_round_ratios(numerator, denominator), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(ratios), (resamples, len(ratios)), generator=generator)
    # quantile(0.5) averages the two middle values, as statistics.median does.
    medians = ratios[picks].quantile(0.5, dim=1)
    tail = (1 - confidence) / 2
    low, high = medians.quantile(torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return low, high


def interleaved(variants: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                inner: int = 1) -> dict[str, Timing]:
    """Time every variant `repeats` times, round-robin, alternating the order each round.

    warmup: untimed calls of each variant first (allocator, caches, lazy init).
    inner: calls per timed sample (for very short calls); the sample is the mean.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1, inner >= 1, warmup >= 0, got {repeats}, {inner}, {warmup}")
    if not variants:
        raise ValueError("interleaved needs at least one variant")
    for _ in range(warmup):
        for call in variants.values():
            call()
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for round_index in range(repeats):
        for name, call in (order if round_index % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for _ in range(inner):
                call()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: Timing(samples) for name, samples in times.items()}


def fit_power_law(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit of log y = log a + b log x -> (b, a): y ~ a x^b."""
    import math

    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least two (x, y) points of equal count, got {len(xs)} and {len(ys)}")
    if min(xs) <= 0 or min(ys) <= 0:
        raise ValueError("a power law fit needs positive x and y")
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    if sxx == 0:
        raise ValueError("a power law fit needs at least two distinct x")
    slope = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
    return slope, math.exp(my - slope * mx)


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares y = intercept + slope x -> (slope, intercept)."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"need at least two (x, y) points of equal count, got {len(xs)} and {len(ys)}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("a line fit needs at least two distinct x")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return slope, my - slope * mx


# ---- machine and code facts -----------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _stdlib_platform.processor() or "unknown"


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # instructions that run bfloat16 matmuls natively


def cpu_bfloat16_flags() -> list[str] | None:
    """Which of BFLOAT16_CPU_FLAGS /proc/cpuinfo lists ([]: bfloat16 matmuls are emulated); None if unreadable."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [flag for flag in BFLOAT16_CPU_FLAGS if flag in present]
    except OSError:
        pass
    return None


def git_state() -> tuple[str, bool]:
    """(commit hash, whether the working tree has changes)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout

    try:
        return git("rev-parse", "HEAD").strip(), bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


def machine_info() -> dict[str, Any]:
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    memory_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {
        "cpu": cpu_model(),
        "cpu_bfloat16": cpu_bfloat16_flags(),
        "logical_cpus": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": _stdlib_platform.python_version(),
        "os": f"{_stdlib_platform.system()} {_stdlib_platform.release()}",
        "load_average_at_start": [round(x, 2) for x in load],
    }


def peak_rss_mb() -> float:
    """This process's peak resident set size so far (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---- results and report pieces --------------------------------------------------------------------


@dataclass
class Target:
    """One target of the issue: `value op threshold` (op '<=' or '>=').

    interval: (low, high) around value, e.g. paired_ratio_interval's; when it reaches across the
    threshold the verdict says the run cannot tell (`within_noise`).
    record: the fields that select this target's value among the results file's records (e.g.
        {"item": "objective", "metric": "selfflow_over_fm", "config": "digits"}), so the report can
        follow it across runs (bench_history.py); None: not followed.
    missing_below: recorded values below it mean "not reached" (e.g. -1 NFE), NaN between runs.
    setting: the host settings it was measured under ('cpu_shared': the bench process, which applies
        the opt-in preset; 'stock': stock PyTorch, in child processes; or a description).
    absolute: the absolute figures behind a ratio (samples/s of each side), shown beside it.
    """

    name: str
    value: float
    threshold: float
    op: str
    detail: str = ""
    interval: tuple[float, float] | None = None
    record: Mapping[str, Any] | None = None
    missing_below: float | None = None
    setting: str = "cpu_shared"
    absolute: str = ""

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise ValueError(f"Target.op must be '<=' or '>=', got {self.op!r}")
        if self.interval is not None and not self.interval[0] <= self.interval[1]:
            raise ValueError(f"Target.interval must be (low, high) with low <= high, got {self.interval!r}")

    def satisfies(self, value: float) -> bool:
        if value != value:  # NaN: not measured
            return False
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    @property
    def met(self) -> bool:
        """The point estimate meets the target."""
        return self.satisfies(self.value)

    @property
    def within_noise(self) -> bool:
        """The interval holds values on both sides of the threshold."""
        if self.interval is None:
            return False
        return self.satisfies(self.interval[0]) != self.satisfies(self.interval[1])

    @property
    def verdict(self) -> str:
        return ("met" if self.met else "NOT met") + (", within noise" if self.within_noise else "")


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]
    title: str = ""

    def __post_init__(self) -> None:
        for row in self.rows:
            if len(row) != len(self.columns):
                raise ValueError(f"table {self.title!r}: row {row!r} has {len(row)} cells for "
                                 f"{len(self.columns)} columns")


@dataclass
class Section:
    """What one benchmark item contributes to the report."""

    key: str
    title: str
    command: str
    meaning: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


class ResultsLog:
    """Appends one JSON line per measurement to the results file (never rewrites it)."""

    def __init__(self, path: str | os.PathLike | None, run_info: Mapping[str, Any]):
        self.path = Path(path) if path else None
        self.run_info = dict(run_info)
        self.records: list[dict[str, Any]] = []

    def record(self, item: str, metric: str, value: float, unit: str, **fields: Any) -> dict[str, Any]:
        entry = {
            "run_id": self.run_info.get("run_id"),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": self.run_info.get("git_commit"),
            "git_dirty": self.run_info.get("git_dirty"),
            "quick": self.run_info.get("quick"),
            "item": item,
            "metric": metric,
            "value": value if isinstance(value, (int, str)) else float(value),
            "unit": unit,
            **fields,
        }
        self.records.append(entry)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(entry, sort_keys=True, default=str) + "\n")
        return entry


@dataclass
class BackgroundJob:
    """A child process an item started ahead of time, its output log and what it produces."""

    process: subprocess.Popen
    log: IO[str]
    output: Path
    started: float

    def stop(self) -> None:
        """Kill it if it still runs (an item failed or the bench was interrupted) and close its log."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log.close()


@dataclass
class BenchContext:
    """What every item gets: size mode, results log, cache folder, the command line."""

    quick: bool
    results: ResultsLog
    cache_dir: Path
    command: str
    machine: dict[str, Any]
    log: Callable[[str], None] = print
    # Training-step measurements of this run, by BenchConfig.key(): (matmul FLOPs, Timing). Item 1
    # fills it; item 4 reuses what is there instead of timing the same configs again.
    step_measurements: dict[str, tuple[float, Timing]] = field(default_factory=dict)
    # Child processes an item started ahead of time (e.g. model training), by name; main() stops
    # any still running when the bench ends.
    background: dict[str, BackgroundJob] = field(default_factory=dict)

    def pick(self, full: Any, quick: Any) -> Any:
        return quick if self.quick else full

    def background_running(self) -> bool:
        """Whether a child process started ahead of time is still running (its CPU use overlaps)."""
        return any(job.process.poll() is None for job in self.background.values())


def new_run_info(quick: bool, command: str) -> dict[str, Any]:
    commit, dirty = git_state()
    return {
        "run_id": uuid.uuid4().hex[:12],
        "git_commit": commit,
        "git_dirty": dirty,
        "quick": quick,
        "command": command,
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def samples_per_s(batch: int, seconds: float) -> float:
    return batch / seconds if seconds > 0 else float("nan")


def describe_rates(rates: Mapping[str, float]) -> str:
    """'FM 1,150 samples/s, Self-Flow 840 samples/s' from {name: samples/s}."""
    return ", ".join(f"{name} {rate:,.0f} samples/s" for name, rate in rates.items())


def as_jsonable(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value
