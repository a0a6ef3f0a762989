"""The trainer on a device that is not the CPU, without a GPU: PyTorch's meta device (see
tests/unit/test_devices.py) refuses every op that mixes its tensors with CPU tensors and holds no
values, so a step gets exactly as far as its first host read (the finiteness check of the loss
terms) when everything before it (raw batch, tokenizer, student and EMA teacher) ran on the device."""
from __future__ import annotations

import pytest
import torch

from selfflow.platform.config import bootstrap as config
from selfflow.platform.config.experiment import build_from_gin
from selfflow.platform.errors import UserError
from selfflow.platform.train.trainer import Trainer

META = torch.device("meta")
PARAMS = [
    "build_experiment.evaluation = None",
    "TrainConfig.batch_size = 8",
    "DiT.gathered_modulation = False",  # the gathered path's torch.unique has no meta kernel (CUDA has one)
]


def meta_trainer(tmp_path, gin_file: str) -> Trainer:
    config.parse([gin_file], PARAMS)
    return Trainer(build_from_gin(), iter(()), tmp_path / "run", progress=False, device=META)


def raw_batch(labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 8, 8, generator=generator)
    return {"x": x, "y": labels if labels is not None else torch.randint(0, 10, (8,), generator=generator)}


@pytest.mark.parametrize("gin_file", ["digits/fm.gin", "digits/selfflow.gin"])
def test_a_step_runs_on_the_trainer_device_up_to_its_first_host_read(in_tmp, gin_file):
    trainer = meta_trainer(in_tmp, gin_file)
    assert trainer.device == META
    placed = list(trainer.module.parameters()) + list(trainer.ema.model.parameters())
    assert placed and all(p.device == META for p in placed)
    assert trainer.generator.device == torch.device("cpu")  # draws stay device-independent
    assert not trainer.optimizer.param_groups[0]["fused"]  # AdamW has no fused kernel for the meta device
    with pytest.raises(RuntimeError, match="cannot be called on meta tensors"):
        trainer.train_step(raw_batch())


def test_labels_are_checked_on_the_host_before_they_move(in_tmp):
    trainer = meta_trainer(in_tmp, "digits/fm.gin")
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 11])
    with pytest.raises(UserError, match=r"batch label 11 out of range \[0, 10\]"):
        trainer.train_step(raw_batch(labels))


def test_the_default_device_here_is_the_cpu(in_tmp):
    config.parse(["digits/fm.gin"], PARAMS[:2])
    trainer = Trainer(build_from_gin(), iter(()), in_tmp / "run", progress=False)
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert trainer.device == expected and trainer.experiment.train.device == "auto"
    assert all(p.device.type == expected.type for p in trainer.module.parameters())
    assert trainer.optimizer.param_groups[0]["fused"]  # AdamW's fused kernel on CPU and CUDA
