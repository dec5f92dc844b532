"""Tests for training/feature_job.py: the Spark job from raw logs to listwise Parquet and a feature spec.

One SparkSession is shared by the whole module (``spark_fixtures.spark``). Two datasets are used:

* a tiny simulated marketplace, end to end (layout, splits, labels, spec, stats, position bias);
* a hand-made log of 10 requests whose point-in-time counters are known exactly, to catch leakage (events at
  or after a request must never count for it) and to check the Spark path computes the same features as
  calling ``assemble_features`` directly (the online path).
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

try:  # tests/ is on sys.path when it has no __init__.py (pytest's rootdir insertion)
    from spark_fixtures import explode_lists, read_split, shard_files, spark  # noqa: F401
except ImportError:  # pragma: no cover - tests/ turned into a package
    from tests.spark_fixtures import explode_lists, read_split, shard_files, spark  # noqa: F401

from marketrank.simulator import EVENT_GRADE, SimConfig, simulate, write_tables
from training import feature_job, features
from training.feature_job import (
    EVENT_GRADES,
    RAW_SCHEMA,
    SPLITS,
    FeatureJobConfig,
    FeatureJobError,
    estimate_position_bias,
    run_feature_job,
)
from training.feature_spec import FLOAT, SPEC_FILE, STRING, FeatureSpec
from training.features import FEATURES, RAW_COLUMNS, assemble_features

pytestmark = pytest.mark.slow

CONFIG = FeatureJobConfig(list_size=64, shuffle_partitions=2)
SIM = SimConfig(users=60, items=150, requests=200, days=6, seed=11, randomized_share=0.5)
ITEM_FEATURES = [f.name for f in FEATURES if f.scope == "item"]
CONTEXT_FEATURES = [f.name for f in FEATURES if f.scope == "context"]
FLOAT_FEATURES = [f.name for f in FEATURES if f.dtype == FLOAT]
STRING_FEATURES = [f.name for f in FEATURES if f.dtype == STRING]


def per_item_columns(truth: bool) -> list[str]:
    return ["item_id", "position", "label", *(["relevance", "true_score"] if truth else []), *ITEM_FEATURES]


def read_items(out_dir: Path, truth: bool) -> pd.DataFrame:
    """Every split of a job's output as one row per (request, item), with a ``split`` column."""
    frames = []
    for split in SPLITS:
        lists = read_split(out_dir / split)
        frames.append(explode_lists(lists, per_item_columns(truth)).assign(split=split))
    return pd.concat(frames, ignore_index=True)


def run(raw: Path | str, out: Path | str, spark, **kwargs) -> dict:
    return run_feature_job(raw, out, CONFIG, spark=spark, **kwargs)


