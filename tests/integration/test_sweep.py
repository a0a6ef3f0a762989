"""`selfflow sweep`: spec parsing, and a 2x2 sweep on Ray Tune logged to a real MLflow server."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from selfflow_testing.servers import free_port, wait_until_healthy

from selfflow.platform.config.bootstrap import EXPERIMENTS_DIR
from selfflow.platform.errors import ConfigError, UserError
from selfflow.platform.scale.sweep import (
    SEED_KEY,
    SweepResult,
    SweepSpec,
    TrialOutcome,
    concurrency,
    group_label,
    load_spec,
    run_sweep,
    trial_bindings,
    tune_space,
    validate,
    write_summary,
)

LRS = [0.001, 0.002]
SEEDS = [0, 1]
TINY_SWEEP = f"""
Sweep.name = 'tiny'
Sweep.experiment = 'tiny_sweep'
Sweep.base_files = ['digits/fm.gin']
Sweep.space = {{'TrainConfig.lr': ('grid', {LRS})}}
Sweep.seeds = {SEEDS}
Sweep.bindings = [
    'TrainConfig.steps = 4', 'TrainConfig.batch_size = 8', 'TrainConfig.log_every = 1',
    'TrainConfig.checkpoint_every = 1', 'TrainConfig.eval_every = 0', 'build_experiment.evaluation = None',
    'SamplingConfig.steps = 2', 'SamplingConfig.per_class = 1',
    'import selfflow_testing.faults', 'build_experiment.callbacks = [@InjectedCrash()]', 'InjectedCrash.at_step = 3',
]
Sweep.metric = 'loss/flow'
Sweep.max_failures = 2
"""


def spec(**overrides) -> SweepSpec:
    values = dict(name="s", base_files=["digits/fm.gin"], bindings=["TrainConfig.steps = 3"],
                  space={"TrainConfig.lr": ("grid", [0.001, 0.002])}, seeds=[0, 1])
    values.update(overrides)
    return SweepSpec(**values)


# ---- the spec (no Ray) --------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((EXPERIMENTS_DIR / "sweeps").glob("*.gin")), ids=lambda p: p.name)
def test_shipped_sweeps_parse_and_every_trial_config_builds(path):
    from selfflow.platform.config import bootstrap as config

    loaded, text = load_spec(path)
    assert text == path.read_text()
    base = config.parse(loaded.base_files, []) if loaded.base_files else ""
    assert validate(loaded, base).steps > 0


def test_trials_start_under_the_host_preset_they_name():
    """The preset the trial configs share sets the trial processes' environment (before torch loads
    there); trials that disagree get the stock environment."""
    from selfflow.platform.config import bootstrap as config

    base = config.parse(["digits/fm.gin"], [])
    assert validate(spec(bindings=["TrainConfig.steps = 3", "TrainConfig.host = 'cpu_shared'"]), base).host == "cpu_shared"
    assert validate(spec(bindings=["TrainConfig.steps = 3", "TrainConfig.host = 'stock'"]), base).host == "stock"
    mixed = spec(space={"TrainConfig.host": ("grid", ["stock", "cpu_shared"])}, seeds=[0])
    assert validate(mixed, base).host == "stock"


def test_trial_bindings_order_and_literals():
    s = spec(space={"include": ("grid", ["objectives/selfflow.gin"]), "DiT.depth": ("choice", [4]),
                    "SamplingConfig.sampler": ("choice", ["@EulerSampler()"])})
    sampled = {"include": "objectives/selfflow.gin", "DiT.depth": 4, "SamplingConfig.sampler": "@EulerSampler()",
               SEED_KEY: 2}
    assert trial_bindings(s, sampled) == [
        "include 'objectives/selfflow.gin'", "TrainConfig.steps = 3", "DiT.depth = 4",
        "SamplingConfig.sampler = @EulerSampler()", "TrainConfig.seed = 2"]
    assert group_label(sampled) == "include=objectives/selfflow DiT.depth=4 SamplingConfig.sampler=@EulerSampler()"


def test_tune_space_maps_specs_and_crosses_seeds():
    from ray import tune

    space = tune_space(spec(space={"a.b": ("grid", [1, 2]), "c.d": ("choice", ["x"]), "e.f": ("uniform", 0.0, 1.0),
                                   "g.h": ("loguniform", 1e-4, 1e-2)}))
    assert space["a.b"] == tune.grid_search([1, 2]) and space[SEED_KEY] == tune.grid_search([0, 1])
    assert space["g.h"].lower == 1e-4 and space["e.f"].upper == 1.0


@pytest.mark.parametrize("bad, message", [
    (dict(space={"TrainConfig.lr": ("normal", 0, 1)}), "must start with one of"),
    (dict(space={"TrainConfig.lr": ("loguniform", 0.0, 1.0)}), "0 < low < high"),
    (dict(space={"include": ("uniform", 0.0, 1.0)}), "chooses gin files"),
    (dict(search="optuna"), "'TrainConfig.lr' is a grid"),
    (dict(search="optuna", space={"TrainConfig.lr": ("loguniform", 1e-4, 1e-2)}), "one seed"),
    (dict(space={SEED_KEY: ("grid", [1])}), "Sweep.seeds"),
    (dict(scheduler="hyperband"), "Sweep.scheduler"),
    (dict(base_files=[], space={}), "no experiment"),
])
def test_bad_specs_raise_one_line(bad, message):
    with pytest.raises(ConfigError, match=message):
        spec(**bad)


def test_concurrency_never_asks_for_more_cpus_than_exist():
    assert concurrency(spec(), cpus=2, gpus=0) == 2
    assert concurrency(spec(max_concurrent=1), cpus=2, gpus=0) == 1
    assert concurrency(spec(workers_per_trial=2), cpus=2, gpus=0) == 1  # the trial itself holds no CPU
    with pytest.raises(UserError, match="needs 4 CPUs; the Ray cluster has 2"):
        concurrency(spec(workers_per_trial=2, cpus_per_worker=2), cpus=2, gpus=0)


def test_summary_names_trials_that_failed_for_good(tmp_path):
    trials = [TrialOutcome("t1", "lr=0.001", 0, "finished", 4, 0.5, "r1"),
              TrialOutcome("t2", "lr=0.002", 1, "failed", 2, None, "r2", error="RuntimeError: boom")]
    path = write_summary(SweepResult(tmp_path, None, None, trials, 1.0), spec())
    text = path.read_text()
    assert "1 failed" in text and "FAILED for good: trial t2 (lr=0.002, seed 1): RuntimeError: boom" in text


# ---- a real sweep on Ray Tune and a real MLflow server --------------------------------------------



@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a served artifact store."""
    root = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    wait_until_healthy(uri, process, 240, root / "server.log", "mlflow server", poll_s=1)
    yield uri
    os.killpg(process.pid, signal.SIGTERM)  # the server and its worker, by the server's pid (its group)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


