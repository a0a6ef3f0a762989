"""Issue 26: no work lost at the end of a run, run records that never lie, one run per folder,
SIGTERM/SIGINT that stop cleanly, and file-system failures at the run folder as one line.

Each test reproduces a case of the issue: the trained state is on disk before the sample grid
and evaluation run, and a missing test split fails before training; a resume that changes the
config is refused before anything is written (config.gin, operative_config.gin and the MLflow
run stay as they were) while more steps are applied and recorded; two runs into one folder;
SIGTERM (exit 143) and SIGINT (exit 130) checkpoint, mark the MLflow run KILLED, say so in one
line and resume onto the uninterrupted run's state; a read-only and a full run folder.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from reliability_helpers import cli_command, cli_env, journal_progress, run_cli, wait_for, write_tiny_gin

from selfflow.platform.errors import CheckpointError, UserError
from selfflow.platform.train import checkpoint as ckpt
from selfflow.platform.train.driver import train


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{stderr[-3000:]}"
    return lines[0]


def _tensors(value, prefix=""):
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _tensors(item, f"{prefix}.{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, item in enumerate(value) for k, v in _tensors(item, f"{prefix}[{i}]").items()}
    return {prefix: value}


def _assert_same_state(a: dict, b: dict) -> None:
    for part in ("step", "model", "objective", "ema", "optimizer", "lr_schedule", "generator", "data", "running"):
        ta, tb = _tensors(a[part], part), _tensors(b[part], part)
        assert ta.keys() == tb.keys(), part
        for key in ta:
            same = torch.equal(ta[key], tb[key]) if isinstance(ta[key], torch.Tensor) else ta[key] == tb[key]
            assert same, f"{key} differs from the uninterrupted run"


# ---- 1. the last step cannot lose the run ---------------------------------------------------------


def test_final_checkpoint_is_written_before_the_sample_grid(in_tmp):
    """The issue's allocation failure: the sample grid asks for far more memory than exists."""
    gin = write_tiny_gin(in_tmp, "tiny", steps=4, log_every=2, checkpoint_every=0)
    with pytest.raises(RuntimeError, match="allocate"):
        train([str(gin)], ["SamplingConfig.per_class = 1000000000"], run_dir=in_tmp / "run", tracking=False,
              progress=False)
    final = ckpt.step_path(in_tmp / "run" / "checkpoints", 4)
    assert ckpt.list_checkpoints(in_tmp / "run" / "checkpoints") == [(4, final)]  # checkpoint_every = 0
    assert ckpt.verify(final) is None and ckpt.load(final)["step"] == 4
    assert (in_tmp / "run" / "final_checkpoint.txt").read_text().strip() == str(final.resolve())


def test_a_missing_test_split_fails_before_training(in_tmp, digits_root):
    """`rm data/digits-copy/test.index.json` with evaluation on: refused at start, nothing trained."""
    shutil.copytree(digits_root, in_tmp / "digits-copy")
    (in_tmp / "digits-copy" / "test.index.json").unlink()
    gin = write_tiny_gin(in_tmp, "tiny", steps=200, checkpoint_every=0)
    params = ["build_experiment.evaluation = @EvalSuite()", "ShardData.root = 'digits-copy'"]
    with pytest.raises(UserError, match=r"shard index not found: digits-copy/test\.index\.json"):
        train([str(gin)], params, run_dir=in_tmp / "run", tracking=False, progress=False)
    assert not (in_tmp / "run" / "checkpoints").exists()


def test_checkpoint_retention_still_ranks_by_the_steps_evaluation(in_tmp):
    """The checkpoint is written before evaluation, retention after it: keep_best_metric sees the
    metric evaluation logged at the checkpoint's own step."""
    from test_nan_and_retention import RecordingTracker, ScriptedMetric

    from selfflow.platform.config import bootstrap as config
    from selfflow.platform.config.experiment import build_from_gin
    from selfflow.platform.train.callbacks import CheckpointEvery
    from selfflow.platform.train.trainer import Trainer

    gin = write_tiny_gin(in_tmp, "tiny", steps=8, log_every=2, checkpoint_every=2)
    config.parse([str(gin)], ["TrainConfig.keep_checkpoints = 1", "TrainConfig.keep_best_metric = 'eval/score'"])
    experiment = build_from_gin()
    saver = CheckpointEvery(2, defer_retention=True)
    scores = {2: 0.5, 4: 0.1, 6: 0.3, 8: 0.2}
    trainer = Trainer(experiment, experiment.data.loader(batch_size=16, seed=0), in_tmp / "run",
                      tracker=RecordingTracker(), callbacks=[saver, ScriptedMetric(scores), saver.retention],
                      progress=False)
    trainer.fit()
    assert [step for step, _ in ckpt.list_checkpoints(in_tmp / "run" / "checkpoints")] == [4, 8]


