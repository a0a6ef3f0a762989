"""Chaos: SIGKILL a real `selfflow train` at seeded random moments (some provably inside a
checkpoint write), resume each time, and end with exactly the state and the MLflow metric
history of an uninterrupted run.

Metric history: the trainer's running means live in the checkpoint, so a resumed run
recomputes the steps after its checkpoint with the same values; the tracker stores one
value per (metric, step) (it skips steps the store already has), so the steps delivered
before the kill are neither lost nor duplicated. Compared exactly, per key, including
the number of points; only train/samples_per_s (wall-clock throughput) is left out.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import torch
from reliability_helpers import (
    cli_command,
    cli_env,
    journal_progress,
    metric_histories,
    wait_for,
    write_tiny_gin,
)
from selfflow_testing.faults import WRITE_PAUSE_ENV

from selfflow.platform.train import checkpoint as ckpt

STEPS, LOG_EVERY, CHECKPOINT_EVERY = 150, 4, 6  # 6 is not a multiple of 4: running means cross checkpoints
MID_WRITE_KILLS, RANDOM_KILLS = 2, 3
WRITE_PAUSE_S = 0.6  # the save_atomic test hook holds a half-written temp file this long
TIMING_ONLY = {"train/samples_per_s"}


def _tensors(value, prefix=""):
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_tensors(item, f"{prefix}.{key}"))
        return out
    if isinstance(value, (list, tuple)):
        out = {}
        for index, item in enumerate(value):
            out.update(_tensors(item, f"{prefix}[{index}]"))
        return out
    return {prefix: value}


def _assert_same_state(reference: dict, resumed: dict) -> None:
    for part in ("step", "model", "objective", "ema", "optimizer", "lr_schedule", "generator", "rank_generators",
                 "data", "running", "skipped"):
        a, b = _tensors(reference[part], part), _tensors(resumed[part], part)
        assert a.keys() == b.keys(), f"{part}: different entries"
        for key in a:
            if isinstance(a[key], torch.Tensor):
                assert torch.equal(a[key], b[key]), f"{key} differs from the uninterrupted run"
            else:
                assert a[key] == b[key], f"{key}: {a[key]!r} != {b[key]!r}"


def _start(gin: Path, run_dir: Path, uri: str, cwd: Path, resume: bool, pause: float = 0.0) -> subprocess.Popen:
    args = ["train", "--gin_file", str(gin), "--run-dir", str(run_dir), "--quiet"] + (["--resume"] if resume else [])
    # The test's own fault injector (tests/plugins/selfflow_testing/faults.py) stalls checkpoint writes.
    args += ["--gin_param", "import selfflow_testing.faults"]
    extra = {WRITE_PAUSE_ENV: str(pause)} if pause else {}
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=cli_env(uri, **extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp")) if folder.is_dir() else []


def _alive_or_fail(process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        out, err = process.communicate()
        raise AssertionError(f"training ended (exit {process.returncode}) before the planned kill: {err[-2000:]}")
    return True


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(tmp_path, digits_root, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_root)
    monkeypatch.chdir(tmp_path)
    gin = write_tiny_gin(tmp_path, "chaos", steps=STEPS, log_every=LOG_EVERY, checkpoint_every=CHECKPOINT_EVERY)
    ref_uri = f"sqlite:///{tmp_path / 'reference.db'}"
    chaos_uri = f"sqlite:///{tmp_path / 'chaos.db'}"
    chaos_dir = tmp_path / "chaos_run"
    checkpoints = chaos_dir / "checkpoints"

    # The uninterrupted reference, in this process (same code below the CLI, no extra imports to pay).
    from selfflow.platform.train.driver import train

    train([str(gin)], run_dir=tmp_path / "reference_run", runs_dir=tmp_path, tracking_uri=ref_uri, progress=False)

    rng = random.Random(20240607)
    modes = ["mid-write"] * MID_WRITE_KILLS + ["random"] * RANDOM_KILLS
    rng.shuffle(modes)
    # Seeded kill moments in training progress, increasing and apart, clear of both ends.
    targets = sorted(rng.sample(range(CHECKPOINT_EVERY + 2, STEPS - 25, 3), len(modes)))
    kills, landed_mid_write, run_ids, stale_temp = [], 0, set(), []
    for round_index, (mode, target) in enumerate(zip(modes, targets)):
        process = _start(gin, chaos_dir, chaos_uri, tmp_path, resume=round_index > 0,
                          pause=WRITE_PAUSE_S if mode == "mid-write" else 0.0)
        target = max(target, journal_progress(chaos_dir) + 3)
        wait_for(lambda: _alive_or_fail(process) and journal_progress(chaos_dir) >= target, 240,
                 what=f"step {target}")
        # The previous kill's temp files are gone: the resume cleaned them up.
        assert not [p for p in stale_temp if p.exists()], "temp files of a killed save survived the resume"
        if mode == "mid-write":
            wait_for(lambda: _alive_or_fail(process) and _temp_files(checkpoints), 120, interval=0.005,
                     what="a checkpoint write")
            time.sleep(rng.uniform(0.0, WRITE_PAUSE_S / 3))
        else:
            time.sleep(rng.uniform(0.0, 0.05))
        _alive_or_fail(process)
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        stale_temp = _temp_files(checkpoints)
        landed_mid_write += bool(stale_temp)
        kills.append((mode, journal_progress(chaos_dir), [p.name for p in stale_temp]))
        # The newest complete checkpoint is never torn: it verifies and loads weights-only.
        newest = ckpt.latest(checkpoints)
        assert newest is not None and ckpt.verify(newest) is None
        run_ids.add(ckpt.load(newest)["mlflow_run_id"])

    final = _start(gin, chaos_dir, chaos_uri, tmp_path, resume=True)
    out, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    assert not [p for p in stale_temp if p.exists()] and not _temp_files(checkpoints)

    print(f"\nchaos: {len(kills)} SIGKILLs, {landed_mid_write} inside a checkpoint write: {kills}")
    assert len(kills) >= 5 and landed_mid_write >= 1

    # Same parameters, EMA, optimizer, schedules, RNGs, data position, running means.
    resumed_state = ckpt.load(ckpt.step_path(checkpoints, STEPS))
    reference_state = ckpt.load(ckpt.step_path(tmp_path / "reference_run" / "checkpoints", STEPS))
    _assert_same_state(reference_state, resumed_state)

    # One MLflow run across all resumes, with the uninterrupted run's metric history.
    run_ids.add(resumed_state["mlflow_run_id"])
    assert len(run_ids) == 1, f"resumes changed the MLflow run: {run_ids}"
    resumed_history = metric_histories(chaos_uri, resumed_state["mlflow_run_id"])
    reference_history = metric_histories(ref_uri, reference_state["mlflow_run_id"])
    assert resumed_history.keys() == reference_history.keys()
    expected_steps = sorted(set(range(LOG_EVERY, STEPS + 1, LOG_EVERY)) | {STEPS})
    for key in reference_history:
        steps = [step for step, _ in resumed_history[key]]
        assert steps == expected_steps, f"{key}: logged steps {steps} (duplicates or gaps)"
        if key not in TIMING_ONLY:
            assert resumed_history[key] == reference_history[key], f"{key} history differs"
    print(f"chaos: {len(resumed_history)} metrics x {len(expected_steps)} steps identical to the uninterrupted run")
