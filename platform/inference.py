"""Rebuild a finished run's experiment and load its EMA model (for sampling and eval)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from selfflow.platform import checkpoint as ckpt
from selfflow.platform import config as gin_config
from selfflow.platform.devices import resolve_device
from selfflow.platform.errors import UserError
from selfflow.platform.experiment import Experiment, build_from_gin


def load_for_sampling(run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Sequence[str] = ()):
    """-> (experiment, EMA backbone in eval mode on TrainConfig.device, step). The run's device setting
    applies; `--gin_param "TrainConfig.device = 'cpu'"` among the overrides picks another."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.gin"
    if not config_file.is_file():
        raise UserError(f"not a run folder (no config.gin): {run_dir}")
    path = Path(checkpoint) if checkpoint else ckpt.latest(run_dir / "checkpoints")
    if path is None:
        raise UserError(f"no checkpoint in {run_dir / 'checkpoints'}")
    gin_config.parse_config_string(config_file.read_text(), overrides)
    experiment: Experiment = build_from_gin()
    state = ckpt.load(path)
    ckpt.load_model_state(experiment.model, state["ema"]["model"], "backbone", path)
    experiment.model.to(resolve_device(experiment.train.device)).eval()
    return experiment, experiment.model, int(state["step"])
