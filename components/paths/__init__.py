"""Probability paths between data (t = 0) and noise (t = 1)."""
from selfflow.components.paths.linear import LinearPath

__all__ = ["LinearPath"]
