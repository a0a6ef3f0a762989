"""Load: a Ray Tune sweep of 12 short trials, 2 at once, all writing to one embedded
SQLite store (runs/mlflow.db) — every metric of every trial arrives, nothing is lost to
"database is locked". (docs/reliability.md says when to move to an MLflow server.)"""
from __future__ import annotations

from reliability_helpers import cli_env, journal_lines, run_cli

TRIALS, STEPS, LOG_EVERY = 12, 30, 3
KEYS = {"loss/flow", "loss/total", "train/grad_norm", "train/lr", "train/samples_per_s"}

SWEEP = f"""
Sweep.name = 'sqlite_load'
Sweep.experiment = 'sqlite_load'
Sweep.base_files = ['digits/fm.gin']
Sweep.space = {{'TrainConfig.lr': ('grid', [3e-4, 5e-4, 1e-3, 2e-3, 3e-3, 5e-3])}}
Sweep.seeds = [0, 1]
Sweep.bindings = [
    'build_experiment.evaluation = None',
    'DiT.hidden_dim = 32',
    'DiT.depth = 2',
    'DiT.num_heads = 2',
    'TrainConfig.steps = {STEPS}',
    'TrainConfig.batch_size = 16',
    'TrainConfig.warmup_steps = 2',
    'TrainConfig.log_every = {LOG_EVERY}',
    'TrainConfig.eval_every = 0',
    'TrainConfig.checkpoint_every = 15',
    'SamplingConfig.steps = 2',
    'SamplingConfig.per_class = 1',
]
Sweep.max_concurrent = 2
Sweep.workers_per_trial = 1
Sweep.cpus_per_worker = 1.0
Sweep.max_failures = 0
Sweep.metric = 'loss/flow'
"""


def test_twelve_trials_two_at_once_on_sqlite_lose_no_metric(tmp_path, digits_root):
    from mlflow.tracking import MlflowClient

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_root)
    (tmp_path / "load.gin").write_text(SWEEP)
    env = cli_env()
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray (127.0.0.1, no dashboard), not someone's cluster
    out = run_cli(["sweep", "load.gin", "--runs", "runs", "--sweep-dir", "runs/sweep", "--no-compare"],
                  tmp_path, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "database is locked" not in out.stdout + out.stderr

    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("sqlite_load")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("sweep.role") != "parent"]
    assert len(runs) == TRIALS
    expected_steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    total = 0
    for run in runs:
        assert run.info.status == "FINISHED", run.info.run_id
        assert KEYS <= set(run.data.metrics), f"{run.info.run_id} lacks {KEYS - set(run.data.metrics)}"
        for key in KEYS:
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == expected_steps, f"{run.info.run_id} {key}: {steps}"
            total += len(steps)
    # Every journal (each trial's, and the parent run's) says all of its records reached the store.
    journals = sorted((tmp_path / "runs" / "sweep").rglob("tracking-journal.jsonl"))
    assert len(journals) == TRIALS + 1
    for journal in journals:
        lines = journal_lines(journal.parent)
        assert max(r["delivered"] for r in lines if "delivered" in r) == max(r["seq"] for r in lines if "seq" in r)
    print(f"\nload: {TRIALS} trials x {len(KEYS)} metrics x {len(expected_steps)} steps = {total} values, all present")
    assert total == TRIALS * len(KEYS) * len(expected_steps)
