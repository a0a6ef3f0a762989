"""What a training run records in MLflow besides its metrics, so runs compare in the UI:

- at the start: tags (the experiment's objective/dataset/backbone/modality, the launcher's
  provenance: platform/tracking/provenance.py), the requested config as params and as a readable
  artifact (`config/config.gin.txt`, previewed by the UI; `config.gin` itself is kept too), and
  the training data as dataset inputs (name, source, digest of the shard index);
- after the first step (LogOperativeConfig in callbacks.py): the operative config, i.e. every
  binding gin used including defaults, as params and as `config/operative_config.gin.txt`, and the
  parameter counts;
- while training, when switched on with `RunTracking.system_metrics = True`: system metrics.

`RunTracking` (platform/config/tracking.py) is the gin configurable of the options
(experiments/demo.gin switches system metrics on).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import gin

from selfflow.components.files import write_text_atomic
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.config.tracking import RunTrackingOptions, run_tracking  # noqa: F401  (re-exported)
from selfflow.platform.tracking.system_metrics import SystemMetricsSampler

REQUESTED_TEXT = "config/config.gin.txt"
OPERATIVE_TEXT = "config/operative_config.gin.txt"


def record_start(tracker, experiment, run_dir: Path, tags: dict[str, str]) -> None:
    """Tags, the requested config (params + readable artifact) and the dataset inputs. Safe to repeat
    on a resumed run: params the run has are kept, the rest overwrites or is stored once."""
    tracker.set_tags({**experiment.tags, "run_dir": str(run_dir), **tags})
    requested = gin.config_str()  # the launcher's config plus this process's overrides (a sweep trial's)
    path = run_dir / "config.gin"
    if not path.exists():  # `selfflow train` wrote it already; sweep trials have their own folder
        write_text_atomic(path, requested)
    tracker.log_artifact(path)
    tracker.log_text(requested, REQUESTED_TEXT)
    tracker.log_params(gin_config.flatten_config(requested), where=REQUESTED_TEXT)
    for dataset in dataset_inputs(experiment.data):
        tracker.log_dataset(dataset)


def record_operative(tracker, trainer, operative: str) -> None:
    """The operative config (every binding used, defaults included) and the parameter counts."""
    tracker.log_text(operative, OPERATIVE_TEXT)
    tracker.log_params(gin_config.flatten_config(operative), where=OPERATIVE_TEXT)
    tracker.log_params(parameter_counts(trainer))


def parameter_counts(trainer) -> dict[str, int]:
    """model.num_parameters: the backbone's; train.num_trained_parameters: all the optimizer updates
    (the backbone and the objective's heads, e.g. a REPA projector)."""
    backbone = sum(p.numel() for p in trainer.experiment.model.parameters())
    trained = sum(p.numel() for group in trainer.optimizer.param_groups for p in group["params"])
    return {"model.num_parameters": backbone, "train.num_trained_parameters": trained}


def dataset_inputs(data: Any) -> Iterator[dict[str, Any]]:
    """One MLflow dataset input per shard set the run reads: its train split ('train') and the split
    evaluation scores against ('eval'); a mixture's parts each. Sources without a shard index (data
    made in memory) record nothing."""
    parts = getattr(data, "parts", None)
    for part in (parts.values() if isinstance(parts, dict) else [data]):
        digest_of = getattr(part, "index_digest", None)
        root = getattr(part, "root", None)
        if not callable(digest_of) or root is None:
            continue
        for context, split in (("train", getattr(part, "train_split", "train")), ("eval", getattr(part, "eval_split", None))):
            if not split:
                continue
            digest = digest_of(split)
            if digest is None:
                continue
            yield shard_dataset(part, split, context, digest)


def shard_dataset(part: Any, split: str, context: str, digest: str) -> dict[str, Any]:
    from selfflow.platform.data.loader import read_index

    index = read_index(part.root, split)
    name = f"{getattr(part, 'dataset', 'unknown')}/{split}"
    profile = {"samples": index.total, "shards": len(index.shard_paths), "shape": list(index.shape),
               "num_classes": index.num_classes, "modality": getattr(part, "modality", "unknown"),
               "index_sha256": digest}
    return {"name": name, "digest": digest[:16], "source_type": "local",
            "source": json.dumps({"uri": str(Path(index.path).resolve())}), "profile": json.dumps(profile),
            "context": context}


class SystemMetrics:
    """Callback: logs the system metrics sampled since the previous step (at most one value per step:
    the run's journal keeps one value per metric and step). Stops its thread at the last step;
    `close()` stops it after a failure."""

    def __init__(self, every_s: float):
        self.sampler = SystemMetricsSampler(every_s)

    def on_step_end(self, trainer, logs) -> None:
        if trainer.rank != 0:
            return
        self.sampler.start()  # the thread starts with training, not with the object
        last = trainer.step == trainer.config.steps
        if last:
            self.sampler.sample()  # the run's final state, even when shorter than one interval
        metrics = self.sampler.take()
        if metrics:
            trainer.tracker.log_metrics(metrics, step=trainer.step)
        if last:
            self.close()

    def close(self) -> None:
        self.sampler.stop()


def tracking_callbacks(options: RunTrackingOptions) -> list:
    return [SystemMetrics(options.system_metrics_every_s)] if options.system_metrics else []
