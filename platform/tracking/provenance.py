"""Where a run came from, as MLflow tags: code version, command line, gin files and overrides, user,
and a description; plus readable, unique run names.

The launcher (the process the user started) computes these and hands them to the training process
(a Ray worker's command line is Ray's, not the user's).
MLflow's own tag names make the UI show them where it shows provenance: `mlflow.source.git.commit`
(with `mlflow.source.name`, the run page's "Source"), `mlflow.user`, and `mlflow.note.content`
(the run's Description, rendered as Markdown).
"""
from __future__ import annotations

import getpass
import os
import secrets
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO_DIR = Path(__file__).resolve().parents[2]  # the checkout (platform/tracking/provenance.py)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_DIR, capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    """HEAD of the checkout selfflow runs from; 'unknown' when it is not a git checkout (an installed wheel)."""
    return _git("rev-parse", "HEAD") or "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (None: not a git checkout)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: the program's name (not its path) and its arguments."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return str(os.getuid())


def gin_header(text: str) -> str:
    """The comment block a gin file starts with, as plain text (blank comment lines keep paragraphs)."""
    lines = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped.startswith("#"):
            if stripped or lines:
                break
            continue
        lines.append(stripped[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def describe(header: str, gin_files: Sequence[str], gin_params: Sequence[str], extra: str = "") -> str:
    """A run description (Markdown): the experiment file's header comment, then what was run."""
    parts = [header] if header else []
    if extra:
        parts.append(extra)
    if gin_files:
        parts.append("**gin files:** " + ", ".join(f"`{name}`" for name in gin_files))
    if gin_params:
        parts.append("**overrides:** " + ", ".join(f"`{binding}`" for binding in gin_params))
    return "\n\n".join(parts)


def first_header(paths: Sequence[str | os.PathLike]) -> str:
    """The header comment of the first of `paths` that has one (the experiment file comes first)."""
    for path in paths:
        try:
            header = gin_header(Path(path).read_text())
        except OSError:
            continue
        if header:
            return header
    return ""


def source_tags(gin_files: Sequence[str] = (), gin_params: Sequence[str] = (), description: str = "",
                argv: Sequence[str] | None = None) -> dict[str, str]:
    """The provenance tags of a run launched by this process."""
    command = command_line(argv)
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": " ".join(shlex.split(command)[:2]) if command else "selfflow",
        "mlflow.user": current_user(),
        "selfflow.command": command,
        "selfflow.gin_files": "\n".join(str(name) for name in gin_files),
        "selfflow.gin_params": "\n".join(gin_params),
    }
    commit = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
        dirty = git_dirty()
        if dirty is not None:
            tags["selfflow.git_dirty"] = str(dirty).lower()
    if description:
        tags["mlflow.note.content"] = description
    return tags


def unique_run_name(name: str) -> str:
    """`name` and a short random suffix: reruns of one gin file stay apart in the UI."""
    return f"{name}-{secrets.token_hex(3)}"
