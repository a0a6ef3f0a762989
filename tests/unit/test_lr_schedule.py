"""The learning-rate schedule: warmup, then constant, cosine or linear decay, re-derived by hand."""
import math

import pytest
import torch

from selfflow.platform.config.experiment import TrainConfig
from selfflow.platform.errors import ConfigError
from selfflow.platform.train.trainer import lr_factor


def test_warmup_is_linear_then_constant():
    factor = lr_factor(warmup_steps=4, total_steps=20)
    assert [factor(step) for step in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert factor(19) == 1.0


@pytest.mark.parametrize("final", [0.0, 0.1])
def test_cosine_decay_matches_the_formula(final):
    warmup, total = 10, 110  # decay runs over steps 10 .. 109, i.e. 99 intervals
    factor = lr_factor(warmup, total, "cosine", final)
    for step in (10, 30, 59, 80, 109):
        progress = (step - warmup) / (total - 1 - warmup)
        expected = final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))
        assert factor(step) == pytest.approx(expected, abs=1e-12)
    assert factor(warmup) == pytest.approx(1.0)
    assert factor(total - 1) == pytest.approx(final)  # the last optimizer step runs at the final rate
    assert factor(total + 50) == pytest.approx(final)  # never below it, even past the planned end


def test_linear_decay_is_a_straight_line():
    factor = lr_factor(0, 11, "linear", 0.0)
    assert [round(factor(step), 12) for step in range(11)] == [round(1 - k / 10, 12) for k in range(11)]


def test_the_trainer_uses_the_schedule(in_tmp):
    from selfflow.platform.train.driver import train

    params = ["DiT.hidden_dim = 32", "DiT.depth = 2", "DiT.num_heads = 2", "TrainConfig.batch_size = 8",
              "TrainConfig.steps = 6", "TrainConfig.log_every = 1", "TrainConfig.eval_every = 0",
              "TrainConfig.warmup_steps = 2", "TrainConfig.lr = 0.01", "TrainConfig.lr_decay = 'linear'",
              "TrainConfig.final_lr_fraction = 0.2", "SamplingConfig.steps = 2", "SamplingConfig.per_class = 1"]
    result = train(["digits/fm.gin"], params, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs", progress=False)
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=result.tracking_uri).get_metric_history(result.mlflow_run_id, "train/lr")
    logged = {m.step: m.value for m in history}
    factor = lr_factor(2, 6, "linear", 0.2)
    # train/lr at step k is the rate the next step will use (the schedule has stepped k times)
    assert logged == pytest.approx({k: 0.01 * factor(k) for k in range(1, 7) if k in logged})
    assert len(logged) >= 5


@pytest.mark.parametrize("binding, message", [
    ({"lr_decay": "step"}, "lr_decay must be one of constant, cosine, linear, got 'step'"),
    ({"final_lr_fraction": 1.5}, "final_lr_fraction must be in [0, 1], got 1.5"),
])
def test_bad_schedule_settings_are_clear_errors(binding, message):
    with pytest.raises(ConfigError) as info:
        TrainConfig(**binding)
    assert message in str(info.value)


def test_lambda_lr_state_round_trips():
    # A resumed run rebuilds the lambda from the config and restores only LambdaLR's counter.
    parameter = torch.nn.Parameter(torch.zeros(1))
    make = lambda: torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([parameter], lr=1.0),
                                                      lr_factor(1, 8, "cosine"))
    first = make()
    for _ in range(5):
        first.optimizer.step()
        first.step()
    second = make()
    second.load_state_dict(first.state_dict())
    assert second.get_last_lr() == first.get_last_lr() == [pytest.approx(lr_factor(1, 8, "cosine")(5))]
