"""`selfflow sweep <sweep gin file>`: a Ray Tune sweep over gin bindings, tracked in MLflow.

A sweep file binds `Sweep.*` (experiments/sweeps/*.gin):

    Sweep.base_files = ['digits/fm.gin']          # the experiment(s) every trial starts from
    Sweep.bindings = ['TrainConfig.steps = 300']  # fixed bindings, applied after the space's includes
    Sweep.space = {
        'TrainConfig.lr': ('loguniform', 1e-4, 3e-3),
        'DiT.depth': ('grid', [4, 6]),
        'include': ('grid', ['objectives/fm.gin', 'objectives/selfflow.gin']),  # a gin file per trial
    }
    Sweep.seeds = [0, 1, 2]                       # crossed with everything (binds TrainConfig.seed)

Specs: ('grid', [values]) every value; ('choice', [values]) one at random; ('uniform', a, b);
('loguniform', a, b). Strings starting with '@' or '%' are gin references, other strings are
quoted. Search: 'grid'/'random' (Tune's variant generator; num_samples draws of the random
specs, grid crossed) or 'optuna' (TPE over choice/uniform/loguniform; one seed). Scheduler:
'fifo' or 'asha' (early stopping on `metric`, in training steps).

MLflow: the driver resolves the experiment and opens one parent run (the spec as an
artifact; its journal in the sweep folder); each trial opens one child run (tag
mlflow.parentRunId, tag sweep.group = its sampled bindings without the seed, so the UI groups
children by objective or value; its sampled bindings as params) and writes its id into its trial
folder, so a retried trial (from its last checkpoint, Tune's FailureConfig) keeps writing into
the same child run. When the trials are done the parent holds the comparison (platform/tracking/
compare.py) as a table (`compare/comparison.json`, the UI's table view) and text, the
metric-versus-step plots, a table of the trials (`sweep/trials.json`) and, in its description,
a link to every child run.

Resources: a trial with one worker trains inside its Tune trial (cpus_per_worker CPUs); with
several it builds and fits a TorchTrainer and its Tune trial reserves no CPU (a Tune trial
holding 1 CPU while its 2 workers wait for 2 more deadlocks a 2-core machine). Concurrency
never exceeds what the cluster's CPUs (and GPUs) can run at once.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import gin

from selfflow.components.files import write_text_atomic
from selfflow.platform import host
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.configurable import configurable
from selfflow.platform.config.experiment import train_config_from_gin
from selfflow.platform.errors import ConfigError, UserError
from selfflow.platform.scale.ray_train import (
    Scaling,
    make_torch_trainer,
    plain_error,
    train_in_ray,
    worker_device,
    worker_environment,
)
from selfflow.platform.train.driver import RunSpec, experiment_name_in_config, launch_tags
from selfflow.platform.train.interrupts import SIGNALS, RunInterrupted

SPEC_KINDS = ("grid", "choice", "uniform", "loguniform")
SEARCHES = ("grid", "random", "optuna")
SCHEDULERS = ("fifo", "asha")
INCLUDE_KEY = "include"
SEED_KEY = "TrainConfig.seed"
RUN_ID_FILE = "mlflow_run_id.txt"
# A sweep run on given trial points (a study: platform/scale/study.py) grids over this one key; each
# value is JSON (Tune leaves a string alone) of the sampled bindings, the trial's own run folder and
# the tags of its MLflow run.
POINT_KEY = "_point"


# ---- the spec -----------------------------------------------------------------------------------


@dataclass
class SweepSpec:
    name: str
    base_files: list[str]
    bindings: list[str]
    space: dict[str, tuple]
    seeds: list[int]
    search: str = "grid"
    num_samples: int = 1
    scheduler: str = "fifo"
    metric: str = "loss/flow"
    mode: str = "min"
    grace_period: int = 0
    reduction_factor: float = 2.0
    max_concurrent: int = 0
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    experiment: str = "selfflow"
    compare_metrics: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.base_files, self.bindings, self.seeds = list(self.base_files), list(self.bindings), list(self.seeds)
        self.space = {str(key): tuple(spec) for key, spec in dict(self.space).items()}
        if not self.name or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(f"Sweep.name must be letters, digits, '_', '.', '-', got {self.name!r}")
        if not self.base_files and INCLUDE_KEY not in self.space:
            raise ConfigError("Sweep.base_files is empty and the space has no 'include': trials would have no experiment")
        if self.search not in SEARCHES:
            raise ConfigError(f"Sweep.search must be one of {SEARCHES}, got {self.search!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"Sweep.scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        if self.mode not in ("min", "max"):
            raise ConfigError(f"Sweep.mode must be 'min' or 'max', got {self.mode!r}")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise ConfigError(f"Sweep.seeds must be a non-empty list of ints >= 0, got {self.seeds!r}")
        if SEED_KEY in self.space:
            raise ConfigError(f"bind seeds with Sweep.seeds, not '{SEED_KEY}' in Sweep.space")
        for name in ("num_samples", "workers_per_trial"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Sweep.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent < 0 or self.max_failures < -1 or self.grace_period < 0:
            raise ConfigError("Sweep.max_concurrent and grace_period must be >= 0, max_failures >= -1")
        for key, spec in self.space.items():
            check_spec(key, spec)
        if self.search == "optuna":
            grids = [key for key, spec in self.space.items() if spec[0] == "grid"]
            if grids:
                raise ConfigError(f"search='optuna' samples choice/uniform/loguniform; '{grids[0]}' is a grid")
            if len(self.seeds) != 1:
                raise ConfigError(f"search='optuna' runs one seed per configuration, got Sweep.seeds={self.seeds}")


def check_spec(key: str, spec: tuple) -> None:
    if not spec or spec[0] not in SPEC_KINDS:
        raise ConfigError(f"Sweep.space['{key}'] must start with one of {SPEC_KINDS}, got {spec!r}")
    kind = spec[0]
    if kind in ("grid", "choice"):
        if len(spec) != 2 or not isinstance(spec[1], (list, tuple)) or not spec[1]:
            raise ConfigError(f"Sweep.space['{key}'] = ('{kind}', [values]) needs a non-empty list, got {spec!r}")
    else:
        if len(spec) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[1:]):
            raise ConfigError(f"Sweep.space['{key}'] = ('{kind}', low, high) needs two numbers, got {spec!r}")
        low, high = spec[1], spec[2]
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"Sweep.space['{key}']: need 0 < low < high for loguniform, low < high for uniform; got {spec!r}")
    if key == INCLUDE_KEY and kind not in ("grid", "choice"):
        raise ConfigError(f"Sweep.space['include'] chooses gin files: use grid or choice, got {kind!r}")


@configurable("Sweep", module="selfflow")
def sweep_spec(
    name: str = gin.REQUIRED,
    base_files: Sequence[str] = (),
    bindings: Sequence[str] = (),
    space: dict | None = None,
    seeds: Sequence[int] = (0,),
    search: str = "grid",
    num_samples: int = 1,
    scheduler: str = "fifo",
    metric: str = "loss/flow",
    mode: str = "min",
    grace_period: int = 0,
    reduction_factor: float = 2.0,
    max_concurrent: int = 0,
    workers_per_trial: int = 1,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    max_failures: int = 2,
    experiment: str = "selfflow",
    compare_metrics: Sequence[str] = (),
) -> SweepSpec:
    return SweepSpec(
        name=name, base_files=list(base_files), bindings=list(bindings), space=dict(space or {}), seeds=list(seeds),
        search=search, num_samples=num_samples, scheduler=scheduler, metric=metric, mode=mode,
        grace_period=grace_period, reduction_factor=reduction_factor, max_concurrent=max_concurrent,
        workers_per_trial=workers_per_trial, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
        max_failures=max_failures, experiment=experiment, compare_metrics=list(compare_metrics),
    )


def load_spec(path: str | os.PathLike, overrides: Sequence[str] = ()) -> tuple[SweepSpec, str]:
    """Parse a sweep gin file (+ `Sweep.x = ...` overrides). Returns the spec and the file's text."""
    resolved = gin_config.resolve_config_file(path)
    gin_config.parse([resolved], overrides, finalize=False)
    try:
        spec = sweep_spec()
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{resolved}: {str(error).strip().splitlines()[0]}") from None
    finally:
        gin.clear_config()
    return spec, resolved.read_text()


