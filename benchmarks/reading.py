"""`genadapter bench reading`: a context read one window at a time (each window with the adapter
of all windows before it: the paper's reading, and training's) or `windows_at_once` windows per
forward pass (each with the adapter of the passes before), side by side on held-out real text:
adapt time, and what the adapter carries, the base model's NLL with it of the context's start
(reconstruction) and of the text that follows (completion), paired per document."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from benchmarks.report import environment
from generator.model import AdapterGenerator, LoRAFactors
from generator.pipeline import AdapterPipeline
from generator.training.data import brown_rows_of, split_of
from generator.training.evaluate import bootstrap_interval, summed_nll

SECTION = "bench reading"
RECONSTRUCTED = 512  # tokens of the context's start scored with its adapter
FOLLOWING = 256  # tokens after the context scored with its adapter


def documents(brown: Path, count: int, tokens: int, pipeline: AdapterPipeline) -> list[list[int]]:
    """Brown corpus samples of the validation split (training never reads them) long enough
    for a context of `tokens` and what follows it."""
    held_out = [
        row["text"] for _, key, row in brown_rows_of(brown) if split_of(key) == "validation"
    ]
    ids = [pipeline.tokenize(text) for text in held_out]
    return [x for x in ids if len(x) >= tokens + FOLLOWING][:count]


def reading(pipeline: AdapterPipeline, windows_at_once: int) -> AdapterPipeline:
    """The same generator and base model, reading `windows_at_once` windows per forward pass."""
    if windows_at_once == pipeline.config.windows_at_once:
        return pipeline
    config = dataclasses.replace(pipeline.config, windows_at_once=windows_at_once)
    generator = AdapterGenerator(config)
    generator.load_state_dict(pipeline.generator.state_dict())
    return AdapterPipeline(pipeline.base, generator)


def nll(pipeline: AdapterPipeline, factors: LoRAFactors | None, ids: list[int]) -> float:
    """Mean NLL of `ids` (every token after the first) with `factors` applied."""
    total, count = summed_nll(pipeline.base.model, ids, 0, factors)
    return total / count


def paired(a: list[float], b: list[float], seed: int = 0) -> dict:
    """Mean of b - a per document, its 95% bootstrap interval, and how often b is lower."""
    diffs = [y - x for x, y in zip(a, b, strict=True)]

    def mean(idx: list[int]) -> float:
        return sum(diffs[i] for i in idx) / len(idx)

    low, high = bootstrap_interval(mean, len(diffs), seed)
    return {
        "mean": round(sum(diffs) / len(diffs), 4),
        "ci95": [round(low, 4), round(high, 4)],
        "lower_for": sum(d < 0 for d in diffs),
    }


def run(
    pipeline: AdapterPipeline, brown: Path, at_once: int, tokens: int = 1024, count: int = 20
) -> dict:
    """One window at a time vs `at_once` windows per pass (> 1), and the base model alone."""
    if at_once < 2:
        raise ValueError(f"compare one window at a time with more, not {at_once}")
    docs = documents(brown, count, tokens, pipeline)
    if not docs:
        raise ValueError(f"no held-out Brown sample has {tokens + FOLLOWING} tokens")
    one, many = "one window at a time", f"{at_once} windows at once"
    readers = [
        ("base model", None),
        (one, reading(pipeline, 1)),
        (many, reading(pipeline, at_once)),
    ]
    scores: dict[str, dict[str, list[float]]] = {}
    for name, reader in readers:
        rows: dict[str, list[float]] = {"adapt_ms": [], "reconstruction": [], "completion": []}
        for ids in docs:
            context, following = ids[:tokens], ids[tokens : tokens + FOLLOWING]
            factors = None
            if reader is not None:
                reader.adapt_ids(context[:128])  # warm-up
                start = time.perf_counter()
                factors = reader.adapt_ids(context).factors
                rows["adapt_ms"].append(1000 * (time.perf_counter() - start))
            rows["reconstruction"].append(nll(pipeline, factors, context[:RECONSTRUCTED]))
            rows["completion"].append(nll(pipeline, factors, following))
        scores[name] = rows
    return {
        "base_model": pipeline.base.name,
        **environment(),
        "window": pipeline.config.window,
        "context_tokens": tokens,
        "documents": len(docs),
        "means": {
            name: {k: round(sum(v) / len(v), 4) for k, v in rows.items() if v}
            for name, rows in scores.items()
        },
        "paired": {
            k: paired(scores[one][k], scores[many][k]) for k in ("reconstruction", "completion")
        },
    }


def markdown(result: dict) -> str:
    rows = []
    for name, m in result["means"].items():
        adapt = f"{m['adapt_ms']:.0f} ms" if "adapt_ms" in m else "-"
        rows.append(f"| {name} | {adapt} | {m['reconstruction']:.4f} | {m['completion']:.4f} |")
    many = list(result["means"])[-1]
    diffs = [
        f"{k}: {p['mean']:+.4f} nats (95% CI {p['ci95'][0]:+.4f} to {p['ci95'][1]:+.4f}), lower "
        f"for {p['lower_for']} of {result['documents']} documents"
        for k, p in result["paired"].items()
    ]
    return "\n".join(
        [
            "## How a context is read (`genadapter bench reading`)",
            "",
            f"{result['base_model']} and its generator (W = {result['window']}) on "
            f"{result['machine']}, {result['date']}; {result['documents']} held-out Brown corpus "
            f"samples (validation split), a context of their first {result['context_tokens']} "
            f"tokens; NLL of its first {RECONSTRUCTED} tokens (reconstruction) and of the "
            f"{FOLLOWING} after it (completion) with its adapter, the document not in the "
            "prompt; means over documents.",
            "",
            "| reading | adapt | reconstruction NLL | completion NLL |",
            "|---|---|---|---|",
            *rows,
            "",
            f"Paired, {many} minus one at a time: " + "; ".join(diffs) + ".",
        ]
    )
