"""Evaluation off the training's critical path: a separate process evaluates a snapshot of the EMA
model while training continues (TrainConfig.eval_mode = 'background'; 'auto' picks it with more
than one worker).

Inline, rank 0 evaluates between two steps while the other ranks wait in the next collective (at
ImageNet scale FID-10k with 250-step SDE sampling takes longer than the process group's timeout).
Here rank 0 only writes the EMA weights of the due step to <run_dir>/eval/snapshots and starts

    python -m selfflow.platform.train.background_eval <request.json>

which rebuilds the experiment from the run's gin config, loads the snapshot and runs what was due
at that step (the sample grid, each evaluation suite) with the code the inline callbacks use. It
records what it would have logged; rank 0, the run's only MLflow writer, logs it at the snapshot's
step when the process ends (polled after every step: a non-blocking wait). One evaluation runs at
a time; later ones queue. The run waits for them at its end, so the final evaluation lands in the
run; a failed evaluation stops training with its one-line error (traceback in its log file).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from selfflow.platform import host
from selfflow.platform.errors import TrainingError
from selfflow.platform.torchfile import load, save_atomic
from selfflow.platform.train.checkpoint import host_copy

REQUEST_FORMAT = "selfflow.background_eval/1"


class RecordingTracker:
    """Collects what an evaluation logs (metrics, artifacts, step images, texts, tables) as
    [method, *arguments] to replay on the run's tracker; params, tags and datasets are the
    training process's own and are not recorded."""

    run_id = None

    def __init__(self):
        self.calls: list[list[Any]] = []

    def log_metrics(self, metrics, step: int) -> None:
        self.calls.append(["log_metrics", {key: float(value) for key, value in metrics.items()}, int(step)])

    def log_artifact(self, path, artifact_path=None) -> None:
        self.calls.append(["log_artifact", str(path), artifact_path])

    def log_image(self, path, key: str, step: int) -> None:
        self.calls.append(["log_image", str(path), key, int(step)])

    def log_text(self, text: str, artifact_file: str) -> None:
        self.calls.append(["log_text", text, artifact_file])

    def log_table(self, columns, artifact_file: str) -> None:
        self.calls.append(["log_table", {key: list(values) for key, values in columns.items()}, artifact_file])

    def log_params(self, params, where: str = "") -> None:
        pass

    def set_tags(self, tags) -> None:
        pass

    def log_dataset(self, dataset) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


REPLAYED = ("log_metrics", "log_artifact", "log_image", "log_text", "log_table")


def replay(calls: Sequence[Sequence[Any]], tracker) -> None:
    for method, *arguments in calls:
        if method not in REPLAYED:
            raise TrainingError(f"background evaluation result: unknown call {method!r}")
        if method in ("log_artifact", "log_image"):
            arguments[0] = Path(arguments[0])
        getattr(tracker, method)(*arguments)


@dataclass
class Job:
    step: int
    request: Path
    result: Path
    log: Path
    snapshot: Path
    writing: threading.Thread | None = None  # the snapshot being written
    process: subprocess.Popen | None = None
    started: float = 0.0


