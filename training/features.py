"""Marketplace ranking features: their definitions and the one function that computes them.

``assemble_features`` turns one row per (request, candidate item) of raw, point-in-time state (request context,
user profile and history counters, item attributes and popularity counters) into model features. The Spark job
calls it through ``mapInPandas`` with counters computed from events strictly before each request; the online
feature store calls it with the counters as of now. Neither re-implements it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
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
    "user_brand_views": "user's impressions of this brand before the request",
    "user_style_views": "user's impressions of this style before the request",
    "user_searches": "user's searches before the request",
    "user_brand_searches": "user's searches before the request whose query names this brand",
    "user_style_searches": "user's searches before the request whose query names this style",
}

FEATURES: tuple[Feature, ...] = (
    Feature("surface", CONTEXT, STRING, description="search or feed"),
    Feature("user_country", CONTEXT, STRING, description="user's country"),
    Feature("user_history", CONTEXT, transform="log1p", description="user's clicks so far"),
    Feature("user_tenure_days", CONTEXT, transform="log1p", description="days since sign-up"),
    # How complete the declared profile is: with every liked brand followed, an unfollowed brand is news; with
    # one followed, most of the user's brands are still unknown (fav_brand = 0 says less).
    Feature("followed_brands", CONTEXT, description="number of brands the user follows"),
    Feature("declared_styles", CONTEXT, description="number of styles the user declared"),
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
    # Affinity by exposure: a share of clicks cannot tell a liked brand from one the old ranker kept showing.
    Feature("brand_ctr", ITEM, description="user's clicks per impression of this brand: clicks / (views + 1)"),
    Feature("style_ctr", ITEM, description="user's clicks per impression of this style: clicks / (views + 1)"),
    # Query history: a user names the brands and styles they want, including those they never declared.
    Feature("brand_searched", ITEM, description="user's earlier searches naming this brand / (searches + 1)"),
    Feature("style_searched", ITEM, description="user's earlier searches naming this style / (searches + 1)"),
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
                      "user_clicks", "user_lpi_sum", "brand_clicks", "style_clicks", "category_clicks",
                      "brand_views", "style_views", "user_searches", "search_terms")
#: The per-(user, key) history counters, in one table: raw column, the feature job's event counter (``click``,
#: ``view``, or ``named``: a search naming the key), the item attribute whose ``catalogue_key`` it is counted and
#: looked up by, and the user-state map that holds it online ({key: count}).
USER_KEY_COUNTERS = (("user_brand_clicks", "click", "brand", "brand_clicks"),
                     ("user_style_clicks", "click", "style", "style_clicks"),
                     ("user_category_clicks", "click", "category", "category_clicks"),
                     ("user_brand_views", "view", "brand", "brand_views"),
                     ("user_style_views", "view", "style", "style_views"),
                     ("user_brand_searches", "named", "brand", "search_terms"),
                     ("user_style_searches", "named", "style", "search_terms"))
#: How the user state's per-key maps fill raw columns online: (map, item attribute, raw column).
USER_MAP_LOOKUPS = tuple((state_map, key, column) for column, _, key, state_map in USER_KEY_COUNTERS)

#: Raw columns that are numbers (the rest are text, lists or maps): the online path builds them as float64.
NUMERIC_RAW_COLUMNS = frozenset({"ts_ms", "user_signup_ms", "user_clicks", "user_lpi_sum", "price", "photos",
                                 "category_median_price", "listed_ms", "seller_rating", "seller_sales", "views",
                                 "likes", "bags", "user_brand_clicks", "user_style_clicks", "user_category_clicks",
                                 "user_brand_views", "user_style_views", "user_searches", "user_brand_searches",
                                 "user_style_searches"})

#: Bump when a feature's meaning (or the spec's position-bias estimate) changes but no name does: cached
#: feature-job output is then rebuilt. 4: eta by binomial maximum likelihood. 5: missing values (an item without a
#: category is kept and priced against the catalogue; unknown on both sides is no size or country match): the
#: simulator writes none, so its outputs are the same as version 4's.
FEATURE_LOGIC_VERSION = 5


def features_fingerprint() -> str:
    """What the feature job's output depends on in this code (written to its ``stats.json``): data built by
    another version is rebuilt rather than reused (``pipelines.local.ensure_features``)."""
    definition = [FEATURE_LOGIC_VERSION, [(f.name, f.scope, f.dtype, f.transform) for f in FEATURES],
                  list(RAW_COLUMNS), ITEM_STATE_COLUMNS, USER_STATE_COLUMNS, USER_MAP_LOOKUPS]
    return hashlib.sha256(json.dumps(definition).encode()).hexdigest()[:16]


#: Output columns that are not features but travel with each list.
LIST_COLUMNS = ("request_id", "user_id", "ts_ms", "split")
ITEM_COLUMNS = ("item_id", "position", "label", "relevance", "true_score")


def popularity_recency(views: np.ndarray, likes: np.ndarray, bags: np.ndarray, age_days: np.ndarray) -> np.ndarray:
    """The legacy ranking (popularity + recency, nothing personal): the simulator's logging policy and the
    ranking API's fallback when the model cannot answer."""
    return np.log1p(np.maximum(views + 3 * likes + 5 * bags, 0.0)) - age_days / 14.0


