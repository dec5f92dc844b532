"""The online path (feature-store state -> online_raw_frame -> assemble_features) reproduces the offline features.

State is computed by the feature job's ``online_state`` on the logs truncated just before a request, so it is
exactly what a feature store would hold at that moment; the features built from it must equal the point-in-time
features the Spark job wrote for that request.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from marketrank import simulator
from training.feature_job import online_state, point_in_time_rows, read_raw_tables, spark_session
from training.feature_spec import STRING
from training.features import (
    FEATURES,
    assemble_features,
    catalogue_key,
    index_keys,
    named_keys,
    online_raw_frame,
    query_terms,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def spark():
    session = spark_session()
    session.conf.set("spark.sql.shuffle.partitions", "2")
    return session


def _truncate(tables: dict[str, pd.DataFrame], before: pd.Timestamp) -> dict[str, pd.DataFrame]:
    requests = tables["requests"][tables["requests"]["ts"] < before]
    return {**tables, "requests": requests,
            "impressions": tables["impressions"][tables["impressions"]["request_id"].isin(requests["request_id"])],
            "interactions": tables["interactions"][tables["interactions"]["ts"] < before]}


def test_online_state_reproduces_point_in_time_features(spark, tmp_path):
    config = simulator.SimConfig(users=40, items=150, requests=160, days=4, seed=3)
    tables = simulator.simulate(config)
    simulator.write_tables(tables, tmp_path / "full")
    # A late request of a user with history, so the user counters are non-trivial.
    clicks = tables["interactions"][tables["interactions"]["event"] == "click"]
    late = tables["requests"].iloc[len(tables["requests"]) * 3 // 4:]
    target = late[late["user_id"].isin(clicks["user_id"])].iloc[0]

    offline = point_in_time_rows(read_raw_tables(spark, tmp_path / "full")).filter(
        f"request_id = '{target.request_id}'").toPandas()
    offline = assemble_features(offline).set_index("item_id")

    simulator.write_tables(_truncate(tables, target.ts), tmp_path / "before")
    item_state, user_state = online_state(read_raw_tables(spark, tmp_path / "before"))
    shown = tables["impressions"][tables["impressions"]["request_id"] == target.request_id]
    items = item_state.toPandas().set_index("item_id").loc[shown["item_id"]].reset_index()
    user = user_state.filter(f"user_id = '{target.user_id}'").toPandas().iloc[0].to_dict()
    assert user["user_clicks"] > 0
    raw = online_raw_frame(target.surface, target.query, int(target.ts.value // 1_000_000), user,
                           items.to_dict("records"))
    online = assemble_features(raw.assign(item_id=items["item_id"].to_numpy())).set_index("item_id")

    for feature in FEATURES:
        left, right = offline.loc[online.index, feature.name], online[feature.name]
        if feature.dtype == STRING:
            assert list(left) == list(right), feature.name
        else:
            np.testing.assert_allclose(left.to_numpy(np.float64), right.to_numpy(np.float64), rtol=1e-5, atol=1e-5,
                                       err_msg=feature.name)


def test_cold_start_user_gets_neutral_features():
    item = {"title": "koraco vintage jeans", "category": "jeans", "brand": "koraco", "brand_tier": "mid",
            "style": "vintage", "size": "M", "condition": "good", "price": 20.0, "photos": 3,
            "category_median_price": 20.0, "listed_ms": 0, "seller_rating": 4.5, "seller_sales": 10,
            "seller_country": "FR", "views": 9, "likes": 1, "bags": 0}
    features = assemble_features(online_raw_frame("search", "Vintage JEANS", 86_400_000 * 3, None, [item])).iloc[0]
    assert features["user_country"] == "unknown" and features["user_history"] == 0.0
    assert features["brand_affinity"] == 0.0 and features["fav_brand"] == 0.0 and features["size_match"] == 0.0
    assert features["query_category_match"] == 1.0 and features["query_style_match"] == 1.0  # case-insensitive
    assert features["query_title_overlap"] == 1.0
    assert features["age_days"] == pytest.approx(3.0)
    assert features["like_rate"] == pytest.approx(2 / 19)
    assert features["log_price_index"] == pytest.approx(0.0)
    assert features["followed_brands"] == 0.0 and features["declared_styles"] == 0.0
    # an item that lacks the attribute too: unknown on both sides is no match
    bare = {**item, "size": None, "seller_country": None}
    features = assemble_features(online_raw_frame("feed", None, 86_400_000 * 3, None, [bare])).iloc[0]
    assert features["size_match"] == 0.0 and features["same_country"] == 0.0
    known = {"user_country": "FR", "user_size": "M"}
    features = assemble_features(online_raw_frame("feed", None, 86_400_000 * 3, known, [item, bare]))
    assert features["size_match"].tolist() == [1.0, 0.0] and features["same_country"].tolist() == [1.0, 0.0]


def test_catalogue_names_match_whatever_their_spelling():
    """A multi-word, capitalised brand: named by a query holding its words, found in the user's history maps
    (keyed by catalogue_key, as the feature job writes them) and among the user's favourites."""
    item = {"title": "Tommy Hilfiger denim jacket", "category": "Jackets", "brand": "Tommy  Hilfiger",
            "brand_tier": "premium", "style": "Classic", "size": "M", "condition": "good", "price": 80.0,
            "photos": 4, "category_median_price": 60.0, "listed_ms": 0, "seller_rating": 4.5, "seller_sales": 10,
            "seller_country": "FR", "views": 9, "likes": 1, "bags": 0}
    other = {**item, "brand": "Tommy", "style": "classic sport"}
    user = {"user_clicks": 4, "user_searches": 3, "user_fav_brands": ["TOMMY HILFIGER"], "user_fav_styles": [],
            "brand_clicks": {"tommy hilfiger": 3, "tommy": 1}, "brand_views": {"tommy hilfiger": 5},
            "style_clicks": {"classic": 2}, "search_terms": {"tommy hilfiger": 2, "classic": 1}}
    frame = online_raw_frame("search", "hilfiger TOMMY jackets", 86_400_000, user, [item, other])
    named, unnamed = assemble_features(frame).to_dict("records")
    assert (named["query_brand_match"], named["query_category_match"], named["query_style_match"]) == (1, 1, 0)
    assert named["fav_brand"] == 1.0
    assert (named["followed_brands"], named["declared_styles"]) == (1.0, 0.0)
    assert named["brand_affinity"] == pytest.approx(3 / 5) and named["brand_ctr"] == pytest.approx(3 / 6)
    assert named["brand_searched"] == pytest.approx(2 / 4) and named["style_searched"] == pytest.approx(1 / 4)
    assert named["style_affinity"] == pytest.approx(2 / 5)
    # "Tommy" is another brand, and "classic sport" a style the query does not name in full
    assert (unnamed["query_brand_match"], unnamed["query_style_match"], unnamed["fav_brand"]) == (1, 0, 0)
    assert unnamed["brand_affinity"] == pytest.approx(1 / 5) and unnamed["brand_searched"] == 0.0


