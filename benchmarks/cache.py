"""`genadapter bench cache`: `/v1/adapt` on a cache hit and on a miss, in-process and Redis
stores, under a bounded load from a second process at 1, 8 and 32 concurrent clients."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

import httpx
import redis

from benchmarks.report import environment
from server.launch import running_server

SECTION = "bench cache"
STORES = ("memory", "redis")


def load(url: str, mode: str, clients: int, seconds: float) -> dict:
    """One run of benchmarks.load in its own process."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--url", url, "--mode", mode]
        + ["--clients", str(clients), "--seconds", str(seconds)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def run_store(url: str, store: str, clients: Sequence[int], seconds: float) -> list[dict]:
    return [
        {"store": store, **load(url, mode, n, seconds)} for mode in ("hit", "miss") for n in clients
    ]


def run(
    flags: list[str], redis_url: str, log: Path, clients: Sequence[int], seconds: float
) -> dict:
    """Start a server on each store in turn (the Redis one under a fresh key prefix, removed
    after) and load it."""
    result: dict = {**environment(), "seconds": seconds, "rows": []}
    prefix = f"bench-{uuid.uuid4().hex[:12]}"
    on_redis = ["--redis-url", redis_url, "--redis-prefix", prefix]
    try:
        for store, extra in zip(STORES, ([], on_redis), strict=True):
            with running_server(flags + extra, log) as url:
                result["base_model"] = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                result["rows"] += run_store(url, store, clients, seconds)
    finally:
        r = redis.Redis.from_url(redis_url)
        for key in r.scan_iter(match=f"{prefix}:*"):
            r.delete(key)
    return result


def markdown(result: dict, figure: str) -> str:
    rows = [
        f"| {r['store']} | {r['mode']} | {r['clients']} | {r['requests']} | "
        f"{r['requests_per_s']} | {r['p50_ms']} ms | {r['p99_ms']} ms | "
        f"{sum(r['errors'].values())} |"
        for r in result["rows"]
    ]
    return "\n".join(
        [
            "## Adapter cache under load (`genadapter bench cache`)",
            "",
            f"{result['base_model']} on {result['machine']}, {result['date']} (1-minute load "
            f"average {result['load_average_1m_at_start']} at the start); `/v1/adapt` from a "
            f"second process on 127.0.0.1 for {result['seconds']} s per row; a hit adapts a "
            "cached context, a miss a new ~40-token one (the generator runs, batched). Raw "
            "numbers in `benchmarks/cache.json`.",
            "",
            "| store | cache | clients | requests | requests/s | p50 | p99 | errors |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"![adapt latency and throughput, hit and miss]({figure})",
        ]
    )


def plot(result: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, tail) = plt.subplots(1, 2, figsize=(11, 4))
    for store in STORES:
        for mode, style in (("hit", "-o"), ("miss", "--s")):
            rows = [r for r in result["rows"] if r["store"] == store and r["mode"] == mode]
            if not rows:
                continue
            x = [r["clients"] for r in rows]
            label = f"{store}, {mode}"
            rate.plot(x, [r["requests_per_s"] for r in rows], style, label=label)
            tail.plot(x, [r["p99_ms"] for r in rows], style, label=label)
    for ax, name in ((rate, "requests/s"), (tail, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
