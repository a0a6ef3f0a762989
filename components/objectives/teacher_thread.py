"""Run the EMA teacher's no-grad forward on a second thread while the student's forward runs.

The teacher's forward needs nothing from the student's, so the two can run at the same time.
On a CPU this pays when torch has more than one intra-op thread: a tiny config's ops are too
small to keep two cores busy (BENCHMARKS.md, compute efficiency: one thread is about as fast as
two), so the second core idles through most of the student's forward. Measured on the digits
Self-Flow step (2 threads, OMP_WAIT_POLICY=PASSIVE, 12 interleaved rounds in one process): 0.88x
and 0.89x the step with the teacher inline; on the S config 0.98x. torch releases the GIL inside
its kernels, so a Python thread is enough: no process, no copy of the weights.

Reproducible: the teacher's draws are made before it starts, and a run at a fixed thread count
repeats bit for bit. With more than one thread the result differs from the inline one by float
rounding only: while both run, each side uses half the threads, and reductions sum in another order.

Modes: "never"; "always"; "auto" = only on the CPU with more than one intra-op thread (with one,
a thread would take a core the run was not given, e.g. a sweep's trials side by side). Every
mode runs the teacher inline while a torch dispatch mode is active: such modes (FLOP counters,
tracers) are thread-local and would not see the teacher's ops.

Written here because no library overlaps two independent forwards of one step on CPU threads.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

TEACHER_THREAD_MODES = ("auto", "always", "never")
AUTOCAST_DEVICES = ("cpu", "cuda", "mps")  # torch.is_autocast_enabled rejects others (meta)

_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def check_teacher_thread_mode(mode: str) -> str:
    if mode not in TEACHER_THREAD_MODES:
        raise ValueError(f"teacher_thread must be one of {TEACHER_THREAD_MODES}, got {mode!r}")
    return mode


def uses_teacher_thread(mode: str, device: torch.device) -> bool:
    """Whether a teacher forward on `device` runs on the worker thread under `mode`."""
    if mode == "never" or _get_current_dispatch_mode() is not None:
        return False
    return mode == "always" or (device.type == "cpu" and torch.get_num_threads() > 1)


def _executor() -> ThreadPoolExecutor:
    # One worker per process, keyed by pid: a forked child inherits the parent's executor object
    # but not its thread, and would wait forever on it.
    with _executors_lock:
        pid = os.getpid()
        if pid not in _executors:
            _executors[pid] = ThreadPoolExecutor(max_workers=1, thread_name_prefix="selfflow-teacher")
        return _executors[pid]


class PendingFeatures:
    """The teacher's features, being computed; `result()` waits for them and hands the caller's
    thread its intra-op threads back."""

    def __init__(self, future: Future, threads_to_restore: int | None = None) -> None:
        self._future = future
        self._threads_to_restore = threads_to_restore

    def _restore_threads(self) -> None:
        if self._threads_to_restore is not None:
            torch.set_num_threads(self._threads_to_restore)
            self._threads_to_restore = None

    def result(self) -> torch.Tensor:
        try:
            return self._future.result()
        finally:
            self._restore_threads()

    def abandon(self) -> None:
        """Waits for a teacher whose result is no longer wanted (the student failed), so that no
        forward still reads the teacher's weights when the caller's error reaches the trainer."""
        if not self._future.cancel():
            self._future.exception()  # waits; the student's error is the one to report
        self._restore_threads()


def start_teacher(compute: Callable[[], torch.Tensor], mode: str, device: torch.device) -> PendingFeatures:
    """Starts `compute` (the teacher's no-grad forward): on the worker thread when
    `uses_teacher_thread`, else here, before returning. While the worker runs, it and the caller
    each get half the intra-op threads (at least one): two ops that both wanted every thread
    would wait on each other's cores (measured: 0.94-0.97x the step of both keeping 2 threads)."""
    if not uses_teacher_thread(mode, device):
        done: Future = Future()
        done.set_result(compute())
        return PendingFeatures(done)
    # Autocast is per thread in torch: carry the caller's over. (Grad mode is too, and the teacher
    # sets its own: no_grad.) The thread count is global; both threads set the same share, so the
    # order in which they set it does not matter.
    autocast = (torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type))
                if device.type in AUTOCAST_DEVICES and torch.is_autocast_enabled(device.type) else nullcontext())
    threads = torch.get_num_threads()
    share = max(1, threads // 2)

    def run() -> torch.Tensor:
        torch.set_num_threads(share)
        with autocast:
            return compute()

    future = _executor().submit(run)
    torch.set_num_threads(share)
    return PendingFeatures(future, threads_to_restore=threads)