def leftovers(out: Path) -> list[Path]:
    """The output directory and any temporary sibling the job may have left behind."""
    return [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.tmp-")]


# ------------------------------------------------------------------------------------- hand-made raw logs

T0 = 1_760_000_000_000
SEC, HOUR, DAY = 1_000, 3_600_000, 86_400_000
#: percentile_approx(price, 0.5) per category of the hand-made catalogue (coats: 40 60 100, tops: 20 30 50).
MEDIANS = {"coats": 60.0, "tops": 30.0}

ITEM_COLUMNS = ["item_id", "title", "category", "brand", "brand_tier", "style", "size", "condition", "price",
                "photos", "listed_ms", "seller_rating", "seller_sales", "seller_country", "views", "likes"]
ITEMS = {row[0]: dict(zip(ITEM_COLUMNS, row, strict=True)) for row in [
    # views and likes are the catalogue's starting counts
    ("iA", "acme vintage wool coat", "coats", "acme", "premium", "vintage", "M", "very_good", 60.0, 5,
     T0 - 3 * DAY, 4.5, 12, "FR", 5, 2),
    ("iB", "acme boho top", "tops", "acme", "premium", "boho", "S", "good", 20.0, 2,
     T0 - DAY, 4.0, 3, "DE", 0, 0),
    # iC's style and iD's brand are spelt as a catalogue might: they are iA's style and iC's brand all the same
    ("iC", "zeta vintage coat", "coats", "zeta", "budget", " Vintage", "L", "new_with_tags", 40.0, 8,
     T0 - 5 * DAY, 3.8, 40, "IT", 10, 1),
    ("iD", "zeta classic trench coat", "coats", "ZETA", "budget", "classic", "M", "satisfactory", 100.0, 1,
     T0 - 2 * DAY, 4.9, 0, "FR", 3, 0),
    ("iE", "nova minimalist top", "tops", "nova", "mid", "minimalist", "M", "good", 30.0, 4,
     T0 - 9 * DAY, 4.2, 7, "ES", 0, 0),
    ("iF", "nova sporty top", "tops", "nova", "mid", "sporty", "XL", "very_good", 50.0, 3,
     T0 - 9 * DAY, 4.1, 1, "PL", 1, 0),
]}
USER_ROWS = [  # user_id, country, size, signup_ms, fav_styles, fav_brands
    ("u1", "FR", "M", T0 - 10 * DAY, ["vintage"], ["acme"]),
    ("u2", "DE", "S", T0 - 100 * DAY, [], []),
]
REQUEST_ROWS = [  # request_id, user_id (u9 has no profile), ts_ms, surface, query; one request an hour
    ("r01", "u1", T0 + 1 * HOUR, "feed", None),
    ("r02", "u2", T0 + 2 * HOUR, "search", "acme coats"),
    ("r03", "u1", T0 + 3 * HOUR, "search", "vintage\u00a0coat"),  # a no-break space splits terms (str.split)
    ("r04", "u1", T0 + 4 * HOUR, "feed", None),
    ("r05", "u2", T0 + 5 * HOUR, "feed", None),
    ("r06", "u1", T0 + 6 * HOUR, "feed", None),
    ("r07", "u1", T0 + 7 * HOUR, "search", " Zeta  zeta"),  # names zeta once: terms are lower case, distinct
    ("r08", "u2", T0 + 8 * HOUR, "search", " \u3000 "),  # no term: not a search
    ("r09", "u1", T0 + 9 * HOUR, "feed", None),
    ("r10", "u9", T0 + 10 * HOUR, "feed", None),
]
SHOWN = {  # request -> items in position order
    "r01": ["iA", "iB", "iC"], "r02": ["iA", "iC", "iD"], "r03": ["iC", "iA", "iD"],
    "r04": ["iA", "iB", "iD"], "r05": ["iA", "iB"], "r06": ["iA", "iB", "iC"], "r07": ["iC", "iD", "iA"],
    "r08": ["iA", "iD"], "r09": ["iD", "iA", "iC", "iB"], "r10": ["iA", "iC"],
}
INTERACTION_ROWS = [  # request_id, user_id, item_id, ts_ms, event
    ("r01", "u1", "iA", T0 + 1 * HOUR + 3 * SEC, "click"),
    ("r01", "u1", "iB", T0 + 1 * HOUR + 5 * SEC, "click"),
    ("r01", "u1", "iA", T0 + 2 * HOUR + 30 * 60 * SEC, "like"),  # r01's impression, but liked after r02
    ("r02", "u2", "iA", T0 + 2 * HOUR + 3 * SEC, "click"),
    ("r02", "u2", "iA", T0 + 2 * HOUR + 20 * SEC, "add_to_bag"),
    ("r02", "u2", "iA", T0 + 2 * HOUR + 60 * SEC, "purchase"),
    ("r03", "u1", "iA", T0 + 3 * HOUR + 4 * SEC, "click"),
    ("r03", "u1", "iC", T0 + 4 * HOUR, "click"),  # the same millisecond as r04: must not count for r04
    ("r03", "u1", "iA", T0 + 4 * HOUR, "like"),  # the same millisecond as r04: must not count for r04
    ("r04", "u1", "iB", T0 + 4 * HOUR + 15 * SEC, "add_to_bag"),
    ("r06", "u1", "iA", T0 + 6 * HOUR + 3 * SEC, "click"),
    ("r06", "u1", "iB", T0 + 6 * HOUR + 9 * SEC, "like"),
    ("r07", "u1", "iD", T0 + 7 * HOUR + 3 * SEC, "click"),
    ("r09", "u1", "iC", T0 + 9 * HOUR + 3 * SEC, "click"),
]
#: Labels (max event grade) of the hand-made impressions; all others are 0.
HANDMADE_LABELS = {("r01", "iA"): 2, ("r01", "iB"): 1, ("r02", "iA"): 4, ("r03", "iA"): 2, ("r03", "iC"): 1,
                   ("r04", "iB"): 3, ("r06", "iA"): 1, ("r06", "iB"): 2, ("r07", "iD"): 1, ("r09", "iC"): 1}


def to_ts(ms) -> pd.Series:
    """Epoch milliseconds -> datetime64[ms, UTC], the simulator's timestamp dtype."""
    return pd.Series(pd.to_datetime(np.asarray(ms, dtype=np.int64), unit="ms", utc=True))


def handmade_tables() -> dict[str, pd.DataFrame]:
    """The hand-made raw log, with the dtypes the simulator writes (strings, int64/float64, UTC ms, lists)."""
    items = pd.DataFrame(list(ITEMS.values()), columns=ITEM_COLUMNS)
    items["photos"] = items["photos"].astype(np.int32)
    items.insert(ITEM_COLUMNS.index("listed_ms"), "listed_ts", to_ts(items.pop("listed_ms")))
    users = pd.DataFrame(USER_ROWS,
                         columns=["user_id", "country", "size", "signup_ms", "fav_styles", "fav_brands"])
    users.insert(3, "signup_ts", to_ts(users.pop("signup_ms")))
    requests = pd.DataFrame(REQUEST_ROWS, columns=["request_id", "user_id", "ts_ms", "surface", "query"])
    requests.insert(2, "ts", to_ts(requests.pop("ts_ms")))
    requests["policy"] = "legacy"
    impressions = pd.DataFrame([(r, item, pos) for r, ids in SHOWN.items() for pos, item in enumerate(ids)],
                               columns=["request_id", "item_id", "position"])
    impressions["position"] = impressions["position"].astype(np.int32)
    impressions = impressions.iloc[::-1].reset_index(drop=True)  # row order must not matter
    interactions = pd.DataFrame(INTERACTION_ROWS,
                                columns=["request_id", "user_id", "item_id", "ts_ms", "event"])
    interactions.insert(3, "ts", to_ts(interactions.pop("ts_ms")))
    return {"users": users, "items": items, "requests": requests, "impressions": impressions,
            "interactions": interactions}


def same(a: str, b: str) -> bool:
    """One brand, style or category whatever the capitals and surrounding spaces (single-word names here)."""
    return a.strip().lower() == b.strip().lower()


def oracle_raw(ts: int, user_id: str, item_id: str, surface: str = "feed", query: str | None = None) -> dict:
    """RAW_COLUMNS of showing ``item_id`` to ``user_id`` at ``ts``, by brute force over the rows above (no Spark)."""
    users = {row[0]: row for row in USER_ROWS}
    earlier = [e for e in INTERACTION_ROWS if e[3] < ts]  # strictly earlier events only
    clicks = [e[2] for e in earlier if e[1] == user_id and e[4] == "click"]
    seen = [i for r in REQUEST_ROWS if r[1] == user_id and r[2] < ts for i in SHOWN[r[0]]]
    searches = [set(r[4].lower().split()) for r in REQUEST_ROWS if r[1] == user_id and r[2] < ts and r[4]
                and r[4].split()]
    user, item = users.get(user_id), ITEMS[item_id]
    return {
        "surface": surface, "query": query, "ts_ms": ts,
        "user_country": user[1] if user else None, "user_size": user[2] if user else None,
        "user_fav_brands": user[5] if user else None, "user_fav_styles": user[4] if user else None,
        "user_signup_ms": user[3] if user else None,
        "user_clicks": len(clicks),
        "user_lpi_sum": sum(math.log(ITEMS[i]["price"] / MEDIANS[ITEMS[i]["category"]]) for i in clicks),
        **{c: item[c] for c in ITEM_COLUMNS if c not in ("item_id", "views", "likes")},
        "category_median_price": MEDIANS[item["category"]],
        "views": item["views"] + sum(item_id in SHOWN[r[0]] for r in REQUEST_ROWS if r[2] < ts),
        "likes": item["likes"] + sum(e[2] == item_id and e[4] == "like" for e in earlier),
        "bags": sum(e[2] == item_id and e[4] == "add_to_bag" for e in earlier),
        "user_brand_clicks": sum(same(ITEMS[i]["brand"], item["brand"]) for i in clicks),
        "user_style_clicks": sum(same(ITEMS[i]["style"], item["style"]) for i in clicks),
        "user_category_clicks": sum(same(ITEMS[i]["category"], item["category"]) for i in clicks),
        "user_brand_views": sum(same(ITEMS[i]["brand"], item["brand"]) for i in seen),
        "user_style_views": sum(same(ITEMS[i]["style"], item["style"]) for i in seen),
        "user_searches": len(searches),
        "user_brand_searches": sum(item["brand"].strip().lower() in terms for terms in searches),
        "user_style_searches": sum(item["style"].strip().lower() in terms for terms in searches),
    }


def oracle_raw_rows() -> pd.DataFrame:
    """Brute-force RAW_COLUMNS of every hand-made impression (+ request_id, item_id, user_id, position)."""
    return pd.DataFrame([
        {"request_id": request_id, "item_id": item_id, "user_id": user_id, "position": position,
         **oracle_raw(ts, user_id, item_id, surface, query)}
        for request_id, user_id, ts, surface, query in REQUEST_ROWS
        for position, item_id in enumerate(SHOWN[request_id])])


def assert_features_equal(actual: pd.Series | dict, expected: pd.Series | dict, where: str) -> None:
    for name in FLOAT_FEATURES:
        assert math.isclose(float(actual[name]), float(expected[name]), rel_tol=1e-5, abs_tol=1e-5), (
            f"{where}: feature {name!r} is {actual[name]}, expected {expected[name]}")
    for name in STRING_FEATURES:
        assert actual[name] == expected[name], (
            f"{where}: feature {name!r} is {actual[name]!r}, expected {expected[name]!r}")


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sim_job(spark, tmp_path_factory):
    """The tiny simulated marketplace, written to Parquet and run through the job once for the module."""
    root = tmp_path_factory.mktemp("sim")
    tables = simulate(SIM)
    write_tables(tables, root / "raw")
    messages: list[str] = []
    stats = run(root / "raw", root / "features", spark, progress=messages.append)
    return {"tables": tables, "out": root / "features", "stats": stats, "messages": messages,
            "items": read_items(root / "features", truth=True)}


@pytest.fixture(scope="module")
def handmade_job(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("handmade")
    write_tables(handmade_tables(), root / "raw")
    stats = run(root / "raw", root / "features", spark)
    items = read_items(root / "features", truth=False)
    return {"out": root / "features", "stats": stats, "items": items.set_index(["request_id", "item_id"])}


@pytest.fixture(scope="module")
def handmade_raw(tmp_path_factory) -> Path:
    """The hand-made raw log written once; tests copy-and-break it."""
    raw = tmp_path_factory.mktemp("handmade-raw") / "raw"
    write_tables(handmade_tables(), raw)
    return raw


# ------------------------------------------------------------------------------------ end to end (simulated)


def test_simulated_layout_and_splits(sim_job) -> None:
    out, stats = sim_job["out"], sim_job["stats"]
    assert {SPEC_FILE, "stats.json", *SPLITS} <= {p.name for p in out.iterdir()}
    assert leftovers(out) == [out], "a temporary directory was left next to the output"
    for split in SPLITS:
        assert shard_files(out / split), f"no Parquet shards in {split}"
        assert (out / split / SPEC_FILE).read_text() == (out / SPEC_FILE).read_text()
    assert sim_job["messages"][0] == "validating raw tables"

    lists = {split: read_split(out / split) for split in SPLITS}
    ranges = {split: (frame["ts_ms"].min(), frame["ts_ms"].max()) for split, frame in lists.items()}
    cut_train, cut_valid = stats["time_cuts_ms"]
    assert ranges["train"][1] < cut_train <= ranges["valid"][0]
    assert ranges["valid"][1] < cut_valid <= ranges["test"][0]
    assert ranges["train"][1] < ranges["valid"][0] <= ranges["valid"][1] < ranges["test"][0]

    requests = sim_job["tables"]["requests"]
    all_ids = pd.concat([frame["request_id"] for frame in lists.values()])
    assert all_ids.is_unique and set(all_ids) == set(requests["request_id"])
    request_ms = requests.set_index("request_id")["ts"].astype("int64")  # datetime64[ms] -> epoch ms
    for frame in lists.values():
        assert (frame["ts_ms"].to_numpy() == request_ms.loc[frame["request_id"]].to_numpy()).all()


def test_simulated_list_columns(sim_job) -> None:
    columns = per_item_columns(truth=True)
    impressions = sim_job["tables"]["impressions"]
    for split in SPLITS:
        lists = read_split(sim_job["out"] / split)
        assert {"request_id", "user_id", "ts_ms", *CONTEXT_FEATURES, *columns} <= set(lists.columns)
        assert "split" not in lists.columns  # the split is the directory
        lengths = lists[columns].map(len)
        assert (lengths.nunique(axis=1) == 1).all(), f"{split}: list columns of unequal length in a row"
        assert all((np.diff(positions) > 0).all() for positions in lists["position"]), f"{split}: unsorted"
    shown = impressions.groupby("request_id").size()
    items = sim_job["items"]
    assert len(items) == len(impressions)
    assert (items.groupby("request_id").size().sort_index() == shown.sort_index()).all()
    # every (request, item, position) is an impression of the raw log, with its truth columns carried along
    merged = items.merge(impressions, on=["request_id", "item_id", "position"], suffixes=("", "_raw"))
    assert len(merged) == len(impressions)
    assert (merged["relevance"] == merged["relevance_raw"]).all()
    assert np.allclose(merged["true_score"], merged["true_score_raw"])


def test_simulated_labels_are_max_event_grade(sim_job) -> None:
    assert EVENT_GRADES == EVENT_GRADE == {"click": 1, "like": 2, "add_to_bag": 3, "purchase": 4}
    interactions = sim_job["tables"]["interactions"]
    expected = (interactions.assign(grade=interactions["event"].map(EVENT_GRADE))
                .groupby(["request_id", "item_id"])["grade"].max())
    items = sim_job["items"].set_index(["request_id", "item_id"])
    labels = items["label"]
    assert set(labels.unique()) <= {0, 1, 2, 3, 4}
    positives = labels[labels > 0]
    assert positives.sort_index().to_dict() == expected.loc[positives.index].sort_index().to_dict()
    assert set(expected.index) <= set(items.index)  # every interaction is of an impression here
    assert (labels.drop(expected.index) == 0).all()
    # a few requests checked by hand against their raw events, graded independently of EVENT_GRADE
    grade = {"purchase": 4, "add_to_bag": 3, "like": 2, "click": 1}
    graded = interactions[interactions["event"].isin(["purchase", "add_to_bag"])]["request_id"].unique()[:3]
    for request_id in [*graded, interactions["request_id"].iloc[0]]:
        events = interactions[interactions["request_id"] == request_id]
        for item_id in items.loc[request_id].index:
            got = events[events["item_id"] == item_id]["event"].map(grade)
            assert labels[(request_id, item_id)] == (got.max() if len(got) else 0), (request_id, item_id)
    assert labels.max() == 4


def test_simulated_feature_spec(sim_job) -> None:
    out, items = sim_job["out"], sim_job["items"]
    spec = FeatureSpec.load(out / SPEC_FILE)
    assert spec.names == [f.name for f in FEATURES]
    assert (spec.label, spec.eval_label, spec.position, spec.oracle_score, spec.segment) == (
        "label", "relevance", "position", "true_score", "surface")
    assert spec.list_size == CONFIG.list_size
    for split in SPLITS:
        assert FeatureSpec.load(out / split) == spec

    train_items = items[items["split"] == "train"]
    train_lists = read_split(out / "train")
    for feature in spec.features:
        scope = train_lists if feature.scope == "context" else train_items
        if feature.dtype == STRING:
            assert feature.vocabulary == tuple(sorted(scope[feature.name].unique())), feature.name
            assert feature.mean is None and feature.std is None
            continue
        assert feature.vocabulary is None
        assert math.isfinite(feature.mean) and math.isfinite(feature.std), feature.name
        assert feature.std >= 1e-6, feature.name
        values = scope[feature.name].astype(np.float64).to_numpy()
        if feature.transform == "log1p":
            values = np.sign(values) * np.log1p(np.abs(values))
        assert math.isclose(feature.mean, values.mean(), rel_tol=1e-4, abs_tol=1e-5), feature.name
        assert math.isclose(feature.std, max(values.std(), 1e-6), rel_tol=1e-3, abs_tol=1e-5), feature.name
    # vocabularies come from train only: a category seen only later is out of vocabulary
    later = set(items.loc[items["split"] != "train", "item_category"]) - set(train_items["item_category"])
    assert not later & set(spec["item_category"].vocabulary)


def test_simulated_stats(sim_job) -> None:
    out, stats, items = sim_job["out"], sim_job["stats"], sim_job["items"]
    assert json.loads((out / "stats.json").read_text()) == json.loads(json.dumps(stats))
    for split in SPLITS:
        lists = read_split(out / split)
        part = items[items["split"] == split]
        assert stats["splits"][split] == {"lists": len(lists), "items": len(part),
                                          "positives": int((part["label"] > 0).sum())}, split
    assert stats["list_size"] == CONFIG.list_size
    assert stats["max_list_length"] == int(items.groupby("request_id").size().max())
    # half the simulated traffic is randomised, enough to fit the examination exponent on the training period
    bias = stats["position_bias"]
    assert bias is not None and bias["method"] == "result_randomisation"
    assert math.isfinite(bias["eta"]) and bias["positions_used"] >= 3
    assert FeatureSpec.load(out).propensity_eta == bias["eta"]
    requests = sim_job["tables"]["requests"]
    randomised = (requests["policy"] == "random") & (requests["ts"].astype("int64") < stats["time_cuts_ms"][0])
    assert bias["requests"] == int(randomised.sum())


def test_estimate_position_bias_uses_only_randomised_training_requests(spark) -> None:
    """60 random-order requests before the cut with CTR(p) = 1 / (1 + p) exactly, so eta is 1."""
    cut = T0 + 1_000 * HOUR
    requests, impressions, interactions = [], [], []
    clicks_at = {p: 60 // (1 + p) for p in range(5)}  # 60, 30, 20, 15, 12 clicks out of 60 impressions
    for n in range(100):
        policy, ts = ("random", T0 + n * HOUR) if n < 60 else (("legacy", T0 + n * HOUR) if n < 80
                                                                 else ("random", cut + n * HOUR))
        request_id = f"q{n:03d}"
        requests.append((request_id, ts, policy))
        for position in range(5):
            impressions.append((request_id, f"i{position}", position))
            if n >= 60 or n < clicks_at[position]:  # the excluded requests click everything
                interactions.append((request_id, "u1", f"i{position}", ts + SEC, "click"))
    frames = {
        "requests": pd.DataFrame(requests, columns=["request_id", "ts", "policy"]),
        "impressions": pd.DataFrame(impressions, columns=["request_id", "item_id", "position"]),
        "interactions": pd.DataFrame(interactions,
                                     columns=["request_id", "user_id", "item_id", "ts", "event"]),
    }
    tables = {name: spark.createDataFrame(frame) for name, frame in frames.items()}  # ts as epoch ms
    bias = estimate_position_bias(tables, cut)
    assert bias["method"] == "result_randomisation"
    assert bias["requests"] == 60
    assert bias["eta"] == pytest.approx(1.0, abs=1e-6)
    assert bias["intercept"] == pytest.approx(0.0, abs=1e-6)
    assert estimate_position_bias({**tables, "requests": tables["requests"].drop("policy")}, cut) is None


# ------------------------------------------------------------------------------ leakage (hand-made logs)


def test_handmade_output_shape(handmade_job) -> None:
    items, stats = handmade_job["items"], handmade_job["stats"]
    assert len(items) == sum(len(v) for v in SHOWN.values())
    assert sum(s["lists"] for s in stats["splits"].values()) == len(REQUEST_ROWS)
    assert all(stats["splits"][split]["lists"] > 0 for split in SPLITS)
    for (request_id, item_id), row in items.iterrows():
        assert SHOWN[request_id][int(row["position"])] == item_id
        assert row["label"] == HANDMADE_LABELS.get((request_id, item_id), 0), (request_id, item_id)
    spec = FeatureSpec.load(handmade_job["out"])
    assert spec.eval_label == "label" and spec.oracle_score is None  # no simulator truth columns
    assert spec.propensity_eta is None and stats["position_bias"] is None  # no randomised traffic


# (request, item) -> feature values worked out by hand from the rows above.
HAND_COUNTED = {
    ("r01", "iA"): {"views": 5, "likes": 2, "bags": 0, "user_history": 0, "brand_affinity": 0.0},
    # r01's like of iA (2h30) is after r02 (2h); r02's own bag (2h + 20 s) is after r02 too
    ("r02", "iA"): {"views": 6, "likes": 2, "bags": 0, "user_history": 0, "brand_affinity": 0.0},
    ("r03", "iA"): {"views": 7, "likes": 3, "bags": 1, "user_history": 2, "brand_affinity": 2 / 3},
    # the click on iC and the like of iA at exactly r04's millisecond do not count for r04
    ("r04", "iA"): {"views": 8, "likes": 3, "bags": 1, "user_history": 3, "brand_affinity": 3 / 4,
                    "style_affinity": 2 / 4, "category_affinity": 2 / 4},
    ("r05", "iA"): {"views": 9, "likes": 4, "bags": 1, "user_history": 1, "brand_affinity": 1 / 2},
    ("r05", "iB"): {"views": 2, "likes": 0, "bags": 1},
    # ... and do count one request later
    ("r06", "iC"): {"views": 13, "likes": 1, "bags": 0, "user_history": 4, "brand_affinity": 1 / 5,
                    "style_affinity": 3 / 5, "category_affinity": 3 / 5},
    ("r09", "iB"): {"views": 4, "likes": 1, "bags": 1, "user_history": 6, "brand_affinity": 4 / 7},
    # spelling: "ZETA" (iD) is zeta, " Vintage" (iC) is vintage, for counters, favourites and queries alike
    ("r07", "iD"): {"query_brand_match": 1.0, "query_title_overlap": 1.0},
    ("r09", "iD"): {"brand_affinity": 2 / 7, "brand_ctr": 2 / 8, "brand_searched": 1 / 3},
    ("r09", "iC"): {"style_affinity": 4 / 7, "fav_style": 1.0, "style_searched": 1 / 3},
    ("r10", "iA"): {"views": 14, "likes": 4, "bags": 1, "user_history": 0, "brand_affinity": 0.0,
                    "user_tenure_days": 0.0, "user_country": "unknown"},
}


@pytest.mark.parametrize("key", list(HAND_COUNTED), ids=lambda k: "-".join(k))
def test_handmade_point_in_time_counters(handmade_job, key) -> None:
    row = handmade_job["items"].loc[key]
    for name, expected in HAND_COUNTED[key].items():
        if isinstance(expected, str):
            assert row[name] == expected, (key, name)
        else:
            assert row[name] == pytest.approx(expected, abs=1e-6), (key, name, row[name])


def test_handmade_every_feature_matches_brute_force(handmade_job) -> None:
    """Every impression: job output == assemble_features(brute-force point-in-time raw values)."""
    oracle = oracle_raw_rows()
    expected = assemble_features(oracle).set_index(["request_id", "item_id"])
    items = handmade_job["items"]
    assert sorted(items.index) == sorted(expected.index)
    for key, row in items.iterrows():
        assert_features_equal(row, expected.loc[key], where=str(key))


def test_online_assemble_features_matches_spark_row(handmade_job) -> None:
    """The online path calls the same function: one impression's raw values by hand -> the job's features."""
    usual_lpi = math.log(20 / 30)  # u1 clicked iA (lpi 0) twice and iB (20 vs tops median 30) before r04
    raw = {
        "surface": "feed", "query": None, "ts_ms": T0 + 4 * HOUR,
        "user_country": "FR", "user_size": "M", "user_fav_brands": ["acme"], "user_fav_styles": ["vintage"],
        "user_signup_ms": T0 - 10 * DAY, "user_clicks": 3, "user_lpi_sum": usual_lpi,
        "category": "coats", "brand": "acme", "brand_tier": "premium", "style": "vintage", "size": "M",
        "condition": "very_good", "price": 60.0, "photos": 5, "category_median_price": 60.0,
        "listed_ms": T0 - 3 * DAY, "seller_rating": 4.5, "seller_sales": 12, "seller_country": "FR",
        "title": "acme vintage wool coat", "views": 8, "likes": 3, "bags": 1,
        "user_brand_clicks": 3, "user_style_clicks": 2, "user_category_clicks": 2,
        # r01 and r03 showed u1 acme 3 times (iA, iB; iA), vintage 4 times (iA, iC; iC, iA); r03 searched "vintage"
        "user_brand_views": 3, "user_style_views": 4, "user_searches": 1, "user_brand_searches": 0,
        "user_style_searches": 1,
    }
    assert set(raw) == set(RAW_COLUMNS)
    online = assemble_features(pd.DataFrame([raw])).iloc[0]
    assert online["price_gap"] == pytest.approx(abs(usual_lpi) / 3, rel=1e-6)
    assert online["user_tenure_days"] == pytest.approx(10 + 4 / 24, rel=1e-6)
    assert (online["brand_ctr"], online["style_ctr"]) == pytest.approx((3 / 4, 2 / 5))
    assert (online["brand_searched"], online["style_searched"]) == pytest.approx((0.0, 1 / 2))
    assert (online["followed_brands"], online["declared_styles"]) == (1, 1)
    flags = ("fav_brand", "fav_style", "same_country", "size_match")
    assert [online[name] for name in flags] == [1, 1, 1, 1]
    assert_features_equal(handmade_job["items"].loc[("r04", "iA")], online, where="r04/iA")


def test_online_state_is_the_counters_at_the_end_of_the_log(handmade_job) -> None:
    """The feature store's content (OUT/online), through the online path, equals the brute-force raw values."""
    online = handmade_job["out"] / "online"
    online_raw_frame = features.online_raw_frame
    assert online.is_dir(), "the feature job wrote no online feature state"
    item_state = read_split(online / "items").set_index("item_id")
    user_state = read_split(online / "users").set_index("user_id")
    assert set(item_state.index) == set(ITEMS)  # never-shown items too
    assert set(user_state.index) == {row[0] for row in USER_ROWS} | {"u9"}  # u9: activity, no profile row
    assert (item_state.loc["iA", "views"], item_state.loc["iA", "likes"], item_state.loc["iA", "bags"]) == (15, 4, 1)
    assert user_state.loc["u1", "user_clicks"] == 7 and user_state.loc["u2", "user_clicks"] == 1
    assert user_state.loc["u1", "user_searches"] == 2 and user_state.loc["u2", "user_searches"] == 1

    now = T0 + 11 * HOUR  # after every event of the log
    for user_id in ("u1", "u2", "u9"):  # u9 has history but no profile
        user = user_state.loc[user_id].to_dict() if user_id in user_state.index else None
        raw = online_raw_frame("search", "vintage coat", now, user,
                               [item_state.loc[i].to_dict() for i in ITEMS])
        got = assemble_features(raw)
        expected = assemble_features(pd.DataFrame([oracle_raw(now, user_id, i, "search", "vintage coat")
                                                   for i in ITEMS]))
        for n, item_id in enumerate(ITEMS):
            assert_features_equal(got.iloc[n], expected.iloc[n], where=f"online {user_id}/{item_id}")


# -------------------------------------------------------------------------------------------- bad input


def break_raw(target: Path, table: str, change) -> Path:
    """A copy of the hand-made raw log with ``table`` replaced by ``change(frame)`` (None: table removed)."""
    tables = handmade_tables()
    changed = change(tables[table])
    if changed is None:
        del tables[table]
    else:
        tables[table] = changed
    write_tables(tables, target)
    return target


BAD_INPUTS = {
    "missing-table": ("impressions", lambda f: None, ["'impressions'", "not found", "impressions"]),
    "missing-column": ("items", lambda f: f.drop(columns=["price"]), ["'items'", "'price'", "items"]),
    "wrong-type": ("items", lambda f: f.assign(price=f["price"].astype(str)),
                   ["'items'", "'price'", "string"]),
    "empty-table": ("interactions", lambda f: f.iloc[0:0], ["'interactions'", "empty", "interactions"]),
    "unknown-event": ("interactions", lambda f: f.assign(event=f["event"].replace("like", "share")),
                      ["'interactions'", "'event'", "share"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_table_and_column_and_leaves_no_output(spark, tmp_path, case) -> None:
    table, change, fragments = BAD_INPUTS[case]
    raw = break_raw(tmp_path / "raw", table, change)
    out = tmp_path / "features"
    with pytest.raises(FeatureJobError) as info:
        run(raw, out, spark)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    if case != "unknown-event":  # validation errors name where the bad table is
        assert str(raw / table) in message
    assert leftovers(out) == []


def test_failed_job_keeps_previous_output(spark, tmp_path) -> None:
    raw = break_raw(tmp_path / "raw", "interactions", lambda f: f.assign(event="share"))
    out = tmp_path / "features"
    out.mkdir()
    (out / "stats.json").write_text("from an earlier run")
    with pytest.raises(FeatureJobError, match="share"):
        run(raw, out, spark)
    assert (out / "stats.json").read_text() == "from an earlier run"
    assert leftovers(out) == [out]


def test_output_dir_with_other_files_is_refused_before_any_work(spark, tmp_path, handmade_raw) -> None:
    """`features build --out DIR` replaces the job's outputs in DIR: a DIR holding anything else (the raw logs
    themselves, notes) is refused up front, and nothing in it is touched."""
    project = tmp_path / "project"
    shutil.copytree(handmade_raw, project / "raw")
    (project / "notes.txt").write_text("mine")
    (project / "stats.json").write_text("an earlier run's")
    with pytest.raises(FeatureJobError, match=r"holds files this job did not write \(notes.txt, raw\)"):
        run(project / "raw", project, spark)
    assert (project / "notes.txt").read_text() == "mine" and (project / "raw" / "users").is_dir()
    assert (project / "stats.json").read_text() == "an earlier run's"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FeatureJobError, match="is a file"):
        run(handmade_raw, tmp_path / "file", spark)


def test_existing_output_dir_is_refilled_in_place(spark, tmp_path, handmade_raw, monkeypatch) -> None:
    """SageMaker mounts /opt/ml/processing/output/<name>: the job must fill that directory, not replace it."""
    out = tmp_path / "features"
    out.mkdir()
    (out / "stats.json").write_text("from an earlier run")
    (out / "train").mkdir()
    (out / "train" / "part-old.parquet").write_text("from an earlier run")
    inode = out.stat().st_ino
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def rename(self, target):  # a mount point cannot be the target of a rename, nor removed
        if Path(target) == out:
            raise OSError(16, "Device or resource busy", str(out))
        return real_rename(self, target)

    def rmtree(path, *args, **kwargs):
        if Path(path) == out:
            raise OSError(16, "Device or resource busy", str(out))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    run(handmade_raw, out, spark)
    assert out.stat().st_ino == inode and not (out / "train" / "part-old.parquet").exists()
    assert json.loads((out / "stats.json").read_text())["splits"]
    assert {p.name for p in out.iterdir()} >= {"train", "valid", "test", "online", "feature_spec.json", "stats.json"}
    assert read_split(out / "train").shape[0] > 0 and leftovers(out) == [out]


def test_too_few_distinct_times_fails_without_output(spark, tmp_path) -> None:
    """All requests at one instant cannot fill three time splits: an error, and nothing written."""
    raw = break_raw(tmp_path / "raw", "requests", lambda f: f.assign(ts=to_ts([T0] * len(f))))
    out = tmp_path / "features"
    with pytest.raises(FeatureJobError, match="split"):
        run(raw, out, spark)
    assert leftovers(out) == []


def test_null_event_is_rejected(spark, tmp_path) -> None:
    raw = break_raw(tmp_path / "raw", "interactions", lambda f: f.assign(event=f["event"].mask(f.index == 0)))
    out = tmp_path / "features"
    with pytest.raises(FeatureJobError, match="'interactions'.*'event'"):
        run(raw, out, spark)
    assert leftovers(out) == []


def test_item_without_brand_has_no_brand_history(spark, tmp_path) -> None:
    """An item with no brand (null) is shown and clicked: the job runs, its brand counters are 0 offline, and the
    online state has no null key, so the online lookup (0) agrees."""
    raw = break_raw(tmp_path / "raw", "items", lambda f: f.assign(brand=f["brand"].mask(f["item_id"] == "iB")))
    out = tmp_path / "features"
    run(raw, out, spark)
    items = read_items(out, truth=False).set_index(["request_id", "item_id"])
    unbranded = items.xs("iB", level="item_id")
    assert len(unbranded) == 5  # shown in r01, r04, r05, r06 and r09, clicked in r01
    assert (unbranded[["brand_affinity", "brand_ctr", "brand_searched", "fav_brand"]] == 0).all().all()
    # before r04, u1 saw acme (now iA only) in r01 and r03 and clicked it in both: 2 / (2 + 1)
    assert items.loc[("r04", "iA"), "brand_ctr"] == pytest.approx(2 / 3)
    users = read_split(out / "online" / "users").set_index("user_id")
    for name in ("brand_clicks", "brand_views"):
        assert all(key is not None for pairs in users[name].dropna() for key, _ in pairs), name


def test_item_without_category_keeps_its_rows_priced_against_the_catalogue(spark, tmp_path) -> None:
    """An item with no category (null) is neither dropped (an inner join on the category medians did, with its
    impressions, label and the clicks in users' histories) nor priced against nothing."""
    raw = break_raw(tmp_path / "raw", "items", lambda f: f.assign(category=f["category"].mask(f["item_id"] == "iB")))
    out = tmp_path / "features"
    run(raw, out, spark)
    items = read_items(out, truth=False).set_index(["request_id", "item_id"])
    uncategorised = items.xs("iB", level="item_id")
    assert len(uncategorised) == 5  # shown in r01, r04, r05, r06 and r09, as with its category
    prices = np.sort(pd.read_parquet(raw / "items")["price"].to_numpy())
    overall = prices[int(np.ceil(0.5 * len(prices))) - 1]  # percentile_approx: a value of the data
    price = pd.read_parquet(raw / "items").set_index("item_id").loc["iB", "price"]
    assert uncategorised["log_price_index"].to_numpy() == pytest.approx(np.log(price / overall), rel=1e-5)
    online = read_split(out / "online" / "items").set_index("item_id")
    assert online.loc["iB", "category_median_price"] == pytest.approx(overall)


def test_item_shown_twice_in_a_request_is_listed_twice(spark, tmp_path) -> None:
    def show_again(impressions: pd.DataFrame) -> pd.DataFrame:
        again = pd.DataFrame({"request_id": ["r01"], "item_id": ["iA"], "position": np.array([3], np.int32)})
        return pd.concat([impressions, again], ignore_index=True)

    out = tmp_path / "features"
    run(break_raw(tmp_path / "raw", "impressions", show_again), out, spark)
    lists = read_split(out / "train").set_index("request_id")
    assert list(lists.loc["r01", "position"]) == [0, 1, 2, 3]
    assert list(lists.loc["r01", "item_id"]) == ["iA", "iB", "iC", "iA"]


def test_unknown_raw_path(spark, tmp_path) -> None:
    out = tmp_path / "features"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(tmp_path / "nowhere", out, spark)
    assert leftovers(out) == []


def test_read_raw_tables_accepts_the_raw_schema(spark, handmade_raw) -> None:
    tables = feature_job.read_raw_tables(spark, handmade_raw)
    assert set(tables) == set(RAW_SCHEMA)
    for table, columns in RAW_SCHEMA.items():
        assert set(columns) <= set(tables[table].columns)


# ----------------------------------------------------------------------------------------------- s3 (moto)


@pytest.fixture
def aws(monkeypatch, tmp_path):
    mock_aws = pytest.importorskip("moto").mock_aws
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the job's s3 staging dirs land in tmp_path
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        import boto3

        yield boto3.client("s3", region_name="us-east-1")


def test_s3_input_and_output(spark, aws, handmade_raw) -> None:
    aws.create_bucket(Bucket="bucket")
    for path in sorted(handmade_raw.rglob("*.parquet")):
        aws.upload_file(str(path), "bucket", f"raw/{path.relative_to(handmade_raw).as_posix()}")
    stats = run("s3://bucket/raw", "s3://bucket/features", spark)

    keys = {o["Key"] for o in aws.list_objects_v2(Bucket="bucket", Prefix="features/")["Contents"]}
    assert {f"features/{SPEC_FILE}", "features/stats.json",
            *(f"features/{split}/{SPEC_FILE}" for split in SPLITS)} <= keys
    for split in SPLITS:
        assert any(k.startswith(f"features/{split}/part-") and k.endswith(".parquet") for k in keys), split
    spec = json.loads(aws.get_object(Bucket="bucket", Key=f"features/{SPEC_FILE}")["Body"].read())
    assert FeatureSpec.from_dict(spec).names == [f.name for f in FEATURES]
    remote = json.loads(aws.get_object(Bucket="bucket", Key="features/stats.json")["Body"].read())
    assert remote == json.loads(json.dumps(stats))
    assert sum(s["items"] for s in stats["splits"].values()) == sum(len(v) for v in SHOWN.values())


def test_s3_missing_input_prefix(spark, aws, tmp_path) -> None:
    aws.create_bucket(Bucket="bucket")
    with pytest.raises(FileNotFoundError, match="s3://bucket/raw"):
        run("s3://bucket/raw", "s3://bucket/features", spark)
    assert "Contents" not in aws.list_objects_v2(Bucket="bucket", Prefix="features/")


def test_spark_runtime_installs_what_the_sagemaker_spark_image_lacks(monkeypatch):
    """The SageMaker Spark image has pandas 3 and no pyarrow: the job installs the pins before pandas loads;
    here (pyarrow, pandas 2) nothing is missing and nothing runs."""
    import importlib.util
    import subprocess
    import sys

    from training import spark_runtime

    calls = []
    assert spark_runtime.missing() == [] and spark_runtime.ensure(run=calls.append) == [] and calls == []

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow"
                        else real_find_spec(name, *a))
    monkeypatch.setattr(spark_runtime.importlib.metadata, "version", lambda name: "3.0.1")
    assert spark_runtime.missing() == ["pyarrow", "pandas<3"]
    assert spark_runtime.ensure(run=calls.append) == ["pyarrow", "pandas<3"]
    [command] = calls
    assert command[:4] == [sys.executable, "-m", "pip", "install"] and command[-2:] == list(spark_runtime.REQUIREMENTS)
    assert command[command.index("--retries") + 1] == "1"  # without egress the job fails fast

    def no_egress(command):
        raise subprocess.CalledProcessError(1, command)

    with pytest.raises(spark_runtime.MissingPackages, match="egress to PyPI.*spark_image_uri"):
        spark_runtime.ensure(run=no_egress)


def test_feature_job_script_starts_with_the_runtime_check():
    """As spark-submit runs it: the check comes before pandas is imported (the job's first statement)."""
    import subprocess
    import sys

    probe = ("import runpy, sys; sys.argv = ['feature_job.py', '--help']; "
             "import training.spark_runtime as r; r.ensure = lambda: print('ENSURE', 'pandas' in sys.modules); "
             "runpy.run_path('training/feature_job.py', run_name='__main__')")
    root = Path(__file__).parent.parent
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ENSURE False"), out.stdout
