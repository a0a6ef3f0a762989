"""Tracking outages against a real `mlflow server` on 127.0.0.1 (a free port).

One training run lives through: the server stopped mid-run (training goes on, records
queue in memory and in the run's journal), the server restarted (the running trainer
delivers the queue), the server hung (SIGSTOP) until the run ends (the journal keeps
what could not be delivered), then `selfflow sync --run-dir` delivers the rest.
Every metric value the trainer produced is counted in the journal (sent) and in the
server (delivered): they must be equal, with one value per (metric, step).
"""
from __future__ import annotations

import signal
import subprocess
import time

from mlflow_server import MlflowServer
from reliability_helpers import (
    cli_command,
    cli_env,
    count_values,
    journal_lines,
    journal_progress,
    metric_histories,
    run_cli,
    wait_for,
    write_tiny_gin,
)

STEPS, LOG_EVERY = 400, 5


def _sent(run_dir) -> int:
    return sum(len(r["metrics"]) for r in journal_lines(run_dir) if r.get("op") == "metrics")


def _watermark(run_dir) -> int:
    return max([r["delivered"] for r in journal_lines(run_dir) if "delivered" in r], default=0)


def _last_seq(run_dir) -> int:
    return max([r["seq"] for r in journal_lines(run_dir) if "seq" in r], default=0)


def _run_id(run_dir) -> str:
    return next(r["run_id"] for r in journal_lines(run_dir) if "run_id" in r)


def _stable_count(uri: str, run_id: str) -> int:
    """The server's metric count once it stops changing (a thawed server may still be
    applying requests that the client had already given up on)."""
    previous = -1
    while True:
        current = count_values(metric_histories(uri, run_id))
        if current == previous:
            return current
        previous = current
        time.sleep(1.0)


def test_outage_mid_run_loses_no_metric(tmp_path, digits_root):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "digits").symlink_to(digits_root)
    gin = write_tiny_gin(tmp_path, "outage", steps=STEPS, log_every=LOG_EVERY, checkpoint_every=200)
    run_dir = tmp_path / "run"
    server = MlflowServer(tmp_path / "server")
    server.start()
    trainer = None
    try:
        env = cli_env(server.uri, SELFFLOW_TRACKING_DRAIN_SECONDS="3", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
        trainer = subprocess.Popen(
            cli_command("train", "--gin_file", str(gin), "--run-dir", str(run_dir), "--quiet"),
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

        def running() -> bool:
            if trainer.poll() is not None:
                raise AssertionError(f"training ended early (exit {trainer.returncode}): {trainer.stderr.read()[-2000:]}")
            return True

        # 1. The server answers: records are delivered as they come.
        wait_for(lambda: running() and journal_progress(run_dir) >= 20 and _watermark(run_dir) > 0, 300,
                 what="first deliveries")
        trainer.send_signal(signal.SIGSTOP)
        server.stop()
        trainer.send_signal(signal.SIGCONT)

        # 2. The server is gone: training continues, records queue up.
        outage_from = journal_progress(run_dir)
        wait_for(lambda: running() and journal_progress(run_dir) >= outage_from + 50, 300, what="training in the outage")
        trainer.send_signal(signal.SIGSTOP)
        queued_up_to = _last_seq(run_dir)
        assert _watermark(run_dir) < queued_up_to, "records were not queued during the outage"
        server.start()
        trainer.send_signal(signal.SIGCONT)

        # 3. The server is back: the running trainer delivers the queue.
        wait_for(lambda: running() and _watermark(run_dir) >= queued_up_to, 300, interval=0.01,
                 what="delivery of the queued records")
        trainer.send_signal(signal.SIGSTOP)
        assert trainer.poll() is None, "the run ended before the second outage"
        delivered_back = _watermark(run_dir)

        # 4. The server hangs until the run ends: the journal keeps what is left.
        server.freeze()
        trainer.send_signal(signal.SIGCONT)
        _, err = trainer.communicate(timeout=600)
        assert trainer.returncode == 0, err[-3000:]
        assert "unreachable" in err and "reachable again" in err and "selfflow sync --run-dir" in err, err
        server.thaw()
        wait_for(server.healthy, 120, what="the thawed server")

        run_id = _run_id(run_dir)
        sent = _sent(run_dir)
        delivered_in_run = _stable_count(server.uri, run_id)
        assert _last_seq(run_dir) > _watermark(run_dir), "nothing was left for sync"

        # 5. `selfflow sync` delivers the rest into the same run, nothing twice.
        # The store is named: sync never delivers where a journal alone says (docs/reliability.md).
        out = run_cli(["sync", "--run-dir", str(run_dir), "--tracking-uri", server.uri], tmp_path, env=cli_env(),
                      timeout=300)
        assert out.returncode == 0, out.stderr
        assert "records delivered" in out.stdout
        histories = metric_histories(server.uri, run_id)
        delivered = count_values(histories)
        expected_steps = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
        for key, points in histories.items():
            assert [step for step, _ in points] == expected_steps, f"{key}: duplicates or gaps"
        from mlflow.tracking import MlflowClient

        assert MlflowClient(tracking_uri=server.uri).get_run(run_id).info.status == "FINISHED"
        print(f"\noutage: {sent} metric values sent; {delivered_in_run} delivered by the run itself "
              f"(queue flushed when the server came back at record {delivered_back}); {delivered} after "
              f"`selfflow sync`; lost {sent - delivered}")
        assert sent == delivered == len(histories) * len(expected_steps)
        assert delivered_in_run < sent
    finally:
        if trainer is not None and trainer.poll() is None:
            trainer.send_signal(signal.SIGCONT)
            trainer.kill()
            trainer.wait(timeout=30)
        server.stop()
