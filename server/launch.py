"""Run `genadapter serve` as a child process (for the benchmark and the integration tests).

The server starts vLLM's engine-core and worker processes, so it runs in its own process group
and is stopped as a group: nothing is left behind, also when the process running it is told to
stop (SIGTERM: `kill`, `timeout`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 600  # model load + vLLM start: about a minute idle, a few under load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(
    args: list[str], log_file: Path, timeout_s: float = STARTUP_TIMEOUT_S
) -> Iterator[str]:
    """Start `genadapter serve <args>` on a free port; yield its URL once /health is ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "genadapter.cli", "serve", "--port", str(port), *args]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with sigterm_unwinds():
            wait_ready(url, proc, log_file, timeout_s)
            yield url
    finally:
        stop(proc)


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises SystemExit (in the main thread, the only one that can handle signals), so
    `finally` stops the server: by default it killed the process at once, and the server, in a
    process group of its own, went on computing beside whatever ran next (seen: a benchmark
    stopped with `kill` left two servers and their vLLM workers at a load of 13)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_ready(url: str, proc: subprocess.Popen, log_file: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise TimeoutError(f"server at {url} not ready after {timeout_s:.0f} s; log: {log_file}")


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM the server's process group (uvicorn shuts the engine down), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
