"""`genadapter bench adapt`: the time to turn a context into an adapter, next to its floor, one
plain forward pass of the base model over the same tokens, measured side by side in one run."""

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

TEXT = (
    "The harbour town of Velloran sits on the northern coast of Zorblat, a small planet that "
    "orbits the star Quenmar. Its fishers sail at dawn across the purple sea, its market opens "
    "when the second moon rises, and its library keeps the logbooks of every ship since 2207. "
)
SECTION = "bench adapt"


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
    return {"base_model": pipeline.base.name, "window": pipeline.config.window,
            "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_1m_at_start": round(os.getloadavg()[0], 2), "rows": rows}


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
