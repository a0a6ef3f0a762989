"""Helpers for tests that start servers and process groups: a free loopback port, and waiting for a
started server to answer its health check."""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float, log: Path, what: str,
                       poll_s: float = 0.5) -> None:
    """Return once `url`/health answers 200; kill `process` and fail the test (with the end of its
    log) if it exits or `seconds` pass first."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} did not start: {Path(log).read_text()[-2000:]}")
        time.sleep(poll_s)
