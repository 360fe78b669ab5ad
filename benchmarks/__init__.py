"""`genadapter bench ...`: the benchmarks and their results (JSON here, tables in
BENCHMARKS.md)."""