def test_resume_skips_a_zero_byte_newest_checkpoint(tmp_path, capfd):
    folder = tmp_path / "checkpoints"
    ckpt.save_atomic({"step": 2}, ckpt.step_path(folder, 2))
    ckpt.step_path(folder, 4).write_bytes(b"")  # the 0-byte newest checkpoint
    path, state = ckpt.load_latest(folder)
    assert path == ckpt.step_path(folder, 2) and state == {"step": 2}
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "step-00000004.pt: empty file (0 bytes)" in err
    with pytest.raises(CheckpointError, match=r"unreadable checkpoint \S+step-00000004\.pt: empty file"):
        ckpt.load(ckpt.step_path(folder, 4))


# ---- 2. resume never rewrites the record -----------------------------------------------------------


def test_a_refused_resume_touches_nothing_and_more_steps_are_recorded(in_tmp):
    from mlflow.tracking import MlflowClient

    gin = str(write_tiny_gin(in_tmp, "tiny", steps=4, log_every=2, checkpoint_every=2))
    run = in_tmp / "run"
    first = train([gin], run_dir=run, runs_dir=in_tmp / "runs", progress=False)
    client = MlflowClient(tracking_uri=first.tracking_uri)
    record = {name: (run / name).read_bytes() for name in ("config.gin", "operative_config.gin")}

    refusals = {
        ("TrainConfig.lr = 0.01",): r"TrainConfig\.lr 0\.001 -> 0\.01",  # was silently ignored, records rewritten
        ("TrainConfig.batch_size = 8",): r"TrainConfig\.batch_size 16 -> 8",
        ("TrainConfig.seed = 3",): r"TrainConfig\.seed 0 -> 3",
        ("build_experiment.objective = @SelfFlowObjective",): r"build_experiment\.objective",
        ("TrainConfig.steps = 3",): r"checkpoint is at step 4, which is past TrainConfig\.steps = 3",
        (): r"at step 4, which already reached TrainConfig\.steps = 4: nothing to train",
    }
    for params, message in refusals.items():
        with pytest.raises(UserError, match=message):
            train([gin], list(params), run_dir=run, runs_dir=in_tmp / "runs", resume=True, progress=False)
        assert {name: (run / name).read_bytes() for name in record} == record
        assert client.get_run(first.mlflow_run_id).info.status == "FINISHED"  # not flipped to FAILED
    assert not (run / "resumes.jsonl").exists()
    with pytest.raises(UserError, match=r"this run logs to sqlite:///\S+/runs/mlflow\.db .* "
                                        r"not to sqlite:///\S+/other"):
        train([gin], ["TrainConfig.steps = 6"], run_dir=run, runs_dir=in_tmp / "other", resume=True, progress=False)

    longer = train([gin], ["TrainConfig.steps = 6"], run_dir=run, runs_dir=in_tmp / "runs", resume=True,
                   progress=False)
    assert longer.mlflow_run_id == first.mlflow_run_id and ckpt.load(longer.checkpoint)["step"] == 6
    assert "TrainConfig.steps = 6" in (run / "config.gin").read_text()
    assert "TrainConfig.steps = 6" in (run / "operative_config.gin").read_text()
    lines = [json.loads(line) for line in (run / "resumes.jsonl").read_text().splitlines()]
    assert [(line["resumed_at_step"], line["changes"]) for line in lines] == [
        (4, {"TrainConfig.steps": {"from": "4", "to": "6"}})]
    finished = client.get_run(first.mlflow_run_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["resume.step_4.changes"] == "TrainConfig.steps: 4 -> 6"
    assert finished.data.params["TrainConfig.steps"] == "4"  # MLflow params are immutable: the tag says what changed
    assert ckpt.load(longer.checkpoint)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.001)


# ---- 3 and 5. one run per folder; SIGTERM and SIGINT -------------------------------------------------


def _start(gin: Path, run: Path, cwd: Path, env: dict, *extra: str) -> subprocess.Popen:
    args = ["train", "--gin_file", str(gin), "--run-dir", str(run), "--quiet", *extra]
    return subprocess.Popen(cli_command(*args), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_past(process: subprocess.Popen, run: Path, step: int) -> None:
    def reached() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"training ended early (exit {process.returncode}): {process.stderr.read()[-2000:]}")
        return journal_progress(run) >= step

    wait_for(reached, 240, what=f"step {step}")


