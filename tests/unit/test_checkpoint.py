import pickle

import pytest
import torch
from torch import nn

from selfflow.platform.errors import CheckpointError
from selfflow.platform.train import checkpoint as ckpt


class Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_atomic_save_and_load(tmp_path):
    path = ckpt.save_atomic({"w": torch.ones(3), "step": 5}, tmp_path / "step-00000005.pt")
    assert ckpt.load(path)["step"] == 5
    assert ckpt.latest(tmp_path) == path
    assert not list(tmp_path.glob(".*.tmp"))


def test_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(CheckpointError, match="not a weights-only file|unreadable"):
        ckpt.load(path)


def test_refuses_torch_saved_object(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), path)  # a whole module needs unpickling of code
    with pytest.raises(CheckpointError, match="not a weights-only file"):
        ckpt.load(path)


def test_architecture_mismatch_names_keys(tmp_path):
    state = nn.Linear(3, 2).state_dict()
    with pytest.raises(CheckpointError, match="shape mismatch.*weight"):
        ckpt.load_model_state(nn.Linear(4, 2), state, "backbone", "x.pt")
    with pytest.raises(CheckpointError, match="missing"):
        ckpt.load_model_state(nn.Sequential(nn.Linear(3, 2)), state, "backbone", "x.pt")


def test_temp_files_cleaned(tmp_path):
    (tmp_path / ".step-00000001.pt.abc.tmp").write_bytes(b"partial")
    assert ckpt.clean_temp_files(tmp_path) == 1
    assert ckpt.latest(tmp_path) is None
