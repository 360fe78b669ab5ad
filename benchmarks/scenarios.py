"""`genadapter bench scenarios`: where adapting once and asking without the context costs less
than prompting (the context in every prompt, vLLM's prefix caching on), side by side on one
server, the way a user calls it: `/v1/adapt`, then `/v1/chat/completions` with the adapter's id
as the model, against chat completions with the document in the user message.

Every chat is greedy with `ignore_eos`, so both paths generate exactly the same number of tokens.
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
import torch

from benchmarks.report import PARAGRAPH, environment
from generator.pipeline import AdapterPipeline

SECTION = "bench scenarios"
QUESTIONS = (
    "When was the town founded?",
    "What does the library keep?",
    "Which star does the planet orbit?",
    "When does the market open?",
    "What do visitors remember?",
    "When do the fishers sail?",
    "On which coast is the town?",
    "What colour is the sea?",
)
T = TypeVar("T")


@dataclass(frozen=True)
class Sizes:
    """How big each scenario is: the issue's sizes, or `--quick` ones that only show it runs."""

    prefill_tokens: tuple[int, ...] = (256, 1024, 4096)
    one_document_tokens: tuple[int, ...] = (1024, 4096)
    questions: int = 8
    answer_tokens: int = 24
    documents: int = 64
    document_questions: int = 4
    # Long enough that the small KV cache cannot keep every document (1 GiB of bfloat16 holds
    # about 45,000 tokens of this model); `many_documents` reports how many it can.
    document_tokens: tuple[int, ...] = (1024, 2048)
    concurrency: int = 8
    long_context_factor: float = 1.5  # x the engine's max_model_len
    memory_tokens: tuple[int, ...] = (1024, 8192, 32768)


QUICK = Sizes(
    prefill_tokens=(64,),
    one_document_tokens=(64,),
    questions=2,
    answer_tokens=2,
    documents=3,
    document_questions=2,
    document_tokens=(64,),
    concurrency=2,
    long_context_factor=1.2,
    memory_tokens=(64, 128),
)


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


class Server:
    """One running server, called over HTTP as a user would."""

    def __init__(self, url: str, answer_tokens: int) -> None:
        self.http = httpx.Client(base_url=url, timeout=3600)
        self.answer_tokens = answer_tokens
        self.base = self.http.get("/v1/models").json()["data"][0]["id"]
        # tokens per PARAGRAPH, to size documents without a tokenizer on the client side
        self.per_paragraph = self.prefill(PARAGRAPH * 4)[0] / 4

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:300]}")
        return r

    def document(self, tokens: int) -> str:
        """A new document of about `tokens` tokens; its nonce comes first, so no prefix of it
        is in any cache."""
        head = f"Document {uuid.uuid4().hex}.\n"
        chars = int(len(PARAGRAPH) * tokens / self.per_paragraph)
        return head + (PARAGRAPH * (chars // len(PARAGRAPH) + 1))[:chars]

    def prefill(self, text: str) -> tuple[int, float]:
        """The engine's own prefill of `text`: a completion of one token (prompt tokens, s)."""
        body = {"model": self.base, "prompt": text, "max_tokens": 1, "temperature": 0}
        r, seconds = timed(lambda: self.post("/v1/completions", body))
        return r.json()["usage"]["prompt_tokens"], seconds

    def adapt(self, text: str) -> tuple[str, int, float]:
        """(adapter id, context tokens, seconds) of one `/v1/adapt`."""
        r, seconds = timed(lambda: self.post("/v1/adapt", {"context": text}))
        return r.json()["adapter_id"], r.json()["tokens"], seconds

    def chat_status(self, model: str, content: str) -> int:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.answer_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return self.http.post("/v1/chat/completions", json=body).status_code

    def ask(self, model: str, content: str) -> None:
        if (status := self.chat_status(model, content)) != 200:
            raise RuntimeError(f"chat with {model}: status {status}")

    def prompted(self, document: str, question: str) -> None:
        self.ask(self.base, f"{document}\n\n{question}")

    def adapted(self, document: str, question: str) -> None:
        """Adapt (a cache hit after the first time) and ask with the adapter."""
        self.ask(self.adapt(document)[0], question)


def finish_times(jobs: Sequence[Callable[[], object]], workers: int) -> list[float]:
    """Seconds from the start at which each of `jobs`, run in order on `workers` threads, ended."""
    start = time.perf_counter()

    def run(job: Callable[[], object]) -> float:
        job()
        return time.perf_counter() - start

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, jobs))


