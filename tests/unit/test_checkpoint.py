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


def nested_state(scale: float) -> dict:
    return {"model": {"w": torch.full((3, 4), scale), "b": torch.arange(4) * scale},
            "optimizer": {"state": {0: {"step": torch.tensor(7.0), "exp_avg": torch.full((5,), -scale)}},
                          "param_groups": [{"lr": 0.1, "params": [0]}]},
            "generators": [torch.ByteTensor([1, 2, 3])], "step": 7}


@pytest.mark.parametrize("copy", [ckpt.host_copy, ckpt.StagingBuffers().copy], ids=["fresh", "staging"])
def test_host_copies_equal_the_state_and_share_no_memory(copy):
    live = nested_state(2.0)
    snapshot = copy(live)
    assert snapshot["step"] == 7 and snapshot["optimizer"]["param_groups"] == live["optimizer"]["param_groups"]
    live_tensors, copied = ckpt.tensors_in(live), ckpt.tensors_in(snapshot)
    assert len(copied) == len(live_tensors) == 5
    for original, duplicate in zip(live_tensors, copied):
        assert duplicate.dtype == original.dtype and torch.equal(duplicate, original)
        assert duplicate.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()


def test_staging_buffers_are_reused_until_the_layout_changes():
    staging = ckpt.StagingBuffers()
    first = [t.data_ptr() for t in ckpt.tensors_in(staging.copy(nested_state(1.0)))]
    second = staging.copy(nested_state(3.0))
    assert [t.data_ptr() for t in ckpt.tensors_in(second)] == first
    assert torch.equal(second["model"]["w"], torch.full((3, 4), 3.0))
    grown = nested_state(1.0)
    grown["model"]["w"] = torch.ones(6, 4)
    assert torch.equal(staging.copy(grown)["model"]["w"], torch.ones(6, 4))


@pytest.mark.parametrize("keep_buffers", [True, False])
def test_background_writes_hold_the_state_at_submit_time(tmp_path, keep_buffers):
    writer = ckpt.CheckpointWriter(background=True, keep_buffers=keep_buffers)
    live = nested_state(1.0)
    paths = []
    for step in (1, 2, 3):
        paths.append(tmp_path / f"step-{step:08d}.pt")
        writer.submit(live, paths[-1])
        for tensor in ckpt.tensors_in(live):
            tensor.add_(1)  # training goes on while the file is written
    assert writer.wait() == paths[-1]
    for step, path in enumerate(paths, start=1):
        assert ckpt.verify(path) is None
        assert torch.equal(ckpt.load(path)["model"]["w"], torch.full((3, 4), float(step)))
