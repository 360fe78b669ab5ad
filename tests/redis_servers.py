"""Private redis-server processes for the tests that change a server's configuration (memory
limits, replicas, a cluster): never the shared Redis on 6379, whose data other runs use."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import redis

from server.launch import free_port

READY_TIMEOUT_S = 30
CLUSTER_BUS_OFFSET = 10_000  # a cluster node also listens on its port + 10000


@contextlib.contextmanager
def redis_server(folder: Path, *args: str, port: int | None = None) -> Iterator[str]:
    """A redis-server on `port` (default: a free loopback one), nothing persisted; yields its
    URL, then stops it."""
    port = port or free_port()
    folder.mkdir(parents=True, exist_ok=True)
    cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", str(folder)]
    cmd += ["--save", "", "--appendonly", "no", "--daemonize", "no", *args]
    with open(folder / f"redis-{port}.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        wait_until(lambda: answers(url, lambda r: r.ping()), f"redis-server on {port}")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def redis_cluster(folder: Path, nodes: int = 3) -> Iterator[list[str]]:
    """`nodes` masters joined by `redis-cli --cluster create`; yields each node's URL once the
    cluster's state is ok on all of them."""
    with contextlib.ExitStack() as stack:
        urls = [
            stack.enter_context(
                redis_server(
                    folder / f"node{i}",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    str(folder / f"node{i}" / "nodes.conf"),
                    port=cluster_port(),
                )
            )
            for i in range(nodes)
        ]
        addresses = [url.removeprefix("redis://").removesuffix("/0") for url in urls]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses]
            + ["--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        for url in urls:
            wait_until(partial(answers, url, cluster_ok), f"cluster state ok at {url}")
        yield urls


def cluster_port() -> int:
    """A free port whose bus port (+10000, at most 65535) is free too."""
    while True:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET > 65535:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET))
            return port


def cluster_ok(r: redis.Redis) -> bool:
    return r.cluster("info")["cluster_state"] == "ok"


def answers(url: str, check: Callable[[redis.Redis], bool]) -> bool:
    """`check` on a client of `url`, closed after it."""
    with redis.Redis.from_url(url, decode_responses=True) as r:
        return check(r)


def wait_until(ready: Callable[[], bool], what: str) -> None:
    """Poll `ready()` until it is true (connection errors count as not yet)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError):
            if ready():
                return
        time.sleep(0.1)
    raise TimeoutError(f"{what}: not ready after {READY_TIMEOUT_S} s")
