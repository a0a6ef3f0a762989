"""`selfflow ui` / `make ui`: the MLflow UI on a runs folder's store, small and stoppable.

`mlflow server` as it comes starts 4 uvicorn workers plus job runners (huey consumers for GenAI
jobs this platform never submits): 16 processes and about 3 GiB here, and the job runners outlive
a SIGTERM sent to the server. This serves with one worker and job execution off
(MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false), bound to loopback unless told otherwise, and runs the
server in its own process group: Ctrl-C or SIGTERM stops the whole group (SIGKILL for whatever is
still there after a grace period), so nothing is left running.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from selfflow.platform.errors import UserError

LOOPBACK = ("127.0.0.1", "localhost", "::1")
GRACE_S = 10.0  # after SIGTERM, how long the server may take before the group is killed


def server_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """The `mlflow server` command line: one worker, uvicorn's graceful shutdown bounded."""
    mlflow = Path(sys.executable).with_name("mlflow")
    return [str(mlflow) if mlflow.exists() else "mlflow", "server", "--backend-store-uri", tracking_uri,
            "--host", host, "--port", str(port), "--workers", "1",
            "--uvicorn-opts", f"--timeout-graceful-shutdown {int(GRACE_S // 2)}"]


def server_environment() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def check_store(tracking_uri: str) -> None:
    if tracking_uri.startswith(("http://", "https://")):
        raise UserError(f"the tracking store {tracking_uri} is an MLflow server: open it in a browser "
                        f"(unset MLFLOW_TRACKING_URI to serve a runs folder)")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group exists (owned by someone else)
        return True


def stop_group(process: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after `grace_s`; returns when
    no process of the group remains (and the server is reaped)."""
    pgid = process.pid
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (process.poll() is None or _group_alive(pgid)):
        time.sleep(0.1)
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    while _group_alive(pgid):  # SIGKILL is not refusable: the kernel removes them shortly
        time.sleep(0.05)


def serve(tracking_uri: str, host: str = "127.0.0.1", port: int = 5000,
          announce: Callable[[str], None] = print) -> int:
    """Run the UI until Ctrl-C / SIGTERM or until the server exits; returns an exit code."""
    check_store(tracking_uri)
    if host not in LOOPBACK:
        print(f"selfflow: warning: serving MLflow on {host}: anyone who can reach this machine can read "
              f"and change the runs", file=sys.stderr, flush=True)
    process = subprocess.Popen(server_command(tracking_uri, host, port), env=server_environment(),
                               start_new_session=True, stdin=subprocess.DEVNULL)
    stopping = {"signal": None}

    def on_signal(signum, _frame):
        stopping["signal"] = signum

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        announce(f"MLflow UI on http://{host}:{port}  ({tracking_uri}); Ctrl-C stops it")
        while process.poll() is None and stopping["signal"] is None:
            time.sleep(0.2)
    finally:
        stop_group(process)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopping["signal"] is not None:
        return 0
    return process.returncode or 0