def concurrently(jobs: Sequence[Callable[[], object]], workers: int) -> float:
    """Seconds to run `jobs` in order on `workers` threads."""
    return max(finish_times(jobs, workers))


def prefill_vs_adapt(server: Server, lengths: Sequence[int], repeats: int = 5) -> list[dict]:
    """Goal 1: adapting L tokens next to the engine's prefill of L tokens: medians of `repeats`,
    alternating, after one of each unmeasured (the first adapts after the server started took
    up to twice as long, measured)."""
    rows = []
    for n in lengths:
        server.prefill(server.document(n))
        server.adapt(server.document(n))
        prefill, adapt = [], []
        for _ in range(repeats):
            prefill.append(server.prefill(server.document(n)))
            adapt.append(server.adapt(server.document(n))[1:])
        row = {
            "tokens": adapt[0][0],
            "prompt_tokens": prefill[0][0],
            "repeats": repeats,
            "prefill_s": round(statistics.median(s for _, s in prefill), 3),
            "adapt_s": round(statistics.median(s for _, s in adapt), 3),
        }
        rows.append({**row, "ratio": round(row["adapt_s"] / row["prefill_s"], 2)})
    return rows


def one_document(server: Server, tokens: int, questions: int, repeats: int = 3) -> dict:
    """Goal 3a: one new document, `questions` concurrent questions about it, both paths (medians
    of `repeats`, alternating, a new document each time: single runs gave 1.09x to 1.48x at 1K
    tokens on one machine)."""
    asked = [QUESTIONS[i % len(QUESTIONS)] for i in range(questions)]

    def prompting() -> None:
        doc = server.document(tokens)
        concurrently([partial(server.prompted, doc, q) for q in asked], questions)

    def adapter_path() -> None:
        adapter = server.adapt(server.document(tokens))[0]
        concurrently([partial(server.ask, adapter, q) for q in asked], questions)

    runs = [(timed(prompting)[1], timed(adapter_path)[1]) for _ in range(repeats)]
    return _compare(
        {"tokens": tokens, "questions": questions, "repeats": repeats},
        statistics.median(p for p, _ in runs),
        statistics.median(a for _, a in runs),
    )


def adapts_at_once(server: Server, tokens: int, n: int, repeats: int = 5) -> dict:
    """Goal 1: `n` adapts of different documents sent at once, next to `n` in a row (medians
    of `repeats`, alternating: single runs gave 1.3x to 2.3x on one machine), after one batch
    unmeasured (the first batch of its size after the server started took twice as long,
    measured)."""

    def new_docs() -> list[str]:
        return [server.document(tokens) for _ in range(n)]

    concurrently([partial(server.adapt, d) for d in new_docs()], n)
    in_rows, at_onces = [], []
    for _ in range(repeats):
        in_rows.append(concurrently([partial(server.adapt, d) for d in new_docs()], 1))
        at_onces.append(concurrently([partial(server.adapt, d) for d in new_docs()], n))
    in_row, at_once = statistics.median(in_rows), statistics.median(at_onces)
    return {
        "tokens": tokens,
        "adapts": n,
        "repeats": repeats,
        "in_a_row_s": round(in_row, 2),
        "at_once_s": round(at_once, 2),
        "speedup": round(in_row / at_once, 2),
    }


