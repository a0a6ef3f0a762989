"""Host tuning is opt-in: stock behaviour unless a config or the CLI asks for cpu_shared, applied
before torch loads (checked in fresh interpreters, where it matters)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (nothing imported yet); it prints one JSON object."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SELFFLOW_HOST")}
    clean.update(env)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, timeout=300,
                          cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_and_building_a_trainer_change_nothing_process_wide():
    state = python(
        "import json, os\n"
        "import selfflow.platform.cli\n"
        "from selfflow.platform.config import bootstrap\n"
        "from selfflow.platform.config.experiment import build_from_gin\n"
        "from selfflow.platform.train.trainer import Trainer\n"
        "import torch\n"
        "before = torch.random.get_rng_state()\n"
        "bootstrap.parse(['digits/fm.gin'], ['build_experiment.evaluation = None'])\n"
        "experiment = build_from_gin()\n"
        "Trainer(experiment, iter(()), '/tmp/unused', progress=False)\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'),"
        " 'rng_untouched': bool(torch.equal(before, torch.random.get_rng_state()))}))\n"
    )
    assert state == {"omp": None, "rng_untouched": True}


def test_cpu_shared_sets_the_wait_policy_before_torch_and_keeps_the_users_choice():
    code = ("import json, os, sys\n"
            "from selfflow.platform import host\n"
            "ok = host.apply_before_torch('cpu_shared')\n"
            "import torch\n"
            "print(json.dumps({'ok': ok, 'omp': os.environ.get('OMP_WAIT_POLICY'),"
            " 'warnings': host.apply_in_process('cpu_shared')}))\n")
    assert python(code) == {"ok": True, "omp": "PASSIVE", "warnings": []}
    chosen = python(code, OMP_WAIT_POLICY="ACTIVE")
    assert chosen["omp"] == "ACTIVE" and "keeping your OMP_WAIT_POLICY=ACTIVE" in chosen["warnings"][0]


def test_cpu_shared_after_torch_loaded_says_openmp_missed_it():
    state = python("import json, torch\n"
                   "from selfflow.platform import host\n"
                   "ok = host.apply_before_torch('cpu_shared')\n"
                   "print(json.dumps({'ok': ok, 'warnings': host.apply_in_process('cpu_shared')}))\n")
    assert state["ok"] is False and "OpenMP loaded without OMP_WAIT_POLICY=PASSIVE" in state["warnings"][0]


def test_the_cli_applies_the_preset_a_gin_file_asks_for(tmp_path):
    (tmp_path / "shared.gin").write_text("include 'digits/fm.gin'\nTrainConfig.host = 'cpu_shared'\n")
    (tmp_path / "stock.gin").write_text("include 'imagenet/fm.gin'\n")
    code = ("import json, os, sys\n"
            "from selfflow.platform import cli\n"
            "args = cli.build_parser().parse_args(sys.argv[1:])\n"
            "cli.apply_host_preset(args)\n"
            "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'), 'torch': 'torch' in sys.modules,"
            " 'params': getattr(args, 'gin_param', [])}))\n")

    def run(*argv: str) -> dict:
        clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "SELFFLOW_HOST")}
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=clean,
                              cwd=tmp_path, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert run("train", "--gin_file", "shared.gin") == {"omp": "PASSIVE", "torch": False, "params": []}
    assert run("train", "--gin_file", "stock.gin")["omp"] is None
    forced = run("train", "--gin_file", "stock.gin", "--host-tuning", "cpu_shared")
    assert forced["omp"] == "PASSIVE" and forced["params"] == ["TrainConfig.host = 'cpu_shared'"]
    assert run("train", "--gin_file", "shared.gin", "--host-tuning", "stock")["omp"] is None


def test_environment_for_workers_carries_the_preset():
    from selfflow.platform import host

    assert host.environment("cpu_shared")["SELFFLOW_HOST"] == "cpu_shared"
    assert host.environment("stock").get("OMP_WAIT_POLICY") == os.environ.get("OMP_WAIT_POLICY")
    with pytest.raises(ValueError, match="host preset must be one of"):
        host.environment("turbo")


def test_keep_freed_memory_calls_mallopt_once(monkeypatch):
    from selfflow.platform import host

    calls = []

    class FakeLibc:
        def mallopt(self, parameter: int, value: int) -> int:
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(host.ctypes, "CDLL", lambda name: FakeLibc())
    monkeypatch.setattr(host, "is_glibc", lambda: True)
    monkeypatch.setattr(host, "_allocator_tuned", False)
    assert host.keep_freed_memory() and host.keep_freed_memory()
    # glibc's M_MMAP_MAX is -4 and M_TRIM_THRESHOLD is -1 (malloc.h): no mmap, a 1 GiB trim threshold
    assert calls == [(-4, 0), (-1, 1 << 30)]
    monkeypatch.setattr(host, "_allocator_tuned", False)
    monkeypatch.setattr(host, "is_glibc", lambda: False)
    assert not host.keep_freed_memory()
