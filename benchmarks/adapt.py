"""`genadapter bench adapt`: the time to turn a context into an adapter, next to its floor, one
plain forward pass of the base model over the same tokens, measured side by side in one run."""

from __future__ import annotations

import torch

from benchmarks.report import PARAGRAPH, environment, median_ms
from generator.pipeline import AdapterPipeline

SECTION = "bench adapt"


@torch.no_grad()
def run(pipeline: AdapterPipeline, tokens: tuple[int, ...] = (256, 1024), repeats: int = 5) -> dict:
    """Median wall time of adapt vs one base forward, after one warm-up of each."""
    ids_all = pipeline.tokenize(PARAGRAPH * 200)
    rows = []
    for n in tokens:
        ids = ids_all[:n]
        batch = torch.tensor([ids])

        def forward(batch: torch.Tensor = batch) -> object:
            return pipeline.base.model(batch, logits_to_keep=1)

        def adapt(ids: list[int] = ids) -> object:
            return pipeline.adapt_ids(ids)

        forward(), adapt()  # warm-up
        row = {
            "tokens": n,
            "forward_ms": median_ms(forward, repeats),
            "adapt_ms": median_ms(adapt, repeats),
        }
        rows.append({**row, "ratio": round(row["adapt_ms"] / row["forward_ms"], 2)})
    return {
        "base_model": pipeline.base.name,
        "threads": torch.get_num_threads(),
        "dtype": str(pipeline.base.model.dtype).removeprefix("torch."),
        **environment(),
        "window": pipeline.config.window,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    rows = [
        f"| {r['tokens']} | {r['forward_ms']} ms | {r['adapt_ms']} ms | {r['ratio']}x |"
        for r in result["rows"]
    ]
    return "\n".join(
        [
            "## Adapter generation (`genadapter bench adapt`)",
            "",
            f"{result['base_model']}, generator window {result['window']} tokens, "
            f"{result['dtype']} on {result['machine']} ({result['threads']} torch threads), "
            f"{result['date']}, "
            f"1-minute load average {result['load_average_1m_at_start']}; medians of repeated "
            "runs. The floor is one forward pass of the base model over the same tokens, in the "
            "same dtype.",
            "",
            "| context tokens | base forward (floor) | adapt | adapt / floor |",
            "|---|---|---|---|",
            *rows,
        ]
    )
