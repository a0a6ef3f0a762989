"""Bad inputs that are files other than gin: damaged or unsafe shard sets and checkpoints,
missing paths, unreachable tracking stores. Each case builds what it needs inside a
workspace (a folder with data/digits and tiny.gin) and returns the `selfflow` argv.

The gin cases are the files in gin/ (first line `# expect: REGEX`).
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import socket
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

PAYLOAD_MARKER = "PWNED_BY_UNPICKLING"  # a file the malicious payloads would create


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], list[str]]  # workspace -> argv after `selfflow`
    expect: str  # regex the one stderr line must match
    exit_code: int = 2


class Payload:
    """Unpickling this creates PAYLOAD_MARKER in the working directory."""

    def __reduce__(self):
        return (open, (PAYLOAD_MARKER, "w"))


def train(gin: str, *params: str, run_dir: str = "run", tracking: bool = False) -> list[str]:
    argv = ["train", "--gin_file", gin, "--run-dir", run_dir, "--quiet"]
    for param in params:
        argv += ["--gin_param", param]
    return argv if tracking else argv + ["--no-tracking"]


# ---- shard sets -----------------------------------------------------------------------------
def _copy_shards(workspace: Path, name: str) -> Path:
    """A private copy of the digits shard set to damage."""
    target = workspace / "bad_data" / name
    shutil.copytree(workspace / "data" / "digits", target)
    return target


def _first_shard(folder: Path) -> Path:
    index = json.loads((folder / "train.index.json").read_text())
    return folder / index["shards"][0]["file"]


def _rewrite_first_shard(folder: Path, change: Callable[[str, dict[str, bytes]], dict[str, bytes]]) -> None:
    """Rewrite the first train shard, letting `change` edit the first sample's members."""
    shard = _first_shard(folder)
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as archive:
        for member in archive.getmembers():
            key, _, extension = member.name.partition(".")
            samples.setdefault(key, {})[extension] = archive.extractfile(member).read()
    first = next(iter(samples))
    samples[first] = change(first, samples[first])
    with tarfile.open(shard, "w") as archive:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _shard_case(name: str, damage: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(workspace: Path) -> list[str]:
        folder = _copy_shards(workspace, name)
        damage(folder)
        return train("tiny.gin", f"ShardData.root = '{folder}'")

    return build


def _empty_index(folder: Path) -> None:
    path = folder / "train.index.json"
    index = json.loads(path.read_text())
    index["shards"], index["total"] = [], 0
    path.write_text(json.dumps(index))


def _truncate_mid_member(folder: Path) -> None:
    shard = _first_shard(folder)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2 + 100])


