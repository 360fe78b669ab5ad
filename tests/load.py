"""A bounded load on a running server, driven from a process of its own; prints a JSON summary.

    python -m tests.load http://127.0.0.1:8000 [--seconds 40] [--concurrency 8]

First `--single-flight` adapts of one new context at once: one adapter id, one of them made (a
cache miss in the server's metrics), the rest cache hits. Then `--contexts` new adapters and the
base model are each asked one question alone, greedy; then `--concurrency` workers run for
`--seconds`: adapts (a stored context again, or a new one, so that the generator runs beside the
engine) and the same question to a random adapter through /v1/generate or /v1/chat/completions.
An answer that is not its adapter's answer alone is crossed. The answers alone are asked again
after the load: they must not have changed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from clients import GenerativeAdapterClient

QUESTION = "What should I cook tonight?"  # answers part early: a crossed one shows
TEXTS = [  # far apart, so that their adapters answer apart
    "Marco loves sailing; his dog Biscuit sleeps in the lighthouse he keeps on a rocky island.",
    "The recipe: fry two onions, add saffron rice and stock, simmer for twenty minutes.",
    "Quarterly revenue rose 12% on cloud sales; the board approved a dividend of 40 cents.",
    "In 1888 the steamship Aurora sank off Cape Horn with a cargo of copper and tea.",
    "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow, but correct",
]
ADAPT_SHARE = 0.2  # of the load's requests; the rest ask a question
# New contexts adapted at once: within the server's tenant_adapts (4), beyond which a 429 is
# its answer by design; a worker finding none free adapts a stored context instead.
NEW_AT_ONCE = threading.BoundedSemaphore(2)


def context(text: str) -> str:
    """A context never adapted before (a fresh id in it), so adapting it runs the generator."""
    return f"{text} (note {uuid.uuid4().hex})"


def cache_misses(client: GenerativeAdapterClient) -> float:
    text = client.http.get("/metrics").text
    found = re.search(r'^genadapter_adapt_cache_total\{cache="miss"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def single_flight(client: GenerativeAdapterClient, n: int) -> dict[str, int]:
    text = context("One context, asked for by many at once.")
    before = cache_misses(client)
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda _: client.adapt(text), range(n)))
    return {
        "requests": n,
        "adapter_ids": len({r.adapter_id for r in results}),
        "not_cached": sum(not r.cached for r in results),
        "generator_runs": round(cache_misses(client) - before),
    }


@dataclass
class Asker:
    """Greedy answers to QUESTION by an adapter (None: the base model) through either route."""

    client: GenerativeAdapterClient
    base: str
    max_tokens: int

    def ask(self, adapter: str | None, route: str = "generate") -> str:
        sampling = {"max_tokens": self.max_tokens, "temperature": 0}
        if route == "generate":
            return self.client.generate(adapter, QUESTION, **sampling).text
        messages = [{"role": "user", "content": QUESTION}]
        reply = self.client.chat(adapter or self.base, messages, **sampling)
        return reply.choices[0].message.content


@dataclass
class Tally:
    """What one worker saw."""

    requests: Counter[str] = field(default_factory=Counter)
    answers: list[tuple[str | None, str, str]] = field(default_factory=list)  # adapter, route
    errors: list[str] = field(default_factory=list)


def work(asker: Asker, adapters: dict[str | None, str], seconds: float, seed: int) -> Tally:
    rng, tally = random.Random(seed), Tally()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if rng.random() < ADAPT_SHARE:
                tally.requests["adapt"] += 1
                if rng.random() < 0.5 and NEW_AT_ONCE.acquire(blocking=False):
                    try:
                        asker.client.adapt(context(rng.choice(TEXTS)))
                    finally:
                        NEW_AT_ONCE.release()
                else:
                    asker.client.adapt(rng.choice([c for c in adapters.values() if c]))
            else:
                route = rng.choice(("generate", "chat"))
                tally.requests[route] += 1
                adapter = rng.choice(list(adapters))
                tally.answers.append((adapter, route, asker.ask(adapter, route)))
        except Exception as e:  # the load goes on; every failure is counted and shown
            tally.errors.append(f"{type(e).__name__}: {e}"[:300])
    return tally


def mixed(asker: Asker, contexts: int, seconds: float, concurrency: int) -> dict[str, object]:
    adapters: dict[str | None, str] = {None: ""}  # adapter -> its context ("" for the base)
    for text in map(context, TEXTS[:contexts]):
        adapters[asker.client.adapt(text).adapter_id] = text
    alone = {a: asker.ask(a) for a in adapters}
    start = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        tallies = list(pool.map(lambda i: work(asker, adapters, seconds, i), range(concurrency)))
    took = time.monotonic() - start
    after = {a: asker.ask(a) for a in adapters}
    requests = sum((t.requests for t in tallies), Counter())
    errors = [e for t in tallies for e in t.errors]
    answers = [x for t in tallies for x in t.answers]
    crossed = [
        {"adapter": a, "route": route, "answer": text, "alone": alone[a]}
        for a, route, text in answers
        if text != alone[a]
    ]
    return {
        "seconds": round(took, 1),
        "concurrency": concurrency,
        "models": len(adapters),
        "distinct_answers": len(set(alone.values())),
        "requests": sum(requests.values()),
        "by_route": dict(requests),
        "requests_per_s": round(sum(requests.values()) / took, 2),
        "errors": len(errors),
        "first_errors": errors[:5],
        "crossed": len(crossed),
        "first_crossed": crossed[:5],
        "changed_alone": sum(after[a] != alone[a] for a in adapters),
    }


def main() -> None:
    p = argparse.ArgumentParser(description="A bounded load on a running server")
    p.add_argument("url")
    p.add_argument("--single-flight", type=int, default=16, help="adapts of one context at once")
    p.add_argument("--contexts", type=int, default=len(TEXTS), help="adapters asked under load")
    p.add_argument("--seconds", type=float, default=40, help="how long the mixed load runs")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--max-tokens", type=int, default=16, help="per answer (greedy)")
    args = p.parse_args()
    with GenerativeAdapterClient(args.url, timeout_s=120) as client:
        base = client.models().data[0].id
        asker = Asker(client, base, args.max_tokens)
        summary = {
            "single_flight": single_flight(client, args.single_flight),
            "mixed": mixed(asker, args.contexts, args.seconds, args.concurrency),
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
