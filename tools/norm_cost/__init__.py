"""The pieces of ``tools/benchmark_norm.py`` (``make bench``): measures, the official-style CBN
baseline, the block and detector benchmarks, and the report."""