def query_terms(text: object) -> frozenset[str]:
    """The terms of a query or a title: lower case, split on whitespace (``str.split``), distinct. The query match
    features use it here, and the feature job's search-history counters through a pandas UDF: one rule."""
    return frozenset(str(text).lower().split()) if isinstance(text, str) and text else frozenset()


#: Titles repeat across lists and requests: tokenising each once is most of ``query_title_overlap``'s cost.
_title_tokens = functools.lru_cache(maxsize=1 << 17)(query_terms)


@functools.lru_cache(maxsize=1 << 16)  # a catalogue has few distinct names; the API keys 300 candidates a request
def catalogue_key(value: object) -> str:
    """A brand, style or category as queries name it and as the user-history counters key it: lower case, words
    joined by one space (``"Tommy  Hilfiger"`` -> ``"tommy hilfiger"``); "" when missing. Queries are split the
    same way (``query_terms``), so a catalogue's capitals or spacing never hide a match."""
    return " ".join(str(value).lower().split()) if isinstance(value, str) else ""


@functools.lru_cache(maxsize=1 << 16)
def _key_words(value: object) -> frozenset[str]:
    return frozenset(catalogue_key(value).split())


def named_by(query: frozenset[str], value: object) -> bool:
    """Whether a query (``query_terms``) names a brand, style or category: every word of it is a query term."""
    words = _key_words(value)
    return bool(words) and words <= query