# ---- bindings of one trial ----------------------------------------------------------------------


def gin_literal(value: Any) -> str:
    if isinstance(value, str):
        return value if value.startswith(("@", "%")) else repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(gin_literal(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)


def trial_bindings(spec: SweepSpec, sampled: dict[str, Any]) -> list[str]:
    """Order: the chosen include, the sweep's fixed bindings, the sampled bindings, the seed."""
    lines = []
    if INCLUDE_KEY in sampled:
        lines.append(f"include '{sampled[INCLUDE_KEY]}'")
    lines += spec.bindings
    lines += [f"{key} = {gin_literal(value)}" for key, value in sampled.items() if key not in (INCLUDE_KEY, SEED_KEY)]
    lines.append(f"{SEED_KEY} = {int(sampled[SEED_KEY])}")
    return lines


def group_label(sampled: dict[str, Any]) -> str:
    """What a trial is, apart from its seed: `include=fm TrainConfig.lr=0.001`."""
    parts = []
    for key, value in sampled.items():
        if key == SEED_KEY:
            continue
        if key == INCLUDE_KEY:
            value = Path(str(value)).with_suffix("").as_posix()
        elif isinstance(value, float):
            value = f"{value:.4g}"
        parts.append(f"{key}={value}")
    return " ".join(parts) or "all"


def representative_points(spec: SweepSpec, limit: int = 64) -> list[dict[str, Any]]:
    """Configurations to validate on the driver: every grid/choice value, range ends."""
    axes = []
    for key, spec_value in spec.space.items():
        kind = spec_value[0]
        values = list(spec_value[1]) if kind in ("grid", "choice") else [spec_value[1], spec_value[2]]
        axes.append([(key, v) for v in values])
    points = []
    for combo in itertools.islice(itertools.product(*axes), limit):
        points.append(dict(combo, **{SEED_KEY: spec.seeds[0]}))
    return points


def tune_space(spec: SweepSpec, points: Sequence[dict] | None = None) -> dict[str, Any]:
    from ray import tune

    if points is not None:
        return {POINT_KEY: tune.grid_search([json.dumps(point, sort_keys=True) for point in points])}
    space: dict[str, Any] = {}
    for key, (kind, *args) in spec.space.items():
        if kind == "grid":
            space[key] = tune.grid_search(list(args[0]))
        elif kind == "choice":
            space[key] = tune.choice(list(args[0]))
        elif kind == "uniform":
            space[key] = tune.uniform(*args)
        else:
            space[key] = tune.loguniform(*args)
    space[SEED_KEY] = spec.seeds[0] if spec.search == "optuna" else tune.grid_search(list(spec.seeds))
    return space


# ---- one trial (runs in a Ray Tune trial actor) -------------------------------------------------


@dataclass(frozen=True)
class TrialPlan:
    """What every trial shares, shipped by the driver (tags: the launcher's provenance)."""

    spec: SweepSpec
    base_config: str
    sweep_dir: str
    cwd: str
    tracking_uri: str | None
    experiment_id: str | None
    parent_run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)


