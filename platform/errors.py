"""User-facing errors: one line each, turned into a non-zero exit by the CLI."""
from __future__ import annotations


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
