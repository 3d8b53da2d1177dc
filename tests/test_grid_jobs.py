"""`mtlcv compare --jobs N`: runs in parallel processes, same numbers, Ctrl-C and resumption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mtlcv.cli import main
from mtlcv.engine.grid import cpu_cores, grid_section
from mtlcv.errors import ConfigError


def _base(scenes_root: str, epochs: int) -> dict:
    return {
        "name": "jobs",
        "tasks": ["semseg", "depth", "normals"],
        "data": {"name": "scenes", "root": scenes_root, "batch_size": 4,
                 "options": {"n": 48, "size": [32, 48], "seed": 0}},
        "model": {"backbone": {"name": "tiny", "width": 8}, "head": {"name": "light"}},
        "optim": {"lr": 1e-2},
        # one thread everywhere: the parallel runs must give the sequential numbers bit for bit
        "train": {"epochs": epochs, "max_steps": 2, "progress": False, "threads": 1},
        "grid": {"vary": {"model.arch": ["hps"]}, "seeds": [0, 1]},
    }


def _epochs(run: Path) -> list[int]:
    if not (run / "metrics.jsonl").is_file():
        return []
    return [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.skipif(cpu_cores() < 2, reason="--jobs 2 needs two CPU cores")
def test_interrupted_parallel_grid_resumes_to_the_sequential_numbers(scenes_root, tmp_path):
    epochs = 6
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(_base(scenes_root, epochs)))
    par, seq = tmp_path / "par", tmp_path / "seq"
    cmd = [sys.executable, "-m", "mtlcv", "compare", "--config", str(cfg), "--out", str(par),
           "--jobs", "2"]
    # every step of the runs it starts sleeps 0.4 s (tests/fault_hooks): the grid is still
    # training when the signal comes, however busy the machine
    hooks = str(Path(__file__).parent / "fault_hooks")
    env = dict(os.environ, PYTHONUNBUFFERED="1", MTLCV_TEST_STEP_DELAY="0.4",
               PYTHONPATH=os.pathsep.join([hooks, *filter(None, [os.environ.get("PYTHONPATH")])]))
    runs = [par / "hps" / f"seed{s}" for s in (0, 1)]
    with open(tmp_path / "out.txt", "w") as out:
        # its own session, as a terminal's foreground job: Ctrl-C reaches the grid process,
        # which must pass it on to the runs it started
        # SIGINT as in a terminal even when the suite itself runs in the background (a
        # background job starts with SIGINT ignored, and Python keeps an ignored SIGINT)
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 300
        while not (runs[0] / "last.pt").is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "the grid did not start"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=120)
    text = (tmp_path / "out.txt").read_text()
    assert rc == 130, text
    assert "interrupted" in text and "Traceback" not in text
    # both runs were training at once and stopped; what they kept is whole epochs
    assert not any((r / "results.json").is_file() for r in runs)
    resumable = [r for r in runs if (r / "last.pt").is_file()]
    assert runs[0] in resumable  # (seed 1 may not have finished an epoch)
    for run in runs:
        assert "Traceback" not in (run / "train.log").read_text()
    for run in resumable:
        done = _epochs(run)
        assert done == list(range(1, len(done) + 1)) and 1 <= len(done) < epochs
    # the same command resumes them
    assert main(["compare", "--config", str(cfg), "--out", str(par), "--jobs", "2"]) == 0
    for run in runs:
        assert ("resuming" in (run / "train.log").read_text()) == (run in resumable)
        assert _epochs(run) == list(range(1, epochs + 1))
    # and the numbers are those of an uninterrupted sequential grid
    assert main(["compare", "--config", str(cfg), "--out", str(seq)]) == 0
    for seed in (0, 1):
        a = json.loads((par / "hps" / f"seed{seed}" / "results.json").read_text())
        b = json.loads((seq / "hps" / f"seed{seed}" / "results.json").read_text())
        assert a["test"] == b["test"] and a["val"] == b["val"], seed


def _fake_grid(tmp_path, monkeypatch, baseline):
    """Run a 3 x 3 grid with --jobs 4 through stand-in processes; return (start/end log, vs)."""
    from mtlcv.engine import grid

    clock = {"t": 0}
    log: list[tuple[str, str, int]] = []

    class Proc:
        def __init__(self, job, length):
            self.job, self.end = job, clock["t"] + length

        def poll(self):
            if clock["t"] < self.end:
                return None
            self.job.run.mkdir(parents=True, exist_ok=True)
            (self.job.run / "results.json").write_text(json.dumps({"test": {}}))
            log.append(("end", self.job.name, clock["t"]))
            return 0

    def start(job, threads, tmp, env):
        log.append(("start", job.name, clock["t"]))
        length = 3 + 2 * job.seed if job.variant.label == "stl" else 1 + job.seed
        return Proc(job, length), open(os.devnull, "w"), 0.0

    def tick(_seconds):
        clock["t"] += 1

    monkeypatch.setattr(grid, "cpu_cores", lambda: 8)
    monkeypatch.setattr(grid, "_start", start)
    monkeypatch.setattr(grid.time, "sleep", tick)
    archs = ["stl", "hps", "mtan"] if baseline else ["hps", "mtan", "padnet"]
    vs, _ = grid.run_grid({"name": "x"}, [("model.arch", archs)], [0, 1, 2], tmp_path,
                          baseline="model.arch=stl" if baseline else None, jobs=4,
                          log=lambda s: None)
    assert all(len(v.runs) == 3 for v in vs)
    assert sum(kind == "start" for kind, _, _ in log) == 9
    return log


def _most_at_once(log) -> int:
    running, most = 0, 0
    for kind, _name, _t in sorted(log, key=lambda e: (e[2], e[0] == "start")):
        running += 1 if kind == "start" else -1
        most = max(most, running)
    return most


def test_parallel_runs_wait_for_their_baseline_and_respect_the_job_limit(tmp_path, monkeypatch):
    """The scheduler alone, with stand-in processes: at most N at once (and N when there is
    work for N), and a run starts only once its seed's baseline run has finished."""
    log = _fake_grid(tmp_path / "a", monkeypatch, baseline=False)
    assert _most_at_once(log) == 4
    log = _fake_grid(tmp_path / "b", monkeypatch, baseline=True)
    assert _most_at_once(log) <= 4
    ends = {name: t for kind, name, t in log if kind == "end"}
    for kind, name, t in log:
        if kind == "start" and not name.startswith("stl"):
            assert t >= ends[f"stl seed {name.split()[-1]}"], name


