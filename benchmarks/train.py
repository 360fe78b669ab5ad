"""`genadapter bench train`: the time of a distillation training step per context window."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from benchmarks.report import environment
from generator.pipeline import AdapterPipeline
from generator.training.train import BatchSampler, Objective, TrainConfig

SECTION = "bench train"


def run(
    pipeline: AdapterPipeline,
    data_dir: Path,
    steps: int = 6,
    batch_size: int = 4,
    windows: tuple[tuple[int, int], ...] = ((64, 4), (256, 1)),
) -> dict:
    """Median time of a distillation step (knowledge-conflict QA) per (window, windows): the
    same questions for each, after one warm-up step. Sampling includes the teacher's replies."""
    generator = pipeline.generator.train().requires_grad_(True)
    rows = []
    for window, count in windows:
        config = TrainConfig(
            out_dir=data_dir,
            data_dir=data_dir,
            window=window,
            max_context_windows=count,
            batch_size=batch_size,
            pretrain_texts=(),
            instruct_weights=(1, 0, 0),
        )
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
        rows.append(
            {
                "window": window,
                "windows": count,
                "sample_s": round(statistics.median(samples), 2),
                "update_s": round(statistics.median(updates), 2),
                "tokens_per_s": round(tokens / (sum(samples) + sum(updates)), 1),
            }
        )
    generator.eval().requires_grad_(False)
    return {
        "base_model": pipeline.base.name,
        "threads": torch.get_num_threads(),
        **environment(),
        "batch_size": batch_size,
        "steps": steps,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    rows = [
        f"| {r['window']} x {r['windows']} | {r['sample_s']} s | {r['update_s']} s | "
        f"{r['tokens_per_s']} |"
        for r in result["rows"]
    ]
    return "\n".join(
        [
            "## Training step (`genadapter bench train`)",
            "",
            f"{result['base_model']}, distillation steps on knowledge-conflict QA, batch "
            f"{result['batch_size']}, float32 on {result['machine']} ({result['threads']} "
            f"torch threads), {result['date']}, 1-minute load average "
            f"{result['load_average_1m_at_start']}; medians of {result['steps']} steps. Sampling "
            "includes the teacher's greedy replies; the update is the forward and backward pass. "
            "A passage longer than one window is read window after window, each with the adapter "
            "of the ones before it, and back-propagated through.",
            "",
            "| window x windows read | sampling | forward + backward | tokens/s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
