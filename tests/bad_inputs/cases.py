"""Bad inputs that are files other than gin: damaged or unsafe shard sets and checkpoints,
missing paths, unreachable tracking stores. Each case builds what it needs inside a
workspace (a folder with data/digits and tiny.gin) and returns the `selfflow` argv.

The gin cases are the files in gin/ (first line `# expect: REGEX`).
"""
from __future__ import annotations

import contextlib
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


# ---- issue 26: records, run folders, bounded shard reads, one clear line --------------------------
_HELD_LOCKS: list[int] = []  # run-folder locks this test process holds while a case runs


def _trained_folder(workspace: Path, name: str, change=None) -> Path:
    """A run folder as `selfflow train` leaves it after 1 step of tiny.gin: config.gin and a full
    checkpoint at step 1 (`change` edits the state before it is saved)."""
    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train import checkpoint as ckpt
    from selfflow.platform.train.trainer import Trainer

    run = workspace / name
    with contextlib.chdir(workspace):  # tiny.gin names data/digits relative to the workspace
        text = config.parse([str(workspace / "tiny.gin")])
        experiment = build_from_gin()
        data = experiment.data.loader(batch_size=experiment.train.batch_size, seed=0)
    trainer = Trainer(experiment, data, run, progress=False)
    trainer.step = 1
    state = trainer.state_dict()
    if change is not None:
        change(state)
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run / "config.gin").write_text(text)
    ckpt.save_atomic(state, ckpt.step_path(run / "checkpoints", 1))
    return run


def _resume(name: str, *params: str, change=None, tracking: bool = False) -> Callable[[Path], list[str]]:
    def build(workspace: Path) -> list[str]:
        run = _trained_folder(workspace, name, change)
        return train("tiny.gin", *params, run_dir=str(run), tracking=tracking) + ["--resume"]

    return build


def _resume_other_store(workspace: Path) -> list[str]:
    run = _trained_folder(workspace, "run_other_store")
    opened = {"opened": "sqlite:////elsewhere/mlflow.db", "pid": 1}
    (run / "tracking-journal.jsonl").write_text(json.dumps(opened) + "\n")
    return train("tiny.gin", run_dir=str(run), tracking=True) + ["--resume", "--runs", "runs_other_store"]


