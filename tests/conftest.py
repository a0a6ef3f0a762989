"""Shared fixtures: a digits shard set built once per session, small thread counts."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Test-only plugins (tests/plugins/selfflow_testing): importable here, in Ray workers and in the CLI
# subprocesses tests start, the way a researcher's own package would be.
PLUGINS = REPO_ROOT / "tests" / "plugins"
sys.path.insert(0, str(PLUGINS))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(PLUGINS), os.environ.get("PYTHONPATH", "")) if p)

# The machine has 2 cores: one intra-op thread keeps tests stable and fast.
torch.set_num_threads(1)
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    from selfflow.platform.data.shards import build_digits_shards

    root = tmp_path_factory.mktemp("data") / "digits"
    build_digits_shards(root, seed=0)
    return root


@pytest.fixture(scope="session")
def moving_digits_root(tmp_path_factory) -> Path:
    from selfflow.platform.data.shards import build_moving_digits_shards

    root = tmp_path_factory.mktemp("data") / "moving_digits"
    build_moving_digits_shards(root, seed=0)
    return root


AUDIO_TEST_SPEAKERS = 3  # 2 train speakers + 1 test speaker: 60 + 30 clips, built in about a second


@pytest.fixture(scope="session")
def spoken_digits_root(tmp_path_factory) -> Path:
    """Spoken-digits shards (espeak-ng, which `make install` provides) of a few speakers."""
    from selfflow.components.datasets.spoken_digits import speaker_split
    from selfflow.platform.data.shards import build_spoken_digits_shards

    groups = speaker_split(0)
    root = tmp_path_factory.mktemp("data") / "spoken_digits"
    build_spoken_digits_shards(root, seed=0, speakers=groups["train"][:2] + groups["test"][:1],
                               train_shards=2, test_shards=1)
    return root


@pytest.fixture()
def in_tmp(tmp_path, monkeypatch, digits_root):
    """Run in a temp folder that has data/digits (a link to the session shards)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for every test that needs it (starting Ray costs ~10 s here).

    Records whether Ray-related files already existed in $HOME, so tests can check that
    the platform's Ray settings leave none behind."""
    from selfflow.platform.scale import ray_cluster

    home = Path.home()
    before = {name: (home / name).exists() for name in (".ray", "ray_results")}
    info = ray_cluster.connect()
    yield {"cluster": info, "home_before": before}
    ray_cluster.shutdown()


@pytest.fixture()
def bench_study():
    """load(name) -> bench/studies/<name>.py as a module (the studies are scripts, not a package)."""
    def load(name: str):
        path = REPO_ROOT / "bench" / "studies" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"{name}_study", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
