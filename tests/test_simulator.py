"""Tests for marketrank/simulator.py: determinism, schema, position bias, feedback cascade, legacy policy."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pandas.api import types as ptypes

from marketrank import simulator
from marketrank.simulator import SIZE_PRESETS, SimConfig, simulate, write_tables

TINY = SIZE_PRESETS["tiny"]
#: Half the traffic in the result-randomised bucket, enough requests for stable per-position rates.
EXPLORE = dataclasses.replace(TINY, requests=3_000, randomized_share=0.5)
TABLES = ("users", "items", "requests", "impressions", "interactions")


@pytest.fixture(scope="module")
def tiny() -> dict[str, pd.DataFrame]:
    return simulate(TINY)


@pytest.fixture(scope="module")
def explore() -> dict[str, pd.DataFrame]:
    return simulate(EXPLORE)


def labelled_impressions(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Impressions with their request's policy and a 0/1 click column."""
    imp = tables["impressions"].merge(tables["requests"][["request_id", "policy"]], on="request_id",
                                      validate="many_to_one")
    clicks = tables["interactions"].loc[tables["interactions"]["event"] == "click", ["request_id", "item_id"]]
    clicks = clicks.drop_duplicates().assign(clicked=1)
    imp = imp.merge(clicks, on=["request_id", "item_id"], how="left", validate="one_to_one")
    imp["clicked"] = imp["clicked"].fillna(0).astype(int)
    return imp


# ---------------------------------------------------------------- latent taste


def test_taste_is_what_the_simulation_drew(tiny: dict[str, pd.DataFrame]) -> None:
    taste = simulator.taste(TINY)
    items = tiny["items"]
    assert np.array_equal(taste.price, items["price"].to_numpy())
    assert np.array_equal(np.array(simulator.STYLES)[taste.item_style], items["style"].to_numpy())
    impressions = tiny["impressions"].merge(tiny["requests"][["request_id", "user_id"]], on="request_id")
    users = simulator.Taste.index(impressions["user_id"].to_numpy())
    shown = simulator.Taste.index(impressions["item_id"].to_numpy())
    parts = taste.parts(users, shown)
    assert parts.shape == (len(impressions), len(simulator.Taste.PARTS))
    truth = impressions["true_score"].to_numpy()
    # The latent terms are a large share of the true utility; another seed's taste is unrelated to it.
    other = simulator.taste(dataclasses.replace(TINY, seed=TINY.seed + 1)).parts(users, shown)
    assert np.corrcoef(parts.sum(axis=1), truth)[0, 1] > 0.4
    assert abs(np.corrcoef(other.sum(axis=1), truth)[0, 1]) < 0.15
    # Each term carries the weight simulate gives it: least squares puts ~1 on each (the rest is other terms).
    coefficients, *_ = np.linalg.lstsq(np.column_stack([parts, np.ones(len(truth))]), truth, rcond=None)
    assert np.all(np.abs(coefficients[:4] - 1.0) < 0.3), coefficients


def test_taste_index_reads_the_simulators_ids() -> None:
    assert simulator.Taste.index(np.array(["u000042", "i0000007"])).tolist() == [42, 7]


# ---------------------------------------------------------------- determinism


def test_same_seed_gives_identical_tables(tiny: dict[str, pd.DataFrame]) -> None:
    again = simulate(TINY)
    assert set(again) == set(TABLES)
    for name in TABLES:
        pd.testing.assert_frame_equal(tiny[name], again[name], obj=name)


def test_different_seed_gives_different_tables(tiny: dict[str, pd.DataFrame]) -> None:
    other = simulate(dataclasses.replace(TINY, seed=TINY.seed + 1))
    for name in ("users", "items", "impressions", "interactions"):
        assert not tiny[name].equals(other[name]), name
    # Not just a relabelling: the true scores themselves differ.
    assert not np.array_equal(tiny["impressions"]["true_score"].to_numpy()[:100],
                              other["impressions"]["true_score"].to_numpy()[:100])


