"""Seeded simulator of a second-hand fashion marketplace.

It writes the raw logs a real marketplace lands in S3 (users, items, requests, impressions, interactions) and,
because it knows every user's latent taste, each impression's true relevance. The signals a real ranker uses
drive that relevance: query intent, the user's styles / brands / size / price, item quality (visible through
popularity and seller stats), recency, condition and seller location. The logging (legacy) policy orders
impressions by popularity and recency only, and feedback is position-biased: examination falls with rank.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from training.features import popularity_recency

CATEGORIES = ["dresses", "tops", "jeans", "coats", "sneakers", "boots", "bags", "skirts", "knitwear", "jackets"]
CATEGORY_BASE_PRICE = [28, 14, 24, 55, 45, 50, 40, 18, 22, 48]
STYLES = ["vintage", "streetwear", "minimalist", "boho", "sporty", "classic"]
COUNTRIES = ["FR", "DE", "ES", "IT", "NL", "PL", "LT", "GB"]
COUNTRY_WEIGHTS = [0.24, 0.2, 0.12, 0.12, 0.08, 0.1, 0.06, 0.08]
SIZES = ["XS", "S", "M", "L", "XL"]
SIZE_WEIGHTS = [0.1, 0.25, 0.35, 0.2, 0.1]
CONDITIONS = ["new_with_tags", "very_good", "good", "satisfactory"]
CONDITION_WEIGHTS = [0.15, 0.4, 0.35, 0.1]
CONDITION_PRICE = [1.3, 1.0, 0.8, 0.55]
CONDITION_UTILITY = [0.3, 0.15, 0.0, -0.35]
TIERS = ["budget", "mid", "premium", "luxury"]
TIER_PRICE = [0.5, 1.0, 2.2, 6.0]
EVENTS = ["click", "like", "add_to_bag", "purchase"]
#: Graded label of an impression: the strongest feedback it received.
EVENT_GRADE = {"click": 1, "like": 2, "add_to_bag": 3, "purchase": 4}
DAY_MS = 86_400_000
#: Lists hold 20-60 items, so the catalogue needs a margin above the largest list.
MIN_ITEMS = 100
START_MS = 1_760_000_000_000  # 2025-10-09, a fixed epoch keeps the output byte-stable per seed.


@dataclasses.dataclass(frozen=True)
class SimConfig:
    users: int = 1_200
    items: int = 6_000
    requests: int = 30_000
    days: int = 28
    seed: int = 7
    #: Examination probability at 0-based position p is (1 + p) ** -position_bias.
    position_bias: float = 0.8
    #: Share of requests served in random order (the exploration bucket).
    randomized_share: float = 0.05


SIZE_PRESETS: dict[str, SimConfig] = {
    "tiny": SimConfig(users=150, items=400, requests=600, days=10),
    "small": SimConfig(users=800, items=2_500, requests=5_000, days=21),
    "default": SimConfig(),
    # ~10 minutes of training on 2 cores (the benchmark issue's "large"); ~10 minutes to simulate, as each
    # request samples from the whole catalogue listed so far.
    "large": SimConfig(users=40_000, items=30_000, requests=650_000, days=56),
}


#: Written beside the raw tables: the ``SimConfig`` that simulated them (``dataclasses.asdict``).
CONFIG_FILE = "simulator.json"


def preset(size: str, seed: int = 7) -> SimConfig:
    """The ``size`` preset with ``seed``; ValueError naming the sizes for an unknown one."""
    if size not in SIZE_PRESETS:
        raise ValueError(f"unknown data size {size!r}; choose one of {', '.join(SIZE_PRESETS)}")
    return dataclasses.replace(SIZE_PRESETS[size], seed=seed)


def examination_probability(position: np.ndarray, position_bias: float) -> np.ndarray:
    """The chance a user looks at the item shown at 0-based ``position``."""
    return (1.0 + np.asarray(position, dtype=float)) ** -position_bias


def _timestamps(epoch_ms) -> pd.Series | pd.DatetimeIndex:
    """UTC timestamps at millisecond resolution whatever the pandas version (Spark reads ms, not ns)."""
    return pd.to_datetime(epoch_ms, unit="ms", utc=True).astype("datetime64[ms, UTC]")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k indices without replacement, probability proportional to weights (Gumbel top-k)."""
    keys = np.log(np.maximum(weights, 1e-12)) + rng.gumbel(size=weights.shape[0])
    if k >= keys.shape[0]:
        return np.argsort(-keys)
    return np.argpartition(-keys, k)[:k]


