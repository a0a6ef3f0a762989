"""Experiment tracking: MLflow (embedded SQLite by default) or nothing.

Only rank 0 constructs an MLflowTracker; other ranks get a NullTracker.

Reliability (docs/reliability.md):
- The store is probed when the tracker starts: unreachable means a one-line
  UserError naming the URI, before any training (HTTP retries are off for the probe).
- Every record (metrics, params, tags, artifacts, text, step images, tables, dataset inputs and
  the final status) goes through an in-memory queue and,
  when the tracker has a run folder, the append-only journal (platform/journal.py)
  first. A failed delivery starts an outage: training goes on, the queue is retried
  with backoff, and `finish` drains it. What is still undelivered stays in the
  journal for the next resume or `selfflow sync --run-dir`.
- With a run folder, a run holds one value per (metric, step): values for a step
  the store already has are not sent again. A resumed run recomputes the steps after
  its checkpoint; the ones delivered before the kill are not duplicated. Step images
  likewise hold one image per (key, step); the other record kinds are idempotent by
  nature (platform/tracking/records.py).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from selfflow.platform.errors import UserError
from selfflow.platform.tracking.base import NullTracker, Tracker  # noqa: F401  (re-exported)
from selfflow.platform.tracking import records
from selfflow.platform.tracking.provenance import git_commit  # noqa: F401  (re-exported)
from selfflow.platform.tracking.journal import Record, TrackingJournal, journal_path

DEFAULT_EXPERIMENT = "selfflow"
# MLflow 3's UI opens an experiment in its GenAI layout unless this experiment tag says otherwise.
EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_METRIC_BATCH = 1000
_PROBE_TIMEOUT_S = 5
_SEND_TIMEOUT_S = 10
_FIRST_BACKOFF_S = 1.0
_MAX_BACKOFF_S = 30.0
_MARK_EVERY = 100  # journal a delivered watermark at least every N records
DRAIN_ENV = "SELFFLOW_TRACKING_DRAIN_SECONDS"  # how long `finish` keeps retrying (default 30)
# A request the store understood and refused: retrying cannot help.
_PERMANENT_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"}


def sqlite_uri(database: str | os.PathLike) -> str:
    """The SQLAlchemy URI of an SQLite file at an absolute path."""
    return f"sqlite:///{Path(database)}"


def tracking_uri_for(runs_dir: str | os.PathLike = "runs") -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite in the runs folder (nothing created)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return sqlite_uri(Path(runs_dir).resolve() / "mlflow.db")


def default_tracking_uri(runs_dir: str | os.PathLike = "runs") -> str:
    """MLFLOW_TRACKING_URI if set, else SQLite in the runs folder of the working directory (created)."""
    uri = tracking_uri_for(runs_dir)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        Path(runs_dir).resolve().mkdir(parents=True, exist_ok=True)
    return uri


def quiet_mlflow() -> None:
    for name in ("alembic", "mlflow.store.db.utils", "mlflow.tracking", "mlflow.store.db"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _warn(message: str) -> None:
    print(f"selfflow: warning: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:limit]


@contextlib.contextmanager
def _http_limits(retries: int, timeout: int, force: bool = False) -> Iterator[None]:
    """Bound MLflow's HTTP retries/timeout (its defaults retry for minutes).

    The user's own MLFLOW_HTTP_REQUEST_* settings win unless `force` (the start probe must fail fast).
    """
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries), "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout)}
    saved = {name: os.environ.get(name) for name in wanted}
    for name, value in wanted.items():
        if force or saved[name] is None:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _is_locked(error: BaseException) -> bool:
    return "database is locked" in str(error) or "database table is locked" in str(error)


class ArtifactRefused(Exception):
    """A journal record names an artifact the run folder does not hold: never uploaded."""


def _is_permanent(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, ArtifactRefused)):
        return True
    return getattr(error, "error_code", None) in _PERMANENT_CODES


def _retry_locked(call, what: str, uri: str, patience_s: float = 60.0):
    """Run `call`, retrying SQLite 'database is locked' with backoff (concurrent writers)."""
    deadline = time.monotonic() + patience_s
    delay = 0.2
    while True:
        try:
            return call()
        except Exception as error:
            if not _is_locked(error) or time.monotonic() > deadline:
                raise UserError(f"MLflow {what} failed at {uri}: {_first_line(error)}") from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def check_sqlite_store(uri: str) -> None:
    """An SQLite store that cannot be opened fails here, in milliseconds, with one line: MLflow
    itself retries creating its engine for about 100 s, a warning each time. Other URIs pass."""
    if not uri.startswith("sqlite:///"):
        return
    import sqlite3
    from urllib.parse import quote

    from sqlalchemy.engine import make_url

    raw = uri.removeprefix("sqlite:///")
    try:
        database = make_url(uri).database or ""
    except Exception as error:
        raise UserError(f"MLflow tracking store unusable at {uri}: not a valid SQLite URI "
                        f"({_first_line(error)})") from None
    if database != raw:  # SQLAlchemy decodes %XX in the path; MLflow and we use it as written
        raise UserError(f"MLflow tracking store unusable at {uri}: its path contains '%', which SQLite URIs read as an "
                        f"escape: use a runs folder (--runs) or MLFLOW_TRACKING_URI without '%'")
    if raw in ("", ":memory:"):
        return
    path = Path(raw)
    if path.is_dir():
        raise UserError(f"MLflow tracking store unusable at {uri}: {path} is a folder, not a database file")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(f"file:{quote(str(path))}?mode=rwc", uri=True, timeout=5)
        try:
            connection.execute("PRAGMA schema_version").fetchone()  # opens (or creates) the file for real
        finally:
            connection.close()
    except (OSError, sqlite3.Error) as error:
        if isinstance(error, sqlite3.OperationalError) and _is_locked(error):
            return  # busy with another writer: MLflow's own waiting handles that
        reason = error.strerror if isinstance(error, OSError) and error.strerror else _first_line(error)
        raise UserError(f"MLflow tracking store unusable at {uri}: {reason} ({path})") from None


@contextlib.contextmanager
def _store_init_lock(uri: str) -> Iterator[None]:
    """Serialize opening an SQLite store across processes on this machine: MLflow creates
    and migrates the file when a client first opens it, and two processes doing that at
    once corrupt each other's migration ('expected to match one row')."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    check_sqlite_store(uri)
    database = Path(uri.removeprefix("sqlite:///"))
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = open(database.with_name(database.name + ".init-lock"), "a")
    except OSError as error:
        raise UserError(f"MLflow tracking store unusable at {uri}: {error.strerror or error} ({database.parent})") from None
    with lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


