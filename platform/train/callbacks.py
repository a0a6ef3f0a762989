"""Trainer callbacks: checkpoints, operative config, sample grids, periodic evaluation.

A callback is any object with `on_step_end(trainer, logs)`; the driver (platform/train/driver.py)
builds the standard list, and gin can add more (`build_experiment.callbacks`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import gin
import torch

from selfflow.components.files import write_text_atomic
from selfflow.platform.evaluate.generation import class_grid_labels, generate
from selfflow.platform.evaluate.media import save_sample_grid
from selfflow.platform.evaluate.modalities import PrefixedTracker
from selfflow.platform.train.run_tracking import record_operative

log = logging.getLogger("selfflow.evaluation")


class CheckpointEvery:
    """Save full state every `every` steps and at the last step (rank 0 writes, on a background
    thread unless TrainConfig.checkpoint_mode is 'blocking'; the last checkpoint is waited for, so
    that it is complete when the run ends), then apply retention.

    With `defer_retention` (what the driver uses) it writes only, listed before every optional
    callback of the step (sample grids, evaluation), so the trained state is on disk whatever they
    do; retention, which may rank checkpoints by a metric those callbacks log at this step, runs
    after them: `self.retention`, listed last."""

    def __init__(self, every: int, defer_retention: bool = False):
        self.every = every
        self.retention = CheckpointRetention(self) if defer_retention else None
        self.written_at: int | None = None  # the step whose checkpoint awaits retention

    def due(self, trainer) -> bool:
        return trainer.step == trainer.config.steps or bool(self.every and trainer.step % self.every == 0)

    def on_step_end(self, trainer, logs) -> None:
        if not self.due(trainer):
            return
        path = trainer.write_checkpoint()
        if self.retention is not None:
            self.written_at = trainer.step
        elif path is not None:
            trainer.apply_retention()
        if trainer.step == trainer.config.steps and path is not None:
            trainer.writer.wait()
            pointer = write_text_atomic(trainer.run_dir / "final_checkpoint.txt", f"{path.resolve()}\n")
            trainer.tracker.set_tags({"final_checkpoint": str(path.resolve())})
            trainer.tracker.log_artifact(pointer)


class CheckpointRetention:
    """The second half of CheckpointEvery, after the step's other callbacks: records the step's
    value of keep_best_metric and deletes the checkpoints retention no longer keeps (rank 0)."""

    def __init__(self, saver: CheckpointEvery):
        self.saver = saver

    def on_step_end(self, trainer, logs) -> None:
        if self.saver.written_at != trainer.step:
            return
        self.saver.written_at = None
        if trainer.rank == 0:
            trainer.apply_retention()


class LogOperativeConfig:
    """After the first step, gin knows every parameter actually used, defaults included: save it, log
    it (as the file and as readable text), log each binding as a param, and the parameter counts."""

    def __init__(self):
        self.done = False

    def on_step_end(self, trainer, logs) -> None:
        if self.done or trainer.rank != 0:
            return
        self.done = True
        operative = gin.operative_config_str()
        path = write_text_atomic(trainer.run_dir / "operative_config.gin", operative)
        trainer.tracker.log_artifact(path)
        record_operative(trainer.tracker, trainer, operative)


class SampleGrid:
    """A grid of EMA samples from fixed noise (one row per class) at every eval step: the PNG as the
    step image `samples/grid` (`samples/<modality>` in a mixture; the UI's image view slides over steps
    and puts runs side by side) and as a file in `samples/`, with a clip grid's GIF and an audio
    grid's wav beside it."""

    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, logs) -> None:
        last = trainer.step == trainer.config.steps
        if trainer.rank != 0 or not (last or (self.every and trainer.step % self.every == 0)):
            return
        for path in write_sample_grid(trainer.experiment, trainer.eval_model, trainer.run_dir / "samples", trainer.step):
            trainer.tracker.log_artifact(path, "samples")
            if path.suffix == ".png":
                trainer.tracker.log_image(path, sample_image_key(path), trainer.step)


def sample_image_key(path: Path) -> str:
    """step-00000100.png -> samples/grid; step-00000100-audio.png -> samples/audio (the UI puts step
    images in the chart section named by the key up to its last '/': here 'samples')."""
    modality = path.stem.split("-", 2)[2] if path.stem.count("-") >= 2 else ""
    return f"samples/{modality or 'grid'}"


def write_sample_grid(experiment, model, folder: Path, step: int) -> list[Path]:
    """The grid PNG (and, for audio, its wav) of the EMA model's samples at `step`; a mixture writes
    one per modality (step-<step>-<modality>.png)."""
    written = []
    for modality, view in experiment.views():
        name = f"step-{step:08d}" + (f"-{modality}" if modality else "")
        written += _write_grid(view, model, Path(folder) / f"{name}.png")
    return written


def _write_grid(experiment, model, path: Path) -> list[Path]:
    config = experiment.sampling
    num_classes = experiment.num_classes
    labels = class_grid_labels(num_classes, config.per_class) if num_classes else None
    generator = torch.Generator().manual_seed(config.seed)
    images = generate(model, experiment.tokenizer, config, labels, num_samples=config.per_class * 4, generator=generator)
    value_range = getattr(experiment.tokenizer, "data_range", (0.0, 1.0))
    sample_rate = int(getattr(experiment.data, "sample_rate", 0) or 0)
    return save_sample_grid(images, path, nrow=config.per_class, value_range=value_range, sample_rate=sample_rate)


class EvalCallback:
    """Rank 0 evaluates the EMA model with `suite` on the suite's cadence (`suite.due`). With a
    `modality`, the suite scores that modality's view of a mixture, its metrics named
    eval/<modality>/... (platform/evaluate/modalities.py)."""

    def __init__(self, suite: Any, modality: str | None = None):
        self.suite = suite
        self.modality = modality
        self.announced = False

    def on_step_end(self, trainer, logs) -> None:
        if trainer.rank == 0 and self.is_due(trainer):
            self.evaluate(trainer)

    def is_due(self, trainer) -> bool:
        min_steps = getattr(self.suite, "min_steps", 0)
        if trainer.config.steps < min_steps and not self.announced:
            self.announced = True
            log.warning("run of %d steps < EvalSuite.min_steps=%d: no evaluation (run `selfflow eval` on it)",
                        trainer.config.steps, min_steps)
        return self.suite.due(trainer.step, trainer.config.steps, trainer.config.eval_every)

    def evaluate(self, trainer) -> None:
        self.run_suite(trainer.experiment, trainer.eval_model, trainer.step, trainer.tracker, trainer.run_dir)

    def run_suite(self, experiment, model, step: int, tracker, run_dir) -> None:
        """The suite on `model` at `step` (also what a background evaluation process runs)."""
        if self.modality is None:
            self.suite.run(experiment, model, step, tracker, run_dir)
            return
        self.suite.run(experiment.view(self.modality), model, step, PrefixedTracker(tracker, self.modality), run_dir,
                       out_dir=Path(run_dir) / "eval" / self.modality)


def evaluation_callbacks(evaluation: Any) -> list[EvalCallback]:
    """One EvalCallback for a suite, one per modality for a mixture's {modality: suite}; none without."""
    if evaluation is None:
        return []
    if isinstance(evaluation, Mapping):
        return [EvalCallback(evaluation[name], name) for name in sorted(evaluation)]
    return [EvalCallback(evaluation)]
