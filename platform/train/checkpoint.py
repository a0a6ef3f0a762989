"""A run's checkpoints: step-numbered files in <run_dir>/checkpoints, the newest that loads, retention.

The file format (atomic write, CRC check, weights-only load) is platform/torchfile.py."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from selfflow.components.files import write_text_atomic
from selfflow.platform.errors import CheckpointError, TrainingError
from selfflow.platform.torchfile import load, save_atomic, verify  # noqa: F401  (re-exported)

_STEP_FILE = re.compile(r"^step-(\d{8})\.pt$")


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

    def record(self, step: int, value: float) -> None:
        """A metric value that arrived after its checkpoint was saved (a background evaluation);
        it counts from the next save on."""
        if not self.metric or not math.isfinite(value) or not step_path(self.folder, step).is_file():
            return
        values = self.values()
        values[step] = float(value)
        self._write_values(values)

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


def host_copy(value: Any) -> Any:
    """A copy of a (nested) state whose tensors live in host memory and share nothing with the
    live ones: what a background writer may serialise while training changes the originals."""
    return restructure(value, (tensor.detach().to("cpu", copy=True) for tensor in tensors_in(value)))


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) state in the order `host_copy` and `restructure` visit them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in tensors_in(item)]
    return []


def restructure(value: Any, replacements: Iterator[torch.Tensor]) -> Any:
    """`value` with its tensors replaced, in `tensors_in` order, by the next ones of `replacements`."""
    if isinstance(value, torch.Tensor):
        return next(replacements)
    if isinstance(value, dict):
        return {key: restructure(item, replacements) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(restructure(item, replacements) for item in value)
    return value


class StagingBuffers:
    """Host tensors kept between saves that a state is copied into: what `host_copy` gives, without
    allocating (and first touching) fresh memory on every save. The copy is one foreach call. The
    buffers are reallocated when the state's tensor shapes or dtypes change. The caller must not
    copy again while a writer still reads the previous copy (CheckpointWriter waits first)."""

    def __init__(self):
        self._buffers: list[torch.Tensor] = []

    def copy(self, state: dict[str, Any]) -> dict[str, Any]:
        sources = [tensor.detach() for tensor in tensors_in(state)]
        layout = [(tensor.shape, tensor.dtype) for tensor in sources]
        if layout != [(buffer.shape, buffer.dtype) for buffer in self._buffers]:
            self._buffers = [torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu") for tensor in sources]
        if sources:
            torch._foreach_copy_(self._buffers, sources)
        return restructure(state, iter(self._buffers))


def write_verified(state: dict[str, Any], path: Path) -> Path:
    """Atomic write, then read the whole file back for its CRCs; a failure keeps every older
    checkpoint and renames the bad file to *.corrupt."""
    save_atomic(state, path)
    problem = verify(path)
    if problem is not None:  # a disk hiccup: keep every older checkpoint, stop loudly
        path.replace(path.with_name(path.name + ".corrupt"))
        raise TrainingError(f"checkpoint {path} failed verification after writing ({problem}); older ones kept")
    return path


class CheckpointWriter:
    """Writes checkpoints with the guarantees of `write_verified` (temp file + fsync + rename, every
    CRC read back) either in the caller (blocking) or on a background thread, so the training loop
    waits only while the state is copied to host memory: into buffers kept between saves
    (`keep_buffers`, one more copy of the state resident in host memory) or freshly allocated ones.

    At most one write is in flight: the next `submit` (and `wait`) waits for it. A failed
    background write raises its TrainingError in the training thread at the next `submit`,
    `wait` or `raise_if_failed`. `then(action)` runs `action(path)` once the file in flight is
    verified (retention: nothing older is deleted before its successor is safe); `completed` is
    the newest verified checkpoint; `blocked_seconds` the loop's wait of the last save.
    """

    def __init__(self, background: bool = True, keep_buffers: bool = True):
        self.background = background
        self._staging = StagingBuffers() if keep_buffers else None
        self.completed: Path | None = None
        self.blocked_seconds = 0.0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._writing: Path | None = None  # the file in flight, until verified or failed
        self._then: list[Callable[[Path], None]] = []

    def submit(self, state: dict[str, Any], path: Path) -> None:
        started = time.perf_counter()
        self.wait()
        self._writing = Path(path)
        if not self.background:
            self._write(state, Path(path))
            self.raise_if_failed()
        else:
            snapshot = self._staging.copy(state) if self._staging is not None else host_copy(state)
            self._thread = threading.Thread(target=self._write, args=(snapshot, Path(path)),
                                            name="selfflow-checkpoint-writer")
            self._thread.start()
        self.blocked_seconds = time.perf_counter() - started

    def then(self, action: Callable[[Path], None]) -> None:
        """Run `action(path)` after the write in flight is verified (on the writer's thread), or
        now with the newest verified file when nothing is in flight; never after a failed write."""
        with self._lock:
            if self._writing is not None:
                self._then.append(action)
                return
            done = self.completed
        if done is not None and self._error is None:
            action(done)

    def _write(self, state: dict[str, Any], path: Path) -> None:
        try:
            write_verified(state, path)
            with self._lock:
                self.completed, self._writing = path, None
                actions, self._then = self._then, []
            for action in actions:
                action(path)
        except BaseException as error:  # handed to the training thread
            with self._lock:
                self._writing, self._then = None, []
            self._error = error

    @property
    def in_flight(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> Path | None:
        """Wait for the write in flight (if any); raise its error; returns the newest verified file."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.raise_if_failed()
        return self.completed

    def raise_if_failed(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error
