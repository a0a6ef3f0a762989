"""The one training driver: config -> experiment -> data -> trainer (+ callbacks) -> tracker.

`run_training` trains one run from a `RunSpec` (plain values). It is the code path of every
training there is: `selfflow train` in one process (through `train`), each Ray Train worker
(platform/scale/ray_train.py) and each Tune trial (platform/scale/sweep.py). Whatever differs
between them comes in as arguments: the rank and world size, a checkpoint to resume from, extra
callbacks (reports to Ray), a module wrapper (DDP) and the device Ray picked.

The gin config travels as a string: the launcher parses the files once (`prepare_run`), and
`run_training` rebuilds gin's state from that string in whatever process it runs in.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import gin
import torch
from torch import nn

from selfflow.components.files import write_text_atomic
from selfflow.platform import host
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.devices import resolve_device
from selfflow.platform.config.experiment import Experiment, build_from_gin
from selfflow.platform.errors import TrainingError, UserError, write_traceback
from selfflow.platform.tracking.base import NullTracker
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri, git_commit
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.background_eval import BackgroundEvaluation
from selfflow.platform.train.callbacks import CheckpointEvery, LogOperativeConfig, SampleGrid, evaluation_callbacks
from selfflow.platform.train.parallel import ReplicaCheck
from selfflow.platform.train.trainer import Trainer


@dataclass(frozen=True)
class RunSpec:
    """Everything a training run needs, as plain values (pickled to Ray workers and Tune trials).

    config_str: gin's config after the launcher parsed files + bindings; overrides: bindings applied
    on top in the training process (a sweep trial's sampled values). mlflow_run_id: the run the
    launcher opened (None: `run_training` opens one when tracking_uri is set). threads: torch
    intra-op threads when TrainConfig.num_threads is 0 (0: torch's default).
    """

    config_str: str
    run_dir: str
    cwd: str = ""
    overrides: tuple[str, ...] = ()
    tracking_uri: str | None = None  # None: no tracking
    experiment_name: str = "selfflow"
    mlflow_run_id: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    threads: int = 0
    progress: bool = False


@dataclass
class RunResult:
    run_dir: Path
    mlflow_run_id: str | None
    final_metrics: dict[str, float]
    checkpoint: Path | None
    tracking_uri: str | None


def default_run_dir(runs_dir: str | Path, name: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path(runs_dir) / safe


def experiment_name_in_config() -> str:
    try:
        return str(gin.query_parameter("build_experiment.name"))
    except ValueError:
        return "experiment"


def standard_callbacks(experiment: Experiment, world_size: int = 1) -> list:
    """The callbacks every training run uses. CheckpointEvery stays last: callbacks added after it
    (reports to Ray) may rely on this step's checkpoint. TrainConfig.eval_mode 'background' (or
    'auto' with more than one worker) moves the sample grid and evaluation to a separate process."""
    config = experiment.train
    evaluations: list = [SampleGrid(config.eval_every), *evaluation_callbacks(experiment.evaluation)]
    if config.eval_mode == "background" or (config.eval_mode == "auto" and world_size > 1):
        evaluations = [BackgroundEvaluation(config.eval_every, evaluations[1:], gin.config_str())]
    return [LogOperativeConfig(), *evaluations, ReplicaCheck(), CheckpointEvery(config.checkpoint_every)]


def rebuild_experiment(config_str: str, overrides: Sequence[str] = ()) -> Experiment:
    """gin's state from the launcher's string (plus overrides), then the experiment."""
    gin_config.parse_config_string(config_str, overrides)
    return build_from_gin()


def clean_interrupted_writes(run_dir: Path) -> None:
    """Remove what a killed process left half-written: temp files and a sample grid being saved."""
    for folder, pattern in ((run_dir / "checkpoints", ".*.tmp"), (run_dir, ".*.tmp"), (run_dir / "samples", ".*.png")):
        ckpt.clean_temp_files(folder, pattern)


def keep_traceback(error: BaseException, folder: Path) -> None:
    """An error the platform did not diagnose keeps its full traceback in <folder>/error.log; the
    CLI names the file (platform/errors.py)."""
    if isinstance(error, (UserError, TrainingError)) or getattr(error, "traceback_file", None):
        return
    path = write_traceback(error, folder)
    try:
        error.traceback_file = path
    except AttributeError:  # an exception type with __slots__
        pass


def prepare_run(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
) -> tuple[str, Path]:
    """The launcher's side: parse the files once, pick and check the run folder, record what was
    asked (config.gin). Returns (gin config string, absolute run folder)."""
    config_str = gin_config.parse(gin_files, gin_params)
    run_dir = Path(run_dir) if run_dir else default_run_dir(runs_dir, experiment_name_in_config())
    run_dir = run_dir.resolve()
    checkpoint_dir = run_dir / "checkpoints"
    if resume and ckpt.latest(checkpoint_dir) is None:
        raise UserError(f"--resume: no checkpoint in {checkpoint_dir}")
    if not resume and ckpt.latest(checkpoint_dir) is not None:
        raise UserError(f"run folder {run_dir} already has checkpoints: pass --resume or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.gin", config_str)
    return config_str, run_dir


def run_training(
    spec: RunSpec,
    *,
    rank: int = 0,
    world_size: int = 1,
    restored: tuple[Path | None, dict[str, Any] | None] | None = None,
    extra_callbacks: Sequence[Any] = (),
    wrap_module: Callable[[nn.Module], nn.Module] | None = None,
    choose_device: Callable[[str], torch.device] = resolve_device,
) -> RunResult:
    """Train this process's part of the run in `spec` (the whole run with world_size 1).

    restored: (source, state) of the checkpoint to continue from; None: the run folder's newest,
    if any (a fresh run's folder has none: `prepare_run` checked). device: None means
    TrainConfig.device decides.
    """
    if spec.cwd and os.path.isdir(spec.cwd):
        os.chdir(spec.cwd)  # relative paths in gin files (data/, runs/) mean the launcher's folder
    experiment = rebuild_experiment(spec.config_str, spec.overrides)
    config = experiment.train
    for warning in host.apply_in_process(config.host):
        print(f"selfflow: warning: {warning}", file=sys.stderr, flush=True)
    if spec.threads and not config.num_threads:
        torch.set_num_threads(spec.threads)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clean_interrupted_writes(run_dir)
    source, state = restored if restored is not None else ckpt.load_latest(run_dir / "checkpoints")

    tracker = NullTracker()
    if rank == 0 and spec.tracking_uri:
        run_id = spec.mlflow_run_id or (state or {}).get("mlflow_run_id") or None
        tracker = MLflowTracker(tracking_uri=spec.tracking_uri, experiment=spec.experiment_name, run_id=run_id,
                                run_name=experiment.name, parent_run_id=spec.parent_run_id, journal_dir=run_dir,
                                tags=dict(experiment.tags, git_commit=git_commit(), run_dir=str(run_dir.resolve()),
                                          **spec.tags))
        if run_id is None:
            tracker.log_params(gin_config.flatten_config(spec.config_str))
    callbacks = standard_callbacks(experiment, world_size) + list(extra_callbacks) + list(experiment.callbacks)
    layout = config.layout(world_size)  # the global batch over the workers: a one-line error if it does not divide
    data = experiment.data.loader(batch_size=layout.micro_batch, seed=config.seed, rank=rank, world_size=world_size)
    status = "FAILED"  # whatever fails from here on ends the MLflow run as FAILED
    try:
        trainer = Trainer(experiment, data, run_dir, tracker=tracker, callbacks=callbacks, rank=rank,
                          world_size=world_size, wrap_module=wrap_module, progress=spec.progress and rank == 0,
                          device=choose_device(config.device))
        trainer.mlflow_run_id = tracker.run_id
        if state is not None:
            trainer.load_state_dict(state, source=source)
            trainer.mlflow_run_id = tracker.run_id
            tracker.set_tags({"resumed_at_step": str(trainer.step)})
            if not spec.progress:
                print(f"selfflow: rank {rank} resumed from {source} at step {trainer.step}", flush=True)
        final = trainer.fit()
        status = "FINISHED"
    except Exception as error:
        keep_traceback(error, run_dir if rank == 0 else run_dir / f"rank{rank}")
        raise
    finally:
        tracker.finish(status)
    return RunResult(run_dir=run_dir, mlflow_run_id=tracker.run_id, final_metrics=final,
                     checkpoint=ckpt.latest(run_dir / "checkpoints"), tracking_uri=spec.tracking_uri)


def train(
    gin_files: Sequence[str],
    gin_params: Sequence[str] = (),
    *,
    run_dir: str | Path | None = None,
    runs_dir: str | Path = "runs",
    resume: bool = False,
    tracking: bool = True,
    tracking_uri: str | None = None,
    experiment_name: str | None = None,
    parent_run_id: str | None = None,
    progress: bool = True,
) -> RunResult:
    """`selfflow train`: one run in this process."""
    config_str, run_dir = prepare_run(gin_files, gin_params, run_dir=run_dir, runs_dir=runs_dir, resume=resume)
    spec = RunSpec(
        config_str=config_str, run_dir=str(run_dir), cwd=os.getcwd(),
        tracking_uri=(tracking_uri or default_tracking_uri(runs_dir)) if tracking else None,
        experiment_name=experiment_name or "selfflow", parent_run_id=parent_run_id, progress=progress,
    )
    return run_training(spec)
