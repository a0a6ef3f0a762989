"""Torch files that cannot be torn or run code: atomic writes, CRC checks, weights-only loads.

Checkpoints and cached networks (evaluators, encoders, autoencoders) are written and read here.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from selfflow.platform.errors import CheckpointError, first_line


def write_state(state: dict[str, Any], file: BinaryIO) -> None:
    """Serialise `state` into an open file (torch's zip format)."""
    torch.save(state, file)


def save_atomic(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """torch.save into a temp file in the same folder, fsync, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            recorder = _WriteErrors(file)
            try:
                write_state(state, recorder)
            except RuntimeError:
                recorder.raise_recorded(path)  # torch hides a full disk behind "unexpected pos ..."
                raise
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


class _WriteErrors:
    """A binary file that remembers the OSError a write raised (ENOSPC, EDQUOT, EFBIG): torch.save
    turns it into a RuntimeError that names neither the file nor the cause."""

    def __init__(self, file: BinaryIO):
        self._file = file
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def raise_recorded(self, path: Path) -> None:
        if self.error is not None:
            raise OSError(self.error.errno, self.error.strerror, str(path)) from None

    def __getattr__(self, name: str):
        return getattr(self._file, name)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load with weights_only=True: a file that needs unpickling of code is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols of files it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = first_line(error, 160) if str(error).strip() else "unsafe content"
        raise CheckpointError(f"refusing checkpoint {path}: not a weights-only file ({reason})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:  # an empty file: EOFError with no message
        if _is_empty(path):
            raise CheckpointError(f"unreadable checkpoint {path}: empty file (0 bytes)") from None
        raise CheckpointError(f"unreadable checkpoint {path}: {first_line(error, 200)}") from None


def _is_empty(path: Path) -> bool:
    try:
        return path.stat().st_size == 0
    except OSError:
        return False


def verify(path: str | os.PathLike) -> str | None:
    """None if the file is a complete torch zip archive (CRC of every member checked,
    nothing unpickled); else the reason it is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return first_line(error)
    return f"member {bad} fails its CRC" if bad else None


