"""`selfflow compare`: runs grouped by objective/config, final metrics as mean ± 95% interval
over seeds, and metric-vs-step plots per group; printed and logged to MLflow (the table also as
an MLflow table, `compare/comparison.json`, which the UI shows as a table).

Runs are chosen by a sweep's parent run (its children), an experiment, and/or an MLflow
filter string. A run's group is its sweep group (tag `sweep.group`, i.e. its sampled
bindings without the seed) or, outside sweeps, its objective tag and run name. The interval
is Student's t: mean ± t(0.975, n-1) * sd / sqrt(n) over the group's runs (its seeds); one
run shows no interval.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from selfflow.components.files import atomic_path, write_text_atomic
from selfflow.platform.errors import UserError, first_line

DEFAULT_METRICS = (
    "loss/total", "loss/flow", "loss/rep", "eval/fd", "eval/sample_class_acc", "probe/linear/best",
)
PLOT_PREFIXES = ("loss/", "eval/fd", "eval/sample_class_acc", "probe/linear/best", "probe/knn/best")
EXCLUDED_ROLES = ("parent", "compare")
TABLE_FILE = "compare/comparison.json"


def without_modality(metric: str) -> str:
    """A mixture's per-modality name without its modality: eval/audio/fd -> eval/fd."""
    parts = metric.split("/")
    return "/".join(parts[:1] + parts[2:]) if len(parts) > 2 else metric


def default_metrics(present: set[str]) -> list[str]:
    """DEFAULT_METRICS that the runs logged, each followed by its per-modality versions (mixtures log
    eval/<modality>/fd where single-modality runs log eval/fd)."""
    chosen = []
    for metric in DEFAULT_METRICS:
        if metric in present:
            chosen.append(metric)
        depth = metric.count("/") + 1
        chosen += sorted(m for m in present if m.count("/") == depth and without_modality(m) == metric)
    return chosen


@dataclass
class GroupStats:
    group: str
    run_ids: list[str]
    seeds: list[str]
    values: dict[str, list[float]] = field(default_factory=dict)

    def mean_and_halfwidth(self, metric: str) -> tuple[float, float, int]:
        values = [v for v in self.values.get(metric, []) if math.isfinite(v)]
        return mean_interval(values) + (len(values),)


@dataclass
class Comparison:
    groups: list[GroupStats]
    metrics: list[str]
    table: str
    files: list[Path]


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided t interval); half-width NaN below two values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def format_cell(mean: float, half: float, n: int) -> str:
    if n == 0 or not math.isfinite(mean):
        return "-"
    if not math.isfinite(half):
        return f"{mean:.4g} (n={n})"
    return f"{mean:.4g} ± {half:.2g}"


def run_group(run) -> str:
    tags = run.data.tags
    if tags.get("sweep.group"):
        return tags["sweep.group"]
    objective = tags.get("objective", "?")
    return f"{objective} {tags.get('mlflow.runName', run.info.run_id[:8])}"


