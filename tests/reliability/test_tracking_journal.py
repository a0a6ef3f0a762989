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


def test_journal_cuts_a_torn_last_line_and_continues_numbering(tmp_path, capfd):
    journal = TrackingJournal(journal_path(tmp_path))
    journal.append("metrics", "r1", step=1, time=0, metrics={"a": 1.0})
    journal.append("metrics", "r1", step=2, time=0, metrics={"a": 2.0})
    journal.mark_delivered(1)
    journal.close()
    clean = journal_path(tmp_path).read_text()
    with open(journal_path(tmp_path), "a") as file:
        file.write('{"seq": 3, "op": "metr')  # a writer killed mid-line
    reopened = TrackingJournal(journal_path(tmp_path))
    assert journal_path(tmp_path).read_text() == clean  # cut off for good, not left mid-file
    assert [r.seq for r in reopened.pending_at_open()] == [2]
    assert reopened.append("tags", "r1", tags={}).seq == 3
    reopened.close()
    lines = journal_path(tmp_path).read_text().splitlines()
    assert json.loads(lines[-1])["seq"] == 3 and all(json.loads(line) for line in lines)
    quarantined = [json.loads(line) for line in reopened.quarantine_path.read_text().splitlines()]
    assert [(q["line"], q["text"]) for q in quarantined] == [(4, '{"seq": 3, "op": "metr')]
    assert capfd.readouterr().err == ""  # a killed writer's torn line is routine: no warning


def test_journal_damaged_in_the_middle_is_quarantined_for_good(tmp_path, capfd):
    journal_path(tmp_path).write_text('{"seq": 1, "op": "tags", "run_id": "r", "tags": {}}\nnot json\n'
                                      '{"seq": "x", "op": "tags", "run_id": "r"}\n{"delivered": 1}\n')
    journal = TrackingJournal(journal_path(tmp_path))
    assert journal.delivered == 1 and journal.next_seq == 2
    journal.close()
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "2 damaged line(s) (2, 3) moved to" in err and ".quarantine" in err
    kept = '{"seq": 1, "op": "tags", "run_id": "r", "tags": {}}\n{"delivered": 1}\n'
    assert journal_path(tmp_path).read_text() == kept
    TrackingJournal(journal_path(tmp_path)).close()  # the next open finds nothing to repair
    assert capfd.readouterr().err == ""


def test_a_torn_line_heals_for_every_later_resume_and_sync(tmp_path, uri):
    """The issue's case: append {"seq":99,"op":"metr to a run's journal; the first resume used to
    work and leave it mid-file, and every later sync or resume failed."""
    run = tmp_path / "run"
    first = MLflowTracker(tracking_uri=uri, run_name="torn", journal_dir=run)
    first.log_metrics({"loss": 1.0}, step=1)
    first.finish()
    with open(journal_path(run), "a") as file:
        file.write('{"seq":99,"op":"metr')
    for _ in range(2):
        resumed = MLflowTracker(tracking_uri=uri, run_id=first.run_id, journal_dir=run)
        resumed.log_metrics({"loss": 2.0}, step=2)
        resumed.finish()
        for _ in range(2):
            assert sync_run_dir(run, tracking_uri=uri).pending_after == 0
    assert all(json.loads(line) for line in journal_path(run).read_text().splitlines())
    assert _history(resumed, "loss") == [(1, 1.0), (2, 2.0)]


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

    result = sync_run_dir(tmp_path / "run", tracking_uri=uri)
    assert (result.pending_before, result.pending_after) == (2, 0)
    assert result.stats.metric_values == 1
    assert _history(tracker, "loss") == [(s, float(s)) for s in range(1, 7)]
    assert _history(tracker, "lr") == [(2, 0.1), (3, 0.1), (4, 0.1)]
    assert tracker.client.get_run(tracker.run_id).info.status == "FINISHED"
    again = sync_run_dir(tmp_path / "run", tracking_uri=uri)  # idempotent
    assert again.pending_before == 0


