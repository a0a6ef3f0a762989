"""The tracking journal: an append-only JSON-lines file in the run folder.

Every tracking record (metrics, tags, artifact, run status) is written here
before it is sent to MLflow, so a tracking outage or a killed process loses
nothing: records after the last `delivered` watermark are replayed by the next
tracker that opens the folder (a resumed run) or by `selfflow sync --run-dir`.

Lines, one JSON object each:
  {"seq": 7, "op": "metrics", "run_id": "...", "step": 40, "time": 1700000000000, "metrics": {"loss/total": 0.9}}
  {"seq": 8, "op": "tags" | "artifact" | "status", "run_id": "...", ...}
  {"delivered": 8}                      every record with seq <= 8 reached the store
  {"opened": "<tracking uri>", "pid": 123}  a tracker (or sync) opened the journal

A process killed mid-write leaves at most one torn last line; it is skipped on
reading (its record was never sent: records are sent only after being written).
An exclusive lock (flock) keeps two processes from using one journal at once; the
kernel drops it when its process dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selfflow.platform.errors import UserError

JOURNAL_NAME = "tracking-journal.jsonl"


@dataclass
class Record:
    """One tracking operation to deliver to MLflow, in journal order."""

    seq: int
    op: str
    run_id: str
    payload: dict[str, Any] = field(default_factory=dict)

    def line(self) -> dict[str, Any]:
        return {"seq": self.seq, "op": self.op, "run_id": self.run_id, **self.payload}

    @classmethod
    def from_line(cls, raw: dict[str, Any]) -> Record:
        payload = {k: v for k, v in raw.items() if k not in ("seq", "op", "run_id")}
        return cls(int(raw["seq"]), str(raw["op"]), str(raw["run_id"]), payload)


def journal_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / JOURNAL_NAME


class TrackingJournal:
    """Append-only record log with a delivered watermark; one process at a time."""

    def __init__(self, path: str | os.PathLike, create: bool = True):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise UserError(f"no tracking journal at {self.path}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            raise UserError(
                f"tracking journal {self.path} is in use by another process (a training run or a sync in progress)"
            ) from None
        self.delivered = 0
        self.tracking_uri: str | None = None
        self.next_seq = 1
        self._unsent: list[Record] = []  # records found undelivered when opening
        self._read()

    def _read(self) -> None:
        self._file.seek(0)
        text = self._file.read()
        lines = text.split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # torn last line of a killed writer: never sent
                    continue
                raise UserError(f"tracking journal {self.path} line {number} is not JSON; fix or remove it") from None
            if "delivered" in raw:
                self.delivered = max(self.delivered, int(raw["delivered"]))
            elif "opened" in raw:
                self.tracking_uri = str(raw["opened"])
            elif "seq" in raw:
                record = Record.from_line(raw)
                self.next_seq = max(self.next_seq, record.seq + 1)
                self._unsent.append(record)
        self._unsent = [record for record in self._unsent if record.seq > self.delivered]
        if text and not text.endswith("\n"):
            self._file.write("\n")  # start our first line after a torn one
            self._file.flush()

    def _write(self, raw: dict[str, Any]) -> None:
        self._file.write(json.dumps(raw, separators=(",", ":")) + "\n")
        self._file.flush()  # survives SIGKILL (page cache); fsync would only add power-loss safety

    def opened(self, tracking_uri: str) -> None:
        self.tracking_uri = tracking_uri
        self._write({"opened": tracking_uri, "pid": os.getpid()})

    def append(self, op: str, run_id: str, **payload: Any) -> Record:
        record = Record(self.next_seq, op, run_id, payload)
        self.next_seq += 1
        self._write(record.line())
        return record

    def mark_delivered(self, seq: int) -> None:
        if seq > self.delivered:
            self.delivered = seq
            self._write({"delivered": seq})

    def pending_at_open(self) -> list[Record]:
        """Records an earlier process wrote but did not see delivered (oldest first)."""
        return [record for record in self._unsent if record.seq > self.delivered]

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()  # also releases the lock
