"""SIGINT and SIGTERM (what schedulers send before SIGKILL) during a run.

The CLI installs `handle_signals()` for the duration of a command. While a trainer's loop runs
(`stop_at_step_end()`), the first signal only asks the loop to stop: at the end of the step under
way `StopOnSignal` writes a checkpoint when the run writes them (TrainConfig.checkpoint_every > 0)
and raises RunInterrupted; a second signal stops at once. Outside the loop a signal raises
RunInterrupted at once. The driver then marks the MLflow run KILLED and the CLI prints one line
and exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM).

Signal handlers exist only in a process's main thread: in Ray workers and Tune trials (threads of
actors Ray owns) nothing here is installed and Ray's own handling applies.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
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


class StopOnSignal:
    """A trainer callback: after a deferred signal, write a checkpoint at this step if the run
    writes checkpoints, then raise RunInterrupted. Listed first and last among the callbacks, so
    a signal that arrives during an evaluation stops the run at the end of that same step."""

    def on_step_end(self, trainer, logs) -> None:
        signum = pending_signal()
        if signum is None:
            return
        written = None
        if trainer.config.checkpoint_every:
            from selfflow.platform.train import checkpoint as ckpt

            path = ckpt.step_path(trainer.checkpoint_dir, trainer.step)
            trainer.writer.wait()  # this step's checkpoint may still be on the writer's thread
            written = path if path.is_file() else trainer.save_checkpoint()
            trainer.writer.wait()
        raise RunInterrupted(signum, step=trainer.step, checkpoint=written)
