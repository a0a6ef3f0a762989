"""What the trainer logs through: the Tracker protocol, and NullTracker for untracked runs and ranks > 0."""
from __future__ import annotations

import os
from typing import Mapping, Protocol


class Tracker(Protocol):
    run_id: str | None

    def log_params(self, params: Mapping[str, object], where: str = "") -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...

    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None: ...

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None: ...

    def log_dataset(self, dataset: Mapping[str, object]) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """For ranks other than 0 and for runs with tracking switched off."""

    run_id = None

    def log_params(self, params, where=""):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def log_text(self, text, artifact_file):
        pass

    def log_image(self, path, key, step):
        pass

    def log_table(self, columns, artifact_file):
        pass

    def log_dataset(self, dataset):
        pass

    def finish(self, status="FINISHED"):
        pass
