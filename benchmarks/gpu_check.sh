#!/usr/bin/env bash
# The GPU path checked and timed (project issue 14): CUDA step = CPU step for every architecture
# x {fixed, pcgrad, nashmtl, upgrad}, SegNet-MTAN and ResNet-50 step times and peak memory, JSON
# out. See benchmarks/gpu_check.py for what is measured and the tolerance.
#   benchmarks/gpu_check.sh [OUT.json]        (default gpu_check.json; at most 8 minutes)
# PYTHON selects the interpreter (default: python3). Exits 2 with one line when there is no CUDA.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-gpu_check.json}"
shift || true
exec timeout 480 "${PYTHON:-python3}" "$here/gpu_check.py" "$out" "$@"
