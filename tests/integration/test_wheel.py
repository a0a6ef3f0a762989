"""Packaging: a wheel installed outside this checkout finds its presets and trains a shipped experiment."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.timeout(1200)
def test_a_wheel_installed_elsewhere_trains_a_shipped_preset_by_name(tmp_path):
    wheels = tmp_path / "wheels"
    # No build isolation: setuptools and wheel come from this environment (nothing is downloaded).
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
         str(REPO_ROOT)], cwd=tmp_path)
    (wheel,) = wheels.glob("selfflow-*.whl")

    # A scratch venv over the existing environment's packages (a .pth to its site-packages), with the
    # wheel installed --no-deps: selfflow itself comes from the wheel, not from this checkout.
    scratch = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(scratch)], cwd=tmp_path)
    python = scratch / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path).strip()
    Path(site, "00-base-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], cwd=tmp_path)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SELFFLOW_", "PYTHONPATH"))}
    env["OMP_NUM_THREADS"] = "1"
    where = run([str(python), "-c", "import selfflow.platform.cli as c, platform; print(c.__file__); "
                 "print(platform.system())"], cwd=work, env=env).split()
    assert where[0].startswith(site) and where[1] == "Linux"  # the wheel's copy; the stdlib platform intact
    selfflow = scratch / "bin" / "selfflow"
    run([str(selfflow), "data", "digits"], cwd=work, env=env)
    out = run([str(selfflow), "train", "--gin_file", "digits/fm.gin", "--no-tracking", "--quiet",
               "--gin_param", "TrainConfig.steps = 2", "--gin_param", "TrainConfig.batch_size = 8",
               "--gin_param", "build_experiment.evaluation = None", "--gin_param", "SamplingConfig.steps = 2",
               "--gin_param", "SamplingConfig.per_class = 1"], cwd=work, env=env)
    assert "checkpoint:" in out and (work / "runs" / "digits_fm" / "checkpoints" / "step-00000002.pt").is_file()
