"""A short end-to-end train on real digits lowers the held-out flow loss."""
from __future__ import annotations

import torch

from selfflow.components.paths.linear import LinearPath
from selfflow.platform.train.driver import train
from selfflow.platform.train.saved import load_for_sampling


@torch.no_grad()
def held_out_flow_loss(model, tokenizer, data, seed: int = 0) -> float:
    """Mean flow loss on the test split with fixed noise and t (same draws for every model)."""
    x, y = data.arrays("test")
    x0 = tokenizer.encode(torch.as_tensor(x))
    generator = torch.Generator().manual_seed(seed)
    t = torch.rand(x0.shape[0], generator=generator)
    eps = torch.randn(x0.shape, generator=generator)
    path = LinearPath()
    v = model(path.interpolate(x0, eps, t), t, torch.as_tensor(y)).velocity
    return float(((v - path.velocity_target(x0, eps)) ** 2).mean())


def test_short_training_lowers_held_out_loss(in_tmp):
    params = [
        "TrainConfig.steps = 150",
        "TrainConfig.batch_size = 64",
        "TrainConfig.checkpoint_every = 0",
        "TrainConfig.eval_every = 0",
        "TrainConfig.ema_decay = 0.9",
        "SamplingConfig.steps = 4",
        "SamplingConfig.per_class = 2",
        "build_experiment.evaluation = None",  # the evaluation suite has its own tests
    ]
    result = train(["digits/fm.gin"], params, run_dir=in_tmp / "run", runs_dir=in_tmp / "runs", progress=False)
    experiment, trained, _ = load_for_sampling(result.run_dir)
    # The same architecture, untrained (adaLN-Zero: predicts zero velocity).
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin

    config.parse_config_string((result.run_dir / "config.gin").read_text())
    torch.manual_seed(0)
    untrained = build_from_gin().model.eval()
    before = held_out_flow_loss(untrained, experiment.tokenizer, experiment.data)
    after = held_out_flow_loss(trained, experiment.tokenizer, experiment.data)
    assert after < 0.8 * before, (before, after)
    grids = list((result.run_dir / "samples").glob("*.png"))
    assert grids, "a sample grid is written at the end of training"
    assert (result.run_dir / "operative_config.gin").read_text().strip()
