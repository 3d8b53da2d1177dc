"""benchmarks/gpu_check.sh works apart from CUDA: its Python part on the CPU (quick), and its
one-line refusal without CUDA."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_python_part_runs_on_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "g.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--device", "cpu",
         "--quick"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["tolerance"] == 1e-4
    # CPU against CPU: the same init and batch give the same weights exactly
    assert [(r["arch"], r["method"]) for r in res["steps"]] == [
        ("hps", "fixed"), ("hps", "nashmtl"), ("mtan", "fixed"), ("mtan", "nashmtl")]
    assert all(r["max_abs_diff"] == 0.0 and r["ok"] for r in res["steps"])
    names = [t["name"] for t in res["timings"]]
    assert names == ["segnet-mtan-nyuv2-fixed", "resnet50-hps-b8-bf16"]
    for t in res["timings"]:
        assert "error" not in t, t
        assert t["step_s"] > 0
    assert res["timings"][0]["params"] == 44_229_073  # mtan's official SegNet-MTAN count
    assert res["timings"][1]["dtype"] == "bfloat16 autocast"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_the_script_says_in_one_line_that_there_is_no_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"),
                           str(tmp_path / "g.json")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gpu_check: no CUDA device is available")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "g.json").exists()
