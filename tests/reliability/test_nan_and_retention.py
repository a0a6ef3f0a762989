"""Non-finite losses and gradients (stop with one line, or skip and count), checkpoint
retention (last K + best by a metric) and never losing the only good checkpoint."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from reliability_helpers import write_tiny_gin

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import build_from_gin
from selfflow.platform.errors import TrainingError
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.callbacks import CheckpointEvery
from selfflow.platform.train.trainer import Trainer


class RecordingTracker:
    run_id = None

    def __init__(self):
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_metrics(self, metrics, step):
        self.metrics.append((step, dict(metrics)))

    def log_params(self, params):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def set_tags(self, tags):
        pass

    def finish(self, status="FINISHED"):
        pass


def make_trainer(folder: Path, *params: str, callbacks=()) -> Trainer:
    gin = write_tiny_gin(folder, "tiny", steps=8, log_every=2, checkpoint_every=2)
    config.parse([str(gin)], list(params))
    experiment = build_from_gin()
    data = experiment.data.loader(batch_size=experiment.train.batch_size, seed=0)
    every = experiment.train.checkpoint_every
    return Trainer(experiment, data, folder / "run", tracker=RecordingTracker(),
                   callbacks=[*callbacks, CheckpointEvery(every)], progress=False)


def poison_loss_at(trainer: Trainer, steps: set[int], term: str = "flow", value: float = math.nan) -> None:
    forward = trainer.module.objective.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        if trainer.step + 1 in steps:
            out.terms[term] = out.terms[term] * value
        return out

    trainer.module.objective.forward = poisoned


def test_nan_loss_term_stops_with_one_line_naming_step_and_term(in_tmp):
    trainer = make_trainer(in_tmp)
    poison_loss_at(trainer, {5})
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    line = info.value.one_line()
    assert "\n" not in str(info.value)
    assert line.startswith("non-finite loss term 'flow' at step 5; stopping (last good checkpoint kept: ")
    assert line.endswith("step-00000004.pt)")
    kept = ckpt.list_checkpoints(in_tmp / "run" / "checkpoints")
    assert [step for step, _ in kept] == [2, 4]  # nothing written for the bad step
    assert ckpt.verify(kept[-1][1]) is None and ckpt.load(kept[-1][1])["step"] == 4


def test_inf_loss_term_is_caught_too(in_tmp):
    trainer = make_trainer(in_tmp)
    poison_loss_at(trainer, {1}, value=math.inf)
    with pytest.raises(TrainingError, match=r"non-finite loss term 'flow' at step 1; stopping \(no checkpoint"):
        trainer.fit()


def test_nan_gradient_names_the_parameter_and_step(in_tmp):
    trainer = make_trainer(in_tmp)
    name, parameter = next(iter(trainer.module.named_parameters()))  # the backbone's first weight

    def nan_grad(grad):
        return grad * math.nan if trainer.step + 1 == 3 else grad

    parameter.register_hook(nan_grad)
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    assert info.value.one_line().startswith(f"non-finite gradient of '{name}' at step 3; stopping")
    assert [s for s, _ in ckpt.list_checkpoints(in_tmp / "run" / "checkpoints")] == [2]


def test_skip_policy_skips_batches_and_counts_them(in_tmp):
    trainer = make_trainer(in_tmp, "TrainConfig.nan_policy = 'skip'")
    poison_loss_at(trainer, {3, 4, 7})
    before = {n: p.detach().clone() for n, p in trainer.module.model.named_parameters()}
    trainer.fit()
    assert trainer.step == 8 and trainer.skipped == 3
    logged = dict(trainer.tracker.inner.metrics)
    assert [logged[s]["train/skipped_batches"] for s in (2, 4, 6, 8)] == [0.0, 2.0, 2.0, 3.0]
    assert "loss/total" not in logged[4]  # both steps of that window were skipped: no made-up mean
    assert all(math.isfinite(v) for metrics in logged.values() for v in metrics.values())
    assert trainer.ema.updates == 5  # only good steps update the EMA
    assert any(not torch.equal(before[n], p) for n, p in trainer.module.model.named_parameters())
    assert ckpt.load(ckpt.latest(in_tmp / "run" / "checkpoints"))["skipped"] == 3


class ScriptedMetric:
    """Logs `eval/score` at every checkpoint step from a script (before CheckpointEvery runs)."""

    def __init__(self, values: dict[int, float]):
        self.values = values

    def on_step_end(self, trainer, logs):
        if trainer.step in self.values:
            trainer.tracker.log_metrics({"eval/score": self.values[trainer.step]}, step=trainer.step)


@pytest.mark.parametrize("mode, best", [("min", 4), ("max", 2)])
def test_retention_keeps_last_k_and_the_best(in_tmp, mode, best):
    scores = {2: 0.5, 4: 0.1, 6: 0.3, 8: 0.2}
    trainer = make_trainer(in_tmp, "TrainConfig.keep_checkpoints = 2", "TrainConfig.keep_best_metric = 'eval/score'",
                           f"TrainConfig.keep_best_mode = '{mode}'", callbacks=[ScriptedMetric(scores)])
    trainer.fit()
    folder = in_tmp / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == sorted({6, 8, best})
    assert ckpt.Retention(folder, 2, "eval/score", mode).values() == {s: scores[s] for s in sorted({6, 8, best})}


def test_retention_without_best_metric_keeps_last_k(in_tmp):
    trainer = make_trainer(in_tmp, "TrainConfig.keep_checkpoints = 1")
    trainer.fit()
    assert [s for s, _ in ckpt.list_checkpoints(in_tmp / "run" / "checkpoints")] == [8]


def test_retention_rules():
    retention = ckpt.Retention("unused", keep_last=1, metric="loss", mode="min")
    assert retention.kept_steps([2, 4, 6], {2: 0.1, 4: 0.3, 6: 0.2}) == {2, 6}
    assert retention.kept_steps([2, 4, 6], {}) == {6}  # no values yet: never fewer than the newest
    assert retention.kept_steps([6], {2: 0.0}) == {6}  # a deleted best does not count
    assert retention.kept_steps([2, 4], {2: 0.1, 4: 0.1}) == {2, 4}  # tie: the earliest is best
    with pytest.raises(ValueError, match="keep_last must be >= 1"):
        ckpt.Retention("unused", keep_last=0)


def test_a_checkpoint_that_fails_verification_deletes_nothing(in_tmp, monkeypatch):
    trainer = make_trainer(in_tmp, "TrainConfig.keep_checkpoints = 1")
    real_verify = ckpt.verify
    monkeypatch.setattr(ckpt, "verify", lambda path: "disk hiccup" if "00000004" in str(path) else real_verify(path))
    with pytest.raises(TrainingError, match=r"step-00000004\.pt failed verification after writing \(disk hiccup\)"):
        trainer.fit()
    folder = in_tmp / "run" / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(folder)] == [2]  # the only good one survives
    assert (folder / "step-00000004.pt.corrupt").exists()


def test_resume_skips_a_damaged_newest_checkpoint(in_tmp, capfd):
    trainer = make_trainer(in_tmp, "TrainConfig.keep_checkpoints = 3")
    trainer.fit()
    folder = in_tmp / "run" / "checkpoints"
    newest = ckpt.latest(folder)
    newest.write_bytes(newest.read_bytes()[:2000])  # damaged behind our back (not by save_atomic)
    path, state = ckpt.load_latest(folder)
    assert path == ckpt.step_path(folder, 6) and state["step"] == 6
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "skipping damaged checkpoint" in err and "step-00000008.pt" in err


def test_load_latest_never_skips_an_unsafe_file(tmp_path):
    import pickle

    folder = tmp_path / "checkpoints"
    ckpt.save_atomic({"step": 2}, ckpt.step_path(folder, 2))
    with open(ckpt.step_path(folder, 4), "wb") as file:
        pickle.dump({"step": 4, "x": ckpt.Retention}, file)  # needs a class: not weights-only
    with pytest.raises(ckpt.CheckpointError, match="not a weights-only file"):
        ckpt.load_latest(folder)


def test_best_metric_never_logged_warns_once(in_tmp, capfd):
    trainer = make_trainer(in_tmp, "TrainConfig.keep_best_metric = 'loss/totl'")
    trainer.fit()
    err = capfd.readouterr().err
    assert err.count("keep_best_metric 'loss/totl' has not been logged") == 1
    assert [s for s, _ in ckpt.list_checkpoints(in_tmp / "run" / "checkpoints")] == [6, 8]