def given_point(config: dict[str, Any]) -> dict[str, Any]:
    """The trial point a caller gave (run_sweep(points=...)), or {}."""
    raw = config.get(POINT_KEY)
    return json.loads(raw) if raw else {}


def _sampled(plan: TrialPlan, config: dict[str, Any]) -> dict[str, Any]:
    if POINT_KEY in config:
        return dict(given_point(config)["sampled"])
    keys = [*plan.spec.space, SEED_KEY]
    return {key: config[key] for key in keys}


def child_tags(plan: TrialPlan, run_dir: Path, trial_id: str, sampled: dict[str, Any],
               extra_tags: dict[str, str] | None = None) -> dict[str, str]:
    """A child run's tags: the sweep's provenance, its group and seed, a description linking its parent,
    and what the caller adds (a study's trial key)."""
    group = group_label(sampled)
    parent = (f"[{plan.spec.name}](#/experiments/{plan.experiment_id}/runs/{plan.parent_run_id})"
              if plan.parent_run_id else plan.spec.name)
    note = f"Trial `{trial_id}` of sweep {parent}: `{group}`, seed {sampled[SEED_KEY]}."
    tags = {
        **plan.tags,
        "mlflow.parentRunId": plan.parent_run_id or "",
        "sweep": plan.spec.name,
        "sweep.trial_id": trial_id,
        "sweep.group": group,
        "seed": str(sampled[SEED_KEY]),
        "run_dir": str(run_dir),
        "mlflow.note.content": note,
        **(extra_tags or {}),
    }
    return {key: value for key, value in tags.items() if value}


