"""OpenMP threads that sleep while they wait, so a shared machine does not stall torch.

torch's CPU kernels run on OpenMP (libgomp) threads. By default a thread that reaches the
end of a parallel region spins before it sleeps; when the machine has more runnable
threads than cores (other jobs, data workers, Ray trials), the spinning threads take the
CPU from the very thread everyone is waiting for. Measured here with the machine shared: a
2-thread digits Self-Flow step took 7.7 s with the default policy and 0.49 s with PASSIVE
(BENCHMARKS.md, compute efficiency). libgomp reads the policy once, when torch loads it:
entry points call `prefer_passive_wait()` before importing torch. An explicit
OMP_WAIT_POLICY in the environment always wins.
"""
from __future__ import annotations

import os
import sys

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"


def prefer_passive_wait() -> bool:
    """Set OMP_WAIT_POLICY=PASSIVE unless the user chose a policy. Returns whether the policy in
    effect is PASSIVE (False too when torch was imported already: then it is too late)."""
    os.environ.setdefault(WAIT_POLICY_ENV, "PASSIVE")
    return os.environ[WAIT_POLICY_ENV].upper() == "PASSIVE" and "torch" not in sys.modules
