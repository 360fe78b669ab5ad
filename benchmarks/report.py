"""What every benchmark shares: the machine it ran on, its text, and writing its results."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

PARAGRAPH = (
    "The harbour town of Velloran sits on the northern coast of Zorblat, a small planet that "
    "orbits the star Quenmar. Its fishers sail at dawn across the purple sea, its market opens "
    "when the second moon rises, and its library keeps the logbooks of every ship since the "
    "town was founded in 2207. Visitors remember the glass lighthouse and the smell of salt. "
)


BFLOAT16_UNITS = (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"))  # best first


def cpu() -> str:
    """The CPU's model and its bfloat16 unit: the engine and the generator both compute in
    bfloat16 where the CPU has one, and how fast (AMX or AVX-512 BF16) moves every ratio."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    features = set(flags.group(1).split()) if flags else set()
    unit = next((name for flag, name in BFLOAT16_UNITS if flag in features), "no native bfloat16")
    return f"{model.group(1).strip() if model else platform.machine()} ({unit})"


def environment() -> dict:
    """Where and when: other work on the machine skews every number, so its load is recorded."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cpu()}, {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 1)


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
