"""Benchmarks (benchmarks/): metric arithmetic, LambdaMART on the session's tiny run, report rendering."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from benchmarks import common, datasets, quality, rankers, report, suite, throughput
from marketrank import simulator
from training.hparams import HParams

LETOR_SAMPLE = Path(__file__).parent / "data" / "letor-sample"
FAST_LAMBDAMART = rankers.LambdaMartParams(max_rounds=60, early_stopping_rounds=10, min_data_in_leaf=5)


# ---------------------------------------------------------------- arithmetic


def test_kendall_tau():
    assert common.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert common.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert common.kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 concordant pairs, 1 discordant
    with pytest.raises(ValueError, match="equal-length"):
        common.kendall_tau([1, 2], [1])


def test_gap_closed():
    assert common.gap_closed(naive=0.6, debiased=0.8, oracle=1.0) == pytest.approx(0.5)
    assert common.gap_closed(naive=0.6, debiased=0.5, oracle=1.0) == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="no gap"):
        common.gap_closed(naive=1.0, debiased=1.0, oracle=1.0)


def test_time_to_quality_on_a_hand_made_curve():
    seconds = [10.0, 20.0, 30.0, 40.0]
    # 99% of 0.9 is 0.891: 0.89 at 30 s is not enough, 0.9 at 40 s is
    assert throughput.time_to_quality(seconds, [0.5, 0.85, 0.89, 0.9])["seconds"] == 40.0
    # measured against the exported (best) epoch, the first point above 99% of it counts, even if it dips later
    hit = throughput.time_to_quality(seconds, [0.5, 0.895, 0.8, 0.7], final=0.9)
    assert (hit["seconds"], hit["epoch"], hit["target"]) == (20.0, 2, pytest.approx(0.891))
    assert throughput.time_to_quality(seconds, [0.1, 0.2, 0.3, 0.4], final=0.9)["seconds"] is None
    with pytest.raises(ValueError):
        throughput.time_to_quality([1.0], [0.5, 0.6])


def test_bootstrap_ci_brackets_the_mean_and_skips_undefined_lists():
    values = np.array([0.2, 0.4, np.nan, 0.6, 0.8] * 20)
    ci = common.bootstrap_ci(values, resamples=200)
    assert ci["lists"] == 80 and ci["value"] == pytest.approx(0.5)
    assert ci["ci_low"] < 0.5 < ci["ci_high"] and ci["ci_high"] - ci["ci_low"] < 0.2
    constant = common.bootstrap_ci(np.ones(10))
    assert constant["ci_low"] == constant["ci_high"] == 1.0


# ---------------------------------------------------------------- on the session's tiny run


@pytest.fixture(scope="module")
def tiny(tiny_run) -> datasets.Dataset:
    config = json.loads((tiny_run["features"].parent / "raw" / simulator.CONFIG_FILE).read_text())
    return datasets.from_features(tiny_run["features"], "tiny", simulator=config)


@pytest.mark.slow
def test_oracle_is_perfect_and_lambdamart_beats_random_order(tiny):
    score, info = rankers.train_lambdamart(tiny, FAST_LAMBDAMART)
    rng = np.random.default_rng(0)
    scorers = {**quality.baselines(tiny), "lambdamart": score,
               "random": lambda b: rng.random(b["mask"].shape)}
    per_list = quality.evaluate_rankers(tiny, scorers, "test")["per_list"]
    ndcg = {name: float(np.nanmean(m["ndcg@10"])) for name, m in per_list.items()}
    assert ndcg["oracle"] == pytest.approx(1.0)  # the oracle sorts by the utility the grades come from
    assert ndcg["lambdamart"] > ndcg["random"] + 0.1, ndcg
    assert info["best_iteration"] >= 1 and info["train_items"] == tiny.sizes["train"]["items"]


@pytest.mark.slow
@pytest.mark.slow
def test_rankers_are_also_scored_on_raw_and_weighted_clicks(tiny):
    """With a position-bias estimate, each ranker's click NDCG@10 comes raw and weighted (the evaluation's pooled
    metric); the weighted one must take away the logging order's advantage on its own clicks."""
    from training import metrics
    from training.propensity import propensity_weights

    assert "clicks" not in quality.evaluate_rankers(tiny, quality.baselines(tiny), "test")  # tiny: no estimate
    with_eta = dataclasses.replace(tiny, spec=dataclasses.replace(tiny.spec, propensity_eta=0.8))
    clicks = quality.evaluate_rankers(with_eta, quality.baselines(with_eta), "test")["clicks"]
    gained = ideal = 0.0
    for batch in with_eta.batches("test")():
        mask = batch["mask"]
        dcg, best = metrics.dcg(-batch["position"].astype(np.float64), np.where(mask, batch["label"], -1.0), 10,
                                propensity_weights(batch["position"], 0.8, mask))
        gained, ideal = gained + dcg.sum(), ideal + best.sum()
    assert clicks["legacy"]["weighted"] == pytest.approx(gained / ideal)
    raw_gap = clicks["oracle"]["raw"] - clicks["legacy"]["raw"]
    assert clicks["oracle"]["weighted"] - clicks["legacy"]["weighted"] > raw_gap + 0.1, clicks
    result = {"propensity_eta": 0.8, "rankers": {n: {"overall": {"ndcg@10": {"value": v}}}
                                                 for n, v in (("legacy", 0.3), ("oracle", 1.0))}}
    agreement = quality.click_metric_agreement(result, clicks)
    assert agreement["rankers"] == 2 and agreement["kendall_tau_weighted"] == 1.0