def _truncate_at_member_boundary(folder: Path) -> None:
    """Cut after a whole number of samples: a tar that still parses, with fewer samples."""
    shard = _first_shard(folder)
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    starts = [m.offset for i, m in enumerate(members)
              if i == 0 or m.name.split(".")[0] != members[i - 1].name.split(".")[0]]
    cut = starts[len(starts) // 2]  # where a sample's first member begins
    shard.write_bytes(shard.read_bytes()[:cut])


def _corrupt(folder: Path) -> None:
    shard = _first_shard(folder)
    data = bytearray(shard.read_bytes())
    data[:512] = b"\xde\xad\xbe\xef" * 128  # the first tar header becomes garbage
    shard.write_bytes(bytes(data))


def _drop_label(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {ext: data for ext, data in members.items() if ext != "cls"}


def _wrong_shape(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "npy": _npy(np.zeros((1, 4, 4), dtype=np.float32))}


def _wrong_dtype(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "npy": _npy(np.zeros((1, 8, 8), dtype=np.float64))}


def _label_out_of_range(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "cls": b"12"}


def _pickle_member(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "pkl": pickle.dumps(Payload())}


def _torch_member(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    return {**members, "pth": pickle.dumps(Payload())}


# ---- checkpoints ----------------------------------------------------------------------------
def _run_folder(workspace: Path, name: str, hidden_dim: int = 32) -> Path:
    """A run folder as `selfflow train` leaves it: config.gin plus a checkpoint of that model."""
    import torch

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train import checkpoint as ckpt

    run = workspace / name
    text = config.parse([str(workspace / "tiny.gin")], [f"DiT.hidden_dim = {hidden_dim}"])
    experiment = build_from_gin()
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.gin").write_text(text)
    model = experiment.model.state_dict()
    state = {"step": 1, "model": model, "ema": {"model": model, "updates": 1}, "mlflow_run_id": ""}
    ckpt.save_atomic(state, ckpt.step_path(run / "checkpoints", 1))
    del torch
    return run


def _pickled_checkpoint(workspace: Path) -> list[str]:
    run = _run_folder(workspace, "run_pickled")
    evil = workspace / "evil.pt"
    with open(evil, "wb") as file:
        pickle.dump({"step": 1, "ema": Payload()}, file)
    return ["sample", "--run-dir", str(run), "--checkpoint", str(evil)]


def _torch_pickled_checkpoint(workspace: Path) -> list[str]:
    import torch

    run = _run_folder(workspace, "run_torch_pickled")
    evil = workspace / "evil_torch.pt"
    torch.save({"step": 1, "ema": Payload()}, evil)  # a real torch zip whose data.pkl runs code
    return ["sample", "--run-dir", str(run), "--checkpoint", str(evil)]


def _truncated_checkpoint(workspace: Path) -> list[str]:
    run = _run_folder(workspace, "run_truncated")
    path = run / "checkpoints" / "step-00000001.pt"
    path.write_bytes(path.read_bytes()[:1000])
    return ["sample", "--run-dir", str(run)]


def _other_architecture_sample(workspace: Path) -> list[str]:
    run = _run_folder(workspace, "run_arch")
    other = _run_folder(workspace, "run_wider", hidden_dim=48)
    return ["sample", "--run-dir", str(run), "--checkpoint", str(other / "checkpoints" / "step-00000001.pt")]


def _other_architecture_resume(workspace: Path) -> list[str]:
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train import checkpoint as ckpt
    from selfflow.platform.train.trainer import Trainer

    run = workspace / "run_resume_arch"
    config.parse([str(workspace / "tiny.gin")], ["DiT.hidden_dim = 48"])
    trainer = Trainer(build_from_gin(), iter(()), run, progress=False)
    ckpt.save_atomic(trainer.state_dict(), ckpt.step_path(run / "checkpoints", 0))
    # The run's record says what it trains with (the checkpoint came from elsewhere).
    (run / "config.gin").write_text(config.parse([str(workspace / "tiny.gin")]))
    return train("tiny.gin", run_dir=str(run)) + ["--resume"]


# ---- tracking and command line --------------------------------------------------------------
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket closes


CASES: list[Case] = [
    Case("missing_config_file", lambda w: train("no_such_config.gin"), r"config file not found: no_such_config\.gin"),
    Case("train_without_gin_file", lambda w: ["train", "--no-tracking"], r"train needs at least one --gin_file"),
    Case("binding_with_unknown_parameter", lambda w: train("tiny.gin", "TrainConfig.step = 3"),
         r"--gin_param 1: unknown parameter 'step' of TrainConfig.*did you mean 'steps'"),
    Case("binding_with_dynamic_registration", lambda w: train("tiny.gin", "from __gin__ import dynamic_registration"),
         r"gin 'from __gin__ import dynamic_registration' is not allowed"),
    Case("binding_imports_missing_module", lambda w: train("tiny.gin", "import selfflow_no_such_lab"),
         r"gin 'import selfflow_no_such_lab': no such module"),
    Case("empty_shard_set", _shard_case("empty", _empty_index), r"empty shard set: .*lists no shards"),
    Case("truncated_shard_mid_member", _shard_case("truncated_mid", _truncate_mid_member),
         r"shard \S+/train-000000\.tar: sample \S+ has no \.npy member"),
    Case("truncated_shard_at_boundary", _shard_case("truncated_boundary", _truncate_at_member_boundary),
         r"shard \S+/train-000000\.tar holds \d+ samples but its index lists \d+ \(truncated"),
    Case("corrupted_shard", _shard_case("corrupted", _corrupt), r"shard .*train-000000\.tar"),
    Case("sample_missing_label", _shard_case("no_label", lambda f: _rewrite_first_shard(f, _drop_label)),
         r"sample \S+ has no \.cls member"),
    Case("sample_wrong_shape", _shard_case("shape", lambda f: _rewrite_first_shard(f, _wrong_shape)),
         r"has shape \(1, 4, 4\) dtype float32; the index says \(1, 8, 8\) float32"),
    Case("sample_wrong_dtype", _shard_case("dtype", lambda f: _rewrite_first_shard(f, _wrong_dtype)),
         r"has shape \(1, 8, 8\) dtype float64; the index says \(1, 8, 8\) float32"),
    Case("label_out_of_range", _shard_case("label", lambda f: _rewrite_first_shard(f, _label_out_of_range)),
         r"has label 12 outside \[0, 10\)"),
    Case("shard_with_pickle_member", _shard_case("pickle", lambda f: _rewrite_first_shard(f, _pickle_member)),
         r"refusing to decode member \S+\.pkl"),
    Case("shard_with_torch_member", _shard_case("torch", lambda f: _rewrite_first_shard(f, _torch_member)),
         r"refusing to decode member \S+\.pth"),
    Case("checkpoint_plain_pickle", _pickled_checkpoint, r"refusing checkpoint .*evil\.pt: not a weights-only file"),
    Case("checkpoint_torch_with_code", _torch_pickled_checkpoint,
         r"refusing checkpoint .*evil_torch\.pt: not a weights-only file"),
    Case("checkpoint_truncated", _truncated_checkpoint, r"unreadable checkpoint .*step-00000001\.pt"),
    Case("checkpoint_other_architecture", _other_architecture_sample,
         r"does not fit this backbone: shape mismatch \[\('blocks\.0\.\S+', \(288,\), \(192,\)\)"),
    Case("resume_other_architecture", _other_architecture_resume,
         r"does not fit this backbone: shape mismatch \[\('blocks\.0\.\S+', \(288,\), \(192,\)\)"),
    Case("resume_without_checkpoint", lambda w: train("tiny.gin", run_dir="empty_run") + ["--resume"],
         r"--resume: no checkpoint in \S*empty_run/checkpoints"),
    # Adam's first step with lr 1e30 sends the weights to ~1e30: step 2's loss overflows.
    Case("nan_loss", lambda w: train("tiny.gin", "TrainConfig.lr = 1e30", "TrainConfig.checkpoint_every = 1",
                                     run_dir="run_nan"),
         r"non-finite loss term 'flow' at step 2; stopping \(last good checkpoint kept: \S*run_nan/checkpoints/"
         r"step-00000001\.pt\)", exit_code=3),
    Case("tracking_server_unreachable",
         lambda w: train("tiny.gin", tracking=True) + ["--runs", "runs"],
         r"MLflow tracking store unreachable at http://127\.0\.0\.1:\d+"),
    Case("tracking_store_unwritable", lambda w: train("tiny.gin", tracking=True),
         r"MLflow tracking store unusable at sqlite:////proc/selfflow/mlflow\.db"),
    Case("sync_without_journal", lambda w: ["sync", "--run-dir", "no_such_run"],
         r"no tracking journal at no_such_run/tracking-journal\.jsonl"),
]

# Cases that need an environment (the tracking URI is read from MLFLOW_TRACKING_URI).
CASE_ENV: dict[str, Callable[[], dict[str, str]]] = {
    "tracking_server_unreachable": lambda: {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"},
    "tracking_store_unwritable": lambda: {"MLFLOW_TRACKING_URI": "sqlite:////proc/selfflow/mlflow.db"},
}