@dataclass
class DeliveryStats:
    records: int = 0  # records delivered (or found already delivered)
    metric_values: int = 0  # metric values sent to the store
    duplicates: int = 0  # metric values skipped: the store already had that (key, step)
    dropped: int = 0  # records the store refused for good (e.g. a vanished artifact file)


class _Delivery:
    """The ordered queue of records and how they reach the store."""

    def __init__(self, client, uri: str, journal: TrackingJournal | None, dedupe: bool,
                 root: str | os.PathLike | None = None):
        self.client, self.uri, self.journal, self.dedupe = client, uri, journal, dedupe
        # Artifacts a journal names must be files inside this folder (the run folder): a journal
        # is data on disk, and whoever can write it must not choose what gets uploaded.
        self.root = Path(root).resolve() if root is not None else None
        self.queue: deque[Record] = deque()
        self.present: dict[str, set[tuple[str, int]]] = {}  # run id -> (key, step) in the store
        self.images: dict[str, set[tuple[str, int]]] = {}  # run id -> (image key, step) in the store
        self.stats = DeliveryStats()
        self.backoff = 0.0
        self.next_attempt = 0.0
        self.outage: str | None = None  # reason, while the store is unreachable
        self._local_seq = 0

    def submit(self, op: str, run_id: str, **payload) -> None:
        if self.journal is not None:
            record = self.journal.append(op, run_id, **payload)
        else:
            self._local_seq += 1
            record = Record(self._local_seq, op, run_id, payload)
        self.queue.append(record)
        self.pump()

    def pump(self, force: bool = False) -> bool:
        """Deliver queued records in order; False (and an outage) if the store is unreachable."""
        if not self.queue:
            return True
        if not force and self.outage is not None and time.monotonic() < self.next_attempt:
            return False
        last, unmarked = 0, 0
        try:
            with _http_limits(retries=0, timeout=_SEND_TIMEOUT_S):
                while self.queue:
                    record = self.queue[0]
                    try:
                        self._send(record)
                    except Exception as error:
                        if not _is_permanent(error):
                            raise
                        self.stats.dropped += 1
                        if isinstance(error, ArtifactRefused):
                            _warn(f"{error}; not uploaded")
                        else:
                            _warn(f"tracking store refused the {record.op} record for run {record.run_id}: "
                                  f"{_first_line(error)}; skipping it")
                    self.queue.popleft()
                    self.stats.records += 1
                    last, unmarked = record.seq, unmarked + 1
                    if unmarked >= _MARK_EVERY and self.journal is not None:
                        self.journal.mark_delivered(last)
                        unmarked = 0
        except Exception as error:
            self._start_or_extend_outage(error)
            return False
        finally:
            if last and self.journal is not None:
                self.journal.mark_delivered(last)
        if self.outage is not None:
            print(f"selfflow: tracking store {self.uri} reachable again: delivered the queued records",
                  file=sys.stderr, flush=True)
            self.outage, self.backoff = None, 0.0
        return True

    def _start_or_extend_outage(self, error: BaseException) -> None:
        if self.outage is None:
            self.outage = _first_line(error, 160)
            where = f"; journal: {self.journal.path}" if self.journal is not None else ""
            _warn(f"tracking store {self.uri} unreachable ({self.outage}); training continues and "
                  f"tracking records are queued{where}")
        self.backoff = min(max(self.backoff * 2, _FIRST_BACKOFF_S), _MAX_BACKOFF_S)
        self.next_attempt = time.monotonic() + self.backoff

    def _present_for(self, run_id: str) -> set[tuple[str, int]]:
        if run_id not in self.present:
            found: set[tuple[str, int]] = set()
            for key in self.client.get_run(run_id).data.metrics:
                found.update((key, int(m.step)) for m in self.client.get_metric_history(run_id, key))
            self.present[run_id] = found
        return self.present[run_id]

    def _images_for(self, run_id: str) -> set[tuple[str, int]]:
        if run_id not in self.images:
            self.images[run_id] = records.image_steps(self.client, run_id)
        return self.images[run_id]

    def _send(self, record: Record) -> None:
        from mlflow.entities import Metric, RunTag

        payload = record.payload
        if record.op == "metrics":
            step, stamp = int(payload["step"]), int(payload["time"])
            values = payload["metrics"]
            present = self._present_for(record.run_id) if self.dedupe else set()  # no dedupe: skip nothing
            fresh = {key: value for key, value in values.items() if (key, step) not in present}
            items = [Metric(key, float(value), stamp, step) for key, value in fresh.items()]
            for start in range(0, len(items), _METRIC_BATCH):
                batch = items[start:start + _METRIC_BATCH]
                self.client.log_batch(record.run_id, metrics=batch)
                if self.dedupe:
                    present.update((metric.key, step) for metric in batch)  # a retry resends only the rest
                self.stats.metric_values += len(batch)
            self.stats.duplicates += len(values) - len(fresh)
        elif record.op == "tags":
            tags = [RunTag(key, str(value)) for key, value in payload["tags"].items()]
            self.client.log_batch(record.run_id, tags=tags)
        elif record.op == "artifact":
            path, artifact_path = self._artifact(record)
            self.client.log_artifact(record.run_id, str(path), artifact_path)
        elif record.op == "params":
            records.send_params(self.client, record.run_id, payload["params"])
        elif record.op == "text":
            records.send_text(self.client, record.run_id, payload["text"], payload["artifact_file"])
        elif record.op == "image":
            present = self._images_for(record.run_id) if self.dedupe else None
            records.send_image(self.client, record.run_id, payload["path"], payload["key"], payload["step"],
                               payload["time"], present)
        elif record.op == "table":
            records.send_table(self.client, record.run_id, payload["columns"], payload["artifact_file"])
        elif record.op == "dataset":
            records.send_dataset(self.client, record.run_id, payload["dataset"])
        elif record.op == "status":
            self.client.set_terminated(record.run_id, status=payload["status"])
        else:
            raise FileNotFoundError(f"unknown journal record op {record.op!r}")  # permanent: skip it

    def _artifact(self, record: Record) -> tuple[Path, str | None]:
        """The file and destination an artifact record names, checked: a regular file inside the run
        folder (symlinks resolved), and a relative destination inside the run's artifacts."""
        raw, artifact_path = record.payload.get("path"), record.payload.get("artifact_path")
        if not isinstance(raw, str) or not raw:
            raise ArtifactRefused(f"journal record {record.seq} names no artifact file")
        if artifact_path is not None and (not isinstance(artifact_path, str) or artifact_path.startswith("/")
                                          or ".." in Path(artifact_path).parts or "\\" in artifact_path):
            raise ArtifactRefused(f"journal record {record.seq}: artifact destination {artifact_path!r} leaves the "
                                  f"run's artifacts")
        path = Path(raw)
        if self.root is not None:
            resolved = (self.root / path).resolve()  # an absolute path stays itself
            if resolved != self.root and self.root not in resolved.parents:
                raise ArtifactRefused(f"journal record {record.seq} names {raw}, outside the run folder {self.root}")
            path = resolved
        if not path.exists():
            raise FileNotFoundError(f"artifact file {raw} no longer exists")
        if not path.is_file():
            raise ArtifactRefused(f"journal record {record.seq} names {raw}, which is not a regular file")
        return path, artifact_path

    def drain(self, seconds: float) -> bool:
        """Keep trying (ignoring backoff) until the queue is empty or `seconds` pass."""
        deadline = time.monotonic() + seconds
        while not self.pump(force=True):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(max(self.backoff, 0.2), left))
        return True