def test_profile_counts_are_distinct_catalogue_names_online_and_offline():
    """followed_brands / declared_styles count distinct catalogue keys: the same for one user's list shared by
    every row (online) and for a list per row (offline), and 0 without a profile."""
    from training.features import feature_columns, online_raw_columns

    item = {"title": "acme coat", "category": "coats", "brand": "acme", "brand_tier": "mid", "style": "vintage",
            "size": "M", "condition": "good", "price": 20.0, "photos": 3, "category_median_price": 20.0,
            "listed_ms": 0, "seller_rating": 4.5, "seller_sales": 10, "seller_country": "FR", "views": 9,
            "likes": 1, "bags": 0}
    user = {"user_fav_brands": ["ACME", "acme ", "Zeta"], "user_fav_styles": ["vintage", ""]}
    shared = online_raw_columns("feed", None, 86_400_000, user, [item, item])
    online = feature_columns(shared)
    assert online["followed_brands"].tolist() == [2.0, 2.0] and online["declared_styles"].tolist() == [1.0, 1.0]
    per_row = {**shared, "user_fav_brands": np.array([["zeta"], None], dtype=object),
               "user_fav_styles": np.array([np.array(["a", "b", "c"]), np.array([], dtype=object)], dtype=object)}
    offline = feature_columns(per_row)
    assert offline["followed_brands"].tolist() == [1.0, 0.0] and offline["declared_styles"].tolist() == [3.0, 0.0]


def test_user_counters_read_each_row_s_own_key():
    """The counters are looked up once per distinct key and spread back to the rows: each row still gets its own
    key's count, for keys pandas' string hashing would confuse (NUL), empty and missing ones, and no rows."""
    from training.features import USER_MAP_LOOKUPS, online_raw_columns

    item = {"title": "t", "category": "coats", "brand_tier": "mid", "size": "M", "condition": "good", "price": 20.0,
            "photos": 3, "category_median_price": 20.0, "listed_ms": 0, "seller_rating": 4.5, "seller_sales": 10,
            "seller_country": "FR", "views": 9, "likes": 1, "bags": 0}
    brands = ["acme\x00a", "acme\x00b", "Zeta", "", None, "zeta", "acme\x00a", "\x00", "ACME"]
    items = [{**item, "brand": brand, "style": ["vintage", "boho"][i % 2]} for i, brand in enumerate(brands)]
    user = {"brand_clicks": {"acme\x00a": 1, "acme\x00b": 2, "zeta": 3, "\x00": 4, "acme": 5},
            "brand_views": {"acme\x00b": 7}, "style_clicks": {"boho": 6}}
    raw = online_raw_columns("feed", None, 86_400_000, user, items)
    assert raw["user_brand_clicks"].tolist() == [1, 2, 3, 0, 0, 3, 1, 4, 5]
    assert raw["user_brand_views"].tolist() == [0, 7, 0, 0, 0, 0, 0, 0, 0]
    assert raw["user_style_clicks"].tolist() == [0, 6] * 4 + [0]
    empty = online_raw_columns("feed", None, 86_400_000, user, [])
    for _, _, column in USER_MAP_LOOKUPS:
        assert empty[column].dtype == np.float64 and empty[column].shape == (0,)


def test_named_keys_finds_every_catalogue_name_a_query_holds():
    index = index_keys(["tommy hilfiger", "tommy", "classic", "boho chic", "zeta"])
    assert named_keys(query_terms("Hilfiger tommy classic"), index) == ["classic", "tommy", "tommy hilfiger"]
    assert named_keys(query_terms("chic dress"), index) == []
    assert named_keys(query_terms(""), index) == []
    assert catalogue_key("  Boho\u00a0CHIC ") == "boho chic" and catalogue_key(None) == ""
