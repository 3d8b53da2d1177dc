"""Named published baselines: exact values, metric names the tasks know, and the Δm that the
literature computes against them."""

from __future__ import annotations

import pytest

from mtlcv.analysis.baselines import BASELINES, get_baseline
from mtlcv.analysis.delta_m import delta_m
from mtlcv.errors import ConfigError
from mtlcv.tasks import create


def test_segnet_stl_values_are_the_published_ones():
    b = get_baseline("nyuv2-segnet-stl")
    assert b == {
        "semseg": {"miou": 38.30, "pixel_acc": 63.76},
        "depth": {"abs_err": 0.6754, "rel_err": 0.2780},
        "normals": {"mean": 25.01, "median": 19.21, "within_11.25": 30.14,
                    "within_22.5": 57.20, "within_30": 69.15},
    }  # fmt: skip


def test_every_baseline_uses_metric_names_of_its_tasks():
    for name, tasks in BASELINES.items():
        for task, metrics in tasks.items():
            known = create(task, **({"num_classes": 13} if task == "semseg" else {}))
            assert set(metrics) <= set(known.higher_is_better), (name, task)


def test_get_baseline_returns_a_copy():
    get_baseline("nyuv2-segnet-stl")["semseg"]["miou"] = 0.0
    assert get_baseline("nyuv2-segnet-stl")["semseg"]["miou"] == 38.30


def test_unknown_baseline_lists_the_valid_names():
    with pytest.raises(ConfigError, match=r"unknown baseline 'nyuv2-segnet'.*nyuv2-segnet-stl"):
        get_baseline("nyuv2-segnet")


def test_delta_m_of_published_nash_mtl_row_against_it_is_the_published_value():
    """Nash-MTL (Navon et al., ICML 2022) reports Δm = −4.04 % on NYUv2 against this STL row."""
    nash = {
        "semseg": {"miou": 40.13, "pixel_acc": 65.93},
        "depth": {"abs_err": 0.5261, "rel_err": 0.2171},
        "normals": {"mean": 25.26, "median": 20.08, "within_11.25": 28.40,
                    "within_22.5": 55.47, "within_30": 68.15},
    }  # fmt: skip
    hib = {t: create(t, **({"num_classes": 13} if t == "semseg" else {})).higher_is_better
           for t in nash}  # fmt: skip
    assert delta_m(nash, get_baseline("nyuv2-segnet-stl"), hib) == pytest.approx(-4.04, abs=0.02)
