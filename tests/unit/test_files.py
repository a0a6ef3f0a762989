"""Atomic output: the target holds the old content or the whole new one; no temp file is left."""
from pathlib import Path

import pytest

from selfflow.components.files import atomic_path, write_text_atomic


def test_atomic_path_replaces_the_file_on_success(tmp_path: Path):
    target = tmp_path / "sub" / "report.txt"  # the folder is created
    with atomic_path(target, suffix=".png") as temp:
        assert temp.parent == target.parent and temp.suffix == ".png" and not target.exists()
        temp.write_text("new")
    assert target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.txt"]


def test_atomic_path_keeps_the_old_file_and_removes_the_temp_on_error(tmp_path: Path):
    target = tmp_path / "report.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as temp:
            temp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.txt"]


def test_write_text_atomic_overwrites_and_returns_the_path(tmp_path: Path):
    target = tmp_path / "config.gin"
    target.write_text("a = 1\n")
    assert write_text_atomic(target, "a = 2\n") == target
    assert target.read_text() == "a = 2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.gin"]


def test_output_gets_the_umask_permissions_not_a_temp_files_0600(tmp_path: Path):
    import os

    previous = os.umask(0o022)
    try:
        target = write_text_atomic(tmp_path / "summary.txt", "x")
    finally:
        os.umask(previous)
    assert target.stat().st_mode & 0o777 == 0o644
