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


def _tokens(text: object) -> set[str]:
    return set(str(text).lower().split()) if isinstance(text, str) and text else set()


def _member(values: pd.Series, lists: pd.Series) -> np.ndarray:
    member = [v in (ls if ls is not None else ()) for v, ls in zip(values, lists, strict=True)]
    return np.array(member, dtype=np.float32)


def assemble_features(raw: pd.DataFrame) -> pd.DataFrame:
    """Model features for each row of ``raw`` (columns: ``RAW_COLUMNS``); other columns pass through."""
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise KeyError(f"assemble_features: missing raw columns {missing}")
    out = raw.drop(columns=[c for c in RAW_COLUMNS if c != "ts_ms"]).copy()
    num = lambda c: pd.to_numeric(raw[c], errors="coerce").fillna(0.0).to_numpy(np.float64)  # noqa: E731
    clicks = num("user_clicks")
    out["surface"] = raw["surface"].fillna("feed").astype(str).to_numpy()
    out["user_country"] = raw["user_country"].fillna("unknown").astype(str).to_numpy()
    out["user_history"] = clicks
    signup = pd.to_numeric(raw["user_signup_ms"], errors="coerce").to_numpy(np.float64)
    out["user_tenure_days"] = np.where(np.isnan(signup), 0.0, np.maximum(num("ts_ms") - signup, 0) / DAY_MS)

    out["item_category"] = raw["category"].astype(str).to_numpy()
    out["item_style"] = raw["style"].astype(str).to_numpy()
    out["item_condition"] = raw["condition"].astype(str).to_numpy()
    out["item_brand_tier"] = raw["brand_tier"].astype(str).to_numpy()
    lpi = np.log(np.maximum(num("price"), 0.01) / np.maximum(num("category_median_price"), 0.01))
    out["log_price_index"] = lpi
    usual = np.divide(num("user_lpi_sum"), clicks, out=np.zeros_like(clicks), where=clicks > 0)
    out["price_gap"] = np.where(clicks > 0, np.abs(lpi - usual), 0.0)
    out["age_days"] = np.maximum(num("ts_ms") - num("listed_ms"), 0) / DAY_MS
    out["photos"] = num("photos")
    out["seller_rating"] = num("seller_rating")
    out["seller_sales"] = num("seller_sales")
    out["same_country"] = (raw["seller_country"].to_numpy() == raw["user_country"].to_numpy()).astype(np.float64)
    out["size_match"] = (raw["size"].to_numpy() == raw["user_size"].to_numpy()).astype(np.float64)
    views, likes = num("views"), num("likes")
    out["views"], out["likes"], out["bags"] = views, likes, num("bags")
    out["like_rate"] = (likes + 1.0) / (views + 10.0)
    denominator = clicks + 1.0
    out["brand_affinity"] = num("user_brand_clicks") / denominator
    out["style_affinity"] = num("user_style_clicks") / denominator
    out["category_affinity"] = num("user_category_clicks") / denominator
    out["fav_brand"] = _member(raw["brand"], raw["user_fav_brands"])
    out["fav_style"] = _member(raw["style"], raw["user_fav_styles"])

    query = [_tokens(q) for q in raw["query"]]
    out["query_category_match"] = [float(c in q) for c, q in zip(raw["category"], query, strict=True)]
    out["query_brand_match"] = [float(b in q) for b, q in zip(raw["brand"], query, strict=True)]
    out["query_style_match"] = [float(s in q) for s, q in zip(raw["style"], query, strict=True)]
    out["query_title_overlap"] = [len(q & _tokens(t)) / len(q) if q else 0.0
                                  for t, q in zip(raw["title"], query, strict=True)]
    for feature in FEATURES:
        if feature.dtype == FLOAT:
            out[feature.name] = np.asarray(out[feature.name], dtype=np.float32)
    return out


def online_raw_frame(surface: str, query: str | None, ts_ms: int, user: Mapping[str, Any] | None,
                     items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """RAW_COLUMNS rows for one request from feature-store state (``USER_STATE_COLUMNS``, ``ITEM_STATE_COLUMNS``).

    An unknown user (``None``) is a cold start: no country, size, favourites or history.
    """
    user = user or {}
    per_key = {key: dict(user.get(f"{key}_clicks") or {}) for key in ("brand", "style", "category")}
    rows = []
    for item in items:
        row = {c: item.get(c) for c in ITEM_STATE_COLUMNS}
        row.update(surface=surface, query=query, ts_ms=ts_ms, user_country=user.get("user_country"),
                   user_size=user.get("user_size"), user_fav_brands=user.get("user_fav_brands"),
                   user_fav_styles=user.get("user_fav_styles"), user_signup_ms=user.get("user_signup_ms"),
                   user_clicks=user.get("user_clicks") or 0, user_lpi_sum=user.get("user_lpi_sum") or 0.0,
                   **{f"user_{key}_clicks": per_key[key].get(item.get(key), 0) for key in per_key})
        rows.append(row)
    return pd.DataFrame(rows, columns=list(RAW_COLUMNS))
