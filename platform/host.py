"""Opt-in host tuning for a CPU that several processes share: the `cpu_shared` preset.

The default is `stock`: PyTorch, OpenMP and glibc behave as they do for any PyTorch program.
`cpu_shared` changes two process-wide settings that help when runs share a few cores (a sweep's
trials side by side, a laptop, a small shared VM) and cost time on a machine a run has to itself
(measured figures: BENCHMARKS.md and docs/performance.md):

- OpenMP's idle threads sleep instead of spinning (`OMP_WAIT_POLICY=PASSIVE`). libgomp reads the
  variable once, when torch loads it, so it must be in the environment before `import torch`. The
  CLI applies it before it imports torch (`selfflow --host cpu_shared ...`, or the gin preset
  `train/cpu_shared.gin`, which the CLI reads first), and Ray workers get it in their environment.
  A policy the user set in the environment always wins.
- glibc keeps freed memory instead of returning it (no mmap for large blocks, a 1 GiB trim
  threshold), so a step's activation buffers are not page-faulted in again at every step. The
  process then keeps its peak heap.

Everything here is explicit: nothing is applied on import or by a constructor.
"""
from __future__ import annotations

import ctypes
import os
import sys

PRESETS = ("stock", "cpu_shared")
WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
PRESET_ENV = "SELFFLOW_HOST"  # the preset a parent process chose (Ray workers, child processes)

# glibc's mallopt parameter numbers (malloc.h) and the values `cpu_shared` sets.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_allocator_tuned = False
_policy_set_after_torch = False  # apply_before_torch came too late for OpenMP to see the policy


def check_preset(preset: str) -> str:
    if preset not in PRESETS:
        raise ValueError(f"host preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    return preset


def environment(preset: str) -> dict[str, str]:
    """Environment variables a process of this preset needs before torch loads (for child processes
    and Ray workers); the user's own OMP_WAIT_POLICY is passed on unchanged."""
    check_preset(preset)
    env = {PRESET_ENV: preset}
    if preset == "cpu_shared":
        env[WAIT_POLICY_ENV] = os.environ.get(WAIT_POLICY_ENV, "PASSIVE")
    elif WAIT_POLICY_ENV in os.environ:
        env[WAIT_POLICY_ENV] = os.environ[WAIT_POLICY_ENV]
    return env


def apply_before_torch(preset: str) -> bool:
    """Put the preset's environment in place for this process. Returns False when torch is loaded
    already and the preset asks for something OpenMP can no longer pick up."""
    check_preset(preset)
    os.environ[PRESET_ENV] = preset
    if preset == "stock":
        return True
    global _policy_set_after_torch
    if WAIT_POLICY_ENV not in os.environ:
        os.environ[WAIT_POLICY_ENV] = environment(preset)[WAIT_POLICY_ENV]
        _policy_set_after_torch = "torch" in sys.modules
    return not _policy_set_after_torch


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """glibc: no mmap for large blocks and a 1 GiB trim threshold (idempotent). True when in effect;
    False on other C libraries, where nothing is changed."""
    global _allocator_tuned
    if _allocator_tuned:
        return True
    if not is_glibc():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # mallopt returns 1 on success, 0 on error.
    _allocator_tuned = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    return _allocator_tuned


def apply_in_process(preset: str) -> list[str]:
    """Apply the preset's in-process settings (the allocator) where a run starts. Returns warnings:
    what the preset asked for and could not get (e.g. OpenMP loaded before the policy was set)."""
    check_preset(preset)
    if preset == "stock":
        return []
    warnings = []
    policy = os.environ.get(WAIT_POLICY_ENV)
    if _policy_set_after_torch or policy is None:
        warnings.append(f"host preset {preset}: OpenMP loaded without {WAIT_POLICY_ENV}=PASSIVE, so its threads "
                        f"still spin (the selfflow CLI sets it before torch loads; from Python, call "
                        f"selfflow.platform.host.apply_before_torch('{preset}') before importing torch)")
    elif policy.upper() != "PASSIVE":
        warnings.append(f"host preset {preset}: keeping your {WAIT_POLICY_ENV}={policy}")
    keep_freed_memory()
    return warnings


def inherited_preset() -> str:
    """The preset a parent process chose for this one (SELFFLOW_HOST), else 'stock'."""
    preset = os.environ.get(PRESET_ENV, "stock")
    return preset if preset in PRESETS else "stock"