@pytest.mark.timeout(1200)
def test_two_by_two_sweep_on_mlflow_server(ray_local, mlflow_server, in_tmp):
    from mlflow.tracking import MlflowClient

    crash_marker = in_tmp / "crash.done"  # one marker for the sweep: exactly one trial crashes
    sweep_file = in_tmp / "tiny.gin"
    sweep_file.write_text(TINY_SWEEP.replace(
        "'InjectedCrash.at_step = 3',", f"'InjectedCrash.at_step = 3', 'InjectedCrash.marker = \"{crash_marker}\"',"))
    result = run_sweep(sweep_file, runs_dir=in_tmp / "runs", sweep_dir=in_tmp / "sweep", tracking_uri=mlflow_server)

    assert not result.failed and [t.status for t in result.trials] == ["finished"] * 4
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("tiny_sweep")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert [p.info.run_id for p in parents] == [result.parent_run_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(children) == 4 and len(runs) == 5
    sampled = sorted((float(c.data.params["TrainConfig.lr"]), int(c.data.params["TrainConfig.seed"])) for c in children)
    assert sampled == sorted((lr, seed) for lr in LRS for seed in SEEDS)
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["TrainConfig.lr"] in {str(lr) for lr in LRS}
        assert {a.path for a in client.list_artifacts(child.info.run_id)} >= {"operative_config.gin"}
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "loss/flow"))
        assert steps == [1, 2, 3, 4]  # a retried trial continues its run: no step twice, none missing
    parent_artifacts = {a.path for a in client.list_artifacts(result.parent_run_id, "sweep")}
    assert {"sweep/sweep.gin", "sweep/spec.json", "sweep/summary.txt"} <= parent_artifacts
    assert {"compare/comparison.txt", "compare/comparison.json"} <= {
        a.path for a in client.list_artifacts(result.parent_run_id, "compare")}
    assert "sweep/trials.json" in parent_artifacts
    # The parent's description links every child; children are grouped by their sampled bindings.
    note = client.get_run(result.parent_run_id).data.tags["mlflow.note.content"]
    for child in children:
        assert f"#/experiments/{experiment.experiment_id}/runs/{child.info.run_id}" in note
        assert child.data.tags["sweep.group"] in {f"TrainConfig.lr={lr}" for lr in LRS}
        assert child.data.tags["objective"] == "FlowMatchingObjective"
        assert "mlflow.source.git.commit" in child.data.tags

    crashed_dir = Path(crash_marker.read_text().strip())
    crashed = [c for c in children if c.data.tags.get("run_dir") == str(crashed_dir)]
    assert len(crashed) == 1, "the crashed trial must have exactly one child run"
    assert crashed[0].data.tags.get("resumed_at_step") == "3"  # restarted from its step-3 checkpoint
    assert (crashed_dir / "checkpoints").is_dir()
    assert result.comparison is not None and len(result.comparison.groups) == 2
