"""Run the EMA teacher's no-grad forward on a second thread while the student's forward runs.

(REPA's frozen encoder uses the same worker: REPAObjective.encoder_thread.)

The teacher's forward needs nothing from the student's, so the two can run at the same time. On a
CPU this pays when torch has more than one intra-op thread: a tiny config's ops are too small to
keep two cores busy (BENCHMARKS.md, compute efficiency: one thread took 0.97-1.28x the two-thread
digits step since the teacher thread exists), so the second core idles through much of the student's
forward. Both threads keep every intra-op thread: splitting them (one each while both run) measured
0.96-1.02x on the digits step and 1.03-1.04x on the S step, where the student's forward outlasts the
teacher's. Measured, with the teacher inline as 1 (2 threads, OMP_WAIT_POLICY=PASSIVE, interleaved
in one process): digits 0.87x and 0.88x (16 rounds), S 0.89x and 0.98x (8 rounds); in make bench's
breakdown (12 rounds) digits 0.86x, 0.92x, 0.87x and once 1.05x. torch releases the GIL inside its
kernels, so a Python thread is enough: no process, no copy of the weights.

The result is bitwise the inline one: the teacher makes no random draws (the objective draws
before starting it) and runs the same ops with the same thread count.

Modes: "never"; "always"; "auto" = only on the CPU with more than one intra-op thread (with one,
a thread would take a core the run was not given, e.g. a sweep's trials side by side) and only
while OpenMP's idle threads sleep at once (OMP_WAIT_POLICY=PASSIVE, which the platform's entry
points set: platform/omp.py). With spinning idle threads (the policy unset or ACTIVE) each thread's
OpenMP team spins on the cores the other needs. Digits Self-Flow step, 2 threads, one process per
setting, with the thread over without it: 1.31-1.44x with spinning threads and 0.85-0.87x with
PASSIVE (medians of 40 steps, processes one after the other: GOMP_SPINCOUNT 1e4 and 1e5, two
runs each); 1.25x and 0.95x in bench/studies/openmp_policy.py (processes interleaved, 20 rounds).

Every mode runs the teacher inline while a torch dispatch mode is active: such modes (FLOP
counters, tracers) are thread-local and would not see the teacher's ops.

Written here because no library overlaps two independent forwards of one step on CPU threads.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from selfflow.components.core import has_spare_cpu_threads

TEACHER_THREAD_MODES = ("auto", "always", "never")
OMP_WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
AUTOCAST_DEVICES = ("cpu", "cuda", "mps")  # torch.is_autocast_enabled rejects others (meta)

_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def check_teacher_thread_mode(mode: str, name: str = "teacher_thread") -> str:
    if mode not in TEACHER_THREAD_MODES:
        raise ValueError(f"{name} must be one of {TEACHER_THREAD_MODES}, got {mode!r}")
    return mode


def openmp_threads_sleep_when_idle() -> bool:
    """Whether OMP_WAIT_POLICY=PASSIVE is set: libgomp's idle threads then sleep instead of spinning.
    Read from the environment, as OpenMP itself reads it (once, when torch loads it)."""
    return os.environ.get(OMP_WAIT_POLICY_ENV, "").strip().upper() == "PASSIVE"


def uses_teacher_thread(mode: str, device: torch.device) -> bool:
    """Whether a teacher forward on `device` runs on the worker thread under `mode`."""
    if mode == "never" or _get_current_dispatch_mode() is not None:
        return False
    return mode == "always" or (has_spare_cpu_threads(device) and openmp_threads_sleep_when_idle())


def _executor() -> ThreadPoolExecutor:
    # One worker per process, keyed by pid: a forked child inherits the parent's executor object
    # but not its thread, and would wait forever on it.
    with _executors_lock:
        pid = os.getpid()
        if pid not in _executors:
            _executors[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfflow-teacher")
        return _executors[pid]


def start_teacher(compute: Callable[[], torch.Tensor], mode: str, device: torch.device) -> Future:
    """Starts `compute` (the teacher's no-grad forward) and returns its future: on the worker
    thread when `uses_teacher_thread`, else computed here, before returning."""
    if not uses_teacher_thread(mode, device):
        done: Future = Future()
        done.set_result(compute())
        return done
    # Autocast and the intra-op thread count are per thread in torch: the worker takes the caller's.
    # (Grad mode is per thread too; the teacher sets its own, no_grad.)
    autocast = (torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type))
                if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type) else nullcontext())
    threads = torch.get_num_threads()

    def run() -> torch.Tensor:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with autocast:
            return compute()

    return _executor().submit(run)


@contextmanager
def waits_for_teacher_on_error(pending: Future | None) -> Iterator[None]:
    """Around the student's forward: if it fails, waits for a started teacher (`pending`, or None
    when there is none) before the error propagates, so that no forward still reads the teacher's
    weights when the error reaches the trainer. The student's error is the one reported."""
    try:
        yield
    except BaseException:
        if pending is not None and not pending.cancel():
            pending.exception()  # waits
        raise