def find_runs(client, *, experiment: str | None = None, parent_run_id: str | None = None,
              filter_string: str | None = None) -> list:
    """The runs to compare (sweep parents and earlier comparisons excluded)."""
    clauses = []
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception as error:
            raise UserError(f"no MLflow run {parent_run_id}: {first_line(error, 160)}") from None
        experiment_ids = [parent.info.experiment_id]
        clauses.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    elif experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(f"no MLflow experiment named {experiment!r}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if filter_string:
        clauses.append(f"({filter_string})" if " or " in filter_string.lower() else filter_string)
    runs, token = [], None
    while True:
        try:
            page = client.search_runs(experiment_ids, filter_string=" and ".join(clauses), max_results=1000,
                                      page_token=token)
        except Exception as error:  # MLflow refuses a filter it cannot parse (INVALID_PARAMETER_VALUE)
            if getattr(error, "error_code", None) != "INVALID_PARAMETER_VALUE" or not filter_string:
                raise
            raise UserError(f"--filter {filter_string!r} is not a valid MLflow filter: {first_line(error, 200)} "
                            f"(e.g. \"tags.objective = 'SelfFlowObjective'\")") from None
        runs += [r for r in page if r.data.tags.get("sweep.role") not in EXCLUDED_ROLES]
        token = page.token
        if not token:
            break
    if not runs:
        raise UserError("no runs match (" + (" and ".join(clauses) or f"experiment {experiment}") + ")")
    return runs


def group_runs(runs: list, metrics: Sequence[str]) -> list[GroupStats]:
    """Runs grouped by `run_group`; a run that did not finish (RUNNING, which a killed process
    leaves, KILLED, FAILED) forms a group of its own status, never averaged with finished runs."""
    groups: dict[str, GroupStats] = {}
    for run in runs:
        key = run_group(run)
        if run.info.status != "FINISHED":
            key = f"{key} [{run.info.status}]"
        stats = groups.setdefault(key, GroupStats(key, [], []))
        stats.run_ids.append(run.info.run_id)
        stats.seeds.append(run.data.tags.get("seed") or run.data.params.get("TrainConfig.seed", "?"))
        for metric in metrics:
            if metric in run.data.metrics:
                stats.values.setdefault(metric, []).append(float(run.data.metrics[metric]))
    return sorted(groups.values(), key=lambda g: g.group)


def format_table(groups: list[GroupStats], metrics: Sequence[str]) -> str:
    header = ["group", "runs", *metrics]
    rows = [header]
    for g in groups:
        rows.append([g.group, str(len(g.run_ids)), *(format_cell(*g.mean_and_halfwidth(m)) for m in metrics)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _histories(client, groups: list[GroupStats], metrics: Sequence[str]) -> dict[str, dict[str, list]]:
    """metric -> group -> list (per run) of (steps, values)."""
    out: dict[str, dict[str, list]] = {}
    for metric in metrics:
        for g in groups:
            for run_id in g.run_ids:
                history = sorted(client.get_metric_history(run_id, metric), key=lambda m: m.step)
                if history:
                    out.setdefault(metric, {}).setdefault(g.group, []).append(
                        ([m.step for m in history], [m.value for m in history]))
    return out


def plot_histories(histories: dict[str, dict[str, list]], folder: Path) -> list[Path]:
    """One PNG per metric: per group, the mean over its runs at each step, band = min..max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, per_group in histories.items():
        figure, axis = plt.subplots(figsize=(6.4, 4.0))
        for group, runs in sorted(per_group.items()):
            by_step: dict[int, list[float]] = {}
            for steps, values in runs:
                for step, value in zip(steps, values):
                    by_step.setdefault(step, []).append(value)
            steps = sorted(by_step)
            means = [sum(by_step[s]) / len(by_step[s]) for s in steps]
            line, = axis.plot(steps, means, label=f"{group} (n={len(runs)})", marker="." if len(steps) < 5 else None)
            if len(runs) > 1:
                axis.fill_between(steps, [min(by_step[s]) for s in steps], [max(by_step[s]) for s in steps],
                                  color=line.get_color(), alpha=0.15, linewidth=0)
        axis.set_xlabel("step")
        axis.set_ylabel(metric)
        axis.set_title(metric)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        path = folder / (metric.replace("/", "_") + ".png")
        with atomic_path(path, suffix=".png") as temp:
            figure.savefig(temp, format="png", dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def table_columns(groups: list[GroupStats], metrics: Sequence[str]) -> dict[str, list]:
    """The comparison as columns (an MLflow table): group, runs, seeds, then mean, ci95, n per metric."""
    columns: dict[str, list] = {"group": [g.group for g in groups], "runs": [len(g.run_ids) for g in groups],
                                "seeds": [" ".join(g.seeds) for g in groups]}
    for metric in metrics:
        stats = [g.mean_and_halfwidth(metric) for g in groups]
        columns[f"{metric} mean"] = [mean if math.isfinite(mean) else None for mean, _, _ in stats]
        columns[f"{metric} ci95"] = [half if math.isfinite(half) else None for _, half, _ in stats]
        columns[f"{metric} n"] = [n for _, _, n in stats]
    return columns


def write_csv(groups: list[GroupStats], metrics: Sequence[str], path: Path) -> Path:
    with atomic_path(path) as temp, open(temp, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["group", "runs", "seeds", *[f"{m} {part}" for m in metrics for part in ("mean", "ci95", "n")]])
        for g in groups:
            cells = []
            for metric in metrics:
                mean, half, n = g.mean_and_halfwidth(metric)
                cells += [f"{mean:.6g}", f"{half:.6g}", n]
            writer.writerow([g.group, len(g.run_ids), " ".join(g.seeds), *cells])
    return path


def compare_runs(
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    filter_string: str | None = None,
    metrics: Sequence[str] | None = None,
    out_dir: str | Path = "runs/compare",
    log_to_run: str | None = None,
    log_new_run: bool = False,
    runs_dir: str | Path = "runs",
    show: bool = True,
    tracker=None,
) -> Comparison:
    """Compare runs; print the table; write table/CSV/plots to `out_dir`; log them through `tracker`
    (a sweep's parent run: its journal and queue), to `log_to_run`, or, with `log_new_run`, to a new run."""
    from mlflow.tracking import MlflowClient

    from selfflow.platform.tracking.mlflow_tracker import check_sqlite_store, default_tracking_uri

    uri = tracking_uri or default_tracking_uri(runs_dir)
    check_sqlite_store(uri)
    client = MlflowClient(tracking_uri=uri)
    runs = find_runs(client, experiment=experiment, parent_run_id=parent_run_id, filter_string=filter_string)
    present = set().union(*(r.data.metrics for r in runs))
    unknown = [m for m in metrics or () if m not in present]
    if unknown:
        logged = ", ".join(sorted(present)[:8]) + (" ..." if len(present) > 8 else "")
        raise UserError(f"--metric {unknown[0]!r}: none of the {len(runs)} compared runs logged it "
                        f"(logged: {logged or 'nothing'})")
    chosen = (list(metrics) if metrics else default_metrics(present)) or sorted(present)[:6]
    groups = group_runs(runs, chosen)
    table = format_table(groups, chosen)
    title = f"comparison of {len(runs)} runs in {len(groups)} groups (mean ± 95% t-interval over seeds)"
    if show:
        print(title)
        print(table, flush=True)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "comparison.txt", f"{title}\n{table}\n")
    files = [out_dir / "comparison.txt", write_csv(groups, chosen, out_dir / "comparison.csv")]
    plotted = sorted(m for m in present if m.startswith(PLOT_PREFIXES) or without_modality(m).startswith(PLOT_PREFIXES))
    files += plot_histories(_histories(client, groups, plotted), out_dir / "plots")

    columns = table_columns(groups, chosen)
    if tracker is not None:
        for path in files:
            tracker.log_artifact(path, "compare" if path.suffix != ".png" else "compare/plots")
        tracker.log_table(columns, TABLE_FILE)
        return Comparison(groups=groups, metrics=chosen, table=table, files=files)
    target = log_to_run
    if target is None and log_new_run:
        experiment_id = runs[0].info.experiment_id
        target = client.create_run(experiment_id, run_name=f"compare-{time.strftime('%Y%m%d-%H%M%S')}",
                                   tags={"sweep.role": "compare"}).info.run_id
    if target is not None:
        from selfflow.platform.tracking.records import send_table

        for path in files:
            client.log_artifact(target, str(path), "compare" if path.suffix != ".png" else "compare/plots")
        send_table(client, target, columns, TABLE_FILE)
        if log_new_run and target != log_to_run:
            client.set_terminated(target, "FINISHED")
    return Comparison(groups=groups, metrics=chosen, table=table, files=files)