# Every CLI run of a test below sleeps this long per step (tests/plugins/selfflow_testing/faults.py):
# long enough for a second process to start while the first still trains.
SLOW = "\nimport selfflow_testing.faults\nbuild_experiment.callbacks = [@StepDelay()]\n"


def test_sigterm_then_sigint_checkpoint_mark_killed_and_resume_exactly(in_tmp, capfd):
    """The CLI's own code path in this process (`cli.main`): a SIGTERM at the end of step 3 and a
    SIGINT at the end of step 6 (the test plugin sends them) each stop the run at the next step's end."""
    from mlflow.tracking import MlflowClient

    from selfflow.platform.cli import main

    steps = 10
    signals = "\nimport selfflow_testing.faults\nbuild_experiment.callbacks = [@SignalAt()]\n" \
              "SignalAt.steps = {3: 'SIGTERM', 6: 'SIGINT'}\n"
    gin = write_tiny_gin(in_tmp, "tiny", steps=steps, log_every=1, checkpoint_every=5, extra=signals)
    reference = train([str(write_tiny_gin(in_tmp, "reference", steps=steps, log_every=1, checkpoint_every=5))],
                      run_dir=in_tmp / "reference", tracking=False, progress=False)
    uri = f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}"
    argv = ["train", "--gin_file", str(gin), "--run-dir", "run", "--quiet", "--host-tuning", "stock"]
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        capfd.readouterr()
        assert main(argv) == 143
        first = _one_line(capfd.readouterr().err)
        assert main(argv + ["--resume"]) == 130
        second = _one_line(capfd.readouterr().err)
        assert main(argv + ["--resume"]) == 0
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    folder = in_tmp / "run" / "checkpoints"
    run_id = ckpt.load(ckpt.step_path(folder, steps))["mlflow_run_id"]  # retention kept the newest two
    assert first == (f"selfflow: interrupted by SIGTERM at step 4: checkpoint written: {folder / 'step-00000004.pt'}; "
                     f"MLflow run {run_id} marked KILLED; continue with --resume")
    # checkpoint_every = 5: step 5's periodic checkpoint exists; step 7 is written for the signal.
    assert second.startswith(f"selfflow: interrupted by SIGINT at step 7: checkpoint written: "
                             f"{folder}/step-00000007.pt")
    assert MlflowClient(tracking_uri=uri).get_run(run_id).info.status == "FINISHED"
    _assert_same_state(ckpt.load(reference.checkpoint), ckpt.load(ckpt.step_path(folder, steps)))


@pytest.mark.slow
def test_one_run_per_folder_and_signals_stop_cleanly(in_tmp):
    """The same through real `selfflow` processes and the signals a scheduler and a terminal send."""
    from mlflow.tracking import MlflowClient

    steps = 24
    gin = write_tiny_gin(in_tmp, "tiny", steps=steps, log_every=1, checkpoint_every=2, extra=SLOW)
    uri = f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}"
    env = cli_env(uri, SELFFLOW_TEST_STEP_DELAY="1.5")
    run = in_tmp / "run"
    reference = train([str(gin)], run_dir=in_tmp / "reference", tracking=False, progress=False)

    first = _start(gin, run, in_tmp, env)
    _wait_past(first, run, 3)
    record = (run / "config.gin").read_bytes()
    # A tracked second run used to overwrite config.gin before being refused (the corpus case
    # run_dir_in_use covers --no-tracking, where it used to replace the first run's checkpoints).
    second = run_cli(["train", "--gin_file", str(gin), "--run-dir", str(run), "--quiet"], in_tmp, env)
    assert second.returncode == 2
    assert f"run folder {run} is in use by another run (pid {first.pid})" in _one_line(second.stderr)
    assert (run / "config.gin").read_bytes() == record
    first.send_signal(signal.SIGTERM)  # what schedulers send
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143
    line = _one_line(err)
    assert line.startswith("selfflow: interrupted by SIGTERM at step ")
    stopped_at = int(line.split("at step ")[1].split(":")[0])
    written = ckpt.step_path(run / "checkpoints", stopped_at)
    run_id = ckpt.load(written)["mlflow_run_id"]
    assert f"checkpoint written: {written}" in line and f"MLflow run {run_id} marked KILLED" in line
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"

    resumed = _start(gin, run, in_tmp, dict(env, SELFFLOW_TEST_STEP_DELAY="0.3"), "--resume")
    _wait_past(resumed, run, stopped_at + 3)
    resumed.send_signal(signal.SIGINT)
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 130 and _one_line(err).startswith("selfflow: interrupted by SIGINT at step ")
    assert client.get_run(run_id).info.status == "KILLED"

    final = run_cli(["train", "--gin_file", str(gin), "--run-dir", str(run), "--quiet", "--resume"], in_tmp,
                    dict(env, SELFFLOW_TEST_STEP_DELAY="0"))
    assert final.returncode == 0, final.stderr
    assert client.get_run(run_id).info.status == "FINISHED"
    _assert_same_state(ckpt.load(reference.checkpoint), ckpt.load(ckpt.step_path(run / "checkpoints", steps)))