class MLflowTracker:
    """Logs into one MLflow run through the client API (explicit run ids, no global state).

    journal_dir: the run folder; when given, records are journaled before sending and
    each (metric, step) is stored once (see the module docstring).
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, str] | None = None,
        parent_run_id: str | None = None,
        runs_dir: str | os.PathLike = "runs",
        journal_dir: str | os.PathLike | None = None,
    ):
        quiet_mlflow()
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
        with _store_init_lock(self.tracking_uri):
            try:
                self.client = MlflowClient(tracking_uri=self.tracking_uri)  # SQLite: creates/migrates the file
            except Exception as error:
                raise UserError(f"MLflow tracking store unusable at {self.tracking_uri}: {_first_line(error)}") from None
            self.experiment_id = self._experiment_id(experiment, runs_dir)
        self.journal = TrackingJournal(journal_path(journal_dir)) if journal_dir is not None else None
        self.delivery = _Delivery(self.client, self.tracking_uri, self.journal, dedupe=journal_dir is not None,
                                  root=journal_dir)
        try:
            self._open_run(run_id, run_name, tags, parent_run_id)
        except BaseException:
            self._close_journal()
            raise
        if self.journal is not None:
            self.journal.opened(self.tracking_uri)
            self.delivery.queue.extend(self.journal.pending_at_open())  # left by a killed process
            self.delivery.pump()

    def _open_run(self, run_id, run_name, tags, parent_run_id) -> None:
        uri = self.tracking_uri
        with _http_limits(retries=0, timeout=_SEND_TIMEOUT_S):
            if run_id is not None:
                try:
                    self.client.get_run(run_id)
                except Exception as error:
                    raise UserError(f"cannot resume MLflow run {run_id} at {uri}: {_first_line(error, 160)}") from None
                _retry_locked(lambda: self.client.update_run(run_id, status="RUNNING"), "update_run", uri)
                self.run_id = run_id
            else:
                all_tags = dict(tags or {})
                if parent_run_id:
                    all_tags["mlflow.parentRunId"] = parent_run_id
                run = _retry_locked(
                    lambda: self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags),
                    "create_run", uri,
                )
                self.run_id = run.info.run_id
                self.delivery.present[self.run_id] = set()  # a new run has no metrics yet
                self.delivery.images[self.run_id] = set()  # nor images

    def _experiment_id(self, name: str, runs_dir) -> str:
        uri = self.tracking_uri
        try:
            with _http_limits(retries=0, timeout=_PROBE_TIMEOUT_S, force=True):
                found = _retry_locked(lambda: self.client.get_experiment_by_name(name), "probe", uri, 30.0)
        except Exception as error:  # unreachable server or unusable database: fail before training
            reason = _first_line(error).removeprefix(f"MLflow probe failed at {uri}: ")
            raise UserError(f"MLflow tracking store unreachable at {uri}: {reason}") from None
        if found is not None:
            if found.tags.get(EXPERIMENT_KIND) is None:
                self._mark_model_training(found.experiment_id)
            return found.experiment_id
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(runs_dir).resolve() / "artifacts").as_uri()
        try:
            experiment_id = _retry_locked(
                lambda: self.client.create_experiment(name, artifact_location=location,
                                                      tags={EXPERIMENT_KIND: MODEL_TRAINING}),
                "create_experiment", uri, 30.0)
        except UserError:
            # Another process created it between our lookup and create.
            experiment_id = _retry_locked(lambda: self.client.get_experiment_by_name(name).experiment_id,
                                          "get_experiment", uri, 30.0)
        return experiment_id

    def _mark_model_training(self, experiment_id: str) -> None:
        """An experiment made elsewhere: tell the UI it holds model training, not GenAI traces."""
        try:
            with _http_limits(retries=0, timeout=_SEND_TIMEOUT_S):
                self.client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
        except Exception as error:  # cosmetic: the UI then asks which kind the experiment is
            _warn(f"cannot tag MLflow experiment {experiment_id} as model training: {_first_line(error)}")

    def log_params(self, params: Mapping[str, object], where: str = "") -> None:
        """Params the run does not have yet (a resumed run keeps its own), within MLflow's length
        limits (`where`: the artifact holding the full text of values that had to be cut)."""
        if params:
            self.delivery.submit("params", self.run_id, params=records.param_items(params, where))

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = {key: float(value) for key, value in metrics.items() if math.isfinite(float(value))}
        if values:
            self.delivery.submit("metrics", self.run_id, step=int(step), time=int(time.time() * 1000), metrics=values)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.delivery.submit("artifact", self.run_id, path=str(Path(path).resolve()), artifact_path=artifact_path)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self.delivery.submit("tags", self.run_id, tags={key: records.tag_value(value) for key, value in tags.items()})

    def log_text(self, text: str, artifact_file: str) -> None:
        """`text` as the artifact `artifact_file` (a .txt name makes the UI preview it)."""
        self.delivery.submit("text", self.run_id, text=text, artifact_file=artifact_file)

    def log_image(self, path: str | os.PathLike, key: str, step: int) -> None:
        """A PNG on disk as the step image `key` at `step` (the UI's image view: a step slider, and
        side by side across runs). The file must stay until the record is delivered."""
        self.delivery.submit("image", self.run_id, path=str(Path(path).resolve()), key=key, step=int(step),
                             time=int(time.time() * 1000))

    def log_table(self, columns: Mapping[str, list], artifact_file: str) -> None:
        """A table (column name -> values) as MLflow's table artifact (`artifact_file` ends in .json)."""
        self.delivery.submit("table", self.run_id, columns={key: list(values) for key, values in columns.items()},
                             artifact_file=artifact_file)

    def log_dataset(self, dataset: Mapping[str, object]) -> None:
        """A dataset input of the run: {name, digest, source_type, source, profile?, schema?, context}."""
        self.delivery.submit("dataset", self.run_id, dataset=dict(dataset))

    def flush(self, seconds: float = 0.0) -> bool:
        """Try to deliver everything queued now (for up to `seconds`); True if nothing is left."""
        return self.delivery.drain(seconds)

    @property
    def pending(self) -> int:
        return len(self.delivery.queue)

    def finish(self, status: str = "FINISHED") -> None:
        self.delivery.submit("status", self.run_id, status=status)
        if not self.delivery.drain(float(os.environ.get(DRAIN_ENV, "30"))):
            where = (f"they are kept in {self.journal.path}: run `selfflow sync --run-dir {self.journal.path.parent} "
                     f"--tracking-uri {self.tracking_uri}`"
                     if self.journal is not None else "they are lost (no run folder to journal them in)")
            _warn(f"{self.pending} tracking records for run {self.run_id} not delivered to {self.tracking_uri}; {where}")
        self._close_journal()

    def _close_journal(self) -> None:
        if getattr(self, "journal", None) is not None:
            self.journal.close()


