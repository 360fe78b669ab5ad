"""Benchmark reports: each benchmark owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

import json
from pathlib import Path

from generator.bench import write


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
