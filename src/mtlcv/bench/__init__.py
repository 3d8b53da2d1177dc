"""Benchmarks printed as ratios measured side by side in one run (``mtlcv bench ...``).

* :mod:`mtlcv.bench.balancing`: step time and peak memory of every balancer relative to equal
  weighting, on hard-sharing models (``run``, ``format_table``, ``main``).
"""
