"""``mtlcv bench train`` (mtlcv.bench.train): it runs from the CLI, its JSON's shape, the Gramian
check against torchjd; no timing claims (timings on a shared CI machine mean nothing)."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import pytest

from mtlcv.bench import train as bench


def _check_common(res: dict) -> None:
    s = res["step"]
    for k in ("mtlcv_s", "hand_s", "ratio"):
        assert math.isfinite(s[k]) and s[k] > 0, k
    assert s["met"] == (s["ratio"] <= bench.STEP_TARGET)
    o = res["options"]
    # quick: no compile
    assert set(o) == {"batch_size", "first_steps_s", "default", "channels_last"}
    assert o["default"]["ratio"] == 1.0 and o["channels_last"]["step_s"] > 0
    assert [d["config"] for d in res["data"]] == ["demo", "nyuv2-shape-b2"]
    for d in res["data"]:
        assert d["batches"] >= 1
        assert d["ratio"] == pytest.approx(d["delivery_samples_s"] / d["consumption_samples_s"])
        assert d["met"] == (d["ratio"] >= bench.DATA_TARGET)


def test_quick_without_torchjd_skips_that_comparison_with_a_line(monkeypatch, capsys):
    monkeypatch.setattr(bench, "torchjd_version", lambda: None)
    out = io.StringIO()
    assert bench.main(["--quick", "--json"], out=out) == 0
    res = json.loads(out.getvalue())
    assert res["quick"] is True and res["rounds"] == 2
    assert "torchjd is not installed" in res["torchjd"]["skipped"]
    assert "mtlcv[bench]" in capsys.readouterr().err
    _check_common(res)
    lines = bench.format_lines(res)
    assert any(line.startswith("vs torchjd: skipped") for line in lines)


@pytest.mark.slow
def test_cli_quick_json_with_torchjd():
    pytest.importorskip("torchjd", reason="torchjd (optional: pip install 'mtlcv[bench]') absent")
    proc = subprocess.run(
        [sys.executable, "-m", "mtlcv", "bench", "train", "--quick", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)  # the JSON alone on stdout
    _check_common(res)
    jd = res["torchjd"]
    assert set(jd["methods"]) == set(bench.TORCHJD_METHODS)
    for name, e in jd["methods"].items():
        assert "error" not in e, (name, e.get("error"))
        # Nash-MTL is not a Gramian weighting in torchjd: no autogram route
        assert e["routes"] == (["autojac"] if name == "nashmtl" else ["autojac", "autogram"])
        assert e["faster_route"] in e["routes"]
        assert e["met"] == (e["ratio"] <= bench.TORCHJD_TARGET)
    # the exact per-task Gramian agrees with torchjd's autogram to float32 rounding
    assert jd["gramian"]["max_rel_diff"] < 1e-4


def test_bad_rounds_is_one_line(capsys):
    assert bench.main(["--quick", "--rounds", "0"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: bench train: rounds must be >= 1 and warmup >= 0, got 0 and 2")