@dataclass
class SyncResult:
    journal: Path
    tracking_uri: str
    pending_before: int
    pending_after: int
    stats: DeliveryStats


def sync_store(journal: TrackingJournal, tracking_uri: str | None, runs_dir: str | os.PathLike) -> str:
    """Where sync delivers: the store the user names (--tracking-uri), else the configured one
    (MLFLOW_TRACKING_URI, or the runs folder's SQLite file), which must be the store the journal
    names. A journal never picks the store by itself: it is a file anyone with access to the run
    folder could have written."""
    if tracking_uri:
        return tracking_uri
    configured = tracking_uri_for(runs_dir)
    recorded = journal.tracking_uri
    if recorded and recorded != configured:
        raise UserError(f"{journal.path} was written for the store {recorded}, but the configured store is "
                        f"{configured}: pass --tracking-uri {recorded} to deliver there (or --tracking-uri of "
                        f"the store you mean)")
    return configured


def sync_run_dir(run_dir: str | os.PathLike, tracking_uri: str | None = None, seconds: float = 10.0,
                 runs_dir: str | os.PathLike = "runs") -> SyncResult:
    """Deliver a run folder's undelivered journal records into their MLflow runs (never twice per
    step), into the store `sync_store` picks; artifacts only from inside the run folder."""
    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    journal = TrackingJournal(journal_path(run_dir), create=False)
    try:
        uri = sync_store(journal, tracking_uri, runs_dir)
        try:
            with _store_init_lock(uri), _http_limits(retries=0, timeout=_PROBE_TIMEOUT_S, force=True):
                client = MlflowClient(tracking_uri=uri)
                client.search_experiments(max_results=1)
        except Exception as error:
            raise UserError(f"MLflow tracking store unreachable at {uri}: {_first_line(error)}") from None
        delivery = _Delivery(client, uri, journal, dedupe=True, root=run_dir)
        delivery.queue.extend(journal.pending_at_open())
        before = len(delivery.queue)
        delivery.drain(seconds)
        return SyncResult(journal.path, uri, before, len(delivery.queue), delivery.stats)
    finally:
        journal.close()
