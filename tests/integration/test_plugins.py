"""Components from outside the repository: a researcher's package, imported by a gin file, trains
and logs its own loss terms; errors in its code keep their type and traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "docs" / "examples"
SMALL = ["TrainConfig.steps = 4", "TrainConfig.batch_size = 8", "TrainConfig.log_every = 2",
         "build_experiment.evaluation = None", "SamplingConfig.steps = 2", "SamplingConfig.per_class = 1"]


def selfflow(*args: str, cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELFFLOW_"))}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(extra_path), env.get("PYTHONPATH", "")) if p)
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "selfflow.platform.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def bindings(params: list[str]) -> list[str]:
    return [arg for param in params for arg in ("--gin_param", param)]


@pytest.mark.timeout(900)
def test_an_external_package_trains_from_its_gin_file_and_logs_its_terms(in_tmp):
    from mlflow.tracking import MlflowClient

    done = selfflow("train", "--gin_file", str(EXAMPLES / "my_lab.gin"), "--run-dir", "runs/lab", "--quiet",
                    *bindings(SMALL), cwd=in_tmp, extra_path=EXAMPLES)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{in_tmp / 'runs' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("selfflow").experiment_id])
    assert run.data.tags["objective"] == "PseudoHuberFlowObjective" and run.data.tags["backbone"] == "TokenMLP"
    assert {"loss/flow", "loss/mse", "loss/total"} <= set(run.data.metrics)
    assert run.data.params["TokenMLP.hidden_dim"] == "96"
    assert "import my_lab.objectives" in (in_tmp / "runs" / "lab" / "config.gin").read_text()


def test_a_gin_file_cannot_import_a_missing_module(in_tmp):
    done = selfflow("train", "--gin_file", str(EXAMPLES / "my_lab.gin"), *bindings(SMALL), cwd=in_tmp)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line
    assert "gin 'import my_lab.backbones': no such module" in done.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_an_error_in_user_code_keeps_its_type_and_traceback(in_tmp, debug):
    params = [*SMALL, "import selfflow_testing.faulty", "build_experiment.backbone = @BuggyDiT",
              "BuggyDiT.hidden_dim = 32", "BuggyDiT.depth = 2", "BuggyDiT.num_heads = 2"]
    done = selfflow("train", "--gin_file", "digits/fm.gin", "--run-dir", "runs/buggy", "--no-tracking", "--quiet",
                    *bindings(params), *(["--debug"] if debug else []), cwd=in_tmp)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    if debug:
        assert "Traceback (most recent call last)" in done.stderr and "no_such_helper" in done.stderr
        assert lines[-1].startswith("AttributeError")
    else:
        assert len(lines) == 1 and lines[0].startswith("selfflow: error: AttributeError: "), done.stderr
        log = in_tmp / "runs" / "buggy" / "error.log"
        assert str(log) in lines[0] and "no_such_helper" in log.read_text()
