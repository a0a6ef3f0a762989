"""A saved run: rebuild its experiment, load its EMA model, evaluate it into its MLflow run
(`selfflow sample`, `selfflow eval`)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.devices import resolve_device
from selfflow.platform.config.experiment import Experiment, build_from_gin
from selfflow.platform.errors import UserError
from selfflow.platform.evaluate.suite import evaluate
from selfflow.platform.tracking.base import NullTracker
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri, quiet_mlflow
from selfflow.platform.train import checkpoint as ckpt

log = logging.getLogger("selfflow.evaluation")


def load_for_sampling(run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Sequence[str] = ()):
    """-> (experiment, EMA backbone in eval mode on TrainConfig.device, step). The run's device setting
    applies; `--gin_param "TrainConfig.device = 'cpu'"` among the overrides picks another."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.gin"
    if not config_file.is_file():
        raise UserError(f"not a run folder (no config.gin): {run_dir}")
    path = Path(checkpoint) if checkpoint else ckpt.latest(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'}")
    gin_config.parse_config_string(config_file.read_text(), overrides)
    experiment: Experiment = build_from_gin()
    state = ckpt.load(path)
    ckpt.load_model_state(experiment.model, state["ema"]["model"], "backbone", path)
    experiment.model.to(resolve_device(experiment.train.device)).eval()
    return experiment, experiment.model, int(state["step"])


@dataclass
class EvalRunResult:
    metrics: dict[str, float]
    step: int
    run_dir: Path
    mlflow_run_id: str | None
    tracking_uri: str | None


def run_dir_of(run_id: str, tracking_uri: str) -> Path:
    """The run folder recorded in an MLflow run's `run_dir` tag."""
    from mlflow.tracking import MlflowClient

    quiet_mlflow()
    try:
        run = MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except Exception as error:
        raise UserError(f"no MLflow run {run_id} at {tracking_uri}: {str(error).splitlines()[0][:160]}") from None
    folder = run.data.tags.get("run_dir")
    if not folder:
        raise UserError(f"MLflow run {run_id} has no run_dir tag: pass --run-dir")
    return Path(folder)


def evaluate_run(
    run_dir: str | os.PathLike | None = None,
    run_id: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    tracking_uri: str | None = None,
    runs_dir: str | os.PathLike | None = None,
    tracking: bool = True,
) -> EvalRunResult:
    """Evaluate a finished run's EMA model (newest checkpoint unless given) into its MLflow run."""
    if run_dir is None and run_id is None:
        raise UserError("eval needs --run-dir or --run-id")
    if tracking_uri is None and (tracking or run_dir is None):
        # A run folder made by `selfflow train` sits in its runs folder, next to mlflow.db.
        if runs_dir is None:
            runs_dir = Path(run_dir).parent if run_dir is not None else "runs"
        tracking_uri = default_tracking_uri(runs_dir)
    if run_dir is None:
        run_dir = run_dir_of(run_id, tracking_uri)
    run_dir = Path(run_dir)
    checkpoint_path = Path(checkpoint) if checkpoint else ckpt.latest(run_dir / "checkpoints")
    experiment, model, step = load_for_sampling(run_dir, checkpoint_path, overrides)
    if experiment.train.num_threads:  # as the run trained: extra threads only spin on a busy machine
        torch.set_num_threads(experiment.train.num_threads)
    if tracking and run_id is None and checkpoint_path is not None:
        run_id = ckpt.load(checkpoint_path).get("mlflow_run_id") or None
        if run_id is None:
            log.warning("checkpoint %s names no MLflow run (trained with --no-tracking?): not logging", checkpoint_path)
    tracker = NullTracker()
    previous_status = None
    if tracking and run_id:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracking_uri)
        run = client.get_run(run_id)
        previous_status = run.info.status
        name = client.get_experiment(run.info.experiment_id).name
        tracker = MLflowTracker(tracking_uri=tracking_uri, experiment=name, run_id=run_id)
    try:
        metrics = evaluate(experiment, model, step, tracker, run_dir)
    finally:
        if previous_status is not None and previous_status != "RUNNING":
            tracker.client.update_run(run_id, status=previous_status)  # as it was before we logged
    return EvalRunResult(metrics, step, run_dir, run_id if tracking else None, tracking_uri)
