"""The tracking journal and the tracker's queue, in process against SQLite (fast):
torn lines, the single-writer lock, one value per (metric, step) across resumes,
queuing through a simulated outage, `sync_run_dir`, bounded HTTP retries, lock retries."""
from __future__ import annotations

import json
import os

import pytest

from selfflow.platform.errors import UserError
from selfflow.platform.tracking import mlflow_tracker as tracking
from selfflow.platform.tracking.journal import TrackingJournal, journal_path
from selfflow.platform.tracking.mlflow_tracker import MLflowTracker, sync_run_dir


def _history(tracker: MLflowTracker, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracker.client.get_metric_history(tracker.run_id, key))


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One store for the file: creating an MLflow SQLite database costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_journal_skips_a_torn_last_line_and_continues_numbering(tmp_path):
    journal = TrackingJournal(journal_path(tmp_path))
    journal.append("metrics", "r1", step=1, time=0, metrics={"a": 1.0})
    journal.append("metrics", "r1", step=2, time=0, metrics={"a": 2.0})
    journal.mark_delivered(1)
    journal.close()
    with open(journal_path(tmp_path), "a") as file:
        file.write('{"seq": 3, "op": "metr')  # a writer killed mid-line
    reopened = TrackingJournal(journal_path(tmp_path))
    assert [r.seq for r in reopened.pending_at_open()] == [2]
    assert reopened.append("tags", "r1", tags={}).seq == 3
    reopened.close()
    lines = journal_path(tmp_path).read_text().splitlines()
    assert json.loads(lines[-1])["seq"] == 3  # written on its own line after the torn one


def test_journal_corrupted_in_the_middle_is_a_clear_error(tmp_path):
    journal_path(tmp_path).write_text('{"seq": 1, "op": "tags", "run_id": "r", "tags": {}}\nnot json\n{"delivered": 1}\n')
    with pytest.raises(UserError, match=r"tracking-journal.jsonl line 2 is not JSON"):
        TrackingJournal(journal_path(tmp_path))


def test_journal_admits_one_process_at_a_time(tmp_path):
    first = TrackingJournal(journal_path(tmp_path))
    with pytest.raises(UserError, match="is in use by another process"):
        TrackingJournal(journal_path(tmp_path))
    first.close()
    TrackingJournal(journal_path(tmp_path)).close()  # released on close (and by the kernel on death)


def test_resumed_run_keeps_one_value_per_metric_and_step(tmp_path, uri):
    first = MLflowTracker(tracking_uri=uri, run_name="a", journal_dir=tmp_path / "run")
    for step in (1, 2, 3):
        first.log_metrics({"loss": float(step)}, step=step)
    first.journal.close()  # killed: no finish
    # The resumed process recomputes steps 2..4 (its checkpoint was at step 1).
    resumed = MLflowTracker(tracking_uri=uri, run_id=first.run_id, journal_dir=tmp_path / "run")
    for step in (2, 3, 4):
        resumed.log_metrics({"loss": float(step), "extra": 1.0}, step=step)
    resumed.finish()
    assert _history(resumed, "loss") == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
    assert _history(resumed, "extra") == [(2, 1.0), (3, 1.0), (4, 1.0)]
    assert resumed.delivery.stats.duplicates == 2
    assert resumed.client.get_run(resumed.run_id).info.status == "FINISHED"


def test_outage_queues_then_sync_delivers_everything_once(tmp_path, uri, monkeypatch, capfd):
    monkeypatch.setenv(tracking.DRAIN_ENV, "0")
    tracker = MLflowTracker(tracking_uri=uri, run_name="outage", journal_dir=tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, step=1)
    real_log_batch = tracker.client.log_batch
    state = {"down": True}

    def flaky_log_batch(*args, **kwargs):
        if state["down"]:
            raise ConnectionError("Connection refused")
        return real_log_batch(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", flaky_log_batch)
    for step in (2, 3, 4):
        tracker.log_metrics({"loss": float(step), "lr": 0.1}, step=step)  # training goes on
    assert tracker.pending == 3
    state["down"] = False
    tracker.delivery.next_attempt = 0  # the backoff has passed
    tracker.log_metrics({"loss": 5.0}, step=5)
    assert tracker.pending == 0 and _history(tracker, "loss")[-1] == (5, 5.0)
    state["down"] = True
    tracker.log_metrics({"loss": 6.0}, step=6)
    tracker.finish()  # the store is down at the end: the journal keeps it
    err = capfd.readouterr().err
    assert "unreachable (Connection refused)" in err and "reachable again" in err
    assert "2 tracking records for run" in err and f"selfflow sync --run-dir {tmp_path / 'run'}" in err
    assert [line for line in err.splitlines() if line.strip()] == err.strip().splitlines()

    result = sync_run_dir(tmp_path / "run")
    assert (result.pending_before, result.pending_after) == (2, 0)
    assert result.stats.metric_values == 1
    assert _history(tracker, "loss") == [(s, float(s)) for s in range(1, 7)]
    assert _history(tracker, "lr") == [(2, 0.1), (3, 0.1), (4, 0.1)]
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    again = sync_run_dir(tmp_path / "run")  # idempotent
    assert again.pending_before == 0


def test_sync_replays_against_what_the_store_already_has(tmp_path, uri):
    tracker = MLflowTracker(tracking_uri=uri, run_name="replay", journal_dir=tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.journal.close()
    # A watermark lost with a kill: the journal says undelivered, the store has it.
    lines = [line for line in journal_path(tmp_path / "run").read_text().splitlines() if "delivered" not in line]
    journal_path(tmp_path / "run").write_text("\n".join(lines) + "\n")
    result = sync_run_dir(tmp_path / "run")
    assert result.stats.duplicates == 1 and result.stats.metric_values == 0
    assert _history(tracker, "loss") == [(1, 1.0)]


def test_unreachable_http_store_fails_fast_naming_the_uri(monkeypatch):
    from reliability_helpers import free_port

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # the user's slow setting is overridden for the probe
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UserError, match=rf"MLflow tracking store unreachable at {uri}"):
        MLflowTracker(tracking_uri=uri)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # and restored


def test_http_limits_respect_the_users_settings_unless_forced(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    with tracking._http_limits(retries=0, timeout=10):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"
    with tracking._http_limits(retries=0, timeout=5, force=True):
        assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


def test_database_locked_is_retried_other_errors_are_not(monkeypatch):
    monkeypatch.setattr(tracking.time, "sleep", lambda s: None)
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking._retry_locked(locked_twice, "log", "sqlite:///x") == "ok" and len(calls) == 3
    with pytest.raises(UserError, match=r"MLflow log failed at sqlite:///x: boom"):
        tracking._retry_locked(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "log", "sqlite:///x")


def test_a_vanished_artifact_is_skipped_not_blocking(tmp_path, uri, capfd):
    tracker = MLflowTracker(tracking_uri=uri, run_name="artifact", journal_dir=tmp_path / "run")
    tracker.log_artifact(tmp_path / "never_written.png", "samples")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.pending == 0 and _history(tracker, "loss") == [(1, 1.0)]
    assert "refused the artifact record" in capfd.readouterr().err
