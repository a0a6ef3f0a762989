"""Atomic file output: readers (and a crash) see the old file or the whole new one, never a part."""
from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yields a fresh temporary path beside `path` (same folder, so the rename is atomic); on a clean
    exit it is renamed over `path`, on an error it is removed and the error propagates.

    `suffix` is the temporary file's extension, for writers that infer the format from it (".png").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.{secrets.token_hex(6)}{suffix}"
    # os.open with mode 0o666, not tempfile.mkstemp: the file gets the umask's permissions like any
    # other output (mkstemp's 0600 would survive the rename). O_EXCL: never another writer's file.
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(temp)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """A text file (config, report, pointer) written whole or not at all."""
    with atomic_path(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return Path(path)