def _run_dir_in_use(workspace: Path) -> list[str]:
    import fcntl
    import os

    run = workspace / "run_in_use"
    run.mkdir(exist_ok=True)
    descriptor = os.open(run / ".selfflow.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run holds the folder
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _HELD_LOCKS.append(descriptor)
    (run / "config.gin").write_text("# the other run's record\n")
    return train("tiny.gin", run_dir=str(run))


def _zero_byte_checkpoint_sample(workspace: Path) -> list[str]:
    run = _trained_folder(workspace, "run_zero_byte")
    (run / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    return ["sample", "--run-dir", str(run), "--checkpoint", str(run / "checkpoints" / "step-00000002.pt")]


def _tar_with(folder: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> None:
    """Replace the first train shard with these members (data for the ones that carry it)."""
    shard = _first_shard(folder)
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as archive:
        for info in members:
            archive.addfile(info, io.BytesIO(data[info.name]) if info.name in data else None)


def _sparse_member(folder: Path) -> None:
    """A tiny shard whose sample array is a sparse file claiming 1 TiB (GNU tar --sparse)."""
    import subprocess

    work = folder / "sparse_work"
    work.mkdir()
    (work / "000000.npy").touch()
    os_truncate(work / "000000.npy", 2**40)
    (work / "000000.cls").write_bytes(b"3")
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(_first_shard(folder)), "000000.npy", "000000.cls"],
                   cwd=work, check=True)
    (work / "000000.npy").unlink()


def os_truncate(path: Path, size: int) -> None:
    import os

    os.truncate(path, size)


def _member_claims_huge_size(folder: Path) -> None:
    """A regular member whose header claims 2 GiB in a shard of a few KB."""
    claim = tarfile.TarInfo("000000.npy")
    claim.size = 2**31
    label = tarfile.TarInfo("000000.cls")
    label.size = 1
    shard = _first_shard(folder)
    with open(shard, "wb") as out:
        out.write(claim.tobuf(format=tarfile.GNU_FORMAT))  # the header alone: no data follows
        out.write(label.tobuf(format=tarfile.GNU_FORMAT) + b"3".ljust(512, b"\0") + b"\0" * 1024)


def _symlink_member(folder: Path) -> None:
    link = tarfile.TarInfo("000000.npy")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/hostname"
    label = tarfile.TarInfo("000000.cls")
    label.size = 1
    _tar_with(folder, [link, label], {"000000.cls": b"3"})


def _huge_index_shape(folder: Path) -> None:
    path = folder / "train.index.json"
    index = json.loads(path.read_text())
    index["shape"] = [100000, 100000, 100]
    path.write_text(json.dumps(index))


def _nan_pixels(key: str, members: dict[str, bytes]) -> dict[str, bytes]:
    array = np.zeros((1, 8, 8), dtype=np.float32)
    array[0, 3, 3], array[0, 4, 4] = np.nan, np.inf
    return {**members, "npy": _npy(array)}


def _sync_other_store(workspace: Path) -> list[str]:
    run = workspace / "run_sync_other_store"
    run.mkdir()
    lines = [{"opened": "sqlite:////tmp/attacker/mlflow.db", "pid": 1},
             {"seq": 1, "op": "artifact", "run_id": "0" * 32, "path": "/etc/hostname", "artifact_path": None}]
    (run / "tracking-journal.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return ["sync", "--run-dir", str(run), "--runs", str(workspace / "runs_sync")]


def _compare_store(workspace: Path) -> str:
    """runs_compare/mlflow.db with one finished run that logged loss/total (built once)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    folder = workspace / "runs_compare"
    if not (folder / "mlflow.db").exists():
        folder.mkdir()
        client = MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        experiment = client.create_experiment("selfflow", artifact_location=(folder / "artifacts").as_uri())
        run = client.create_run(experiment, tags={"objective": "FlowMatchingObjective"}).info.run_id
        client.log_batch(run, metrics=[Metric("loss/total", 0.5, 0, 10)])
        client.set_terminated(run)
    return str(folder)


def _sweep_file(workspace: Path, name: str, space: str) -> list[str]:
    path = workspace / f"{name}.gin"
    path.write_text(f"Sweep.name = '{name}'\nSweep.base_files = ['tiny.gin']\nSweep.space = {space}\n"
                    f"Sweep.seeds = [0]\n")
    return ["sweep", str(path), "--no-tracking", "--runs", "runs_sweep"]


def _include_cycle(workspace: Path) -> list[str]:
    (workspace / "cycle_a.gin").write_text("include 'cycle_b.gin'\n")
    (workspace / "cycle_b.gin").write_text("include 'digits/fm.gin'\ninclude 'cycle_a.gin'\n")
    return train("cycle_a.gin")


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
    # issue 26. Work lost or records rewritten: refused before anything is written.
    Case("resume_changed_lr", _resume("run_resume_lr", "TrainConfig.lr = 0.01"),
         r"--resume changes the run's config \(\S+/run_resume_lr/config\.gin\): TrainConfig\.lr 0\.001 -> 0\.01; "
         r"a resume may change only steps"),
    Case("resume_changed_batch_size_and_seed",
         _resume("run_resume_batch", "TrainConfig.batch_size = 8", "TrainConfig.seed = 3"),
         r"TrainConfig\.batch_size 16 -> 8; TrainConfig\.seed 0 -> 3"),
    Case("resume_changed_objective", _resume("run_resume_objective", "build_experiment.objective = @SelfFlowObjective"),
         r"build_experiment\.objective @FlowMatchingObjective -> @SelfFlowObjective"),
    Case("resume_steps_at_checkpoint", _resume("run_resume_done", "TrainConfig.steps = 1"),
         r"newest checkpoint is at step 1, which already reached TrainConfig\.steps = 1: nothing to train"),
    Case("resume_other_tracking_store", _resume_other_store,
         r"--resume: this run logs to sqlite:////elsewhere/mlflow\.db \(its tracking journal says so\), not to "
         r"sqlite:///\S+/runs_other_store/mlflow\.db"),
    Case("checkpoint_step_not_an_int", _resume("run_step_str", "TrainConfig.steps = 8",
                                               change=lambda state: state.update(step="four")),
         r"checkpoint \S+step-00000001\.pt: 'step' must be an int >= 0, got 'four'"),
    Case("checkpoint_without_optimizer", _resume("run_no_optimizer", "TrainConfig.steps = 8",
                                                 change=lambda state: state.pop("optimizer")),
         r"checkpoint \S+step-00000001\.pt lacks its 'optimizer' state"),
    Case("checkpoint_zero_bytes", _zero_byte_checkpoint_sample,
         r"unreadable checkpoint \S+step-00000002\.pt: empty file \(0 bytes\)"),
    Case("run_dir_in_use", _run_dir_in_use, r"run folder \S+/run_in_use is in use by another run \(pid \d+\)"),
    Case("run_dir_is_a_file", lambda w: (w / "a_file").write_text("x") and train("tiny.gin", run_dir="a_file"),
         r"--run-dir \S+/a_file is a file, not a folder"),
    Case("run_dir_cannot_be_made", lambda w: train("tiny.gin", run_dir="/proc/selfflow_run"),
         r"run folder /proc/selfflow_run: "),
    # Security: shards are bounded before reading; sync never picks its store from a journal.
    Case("shard_sparse_member_of_1_tib", _shard_case("sparse", _sparse_member),
         r"member 000000\.npy is a sparse file; shards hold regular files only"),
    Case("shard_member_claims_2_gib", _shard_case("claims", _member_claims_huge_size),
         r"member 000000\.npy claims 2147483648 bytes, more than the \d+ its index allows"),
    Case("shard_symlink_member", _shard_case("symlink", _symlink_member),
         r"member 000000\.npy is a link or special file"),
    Case("shard_index_declares_huge_samples", _shard_case("huge_shape", _huge_index_shape),
         r"shape \(100000, 100000, 100\) float32 means 4000000000000 bytes per sample"),
    Case("sync_to_the_journals_store", _sync_other_store,
         r"was written for the store sqlite:////tmp/attacker/mlflow\.db, but the configured store is "
         r"sqlite:///\S+/runs_sync/mlflow\.db: pass --tracking-uri"),
    # One clear line, fast.
    Case("gin_param_malformed", lambda w: train("tiny.gin", "TrainConfig.steps = 3", "TrainConfig.lr = (("),
         r"--gin_param 2: malformed gin syntax"),
    Case("gin_param_unbound_macro", lambda w: train("tiny.gin", "TrainConfig.lr = %NOPE"),
         r"--gin_param 1: macro %NOPE is used but never bound"),
    Case("include_cycle", _include_cycle, r"include cycle: cycle_a\.gin -> cycle_b\.gin -> cycle_a\.gin"),
    Case("workers_zero", lambda w: train("tiny.gin") + ["--workers", "0"], r"--workers must be >= 1, got 0"),
    Case("nan_pixels_in_shard", _shard_case("nan_pixels", lambda f: _rewrite_first_shard(f, _nan_pixels)),
         r"shard \S+/train-000000\.tar: member \S+\.npy holds 2 non-finite values \(NaN/Inf\)"),
    Case("compare_bad_filter", lambda w: ["compare", "--filter", "tags.objective = ", "--runs", _compare_store(w),
                                          "--no-log", "--out", "cmp_out"],
         r"--filter 'tags\.objective = ' is not a valid MLflow filter"),
    Case("compare_unknown_metric", lambda w: ["compare", "--experiment", "selfflow", "--metric", "nope", "--runs",
                                              _compare_store(w), "--no-log", "--out", "cmp_out"],
         r"--metric 'nope': none of the 1 compared runs logged it \(logged: loss/total\)"),
    Case("sweep_value_of_wrong_type", lambda w: _sweep_file(w, "sweep_type", "{'TrainConfig.lr': ('grid', ['fast'])}"),
         r"sweep sweep_type, trial bindings .*wrong type for TrainConfig\.lr: got 'fast' \(str\), expected float"),
    Case("sweep_value_out_of_range",
         lambda w: _sweep_file(w, "sweep_range", "{'TrainConfig.weight_decay': ('grid', [-1.0])}"),
         r"TrainConfig\.weight_decay must be a finite number >= 0, got -1\.0"),
    Case("tracking_store_is_a_folder",
         lambda w: (w / "runs_folder_db" / "mlflow.db").mkdir(parents=True) or train("tiny.gin", tracking=True)
         + ["--runs", "runs_folder_db"],
         r"MLflow tracking store unusable at sqlite:///\S+/runs_folder_db/mlflow\.db: \S+ is a folder, not a "
         r"database file"),
    Case("tracking_path_with_percent", lambda w: train("tiny.gin", tracking=True) + ["--runs", "runs%41"],
         r"its path contains '%', which SQLite URIs read as an escape"),
]

# Cases that need an environment (the tracking URI is read from MLFLOW_TRACKING_URI).
CASE_ENV: dict[str, Callable[[], dict[str, str]]] = {
    "tracking_server_unreachable": lambda: {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{_closed_port()}"},
    "tracking_store_unwritable": lambda: {"MLFLOW_TRACKING_URI": "sqlite:////proc/selfflow/mlflow.db"},
}
