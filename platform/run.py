"""One training run on one process: config -> experiment -> trainer -> MLflow.

Ray Train workers and Tune trials share its callbacks and seeding (platform/distributed.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from selfflow.components.files import write_text_atomic
from selfflow.platform import checkpoint as ckpt
from selfflow.platform import config as gin_config
from selfflow.platform.callbacks import CheckpointEvery, LogOperativeConfig, SampleGrid
from selfflow.platform.distributed import configured_seed
from selfflow.platform.errors import UserError
from selfflow.platform.experiment import Experiment, build_from_gin
from selfflow.platform.tracking import MLflowTracker, NullTracker, git_commit
from selfflow.platform.trainer import Trainer


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


def extra_callbacks(experiment: Experiment) -> list:
    """Evaluation callbacks configured in gin (issue: evaluation suite)."""
    evaluation = experiment.evaluation
    if evaluation is None:
        return []
    make = getattr(evaluation, "callback", None)
    if not callable(make):
        return []
    made = make()
    return list(made) if isinstance(made, (list, tuple)) else [made]  # a mixture: one per modality


def standard_callbacks(experiment: Experiment) -> list:
    """The callbacks every training run uses (single process, Ray workers, Tune trials).
    CheckpointEvery stays last: later callbacks may rely on this step's checkpoint."""
    return [
        LogOperativeConfig(),
        SampleGrid(experiment.train.eval_every),
        *extra_callbacks(experiment),
        CheckpointEvery(experiment.train.checkpoint_every),
    ]


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
    config_str = gin_config.parse(gin_files, gin_params)
    torch.manual_seed(configured_seed())  # initialisation follows TrainConfig.seed, as in Ray workers
    experiment = build_from_gin()
    run_dir = Path(run_dir) if run_dir else default_run_dir(runs_dir, experiment.name)
    checkpoint_dir = run_dir / "checkpoints"
    state = None
    if resume:
        for folder, pattern in ((checkpoint_dir, ".*.tmp"), (run_dir, ".*.tmp"), (run_dir / "samples", ".*.png")):
            ckpt.clean_temp_files(folder, pattern)  # what a killed run left half-written
        latest, state = ckpt.load_latest(checkpoint_dir)
        if latest is None:
            raise UserError(f"--resume: no checkpoint in {checkpoint_dir}")
    elif ckpt.latest(checkpoint_dir) is not None:
        raise UserError(f"run folder {run_dir} already has checkpoints: pass --resume or another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.gin", config_str)

    tracker = NullTracker()
    if tracking:
        tags = dict(experiment.tags, git_commit=git_commit(), run_dir=str(run_dir.resolve()))
        tracker = MLflowTracker(
            tracking_uri=tracking_uri,
            experiment=experiment_name or "selfflow",
            run_id=(state or {}).get("mlflow_run_id") or None,
            run_name=experiment.name,
            tags=tags,
            parent_run_id=parent_run_id,
            runs_dir=runs_dir,
            journal_dir=run_dir,
        )
    status = "FAILED"  # whatever fails from here on ends the MLflow run as FAILED
    try:
        if tracking and state is None:
            tracker.log_params(gin_config.flatten_config(config_str))
        data = experiment.data.loader(
            batch_size=experiment.train.batch_size, seed=experiment.train.seed, rank=0, world_size=1
        )
        callbacks = standard_callbacks(experiment)
        trainer = Trainer(experiment, data, run_dir, tracker=tracker, callbacks=callbacks, progress=progress)
        trainer.mlflow_run_id = tracker.run_id
        if state is not None:
            trainer.load_state_dict(state, source=latest)
            trainer.mlflow_run_id = tracker.run_id
        final = trainer.fit()
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return RunResult(
        run_dir=run_dir,
        mlflow_run_id=tracker.run_id,
        final_metrics=final,
        checkpoint=ckpt.latest(checkpoint_dir),
        tracking_uri=getattr(tracker, "tracking_uri", None),
    )
