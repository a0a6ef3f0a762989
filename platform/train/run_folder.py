"""A run folder's guards: one run at a time, resume checked against the run's record, and
file-system failures at the folder named in one line (docs/reliability.md, "Run folders").

Lock: `<run_dir>/.selfflow.lock`, held with flock by the process that launched the run (the Ray
launcher, not its workers) from before anything is written until the run ends. The kernel drops
it when that process dies, so a killed run never leaves a stale lock.

Resume: the run's record is `config.gin` (the config it trains with) plus `resumes.jsonl` (one
line per resume: the step and what changed). A resume may change only RESUMABLE settings; any
other difference is refused before anything is written.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

from selfflow.components.files import write_text_atomic
from selfflow.platform.config import bootstrap as gin_config
from selfflow.platform.errors import UserError

LOCK_NAME = ".selfflow.lock"
CONFIG_NAME = "config.gin"
RESUMES_NAME = "resumes.jsonl"

# Settings a resume may change: how long to train and how the run reports, saves and uses the
# machine. None of them changes what the steps already taken computed. `steps` may only grow
# past the checkpoint's step; with lr_decay 'cosine' or 'linear' the remaining steps follow the
# schedule of the new length.
RESUMABLE = (
    "TrainConfig.steps", "TrainConfig.log_every", "TrainConfig.eval_every", "TrainConfig.checkpoint_every",
    "TrainConfig.keep_checkpoints", "TrainConfig.keep_best_metric", "TrainConfig.keep_best_mode",
    "TrainConfig.num_threads", "TrainConfig.host", "TrainConfig.device",
)
_FILE_SYSTEM_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG,
                       errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

_held: dict[Path, int] = {}  # run folder -> file descriptor of its lock, for the folders this process holds


def file_system_error(error: OSError, run_dir: str | os.PathLike) -> UserError | None:
    """A failure to create or write the run folder (read-only, full, over quota, a file in the
    way) as one line naming the path; None for an OSError about anything else."""
    run_dir = Path(os.path.abspath(run_dir))
    names = [Path(os.path.abspath(n)) for n in (error.filename, error.filename2) if isinstance(n, (str, os.PathLike))]
    inside = any(name == run_dir or run_dir in name.parents or name in run_dir.parents for name in names)
    if not (inside or (error.errno in _FULL and not names)) or error.errno not in _FILE_SYSTEM_ERRNOS:
        return None
    where = names[0] if names else run_dir
    reason = error.strerror or os.strerror(error.errno or 0)
    hint = "free space or pick another --run-dir" if error.errno in _FULL else "pick a writable --run-dir"
    return UserError(f"run folder {run_dir}: cannot write {where}: {reason} ({hint})")


def lock(run_dir: Path) -> None:
    """Create the run folder and hold its lock (re-entrant within this process); UserError if
    another process holds it or the folder cannot be made."""
    run_dir = Path(run_dir)
    if run_dir in _held:
        return
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--run-dir {run_dir} is a file, not a folder")
    path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise file_system_error(error, run_dir) or UserError(
            f"run folder {run_dir}: {error.strerror or error}") from None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(descriptor)
        raise UserError(f"run folder {run_dir} is in use by another run (pid {owner}): wait for it to end or "
                        f"pick another --run-dir") from None
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    _held[run_dir] = descriptor


def release(run_dir: Path) -> None:
    """Drop this process's lock of the run folder (nothing if it holds none)."""
    descriptor = _held.pop(Path(run_dir), None)
    if descriptor is not None:
        os.close(descriptor)  # releases the flock


def recorded_tracking_uri(run_dir: Path) -> str | None:
    """The tracking store the run's journal last opened (read without taking the journal's lock)."""
    from selfflow.platform.tracking.journal import journal_path

    path = journal_path(run_dir)
    uri = None
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if '"opened"' not in line:
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(raw, dict) and isinstance(raw.get("opened"), str):
            uri = raw["opened"]
    return uri


def _value(flat: dict[str, str], key: str) -> str:
    return flat.get(key, "(default)")


def resume_changes(recorded: str, requested: str) -> dict[str, tuple[str, str]]:
    """{binding: (recorded value, requested value)} for every binding that differs."""
    old, new = gin_config.flatten_config(recorded), gin_config.flatten_config(requested)
    return {key: (_value(old, key), _value(new, key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)}


def check_resume(run_dir: Path, config_str: str, checkpoint_step: int, steps: int) -> dict[str, tuple[str, str]]:
    """The allowed changes a resume makes to the run's config; UserError (nothing written) if it
    changes anything else, or if the checkpoint already reached TrainConfig.steps."""
    record = run_dir / CONFIG_NAME
    try:
        recorded = record.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"--resume: cannot read the run's config {record} ({error.__class__.__name__}): "
                        f"it records what the run trains with") from None
    changes = resume_changes(recorded, config_str)
    refused = {key: change for key, change in changes.items() if key not in RESUMABLE}
    if refused:
        shown = "; ".join(f"{key} {old} -> {new}" for key, (old, new) in list(refused.items())[:3])
        more = f" (+{len(refused) - 3} more)" if len(refused) > 3 else ""
        raise UserError(f"--resume changes the run's config ({record}): {shown}{more}; a resume may change only "
                        f"{', '.join(k.split('.')[-1] for k in RESUMABLE)} (start a new run for anything else)")
    if steps <= checkpoint_step:
        state = "already reached" if steps == checkpoint_step else "is past"
        raise UserError(f"--resume: the newest checkpoint is at step {checkpoint_step}, which {state} "
                        f"TrainConfig.steps = {steps}: nothing to train (raise TrainConfig.steps to train longer)")
    return changes


def record_config(run_dir: Path, config_str: str, resumed_at: int | None = None,
                  changes: dict[str, tuple[str, str]] | None = None) -> None:
    """Write the config the run trains with; a resume also appends what it changed to resumes.jsonl."""
    write_text_atomic(run_dir / CONFIG_NAME, config_str)
    if resumed_at is None:
        return
    line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resumed_at_step": resumed_at,
            "changes": {key: {"from": old, "to": new} for key, (old, new) in (changes or {}).items()}}
    with open(run_dir / RESUMES_NAME, "a", encoding="utf-8") as file:
        file.write(json.dumps(line) + "\n")
        file.flush()
        os.fsync(file.fileno())


def describe_changes(changes: dict[str, tuple[str, str]]) -> str:
    return "; ".join(f"{key}: {old} -> {new}" for key, (old, new) in changes.items())