def test_ipw_lambdamart_weights_clicked_items_only_and_position_debiasing_trains(tiny):
    from training import metrics
    from training.propensity import propensity_weights

    eta = 0.8  # the tiny log is too small for the feature job's estimate
    x, group, label, weight, position = rankers._matrices(tiny, "train", eta)
    clicked = label > 0
    assert (weight[~clicked] == 1.0).all()  # LightGBM scales each item's gradient: IPW belongs to the clicks
    expected = propensity_weights(position[clicked].astype(np.float64), eta, np.ones(clicked.sum(), bool))
    np.testing.assert_allclose(weight[clicked], expected, rtol=1e-6)
    assert weight[clicked].max() > 1.0 and position.shape == label.shape and group.sum() == label.size
    score, info = rankers.train_lambdamart(tiny, dataclasses.replace(FAST_LAMBDAMART, position_debiasing=True))
    assert info["best_iteration"] >= 1 and info["ipw_eta"] == 0.0
    assert info["early_stopping"] == "validation ndcg@10 of the logged label"  # no estimate to weight with
    assert np.isfinite(score(next(tiny.batches("test")()))[next(tiny.batches("test")())["mask"]]).all()
    with_eta = dataclasses.replace(tiny, spec=dataclasses.replace(tiny.spec, propensity_eta=eta))
    for params in ({"ipw": True}, {"position_debiasing": True}):  # both de-biased variants stop on de-biased NDCG
        score, info = rankers.train_lambdamart(with_eta, dataclasses.replace(FAST_LAMBDAMART, **params))
        assert info["early_stopping"] == "validation ipw_ndcg@10 of the logged label", params
        gained = ideal = 0.0  # the kept iteration's validation score is the weighted NDCG the evaluation computes
        for batch in with_eta.batches("valid")():
            mask = batch["mask"]
            dcg, best = metrics.dcg(score(batch), np.where(mask, batch["label"], -1.0), 10,
                                    propensity_weights(batch["position"], eta, mask))
            gained, ideal = gained + dcg.sum(), ideal + best.sum()
        assert info["valid_ndcg@10_logged"] == pytest.approx(gained / ideal, rel=1e-6), params


def test_lambdamart_early_stopping_metric_is_the_evaluations_weighted_ndcg():
    """The feval's flat LightGBM rows must give exactly what ``training.evaluate`` reports on padded lists."""
    from training import metrics
    from training.propensity import propensity_weights

    rng = np.random.default_rng(5)
    group = np.array([3, 7, 1, 12, 5])
    label = (rng.random(group.sum()) < 0.3) * rng.integers(1, 5, group.sum())
    position = np.concatenate([rng.permutation(n) for n in group])
    predictions = rng.normal(size=group.sum())
    _, value, higher_is_better = rankers.ipw_ndcg_at_10(group, label, position, 0.8)(predictions, None)
    padded = np.full((len(group), group.max()), -1.0)
    scores, slots = np.zeros_like(padded), np.zeros_like(padded)
    for row, (start, n) in enumerate(zip(np.cumsum(group) - group, group, strict=True)):
        padded[row, :n], scores[row, :n], slots[row, :n] = (label[start:start + n], predictions[start:start + n],
                                                             position[start:start + n])
    weights = propensity_weights(slots, 0.8, padded >= 0)
    expected = np.nanmean(metrics.pooled(metrics.per_list_metrics(scores, padded, weights))["ndcg@10"])
    assert higher_is_better and value == pytest.approx(expected, rel=1e-12)
    assert 0.0 < value < 1.0


