"""A bounded load on `/v1/adapt`, run as its own process (`python -m benchmarks.load`) so the
client does not share the server's interpreter; prints one JSON summary.

hit: every request adapts one context already cached; miss: every request a new context, so
each runs the generator."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid

import httpx

CONTEXT = "The glass lighthouse of Velloran has guided ships on the purple sea since 2207."


async def run(url: str, mode: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        r = await http.post("/v1/adapt", json={"context": CONTEXT})  # the hit, cached
        r.raise_for_status()
        deadline = time.perf_counter() + seconds

        async def client() -> None:
            while time.perf_counter() < deadline:
                text = CONTEXT if mode == "hit" else f"{uuid.uuid4().hex}: {CONTEXT}"
                start = time.perf_counter()
                r = await http.post("/v1/adapt", json={"context": text})
                if r.status_code == 200 and r.json()["cached"] is (mode == "hit"):
                    latencies.append(time.perf_counter() - start)
                else:
                    key = str(r.status_code)
                    errors[key] = errors.get(key, 0) + 1

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies) or [float("nan")]
    return {
        "mode": mode,
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * statistics.median(ordered), 1),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=("hit", "miss"), required=True)
    p.add_argument("--clients", type=int, required=True)
    p.add_argument("--seconds", type=float, default=10)
    args = p.parse_args()
    print(json.dumps(asyncio.run(run(args.url, args.mode, args.clients, args.seconds))))


if __name__ == "__main__":
    main()
