"""`selfflow ui` serves the MLflow UI with one worker on loopback and leaves nothing running after
Ctrl-C (SIGINT) or SIGTERM: no uvicorn worker, no MLflow job runner."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from selfflow.platform.errors import UserError
from selfflow.platform.tracking import ui

SELFFLOW = str(Path(sys.executable).with_name("selfflow"))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"selfflow ui exited early with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # exited, not yet reaped by init
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_ui_serves_one_worker_on_loopback_and_stops_with_everything_it_started(tmp_path, stop_signal):
    port = free_port()
    process = subprocess.Popen([SELFFLOW, "ui", "--runs", str(tmp_path / "runs"), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/health", process)
        tree = psutil.Process(process.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in tree]
        # selfflow -> mlflow server -> one uvicorn process (workers=1 serves in uvicorn's own process).
        assert len(tree) == 2, commands
        assert any("uvicorn" in command and "--workers 1" in command for command in commands), commands
        assert not any("job" in command or "huey" in command for command in commands), commands
        listening = {conn.laddr.ip for child in tree for conn in child.net_connections(kind="inet")
                     if conn.status == psutil.CONN_LISTEN}
        assert listening == {"127.0.0.1"}
        process.send_signal(stop_signal)
        assert process.wait(timeout=60) == 0
        assert all(gone(child.pid) for child in tree), [c.pid for c in tree if not gone(c.pid)]
        assert f"MLflow UI on http://127.0.0.1:{port}" in process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_ui_refuses_a_server_store_and_names_it():
    with pytest.raises(UserError, match=r"http://127.0.0.1:9/ is an MLflow server"):
        ui.serve("http://127.0.0.1:9/")