def many_documents(server: Server, sizes: Sizes, tokens: int, kv_cache_tokens: int) -> dict:
    """Goal 3b: documents of `tokens` tokens x questions arriving interleaved (every document's
    first question, then every second one...), `concurrency` at a time, on an engine whose KV
    cache (`kv_cache_tokens`) cannot keep every document's prefix. Where it can, prompting's
    later rounds are prefix-cache hits and the comparison is not the goal's: `kv_holds` says how
    many documents it keeps."""
    n, q = sizes.documents, sizes.document_questions
    arrivals = [(d, QUESTIONS[i % len(QUESTIONS)]) for i in range(q) for d in range(n)]
    docs = [server.document(tokens) for _ in range(n)]
    prompting = concurrently(
        [partial(server.prompted, docs[d], x) for d, x in arrivals], sizes.concurrency
    )
    docs = [server.document(tokens) for _ in range(n)]
    ends = finish_times(
        [partial(server.adapted, docs[d], x) for d, x in arrivals], sizes.concurrency
    )
    facts = {
        "documents": n,
        "questions_each": q,
        "document_tokens": tokens,
        "concurrency": sizes.concurrency,
        "kv_cache_tokens": kv_cache_tokens,
        "kv_holds": min(n, kv_cache_tokens // tokens),
    }
    compared = _compare(facts, prompting, max(ends))
    # Where the adapter path's time goes: its first round (each document adapted, then asked)
    # next to the same work done apart, adapts alone and then the questions alone.
    docs = [server.document(tokens) for _ in range(n)]
    workers = sizes.concurrency
    apart = {
        "first_round_s": round(max(ends[:n]), 2),
        "adapts_alone_s": round(concurrently([partial(server.adapt, d) for d in docs], workers), 2),
        "asks_alone_s": round(
            concurrently([partial(server.adapted, d, QUESTIONS[0]) for d in docs], workers), 2
        ),
    }
    return {**compared, **apart}


def _compare(facts: dict, prompting_s: float, adapter_s: float) -> dict:
    ratio = round(adapter_s / prompting_s, 2)
    return {
        **facts,
        "prompting_s": round(prompting_s, 2),
        "adapter_s": round(adapter_s, 2),
        "ratio": ratio,
    }


def beyond_max_model_len(server: Server, max_model_len: int, factor: float) -> dict:
    """Goal 3c: a document longer than the engine's max_model_len; prompting is refused."""
    doc = server.document(int(factor * max_model_len))
    status = server.chat_status(server.base, f"{doc}\n\n{QUESTIONS[0]}")
    adapter, tokens, adapt_s = server.adapt(doc)
    ask_s = timed(lambda: server.ask(adapter, QUESTIONS[0]))[1]
    return {
        "max_model_len": max_model_len,
        "tokens": tokens,
        "prompting_status": status,
        "adapt_s": round(adapt_s, 2),
        "ask_s": round(ask_s, 2),
    }


def kv_bytes_per_token(pipeline: AdapterPipeline, engine_dtype: str) -> int:
    """Bytes of the engine's KV cache per token: 2 x layers x KV heads x head size values, each
    of the engine's dtype (vLLM's KV cache keeps that dtype by default)."""
    cfg = pipeline.base.model.config
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    value_bytes = getattr(torch, engine_dtype).itemsize  # "bfloat16" -> 2, "float32" -> 4
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head * value_bytes


def memory(pipeline: AdapterPipeline, lengths: Sequence[int], engine_dtype: str) -> list[dict]:
    """Goal 3d: bytes of a stored adapter (LoRA weights + the raw state kept to extend it),
    made offline by the same generator, next to the KV cache the engine holds for the same
    context."""
    kv_per_token = kv_bytes_per_token(pipeline, engine_dtype)
    ids = pipeline.tokenize(PARAGRAPH * (max(lengths) // 40 + 1))
    rows = []
    for n in lengths:
        adapter = pipeline.adapt_ids(ids[:n])
        stored = len(adapter.peft_bytes()) + len(adapter.state_bytes())
        kv = n * kv_per_token
        rows.append(
            {"tokens": n, "adapter_bytes": stored, "kv_bytes": kv, "ratio": round(stored / kv, 4)}
        )
    return rows


def run(url: str, small_kv_url: str, settings: dict, sizes: Sizes, kv_cache_tokens: int) -> dict:
    """Every scenario over HTTP (memory is measured offline: `memory`); the many-documents one
    on a second server whose KV cache holds `kv_cache_tokens`."""
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    server = Server(url, sizes.answer_tokens)
    result = {
        "base_model": server.base,
        **environment(),
        "settings": settings,
        "sizes": dataclasses.asdict(sizes),
        "prefill_vs_adapt": prefill_vs_adapt(server, sizes.prefill_tokens),
        "adapts_at_once": adapts_at_once(server, sizes.prefill_tokens[0], sizes.concurrency),
        "one_document": [
            one_document(server, n, sizes.questions) for n in sizes.one_document_tokens
        ],
        "beyond_max_model_len": beyond_max_model_len(
            server, settings["max_model_len"], sizes.long_context_factor
        ),
    }
    small = Server(small_kv_url, sizes.answer_tokens)
    result["many_documents"] = [
        many_documents(small, sizes, n, kv_cache_tokens) for n in sizes.document_tokens
    ]
    return result


def _met(ok: bool) -> str:
    return "yes" if ok else "no"


def markdown(result: dict, figure: str) -> str:
    s, cfg = result["sizes"], result["settings"]
    rows = []
    for r in result["prefill_vs_adapt"]:
        rows.append(
            f"| 1 | adapt {r['tokens']} tokens vs the engine's prefill of {r['prompt_tokens']} "
            f"(medians of {r['repeats']}) "
            f"| <= 1.3x | {r['adapt_s']} s vs {r['prefill_s']} s = **{r['ratio']}x** "
            f"| {_met(r['ratio'] <= 1.3)} |"
        )
    a = result["adapts_at_once"]
    rows.append(
        f"| 1 | {a['adapts']} adapts of {a['tokens']} tokens at once vs in a row "
        f"(throughput, medians of {a['repeats']}) "
        f"| >= 1.5x | {a['in_a_row_s']} s / {a['at_once_s']} s = **{a['speedup']}x** "
        f"| {_met(a['speedup'] >= 1.5)} |"
    )
    for r in result["one_document"]:
        rows.append(
            f"| 3 | 1 document of {r['tokens']} tokens, {r['questions']} questions at once "
            f"(medians of {r['repeats']}) "
            f"| <= 1.0x | {r['adapter_s']} s vs {r['prompting_s']} s = **{r['ratio']}x** "
            f"| {_met(r['ratio'] <= 1.0)} |"
        )
    for m in result["many_documents"]:
        premise = m["kv_holds"] < m["documents"]  # else prompting's later rounds are cache hits
        rows.append(
            f"| 3 | {m['documents']} documents of {m['document_tokens']} tokens x "
            f"{m['questions_each']} questions, interleaved, {m['concurrency']} at a time, KV cache "
            f"{cfg['small_kv_cache_gib']} GiB ({m['kv_cache_tokens']} tokens: holds "
            f"{m['kv_holds']} of the documents) | <= 0.5x | {m['adapter_s']} s vs "
            f"{m['prompting_s']} s = **{m['ratio']}x** "
            f"| {_met(m['ratio'] <= 0.5) if premise else 'n/a: the KV cache holds them all'} |"
        )
        rows.append(
            f"| 3 | where its time goes ({m['document_tokens']} tokens): the adapter path's first "
            "round (each document adapted, then asked) vs the same apart (adapts alone + "
            f"questions alone) | (report) | {m['first_round_s']} s vs {m['adapts_alone_s']} s + "
            f"{m['asks_alone_s']} s | - |"
        )
    b = result["beyond_max_model_len"]
    rows.append(
        f"| 3 | a {b['tokens']}-token document, max_model_len {b['max_model_len']} "
        f"| prompting cannot, the adapter answers | prompting: HTTP {b['prompting_status']}; "
        f"adapter: adapt {b['adapt_s']} s, answer {b['ask_s']} s "
        f"| {_met(b['prompting_status'] == 400)} |"
    )
    for r in result["memory"]:
        rows.append(
            f"| 3 | memory at {r['tokens']} tokens: stored adapter vs the engine's KV cache "
            f"| (report) | {r['adapter_bytes'] / 2**20:.1f} MiB vs {r['kv_bytes'] / 2**20:.1f} "
            f"MiB = {r['ratio']}x | - |"
        )
    return "\n".join(
        [
            "## Adapt once or prompt every time (`genadapter bench scenarios`)",
            "",
            f"{result['base_model']} on {result['machine']}, {result['date']} (1-minute load "
            f"average {result['load_average_1m_at_start']} at the start); one server "
            f"(max_model_len {cfg['max_model_len']}, KV cache {cfg['kv_cache_gib']} GiB), "
            f"the many-documents scenario on a second one with a {cfg['small_kv_cache_gib']} "
            f"GiB KV cache; the generator reads in {result['dtypes']['adapt']}, the engine runs "
            f"{result['dtypes']['engine']}; greedy chats of exactly {s['answer_tokens']} tokens "
            "(`ignore_eos`); client-side wall time over HTTP; raw numbers in "
            "`benchmarks/scenarios.json`. The goals are issue 15's.",
            "",
            "| goal | measurement | target | measured | met |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"![adapt once or prompt every time]({figure})",
        ]
    )


def plot(result: dict, png: Path) -> None:
    """The comparisons as one figure: each pair of bars is prompting (or its floor) vs adapting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5), width_ratios=(2.2, 1, 1))
    pairs = [
        (f"adapt vs prefill\n{r['tokens']} tokens", r["prefill_s"], r["adapt_s"])
        for r in result["prefill_vs_adapt"]
    ]
    pairs += [
        (f"1 document x {r['questions']}\n{r['tokens']} tokens", r["prompting_s"], r["adapter_s"])
        for r in result["one_document"]
    ]
    pairs += [
        (
            f"{m['documents']} documents x {m['questions_each']}\n{m['document_tokens']} tokens",
            m["prompting_s"],
            m["adapter_s"],
        )
        for m in result["many_documents"]
    ]
    ax = axes[0]
    x = range(len(pairs))
    ax.bar([i - 0.2 for i in x], [p[1] for p in pairs], 0.4, label="prompting / engine prefill")
    ax.bar([i + 0.2 for i in x], [p[2] for p in pairs], 0.4, label="adapter path")
    for i, (_, base, ours) in enumerate(pairs):
        ax.annotate(f"{ours / base:.2f}x", (i + 0.2, ours), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [p[0] for p in pairs], fontsize=8, rotation=25, ha="right")
    ax.set_ylabel("seconds (wall)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    a = result["adapts_at_once"]
    axes[1].bar(["in a row", "at once"], [a["in_a_row_s"], a["at_once_s"]], color="C2")
    axes[1].set_title(f"{a['adapts']} adapts of {a['tokens']} tokens", fontsize=9)
    axes[1].set_ylabel("seconds (wall)")
    mem = result["memory"]
    x = range(len(mem))
    axes[2].bar([i - 0.2 for i in x], [r["kv_bytes"] / 2**20 for r in mem], 0.4, label="KV cache")
    axes[2].bar(
        [i + 0.2 for i in x], [r["adapter_bytes"] / 2**20 for r in mem], 0.4, label="adapter"
    )
    axes[2].set_xticks(list(x), [f"{r['tokens']} tokens" for r in mem])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("MiB per context")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
