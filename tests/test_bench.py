"""The balancing benchmark (mtlcv.bench.balancing): structure of its result, no timing claims."""

from __future__ import annotations

import json
import math

import pytest
import torch
from rich.console import Console

from mtlcv.bench import balancing as bench
from mtlcv.errors import ConfigError
from mtlcv.registry import BALANCERS


@pytest.fixture(scope="module")
def quick() -> dict:
    return bench.run(quick=True, steps=1, warmup=0, progress=False, device="cpu")


def test_every_method_appears_on_every_config_with_finite_positive_ratios(quick):
    json.dumps(quick)  # JSON-able as it is
    assert set(quick["configs"]) == set(bench.QUICK_CONFIGS)
    assert set(quick["methods"]) == set(BALANCERS.names())
    for name, entry in quick["methods"].items():
        assert entry["family"] in ("weighting", "aggregation"), name
        assert entry["mode"] in ("param", "rep", "layer", "-"), name
        assert set(entry["results"]) == set(quick["configs"])
        for cfg, r in entry["results"].items():
            assert r["error"] is None, (name, cfg, r["error"])
            for key in ("time_ratio", "mem_ratio", "time_s", "peak_bytes"):
                assert math.isfinite(r[key]) and r[key] > 0, (name, cfg, key)
            assert r["mem_ok"] == (r["mem_ratio"] <= bench.MEMORY_TARGET)
            if r["time_target"] is not None:
                assert r["time_ok"] == (r["time_ratio"] <= r["time_target"])
    for cfg, c in quick["configs"].items():
        assert c["num_tasks"] == int(cfg.rsplit("T", 1)[1])
        # weights, Adam's two moments (alive between steps) and the gradients, all float32
        assert c["ew_peak_bytes"] >= 16 * c["params"]
    # equal weighting measured against itself: the same peak memory, to the byte
    for r in quick["methods"]["fixed"]["results"].values():
        assert r["mem_ratio"] == 1.0


def test_gradient_modes_follow_the_methods(quick):
    modes = {n: e["mode"] for n, e in quick["methods"].items()}
    assert modes["mgda-ub"] == modes["graddrop"] == "rep"
    assert modes["mgda"] == modes["pcgrad"] == modes["upgrad"] == "param"
    assert modes["fixed"] == modes["dwa"] == "-" and modes["gradnorm"] == "layer"


def test_table_has_a_row_per_method_and_a_column_per_config(quick):
    table = bench.format_table(quick)
    assert table.row_count == len(quick["methods"])
    headers = [c.header for c in table.columns]
    assert all(c in headers for c in quick["configs"])
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert all(name in text for name in quick["methods"])


def test_targets():
    r18 = bench.CONFIGS["resnet18-96x128-T10"]
    tiny = bench.CONFIGS["tiny-64x80-T3"]
    assert bench.time_target("param", r18) == pytest.approx(1 + 0.6 * 9)
    assert bench.time_target("param", tiny) is None  # only ResNet-18 has a param target
    assert bench.time_target("rep", tiny) == bench.time_target("-", r18) == 1.2


def test_peak_memory_of_a_known_allocation_pattern():
    def fn():
        a = torch.ones(250_000)  # 1 MB
        b = torch.ones(500_000)  # 2 MB, both alive: the peak
        del a
        c = torch.ones(100_000)
        return float(b[0] + c[0])

    peak = bench.peak_step_bytes(fn, torch.device("cpu"))
    assert 3_000_000 <= peak < 3_100_000


def test_ten_tasks_have_distinct_names_and_cycle_through_the_kinds():
    tasks = bench.make_tasks(10)
    assert len(tasks) == 10 and list(tasks)[:4] == ["semseg", "depth", "normals", "semseg2"]
    assert all(t.name == n for n, t in tasks.items())
    batch = bench.make_batch(tasks, 2, (8, 10), torch.device("cpu"))
    for name, task in tasks.items():
        task.check_target(batch[name], batch["image"])


def test_bad_names_are_config_errors():
    with pytest.raises(ConfigError, match="nosuch"):
        bench.run(["nosuch"], quick=True, progress=False)
    with pytest.raises(ConfigError, match="resnet18-96x128-T3"):
        bench.run(["fixed"], configs=["resnet18-96x128-T3"], quick=True, progress=False)


def test_main_prints_json(capsys):
    code = bench.main(["--quick", "--json", "--methods", "mgda-ub", "--steps", "1",
                       "--warmup", "0", "--configs", "tiny-64x80-T3"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert set(out["methods"]) == {"fixed", "mgda-ub"}


@pytest.mark.parametrize("T", [3])
def test_the_fast_paths_timed_here_give_the_exact_updates(T):
    """The benchmark times the Gramian-only path (G never formed) and DB-MTL's row folding on a
    residual network; both must leave the update computed from the explicit G."""
    from mtlcv import balancing
    from mtlcv.balancing.jacobian import encoder_segments, split_parameters
    from mtlcv.models.build import build_model

    torch.manual_seed(0)
    tasks = bench.make_tasks(T)
    model = build_model("hps", tasks, {"name": "resnet18"}, {"name": "light"}).double()
    batch = {k: v.double() if v.is_floating_point() else v
             for k, v in bench.make_batch(tasks, 2, (64, 64), torch.device("cpu")).items()}

    def losses():
        preds = model(batch["image"])
        return torch.stack([t.loss(preds[n], batch[n]) for n, t in tasks.items()])

    shared, _ = split_parameters(model)
    L = losses()
    # residual blocks give cuts, and every shared parameter lies in exactly one segment
    segments = encoder_segments(model.representation, shared)
    assert len(segments) >= 10
    assert sorted(id(p) for ps, _ in segments for p in ps) == sorted(id(p) for p in shared)
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        L[t], shared, retain_graph=True)]) for t in range(T)])
    for name in ["mgda", "upgrad", "dbmtl"]:
        b = balancing.create(name, num_tasks=T).double()
        ref = balancing.create(name, num_tasks=T).double()
        model.zero_grad(set_to_none=True)
        b.backward(losses(), model)
        got = torch.cat([p.grad.flatten() for p in shared])
        scale = ref.loss_scale(L.detach())  # DB-MTL: gradients of log L
        want = ref.aggregate(G if scale is None else scale[:, None] * G, L.detach())
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