def index_keys(keys: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """Catalogue keys by each of their words, for ``named_keys``."""
    by_word: dict[str, set[str]] = {}
    for key in keys:
        for word in key.split():
            by_word.setdefault(word, set()).add(key)
    return {word: tuple(sorted(found)) for word, found in by_word.items()}


def named_keys(query: frozenset[str], keys_by_word: Mapping[str, Sequence[str]]) -> list[str]:
    """The catalogue keys (``index_keys``) a query names, sorted: what the feature job counts as a user's
    searches for a brand or a style."""
    return sorted({key for word in query for key in keys_by_word.get(word, ()) if named_by(query, key)})


def _keys(values: np.ndarray) -> Sequence[str]:
    """``catalogue_key`` of every value, computed once per distinct value (candidates repeat a few names); the
    values themselves when they are keys already (a catalogue in lower case: no pass over the rows)."""
    distinct = {value: catalogue_key(value) for value in set(values)}
    if all(key == value for value, key in distinct.items()):
        return values
    return [distinct[value] for value in values]


def _named(values: np.ndarray, queries: list[frozenset[str]]) -> list[bool]:
    """``named_by`` per row, once per distinct value when every row has the same query (online: one request)."""
    first = queries[0] if queries else frozenset()
    if all(query is first for query in queries):
        distinct = {value: named_by(first, value) for value in set(values)}
        return [distinct[value] for value in values]
    return [named_by(query, value) for value, query in zip(values, queries, strict=True)]


def _favourite_keys(names: Any) -> frozenset[str]:
    return frozenset(map(catalogue_key, names if names is not None else ())) - {""}


def _member(values: np.ndarray, lists: np.ndarray) -> np.ndarray:
    """1 where the row's value is in the row's list (a user's favourite brands or styles), compared as keys."""
    keys = _keys(values)
    first = lists[0] if len(lists) else None
    if all(names is first for names in lists):  # online: one user's list object in every row, keyed once
        favourites = _favourite_keys(first)
        return np.array([key in favourites for key in keys], dtype=np.float32)
    return np.array([key in _favourite_keys(names) for key, names in zip(keys, lists, strict=True)],
                    dtype=np.float32)


def _key_count(lists: np.ndarray) -> np.ndarray:
    """How many distinct keys each row's list holds (a user's followed brands or declared styles)."""
    first = lists[0] if len(lists) else None
    if all(names is first for names in lists):  # online: one user's list object in every row, counted once
        return np.full(len(lists), len(_favourite_keys(first)), dtype=np.float64)
    return np.array([len(_favourite_keys(names)) for names in lists], dtype=np.float64)


def _same(left: np.ndarray, right: Any) -> np.ndarray:
    """Equal and known on both sides: a cold-start user (no size, no country) matches no item, even one that has
    none either."""
    return (left == right) & pd.notna(left) & pd.notna(right)


def _num(column: np.ndarray) -> np.ndarray:
    """A raw column as float64 with missing values as 0 (object columns are coerced: None, text -> 0)."""
    if column.dtype.kind not in "biuf":
        column = pd.to_numeric(column, errors="coerce")
    values = np.asarray(column, dtype=np.float64)
    return np.where(np.isnan(values), 0.0, values)


def _text(column: np.ndarray) -> np.ndarray:
    """str() of every value, as an object array (what TF string inputs take)."""
    if column.dtype == object and set(map(type, column)) <= {str}:
        return column  # already text: skip the round trip through a fixed-width unicode array
    return column.astype(str).astype(object)


def feature_columns(raw: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Model features (``FEATURES``, float features as float32) from raw columns (``RAW_COLUMNS``: equal-length
    arrays or lists, one row per (request, candidate item)).

    The one implementation of the feature logic: ``assemble_features`` runs it per Spark batch offline and the
    ranking API per request online (on plain NumPy arrays: a DataFrame per request costs more than the maths).
    """
    missing = [c for c in RAW_COLUMNS if c not in raw]
    if missing:
        raise KeyError(f"feature_columns: missing raw columns {missing}")
    col = {c: np.asarray(raw[c]) for c in RAW_COLUMNS}
    clicks, ts = _num(col["user_clicks"]), _num(col["ts_ms"])
    signup = np.asarray(pd.to_numeric(col["user_signup_ms"], errors="coerce"), dtype=np.float64)
    lpi = np.log(np.maximum(_num(col["price"]), 0.01) / np.maximum(_num(col["category_median_price"]), 0.01))
    usual = np.divide(_num(col["user_lpi_sum"]), clicks, out=np.zeros_like(clicks), where=clicks > 0)
    views, likes = _num(col["views"]), _num(col["likes"])
    denominator, searches = clicks + 1.0, _num(col["user_searches"]) + 1.0
    tokens: dict[Any, frozenset[str]] = {}  # one query per request: tokenised once, not once per candidate
    query = [tokens[q] if q in tokens else tokens.setdefault(q, query_terms(q)) for q in col["query"]]
    surface, country = col["surface"], col["user_country"]
    features = {
        "surface": _text(np.where(pd.isna(surface), "feed", surface)),
        "user_country": _text(np.where(pd.isna(country), "unknown", country)),
        "user_history": clicks,
        "user_tenure_days": np.where(np.isnan(signup), 0.0, np.maximum(ts - signup, 0) / DAY_MS),
        "followed_brands": _key_count(col["user_fav_brands"]),
        "declared_styles": _key_count(col["user_fav_styles"]),
        "item_category": _text(col["category"]),
        "item_style": _text(col["style"]),
        "item_condition": _text(col["condition"]),
        "item_brand_tier": _text(col["brand_tier"]),
        "log_price_index": lpi,
        "price_gap": np.where(clicks > 0, np.abs(lpi - usual), 0.0),
        "age_days": np.maximum(ts - _num(col["listed_ms"]), 0) / DAY_MS,
        "photos": _num(col["photos"]),
        "seller_rating": _num(col["seller_rating"]),
        "seller_sales": _num(col["seller_sales"]),
        "same_country": _same(col["seller_country"], country),
        "size_match": _same(col["size"], col["user_size"]),
        "views": views,
        "likes": likes,
        "bags": _num(col["bags"]),
        "like_rate": (likes + 1.0) / (views + 10.0),
        "brand_affinity": _num(col["user_brand_clicks"]) / denominator,
        "style_affinity": _num(col["user_style_clicks"]) / denominator,
        "category_affinity": _num(col["user_category_clicks"]) / denominator,
        "brand_ctr": _num(col["user_brand_clicks"]) / (_num(col["user_brand_views"]) + 1.0),
        "style_ctr": _num(col["user_style_clicks"]) / (_num(col["user_style_views"]) + 1.0),
        "brand_searched": _num(col["user_brand_searches"]) / searches,
        "style_searched": _num(col["user_style_searches"]) / searches,
        "fav_brand": _member(col["brand"], col["user_fav_brands"]),
        "fav_style": _member(col["style"], col["user_fav_styles"]),
        "query_category_match": _named(col["category"], query),
        "query_brand_match": _named(col["brand"], query),
        "query_style_match": _named(col["style"], query),
        "query_title_overlap": [len(q & _title_tokens(t)) / len(q) if q else 0.0
                                for t, q in zip(col["title"], query, strict=True)],
    }
    for feature in FEATURES:
        if feature.dtype == FLOAT:
            features[feature.name] = np.asarray(features[feature.name], dtype=np.float32)
    return features


def assemble_features(raw: pd.DataFrame) -> pd.DataFrame:
    """``feature_columns`` of a DataFrame, framed with ``raw``'s other columns (and ``ts_ms``) passed through."""
    missing = [c for c in RAW_COLUMNS if c not in raw.columns]
    if missing:
        raise KeyError(f"assemble_features: missing raw columns {missing}")
    features = feature_columns({c: raw[c].to_numpy() for c in RAW_COLUMNS})
    passthrough = raw.drop(columns=[c for c in RAW_COLUMNS if c != "ts_ms"])
    return pd.concat([passthrough, pd.DataFrame(features, index=raw.index)], axis=1)


def _state_column(values: list, numeric: bool) -> np.ndarray:
    """Numbers as float64 (None -> NaN: missing, as offline), falling back to objects for anything else."""
    if numeric:
        try:
            return np.array(values, dtype=np.float64)
        except (TypeError, ValueError):  # text in a numeric field: _num coerces it to 0 as offline
            pass
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def _repeat(value: Any, n: int) -> np.ndarray:
    column = np.empty(n, dtype=object)
    column.fill(value)  # one object per row, lists included (never broadcast elementwise)
    return column


def item_state_columns(items: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Item states (``ITEM_STATE_COLUMNS`` per item) as columns: numbers float64 (missing: NaN), the rest objects.

    A store can build them once for its whole catalogue and hand out rows (``np.take``): the result is the same.
    """
    return {c: _state_column([item.get(c) for item in items], c in NUMERIC_RAW_COLUMNS) for c in ITEM_STATE_COLUMNS}


def _codes(values: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
    """(each value's index in ``distinct``, the distinct values in first-seen order)."""
    index: dict[Any, int] = {}
    codes = np.fromiter((index.setdefault(value, len(index)) for value in values), np.intp, count=len(values))
    return codes, list(index)


def online_raw_columns(surface: str, query: str | None, ts_ms: int, user: Mapping[str, Any] | None,
                       items: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """RAW_COLUMNS for one request from feature-store state (``USER_STATE_COLUMNS``, and ``ITEM_STATE_COLUMNS``
    per item, or already as columns: ``item_state_columns``).

    An unknown user (``None``) is a cold start: no country, size, favourites or history.
    """
    user = user or {}
    columns: dict[str, np.ndarray] = dict(items) if isinstance(items, Mapping) else item_state_columns(items)
    n = len(columns[ITEM_STATE_COLUMNS[0]])
    shared = {"surface": surface, "query": query, "ts_ms": ts_ms, "user_country": user.get("user_country"),
              "user_size": user.get("user_size"), "user_signup_ms": user.get("user_signup_ms"),
              "user_clicks": user.get("user_clicks") or 0, "user_lpi_sum": user.get("user_lpi_sum") or 0.0,
              "user_searches": user.get("user_searches") or 0,
              "user_fav_brands": user.get("user_fav_brands"), "user_fav_styles": user.get("user_fav_styles")}
    columns.update({name: _state_column([value] * n, True) if name in NUMERIC_RAW_COLUMNS else _repeat(value, n)
                    for name, value in shared.items()})
    maps = {name: dict(user.get(name) or {}) for name, _, _ in USER_MAP_LOOKUPS}  # JSON objects or (key, value)s
    # Each key column coded once (candidates repeat a few brands, styles, categories): a counter then looks up
    # the distinct keys only, instead of one Python pass over the rows per counter. A dict, not pd.factorize:
    # pandas' string hashing stops at a NUL, and a key is whatever the catalogue holds.
    coded = {key: _codes(_keys(columns[key])) for key in {key for _, key, _ in USER_MAP_LOOKUPS}}
    for name, key, column in USER_MAP_LOOKUPS:
        counts, (codes, distinct) = maps[name], coded[key]
        columns[column] = np.array([counts.get(value, 0) for value in distinct], dtype=np.float64)[codes]
    return {c: columns[c] for c in RAW_COLUMNS}


def online_raw_frame(surface: str, query: str | None, ts_ms: int, user: Mapping[str, Any] | None,
                     items: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``online_raw_columns`` as a DataFrame (for inspection and tests; the API uses the columns directly)."""
    return pd.DataFrame(online_raw_columns(surface, query, ts_ms, user, items), columns=list(RAW_COLUMNS))
