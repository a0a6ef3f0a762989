"""glibc malloc settings for a training process: keep freed memory instead of returning it.

A training step allocates and frees the same large activation buffers every step. By
default glibc serves blocks above a (dynamic) threshold with fresh mmap()s and trims the
heap top as soon as enough is free, so every step pays page faults to zero-fill memory it
just gave back. Disabling mmap for large blocks and raising the trim threshold keeps those
pages: measured ~9% off a digits Self-Flow step here (BENCHMARKS.md, compute efficiency).
The cost: the process keeps its peak heap (RSS does not shrink after a peak).

Applied once per process by the Trainer; `SELFFLOW_ALLOCATOR=default` leaves glibc alone.
Not glibc (macOS, musl): nothing happens.
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30
ENV_SWITCH = "SELFFLOW_ALLOCATOR"

_applied: bool | None = None


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def tune_allocator() -> bool:
    """Apply the settings once (idempotent). True when they are in effect in this process."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "default" or not is_glibc():
        return _applied
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return _applied
    # mallopt returns 1 on success, 0 on error.
    _applied = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _applied
