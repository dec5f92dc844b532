"""Tests for training/report.py: the JSON paths the SageMaker gate and the local gate read."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training import report
from training.metrics import paired_bootstrap, summarize
from training.report import (
    EVALUATION_FILE,
    LIFT_LOWER_BOUND_PATH,
    NO_CHAMPION_LIFT,
    PRIMARY_METRIC,
    build_report,
    get_path,
    metric_path,
    read_report,
    write_report,
)


def challenger_metrics() -> dict:
    return summarize({"ndcg@5": np.array([0.5, 0.7]), "ndcg@10": np.array([0.6, 0.8, np.nan]),
                      "mrr": np.array([1.0, 0.5]), "map": np.array([np.nan, np.nan])})


def make_report(with_champion: bool) -> dict:
    comparison = None
    champion = None
    if with_champion:
        champion = summarize({"ndcg@10": np.array([0.55, 0.6, 0.5])})
        lift = paired_bootstrap(np.array([0.6, 0.8, 0.7, 0.9]), np.array([0.5, 0.6, 0.7, 0.6]), seed=0)
        comparison = {"metric": PRIMARY_METRIC, **lift}
    return build_report(challenger_metrics(), per_segment={"search": challenger_metrics()},
                        baselines={"legacy": {"ndcg@10": {"value": 0.4}}}, champion=champion,
                        comparison=comparison, info={"model": "m-1", "lists": 3})


def test_metric_path_brackets_non_identifier_keys() -> None:
    assert metric_path("ndcg@10") == "ranking_metrics['ndcg@10'].value"
    assert metric_path() == "ranking_metrics['ndcg@10'].value"
    assert metric_path("mrr") == "ranking_metrics.mrr.value"
    assert metric_path("ndcg_10") == "ranking_metrics.ndcg_10.value"
    assert LIFT_LOWER_BOUND_PATH == "comparison.ci_low"
    assert report.LOGGED_ORDER_LIFT_PATH == "logged_order_comparison.ci_low"
    for unreadable in ("ndcg.10", "it's", "a]b"):
        with pytest.raises(ValueError, match="cannot be a JsonGet path step"):
            metric_path(unreadable)


@pytest.mark.parametrize("with_champion", [False, True])
def test_paths_resolve_as_sagemaker_json_get_resolves_them(with_champion) -> None:
    """The SDK's local pipeline runner evaluates JsonGet with ``get_using_dot_notation`` (the service's JsonPath
    reading): every gate path must give the same value there as in the local gate. A JMESPath-quoted key
    (``"ndcg@10"``) resolved locally but not there, so every pipeline run failed at the QualityGate step."""
    from sagemaker.core.local.utils import get_using_dot_notation

    from pipelines import gate

    rep = json.loads(json.dumps(make_report(with_champion), allow_nan=True))
    for check in gate.CHECKS:
        assert get_using_dot_notation(rep, check.path) == get_path(rep, check.path), check.path
    with pytest.raises(ValueError):
        get_using_dot_notation(rep, 'ranking_metrics."ndcg@10".value')  # the old spelling


def test_get_path_refuses_what_json_get_would_not_read() -> None:
    rep = make_report(with_champion=False)
    for bad in ('ranking_metrics."ndcg@10".value', ".ranking_metrics", "ranking_metrics..mrr", "['ranking_metrics']",
                "ranking_metrics['ndcg@10'", ""):
        with pytest.raises(ValueError, match="not a path"):
            get_path(rep, bad)


def test_build_report_without_champion() -> None:
    rep = make_report(with_champion=False)
    assert get_path(rep, metric_path("ndcg@10")) == pytest.approx(0.7)  # mean of 0.6, 0.8 (NaN excluded)
    assert get_path(rep, metric_path("mrr")) == pytest.approx(0.75)
    assert get_path(rep, LIFT_LOWER_BOUND_PATH) == NO_CHAMPION_LIFT
    assert rep["comparison"]["metric"] == PRIMARY_METRIC
    assert rep["comparison"]["mean_diff"] is None
    # No logged-order comparison given (LETOR has no positions): its check's path resolves to a pass.
    assert get_path(rep, report.LOGGED_ORDER_LIFT_PATH) == report.NO_LOGGED_ORDER_LIFT
    assert rep["logged_order_comparison"]["mean_diff"] is None
    assert rep["champion"] is None
    assert rep["model"] == "m-1" and rep["lists"] == 3
    assert get_path(rep, "per_segment.search['ndcg@5'].value") == pytest.approx(0.6)
    assert get_path(rep, "baselines.legacy['ndcg@10'].value") == 0.4


def test_build_report_with_champion() -> None:
    rep = make_report(with_champion=True)
    # diffs 0.1, 0.2, 0.0, 0.3 -> mean 0.15
    assert rep["comparison"]["mean_diff"] == pytest.approx(0.15)
    ci_low = get_path(rep, LIFT_LOWER_BOUND_PATH)
    assert ci_low == rep["comparison"]["ci_low"]
    assert ci_low != NO_CHAMPION_LIFT
    assert 0.0 <= ci_low <= 0.15
    assert get_path(rep, "champion['ndcg@10'].value") == pytest.approx(0.55)


def test_get_path_missing_key() -> None:
    rep = make_report(with_champion=False)
    with pytest.raises(KeyError, match="ndcg@3"):
        get_path(rep, metric_path("ndcg@3"))
    with pytest.raises(KeyError):
        get_path(rep, "ranking_metrics.mrr.value.deeper")  # value is a float, not a dict


def test_write_report_nan_becomes_null(tmp_path) -> None:
    rep = make_report(with_champion=False)
    assert math.isnan(rep["ranking_metrics"]["map"]["value"])
    rep["curve"] = [1.0, float("nan"), {"x": float("nan")}]
    path = write_report(rep, tmp_path / "out")
    assert path == tmp_path / "out" / EVALUATION_FILE
    text = path.read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    back = read_report(tmp_path / "out")
    assert back == read_report(path)
    assert back["ranking_metrics"]["map"]["value"] is None
    assert back["ranking_metrics"]["map"]["lists"] == 0
    assert back["curve"] == [1.0, None, {"x": None}]
    assert get_path(back, metric_path()) == pytest.approx(0.7)
    assert get_path(back, LIFT_LOWER_BOUND_PATH) == NO_CHAMPION_LIFT
    # The in-memory report is left untouched.
    assert math.isnan(rep["ranking_metrics"]["map"]["value"])


def test_primary_metric_is_reported() -> None:
    assert PRIMARY_METRIC in challenger_metrics()
    assert report.EVALUATION_FILE == "evaluation.json"
