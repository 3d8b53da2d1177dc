"""Step time and peak memory of every balancer relative to equal weighting, in one run.

    python benchmarks/balancing.py [--json] [--quick] [--steps 5] [--methods ...] [--configs ...]

Same as ``mtlcv bench balancing``; see :mod:`mtlcv.bench.balancing` for what is measured.
"""

from __future__ import annotations

import sys

from mtlcv.bench.balancing import main

if __name__ == "__main__":
    sys.exit(main())
