"""The precision of a no-grad alignment target: the EMA teacher's (Self-Flow) or the frozen encoder's (REPA).

"float32" computes the target as the method is written. "bfloat16" runs the target's forward under
bfloat16 autocast and casts its features back: a cheaper, rounded target, faster where the CPU has
bfloat16 instructions (AVX512-BF16, AMX) or on a GPU, slower where the matmuls are emulated.
Under the trainer's own autocast the target already runs that way, so the setting changes nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

TARGET_PRECISIONS = ("float32", "bfloat16")
LOWER_PRECISION_DEVICES = ("cpu", "cuda")  # where torch.autocast runs bfloat16


def check_target_precision(value: str, name: str) -> str:
    if value not in TARGET_PRECISIONS:
        raise ValueError(f"{name} must be one of {TARGET_PRECISIONS}, got {value!r}")
    return value


def check_target_device(precision: str, device: torch.device, name: str) -> None:
    """A bfloat16 target on a device autocast cannot lower is an error naming the setting."""
    if precision == "bfloat16" and device.type not in LOWER_PRECISION_DEVICES:
        raise ValueError(f"{name} 'bfloat16' runs on {LOWER_PRECISION_DEVICES} only, "
                         f"got tensors on {device}; use 'float32'")


@contextmanager
def target_precision(precision: str, device_type: str) -> Iterator[bool]:
    """Runs the block under bfloat16 autocast when this target needs its own; yields whether it
    does (the features then need casting back). Enter it on the thread that runs the target:
    start_teacher hands the worker the caller's autocast state."""
    lowered = precision == "bfloat16" and not torch.is_autocast_enabled(device_type)
    if not lowered:
        yield False
        return
    with torch.autocast(device_type, dtype=torch.bfloat16):
        yield True
