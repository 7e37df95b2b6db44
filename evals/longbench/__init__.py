"""LongBench v1 / LongBench-E: official prompts, generation lengths, metrics and averages (``task=longbench``)."""
