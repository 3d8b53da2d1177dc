"""Δm in both conventions (hand-computed values and signs) and mean-rank properties."""

from __future__ import annotations

import numpy as np
import pytest

from mtlcv.analysis import delta_m, delta_m_higher_is_better, delta_m_per_task, mean_rank
from mtlcv.errors import ConfigError

HIB = {
    "semseg": {"miou": True, "pixel_acc": True},
    "depth": {"abs_err": False, "rel_err": False},
    "normals": {"mean": False},
}
BASE = {
    "semseg": {"miou": 40.0, "pixel_acc": 60.0},
    "depth": {"abs_err": 0.50, "rel_err": 0.20},
    "normals": {"mean": 25.0},
}
RES = {
    "semseg": {"miou": 44.0, "pixel_acc": 57.0},  # +10 % (better), −5 % (worse)
    "depth": {"abs_err": 0.45, "rel_err": 0.23},  # −10 % (better), +15 % (worse)
    "normals": {"mean": 20.0},  # −20 % (better)
}


def test_hand_computed_both_conventions():
    # signed terms, positive = worse: miou −0.10, pixel_acc +0.05, abs −0.10, rel +0.15, mean −0.20
    assert delta_m(RES, BASE, HIB) == pytest.approx(100 * (-0.10 + 0.05 - 0.10 + 0.15 - 0.20) / 5)
    per_task = {"semseg": 100 * (-0.10 + 0.05) / 2, "depth": 100 * 0.05 / 2, "normals": -20.0}
    assert delta_m_per_task(RES, BASE, HIB) == pytest.approx(per_task)
    # (b): per task first, then over tasks, positive = better
    want_b = -(per_task["semseg"] + per_task["depth"] + per_task["normals"]) / 3
    assert delta_m(RES, BASE, HIB, per_task_first=True) == pytest.approx(want_b)
    assert want_b == pytest.approx(100 * (0.025 - 0.025 + 0.20) / 3)


def test_identical_results_give_zero():
    assert delta_m(BASE, BASE, HIB) == 0
    assert delta_m(BASE, BASE, HIB, per_task_first=True) == 0


@pytest.mark.parametrize("seed", range(5))
def test_sign_when_better_on_every_metric(seed):
    rng = np.random.default_rng(seed)
    better = {
        t: {m: v * (1 + rng.uniform(0.01, 0.5)) ** (1 if HIB[t][m] else -1) for m, v in ms.items()}
        for t, ms in BASE.items()
    }
    assert delta_m(better, BASE, HIB) < 0  # (a): lower is better
    assert delta_m(better, BASE, HIB, per_task_first=True) > 0  # (b): higher is better
    assert delta_m(BASE, better, HIB) > 0 and delta_m(BASE, better, HIB, per_task_first=True) < 0
    assert not delta_m_higher_is_better() and delta_m_higher_is_better(per_task_first=True)


def test_one_metric_per_task_conventions_are_opposite():
    hib = {"a": {"x": True}, "b": {"y": False}}
    base, res = {"a": {"x": 2.0}, "b": {"y": 3.0}}, {"a": {"x": 2.5}, "b": {"y": 4.0}}
    assert delta_m(res, base, hib) == pytest.approx(-delta_m(res, base, hib, per_task_first=True))


def test_subset_of_tasks_and_extra_baselines_are_fine():
    res = {"normals": {"mean": 30.0}}
    assert delta_m(res, BASE, HIB) == pytest.approx(20.0)


def test_errors_name_task_and_metric():
    with pytest.raises(ConfigError, match="'depth'.*'rmse'"):
        delta_m({"depth": {"rmse": 1.0}}, BASE, {"depth": {"rmse": False}})
    with pytest.raises(ConfigError, match="'edges'"):
        delta_m({"edges": {"fscore": 50.0}}, BASE, HIB)
    zero = {**BASE, "normals": {"mean": 0.0}}
    with pytest.raises(ConfigError, match="'normals'.*'mean'.*0"):
        delta_m(RES, zero, HIB)
    with pytest.raises(ConfigError, match="'semseg'.*'miou'"):
        delta_m(RES, BASE, {**HIB, "semseg": {"pixel_acc": True}})


def test_mean_rank_by_hand_with_ties():
    hib = {"s": {"miou": True}, "d": {"abs_err": False}}
    entries = [
        {"s": {"miou": 40.0}, "d": {"abs_err": 0.5}},  # miou rank 2.5, abs rank 1
        {"s": {"miou": 42.0}, "d": {"abs_err": 0.6}},  # miou rank 1,   abs rank 2
        {"s": {"miou": 40.0}, "d": {"abs_err": 0.7}},  # miou rank 2.5, abs rank 3
    ]
    assert mean_rank(entries, hib) == pytest.approx([1.75, 1.5, 2.75])
    assert mean_rank([], hib) == []


@pytest.mark.parametrize("seed", range(5))
def test_mean_rank_properties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    # few distinct values so that ties happen
    entries = [
        {t: {m: float(rng.integers(0, 4)) for m in ms} for t, ms in HIB.items()} for _ in range(n)
    ]
    ranks = np.array(mean_rank(entries, HIB))
    assert ranks.mean() == pytest.approx((n + 1) / 2)  # tie-averaged ranks sum to n(n+1)/2
    assert ((1 <= ranks) & (ranks <= n)).all()
    perm = rng.permutation(n)
    assert mean_rank([entries[i] for i in perm], HIB) == pytest.approx(ranks[perm].tolist())
    flipped = {t: {m: not b for m, b in ms.items()} for t, ms in HIB.items()}
    assert np.array(mean_rank(entries, flipped)) == pytest.approx(n + 1 - ranks)
    # an entry strictly better than all others on every metric ranks first on every metric
    best = {t: {m: (10.0 if HIB[t][m] else -10.0) for m in ms} for t, ms in HIB.items()}
    assert mean_rank([*entries, best], HIB)[-1] == 1.0


def test_mean_rank_rejects_inconsistent_entries():
    with pytest.raises(ConfigError, match="entry 1"):
        mean_rank([{"s": {"miou": 1.0}}, {"s": {"pixel_acc": 1.0}}], {"s": {"miou": True}})


def test_docstring_example_runs():
    import doctest
    import sys

    # the package re-exports the function under the module's name, so fetch the module itself
    mod = sys.modules["mtlcv.analysis.delta_m"]
    assert doctest.testmod(mod).attempted >= 2 and doctest.testmod(mod).failed == 0


def test_on_baseline_metrics_keeps_exactly_the_published_metrics():
    from mtlcv.analysis import on_baseline_metrics
    from mtlcv.analysis.baselines import get_baseline

    base = get_baseline("nyuv2-segnet-stl")
    results = {t: {m: v * 1.1 for m, v in ms.items()} for t, ms in base.items()}
    results["depth"].update(rmse=0.9, delta1=55.0)  # computed by mtlcv, absent from the paper
    kept = on_baseline_metrics(results, base)
    assert {t: set(ms) for t, ms in kept.items()} == {t: set(ms) for t, ms in base.items()}
    assert kept["depth"]["abs_err"] == results["depth"]["abs_err"]
