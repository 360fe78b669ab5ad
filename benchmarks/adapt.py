"""`genadapter bench adapt`: the time to turn a context into an adapter, next to its floor, one
plain forward pass of the base model's decoder over the same tokens, side by side in one run, in
float32 and in the dtype the server reads in."""

from __future__ import annotations

import torch

from benchmarks.report import PARAGRAPH, environment, median_ms
from generator.base_model import dtype_name
from generator.pipeline import AdapterPipeline

SECTION = "bench adapt"


@torch.no_grad()
def run(
    pipelines: list[AdapterPipeline], tokens: tuple[int, ...] = (256, 1024), repeats: int = 5
) -> dict:
    """Median wall time of adapt vs one base forward, per pipeline (one per dtype), after one
    warm-up of each; the first pipeline's forward is also every row's float32 reference."""
    ids_all = pipelines[0].tokenize(PARAGRAPH * 400)
    rows = []
    for n in tokens:
        ids = ids_all[:n]
        reference = None
        for pipeline in pipelines:
            decoder = pipeline.base.model.get_decoder()

            def forward(decoder: torch.nn.Module = decoder, batch: list[int] = ids) -> object:
                return decoder(torch.tensor([batch]))

            def adapt(pipeline: AdapterPipeline = pipeline, ids: list[int] = ids) -> object:
                return pipeline.adapt_ids(ids)

            forward(), adapt()  # warm-up
            forward_ms, adapt_ms = median_ms(forward, repeats), median_ms(adapt, repeats)
            reference = reference or forward_ms
            rows.append(
                {
                    "tokens": n,
                    "dtype": dtype_name(pipeline.base.model.dtype),
                    "forward_ms": forward_ms,
                    "adapt_ms": adapt_ms,
                    "ratio": round(adapt_ms / forward_ms, 2),
                    "ratio_to_first_forward": round(adapt_ms / reference, 2),
                }
            )
    return {
        "base_model": pipelines[0].base.name,
        "threads": torch.get_num_threads(),
        **environment(),
        "window": pipelines[0].config.window,
        "reference_dtype": dtype_name(pipelines[0].base.model.dtype),
        "rows": rows,
    }


def markdown(result: dict) -> str:
    ref = result["reference_dtype"]
    rows = [
        f"| {r['tokens']} | {r['dtype']} | {r['forward_ms']} ms | {r['adapt_ms']} ms "
        f"| {r['ratio']}x | {r['ratio_to_first_forward']}x |"
        for r in result["rows"]
    ]
    return "\n".join(
        [
            "## Adapter generation (`genadapter bench adapt`)",
            "",
            f"{result['base_model']}, generator window {result['window']} tokens, on "
            f"{result['machine']} ({result['threads']} torch threads), {result['date']}, "
            f"1-minute load average {result['load_average_1m_at_start']}; medians of repeated "
            "runs. The floor is one forward pass of the base model's decoder (no lm_head: reading "
            "needs none) over the same tokens; the server reads in bfloat16 where the CPU has "
            "it natively (`GENADAPTER_ADAPT_DTYPE`), its linear layers' weights packed for "
            "oneDNN (`PackedLinear`), as here.",
            "",
            "| context tokens | dtype | base forward (floor) | adapt | adapt / floor "
            f"| adapt / {ref} forward |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
