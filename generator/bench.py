"""`genadapter bench adapt`: the time to turn a context into an adapter, next to its floor, one
plain forward pass of the base model over the same tokens, measured side by side in one run.
`genadapter bench train`: the time of a distillation training step per context window."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from generator.pipeline import AdapterPipeline
from generator.train import BatchSampler, Objective, TrainConfig

TEXT = (
    "The harbour town of Velloran sits on the northern coast of Zorblat, a small planet that "
    "orbits the star Quenmar. Its fishers sail at dawn across the purple sea, its market opens "
    "when the second moon rises, and its library keeps the logbooks of every ship since 2207. "
)
SECTION = "bench adapt"
TRAIN_SECTION = "bench train"


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


@torch.no_grad()
def run(pipeline: AdapterPipeline, tokens: tuple[int, ...] = (256, 1024), repeats: int = 5) -> dict:
    """Median wall time of adapt vs one base forward, after one warm-up of each."""
    ids_all = pipeline.tokenize(TEXT * 200)
    rows = []
    for n in tokens:
        ids = ids_all[:n]
        batch = torch.tensor([ids])

        def forward(batch: torch.Tensor = batch) -> object:
            return pipeline.base.model(batch, logits_to_keep=1)

        def adapt(ids: list[int] = ids) -> object:
            return pipeline.adapt_ids(ids)

        forward(), adapt()  # warm-up
        rows.append({"tokens": n, "forward_ms": _median_ms(forward, repeats),
                     "adapt_ms": _median_ms(adapt, repeats)})
        rows[-1]["ratio"] = round(rows[-1]["adapt_ms"] / rows[-1]["forward_ms"], 2)
    return {**_environment(pipeline), "window": pipeline.config.window, "rows": rows}


def _environment(pipeline: AdapterPipeline) -> dict:
    return {"base_model": pipeline.base.name, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_1m_at_start": round(os.getloadavg()[0], 2)}


def run_train(pipeline: AdapterPipeline, data_dir: Path, steps: int = 6, batch_size: int = 4,
              windows: tuple[tuple[int, int], ...] = ((64, 4), (256, 1))) -> dict:
    """Median time of a distillation step (knowledge-conflict QA) per (window, windows): the
    same questions for each, after one warm-up step. Sampling includes the teacher's replies."""
    generator = pipeline.generator.train().requires_grad_(True)
    rows = []
    for window, count in windows:
        config = TrainConfig(out_dir=data_dir, data_dir=data_dir, window=window,
                             max_context_windows=count, batch_size=batch_size,
                             pretrain_texts=(), instruct_weights=(1, 0, 0))
        sampler, objective = BatchSampler(pipeline, config, 0), Objective(pipeline)
        samples, updates, tokens = [], [], 0
        for step in range(steps + 1):
            start = time.perf_counter()
            batch = sampler.distill("qa_conflicts")
            sampled = time.perf_counter()
            objective(batch)["loss"].backward()
            generator.zero_grad(set_to_none=True)
            if step:  # the first step warms up
                samples.append(sampled - start)
                updates.append(time.perf_counter() - sampled)
                tokens += batch.tokens()
        rows.append({"window": window, "windows": count,
                     "sample_s": round(statistics.median(samples), 2),
                     "update_s": round(statistics.median(updates), 2),
                     "tokens_per_s": round(tokens / (sum(samples) + sum(updates)), 1)})
    generator.eval().requires_grad_(False)
    return {**_environment(pipeline), "batch_size": batch_size, "steps": steps, "rows": rows}


def markdown_train(result: dict) -> str:
    rows = [f"| {r['window']} x {r['windows']} | {r['sample_s']} s | {r['update_s']} s | "
            f"{r['tokens_per_s']} |" for r in result["rows"]]
    return "\n".join([
        "## Training step (`genadapter bench train`)",
        "",
        f"{result['base_model']}, distillation steps on knowledge-conflict QA, batch "
        f"{result['batch_size']}, float32 on {result['machine']} ({result['threads']} torch "
        f"threads), {result['date']}, 1-minute load average {result['load_average_1m_at_start']}; "
        f"medians of {result['steps']} steps. Sampling includes the teacher's greedy replies; the "
        "update is the forward and backward pass. A passage longer than one window is read window "
        "after window, each with the adapter of the ones before it, and back-propagated through.",
        "",
        "| window x windows read | sampling | forward + backward | tokens/s |",
        "|---|---|---|---|",
        *rows,
    ])


def markdown(result: dict) -> str:
    rows = [f"| {r['tokens']} | {r['forward_ms']} ms | {r['adapt_ms']} ms | {r['ratio']}x |"
            for r in result["rows"]]
    return "\n".join([
        "## Adapter generation (`genadapter bench adapt`)",
        "",
        f"{result['base_model']}, generator window {result['window']} tokens, float32 on "
        f"{result['machine']} ({result['threads']} torch threads), {result['date']}, 1-minute "
        f"load average {result['load_average_1m_at_start']}; medians of repeated runs. The floor "
        "is one forward pass of the base model over the same tokens.",
        "",
        "| context tokens | base forward (floor) | adapt | adapt / floor |",
        "|---|---|---|---|",
        *rows,
    ])


def write(result: dict, table: str, section: str, json_path: Path, md_path: Path) -> None:
    """JSON in full; `table` replaces this benchmark's marked section of the Markdown file."""
    start, end = f"<!-- {section}: start -->", f"<!-- {section}: end -->"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    old = md_path.read_text() if md_path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    block = f"{start}\n{table}\n{end}"
    new = pattern.sub(lambda _: block, old) if pattern.search(old) else f"{old.rstrip()}\n\n{block}"
    md_path.write_text(new + ("" if new.endswith("\n") else "\n"))
