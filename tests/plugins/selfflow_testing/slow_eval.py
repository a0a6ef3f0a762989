"""An evaluation suite that takes `seconds` at one step: for tests of evaluation that must not
stall the other ranks (platform/train/background_eval.py).

    import selfflow_testing.slow_eval
    build_experiment.evaluation = @SlowSuite()
    SlowSuite.seconds = 12
"""
from __future__ import annotations

import os
import time

import gin


@gin.configurable
class SlowSuite:
    """Due at `at_step` only; sleeps, then logs when it ran and in which process."""

    min_steps = 0

    def __init__(self, seconds: float = 5.0, at_step: int = 2):
        self.seconds, self.at_step = float(seconds), int(at_step)

    def due(self, step: int, total_steps: int, default_every: int) -> bool:
        return step == self.at_step

    def run(self, experiment, model, step, tracker, run_dir, out_dir=None) -> dict[str, float]:
        started = time.time()
        time.sleep(self.seconds)
        metrics = {"eval/slow_step": float(step), "eval/slow_started": started, "eval/slow_finished": time.time(),
                   "eval/slow_pid": float(os.getpid())}
        tracker.log_metrics(metrics, step=step)
        return metrics
