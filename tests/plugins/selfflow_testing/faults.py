"""Fault injection for tests and chaos drills.

    import selfflow_testing.faults
    build_experiment.callbacks = [@InjectedCrash()]
    InjectedCrash.at_step = 2

Importing this module also slows checkpoint writes when SELFFLOW_TEST_CHECKPOINT_WRITE_PAUSE is set
(seconds to stall with half the bytes written), so that a SIGKILL provably lands inside a write.
"""
from __future__ import annotations

import io
import os
import signal
import time
from pathlib import Path

import gin

from selfflow.platform import torchfile

WRITE_PAUSE_ENV = "SELFFLOW_TEST_CHECKPOINT_WRITE_PAUSE"


@gin.configurable
class InjectedCrash:
    """Kill this worker once at `at_step` (0: never). `marker` (a file, default
    `<run_dir>/injected_crash.done`) records that it happened, so the restarted run goes on.
    `hard`: os._exit (a dying process) instead of raising. `rank`: which rank dies. A checkpoint being
    written on the trainer's background thread is completed first: the crash comes after this
    step's checkpoint (tests/reliability/test_chaos.py kills processes inside a write)."""

    def __init__(self, at_step: int = 0, hard: bool = True, rank: int = 0, marker: str = ""):
        self.at_step, self.hard, self.rank, self.marker = at_step, hard, rank, marker

    def on_step_end(self, trainer, logs) -> None:
        if not self.at_step or trainer.step != self.at_step or trainer.rank != self.rank:
            return
        marker = Path(self.marker) if self.marker else trainer.run_dir / "injected_crash.done"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{Path(trainer.run_dir).resolve()}\n")  # who crashed
        writer = getattr(trainer, "writer", None)
        if writer is not None:
            writer.wait()
        if self.hard:
            os._exit(17)
        raise RuntimeError(f"injected crash at step {trainer.step}")


STEP_DELAY_ENV = "SELFFLOW_TEST_STEP_DELAY"


@gin.configurable
class StepDelay:
    """Sleep SELFFLOW_TEST_STEP_DELAY seconds (0 if unset) at the end of every step: a run that
    lasts long enough for a test to act on it while the config stays the same across processes."""

    def on_step_end(self, trainer, logs) -> None:
        time.sleep(float(os.environ.get(STEP_DELAY_ENV) or 0))


@gin.configurable
class SignalAt:
    """Send this process a signal at the end of the given steps ({step: 'SIGTERM' or 'SIGINT'}): a
    scheduler's SIGTERM or a Ctrl-C at a known step."""

    def __init__(self, steps: dict = None):
        self.steps = dict(steps or {})

    def on_step_end(self, trainer, logs) -> None:
        name = self.steps.get(trainer.step)
        if name:
            os.kill(os.getpid(), getattr(signal, name))


def crash_bindings(**values) -> list[str]:
    """gin bindings that import this module and attach an InjectedCrash with `values`."""
    return ["import selfflow_testing.faults", "build_experiment.callbacks = [@InjectedCrash()]",
            *(f"InjectedCrash.{key} = {value!r}" for key, value in values.items())]


def _paused_write(state, file) -> None:
    buffer = io.BytesIO()
    _write_state(state, buffer)
    data = buffer.getvalue()
    file.write(data[: len(data) // 2])
    file.flush()
    time.sleep(float(os.environ[WRITE_PAUSE_ENV]))
    file.write(data[len(data) // 2:])


_write_state = torchfile.write_state
if float(os.environ.get(WRITE_PAUSE_ENV) or 0) > 0:
    torchfile.write_state = _paused_write