def open_child_run(plan: TrialPlan, run_dir: Path, trial_id: str, sampled: dict[str, Any], config_str: str,
                   extra_tags: dict[str, str] | None = None) -> str | None:
    """Create this trial's child run once; a retry reads its id back from the trial folder."""
    if not plan.tracking_uri:
        return None
    id_file = run_dir / RUN_ID_FILE
    if id_file.is_file():
        return id_file.read_text().strip()
    from mlflow.tracking import MlflowClient

    from selfflow.platform.tracking import records
    from selfflow.platform.tracking.provenance import unique_run_name

    client = MlflowClient(tracking_uri=plan.tracking_uri)
    name = experiment_name_in_config()
    run = client.create_run(plan.experiment_id, run_name=unique_run_name(f"{name}-seed{sampled[SEED_KEY]}"),
                            tags={key: records.tag_value(value)
                                  for key, value in child_tags(plan, run_dir, trial_id, sampled, extra_tags).items()})
    params = gin_config.flatten_config(config_str)
    params.update({key: str(value) for key, value in sampled.items()})  # the sampled values win
    records.send_params(client, run.info.run_id, records.param_items(params))
    write_text_atomic(id_file, run.info.run_id + "\n")
    return run.info.run_id


def run_trial(config: dict[str, Any], plan: TrialPlan) -> None:
    """The Tune function trainable."""
    from ray import tune

    try:
        trial_id = tune.get_context().get_trial_id()
        point = given_point(config)
        run_dir = Path(point.get("run_dir") or Path(plan.sweep_dir) / "trials" / trial_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        if os.path.isdir(plan.cwd):
            os.chdir(plan.cwd)
        sampled = _sampled(plan, config)
        overrides = tuple(trial_bindings(plan.spec, sampled)) + tuple(point.get("bindings") or ())
        gin_config.parse_config_string(plan.base_config, overrides)
        extra_tags = dict(point.get("tags") or {})
        run_id = open_child_run(plan, run_dir, trial_id, sampled, gin.config_str(), extra_tags)
        spec = plan.spec
        run = RunSpec(
            config_str=plan.base_config, overrides=overrides, run_dir=str(run_dir), cwd=plan.cwd,
            tracking_uri=plan.tracking_uri, experiment_name=spec.experiment, mlflow_run_id=run_id,
            threads=max(1, int(spec.cpus_per_worker)),
            tags=(child_tags(plan, run_dir, trial_id, sampled, extra_tags) if plan.tracking_uri
                  else {"sweep": spec.name, "sweep.group": group_label(sampled), **extra_tags}),
        )
        if spec.workers_per_trial == 1:
            use_gpu = spec.gpus_per_worker > 0
            train_in_ray(run, tune.report, tune.Checkpoint, tune.get_checkpoint(),
                         choose_device=lambda configured: worker_device(use_gpu, configured))
            return
        from ray.tune.integration.ray_train import TuneReportCallback

        scaling = Scaling(spec.workers_per_trial, spec.cpus_per_worker, spec.gpus_per_worker, spec.max_failures)
        trainer = make_torch_trainer(run, scaling, run_dir / "ray", name=f"trial-{trial_id}",
                                     callbacks=[TuneReportCallback()])
        trainer.fit()
    except Exception as error:
        raise plain_error(error) from None


# ---- the driver ---------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    trial_id: str
    group: str
    seed: int
    status: str  # finished | stopped_early | failed
    steps: int
    metric: float | None
    run_id: str | None
    error: str = ""


@dataclass
class SweepResult:
    sweep_dir: Path
    parent_run_id: str | None
    tracking_uri: str | None
    trials: list[TrialOutcome]
    wall_s: float
    comparison: Any = None
    interrupted: int | None = None  # the signal that stopped the sweep before its trials ended

    @property
    def failed(self) -> list[TrialOutcome]:
        return [t for t in self.trials if t.status == "failed"]


@dataclass(frozen=True)
class Checked:
    """What validate() learnt from the trial configs: TrainConfig.steps of the first (ASHA's max_t)
    and the host preset every trial names ('stock' when they differ)."""

    steps: int
    host: str


def validate(spec: SweepSpec, base_config: str) -> Checked:
    """Parse every representative trial config on the driver (errors before any trial starts)."""
    steps = None
    hosts = set()
    for point in representative_points(spec):
        overrides = trial_bindings(spec, point)
        try:
            gin_config.parse_config_string(base_config, overrides)
            gin_config.check_types([], overrides)  # a value of the wrong type, before any trial starts
            hosts.add(train_config_from_gin().host)  # and TrainConfig's own checks (ranges, betas, ...)
        except ConfigError as error:
            reason = re.sub(r"^--gin_param \d+: ", "", error.one_line())  # the bindings are listed already
            raise ConfigError(f"sweep {spec.name}, trial bindings {overrides}: {reason}") from None
        if steps is None:
            try:
                steps = int(gin.query_parameter("TrainConfig.steps"))
            except ValueError:
                steps = 1000
    gin.clear_config()
    return Checked(steps=steps or 1000, host=hosts.pop() if len(hosts) == 1 else "stock")


def concurrency(spec: SweepSpec, cpus: float, gpus: float) -> int:
    """Trials that fit at once (the driver itself holds no Ray resources)."""
    per_trial_cpus = spec.workers_per_trial * spec.cpus_per_worker
    fit = math.floor(cpus / per_trial_cpus + 1e-9)
    if spec.gpus_per_worker > 0:
        fit = min(fit, math.floor(gpus / (spec.workers_per_trial * spec.gpus_per_worker) + 1e-9))
    if fit < 1:
        raise UserError(
            f"one trial of sweep {spec.name} needs {per_trial_cpus:g} CPUs"
            + (f" and {spec.workers_per_trial * spec.gpus_per_worker:g} GPUs" if spec.gpus_per_worker else "")
            + f"; the Ray cluster has {cpus:g} CPUs, {gpus:g} GPUs"
        )
    return min(fit, spec.max_concurrent) if spec.max_concurrent else fit


def _search_and_scheduler(spec: SweepSpec, steps: int):
    search_alg, scheduler = None, None
    if spec.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=spec.seeds[0])
    if spec.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(time_attr="step", max_t=steps, grace_period=spec.grace_period or max(1, steps // 4),
                                  reduction_factor=spec.reduction_factor)
    return search_alg, scheduler


def _trial_dirname(trial) -> str:
    return trial.trial_id


def _printer():
    from ray import tune

    class PrintTrials(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            print(f"selfflow sweep: trial {trial.trial_id} done: {_brief(trial.last_result)}", flush=True)

        def on_trial_error(self, iteration, trials, trial, **info):
            print(f"selfflow sweep: trial {trial.trial_id} errored (retries left decide what follows)", flush=True)

    return PrintTrials()


def _brief(result: dict | None) -> str:
    result = result or {}
    keys = [k for k in ("step", "loss/total", "loss/flow", "eval/fd") if k in result]
    return " ".join(f"{k}={result[k]:.4g}" for k in keys)


@contextlib.contextmanager
def tune_stops_on_signal() -> Iterator[list[int]]:
    """While Tune runs in this (main) thread: the first SIGINT or SIGTERM is recorded in the yielded
    list and asks Tune to stop as its own Ctrl+C does (trials end, each keeping its newest checkpoint;
    the experiment state is saved); a second raises RunInterrupted at once. Tune's own SIGINT handler
    would swallow the signal (fit returns as if the sweep were done) and it leaves SIGTERM alone, so
    ours takes both and reaches Tune through the SIGUSR1 handler Tune always installs."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGUSR1"):
        yield received
        return

    def on_signal(signum: int, frame) -> None:
        if received:
            raise RunInterrupted(received[0])
        received.append(signum)
        print(f"selfflow sweep: {signal.Signals(signum).name}: stopping the trials (each keeps its newest "
              f"checkpoint; signal again to stop at once)", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    previous = {number: signal.signal(number, on_signal) for number in SIGNALS}
    tune_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by Tuner.fit: keep ours for SIGINT
    try:
        yield received
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if tune_handler is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = tune_handler


def run_sweep(
    path: str | os.PathLike | None,
    overrides: Sequence[str] = (),
    *,
    runs_dir: str | os.PathLike = "runs",
    sweep_dir: str | os.PathLike | None = None,
    tracking: bool = True,
    tracking_uri: str | None = None,
    compare: bool = True,
    spec: SweepSpec | None = None,
    points: Sequence[dict] | None = None,
    parent_tags: dict[str, str] | None = None,
    description: str = "",
) -> SweepResult:
    """Run the sweep of a file (or a ready `spec`). `points`: run exactly these trials instead of the
    spec's space, each {'sampled': {binding: value, TrainConfig.seed: n}, 'run_dir': folder, 'tags':
    {...}, 'bindings': [extra bindings, applied last]} (what platform/scale/study.py passes);
    `description` stands for the file's header comment on the parent run when there is no file."""
    from ray import tune

    from selfflow.platform.scale import ray_cluster
    from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri
    from selfflow.platform.tracking.provenance import unique_run_name

    # Evaluation metrics (eval/fd) appear only at eval steps; ASHA skips results without them.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    started = time.perf_counter()
    if spec is None:
        spec, spec_text = load_spec(path, overrides)
    else:
        spec_text = f"# sweep {spec.name}: the spec is spec.json, its trials points.json\n"
    base_config = gin_config.parse(spec.base_files, []) if spec.base_files else ""
    checked = validate(spec, base_config)
    steps = checked.steps
    sweep_dir = Path(sweep_dir or Path(runs_dir) / "sweeps" / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(sweep_dir / "sweep.gin", spec_text)
    write_text_atomic(sweep_dir / "spec.json", json.dumps(asdict(spec), indent=2, default=str))
    if points is not None:
        write_text_atomic(sweep_dir / "points.json", json.dumps(list(points), indent=2, default=str))

    uri = parent_id = experiment_id = None
    parent = None
    provenance_tags: dict[str, str] = {}
    if tracking:
        uri = tracking_uri or default_tracking_uri(runs_dir)
        launched = launch_tags([str(path)], overrides)
        provenance_tags = {k: v for k, v in launched.items() if k != "mlflow.note.content"}  # a child has its own
        parent = MLflowTracker(tracking_uri=uri, experiment=spec.experiment,
                               run_name=unique_run_name(f"sweep-{spec.name}"),
                               tags={**launched, "sweep": spec.name, "sweep.role": "parent", "sweep_dir": str(sweep_dir),
                                     **(parent_tags or {})},
                               runs_dir=runs_dir, journal_dir=sweep_dir)
        parent_id, experiment_id = parent.run_id, parent.experiment_id
        parent.log_params({"sweep.search": spec.search, "sweep.scheduler": spec.scheduler,
                           "sweep.metric": spec.metric, "sweep.seeds": spec.seeds,
                           "sweep.num_samples": spec.num_samples, "sweep.workers_per_trial": spec.workers_per_trial})
        parent.log_artifact(sweep_dir / "sweep.gin", "sweep")
        parent.log_artifact(sweep_dir / "spec.json", "sweep")

    # Trial processes start with the environment of the host preset the trials name (OpenMP's wait
    # policy must be set before torch loads), unless --host-tuning chose one for the whole command.
    preset = host.inherited_preset() if host.PRESET_ENV in os.environ else checked.host
    cluster = ray_cluster.connect(worker_env=worker_environment(preset))
    limit = concurrency(spec, cluster.num_cpus, cluster.num_gpus)
    print(f"selfflow sweep: {spec.name}: {spec.search} search, {spec.scheduler} scheduler, up to {limit} trials "
          f"at once on {cluster.num_cpus:g} CPUs; folder {sweep_dir}", flush=True)
    plan = TrialPlan(spec=spec, base_config=base_config, sweep_dir=str(sweep_dir), cwd=os.getcwd(),
                     tracking_uri=uri, experiment_id=experiment_id, parent_run_id=parent_id, tags=provenance_tags)
    if spec.workers_per_trial == 1:
        resources: dict[str, float] = {"cpu": spec.cpus_per_worker, "gpu": spec.gpus_per_worker}
    else:
        resources = {"memory": 1}  # the trial only waits for its TorchTrainer: no CPU for it
    search_alg, scheduler = _search_and_scheduler(spec, steps)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, plan=plan), resources),
        param_space=tune_space(spec, points),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.mode, search_alg=search_alg, scheduler=scheduler,
            num_samples=spec.num_samples, max_concurrent_trials=limit,
            trial_dirname_creator=_trial_dirname, reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=spec.name, storage_path=str(sweep_dir / "tune"),
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            callbacks=[_printer()], verbose=0,
        ),
    )
    try:
        with tune_stops_on_signal() as received:
            grid = tuner.fit()
        outcomes = [_outcome(result, spec, steps, sweep_dir) for result in grid]
        _close_child_runs(outcomes, uri)
    except BaseException as error:
        if parent is not None:
            parent.finish("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    result = SweepResult(sweep_dir=sweep_dir, parent_run_id=parent_id, tracking_uri=uri, trials=outcomes,
                         wall_s=time.perf_counter() - started, interrupted=received[0] if received else None)
    summary = write_summary(result, spec)
    if parent is not None:
        parent.log_metrics({"sweep/trials": len(outcomes), "sweep/failed": len(result.failed),
                            "sweep/wall_s": result.wall_s}, step=0)
        parent.log_artifact(summary, "sweep")
        from selfflow.platform.tracking.provenance import first_header

        header = first_header([gin_config.resolve_config_file(path)]) if path else description
        describe_children(parent, spec, outcomes, header)
    if compare and parent_id and result.interrupted is None:
        from selfflow.platform.tracking.compare import compare_runs

        try:
            result.comparison = compare_runs(tracking_uri=uri, parent_run_id=parent_id,
                                             metrics=spec.compare_metrics or None, out_dir=sweep_dir / "compare",
                                             tracker=parent)
        except UserError as error:  # e.g. a Sweep.compare_metrics no trial logged: the trials still count
            print(f"selfflow: warning: sweep comparison skipped: {error.one_line()}", file=sys.stderr, flush=True)
    if parent is not None:
        parent.log_metrics({"sweep/wall_s": time.perf_counter() - started}, step=1)
        finished = any(o.status != "failed" for o in outcomes)
        parent.finish("KILLED" if result.interrupted else "FINISHED" if finished else "FAILED")
    result.wall_s = time.perf_counter() - started
    return result


