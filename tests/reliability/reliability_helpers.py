"""Shared helpers of the reliability tests: the real `selfflow` CLI in subprocesses,
tiny configs, the tracking journal and MLflow metric histories."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SELFFLOW = Path(sys.executable).with_name("selfflow")

# Small enough for a few seconds of CPU, big enough to have every part of a real run.
TINY = """\
include 'digits/fm.gin'
build_experiment.name = '{name}'
build_experiment.evaluation = None
DiT.hidden_dim = 32
DiT.depth = 2
DiT.num_heads = 2
TrainConfig.steps = {steps}
TrainConfig.batch_size = 16
TrainConfig.warmup_steps = 5
TrainConfig.log_every = {log_every}
TrainConfig.checkpoint_every = {checkpoint_every}
TrainConfig.eval_every = 0
TrainConfig.num_threads = 1
SamplingConfig.steps = 2
SamplingConfig.per_class = 1
"""


def write_tiny_gin(folder: Path, name: str = "tiny", steps: int = 40, log_every: int = 5,
                   checkpoint_every: int = 10, extra: str = "") -> Path:
    path = folder / f"{name}.gin"
    path.write_text(TINY.format(name=name, steps=steps, log_every=log_every, checkpoint_every=checkpoint_every) + extra)
    return path


def cli_command(*args: str) -> list[str]:
    if SELFFLOW.exists():
        return [str(SELFFLOW), *args]
    return [sys.executable, "-m", "selfflow.platform.cli", *args]


def cli_env(tracking_uri: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELFFLOW_"))}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(cli_command(*args), cwd=cwd, env=env or cli_env(), capture_output=True,
                          text=True, timeout=timeout)


def journal_lines(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "tracking-journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line of a killed writer
    return out


def journal_metric_steps(run_dir: Path) -> list[int]:
    return [int(r["step"]) for r in journal_lines(run_dir) if r.get("op") == "metrics"]


def journal_progress(run_dir: Path) -> int:
    steps = journal_metric_steps(run_dir)
    return max(steps) if steps else 0


def metric_histories(tracking_uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    keys = client.get_run(run_id).data.metrics.keys()
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def count_values(histories: dict[str, list]) -> int:
    return sum(len(points) for points in histories.values())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition, timeout: float, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
