"""Checkpoints: full training state, written atomically, loaded weights-only."""
from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from selfflow.components.files import write_text_atomic
from selfflow.platform.errors import CheckpointError

_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")
# Test hook (tests/reliability/test_chaos.py): seconds to stall with half the bytes
# written, so a SIGKILL provably lands inside a checkpoint write.
WRITE_PAUSE_ENV = "SELFFLOW_TEST_CHECKPOINT_WRITE_PAUSE"


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save into a temp file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            pause = float(os.environ.get(WRITE_PAUSE_ENV) or 0)
            if pause > 0:
                buffer = io.BytesIO()
                torch.save(state, buffer)
                data = buffer.getvalue()
                file.write(data[: len(data) // 2])
                file.flush()
                time.sleep(pause)
                file.write(data[len(data) // 2:])
            else:
                torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True: a file that needs unpickling of code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"refusing checkpoint {path}: not a weights-only file ({reason[:160]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"unreadable checkpoint {path}: {str(error).splitlines()[0][:200]}") from None


def step_path(folder: str | os.PathLike, step: int) -> Path:
    return Path(folder) / f"step-{step:08d}.pt"


def list_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _STEP_FILE.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest(folder: str | os.PathLike) -> Path | None:
    found = list_checkpoints(folder)
    return found[-1][1] if found else None


def verify(path: str | os.PathLike) -> str | None:
    """None if the file is a complete torch zip archive (CRC of every member checked,
    nothing unpickled); else the reason it is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"member {bad} fails its CRC" if bad else None


def load_latest(folder: str | os.PathLike) -> tuple[Path | None, dict[str, Any] | None]:
    """The newest checkpoint that loads; an unreadable newer one is skipped with a warning.

    A refused (not weights-only) file is never skipped: that is an error, not damage.
    """
    for _, path in reversed(list_checkpoints(folder)):
        try:
            return path, load(path)
        except CheckpointError as error:
            if "refusing" in str(error):
                raise
            print(f"selfflow: warning: skipping damaged checkpoint: {error.one_line()}", file=sys.stderr, flush=True)
    return None, None


def clean_temp_files(folder: str | os.PathLike, pattern: str = ".*.tmp") -> int:
    """Remove temp files left by a process killed mid-save; returns how many."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for entry in folder.glob(pattern):
        entry.unlink(missing_ok=True)
        removed += 1
    return removed


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, source: Path | str) -> None:
    """load_state_dict with a one-line error naming the mismatching keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:4]}")
        if shape:
            parts.append(f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in shape[:3]]}")
        raise CheckpointError(f"checkpoint {source} does not fit this {what}: " + "; ".join(parts))
    module.load_state_dict(state)


class Retention:
    """Which checkpoints stay: the newest `keep_last` plus the best by a logged metric.

    The metric value of each checkpoint lives in `metrics.json` beside them (written
    atomically). Only a checkpoint that was just written and verified triggers
    deletions, and the newest is always kept, so the only good checkpoint never goes.
    """

    SIDECAR = "metrics.json"

    def __init__(self, folder: str | os.PathLike, keep_last: int, metric: str = "", mode: str = "min"):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.folder, self.keep_last, self.metric, self.mode = Path(folder), keep_last, metric, mode

    def values(self) -> dict[int, float]:
        path = self.folder / self.SIDECAR
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        if raw.get("metric") != self.metric:
            return {}
        return {int(step): float(value) for step, value in raw.get("values", {}).items()}

    def _write_values(self, values: dict[int, float]) -> None:
        write_text_atomic(self.folder / self.SIDECAR, json.dumps(
            {"metric": self.metric, "mode": self.mode, "values": {str(k): v for k, v in sorted(values.items())}}))

    def best_step(self, values: dict[int, float]) -> int | None:
        if not values:
            return None
        sign = 1.0 if self.mode == "min" else -1.0
        return min(values, key=lambda step: (sign * values[step], step))  # ties: the earliest

    def kept_steps(self, steps: list[int], values: dict[int, float]) -> set[int]:
        keep = set(sorted(steps)[-self.keep_last:])
        best = self.best_step({step: values[step] for step in steps if step in values})
        if best is not None:
            keep.add(best)
        return keep

    def after_save(self, step: int, value: float | None) -> list[Path]:
        """Record the new checkpoint's metric value, delete what is no longer kept; returns the deleted."""
        values = self.values() if self.metric else {}
        if self.metric and value is not None and math.isfinite(value):
            values[step] = float(value)
        found = list_checkpoints(self.folder)
        keep = self.kept_steps([s for s, _ in found], values)
        deleted = []
        for found_step, path in found:
            if found_step not in keep:
                path.unlink(missing_ok=True)
                deleted.append(path)
        if self.metric:
            self._write_values({s: v for s, v in values.items() if s in keep})
        return deleted
