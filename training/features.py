"""Marketplace ranking features: their definitions and the one function that computes them.

``assemble_features`` turns one row per (request, candidate item) of raw, point-in-time state (request context,
user profile and history counters, item attributes and popularity counters) into model features. The Spark job
calls it through ``mapInPandas`` with counters computed from events strictly before each request; the online
feature store calls it with the counters as of now. Neither re-implements it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.api.types import is_numeric_dtype

from training.feature_spec import CONTEXT, FLOAT, ITEM, STRING, Feature

DAY_MS = 86_400_000

#: Raw point-in-time columns ``assemble_features`` reads, and their meaning.
RAW_COLUMNS: dict[str, str] = {
    "surface": "search | feed",
    "query": "search text, null on the feed",
    "ts_ms": "request time, epoch ms",
    "user_country": "user's country (null for an unknown user)",
    "user_size": "user's declared size",
    "user_fav_brands": "brands the user follows (list)",
    "user_fav_styles": "styles the user declared (list)",
    "user_signup_ms": "user's sign-up time, epoch ms",
    "user_clicks": "user's clicks before the request",
    "user_lpi_sum": "sum of log price index of the items the user clicked before the request",
    "category": "item category",
    "brand": "item brand",
    "brand_tier": "budget | mid | premium | luxury",
    "style": "item style tag",
    "size": "item size",
    "condition": "new_with_tags | very_good | good | satisfactory",
    "price": "item price",
    "photos": "number of photos in the listing",
    "category_median_price": "median listed price of the item's category",
    "listed_ms": "listing time, epoch ms",
    "seller_rating": "seller's rating 1..5",
    "seller_sales": "seller's completed sales",
    "seller_country": "seller's country",
    "title": "listing title",
    "views": "item impressions before the request (plus the catalogue's starting count)",
    "likes": "item likes before the request (plus the catalogue's starting count)",
    "bags": "item bag adds before the request",
    "user_brand_clicks": "user's clicks on this brand before the request",
    "user_style_clicks": "user's clicks on this style before the request",
    "user_category_clicks": "user's clicks on this category before the request",
}

FEATURES: tuple[Feature, ...] = (
    Feature("surface", CONTEXT, STRING, description="search or feed"),
    Feature("user_country", CONTEXT, STRING, description="user's country"),
    Feature("user_history", CONTEXT, transform="log1p", description="user's clicks so far"),
    Feature("user_tenure_days", CONTEXT, transform="log1p", description="days since sign-up"),
    Feature("item_category", ITEM, STRING),
    Feature("item_style", ITEM, STRING),
    Feature("item_condition", ITEM, STRING),
    Feature("item_brand_tier", ITEM, STRING),
    Feature("log_price_index", ITEM, description="log(price / category median price)"),
    Feature("price_gap", ITEM, description="|log price index - user's usual| (0 without history)"),
    Feature("age_days", ITEM, transform="log1p", description="days since listing"),
    Feature("photos", ITEM, description="photos in the listing"),
    Feature("seller_rating", ITEM),
    Feature("seller_sales", ITEM, transform="log1p"),
    Feature("same_country", ITEM, description="seller in the user's country"),
    Feature("size_match", ITEM, description="item size is the user's size"),
    Feature("views", ITEM, transform="log1p"),
    Feature("likes", ITEM, transform="log1p"),
    Feature("bags", ITEM, transform="log1p"),
    Feature("like_rate", ITEM, description="(likes + 1) / (views + 10)"),
    Feature("brand_affinity", ITEM, description="share of the user's clicks on this brand"),
    Feature("style_affinity", ITEM, description="share of the user's clicks on this style"),
    Feature("category_affinity", ITEM, description="share of the user's clicks on this category"),
    Feature("fav_brand", ITEM, description="user follows the brand"),
    Feature("fav_style", ITEM, description="user declared the style"),
    Feature("query_category_match", ITEM),
    Feature("query_brand_match", ITEM),
    Feature("query_style_match", ITEM),
    Feature("query_title_overlap", ITEM, description="share of query tokens in the title"),
)

#: Feature-store state per item and per user (as of now): ``online_raw_frame`` turns it into RAW_COLUMNS rows.
ITEM_STATE_COLUMNS = ("title", "category", "brand", "brand_tier", "style", "size", "condition", "price", "photos",
                      "category_median_price", "listed_ms", "seller_rating", "seller_sales", "seller_country",
                      "views", "likes", "bags")
USER_STATE_COLUMNS = ("user_country", "user_size", "user_fav_brands", "user_fav_styles", "user_signup_ms",
                      "user_clicks", "user_lpi_sum", "brand_clicks", "style_clicks", "category_clicks")

#: Output columns that are not features but travel with each list.
LIST_COLUMNS = ("request_id", "user_id", "ts_ms", "split")
ITEM_COLUMNS = ("item_id", "position", "label", "relevance", "true_score")


def popularity_recency(views: np.ndarray, likes: np.ndarray, bags: np.ndarray, age_days: np.ndarray) -> np.ndarray:
    """The legacy ranking (popularity + recency, nothing personal): the simulator's logging policy and the
    ranking API's fallback when the model cannot answer."""
    return np.log1p(np.maximum(views + 3 * likes + 5 * bags, 0.0)) - age_days / 14.0


def _tokens(text: object) -> set[str]:
    return set(str(text).lower().split()) if isinstance(text, str) and text else set()