def _outcome(result, spec: SweepSpec, steps: int, sweep_dir: Path) -> TrialOutcome:
    config = result.config or {}
    metrics = result.metrics or {}
    trial_id = str(metrics.get("trial_id") or Path(result.path).name)
    point = given_point(config)
    sampled = dict(point["sampled"]) if point else {key: config.get(key) for key in [*spec.space, SEED_KEY]}
    reached = int(metrics.get("step", 0) or 0)
    if result.error is not None:
        status = "failed"
    elif reached >= steps:
        status = "finished"
    else:
        status = "stopped_early"
    id_file = Path(point.get("run_dir") or sweep_dir / "trials" / trial_id) / RUN_ID_FILE
    value = metrics.get(spec.metric)
    return TrialOutcome(
        trial_id=trial_id, group=group_label(sampled), seed=int(sampled.get(SEED_KEY) or 0), status=status,
        steps=reached, metric=float(value) if isinstance(value, (int, float)) else None,
        run_id=id_file.read_text().strip() if id_file.is_file() else None,
        error=" ".join(str(result.error).split())[:300] if result.error is not None else "",
    )


def describe_children(parent, spec: SweepSpec, outcomes: list[TrialOutcome], header: str) -> None:
    """The parent's description (`header`: the sweep file's header comment, or a study sweep's
    description; then a link to every child run) and the trials as a table (`sweep/trials.json`)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=parent.tracking_uri)
    names = {}
    for outcome in outcomes:
        if outcome.run_id:
            try:
                names[outcome.run_id] = client.get_run(outcome.run_id).info.run_name
            except Exception:  # the link still works without the name
                names[outcome.run_id] = outcome.run_id
    ordered = sorted(outcomes, key=lambda t: (t.group, t.seed))
    rows = ["| run | group | seed | status | steps | " + spec.metric + " |", "|---|---|---|---|---|---|"]
    for t in ordered:
        link = (f"[{names.get(t.run_id, t.run_id)}](#/experiments/{parent.experiment_id}/runs/{t.run_id})"
                if t.run_id else t.trial_id)
        metric = f"{t.metric:.4g}" if t.metric is not None else "-"
        rows.append(f"| {link} | `{t.group}` | {t.seed} | {t.status} | {t.steps} | {metric} |")
    note = "\n\n".join(part for part in (header, f"**{len(outcomes)} trials** (child runs):", "\n".join(rows)) if part)
    parent.set_tags({"mlflow.note.content": note})
    parent.log_table({
        "run": [names.get(t.run_id, "") for t in ordered],
        "run_id": [t.run_id or "" for t in ordered],
        "group": [t.group for t in ordered],
        "seed": [t.seed for t in ordered],
        "status": [t.status for t in ordered],
        "steps": [t.steps for t in ordered],
        spec.metric: [t.metric for t in ordered],
    }, "sweep/trials.json")


def _close_child_runs(outcomes: list[TrialOutcome], uri: str | None) -> None:
    """Early-stopped trials were killed mid-run; failed ones may have died without a word."""
    if not uri:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    for outcome in outcomes:
        if outcome.run_id is None or outcome.status == "finished":
            continue
        client.set_tag(outcome.run_id, "sweep.outcome", outcome.status)
        client.set_terminated(outcome.run_id, status="KILLED" if outcome.status == "stopped_early" else "FAILED")


def write_summary(result: SweepResult, spec: SweepSpec) -> Path:
    stopped = f", stopped by {signal.Signals(result.interrupted).name}" if result.interrupted else ""
    lines = [f"sweep {spec.name}: {len(result.trials)} trials, {len(result.failed)} failed, "
             f"wall {result.wall_s:.0f} s{stopped}", ""]
    header = f"{'trial':<14} {'status':<14} {'steps':>6} {spec.metric:>14}  group (seed)"
    lines.append(header)
    for t in sorted(result.trials, key=lambda t: (t.group, t.seed)):
        metric = f"{t.metric:.4f}" if t.metric is not None else "-"
        lines.append(f"{t.trial_id:<14} {t.status:<14} {t.steps:>6} {metric:>14}  {t.group} ({t.seed})")
    for t in result.failed:
        lines.append(f"FAILED for good: trial {t.trial_id} ({t.group}, seed {t.seed}): {t.error}")
    path = result.sweep_dir / "summary.txt"
    return write_text_atomic(path, "\n".join(lines) + "\n")


def print_summary(result: SweepResult) -> None:
    print((result.sweep_dir / "summary.txt").read_text(), end="")
    if result.failed:
        print(f"selfflow sweep: {len(result.failed)} trial(s) failed for good: "
              + ", ".join(t.trial_id for t in result.failed), file=sys.stderr)