@pytest.mark.slow
def test_taste_columns_line_up_with_each_items_row(tiny):
    names, columns = rankers.taste_columns(tiny)
    assert names == list(simulator.Taste.PARTS)
    batch = next(tiny.batches("test")())
    mask = batch["mask"]
    parts = columns(batch)
    x, _ = datasets.item_matrix(batch, tiny.spec)
    assert parts.shape == (x.shape[0], len(names))
    truth = np.asarray(batch[tiny.spec.oracle_score])[mask]
    # The latent terms are a large share of each item's true utility; shifted one row, they are not.
    assert np.corrcoef(parts.sum(axis=1), truth)[0, 1] > 0.4
    assert abs(np.corrcoef(np.roll(parts.sum(axis=1), 1), truth)[0, 1]) < 0.2
    other = dataclasses.replace(tiny, simulator={**tiny.simulator, "seed": tiny.simulator["seed"] + 1})
    with pytest.raises(ValueError, match="replayed items differ from the logged ones"):
        rankers.taste_columns(other)[1](batch)


def test_item_matrix_broadcasts_context_and_codes_strings(tiny):
    batch = next(tiny.batches("test")())
    x, group = datasets.item_matrix(batch, tiny.spec)
    names, categorical = datasets.feature_columns(tiny.spec)
    assert x.shape == (int(batch["mask"].sum()), len(names)) and group.sum() == x.shape[0]
    surface = names.index("surface")
    assert surface in categorical
    vocabulary = tiny.spec["surface"].vocabulary
    expected = [vocabulary.index(s) + 1 for s in np.repeat(batch["surface"], batch["mask"].sum(axis=1))]
    assert x[:, surface].tolist() == expected