def test_progress_callback_reaches_total() -> None:
    config = SimConfig(users=20, items=100, requests=30, days=3, seed=1)
    seen: list[tuple[int, int]] = []
    simulate(config, progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (1, 30)
    assert seen[-1] == (30, 30)


# ---------------------------------------------------------------- schema


def test_table_columns_and_sizes(tiny: dict[str, pd.DataFrame]) -> None:
    # Dimension tables: the columns the feature job relies on (more may be added).
    users = {"user_id", "country", "size", "signup_ts", "fav_styles", "fav_brands"}
    assert users <= set(tiny["users"].columns)
    assert {"item_id", "title", "category", "brand", "brand_tier", "style", "size", "condition", "price",
            "listed_ts", "seller_id", "seller_rating", "seller_sales", "seller_country", "views",
            "likes"} <= set(tiny["items"].columns)
    # Log tables: exact schema, in order.
    assert list(tiny["requests"].columns) == ["request_id", "user_id", "ts", "surface", "query", "policy"]
    assert list(tiny["impressions"].columns) == [
        "request_id", "item_id", "position", "relevance", "true_score"]
    assert list(tiny["interactions"].columns) == ["request_id", "user_id", "item_id", "ts", "event"]
    assert len(tiny["users"]) == TINY.users
    assert len(tiny["items"]) == TINY.items
    assert len(tiny["requests"]) == TINY.requests
    assert tiny["users"]["user_id"].is_unique
    assert tiny["items"]["item_id"].is_unique
    assert tiny["requests"]["request_id"].is_unique


def test_dtypes(tiny: dict[str, pd.DataFrame]) -> None:
    imp = tiny["impressions"]
    assert imp["position"].dtype == np.int32
    assert imp["relevance"].dtype == np.int32
    assert imp["true_score"].dtype == np.float64
    for table, column in (("users", "signup_ts"), ("items", "listed_ts"), ("requests", "ts"),
                          ("interactions", "ts")):
        dtype = tiny[table][column].dtype
        assert isinstance(dtype, pd.DatetimeTZDtype), (table, column, dtype)
        assert str(dtype.tz) == "UTC"
    for table, column in (("requests", "request_id"), ("requests", "user_id"), ("requests", "policy"),
                          ("impressions", "request_id"), ("impressions", "item_id"),
                          ("interactions", "event"), ("items", "category")):
        assert ptypes.is_string_dtype(tiny[table][column]), (table, column)
    assert ptypes.is_float_dtype(tiny["items"]["price"])
    assert ptypes.is_integer_dtype(tiny["items"]["views"])
    assert all(isinstance(v, list) for v in tiny["users"]["fav_styles"])
    assert all(isinstance(v, list) and 1 <= len(v) <= 5 for v in tiny["users"]["fav_brands"])


def test_categorical_values(tiny: dict[str, pd.DataFrame]) -> None:
    req, items = tiny["requests"], tiny["items"]
    assert set(req["policy"]) <= {"legacy", "random"}
    assert set(req["surface"]) <= {"search", "feed"}
    # Feed requests have no query; search requests always do.
    assert req.loc[req["surface"] == "feed", "query"].isna().all()
    assert req.loc[req["surface"] == "search", "query"].notna().all()
    assert set(items["category"]) <= set(simulator.CATEGORIES)
    assert set(items["condition"]) <= set(simulator.CONDITIONS)
    assert set(tiny["interactions"]["event"]) == set(simulator.EVENTS)
    assert (items["price"] > 0).all()
    assert items["seller_rating"].between(1.0, 5.0).all()
    assert (items["likes"] <= items["views"]).all()


def test_list_lengths_and_contiguous_positions(tiny: dict[str, pd.DataFrame]) -> None:
    imp = tiny["impressions"]
    # Every request has impressions, 20..60 of them.
    assert set(imp["request_id"]) == set(tiny["requests"]["request_id"])
    sizes = imp.groupby("request_id").size()
    assert sizes.between(20, 60).all(), sizes.describe()
    # Positions are exactly 0..n-1 in each request, with no repeated item.
    for request_id, group in imp.groupby("request_id", sort=False):
        assert np.array_equal(np.sort(group["position"].to_numpy()), np.arange(len(group))), request_id
    assert not imp.duplicated(["request_id", "item_id"]).any()


def test_relevance_grades(tiny: dict[str, pd.DataFrame]) -> None:
    relevance = tiny["impressions"]["relevance"]
    assert relevance.between(0, 4).all()
    assert set(relevance.unique()) == {0, 1, 2, 3, 4}
    # Grades are global quantiles of true_score: a higher grade never scores below a lower grade's max.
    by_grade = tiny["impressions"].groupby("relevance")["true_score"].agg(["min", "max"])
    assert (by_grade["min"].to_numpy()[1:] >= by_grade["max"].to_numpy()[:-1] - 1e-5).all()
    # ~55% irrelevant by construction.
    assert (relevance == 0).mean() == pytest.approx(0.55, abs=0.02)


def test_references_are_consistent(tiny: dict[str, pd.DataFrame]) -> None:
    imp, inter, req = tiny["impressions"], tiny["interactions"], tiny["requests"]
    assert set(imp["item_id"]) <= set(tiny["items"]["item_id"])
    assert set(req["user_id"]) <= set(tiny["users"]["user_id"])
    # Every interaction refers to an impression of its own request.
    joined = inter.merge(imp[["request_id", "item_id"]], on=["request_id", "item_id"], how="left",
                         indicator=True)
    assert len(inter) > 0
    assert (joined["_merge"] == "both").all()
    # ... carries the request's user, and happens after the request.
    with_req = inter.merge(req[["request_id", "user_id", "ts"]], on="request_id", suffixes=("", "_req"))
    assert len(with_req) == len(inter)
    assert (with_req["user_id"] == with_req["user_id_req"]).all()
    assert (with_req["ts"] > with_req["ts_req"]).all()
    # Interactions are sorted by time.
    assert inter["ts"].is_monotonic_increasing


def test_shown_items_were_listed_before_the_request(tiny: dict[str, pd.DataFrame]) -> None:
    imp = tiny["impressions"].merge(tiny["requests"][["request_id", "ts"]], on="request_id")
    imp = imp.merge(tiny["items"][["item_id", "listed_ts"]], on="item_id")
    assert (imp["listed_ts"] <= imp["ts"]).all()


# ---------------------------------------------------------------- feedback


def test_feedback_cascade(tiny: dict[str, pd.DataFrame]) -> None:
    inter = tiny["interactions"]
    keys = ["request_id", "item_id"]
    # At most one event of each kind per impression.
    assert not inter.duplicated([*keys, "event"]).any()
    by_event = {e: set(map(tuple, inter.loc[inter["event"] == e, keys].to_numpy())) for e in simulator.EVENTS}
    assert all(by_event[e] for e in simulator.EVENTS)
    # like / add_to_bag / purchase only on a clicked impression; purchase only after add_to_bag.
    for event in ("like", "add_to_bag", "purchase"):
        assert by_event[event] <= by_event["click"], event
    assert by_event["purchase"] <= by_event["add_to_bag"]
    # Deeper events come later than the click on the same impression.
    wide = inter.pivot_table(index=keys, columns="event", values="ts", aggfunc="min")
    for event in ("like", "add_to_bag", "purchase"):
        present = wide[event].notna()
        assert (wide.loc[present, event] > wide.loc[present, "click"]).all(), event


def test_clicks_are_more_likely_on_relevant_items(explore: dict[str, pd.DataFrame]) -> None:
    imp = labelled_impressions(explore)
    rate = imp.groupby("relevance")["clicked"].mean()
    assert rate.loc[4] > 3 * rate.loc[0]
    assert rate.is_monotonic_increasing


# ---------------------------------------------------------------- position bias


def test_randomised_bucket_share(explore: dict[str, pd.DataFrame]) -> None:
    share = (explore["requests"]["policy"] == "random").mean()
    assert share == pytest.approx(EXPLORE.randomized_share, abs=0.05)
    assert (simulate(TINY)["requests"]["policy"] == "random").mean() < 0.15


def test_position_bias_in_randomised_requests(explore: dict[str, pd.DataFrame]) -> None:
    imp = labelled_impressions(explore)
    rnd = imp[(imp["policy"] == "random") & (imp["position"] < 20)]  # every list has >= 20 items
    ctr = rnd.groupby("position")["clicked"].mean()
    top, low = ctr.loc[0:2].mean(), ctr.loc[12:19].mean()
    # Examination (1+p)^-0.8 is 1..0.59 over 0..2 and 0.12..0.09 over 12..19: a ~5x gap; require 2.5x.
    assert top > 2.5 * low, (top, low)
    assert ctr.loc[0] == ctr.max()


def test_relevance_is_position_independent_in_randomised_requests(explore: dict[str, pd.DataFrame]) -> None:
    imp = labelled_impressions(explore)
    rnd = imp[(imp["policy"] == "random") & (imp["position"] < 20)]
    rel = rnd.groupby("position")["relevance"].mean()
    top, low = rel.loc[0:2].mean(), rel.loc[12:19].mean()
    # Grade std ~1.1 over ~1500 lists: SE of the difference ~0.03. The CTR gap above is not relevance.
    assert abs(top - low) < 0.12, (top, low)
    assert abs(rel.loc[0] - rel.mean()) < 0.15


def test_legacy_order_is_worse_than_oracle(explore: dict[str, pd.DataFrame]) -> None:
    imp = labelled_impressions(explore)
    legacy = imp[imp["policy"] == "legacy"]
    shown_top5 = legacy[legacy["position"] < 5].groupby("request_id")["relevance"].mean()
    oracle_top5 = (legacy.sort_values(["request_id", "true_score"], ascending=[True, False])
                   .groupby("request_id").head(5).groupby("request_id")["relevance"].mean())
    assert len(shown_top5) == len(oracle_top5) > 1000
    oracle_top5 = oracle_top5.loc[shown_top5.index]
    assert (oracle_top5 >= shown_top5).all()  # the oracle is the best possible top-5
    assert oracle_top5.mean() > shown_top5.mean() + 1.0, (oracle_top5.mean(), shown_top5.mean())


# ---------------------------------------------------------------- write_tables


def test_write_tables_round_trip(tiny: dict[str, pd.DataFrame], tmp_path) -> None:
    paths = write_tables(tiny, tmp_path / "raw")
    assert set(paths) == set(TABLES)
    for name in TABLES:
        assert paths[name] == tmp_path / "raw" / name / "part-0.parquet"
        assert paths[name].is_file()
        back = pd.read_parquet(paths[name])
        pd.testing.assert_frame_equal(back, tiny[name], obj=name)
    back_users = pd.read_parquet(paths["users"])
    assert [list(v) for v in back_users["fav_brands"]] == list(tiny["users"]["fav_brands"])


def test_a_preset_dataset_is_simulated_again_when_its_preset_changes(tmp_path, monkeypatch):
    """A cache named ``<size>-seed<seed>`` holds what the preset gives today: logs recorded with another config
    are simulated again and their features dropped (the feature job is not this test's subject)."""
    from pipelines import local

    built = []
    monkeypatch.setattr(local, "ensure_features", lambda raw, features: built.append(raw))
    root = tmp_path / "tiny-seed3"
    config = local.ensure_simulated(root, "tiny", 3)
    raw = root / "raw"
    assert config == dataclasses.asdict(dataclasses.replace(SIZE_PRESETS["tiny"], seed=3))
    assert json.loads((raw / simulator.CONFIG_FILE).read_text()) == config and built == [raw]
    requests = raw / "requests" / "part-0.parquet"
    written = requests.stat().st_mtime_ns
    assert local.ensure_simulated(root, "tiny", 3) == config and requests.stat().st_mtime_ns == written  # reused

    (root / "features").mkdir()
    (root / "features" / "stats.json").write_text("{}")
    monkeypatch.setitem(SIZE_PRESETS, "tiny", dataclasses.replace(SIZE_PRESETS["tiny"], requests=300))
    assert local.ensure_simulated(root, "tiny", 3)["requests"] == 300
    assert pq.ParquetFile(requests).metadata.num_rows == 300 and not (root / "features").exists()
    (raw / simulator.CONFIG_FILE).unlink()  # logs that do not say where they came from: kept aside, not deleted
    (root / "features").mkdir()
    local.ensure_simulated(root, "tiny", 3)
    assert json.loads((raw / simulator.CONFIG_FILE).read_text())["requests"] == 300
    [aside] = root.glob("raw.unrecorded-*")
    assert pq.ParquetFile(aside / "requests" / "part-0.parquet").metadata.num_rows == 300
    assert not (root / "features").exists()  # features of the moved logs are not this preset's
