"""SIGINT and SIGTERM (what schedulers send before SIGKILL) during a run.

The CLI installs `handle_signals()` for the duration of a command. While a trainer's loop runs
(`stop_at_step_end()`), the first signal only asks the loop to stop: at the end of the step under
way `StopOnSignal` writes a checkpoint when the run writes them (TrainConfig.checkpoint_every > 0)
and raises RunInterrupted; a second signal stops at once. Outside the loop a signal raises
RunInterrupted at once. The driver then marks the MLflow run KILLED and the CLI prints one line
and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

Signal handlers exist only in a process's main thread: in Ray workers and Tune trials (threads of
actors Ray owns) nothing here is installed. A `--workers` run's launcher takes the signal instead and
writes a stop request into the run folder (`request_stop`); its workers' StopOnSignal reads it on log
steps, the ranks agree on the step in one collective, and they checkpoint and stop there together.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from pathlib import Path
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
STOP_REQUEST = "stop-request.json"  # in the run folder: the launcher's signal, for its Ray workers
_pending: list[int] = []  # signals received while the loop defers them
_deferring = False


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by a signal. A KeyboardInterrupt, so `except Exception` never swallows it."""

    def __init__(self, signum: int, step: int | None = None, checkpoint: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint  # written because of the signal (None: none written for it)
        self.newest_checkpoint: Path | None = checkpoint
        self.mlflow_run_id: str | None = None
        self.tracking_uri: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)

    def one_line(self) -> str:
        name = signal.Signals(self.signum).name
        where = f" at step {self.step}" if self.step is not None else ""
        if self.checkpoint is not None:
            saved = f"checkpoint written: {self.checkpoint}"
        elif self.newest_checkpoint is not None:
            saved = f"newest checkpoint: {self.newest_checkpoint}"
        else:
            saved = "no checkpoint written"
        tracked = f"; MLflow run {self.mlflow_run_id} marked KILLED" if self.mlflow_run_id else ""
        resume = "; continue with --resume" if self.newest_checkpoint is not None else ""
        return f"interrupted by {name}{where}: {saved}{tracked}{resume}"


def _handler(signum: int, frame) -> None:
    if _deferring and not _pending:
        _pending.append(signum)  # the loop stops at the end of this step
        return
    raise RunInterrupted(signum)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise RunInterrupted (deferred to the step's end inside a training loop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.signal(number, _handler) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        _pending.clear()


@contextlib.contextmanager
def stop_at_step_end() -> Iterator[None]:
    """Inside: a first signal waits for the end of the step (StopOnSignal acts on it)."""
    global _deferring
    _deferring = True
    try:
        yield
    finally:
        _deferring = False


def pending_signal() -> int | None:
    return _pending[0] if _pending else None


def request_stop(run_dir: Path, signum: int) -> None:
    """Ask the workers training into `run_dir` to checkpoint and stop at their next log step."""
    _write_request(run_dir, {"signal": signal.Signals(signum).name})


def _write_request(run_dir: Path, request: dict) -> None:
    path = Path(run_dir) / STOP_REQUEST
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(request) + "\n")
    os.replace(partial, path)  # a reader never sees half a request


def _read_request(run_dir: Path) -> dict | None:
    try:
        request = json.loads((Path(run_dir) / STOP_REQUEST).read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # unreadable: still a request to stop
        return {}
    return request if isinstance(request, dict) else {}


def requested_stop(run_dir: Path) -> int | None:
    """The signal number of the stop request in `run_dir`, or None."""
    request = _read_request(run_dir)
    if request is None:
        return None
    try:
        return int(signal.Signals[request["signal"]])
    except (KeyError, TypeError):
        return int(signal.SIGTERM)


def acknowledge_stop(run_dir: Path, step: int) -> None:
    """Rank 0 of the workers: the run stopped on the request at `step` (the launcher reads it)."""
    request = _read_request(run_dir) or {}
    _write_request(run_dir, {**request, "stopped_at_step": int(step)})


def stopped_at_step(run_dir: Path) -> int | None:
    """The step the workers stopped at on the request, or None (they ran to the end)."""
    value = (_read_request(run_dir) or {}).get("stopped_at_step")
    return value if isinstance(value, int) else None


def clear_stop_request(run_dir: Path) -> None:
    """Remove a stop request (a launcher killed before its workers stopped may have left one)."""
    (Path(run_dir) / STOP_REQUEST).unlink(missing_ok=True)


class StopOnSignal:
    """A trainer callback: after a deferred signal, write a checkpoint at this step if the run
    writes checkpoints, then raise RunInterrupted. Listed first and last among the callbacks, so
    a signal that arrives during an evaluation stops the run at the end of that same step.

    With `run_dir` (Ray workers, whose launcher holds the signal): the stop request in that folder,
    read by rank 0 on log steps and shared with every rank in one collective there, so that all
    ranks stop at the same step (a step's host reads happen on log steps only)."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = Path(run_dir) if run_dir is not None else None

    def on_step_end(self, trainer, logs) -> None:
        signum = self._requested(trainer)
        if signum is None:
            return
        config = trainer.config
        written = None
        if config.checkpoint_every:
            from selfflow.platform.train import checkpoint as ckpt

            # Every rank knows whether this step was written (writing is a collective).
            path = ckpt.step_path(trainer.checkpoint_dir, trainer.step)
            trainer.writer.wait()  # this step's checkpoint may still be on the writer's thread
            written = path if trainer.checkpointed_step == trainer.step else trainer.save_checkpoint()
            trainer.writer.wait()
            if trainer.rank != 0:
                written = None
        raise RunInterrupted(signum, step=trainer.step, checkpoint=written)

    def _requested(self, trainer) -> int | None:
        if self.run_dir is None:
            return pending_signal()
        config = trainer.config
        if trainer.step % config.log_every != 0 or trainer.step == config.steps:
            return None
        signum = (requested_stop(self.run_dir) or 0) if trainer.rank == 0 else 0
        if trainer.world_size > 1:
            from selfflow.platform.train import parallel

            signum = int(parallel.rank_max(float(signum), trainer.device))
        return signum or None
