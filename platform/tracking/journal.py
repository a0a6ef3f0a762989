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

A process killed mid-write leaves at most one torn last line. Its record was never sent
(records are sent only after being written), so the next process to open the journal cuts it
off the file (truncate), keeping its text in `tracking-journal.jsonl.quarantine`. Any other
line that is not a journal record (damage, a hand edit) is moved to the same quarantine file
with one warning, and the journal is rewritten without it (a new file renamed into place), so
every later open reads a clean journal.
An exclusive lock (flock) keeps two processes from using one journal at once; the
kernel drops it when its process dies, so a killed run never leaves a stale lock.
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import time
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
        self._file = self._open_locked()
        self.delivered = 0
        self.tracking_uri: str | None = None
        self.next_seq = 1
        self._unsent: list[Record] = []  # records found undelivered when opening
        self._read()

    def _open_locked(self):
        """The journal file, opened for appending and exclusively locked. A repair by another
        process renames a new file into place: a lock taken on the replaced file is retried."""
        for _ in range(10):
            file = open(self.path, "a+", encoding="utf-8", errors="surrogateescape")  # bad bytes: a damaged line
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise UserError(f"tracking journal {self.path} is in use by another process (a training run or "
                                f"a sync in progress)") from None
            try:
                current = os.stat(self.path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(file.fileno()).st_ino:
                return file
            file.close()
        raise UserError(f"tracking journal {self.path} keeps being replaced by another process")

    def _read(self) -> None:
        self._file.seek(0)
        text = self._file.read()
        lines = text.split("\n")  # the last element is "" when the file ends with a newline
        kept: list[str] = []
        damaged: list[tuple[int, str]] = []
        torn_tail = False
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                self._take(json.loads(line))
                kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
                damaged.append((number, line))
                torn_tail = number == len(lines)  # true only for a last line without its newline
        self._unsent = [record for record in self._unsent if record.seq > self.delivered]
        if damaged:
            self._quarantine(damaged, kept, torn_only=torn_tail and len(damaged) == 1,
                             size=len(text.encode("utf-8", "surrogateescape")))

    def _take(self, raw: Any) -> None:
        """Apply one parsed line; raises (KeyError, TypeError, ValueError) for anything but a record."""
        if not isinstance(raw, dict):
            raise TypeError("not an object")
        if "delivered" in raw:
            self.delivered = max(self.delivered, int(raw["delivered"]))
        elif "opened" in raw:
            if not isinstance(raw["opened"], str):
                raise TypeError("opened must name a URI")
            self.tracking_uri = raw["opened"]
        elif "seq" in raw:
            record = Record.from_line(raw)
            if not isinstance(raw.get("op"), str) or not isinstance(raw.get("run_id"), str):
                raise TypeError("a record needs an op and a run_id")
            self.next_seq = max(self.next_seq, record.seq + 1)
            self._unsent.append(record)
        else:
            raise KeyError("no known field")

    @property
    def quarantine_path(self) -> Path:
        return self.path.with_name(self.path.name + ".quarantine")

    def _quarantine(self, damaged: list[tuple[int, str]], kept: list[str], torn_only: bool, size: int) -> None:
        """Keep the damaged lines' text in the quarantine file, then remove them from the journal for
        good: a torn last line by truncating the file, anything else by rewriting it."""
        stamp = int(time.time())
        with open(self.quarantine_path, "a", encoding="utf-8") as out:
            for number, line in damaged:
                out.write(json.dumps({"time": stamp, "line": number, "text": line}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if torn_only:  # a killed writer's unfinished record: never sent, nothing to say
            torn_bytes = len(damaged[0][1].encode("utf-8", "surrogateescape"))
            self._file.flush()
            os.ftruncate(self._file.fileno(), size - torn_bytes)
            self._file.seek(0, os.SEEK_END)
            return
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(temp, "w", encoding="utf-8") as out:
            out.write("".join(line + "\n" for line in kept))
            out.flush()
            os.fsync(out.fileno())
        replacement = open(temp, "a+", encoding="utf-8", errors="surrogateescape")
        fcntl.flock(replacement.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else holds it
        os.replace(temp, self.path)
        old, self._file = self._file, replacement
        old.close()
        numbers = ", ".join(str(number) for number, _ in damaged[:5]) + (" ..." if len(damaged) > 5 else "")
        print(f"selfflow: warning: tracking journal {self.path}: {len(damaged)} damaged line(s) ({numbers}) moved to "
              f"{self.quarantine_path}", file=sys.stderr, flush=True)

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
