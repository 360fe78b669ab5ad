"""`running_server`, what the benchmarks and the integration tests start servers with."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from server.launch import STARTUP_TIMEOUT_S
from tests.conftest import REDIS_URL


@pytest.mark.slow
def test_a_process_told_to_stop_stops_its_server(tmp_path: Path, prefix: str) -> None:
    """SIGTERM (`kill`, `timeout`) to a process running a server stops the server too: it runs
    in a process group of its own, so nothing else would (a killed benchmark left two)."""
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from server.launch import running_server

        args = ["--role", "adapt", "--redis-url", {REDIS_URL!r}, "--redis-prefix", {prefix!r}]
        with running_server(args, Path({str(tmp_path / "server.log")!r})) as url:
            print(url, flush=True)
            time.sleep(600)
        """
    )
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert runner.stdout is not None
    url = runner.stdout.readline().strip()  # once the server is ready
    assert httpx.get(f"{url}/health", timeout=STARTUP_TIMEOUT_S).status_code == 200
    runner.send_signal(signal.SIGTERM)
    assert runner.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(httpx.ConnectError):  # the server is gone, its port closed
        httpx.get(f"{url}/health", timeout=5)