@pytest.mark.slow
def test_throughput_curve_is_on_true_relevance_and_timed_without_it(tiny, tmp_path):
    size = throughput.measure_size(tiny, tmp_path, HParams(epochs=2, patience=5))
    curve, epochs = size["curve"], size["epochs_run"]
    assert curve["label"] == "relevance" and len(curve["val_ndcg_10"]) == len(curve["seconds"]) == epochs == 2
    assert 0 < curve["seconds"][0] < curve["seconds"][1] == pytest.approx(size["train_seconds"])
    assert all(0 < v <= 1 for v in curve["val_ndcg_10"]) and curve["val_ndcg_10"] != curve["val_ndcg_10_logged"]
    assert size["lists_per_second"] == pytest.approx(tiny.train_lists * epochs / size["train_seconds"])
    assert size["time_to_quality"]["seconds"] in curve["seconds"]
    pipe = size["input_pipeline"]
    rounds = pipe["round_seconds"]
    assert pipe["rounds"] == throughput.PIPELINE_ROUNDS
    assert all(len(rounds[name]) == pipe["rounds"] for name in ("streaming", "in_memory", "cached"))
    assert pipe["cached_step_ms"] == pytest.approx(1000 * min(rounds["cached"]) / pipe["steps"])
    for name in ("streaming", "in_memory"):  # each round's time against the same round's cached time
        paired = [t / c for t, c in zip(rounds[name], rounds["cached"], strict=True)]
        assert pipe[name]["paired_ratios"] == pytest.approx(paired)
        assert pipe[name]["ratio"] == pytest.approx(statistics.median(paired))
        assert pipe[name]["ratio_ci"] == pytest.approx(sorted(paired)[9:22:12])  # 10th and 22nd of 31: ~97%
    memory = pipe["in_memory"]
    assert memory["epochs"] == epochs and memory["load_seconds"] > 0
    assert memory["epoch_steps"] == -(-tiny.train_lists // 64) >= pipe["steps"]
    load_share = memory["load_seconds"] / (epochs * memory["epoch_steps"] * statistics.median(rounds["cached"])
                                           / pipe["steps"])
    assert memory["ratio_with_load"] == pytest.approx(memory["ratio"] + load_share)
    assert pipe["train_uses"] == "in_memory" and pipe["ratio"] == memory["ratio_with_load"]
    low, high = pipe["ratio_ci"]
    assert pipe["met"] == (True if high <= 1.1 else False if low > 1.1 else None)
    assert pipe["cached_spread"] >= 0


@pytest.mark.slow
def test_ensemble_epochs_are_timed_on_one_clock(tiny, tmp_path, monkeypatch):
    """An ensemble's members fit one after another: each epoch's seconds count the earlier members' fits and
    its own, not the time between fits (here a 0.5 s pause before the second member)."""
    import time

    from training import train as training

    fits: list[float] = []

    def timed_fit(*args, **kwargs):
        if fits:
            time.sleep(0.5)
        history, seconds = real_fit(*args, **kwargs)
        fits.append(seconds)
        return history, seconds

    real_fit = training._fit
    monkeypatch.setattr(training, "_fit", timed_fit)
    _, info = rankers.train_tfranking(tiny, HParams(epochs=2, patience=5, ensemble=2), tmp_path)
    seconds = [epoch["seconds"] for epoch in info["epochs"]]
    assert [epoch["epoch"] for epoch in info["epochs"]] == [1, 2, 3, 4] and info["epochs_run"] == 4
    assert 0 < seconds[0] < seconds[1] == pytest.approx(fits[0])  # the first member's fit ends at its own time
    assert fits[0] < seconds[2] < seconds[3] == pytest.approx(fits[0] + fits[1]) == pytest.approx(
        info["train_seconds"])
    assert len(info["member_best_epochs"]) == 2 and 0 < info["validation"]["val_ndcg_10"] <= 1


def test_best_models_are_chosen_on_validation_not_test():
    def ranker(kind: str, valid: float, test: float) -> dict:
        return {"kind": kind, "valid_ndcg@10": valid, "overall": {"ndcg@10": {"value": test}}}

    result = {"rankers": {"tfr-dnn-softmax": ranker("tf-ranking", 0.80, 0.90),  # best on test, not on validation
                          "tfr-din-softmax": ranker("tf-ranking", 0.85, 0.70),
                          "lambdamart": ranker("lambdamart", 0.60, 0.80),
                          "lambdamart-ipw": ranker("lambdamart", 0.70, 0.60), "oracle": ranker("oracle", 1, 1)}}
    assert quality.best_by_validation(result, "tf-ranking") == "tfr-din-softmax"
    assert quality.best_by_validation(result, "lambdamart") == "lambdamart-ipw"
    assert quality.best_by_validation(result, "reference") is None
    assert [quality._kind(n) for n in ("tfr-dnn-softmax-x3", "lambdamart-position")] == ["tf-ranking", "lambdamart"]


def test_median_interval_is_distribution_free():
    assert throughput.median_ci([5, 1, 4, 2, 3, 9, 8, 7, 6]) == (2, 8, pytest.approx(1 - 2 * 10 / 512))
    assert throughput.median_ci([3, 1, 2, 5, 4]) == (1, 5, pytest.approx(1 - 2 / 32))  # the widest there is
    assert throughput.median_ci(list(range(15))) == (3, 11, pytest.approx(1 - 2 * 576 / 2 ** 15))  # 15 rounds
    assert throughput.median_ci([1.0]) == (1.0, 1.0, 0.0)
    with pytest.raises(ValueError):
        throughput.median_ci([])


def test_pipeline_verdict_says_when_the_interval_spans_the_goal():
    pipe = {"ratio": 1.08, "ratio_ci": [1.02, 1.15], "met": None}
    assert report._pipeline_verdict(pipe) == "1.08x (1.020 to 1.150) **not resolved: the interval spans the goal**"
    assert report._pipeline_verdict({**pipe, "ratio_ci": [1.12, 1.2], "met": False}).endswith("**NOT met**")


@pytest.fixture(scope="module")
def results(tiny, tmp_path_factory) -> Path:
    """A results dir: a real (short) quality run on tiny, plus hand-made throughput and serving results."""
    out = tmp_path_factory.mktemp("results")
    result = quality.run_quality(tiny, out / "work", models=(("dnn", "softmax"),), hparams=HParams(epochs=1),
                                 lambdamart=FAST_LAMBDAMART, resamples=100)
    common.write_result(result, out, "quality-tiny")
    common.write_result(_throughput(), out, "throughput")
    common.write_result(_serving(), out, "serving")
    return out


@pytest.mark.slow
def test_quality_result_has_every_ranker_and_goal(results):
    result = json.loads((results / "quality-tiny.json").read_text())
    # no lambdamart-ipw: the tiny log has no position-bias estimate; LightGBM's own debiasing needs none
    assert set(result["rankers"]) == {"legacy", "oracle", "lambdamart", "lambdamart-position", "tfr-dnn-softmax",
                                      quality.CEILING, quality.TASTE_CEILING}
    for ranker in result["rankers"].values():
        for metric in quality.METRICS:
            stat = ranker["overall"][metric]
            assert stat["ci_low"] <= stat["value"] <= stat["ci_high"]
        assert set(ranker["per_segment"]) == {"feed", "search"}
    goals = result["goals"]
    # the best LambdaMART is chosen on validation among its variants (which one wins on tiny data is the data's)
    valid = {name: result["rankers"][name]["valid_ndcg@10"] for name in ("lambdamart", "lambdamart-position")}
    assert goals["best_tf_ranking"] == "tfr-dnn-softmax" and goals["best_lambdamart"] == max(valid, key=valid.get)
    oracle = result["rankers"]["oracle"]["overall"]["ndcg@10"]["value"]
    best = result["rankers"]["tfr-dnn-softmax"]["overall"]["ndcg@10"]["value"]
    assert goals["oracle_share"]["value"] == pytest.approx(best / oracle)
    assert goals["oracle_share"]["met"] == (best / oracle >= 0.95)
    ceiling = result["rankers"][quality.CEILING]
    assert ceiling["kind"] == "reference" and "relevance" in ceiling["trained_on"]
    value = ceiling["overall"]["ndcg@10"]["value"]
    assert goals["feature_ceiling"] == pytest.approx(
        {"value": value, "oracle_share": value / oracle, "best_tf_ranking_share": best / value})
    lines = suite.summary_lines(result)  # what `marketrank bench quality` prints
    assert f"goal oracle_share: {'met' if goals['oracle_share']['met'] else 'NOT met'}" in lines
    assert any(line.startswith(f"feature ceiling (LambdaMART on true relevance) {value:.4f}") for line in lines)
    # Told each user's latent taste, the same learner gets closer to the oracle than on the features alone.
    taste = result["rankers"][quality.TASTE_CEILING]
    assert taste["kind"] == "reference" and taste["extra_features"] == list(simulator.Taste.PARTS)
    taste_value = taste["overall"]["ndcg@10"]["value"]
    assert taste_value > value
    assert goals["taste_ceiling"]["features"] == list(simulator.Taste.PARTS)
    assert (goals["taste_ceiling"]["value"], goals["taste_ceiling"]["oracle_share"]) == pytest.approx(
        (taste_value, taste_value / oracle))
    assert any(line.startswith(f"taste ceiling (the same with the simulator's latent taste) {taste_value:.4f}")
               for line in lines)


@pytest.mark.slow
def test_report_renders_every_row_from_the_json(results, tmp_path):
    path = report.write_report(results, tmp_path / "BENCHMARKS.md")
    text = path.read_text()
    result = json.loads((results / "quality-tiny.json").read_text())
    for name, ranker in result["rankers"].items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{ranker['overall']['ndcg@10']['value']:.4f}" in row
    rows = {c: next(line for line in text.splitlines() if line.startswith(f"| {c} |")) for c in (50, 300, 1000)}
    # the paced floor, the API's ratio to it, the endpoint alone and the transport floor at the same arrivals
    assert rows[300].endswith("| 1.10 / 2.00 | 8.2x / 15.0x | 3.0 / 7.5 | 2.5 / 6.2 |")
    assert rows[1000].endswith("| 9.0 / 40.0 (2 errors) | n/a |")
    assert rows[50].endswith("| n/a | n/a | n/a | n/a |")  # a result from before the paced floor was measured
    goal = next(line for line in text.splitlines() if line.startswith("| serving p99 <= 10 ms"))
    assert "p99 too high (endpoint alone p99 7.5 ms, transport floor p99 6.2 ms) | **NOT met** |" in goal
    assert "| `small` | 3,500 |" in text and "1.05x (0.980 to 1.080) **met**" in text
    assert "1.50x (1.300 to 1.700) **NOT met**" in text and "in each of 15 rounds" in text
    assert "the cached step time varied across rounds by `tiny` 30%, `small` 2% ((max - min) / median)" in text
    for plot in ("quality-tiny.png", "throughput_scaling.png", "time_to_quality.png"):
        assert f"/{plot})" in text and (results / plot).exists()
    assert "serving_latency.png" not in text  # the serving benchmark draws it; linked only once it exists
    (results / "serving_latency.png").write_bytes((results / "quality-tiny.png").read_bytes())
    assert "/serving_latency.png)" in report.write_report(results, tmp_path / "BENCHMARKS.md").read_text()
    assert result["machine"]["versions"]["lightgbm"] in text
    taste = result["goals"]["taste_ceiling"]
    assert "- Taste ceiling: `reference-taste` is the same LambdaMART given, besides the features" in text
    assert f"It reaches {taste['value']:.4f} = {taste['oracle_share']:.1%} of the oracle" in text
    assert f"taste ceiling {taste['oracle_share']:.1%})" in text  # beside the 95% goal in the goals table

    # a number changed in the JSON is the number in the report: nothing is typed by hand
    changed = copy.deepcopy(result)
    changed["rankers"]["lambdamart"]["overall"]["ndcg@10"]["value"] = 0.123456
    changed["click_metric_agreement"] = {"metric": "ndcg@10", "eta": 0.784, "rankers": 12,
                                         "kendall_tau_raw": -0.5454, "kendall_tau_weighted": 0.9091}
    (results / "quality-tiny.json").write_text(json.dumps(changed))
    serving = _serving()
    serving["results"][1]["latency_ms"]["p99"] = 77.77
    (results / "serving.json").write_text(json.dumps(serving))
    try:
        text = report.write_report(results, tmp_path / "BENCHMARKS.md").read_text()
    finally:
        (results / "quality-tiny.json").write_text(json.dumps(result))
        (results / "serving.json").write_text(json.dumps(_serving()))
    assert "| `lambdamart` | " in text and "0.1235 [" in text
    assert "orders the 12 rankers as `relevance` does with Kendall's tau +0.909; raw click NDCG@10 with -0.545" in text
    assert "| 300 | 9.0 | 20.0 | 77.8 |" in text


def test_report_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no benchmark results"):
        report.write_report(tmp_path, tmp_path / "BENCHMARKS.md")


def test_letor_sample_runs_lambdamart():
    dataset = datasets.letor(LETOR_SAMPLE)
    score, info = rankers.train_lambdamart(dataset, FAST_LAMBDAMART)
    per_list = quality.evaluate_rankers(dataset, {"lambdamart": score}, "test")["per_list"]["lambdamart"]
    assert dataset.spec.eval_label == "label" and not quality.baselines(dataset)
    assert per_list["ndcg@10"].shape == (dataset.sizes["test"]["lists"],)
    assert 0.0 < np.nanmean(per_list["ndcg@10"]) <= 1.0


# ---------------------------------------------------------------- hand-made results of the other benchmarks


def test_report_flags_results_of_an_earlier_preset_and_rates_the_largest_training_time():
    from marketrank.simulator import SIZE_PRESETS
    from training.features import features_fingerprint

    sim = dataclasses.asdict(SIZE_PRESETS["small"])  # what `benchmarks.datasets.marketplace` records
    result = {"dataset": "small", "simulator": sim, "sizes": {"train": {"lists": 10, "items": 400}},
              "features_fingerprint": features_fingerprint()}
    assert report._sizes(result).endswith("train 10 lists / 400 items.")  # nothing to flag
    other_code = {**result, "features_fingerprint": "0123456789abcdef"}
    assert "**Stale:** measured on features from other feature code (fingerprint 0123456789abcdef" in \
        report._sizes(other_code)
    before_record = {k: v for k, v in result.items() if k != "features_fingerprint"}
    assert "**Possibly stale:** the feature code it ran on was not recorded" in report._sizes(before_record)
    both = {**other_code, "simulator": {**sim, "requests": sim["requests"] // 2}}
    assert report._sizes(both).count("Re-run its benchmark") == 1 and "preset: requests" in report._sizes(both)
    earlier = {**result, "simulator": {**sim, "requests": sim["requests"] // 2}}
    assert f"requests {sim['requests'] // 2:,} (now {sim['requests']:,})" in report._sizes(earlier)
    unrecorded = {**result, "simulator": {k: v for k, v in sim.items() if k != "randomized_share"}}
    assert f"randomized_share unrecorded (now {sim['randomized_share']:,})" in report._sizes(unrecorded)

    def large_row(result: dict) -> str:
        return next(line for line in report.goals_section({"throughput": result})
                    if line.startswith("| `large` trains in ~10 min"))

    measured = _throughput()  # tiny and small only
    assert "not measured" in large_row(measured) and large_row(measured).endswith("| n/a |")
    measured["sizes"][1]["dataset"] = "large"  # 3,500 lists in 40 s
    assert "| 0.7 min (3,500 training lists) |" in large_row(measured)
    assert large_row(measured).endswith("| **NOT met** |")
    measured["sizes"][1]["train_seconds"] = 600.0
    assert large_row(measured).endswith("| **met** |")


def _throughput() -> dict:
    def size(name: str, lists: int, seconds: float, ratio: float, ci: tuple[float, float]) -> dict:
        return {"dataset": name, "train_lists": lists, "train_items": lists * 40, "train_seconds": seconds,
                "epochs_run": 6, "best_epoch": 3, "seconds_per_epoch": seconds / 6, "lists_per_second": 6 * lists
                / seconds, "items_per_second": 240 * lists / seconds,
                "curve": {"seconds": [seconds / 6 * i for i in range(1, 7)], "val_ndcg_10": [.5, .6, .7, .7, .7, .7]},
                "time_to_quality": {"seconds": seconds / 2, "epoch": 3, "target": 0.693, "final": 0.7},
                "input_pipeline": {"cached_step_ms": 20.0, "rounds": 15, "streaming": {"step_ms": 30.0, "ratio": 1.5},
                                   "in_memory": {"step_ms": 20.0 * ratio, "ratio": ratio, "load_seconds": 0.5,
                                                 "epochs": 6, "ratio_with_load": ratio},
                                   "train_uses": "in_memory", "ratio": ratio, "ratio_ci": list(ci),
                                   "met": ci[1] <= 1.1, "cached_spread": 0.02 if ratio < 1.1 else 0.3}}

    return {"benchmark": "throughput", "created": "2026-01-01T00:00:00Z", "machine": common.machine(),
            "hparams": {"scorer": "dnn", "loss": "softmax", "batch_size": 64, "epochs": 12, "patience": 3,
                        "early_stopping": "val_loss"},
            "sizes": [size("tiny", 400, 10.0, 1.5, (1.3, 1.7)), size("small", 3500, 40.0, 1.05, (0.98, 1.08))]}


def _serving() -> dict:
    def row(candidates: int, p99: float) -> dict:
        return {"candidates": candidates, "latency_ms": {"p50": 5.0, "p95": 20.0, "p99": p99},
                "throughput_rps": 99.5, "errors": 0, "error_rate": 0.0, "fallbacks": 1, "fallback_rate": 0.001,
                "floor": {"signature_ms": {"p50": 0.5, "p99": 0.9}}, "ratio_to_floor": {"p50": 10.0, "p99": 30.0}}

    return {"benchmark": "serving", "created": "2026-01-01T00:00:00Z",
            "machine": {"cores": 2, "cpu_model": "test", "ram_gib": 1, "platform": "test"},
            "versions": {"python": "3.11"}, "settings": {"rate_rps": 100.0, "seconds": 20.0, "arrivals": "poisson"},
            "target": {"p99_ms": 10.0, "rate_rps": 100.0, "candidates": 300, "met": False, "detail": "p99 too high",
                       "endpoint_alone_p99_ms": 7.5, "transport_floor_p99_ms": 6.2},
            "results": [row(50, 12.0), {**row(300, 30.0), "latency_ms": {"p50": 9.0, "p95": 20.0, "p99": 30.0},
                                        "floor": {"signature_ms": {"p50": 0.5, "p99": 0.9},
                                                  "paced": {"signature_ms": {"p50": 1.1, "p99": 2.0}}},
                                        "ratio_to_paced_floor": {"p50": 8.2, "p99": 15.0},
                                        "endpoint_alone": {"errors": 0, "latency_ms": {"p50": 3.0, "p99": 7.5}},
                                        "transport_floor": {"errors": 0, "latency_ms": {"p50": 2.5, "p99": 6.2}}},
                        {**row(1000, 60.0), "endpoint_alone": {"errors": 2, "latency_ms": {"p50": 9.0, "p99": 40.0}}}]}


def test_cli_bench_report_names_the_missing_results(tmp_path):
    from typer.testing import CliRunner

    from marketrank.cli import app

    result = CliRunner().invoke(app, ["bench", "report", "--results", str(tmp_path), "--report",
                                      str(tmp_path / "B.md")])
    assert result.exit_code == 1 and "no benchmark results" in result.output and str(tmp_path) in result.output
    assert not (tmp_path / "B.md").exists()


def test_models_option_is_validated():
    assert suite.parse_models("all") == quality.TFR_MODELS
    assert suite.parse_models("dnn/softmax, din/approx_ndcg") == (("dnn", "softmax"), ("din", "approx_ndcg"))
    assert suite.parse_models("dnn/softmax/3,dnn/softmax/1") == (("dnn", "softmax", 3), ("dnn", "softmax"))
    assert quality.tfr_name("dnn", "softmax", 3) == "tfr-dnn-softmax-x3"
    assert quality.tfr_name("dnn", "softmax") == "tfr-dnn-softmax"
    with pytest.raises(ValueError, match="whole number"):
        suite.parse_models("dnn/softmax/x3")
    with pytest.raises(ValueError, match="ensemble"):
        suite.parse_models("dnn/softmax/0")
    with pytest.raises(ValueError, match="scorer"):
        suite.parse_models("cnn/softmax")
    with pytest.raises(ValueError, match="scorer/loss"):
        suite.parse_models("dnn")


def test_serving_section_names_features_from_other_or_unrecorded_feature_code(tmp_path):
    from training.features import features_fingerprint

    current = {**_serving(), "workspace": {"features_fingerprint": features_fingerprint()}}
    assert not [line for line in report.serving_section(current, tmp_path) if line.startswith("Features served")]
    unrecorded = report.serving_section(_serving(), tmp_path)  # a result from before the record
    assert any(line.startswith("Features served: the feature code it ran on was not recorded") for line in unrecorded)
    other = {**_serving(), "workspace": {"features_fingerprint": "0123456789abcdef"}}
    assert any("fingerprint 0123456789abcdef" in line for line in report.serving_section(other, tmp_path))


def test_a_throughput_run_keeps_the_published_sizes_it_did_not_measure(tmp_path, monkeypatch):
    # `bench all` re-runs tiny,small,default: the opt-in `large` row (and the goals it carries) must survive it.
    published = _throughput()
    published["sizes"].append({**published["sizes"][1], "dataset": "large", "train_lists": 450_000})
    common.write_result(published, tmp_path, "throughput")
    rerun = _throughput()
    rerun["created"], rerun["sizes"] = "2026-02-02T00:00:00Z", [
        {**rerun["sizes"][0], "created": "2026-02-02T00:00:00Z", "train_seconds": 9.0},
        {**rerun["sizes"][1], "dataset": "default", "train_lists": 21_000, "created": "2026-02-02T00:00:00Z"}]
    monkeypatch.setattr(suite.datasets, "marketplace", lambda size, seed, cache: size)
    monkeypatch.setattr(suite.throughput, "run_throughput", lambda data, work_dir, **kwargs: copy.deepcopy(rerun))
    monkeypatch.setattr(suite, "work_dir", lambda name: tmp_path / name)

    _, result = suite.run_throughput(["tiny", "default"], tmp_path)
    written = json.loads((tmp_path / "throughput.json").read_text())
    assert written == json.loads(json.dumps(result, default=str))
    assert [s["dataset"] for s in written["sizes"]] == ["tiny", "small", "default", "large"]  # by lists
    by_name = {s["dataset"]: s for s in written["sizes"]}
    assert by_name["tiny"]["train_seconds"] == 9.0 and "kept" not in by_name["tiny"]  # re-measured: replaced
    assert by_name["large"]["kept"] and by_name["large"]["created"] == published["created"]
    assert by_name["large"]["machine"] == published["machine"]
    text = report.throughput_section(written, tmp_path)
    assert any(line.startswith(f"`large` is from an earlier run (measured {published['created']}")
               for line in text)

    # other hyperparameters: nothing of the old result is kept; an unreadable old file loses no new result
    other = {**copy.deepcopy(rerun), "hparams": {**rerun["hparams"], "batch_size": 128}}
    assert throughput.keep_other_sizes(other, written) == other
    for malformed in ([1, 2], {**written, "sizes": [{"no": "dataset"}]}, {**written, "sizes": None}):
        assert throughput.keep_other_sizes(other if malformed == [1, 2] else rerun, malformed) in (other, rerun)
    another_seed = {**written, "sizes": [{**s, "simulator": {"seed": 8}} for s in written["sizes"]]}
    assert throughput.keep_other_sizes(rerun, another_seed) == rerun  # another seed's data is another series
    (tmp_path / "throughput.json").write_text("{not json")
    _, result = suite.run_throughput(["tiny", "default"], tmp_path)
    assert [s["dataset"] for s in result["sizes"]] == ["tiny", "default"]
