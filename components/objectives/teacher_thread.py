"""Run the EMA teacher's no-grad forward on a second thread while the student's forward runs.

(REPA's frozen encoder uses the same worker: REPAObjective.encoder_thread.)

The teacher's forward needs nothing from the student's, so the two can run at the same time. On a
CPU with more than one intra-op thread, a small model's ops are too small to keep every core busy,
and the second thread can use what the student's forward leaves idle. Whether that pays depends on
the host: with OpenMP's idle threads sleeping (the opt-in `cpu_shared` host preset, platform/host.py)
it was faster on a shared 2-core VM; with spinning idle threads (stock OpenMP) each thread's team
spins on the cores the other needs and the step got slower. Measured figures: BENCHMARKS.md.
torch releases the GIL inside its kernels, so a Python thread is enough: no process, no weight copy.

The result is bitwise the inline one: the teacher makes no random draws (the objective draws
before starting it) and runs the same ops with the same thread count.

Modes: "never" (the default); "always"; "auto" = only on the CPU with more than one intra-op
thread (with one, a thread would take a core the run was not given, e.g. a sweep's trials side by
side). The `cpu_shared` preset (experiments/train/cpu_shared.gin) selects "auto".

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
AUTOCAST_DEVICES = ("cpu", "cuda", "mps")  # torch.is_autocast_enabled rejects others (meta)

_executors: dict[int, ThreadPoolExecutor] = {}
_executors_lock = threading.Lock()


def check_teacher_thread_mode(mode: str, name: str = "teacher_thread") -> str:
    if mode not in TEACHER_THREAD_MODES:
        raise ValueError(f"{name} must be one of {TEACHER_THREAD_MODES}, got {mode!r}")
    return mode


def uses_teacher_thread(mode: str, device: torch.device) -> bool:
    """Whether a teacher forward on `device` runs on the worker thread under `mode`."""
    if mode == "never" or _get_current_dispatch_mode() is not None:
        return False
    return mode == "always" or has_spare_cpu_threads(device)


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