def _member(values: pd.Series, lists: pd.Series) -> np.ndarray:
    member = [v in (ls if ls is not None else ()) for v, ls in zip(values, lists, strict=True)]
    return np.array(member, dtype=np.float32)


def _num(column: pd.Series) -> np.ndarray:
    """A raw column as float64 with missing values as 0 (vectorised; object columns are coerced)."""
    values = column.to_numpy() if is_numeric_dtype(column) else pd.to_numeric(column, errors="coerce").to_numpy()
    values = np.asarray(values, dtype=np.float64)
    return np.where(np.isnan(values), 0.0, values)


def assemble_features(raw: pd.DataFrame) -> pd.DataFrame:
    """Model features for each row of ``raw`` (columns: ``RAW_COLUMNS``); other columns pass through.

    It runs once per Spark batch offline and once per ranking request online, so columns are built as NumPy
    arrays and framed once (per-column DataFrame assignment costs more than the arithmetic).
    """
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise KeyError(f"assemble_features: missing raw columns {missing}")
    clicks, ts = _num(raw["user_clicks"]), _num(raw["ts_ms"])
    signup = pd.to_numeric(raw["user_signup_ms"], errors="coerce").to_numpy(np.float64)
    lpi = np.log(np.maximum(_num(raw["price"]), 0.01) / np.maximum(_num(raw["category_median_price"]), 0.01))
    usual = np.divide(_num(raw["user_lpi_sum"]), clicks, out=np.zeros_like(clicks), where=clicks > 0)
    views, likes = _num(raw["views"]), _num(raw["likes"])
    denominator = clicks + 1.0
    query = [_tokens(q) for q in raw["query"]]
    features = {
        "surface": raw["surface"].fillna("feed").astype(str).to_numpy(),
        "user_country": raw["user_country"].fillna("unknown").astype(str).to_numpy(),
        "user_history": clicks,
        "user_tenure_days": np.where(np.isnan(signup), 0.0, np.maximum(ts - signup, 0) / DAY_MS),
        "item_category": raw["category"].astype(str).to_numpy(),
        "item_style": raw["style"].astype(str).to_numpy(),
        "item_condition": raw["condition"].astype(str).to_numpy(),
        "item_brand_tier": raw["brand_tier"].astype(str).to_numpy(),
        "log_price_index": lpi,
        "price_gap": np.where(clicks > 0, np.abs(lpi - usual), 0.0),
        "age_days": np.maximum(ts - _num(raw["listed_ms"]), 0) / DAY_MS,
        "photos": _num(raw["photos"]),
        "seller_rating": _num(raw["seller_rating"]),
        "seller_sales": _num(raw["seller_sales"]),
        "same_country": raw["seller_country"].to_numpy() == raw["user_country"].to_numpy(),
        "size_match": raw["size"].to_numpy() == raw["user_size"].to_numpy(),
        "views": views,
        "likes": likes,
        "bags": _num(raw["bags"]),
        "like_rate": (likes + 1.0) / (views + 10.0),
        "brand_affinity": _num(raw["user_brand_clicks"]) / denominator,
        "style_affinity": _num(raw["user_style_clicks"]) / denominator,
        "category_affinity": _num(raw["user_category_clicks"]) / denominator,
        "fav_brand": _member(raw["brand"], raw["user_fav_brands"]),
        "fav_style": _member(raw["style"], raw["user_fav_styles"]),
        "query_category_match": [c in q for c, q in zip(raw["category"], query, strict=True)],
        "query_brand_match": [b in q for b, q in zip(raw["brand"], query, strict=True)],
        "query_style_match": [s in q for s, q in zip(raw["style"], query, strict=True)],
        "query_title_overlap": [len(q & _tokens(t)) / len(q) if q else 0.0
                                for t, q in zip(raw["title"], query, strict=True)],
    }
    for feature in FEATURES:
        if feature.dtype == FLOAT:
            features[feature.name] = np.asarray(features[feature.name], dtype=np.float32)
    passthrough = raw.drop(columns=[c for c in RAW_COLUMNS if c != "ts_ms"])
    return pd.concat([passthrough, pd.DataFrame(features, index=raw.index)], axis=1)


def online_raw_frame(surface: str, query: str | None, ts_ms: int, user: Mapping[str, Any] | None,
                     items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """RAW_COLUMNS rows for one request from feature-store state (``USER_STATE_COLUMNS``, ``ITEM_STATE_COLUMNS``).

    An unknown user (``None``) is a cold start: no country, size, favourites or history.
    """
    user = user or {}
    n = len(items)
    columns: dict[str, Any] = {c: [item.get(c) for item in items] for c in ITEM_STATE_COLUMNS}
    shared = {"surface": surface, "query": query, "ts_ms": ts_ms, "user_country": user.get("user_country"),
              "user_size": user.get("user_size"), "user_signup_ms": user.get("user_signup_ms"),
              "user_clicks": user.get("user_clicks") or 0, "user_lpi_sum": user.get("user_lpi_sum") or 0.0}
    columns.update({name: [value] * n for name, value in shared.items()})
    for name in ("user_fav_brands", "user_fav_styles"):  # lists: one object per row, not broadcast elementwise
        columns[name] = [user.get(name)] * n
    for key in ("brand", "style", "category"):
        clicks = dict(user.get(f"{key}_clicks") or {})
        columns[f"user_{key}_clicks"] = [clicks.get(value, 0) for value in columns[key]]
    return pd.DataFrame(columns, columns=list(RAW_COLUMNS))