@pytest.mark.skipif(cpu_cores() < 2, reason="--jobs 2 needs two CPU cores")
def test_a_failing_run_is_named_and_the_others_finish(scenes_root, tmp_path, capsys):
    base = _base(scenes_root, 1)
    # a valid config (checked before any run starts) whose run fails while training: with a
    # learning rate of 1e30 Adam's first step makes the weights huge and the next loss infinite
    base["grid"] = {"vary": {"optim.lr": [0.001, 1e30]}}
    base["train"]["max_steps"] = 3
    cfg = tmp_path / "grid.yaml"
    cfg.write_text(yaml.safe_dump(base))
    out = tmp_path / "g"
    assert main(["compare", "--config", str(cfg), "--out", str(out), "--jobs", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 runs failed: 1e_30 seed 0: epoch 1 step" in err
    assert "non-finite loss" in err and str(out / "1e_30" / "seed0" / "train.log") in err
    assert (out / "0.001" / "seed0" / "results.json").is_file()


def test_jobs_beyond_the_cores_is_a_one_line_error(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x"}))
    n = cpu_cores() + 1
    assert main(["compare", "--config", str(cfg), "--out", str(tmp_path / "g"), "--jobs",
                 str(n)]) == 2
    assert f"--jobs {n}: only {cpu_cores()} CPU core" in capsys.readouterr().err


def test_grid_section_is_checked():
    assert grid_section(None) == {"vary": [], "seeds": [0], "baseline": None}
    got = grid_section({"vary": {"data.options.size": [[48, 64]], "optim.lr": [0.1, 1e-3]},
                        "seeds": [0, 1, 2], "baseline": "optim.lr=0.1"})
    assert got["vary"] == [("data.options.size", ["[48, 64]"]), ("optim.lr", ["0.1", "0.001"])]
    for bad, words in (({"vary": ["model.arch"]}, "grid'.vary: expected a mapping"),
                       ({"seeds": ["a"]}, "seeds: expected a list of integers"),
                       ({"baseline": "stl"}, "baseline: expected KEY=VALUE"),
                       ({"jobs": 2}, "unknown key 'jobs'")):
        with pytest.raises(ConfigError, match=words):
            grid_section(bad, "f.yaml")


def test_train_on_a_grid_config_says_to_use_compare(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"name": "x", "grid": {"seeds": [0]}}))
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "mtlcv compare" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["scenes/seed_experiment.yaml", "nyuv2/seed_experiment.yaml"])
def test_seed_experiment_plans_every_architecture_with_every_balancer(name, tmp_path):
    from mtlcv.config import read_yaml
    from mtlcv.engine.experiment import build_balancer, build_model
    from mtlcv.engine.grid import plan_grid
    from mtlcv.tasks import create

    path = Path(__file__).resolve().parents[1] / "configs" / name
    data = read_yaml(path)
    grid = grid_section(data.pop("grid"), path)
    vs, base_v, jobs = plan_grid(data, grid["vary"], grid["seeds"], tmp_path, grid["baseline"],
                                 check=False)  # no NYUv2 data here; built below for scenes
    assert base_v is vs[0] and base_v.label == "stl" and len(grid["seeds"]) >= 3
    pairs = {(j.cfg.model.arch, j.cfg.balancer.name) for j in jobs[len(grid["seeds"]):]}
    assert pairs == {(a, b) for a in ("hps", "cross_stitch", "sps", "mtan", "padnet")
                     for b in ("fixed", "uncertainty", "dwa", "gradnorm", "dtp", "graddrop")}
    assert len(jobs) == 31 * len(grid["seeds"])
    if data["data"]["name"] != "scenes":
        return  # the same architectures and balancers: building them once is enough
    tasks = {t: create(t) for t in data["tasks"]}
    for job in jobs[:: len(grid["seeds"])]:  # every variant builds (on a small backbone)
        job.cfg.model.backbone["width"] = 8
        model = build_model(job.cfg, tasks)
        build_balancer(job.cfg)
        assert set(model(torch.rand(1, 3, 32, 32))) == set(data["tasks"])
