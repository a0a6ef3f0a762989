"""Stop-and-resume continues the same curve and the same MLflow run."""
from __future__ import annotations

import pytest
import torch

from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.driver import train

SMALL = [
    "DiT.hidden_dim = 32",
    "DiT.depth = 2",
    "DiT.num_heads = 2",
    "TrainConfig.batch_size = 16",
    "TrainConfig.log_every = 3",
    "TrainConfig.eval_every = 0",
    "TrainConfig.warmup_steps = 4",
    "SamplingConfig.steps = 2",
    "SamplingConfig.per_class = 1",
]


def _tensors(state, prefix=""):
    out = {}
    for key, value in state.items():
        if isinstance(value, dict):
            out.update(_tensors(value, f"{prefix}{key}."))
        elif isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
    return out


def _assert_same_state(a, b):
    for part in ("model", "objective", "ema", "optimizer"):
        ta, tb = _tensors(a[part]), _tensors(b[part])
        assert ta.keys() == tb.keys(), part
        for key in ta:
            assert torch.equal(ta[key], tb[key]), f"{part}.{key} differs after resume"
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert a["step"] == b["step"]


class Preempted(Exception):
    pass


def test_resume_equals_uninterrupted_selfflow(in_tmp, monkeypatch):
    # Self-Flow exercises every random draw (t, s, mask, noise, label dropout) and the EMA teacher.
    files = ["digits/selfflow.gin"]
    params = SMALL + ["TrainConfig.steps = 10", "TrainConfig.checkpoint_every = 5"]
    full = train(files, params, run_dir=in_tmp / "full", runs_dir=in_tmp / "runs", progress=False)

    from selfflow.platform.train.callbacks import CheckpointEvery

    save = CheckpointEvery.on_step_end

    def save_then_die(self, trainer, logs):  # pre-empted right after the step-5 checkpoint
        save(self, trainer, logs)
        if trainer.step == 5:
            raise Preempted

    monkeypatch.setattr(CheckpointEvery, "on_step_end", save_then_die)
    with pytest.raises(Preempted):
        train(files, params, run_dir=in_tmp / "split", runs_dir=in_tmp / "runs", progress=False)
    monkeypatch.setattr(CheckpointEvery, "on_step_end", save)
    first_id = ckpt.load(ckpt.latest(in_tmp / "split" / "checkpoints"))["mlflow_run_id"]
    resumed = train(files, params, run_dir=in_tmp / "split", runs_dir=in_tmp / "runs", resume=True, progress=False)
    assert resumed.mlflow_run_id == first_id  # the same MLflow run continues
    _assert_same_state(ckpt.load(full.checkpoint), ckpt.load(resumed.checkpoint))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=resumed.tracking_uri)
    history = [m.step for m in client.get_metric_history(resumed.mlflow_run_id, "loss/total")]
    reference = [m.step for m in client.get_metric_history(full.mlflow_run_id, "loss/total")]
    assert sorted(history) == sorted(reference) == [3, 6, 9, 10]
    a = {m.step: m.value for m in client.get_metric_history(resumed.mlflow_run_id, "loss/total")}
    b = {m.step: m.value for m in client.get_metric_history(full.mlflow_run_id, "loss/total")}
    assert a == b


def test_resume_without_checkpoint_is_a_clear_error(in_tmp):
    from selfflow.platform.errors import UserError

    with pytest.raises(UserError, match="no checkpoint"):
        train(["digits/fm.gin"], SMALL + ["TrainConfig.steps = 2"], run_dir=in_tmp / "none",
              runs_dir=in_tmp / "runs", resume=True, tracking=False, progress=False)
