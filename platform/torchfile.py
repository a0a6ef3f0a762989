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

from selfflow.platform.errors import CheckpointError


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
            write_state(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


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
        reason = str(error).strip().splitlines()[0] if str(error).strip() else "unsafe content"
        raise CheckpointError(f"refusing checkpoint {path}: not a weights-only file ({reason[:160]})") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointError(f"unreadable checkpoint {path}: {str(error).splitlines()[0][:200]}") from None


def verify(path: str | os.PathLike) -> str | None:
    """None if the file is a complete torch zip archive (CRC of every member checked,
    nothing unpickled); else the reason it is not."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile) as error:
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"member {bad} fails its CRC" if bad else None


