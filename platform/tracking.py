"""Experiment tracking: MLflow (embedded SQLite by default) or nothing.

Only rank 0 constructs an MLflowTracker; other ranks get a NullTracker.
"""
from __future__ import annotations

import logging
import math
import os
import subprocess
import time
from pathlib import Path
from typing import Mapping, Protocol

from selfflow.platform.errors import UserError

DEFAULT_EXPERIMENT = "selfflow"
_PARAM_BATCH = 100  # MLflow's log_batch limit on params per call
_METRIC_BATCH = 1000


def default_tracking_uri(runs_dir: str | os.PathLike = "runs") -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite in the runs folder of the working directory."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(runs_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parents[1],
            capture_output=True, text=True, timeout=5, check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, object]) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """For ranks other than 0 and for runs with tracking switched off."""

    run_id = None

    def log_params(self, params):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def finish(self, status="FINISHED"):
        pass


def _quiet_mlflow() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store.db"):
        logging.getLogger(name).setLevel(logging.WARNING)


class MLflowTracker:
    """Logs into one MLflow run through the client API (explicit run ids, no global state)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        runs_dir: str | os.PathLike = "runs",
    ):
        _quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.experiment_id = self._experiment_id(experiment, runs_dir)
        if run_id is not None:
            try:
                self.client.get_run(run_id)
            except Exception as error:
                raise UserError(f"cannot resume MLflow run {run_id} at {self.tracking_uri}: {str(error)[:160]}") from None
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
        else:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
            self.run_id = run.info.run_id

    def _experiment_id(self, name: str, runs_dir) -> str:
        try:
            found = self.client.get_experiment_by_name(name)
        except Exception as error:  # unreachable server or unusable database: fail before training
            raise UserError(f"MLflow tracking store unreachable at {self.tracking_uri}: {str(error).splitlines()[0][:200]}") from None
        if found is not None:
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:"):
            location = (Path(runs_dir).resolve() / "artifacts").as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:
            # Another process created it between our lookup and create.
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, params: Mapping[str, object]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [
            Param(key[:250], str(value)[:6000])
            for key, value in params.items()
            if key[:250] not in existing  # a resumed run may not re-log params
        ]
        for start in range(0, len(items), _PARAM_BATCH):
            self.client.log_batch(self.run_id, params=items[start:start + _PARAM_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(key, float(value), now, int(step)) for key, value in metrics.items() if math.isfinite(float(value))]
        for start in range(0, len(items), _METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=items[start:start + _METRIC_BATCH])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
