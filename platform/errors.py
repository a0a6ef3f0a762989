"""Errors the platform diagnoses (one line each, a non-zero exit from the CLI) and the tools that
keep every other error's traceback: `--debug` / SELFFLOW_DEBUG=1 prints it, otherwise it is written
to the run folder's error.log and the CLI prints one line naming that file."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (config, paths, data). Printed as one line."""

    exit_code = 2

    def one_line(self) -> str:
        return " ".join(str(self).split())


class ConfigError(UserError):
    """A gin file or binding is wrong."""


class CheckpointError(UserError):
    """A checkpoint cannot be used (missing, unsafe, or from another architecture)."""


class TrainingError(Exception):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""

    exit_code = 3

    def one_line(self) -> str:
        return " ".join(str(self).split())


DEBUG_ENV = "SELFFLOW_DEBUG"  # "1": keep full tracebacks everywhere (the CLI's --debug sets it)


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first non-empty line of an error's message (its type name when the message is empty),
    whitespace collapsed: safe on any exception, including ones raised with no message."""
    text = error if isinstance(error, str) else str(error)
    for line in text.splitlines():
        if line.strip():
            return " ".join(line.split())[:limit]
    return "" if isinstance(error, str) else type(error).__name__


def one_line(error: BaseException) -> str:
    """`Type: first line of the message` for an error the platform did not diagnose itself."""
    text = str(error).strip()
    first = " ".join(text.splitlines()[0].split()) if text else ""
    name = type(error).__name__
    return f"{name}: {first}" if first else name


def write_traceback(error: BaseException, folder: str | os.PathLike) -> Path | None:
    """Append the full traceback of `error` to <folder>/error.log; the file, or None if it cannot be written."""
    path = Path(folder) / ERROR_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as file:
            file.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}\n")
            file.write("".join(traceback.format_exception(error)))
    except OSError:
        return None
    return path


ERROR_LOG = "error.log"
