"""The command line: exit codes, one-line errors, list, data."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mtlcv.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mtlcv.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_missing_config_is_one_line_exit_2(tmp_path):
    r = run_cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert "missing.yaml' does not exist" in r.stderr


def test_unknown_architecture_is_one_line_listing_valid_names(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {arch: transformer9000}\n")
    r = run_cli("train", "--config", str(cfg), "--out", str(tmp_path / "run"))
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "transformer9000" in line and "hps" in line and "stl" in line


def test_bad_override_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\n")
    assert main(["train", "--config", str(cfg), "--set", "train.epochs=abc"]) == 2
    assert "train.epochs" in capsys.readouterr().err


def test_resume_without_out(capsys):
    assert main(["train", "--resume"]) == 2
    assert "--resume needs --out" in capsys.readouterr().err


def test_list_shows_every_registered_component(capsys):
    from mtlcv.registry import ALL

    assert main(["list", "--no-size"]) == 0
    out = capsys.readouterr().out.splitlines()
    for kind, reg in ALL.items():
        for name in reg.names():
            assert any(line.split()[:2] == [kind, name] for line in out), (kind, name)
    for expected in (
        "semseg",
        "depth",
        "normals",
        "edges",
        "classification",
        "scenes",
        "tiny",
        "resnet18",
        "resnet50",
        "stl",
        "hps",
        "fixed",
    ):
        assert any(expected in line.split()[:2] for line in out), expected


def test_list_architectures_shows_parameters_and_flops(capsys):
    from mtlcv.models.build import build_model
    from mtlcv.models.complexity import count_parameters
    from mtlcv.registry import TASKS

    assert main(["list", "architecture", "--size", "32x48"]) == 0
    lines = {line.split()[1]: line for line in capsys.readouterr().out.splitlines()}
    tasks = {t: TASKS.create(t) for t in ("semseg", "depth", "normals")}
    hps = count_parameters(build_model("hps", tasks, {"name": "tiny"}, {"name": "light"}))
    assert f"{hps / 1e6:.2f} M params" in lines["hps"] and "at 32x48" in lines["hps"]


def test_data_scenes_writes_a_readable_cache(tmp_path, capsys):
    from mtlcv.data.scenes import ScenesDataset  # noqa: F401
    from mtlcv.registry import DATASETS

    out = tmp_path / "cache"
    assert main(["data", "scenes", "--n", "20", "--size", "24x32", "--out", str(out)]) == 0
    ds = DATASETS.create("scenes", split="train", root=str(out), n=20, size=(24, 32))
    item = ds[0]
    assert item["image"].shape == (3, 24, 32)
    assert item["depth"].shape == (1, 24, 32) and float(item["depth"].min()) > 0
    assert np.isfinite(item["normals"].numpy()).all()


def test_bad_size_is_a_usage_error(tmp_path):
    r = run_cli("data", "scenes", "--size", "big", "--out", str(tmp_path))
    assert r.returncode == 2 and "expected HxW" in r.stderr


@pytest.mark.slow
def test_train_cli_end_to_end(small_cfg, tmp_path, capsys):
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**small_cfg, "schedule": {"name": "step", "step_size": 1}}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out), "--set", "train.epochs=1"]) == 0
    text = capsys.readouterr().out
    assert "semseg" in text and "miou" in text and str(out) in text
    # resuming a finished run to more epochs continues it (a step schedule does not depend on
    # the number of epochs; a cosine one is refused: tests/test_robustness.py)
    assert main(["train", "--out", str(out), "--resume", "--set", "train.epochs=2"]) == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == 2


def _compare_args(tmp_path, cfg: dict, *options: str) -> list[str]:
    """`mtlcv compare` arguments: base config `cfg` in tmp_path, grid in tmp_path/grid."""
    import yaml

    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return ["compare", "--config", str(path), *options, "--out", str(tmp_path / "grid")]


def _baseline_ready(cfg: dict) -> dict:
    """Train long enough for every baseline metric to be non-zero (Δm divides by them)."""
    cfg["train"]["epochs"] = 2
    cfg["optim"]["lr"] = 1e-2
    return cfg


@pytest.mark.slow
def test_compare_grid_trains_tabulates_and_reuses(small_cfg, tmp_path, capsys):
    import json

    args = _compare_args(
        tmp_path,
        _baseline_ready(small_cfg),
        "--vary",
        "model.arch=stl,hps",
        "--seeds",
        "0,1",
        "--baseline",
        "model.arch=stl",
    )
    assert main(args) == 0
    first = capsys.readouterr().out
    rows = json.loads((tmp_path / "grid" / "summary.json").read_text())
    assert [r["label"] for r in rows] == ["stl", "hps"]
    # Δm is linear in the metrics: the baseline against its own mean over seeds averages to 0
    assert rows[0]["delta_m"] == pytest.approx(0.0, abs=1e-9)
    assert rows[0]["delta_m_std"] > 0 and rows[1]["parameters"] < rows[0]["parameters"]
    hps_s1 = json.loads((tmp_path / "grid" / "hps" / "seed1" / "results.json").read_text())
    assert hps_s1["baselines"] == str(tmp_path / "grid" / "stl" / "seed1")
    assert "Δm" in first and (tmp_path / "grid" / "summary.md").is_file()
    assert main(args) == 0  # a second call reuses every finished run
    assert capsys.readouterr().out.count("finished run reused") == 4


def test_compare_baseline_must_name_one_combination(tmp_path, capsys):
    args = _compare_args(
        tmp_path,
        {"name": "x"},
        "--vary",
        "model.arch=stl,hps",
        "--vary",
        "balancer.name=fixed,rlw",
        "--baseline",
        "model.arch=stl",
    )
    assert main(args) == 2
    assert "--baseline 'model.arch=stl' matches 2 combinations" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_baseline_outside_the_grid_is_one_more_run(small_cfg, tmp_path, capsys):
    import json

    args = _compare_args(
        tmp_path,
        _baseline_ready(small_cfg),
        "--vary",
        "balancer.name=fixed,rlw",
        "--baseline",
        "model.arch=stl",
    )
    assert main(args) == 0
    rows = json.loads((tmp_path / "grid" / "summary.json").read_text())
    assert [r["label"] for r in rows] == ["stl", "fixed", "rlw"]
    assert rows[0]["delta_m"] == pytest.approx(0.0, abs=1e-9)


def test_data_check_names_the_bad_file(tmp_path, capsys):
    root = tmp_path / "nyu"
    for split in ("train", "val"):
        for mod, shape in (
            ("image", (8, 8, 3)),
            ("label", (8, 8)),
            ("depth", (8, 8, 1)),
            ("normal", (8, 8, 3)),
        ):
            d = root / split / mod
            d.mkdir(parents=True)
            a = np.zeros(shape, np.float32)
            if mod == "normal":
                a[..., 2] = 1.0
            np.save(d / "0.npy", a)
    assert main(["data", "check", str(root)]) == 0
    bad = root / "train" / "depth" / "0.npy"
    bad.write_bytes(bad.read_bytes()[:40])
    assert main(["data", "check", str(root)]) == 2
    out = capsys.readouterr().out
    assert str(bad) in out


@pytest.mark.slow
def test_demo_trains_both_runs_prints_the_table_and_reuses_them(scenes_root, tmp_path, capsys):
    args = [
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--epochs",
        "2",
        "--set",
        f"data.root={scenes_root}",
        "--set",
        "data.options={n: 48, size: [32, 48]}",
        "--set",
        "model.backbone.width=8",
        "--set",
        # 8 steps per run: at 0.01 a run's depth can still miss every pixel by 25% (δ1 = 0, and
        # Δm divides by the baseline's δ1); 0.02 leaves a wide margin
        "optim.lr=0.02",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "STL" in out and "HPS" in out and "Δm" in out and "of 11 metrics" in out
    stl, hps = tmp_path / "demo" / "stl" / "seed0", tmp_path / "demo" / "hps" / "seed0"
    import json

    res = json.loads((hps / "results.json").read_text())
    assert res["baselines"] == str(stl) and res["selection"] == "delta_m"
    assert main(args) == 0
    assert capsys.readouterr().out.count("finished run reused") == 2