def test_sync_replays_against_what_the_store_already_has(tmp_path, uri):
    tracker = MLflowTracker(tracking_uri=uri, run_name="replay", journal_dir=tmp_path / "run")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.journal.close()
    # A watermark lost with a kill: the journal says undelivered, the store has it.
    lines = [line for line in journal_path(tmp_path / "run").read_text().splitlines() if "delivered" not in line]
    journal_path(tmp_path / "run").write_text("\n".join(lines) + "\n")
    result = sync_run_dir(tmp_path / "run", tracking_uri=uri)
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
    tracker.log_artifact(tmp_path / "run" / "never_written.png", "samples")
    tracker.log_metrics({"loss": 1.0}, step=1)
    tracker.finish()
    assert tracker.pending == 0 and _history(tracker, "loss") == [(1, 1.0)]
    assert "refused the artifact record" in capfd.readouterr().err


# ---- sync stays inside its run folder and delivers only to the store the user configured ----------


def _crafted_journal(run, uri: str, run_id: str, records: list[dict]) -> None:
    lines = [{"opened": uri, "pid": 1}] + [{"seq": n, "run_id": run_id, **r} for n, r in enumerate(records, start=1)]
    journal_path(run).write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_sync_uploads_only_files_inside_the_run_folder(tmp_path, uri, capfd):
    """The issue's case: a journal listing /etc/hostname (and a link to it, and a destination that
    climbs out of the run's artifacts) uploads none of them; the run's own file goes up."""
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    run.mkdir()
    (run / "own.txt").write_text("mine")
    (run / "link.txt").symlink_to("/etc/hostname")
    client = MlflowClient(tracking_uri=uri)
    run_id = MLflowTracker(tracking_uri=uri, run_name="crafted").run_id
    _crafted_journal(run, uri, run_id, [
        {"op": "artifact", "path": "/etc/hostname", "artifact_path": None},
        {"op": "artifact", "path": str(run / "link.txt"), "artifact_path": None},
        {"op": "artifact", "path": str(run / "own.txt"), "artifact_path": "../../escaped"},
        {"op": "artifact", "path": str(run), "artifact_path": None},
        {"op": "artifact", "path": str(run / "own.txt"), "artifact_path": "notes"},
    ])
    result = sync_run_dir(run, tracking_uri=uri)
    assert (result.pending_after, result.stats.dropped) == (0, 4)
    assert [a.path for a in client.list_artifacts(run_id)] == ["notes"]
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/own.txt"]
    err = capfd.readouterr().err
    assert f"names /etc/hostname, outside the run folder {run}" in err
    assert f"names {run / 'link.txt'}, outside the run folder" in err  # the link resolves outside
    assert "artifact destination '../../escaped' leaves the run's artifacts" in err
    assert "which is not a regular file" in err


def test_sync_delivers_only_to_the_configured_or_named_store(tmp_path, uri, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    elsewhere = f"sqlite:///{tmp_path / 'attacker' / 'mlflow.db'}"
    _crafted_journal(run, elsewhere, "0" * 32, [{"op": "tags", "tags": {"a": "b"}}])
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match=rf"was written for the store {elsewhere}, but the configured store is "
                                        rf"sqlite:///\S+/runs/mlflow\.db: pass --tracking-uri"):
        sync_run_dir(run, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "attacker").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", elsewhere)  # configured: the user's own choice
    journal = TrackingJournal(journal_path(run))
    try:
        assert tracking.sync_store(journal, None, "runs") == elsewhere
    finally:
        journal.close()


def test_a_resumed_tracker_replays_no_artifact_from_outside_its_folder(tmp_path, uri, capfd):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "run"
    run.mkdir()
    first = MLflowTracker(tracking_uri=uri, run_name="replay", journal_dir=run)
    first.journal.close()
    with open(journal_path(run), "a") as file:
        file.write(json.dumps({"seq": 50, "op": "artifact", "run_id": first.run_id, "path": "/etc/hostname"}) + "\n")
    resumed = MLflowTracker(tracking_uri=uri, run_id=first.run_id, journal_dir=run)
    resumed.finish()
    assert MlflowClient(tracking_uri=uri).list_artifacts(first.run_id) == []
    assert "outside the run folder" in capfd.readouterr().err