@dataclass
class BackgroundEvaluation:
    """The callback that replaces SampleGrid and the EvalCallbacks in background mode (rank 0 acts).

    grid_every: the sample grid's cadence (TrainConfig.eval_every; the last step always);
    callbacks: the run's EvalCallbacks (their suites decide when they are due); config_str: the gin
    config the training process built its experiment from."""

    grid_every: int
    callbacks: Sequence[Any]
    config_str: str
    queue: list[Job] = field(default_factory=list)
    running: Job | None = None

    def on_step_end(self, trainer, logs) -> None:
        if trainer.rank != 0:
            return
        self.poll(trainer)
        step, total = trainer.step, trainer.config.steps
        grid = step == total or bool(self.grid_every and step % self.grid_every == 0)
        suites = [callback.modality or "" for callback in self.callbacks if callback.is_due(trainer)]
        if grid or suites:
            self.queue.append(self.submit(trainer, grid, suites))
            self.poll(trainer)

    def submit(self, trainer, grid: bool, suites: list[str]) -> Job:
        folder = Path(trainer.run_dir) / "eval" / "background"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"step-{trainer.step:08d}"
        snapshot = folder / f"{name}.pt"
        # The loop waits for the copy to host memory only; the file is written on a thread.
        state = host_copy({"step": trainer.step, "ema": trainer.ema.model.state_dict()})
        writing = threading.Thread(target=save_atomic, args=(state, snapshot), name="selfflow-eval-snapshot")
        writing.start()
        request = folder / f"{name}.json"
        result = folder / f"{name}.result.json"
        result.unlink(missing_ok=True)
        request.write_text(json.dumps({
            "format": REQUEST_FORMAT, "config": self.config_str, "snapshot": str(snapshot.resolve()),
            "step": trainer.step, "run_dir": str(Path(trainer.run_dir).resolve()), "grid": grid, "suites": suites,
            "device": str(trainer.device), "threads": torch.get_num_threads(), "result": str(result.resolve()),
        }))
        return Job(trainer.step, request, result, folder / f"{name}.log", snapshot, writing)

    def _start(self, job: Job, trainer) -> None:
        env = dict(os.environ, **host.environment(trainer.config.host))
        with open(job.log, "w") as log:
            job.process = subprocess.Popen([sys.executable, "-m", "selfflow.platform.train.background_eval",
                                            str(job.request)], stdout=log, stderr=subprocess.STDOUT, env=env)
        job.started = time.perf_counter()

    def poll(self, trainer, wait: bool = False) -> None:
        """Log what finished; start the next queued evaluation. wait: until none is left."""
        while True:
            if self.running is not None:
                if wait:
                    self.running.process.wait()
                if self.running.process.poll() is None:
                    return
                self._collect(self.running, trainer)
                self.running = None
            if not self.queue:
                return
            if self.queue[0].writing.is_alive():
                if not wait:
                    return  # its snapshot is still being written: a later step starts it
                self.queue[0].writing.join()
            self.running = self.queue.pop(0)
            self._start(self.running, trainer)

    def _collect(self, job: Job, trainer) -> None:
        try:
            result = json.loads(job.result.read_text())
        except (OSError, ValueError):
            result = {"error": f"exited with code {job.process.returncode} and no result"}
        if result.get("error"):
            raise TrainingError(f"background evaluation at step {job.step} failed: {result['error']} "
                                f"(log: {job.log})")
        replay(result["calls"], trainer.tracker)
        metric = trainer.config.keep_best_metric
        values = [call[1][metric] for call in result["calls"] if call[0] == "log_metrics" and metric in call[1]]
        if metric and values:  # the checkpoint of this step was ranked before its score existed
            trainer.writer.wait()
            trainer.retention.record(job.step, values[-1])
        wall = time.perf_counter() - job.started
        trainer.tracker.log_metrics({"timing/eval/background_wall_seconds": wall}, step=job.step)
        job.snapshot.unlink(missing_ok=True)

    def on_train_end(self, trainer, failed: bool = False) -> None:
        """Wait for the evaluations in flight (the final one lands in the run); after a failed run,
        stop them instead."""
        if trainer.rank != 0:
            return
        if failed:
            if self.running is not None and self.running.process.poll() is None:
                self.running.process.kill()
                self.running.process.wait()
            self.running, self.queue = None, []
            return
        if self.running is not None or self.queue:
            self.poll(trainer, wait=True)


# ---- the evaluation process ---------------------------------------------------------------------


def evaluate_request(request: dict[str, Any]) -> list[list[Any]]:
    """Rebuild the experiment, load the snapshot's EMA weights, run what was due; returns the calls."""
    from selfflow.platform.config import bootstrap as gin_config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train import checkpoint as ckpt
    from selfflow.platform.train.callbacks import evaluation_callbacks, write_sample_grid

    torch.set_num_threads(max(1, int(request.get("threads") or 1)))
    gin_config.parse_config_string(request["config"])
    experiment = build_from_gin()
    state = load(request["snapshot"])
    ckpt.load_model_state(experiment.model, state["ema"], "EMA backbone", request["snapshot"])
    model = experiment.model.to(torch.device(request["device"])).eval().requires_grad_(False)
    tracker = RecordingTracker()
    step, run_dir = int(request["step"]), Path(request["run_dir"])
    if request["grid"]:
        for path in write_sample_grid(experiment, model, run_dir / "samples", step):
            tracker.log_artifact(path, "samples")
    wanted = set(request["suites"])
    for callback in evaluation_callbacks(experiment.evaluation):
        if (callback.modality or "") in wanted:
            callback.run_suite(experiment, model, step, tracker, run_dir)
    return tracker.calls


def main(argv: Sequence[str] | None = None) -> int:
    path = Path((argv if argv is not None else sys.argv[1:])[0])
    request = json.loads(path.read_text())
    if request.get("format") != REQUEST_FORMAT:
        raise SystemExit(f"{path}: not a background evaluation request ({REQUEST_FORMAT})")
    result: dict[str, Any]
    try:
        result = {"calls": evaluate_request(request), "error": None}
    except Exception as error:  # reported to the training process, which stops with it
        traceback.print_exc()
        result = {"calls": [], "error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}"
                  if str(error).strip() else type(error).__name__}
    Path(request["result"]).write_text(json.dumps(result))
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    sys.exit(main())
