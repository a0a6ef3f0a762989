"""What a study finds in MLflow: its finished trials, their final metrics, parameters and metric
histories (platform/scale/study.py writes them; platform/tracking/study_report.py reads them here).

A study trial is a run tagged `study` (the study's name), `study.budget` (full | quick),
`study.sweep`, `study.cell` (its sampled bindings without the seed, shortened), `study.key` (a
content hash of study, sweep, budget, trial config and seed) and `seed`. Only FINISHED runs count:
a killed trial's run stays RUNNING until the study resumes and completes it. Should a key have
several finished runs, the earliest started one is used, so the choice never depends on when the
store was read.

Metric names are looked up leniently, so the reader survives renames of the logging side: a
mixture logs `eval/<modality>/fd` where a single-modality run logs `eval/fd`, and a per-step
training clock is taken from the timestamps of whatever loss terms a run logged.
"""
from __future__ import annotations

import math
import statistics as pystats
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from selfflow.platform.errors import UserError

TAG_STUDY = "study"
TAG_BUDGET = "study.budget"
TAG_SWEEP = "study.sweep"
TAG_CELL = "study.cell"
TAG_KEY = "study.key"
TAG_ROLE = "study.role"
TAG_SEED = "seed"


@dataclass
class TrialRun:
    run_id: str
    key: str
    sweep: str
    cell: str
    seed: str
    start_time: int
    end_time: int
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of every metric
    histories: dict[str, list[tuple[int, float, int]]] = field(default_factory=dict)  # (step, value, ms)

    @property
    def duration_s(self) -> float:
        return max(0.0, (self.end_time - self.start_time) / 1000.0) if self.end_time else math.nan


def metric_name(available: Iterable[str], metric: str, modality: str = "") -> str | None:
    """The name under which a run logged `metric` (for a modality: eval/fd -> eval/<modality>/fd), or
    None. Without a modality, a run that logged only one modality's version also answers."""
    names = set(available)
    parts = metric.split("/")
    if modality:
        scoped = "/".join(parts[:1] + [modality] + parts[1:])
        if scoped in names:
            return scoped
    if metric in names:
        return metric
    if not modality:
        scoped = sorted(n for n in names if len(n.split("/")) == len(parts) + 1
                        and "/".join(n.split("/")[:1] + n.split("/")[2:]) == metric)
        if len(scoped) == 1:
            return scoped[0]
    return None


class StudyStore:
    """The finished trials of one study and budget in an MLflow store."""

    def __init__(self, tracking_uri: str, experiment: str, study: str, budget: str):
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri, self.experiment, self.study, self.budget = tracking_uri, experiment, study, budget
        self._runs: list[TrialRun] | None = None

    def experiment_id(self) -> str | None:
        found = self.client.get_experiment_by_name(self.experiment)
        return found.experiment_id if found is not None else None

    def _search(self, extra: str = "") -> list:
        experiment_id = self.experiment_id()
        if experiment_id is None:
            return []
        filter_string = f"tags.{TAG_STUDY} = '{self.study}'" + (f" and {extra}" if extra else "")
        found, token = [], None
        while True:
            page = self.client.search_runs([experiment_id], filter_string=filter_string, max_results=1000,
                                           page_token=token)
            found += list(page)
            token = page.token
            if not token:
                return found

    def finished_keys(self) -> set[str]:
        """Keys of every finished trial of this study and budget (what a resumed study skips)."""
        return {run.key for run in self.runs()}

    def runs(self) -> list[TrialRun]:
        if self._runs is None:
            chosen: dict[str, TrialRun] = {}
            for run in self._search("attributes.status = 'FINISHED'"):
                tags = run.data.tags
                if tags.get(TAG_BUDGET) != self.budget or not tags.get(TAG_KEY):
                    continue
                trial = TrialRun(
                    run_id=run.info.run_id, key=tags[TAG_KEY], sweep=tags.get(TAG_SWEEP, ""),
                    cell=tags.get(TAG_CELL, ""), seed=tags.get(TAG_SEED, ""), start_time=int(run.info.start_time or 0),
                    end_time=int(run.info.end_time or 0), params=dict(run.data.params),
                    metrics={k: float(v) for k, v in run.data.metrics.items()},
                )
                held = chosen.get(trial.key)
                if held is None or (trial.start_time, trial.run_id) < (held.start_time, held.run_id):
                    chosen[trial.key] = trial
            self._runs = sorted(chosen.values(), key=lambda r: (r.sweep, r.cell, r.seed, r.run_id))
        return self._runs

    def history(self, run: TrialRun, name: str) -> list[tuple[int, float, int]]:
        """(step, value, timestamp ms) of a metric, one value per step (the latest logged)."""
        if name not in run.histories:
            per_step: dict[int, tuple[int, float]] = {}
            for m in self.client.get_metric_history(run.run_id, name):
                held = per_step.get(int(m.step))
                if held is None or (int(m.timestamp), float(m.value)) >= held:
                    per_step[int(m.step)] = (int(m.timestamp), float(m.value))
            run.histories[name] = [(step, value, ms) for step, (ms, value) in sorted(per_step.items())]
        return run.histories[name]

    def curve(self, run: TrialRun, metric: str, modality: str = "") -> list[tuple[int, float]]:
        name = metric_name(run.metrics, metric, modality)
        return [(s, v) for s, v, _ in self.history(run, name)] if name else []

    def seconds_per_step(self, run: TrialRun) -> float:
        """Training seconds per step: the median, over consecutive training logs, of wall time between
        them divided by the steps between them. The median leaves out the intervals that also hold an
        evaluation, a checkpoint or the gap between two sittings."""
        clock = sorted(n for n in run.metrics if n.startswith("loss/")) or \
            sorted(n for n in run.metrics if n.startswith("train/"))  # what every training log holds
        if not clock:
            return math.nan
        history = self.history(run, "loss/total" if "loss/total" in clock else clock[0])
        rates = [(t1 - t0) / 1000.0 / (s1 - s0) for (s0, _, t0), (s1, _, t1) in zip(history, history[1:]) if s1 > s0]
        return float(pystats.median(rates)) if rates else math.nan

    def param(self, run: TrialRun, name: str) -> str | None:
        """A parameter by its binding name, also when a scope prefixes it (`image/DiT.depth`)."""
        if name in run.params:
            return run.params[name]
        scoped = sorted(k for k in run.params if k.endswith("/" + name))
        return run.params[scoped[0]] if scoped else None


def require_runs(store: StudyStore, keys: Sequence[str]) -> list[TrialRun]:
    """The finished runs among `keys`, in the store's order."""
    wanted = set(keys)
    runs = [run for run in store.runs() if run.key in wanted]
    if not runs and keys:
        raise UserError(f"no finished trial of study {store.study!r} ({store.budget} budget) in experiment "
                        f"{store.experiment!r} at {store.tracking_uri}: run the study first")
    return runs
