"""`mtlcv report`: self-contained HTML for a run and a grid, its figures, and a real browser."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import _chromium
from mtlcv.analysis.plots import metric_ranks, pareto_front, task_weights
from mtlcv.cli import main

ARTIFACTS = Path(__file__).resolve().parent / ".artifacts"


@pytest.fixture(scope="module")
def grid(scenes_root, tmp_path_factory) -> Path:
    """A finished two-variant grid (STL baseline, hard sharing with logged gradients)."""
    root = tmp_path_factory.mktemp("report")
    cfg = {
        "name": "rep",
        "tasks": ["semseg", "depth", "normals"],
        "data": {"name": "scenes", "root": scenes_root, "batch_size": 4,
                 "options": {"n": 48, "size": [32, 48], "seed": 0}},
        "model": {"backbone": {"name": "tiny", "width": 8}, "head": {"name": "light"}},
        "optim": {"lr": 1e-2},
        "balancer": {"name": "dwa"},
        "train": {"epochs": 3, "max_steps": 4, "progress": False, "log_gradients_every": 2},
        "grid": {"vary": {"model.arch": ["stl", "hps"]}, "baseline": "model.arch=stl"},
    }
    (root / "grid.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["compare", "--config", str(root / "grid.yaml"), "--out", str(root / "g")]) == 0
    return root / "g"


def _images(page: Path) -> list[bytes]:
    text = page.read_text()
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def _self_contained(page: Path) -> None:
    text = page.read_text()
    assert "<script" not in text.lower()  # plain HTML and CSS
    # nothing is fetched: every src is a data URI, and no URL points off the page
    assert re.findall(r'src="(?!data:image/png;base64,)', text) == []
    assert not re.search(r"(https?:)?//[a-z]", re.sub(r"data:[^\"]+", "", text))
    pngs = sorted(page.parent.glob("*.png"))
    embedded = _images(page)
    assert len(embedded) == len(pngs) > 0
    assert sorted(embedded) == sorted(p.read_bytes() for p in pngs)  # the same figures beside it
    for data in embedded:
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.width > 100 and im.height > 100


def test_run_report(grid, tmp_path, capsys):
    run = grid / "hps" / "seed0"
    # (the predictions on val images are drawn by the grid report below)
    assert main(["report", str(run), "--out", str(tmp_path / "rep"), "--no-qualitative"]) == 0
    page = tmp_path / "rep" / "index.html"
    assert str(page) in capsys.readouterr().out
    _self_contained(page)
    names = {p.stem for p in page.parent.glob("*.png")}
    assert names == {"curves", "delta_m", "task_weights", "gradient_conflict", "task_affinity"}
    text = page.read_text()
    res = json.loads((run / "results.json").read_text())
    # one table row per test metric, with its value as results.json has it
    rows = re.findall(r"<tr><td>(\w+) ([\w.]+) [↑↓]</td><td>([^<]+)</td>", text)
    assert len(rows) == sum(len(ms) for ms in res["test"].values()) == 11
    for task, metric, value in rows:
        assert float(value) == pytest.approx(res["test"][task][metric], rel=1e-3)
    assert f"{res['delta_m']['test']:+.2f}%" in text


def test_grid_report_and_its_table(grid, capsys):
    assert main(["report", str(grid)]) == 0
    page = grid / "report" / "index.html"
    _self_contained(page)
    names = {p.stem for p in page.parent.glob("*.png")}
    assert {"pareto", "ranks", "curves", "delta_m", "task_weights", "gradient_conflict",
            "task_affinity", "qualitative"} <= names
    text = page.read_text()
    summary = json.loads((grid / "summary.json").read_text())
    body = text.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    labels = re.findall(r"<tr><td>([^<]+)</td>", body)
    assert labels == [r["label"] for r in summary] == ["stl", "hps"]
    # what compare wrote to summary.md, cell for cell
    md = (grid / "summary.md").read_text().splitlines()[2:]
    for line, label in zip(md, labels):
        cells = [c.strip() for c in line.strip("|").split("|")]
        row = body.split(f"<tr><td>{label}</td>", 1)[1].split("</tr>", 1)[0]
        assert re.findall(r"<td[^>]*>([^<]*)</td>", row) == cells[1:]


def test_report_errors_are_one_line(grid, tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    assert main(["report", str(grid), "--out", str(tmp_path / "r"), "--no-qualitative",
                 "--pareto", "semseg.miou,depth.nope"]) == 2
    err = capsys.readouterr().err
    assert "'depth.nope' is not a metric" in err and "depth.abs_err" in err
    assert main(["report", str(grid), "--out", str(tmp_path / "r"), "--variants", "mtan"]) == 2
    assert "mtan not in the grid" in capsys.readouterr().err


def test_pareto_front_follows_metric_directions():
    pts = np.array([[50.0, 0.5], [40.0, 0.4], [45.0, 0.6], [50.0, 0.5], [30.0, 0.45]])
    # miou higher is better, abs_err lower is better: [45, 0.6] and [30, 0.45] are dominated
    assert pareto_front(pts, (True, False)).tolist() == [True, True, False, True, False]
    # both higher is better: [45, 0.6] is now on the front, [40, 0.4] is not
    assert pareto_front(pts, (True, True)).tolist() == [True, False, True, True, False]


def test_ranks_average_ties_and_follow_directions():
    rows = [{"label": "a", "test": {"t": {"acc": 90.0, "err": 1.0}}},
            {"label": "b", "test": {"t": {"acc": 80.0, "err": 1.0}}},
            {"label": "c", "test": {"t": {"acc": 95.0, "err": 3.0}}}]
    names, R = metric_ranks(rows, {"t": {"acc": True, "err": False}})
    assert names == ["t acc", "t err"]
    assert R.tolist() == [[2.0, 1.5], [3.0, 1.5], [1.0, 3.0]]


def test_task_weights_come_from_the_balancer_logs():
    hist = [{"balancer": {"w0": 1.0, "w1": 2.0, "other": 5.0}},
            {"balancer": {"w0": 0.5, "w1": 1.5}}]
    assert task_weights(hist, ["a", "b"]).tolist() == [[1.0, 2.0], [0.5, 1.5]]
    assert task_weights([{"balancer": {}}], ["a", "b"]) is None


@pytest.mark.skipif(_chromium.missing() is not None, reason=str(_chromium.missing()))
def test_report_in_headless_chromium(grid):
    """Every figure loads (naturalWidth > 0), the table is there, the console has no error."""
    page = grid / "report" / "index.html"
    if not page.is_file():
        assert main(["report", str(grid)]) == 0
    ARTIFACTS.mkdir(exist_ok=True)
    with _chromium.Chromium() as browser:
        browser.open(page.resolve().as_uri())
        assert browser.run("return document.readyState") == "complete"
        images = browser.run("return Array.from(document.images).map("
                             "i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
        assert len(images) == len(list(page.parent.glob("*.png")))
        for complete, width, height, alt in images:
            assert complete and width > 0 and height > 0, alt
        assert browser.run("return document.querySelectorAll('table tbody tr').length") == 2
        assert browser.run("return document.querySelector('h1').textContent").startswith(
            "mtlcv report")
        errors = [e for e in browser.console() if e.get("level") == "SEVERE"]
        assert errors == []
        shot = browser.screenshot(ARTIFACTS / "report-screenshot.png")
    with Image.open(shot) as im:
        assert im.width >= 800 and im.height > 1000  # the whole page, not just the viewport
    # a broken page fails the same checks: the test can fail
    bad = grid.parent / "bad.html"
    bad.write_text('<img src="missing.png" alt="x"><script>console.error("boom")</script>')
    with _chromium.Chromium() as browser:
        browser.open(bad.resolve().as_uri())
        assert browser.run("return document.images[0].naturalWidth") == 0
        assert any("boom" in e["message"] for e in browser.console() if e["level"] == "SEVERE")


def test_seed_noise_verdicts():
    from mtlcv.analysis.report import GridData, RunData, noise_rows, t95

    assert t95(2) == 4.303 and t95(12) == 2.228 and t95(100) == 1.96

    def run(miou):
        return RunData(Path("."), {}, [], {"test": {"s": {"miou": miou}}}, [])

    grid = GridData(Path("."), ["stl", "good", "noisy"], {}, "stl", {
        "stl": {0: run(40.0), 1: run(40.0), 2: run(40.0)},
        "good": {0: run(44.0), 1: run(44.4), 2: run(43.6)},  # Δm -10 % ± 1 %
        "noisy": {0: run(48.0), 1: run(36.0), 2: run(41.0)},
    })
    rows = [{"label": k, "delta_m": 0.0} for k in grid.labels]
    got = {r[0]: r[-1] for r in noise_rows(rows, grid, {"s": {"miou": True}})}
    assert got == {"good": "better than the baseline", "noisy": "within seed noise"}