@pytest.mark.slow
def test_sigint_on_a_workers_run_checkpoints_both_ranks_at_one_step(in_tmp, ray_local):
    """The launcher takes the signal and asks its 2 workers to stop: they agree on a step, write a
    checkpoint there (not a periodic one: checkpoint_every is far off), the run is marked KILLED,
    and --resume continues from that checkpoint to the end."""
    from mlflow.tracking import MlflowClient

    gin = write_tiny_gin(in_tmp, "tiny", steps=100000, log_every=1, checkpoint_every=5000)
    uri = f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}"
    run = in_tmp / "run"
    env = cli_env(uri, RAY_ADDRESS=ray_local["cluster"].address)
    process = _start(gin, run, in_tmp, env, "--workers", "2")
    _wait_past(process, run, 3)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=180)
    assert process.returncode == 130, err[-2000:]
    said = [text for text in err.splitlines() if text.startswith("selfflow:")]  # Ray's workers log too
    assert said[0] == ("selfflow: SIGINT: the workers write a checkpoint and stop at their next log step "
                       "(signal again to stop at once)")
    line = said[-1]
    assert line.startswith("selfflow: interrupted by SIGINT at step "), line
    stopped_at = int(line.split("at step ")[1].split(":")[0])
    written = ckpt.step_path(run / "checkpoints", stopped_at)
    state = ckpt.load(written)
    assert state["step"] == stopped_at and len(state["rank_generators"]) == 2
    run_id = state["mlflow_run_id"]
    assert f"checkpoint written: {written}; MLflow run {run_id} marked KILLED; continue with --resume" in line
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (run / "stop-request.json").exists()

    resumed = run_cli(["train", "--gin_file", str(gin), "--run-dir", str(run), "--quiet", "--resume", "--workers", "2",
                       "--gin_param", f"TrainConfig.steps={stopped_at + 3}"], in_tmp, env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert ckpt.load(ckpt.latest(run / "checkpoints"))["step"] == stopped_at + 3
    assert client.get_run(run_id).info.status == "FINISHED"


# ---- 9. the run folder fails to be written: one line ----------------------------------------------


def _full_disk() -> None:
    """Files may grow to 64 KiB: the config fits, a checkpoint does not (EFBIG, as ENOSPC would)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_a_full_run_folder_is_one_line(in_tmp):
    gin = write_tiny_gin(in_tmp, "tiny", steps=4, log_every=2, checkpoint_every=2)
    out = subprocess.run(cli_command("train", "--gin_file", str(gin), "--run-dir", "run", "--quiet", "--no-tracking"),
                         cwd=in_tmp, env=cli_env(), capture_output=True, text=True, timeout=300,
                         preexec_fn=_full_disk)
    line = _one_line(out.stderr)
    assert out.returncode == 2
    # Which write hits the limit first depends on the background checkpoint writer's timing: the
    # checkpoint itself (named), or a file written meanwhile (the folder is named).
    assert (f"run folder {in_tmp / 'run'}: cannot write {in_tmp / 'run' / 'checkpoints' / 'step-00000002.pt'}" in line
            or f"run folder {in_tmp / 'run'}: cannot write {in_tmp / 'run'}: " in line), line
    assert "File too large (free space or pick another --run-dir)" in line


def test_a_read_only_run_folder_is_one_line(in_tmp):
    folder = in_tmp / "read_only"
    folder.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make the folder immutable instead
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not supported here (root ignores read-only permission bits)")
        undo = ["chattr", "-i", str(folder)]
    else:
        folder.chmod(0o555)
        undo = ["chmod", "755", str(folder)]
    try:
        gin = write_tiny_gin(in_tmp, "tiny", steps=4)
        out = run_cli(["train", "--gin_file", str(gin), "--run-dir", str(folder), "--quiet", "--no-tracking"], in_tmp)
    finally:
        subprocess.run(undo, check=True)
    line = _one_line(out.stderr)
    assert out.returncode == 2
    assert f"selfflow: error: run folder {folder}: cannot write {folder / '.selfflow.lock'}: " in line
    assert "(pick a writable --run-dir)" in line
