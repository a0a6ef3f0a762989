"""TrainConfig.compile: the compiled student, EMA teacher and sampler give the eager results to
float tolerance (inductor on the CPU). Slow: compiling takes ~20-60 s here."""
from __future__ import annotations

import pytest
import torch

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import build_from_gin
from selfflow.platform.evaluate.generation import generate
from selfflow.platform.train.trainer import Trainer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

SMALL = ["DiT.hidden_dim = 32", "DiT.depth = 2", "DiT.num_heads = 2", "TrainConfig.batch_size = 8",
         "build_experiment.evaluation = None", "SamplingConfig.steps = 3"]


def trained(objective: str, mode: str, tmp_path) -> Trainer:
    config.parse([f"digits/{objective}.gin"], [*SMALL, f"TrainConfig.compile = '{mode}'"])
    trainer = Trainer(build_from_gin(), iter(()), tmp_path / mode, progress=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        trainer.train_step({"x": torch.rand(8, 1, 8, 8, generator=generator),
                            "y": torch.randint(0, 10, (8,), generator=generator)})
    return trainer


@pytest.mark.parametrize("objective, mode", [("selfflow", "step")])  # the student, teacher, objective
def test_compiled_training_and_sampling_match_eager(objective, mode, tmp_path):
    eager, compiled = trained(objective, "none", tmp_path), trained(objective, mode, tmp_path)
    assert hasattr(compiled.module.model, "_compiled_call_impl")  # compiled in place: same state dict keys
    assert list(compiled.module.state_dict()) == list(eager.module.state_dict())
    for (name, a), b in zip(eager.module.state_dict().items(), compiled.module.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    labels = torch.arange(4)
    samples = [generate(t.ema.model, t.experiment.tokenizer, t.experiment.sampling, labels, num_samples=4,
                        generator=torch.Generator().manual_seed(1)) for t in (eager, compiled)]
    torch.testing.assert_close(samples[1], samples[0], rtol=1e-4, atol=1e-4)