def _brands(rng: np.random.Generator, n: int = 120) -> pd.DataFrame:
    stems = ["nord", "vela", "kora", "lumi", "sora", "tavi", "mira", "oslo", "brio", "zeta", "rivo", "amba"]
    ends = ["wear", "lab", "studio", "co", "atelier", "denim", "line", "house", "craft", "works"]
    names = [f"{stems[i % len(stems)]}{ends[(i // len(stems)) % len(ends)]}" for i in range(n)]
    popularity = 1.0 / np.arange(1, n + 1) ** 1.1  # long tail
    tier = rng.choice(len(TIERS), size=n, p=[0.35, 0.35, 0.2, 0.1])
    style = rng.integers(0, len(STYLES), size=n)
    return pd.DataFrame({"brand": names, "popularity": popularity / popularity.sum(), "tier": tier, "style": style})


@dataclasses.dataclass(frozen=True)
class Taste:
    """What an impression's true utility is made of beyond the logs: each user's latent style mixture, preferred
    brands, price level and price sensitivity, and each item's latent quality (``taste`` draws them as
    ``simulate`` does). The benchmark's taste-informed reference reads them to measure how much of the oracle
    the logged features miss of these terms."""

    style_pref: np.ndarray  # [users, styles]
    is_pref_brand: np.ndarray  # [users, brands]
    price_level: np.ndarray  # [users]
    price_sensitivity: np.ndarray  # [users]
    quality: np.ndarray  # [items]
    item_style: np.ndarray  # [items], index into STYLES
    item_brand: np.ndarray  # [items]
    item_category: np.ndarray  # [items]
    price: np.ndarray  # [items]

    #: The latent terms of the utility, in the order ``parts`` returns them.
    PARTS = ("taste_style", "taste_brand", "taste_price", "taste_quality")

    @staticmethod
    def index(ids: np.ndarray) -> np.ndarray:
        """Row indices of the simulator's user or item ids (``u000042`` -> 42, ``i0000042`` -> 42)."""
        return pd.Series(np.asarray(ids, dtype=object)).str.slice(1).astype(np.int64).to_numpy()

    def parts(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """[n, 4] latent utility terms of (user, item) index pairs, as ``simulate`` weighs them: style preference,
        preferred brand, the price-miss penalty and item quality."""
        base = np.array(CATEGORY_BASE_PRICE, dtype=float)[self.item_category[item]]
        price_miss = np.abs(np.log(self.price[item] / (base * self.price_level[user])))
        return np.stack([2.0 * self.style_pref[user, self.item_style[item]],
                         1.0 * self.is_pref_brand[user, self.item_brand[item]],
                         -self.price_sensitivity[user] * price_miss,
                         0.35 * self.quality[item]], axis=1)


def taste(config: SimConfig) -> Taste:
    """The latent taste and quality a simulation with ``config`` draws (its seed's first draws)."""
    return _population(config, np.random.default_rng(config.seed))[2]


def simulate(config: SimConfig, progress: Callable[[int, int], None] | None = None) -> dict[str, pd.DataFrame]:
    """Run the marketplace for ``config.days`` and return its raw log tables (see README, "Data schema")."""
    if config.items < MIN_ITEMS or config.users < 1 or config.requests < 1:
        raise ValueError(f"simulation needs at least {MIN_ITEMS} items, 1 user and 1 request: got {config}")
    rng = np.random.default_rng(config.seed)
    users, items, latent, state = _population(config, rng)
    n_users, n_items, n_styles = config.users, config.items, len(STYLES)
    end_ms = START_MS + config.days * DAY_MS
    style_pref, item_brand, item_style, item_category = latent.style_pref, latent.item_brand, latent.item_style, \
        latent.item_category
    (brands, main_style, pref_brands, user_country, user_size, activity, item_size, item_condition, seller,
     seller_country, seller_rating, listed_ms, initial_views, initial_likes) = state

    # Running counters the legacy policy ranks on (the feature job recomputes its own from the logs).
    views = initial_views.astype(float)
    likes = initial_likes.astype(float)
    bags = np.zeros(n_items)
    order = np.argsort(listed_ms, kind="stable")
    listed_sorted = listed_ms[order]
    same_country_item = seller_country[seller]

    request_ms = np.sort(rng.integers(START_MS, end_ms, config.requests))
    request_user = rng.choice(n_users, size=config.requests, p=activity / activity.sum())
    is_search = rng.random(config.requests) < 0.55
    # A small exploration bucket shows results in random order: what lets position bias be measured from logs.
    randomized = rng.random(config.requests) < config.randomized_share
    req_rows, imp_rows, int_rows = [], [], []
    for r in range(config.requests):
        u, ts = request_user[r], request_ms[r]
        available = order[: np.searchsorted(listed_sorted, ts)]
        item_age = (ts - listed_ms[available]) / DAY_MS
        style_match = style_pref[u, item_style[available]]
        query, intent_cat, intent_brand, intent_style = None, -1, -1, -1
        if is_search[r]:
            intent_cat = rng.choice(len(CATEGORIES))
            if rng.random() < 0.35:
                intent_brand = pref_brands[u, rng.integers(0, 5)] if rng.random() < 0.7 else item_brand[
                    available[rng.integers(0, len(available))]]
            if rng.random() < 0.35:
                intent_style = main_style[u] if rng.random() < 0.7 else rng.integers(0, n_styles)
            words = ([brands["brand"].iat[intent_brand]] if intent_brand >= 0 else []) + (
                [STYLES[intent_style]] if intent_style >= 0 else []) + [CATEGORIES[intent_cat]]
            query = " ".join(words)
            same_brand = item_brand[available] == intent_brand
            same_style = item_style[available] == intent_style
            retrieval = 0.05 + (item_category[available] == intent_cat) * (1 + 4 * same_brand + 2 * same_style)
        else:
            retrieval = np.log1p(views[available] + 3 * likes[available]) * np.exp(-item_age / 20) + 2 * style_match
        n_shown = min(int(rng.integers(20, 61)), len(available))
        shown = available[_weighted_sample(rng, retrieval + 1e-3, n_shown)]
        age = (ts - listed_ms[shown]) / DAY_MS

        # Legacy policy: popularity + recency, nothing personal.
        legacy = popularity_recency(views[shown], likes[shown], bags[shown], age) + rng.normal(0, 0.3, n_shown)
        shown = shown[rng.permutation(n_shown) if randomized[r] else np.argsort(-legacy, kind="stable")]
        age = (ts - listed_ms[shown]) / DAY_MS

        latent_terms = latent.parts(np.full(n_shown, u), shown)  # the taste a ranker can only estimate
        utility = (latent_terms[:, 0] + latent_terms[:, 1] + np.where(item_size[shown] == user_size[u], 0.6, -0.4)
                   + latent_terms[:, 2] + latent_terms[:, 3] + np.array(CONDITION_UTILITY)[item_condition[shown]]
                   + 0.5 * np.exp(-age / 7) + 0.4 * (seller_rating[shown] - 4.3)
                   + 0.3 * (same_country_item[shown] == user_country[u]) + rng.normal(0, 0.15, n_shown))
        if intent_cat >= 0:
            utility += (np.where(item_category[shown] == intent_cat, 1.5, -1.5)
                        + 1.0 * (item_brand[shown] == intent_brand) + 0.8 * (item_style[shown] == intent_style))

        position = np.arange(n_shown)
        examined = rng.random(n_shown) < examination_probability(position, config.position_bias)
        click = examined & (rng.random(n_shown) < _sigmoid(2.0 * (utility - 2.0)))
        like = click & (rng.random(n_shown) < _sigmoid(2.0 * (utility - 2.6)))
        bag = click & (rng.random(n_shown) < _sigmoid(2.0 * (utility - 3.0)))
        purchase = bag & (rng.random(n_shown) < _sigmoid(2.0 * (utility - 3.0)))

        request_id = f"r{r:08d}"
        req_rows.append((request_id, u, ts, "search" if is_search[r] else "feed", query,
                         "random" if randomized[r] else "legacy"))
        imp_rows.append((np.full(n_shown, r), shown, position, utility))
        for name, mask, delay in (("click", click, 3_000), ("like", like, 9_000),
                                  ("add_to_bag", bag, 15_000), ("purchase", purchase, 60_000)):
            if mask.any():
                hit = np.flatnonzero(mask)
                int_rows.append((np.full(hit.size, r), shown[hit], ts + delay + position[hit] * 1_000
                                 + rng.integers(0, 2_000, hit.size), name))
        views[shown[examined]] += 1
        likes[shown[like]] += 1
        bags[shown[bag]] += 1
        if progress is not None and (r % 500 == 0 or r == config.requests - 1):
            progress(r + 1, config.requests)

    user_ids, item_ids = users["user_id"].to_numpy(), items["item_id"].to_numpy()
    requests = pd.DataFrame(req_rows, columns=["request_id", "user", "ts", "surface", "query", "policy"])
    requests["user_id"] = user_ids[requests.pop("user").to_numpy()]
    requests["ts"] = _timestamps(requests["ts"])
    requests = requests[["request_id", "user_id", "ts", "surface", "query", "policy"]]

    req_idx = np.concatenate([x[0] for x in imp_rows])
    utility = np.concatenate([x[3] for x in imp_rows])
    # True relevance grades 0..4 from global utility quantiles: ~55% irrelevant, 3% perfect.
    cuts = np.quantile(utility, [0.55, 0.8, 0.92, 0.97])
    impressions = pd.DataFrame({
        "request_id": np.char.add("r", np.char.zfill(req_idx.astype(str), 8)),
        "item_id": item_ids[np.concatenate([x[1] for x in imp_rows])],
        "position": np.concatenate([x[2] for x in imp_rows]).astype(np.int32),
        "relevance": np.digitize(utility, cuts).astype(np.int32),
        "true_score": utility.round(5),
    })
    interactions = pd.DataFrame({
        "request_id": np.char.add("r", np.char.zfill(np.concatenate([x[0] for x in int_rows]).astype(str), 8)),
        "item_id": item_ids[np.concatenate([x[1] for x in int_rows])],
        "ts": _timestamps(np.concatenate([x[2] for x in int_rows])),
        "event": np.concatenate([np.full(len(x[0]), x[3]) for x in int_rows]),
    })
    interactions = interactions.merge(requests[["request_id", "user_id"]], on="request_id")
    interactions = interactions.sort_values(["ts", "request_id", "item_id"], kind="stable").reset_index(drop=True)
    interactions = interactions[["request_id", "user_id", "item_id", "ts", "event"]]
    return {"users": users, "items": items, "requests": requests, "impressions": impressions,
            "interactions": interactions}


def _population(config: SimConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame, Taste, tuple]:
    """Users and items (tables, latent taste, and the state the request loop reads), drawn first from ``rng``:
    ``taste`` replays exactly these draws."""
    n_users, n_items, n_styles = config.users, config.items, len(STYLES)
    brands = _brands(rng)
    n_brands = len(brands)
    end_ms = START_MS + config.days * DAY_MS

    # Users: latent style mixture, preferred brands, size, price level and sensitivity, activity.
    style_pref = rng.dirichlet(np.full(n_styles, 0.35), size=n_users)
    main_style = style_pref.argmax(axis=1)
    price_level = rng.lognormal(0.0, 0.5, size=n_users)
    price_sensitivity = rng.uniform(0.2, 0.8, size=n_users)
    brand_weight = brands["popularity"].to_numpy() ** 0.5
    pref_brands = np.stack([
        _weighted_sample(rng, brand_weight * np.where(brands["style"].to_numpy() == main_style[u], 3.0, 1.0), 5)
        for u in range(n_users)
    ])
    user_country = rng.choice(len(COUNTRIES), size=n_users, p=COUNTRY_WEIGHTS)
    user_size = rng.choice(len(SIZES), size=n_users, p=SIZE_WEIGHTS)
    activity = rng.lognormal(0.0, 0.8, size=n_users)
    # Onboarding: users declare the styles they mostly like and follow some of their brands (both noisy).
    declared_styles = (style_pref > 0.2) & (rng.random((n_users, n_styles)) < 0.9)
    declared_styles[np.arange(n_users), main_style] |= rng.random(n_users) < 0.8
    fav_counts = rng.integers(1, 6, size=n_users)
    users = pd.DataFrame({
        "user_id": [f"u{u:06d}" for u in range(n_users)],
        "country": np.array(COUNTRIES)[user_country],
        "size": np.array(SIZES)[user_size],
        "signup_ts": _timestamps(START_MS - rng.integers(1, 720, n_users) * DAY_MS),
        "fav_styles": [[STYLES[s] for s in np.flatnonzero(row)] for row in declared_styles],
        "fav_brands": [list(brands["brand"].to_numpy()[pref_brands[u, : fav_counts[u]]]) for u in range(n_users)],
    })

    # Items: category, brand (long tail), style, size, condition, price by tier, listing time, seller.
    item_brand = rng.choice(n_brands, size=n_items, p=brands["popularity"].to_numpy())
    item_style = np.where(rng.random(n_items) < 0.6, brands["style"].to_numpy()[item_brand],
                          rng.integers(0, n_styles, n_items))
    item_category = rng.integers(0, len(CATEGORIES), size=n_items)
    item_size = rng.choice(len(SIZES), size=n_items, p=SIZE_WEIGHTS)
    item_condition = rng.choice(len(CONDITIONS), size=n_items, p=CONDITION_WEIGHTS)
    item_tier = brands["tier"].to_numpy()[item_brand]
    price = (np.array(CATEGORY_BASE_PRICE)[item_category] * np.array(TIER_PRICE)[item_tier]
             * np.array(CONDITION_PRICE)[item_condition] * rng.lognormal(0.0, 0.3, n_items)).round(2)
    quality = rng.normal(0.0, 1.0, n_items)
    n_sellers = max(n_items // 3, 1)
    seller_skill = rng.normal(0.0, 1.0, n_sellers)
    seller_country = rng.choice(len(COUNTRIES), size=n_sellers, p=COUNTRY_WEIGHTS)
    seller = rng.integers(0, n_sellers, n_items)
    quality = 0.7 * quality + 0.5 * seller_skill[seller]
    # Listing effort (photos) is how a buyer sees quality before the item has any views.
    photos = np.clip(np.round(4 + 1.8 * quality + rng.normal(0, 0.8, n_items)), 1, 12).astype(np.int32)
    seller_rating = np.clip(4.3 + 0.35 * seller_skill[seller] + rng.normal(0, 0.1, n_items), 1.0, 5.0).round(2)
    seller_sales = rng.poisson(np.exp(2.0 + 0.6 * seller_skill[seller]))
    prelisted = rng.random(n_items) < 0.4
    listed_ms = np.where(prelisted, START_MS - rng.integers(0, 60 * DAY_MS, n_items),
                         rng.integers(START_MS, end_ms, n_items))
    brand_pop_rank = np.log(brands["popularity"].to_numpy()[item_brand] * n_brands)
    age_at_start = np.maximum(START_MS - listed_ms, 0) / DAY_MS
    initial_views = np.where(prelisted, rng.poisson(np.exp(1.5 + 0.6 * quality + 0.3 * brand_pop_rank)
                                                    * np.sqrt(1 + age_at_start)), 0)
    initial_likes = rng.binomial(initial_views, _sigmoid(quality - 2.5))
    titles = [f"{brands['brand'].iat[b]} {STYLES[s]} {CATEGORIES[c]}"
              for b, s, c in zip(item_brand, item_style, item_category, strict=True)]
    items = pd.DataFrame({
        "item_id": [f"i{i:07d}" for i in range(n_items)],
        "title": titles,
        "category": np.array(CATEGORIES)[item_category],
        "brand": brands["brand"].to_numpy()[item_brand],
        "brand_tier": np.array(TIERS)[item_tier],
        "style": np.array(STYLES)[item_style],
        "size": np.array(SIZES)[item_size],
        "condition": np.array(CONDITIONS)[item_condition],
        "price": price,
        "listed_ts": _timestamps(listed_ms),
        "photos": photos,
        "seller_id": [f"s{s:06d}" for s in seller],
        "seller_rating": seller_rating,
        "seller_sales": seller_sales,
        "seller_country": np.array(COUNTRIES)[seller_country[seller]],
        "views": initial_views,
        "likes": initial_likes,
    })

    is_pref_brand = np.zeros((n_users, n_brands), dtype=bool)
    is_pref_brand[np.arange(n_users)[:, None], pref_brands] = True
    latent = Taste(style_pref=style_pref, is_pref_brand=is_pref_brand, price_level=price_level,
                   price_sensitivity=price_sensitivity, quality=quality, item_style=item_style,
                   item_brand=item_brand, item_category=item_category, price=price)
    state = (brands, main_style, pref_brands, user_country, user_size, activity, item_size, item_condition,
             seller, seller_country, seller_rating, listed_ms, initial_views, initial_likes)
    return users, items, latent, state


def _arrow_schemas() -> dict[str, pa.Schema]:
    """Column types of the raw tables as written (the README's "Raw schema"); explicit, so that even an empty
    table keeps its types and timestamps are milliseconds (Spark cannot read Parquet nanosecond timestamps)."""
    ts, text, tags = pa.timestamp("ms", tz="UTC"), pa.string(), pa.list_(pa.string())
    return {
        "users": pa.schema([("user_id", text), ("country", text), ("size", text), ("signup_ts", ts),
                            ("fav_styles", tags), ("fav_brands", tags)]),
        "items": pa.schema([("item_id", text), ("title", text), ("category", text), ("brand", text),
                            ("brand_tier", text), ("style", text), ("size", text), ("condition", text),
                            ("price", pa.float64()), ("listed_ts", ts), ("photos", pa.int32()), ("seller_id", text),
                            ("seller_rating", pa.float64()), ("seller_sales", pa.int64()),
                            ("seller_country", text), ("views", pa.int64()), ("likes", pa.int64())]),
        "requests": pa.schema([("request_id", text), ("user_id", text), ("ts", ts), ("surface", text),
                               ("query", text), ("policy", text)]),
        "impressions": pa.schema([("request_id", text), ("item_id", text), ("position", pa.int32()),
                                  ("relevance", pa.int32()), ("true_score", pa.float64())]),
        "interactions": pa.schema([("request_id", text), ("user_id", text), ("item_id", text), ("ts", ts),
                                   ("event", text)]),
    }


def write_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path,
                 config: SimConfig | None = None) -> dict[str, Path]:
    """Write each table as ``<out_dir>/<table>/part-0.parquet`` (the layout the feature job reads), and
    ``config``, the one that simulated them, as ``<out_dir>/CONFIG_FILE``.

    The five simulator tables get their explicit schema; any other table (or a table whose columns a caller
    changed, e.g. a test) is written as pandas infers it.
    """
    schemas = _arrow_schemas()
    paths = {}
    for name, frame in tables.items():
        path = Path(out_dir) / name / "part-0.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        schema = schemas.get(name)
        if schema is not None and list(frame.columns) == schema.names:
            table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False, safe=False)
        else:
            table = pa.Table.from_pandas(frame, preserve_index=False)
        pq.write_table(table, path, coerce_timestamps="ms", allow_truncated_timestamps=True)
        paths[name] = path
    if config is not None:
        (Path(out_dir) / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2))
    return paths
