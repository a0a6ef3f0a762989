"""What the trainer logs through: the Tracker protocol, and NullTracker for untracked runs and ranks > 0."""
from __future__ import annotations

import os
from typing import Mapping, Protocol


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
