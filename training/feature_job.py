"""Spark feature job: raw marketplace logs -> listwise examples (one row per request) + ``feature_spec.json``.

Runs on ``local[*]`` by default and unchanged as a SageMaker PySparkProcessor step (inputs and outputs are the
processing directories). Counters are point-in-time: every popularity or history counter of an impression only
counts events with a timestamp strictly before its request. The split is by time (train, then valid, then test).

Output layout (Parquet shards, streamed into tf.data by ``training.data``)::

    OUT/train/part-*.parquet   OUT/valid/...   OUT/test/...   OUT/feature_spec.json   OUT/stats.json
    OUT/online/items/   OUT/online/users/   (feature store content: counters as of the end of the logs)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script (spark-submit / SageMaker): make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from training import spark_runtime

    spark_runtime.ensure()  # before pandas loads: the SageMaker Spark image has pandas 3 and no pyarrow

import pandas as pd

from training import propensity, storage
from training.feature_spec import FLOAT, SPEC_FILE, STRING, Feature, FeatureSpec
from training.features import (
    FEATURES,
    ITEM_STATE_COLUMNS,
    USER_KEY_COUNTERS,
    USER_STATE_COLUMNS,
    assemble_features,
    catalogue_key,
    features_fingerprint,
    index_keys,
    named_keys,
    query_terms,
)

log = logging.getLogger("marketrank.feature_job")

EVENT_GRADES = {"click": 1, "like": 2, "add_to_bag": 3, "purchase": 4}
SPLITS = ("train", "valid", "test")
#: Sub-directory of the output holding the feature store's content (state as of the end of the logs).
ONLINE_DIR = "online"
#: The job's stats (split sizes, time cuts, ``features_fingerprint``) beside its output.
STATS_FILE = "stats.json"
#: Required columns per raw table and the type family each must have.
RAW_SCHEMA: dict[str, dict[str, str]] = {
    "users": {"user_id": "string", "country": "string", "size": "string", "signup_ts": "timestamp",
              "fav_styles": "array", "fav_brands": "array"},
    "items": {"item_id": "string", "title": "string", "category": "string", "brand": "string",
              "brand_tier": "string", "style": "string", "size": "string", "condition": "string",
              "price": "numeric", "photos": "numeric", "listed_ts": "timestamp", "seller_rating": "numeric",
              "seller_sales": "numeric", "seller_country": "string", "views": "numeric", "likes": "numeric"},
    "requests": {"request_id": "string", "user_id": "string", "ts": "timestamp", "surface": "string",
                 "query": "string"},
    "impressions": {"request_id": "string", "item_id": "string", "position": "integer"},
    "interactions": {"request_id": "string", "user_id": "string", "item_id": "string", "ts": "timestamp",
                     "event": "string"},
}
#: Simulator-only ground truth, carried through when present (absent in real logs).
OPTIONAL_TRUTH = {"relevance": "integer", "true_score": "numeric"}
#: Optional columns per table: validated when present.
OPTIONAL_COLUMNS = {"impressions": OPTIONAL_TRUTH,
                    "requests": {"policy": "string"}}  # "random" marks the result-randomisation bucket


class FeatureJobError(ValueError):
    """Bad raw input; the message names the table and column."""


@dataclasses.dataclass(frozen=True)
class FeatureJobConfig:
    list_size: int = 64
    train_fraction: float = 0.7
    valid_fraction: float = 0.15
    shuffle_partitions: int = 8


def built_fingerprint(features_dir: str | Path) -> str | None:
    """The ``features_fingerprint()`` of the feature code that wrote ``features_dir`` (from its stats), None
    where there are no stats or they predate the record."""
    stats = Path(features_dir) / STATS_FILE
    return json.loads(stats.read_text()).get("features_fingerprint") if stats.exists() else None


def spark_session(app: str = "marketrank-features"):
    from pyspark.sql import SparkSession

    # Python workers must run the interpreter that has this project's dependencies.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode talks to itself on loopback only
    log_config = Path(__file__).with_name("log4j2.properties")
    return (SparkSession.builder.appName(app)
            .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile=file:{log_config}")
            .master(os.environ.get("SPARK_MASTER", "local[*]"))
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.memory", os.environ.get("SPARK_DRIVER_MEMORY", "4g"))
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .getOrCreate())


def _family(data_type) -> str:
    from pyspark.sql import types as T

    if isinstance(data_type, T.StringType):
        return "string"
    if isinstance(data_type, (T.TimestampType, T.TimestampNTZType)):
        return "timestamp"
    if isinstance(data_type, (T.IntegerType, T.LongType, T.ShortType, T.ByteType)):
        return "integer"
    if isinstance(data_type, (T.FloatType, T.DoubleType, T.DecimalType)):
        return "numeric"
    if isinstance(data_type, T.ArrayType):
        return "array"
    if isinstance(data_type, T.NullType):
        return "null"
    return data_type.simpleString()


def _compatible(actual: str, expected: str) -> bool:
    return (actual == expected or actual == "null"
            or (expected == "numeric" and actual == "integer")
            or (expected == "timestamp" and actual == "integer"))  # epoch milliseconds


def _uri(path: Path) -> str:
    """An explicit file:// URI: on a cluster (SageMaker's Spark image) a bare path would resolve to HDFS."""
    return Path(path).resolve().as_uri()


def read_raw_tables(spark, raw_dir: str | Path) -> dict:
    """Read and validate the five raw tables; errors name the table, column and path."""
    tables = {}
    for table, columns in RAW_SCHEMA.items():
        path = Path(raw_dir) / table
        if not path.exists():
            raise FeatureJobError(f"table {table!r} not found: expected Parquet files under {path}")
        try:
            frame = spark.read.parquet(_uri(path))
        except Exception as err:  # noqa: BLE001 - Spark raises AnalysisException and friends
            raise FeatureJobError(f"table {table!r} at {path} is not readable Parquet: {err}") from err
        types = {field.name: _family(field.dataType) for field in frame.schema.fields}
        optional = OPTIONAL_COLUMNS.get(table, {})
        for column, family in {**columns, **optional}.items():
            if column not in types:
                if column in optional:
                    continue
                raise FeatureJobError(f"table {table!r} ({path}) has no column {column!r}; "
                                      f"found: {', '.join(sorted(types))}")
            if not _compatible(types[column], family):
                raise FeatureJobError(f"table {table!r} ({path}) column {column!r} has type {types[column]}, "
                                      f"expected {family}")
        if frame.limit(1).count() == 0:
            raise FeatureJobError(f"table {table!r} at {path} is empty")
        tables[table] = frame
    return tables


def _to_ms(frame, column: str):
    from pyspark.sql import functions as F

    if _family(frame.schema[column].dataType) == "timestamp":
        return F.unix_millis(F.col(column).cast("timestamp"))
    return F.col(column).cast("long")


def _event_stream(tables: dict):
    """Items with derived columns, requests with ``ts_ms``, and one time-ordered stream of impressions + events."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    items, requests = tables["items"], tables["requests"]
    impressions, interactions = tables["impressions"], tables["interactions"]
    unknown = (interactions.select("event").distinct()
               .filter(F.col("event").isNull() | ~F.col("event").isin(list(EVENT_GRADES)))
               .limit(5).collect())
    if unknown:
        values = sorted(repr(r.event) for r in unknown)
        raise FeatureJobError(f"table 'interactions' column 'event' has unknown values {values}; "
                              f"expected one of {list(EVENT_GRADES)}")

    medians = items.groupBy("category").agg(F.percentile_approx("price", 0.5).alias("category_median_price"))
    overall = items.agg(F.percentile_approx("price", 0.5).alias("overall_median_price"))
    # Left join: an item with no category keeps its impressions and clicks (priced against the whole catalogue).
    items = (items.join(medians, "category", "left").crossJoin(overall)
             .withColumn("category_median_price", F.coalesce("category_median_price", "overall_median_price"))
             .drop("overall_median_price")
             .withColumn("listed_ms", _to_ms(items, "listed_ts"))
             .withColumn("lpi", F.log(F.greatest(F.col("price"), F.lit(0.01))
                                      / F.greatest(F.col("category_median_price"), F.lit(0.01)))))

    @F.pandas_udf(T.StringType())
    def keys(values: pd.Series) -> pd.Series:  # a missing brand stays missing: it has no history
        found = values.map(catalogue_key)
        return found.where(found != "", None)

    items = items.select("*", *(keys(name).alias(f"{name}_key") for name in ("brand", "style", "category")))
    # The user-history counters are keyed by catalogue_key: "Zeta" and "zeta" are one brand, as queries see it.
    item_keys = items.select("item_id", F.col("brand_key").alias("brand"), F.col("style_key").alias("style"),
                             F.col("category_key").alias("category"), "lpi")
    catalogue = items.select(F.col("brand_key").alias("key")).union(items.select("style_key")).distinct()
    keys_by_word = index_keys(row.key for row in catalogue.collect() if row.key)
    requests = requests.withColumn("ts_ms", _to_ms(requests, "ts"))

    shown = (impressions.join(requests.select("request_id", "user_id", "ts_ms"), "request_id")
             .join(item_keys, "item_id")
             .select("request_id", "user_id", "item_id", "brand", "style", "category", "ts_ms",
                     F.lit(1).alias("view"), F.lit(0).alias("click"), F.lit(0).alias("like"),
                     F.lit(0).alias("bag"), F.lit(0.0).alias("click_lpi"), F.lit(True).alias("is_impression"),
                     F.lit(0).alias("search"), F.lit(0).alias("named")))
    events = (interactions.withColumn("ts_ms", _to_ms(interactions, "ts")).join(item_keys, "item_id")
              .select(F.lit(None).cast("string").alias("request_id"), "user_id", "item_id", "brand", "style",
                      "category", "ts_ms", F.lit(0).alias("view"),
                      (F.col("event") == "click").cast("int").alias("click"),
                      (F.col("event") == "like").cast("int").alias("like"),
                      (F.col("event") == "add_to_bag").cast("int").alias("bag"),
                      F.when(F.col("event") == "click", F.col("lpi")).otherwise(0.0).alias("click_lpi"),
                      F.lit(False).alias("is_impression"), F.lit(0).alias("search"), F.lit(0).alias("named")))
    return items, requests, shown.unionByName(events).unionByName(_search_stream(requests, keys_by_word))


def _search_stream(requests, keys_by_word: dict[str, tuple[str, ...]]):
    """Searches as stream rows: one per search (``search``: a query with at least one term), and one per brand or
    style of the catalogue the query names (``named``, ``training.features.named_keys``: every word of the key is a
    query term) whose ``brand`` and ``style`` are that key, so the (user, brand) and (user, style) windows count
    the searches that named an item's brand or style."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    @F.pandas_udf(T.ArrayType(T.StringType()))
    def named(queries: pd.Series) -> pd.Series:
        return queries.map(lambda query: named_keys(query_terms(query), keys_by_word))

    @F.pandas_udf(T.IntegerType())
    def term_count(queries: pd.Series) -> pd.Series:
        return queries.map(lambda query: len(query_terms(query))).astype("int32")

    searches = requests.filter(F.col("query").isNotNull()).filter(term_count("query") > 0)
    searches = searches.withColumn("terms", named("query"))
    none, zero = F.lit(None).cast("string"), F.lit(0)
    common = [none.alias("request_id"), "user_id", none.alias("item_id")]
    counters = [zero.alias("view"), zero.alias("click"), zero.alias("like"), zero.alias("bag"),
                F.lit(0.0).alias("click_lpi"), F.lit(False).alias("is_impression")]
    per_search = searches.select(*common, none.alias("brand"), none.alias("style"), none.alias("category"),
                                 "ts_ms", *counters, F.lit(1).alias("search"), zero.alias("named"))
    per_term = (searches.select("user_id", "ts_ms", F.explode("terms").alias("term"))
                .select(*common, F.col("term").alias("brand"), F.col("term").alias("style"), none.alias("category"),
                        "ts_ms", *counters, zero.alias("search"), F.lit(1).alias("named")))
    return per_search.unionByName(per_term)


def _user_profile(users):
    from pyspark.sql import functions as F

    return users.select(
        "user_id", F.col("country").alias("user_country"), F.col("size").alias("user_size"),
        F.col("fav_brands").alias("user_fav_brands"), F.col("fav_styles").alias("user_fav_styles"),
        _to_ms(users, "signup_ts").alias("user_signup_ms"))


def point_in_time_rows(tables: dict, events: tuple | None = None):
    """One row per impression with the raw columns of ``RAW_COLUMNS``: counters use only earlier events.

    ``events``: ``_event_stream(tables)`` when the caller already has it (the job persists it for both uses)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    impressions, interactions = tables["impressions"], tables["interactions"]
    items, requests, stream = events or _event_stream(tables)

    def before(*keys):  # strictly earlier events only: this is what keeps the counters leak-free
        return Window.partitionBy(*keys).orderBy("ts_ms").rangeBetween(Window.unboundedPreceding, -1)

    def per_user(counter: str, key: str):  # an item without this attribute has no history with it (online: 0)
        return F.when(F.col(key).isNotNull(), F.sum(counter).over(before("user_id", key)))

    counters = {"views_before": F.sum("view").over(before("item_id")),
                "likes_before": F.sum("like").over(before("item_id")),
                "bags": F.sum("bag").over(before("item_id")),
                "user_clicks": F.sum("click").over(before("user_id")),
                "user_lpi_sum": F.sum("click_lpi").over(before("user_id")),
                "user_searches": F.sum("search").over(before("user_id")),
                **{column: per_user(counter, key) for column, counter, key, _ in USER_KEY_COUNTERS}}
    counted = (stream.withColumns(counters)
               .filter("is_impression")
               .select("request_id", "item_id", *(F.coalesce(F.col(c), F.lit(0)).alias(c) for c in counters))
               .dropDuplicates(["request_id", "item_id"]))  # an item shown twice in a request: same counters

    grade = F.create_map(*[x for e, g in EVENT_GRADES.items() for x in (F.lit(e), F.lit(g))])
    labels = (interactions.groupBy("request_id", "item_id").agg(F.max(grade[F.col("event")]).alias("label")))
    user_profile = _user_profile(tables["users"])
    truth = [c for c in OPTIONAL_TRUTH if c in impressions.columns]
    return (impressions.select("request_id", "item_id", "position", *truth)
            .join(requests.select("request_id", "user_id", "ts_ms", "surface", "query"), "request_id")
            .join(user_profile, "user_id", "left")
            .join(items.select("item_id", "title", "category", "brand", "brand_tier", "style", "size", "condition",
                               "price", "photos", "category_median_price", "listed_ms", "seller_rating", "seller_sales",
                               "seller_country", F.col("views").alias("views0"), F.col("likes").alias("likes0")),
                  "item_id")
            .join(counted, ["request_id", "item_id"])
            .join(labels, ["request_id", "item_id"], "left")
            .withColumn("label", F.coalesce(F.col("label"), F.lit(0)).cast("int"))
            .withColumn("views", F.col("views0") + F.col("views_before"))
            .withColumn("likes", F.col("likes0") + F.col("likes_before"))
            .drop("views0", "likes0", "views_before", "likes_before"))


def online_state(tables: dict, events: tuple | None = None):
    """The feature store's content: every counter as of the end of the logs (what serving looks up now).

    Returns ``(items, users)`` DataFrames whose columns are ``training.features.ITEM_STATE_COLUMNS`` and
    ``USER_STATE_COLUMNS`` (+ ids); ``training.features.online_raw_frame`` turns them into raw feature rows.
    """
    from pyspark.sql import functions as F

    items, _, stream = events or _event_stream(tables)
    totals = stream.groupBy("item_id").agg(F.sum("view").alias("views_n"), F.sum("like").alias("likes_n"),
                                           F.sum("bag").alias("bags_n"))
    item_state = (items.join(totals, "item_id", "left")
                  .withColumn("views", F.col("views") + F.coalesce(F.col("views_n"), F.lit(0)))
                  .withColumn("likes", F.col("likes") + F.coalesce(F.col("likes_n"), F.lit(0)))
                  .withColumn("bags", F.coalesce(F.col("bags_n"), F.lit(0)))
                  .select("item_id", *ITEM_STATE_COLUMNS))
    # Every user with a profile or any activity: offline counters count users missing from the users table too.
    profiles = _user_profile(tables["users"])
    user_ids = profiles.select("user_id").union(stream.select("user_id")).distinct().dropna()
    user_state = (user_ids.join(profiles, "user_id", "left")
                  .join(stream.groupBy("user_id").agg(F.sum("click").alias("user_clicks"),
                                                      F.sum("click_lpi").alias("user_lpi_sum"),
                                                      F.sum("search").alias("user_searches")), "user_id", "left"))
    # Per-key counters as maps, keyed by catalogue_key (USER_KEY_COUNTERS): clicks and impressions by brand /
    # style / category, and searches by the brand or style they named (a search's row carries that key as both
    # its brand and its style, so one map serves both lookups).
    maps: dict[str, tuple[str, str]] = {}
    for _, counter, key, state_map in USER_KEY_COUNTERS:
        maps.setdefault(state_map, (counter, key))
    for name, (counter, key) in maps.items():
        per_key = (stream.filter((F.col(counter) == 1) & F.col(key).isNotNull()).groupBy("user_id", key).count()
                   .groupBy("user_id").agg(F.map_from_entries(F.collect_list(F.struct(key, "count"))).alias(name)))
        user_state = user_state.join(per_key, "user_id", "left")
    user_state = (user_state.fillna(0, subset=["user_clicks", "user_searches"])
                  .withColumn("user_lpi_sum", F.coalesce(F.col("user_lpi_sum"), F.lit(0.0)))
                  .select("user_id", *USER_STATE_COLUMNS))
    return item_state, user_state


def _feature_schema(truth: list[str]):
    from pyspark.sql import types as T

    fields = [T.StructField("request_id", T.StringType()), T.StructField("user_id", T.StringType()),
              T.StructField("item_id", T.StringType()), T.StructField("ts_ms", T.LongType()),
              T.StructField("position", T.IntegerType()), T.StructField("label", T.IntegerType())]
    if "relevance" in truth:
        fields.append(T.StructField("relevance", T.IntegerType()))
    if "true_score" in truth:
        fields.append(T.StructField("true_score", T.DoubleType()))
    for f in FEATURES:
        fields.append(T.StructField(f.name, T.StringType() if f.dtype == STRING else T.FloatType()))
    return T.StructType(fields)


def _transform_expr(feature: Feature):
    from pyspark.sql import functions as F

    column = F.col(feature.name).cast("double")
    return F.signum(column) * F.log1p(F.abs(column)) if feature.transform == "log1p" else column


def estimate_position_bias(tables: dict, before_ms: float) -> dict | None:
    """Fit the examination exponent on randomised requests before ``before_ms`` (the training period)."""
    from pyspark.sql import functions as F

    requests = tables["requests"]
    if "policy" not in requests.columns:
        return None
    randomised = (requests.filter((F.col("policy") == "random") & (_to_ms(requests, "ts") < before_ms))
                  .select("request_id"))
    clicked = (tables["interactions"].filter(F.col("event") == "click").select("request_id", "item_id")
               .distinct().withColumn("clicked", F.lit(1)))
    rows = (tables["impressions"].join(randomised, "request_id").join(clicked, ["request_id", "item_id"], "left")
            .groupBy("position").agg(F.count("*").alias("impressions"),
                                     F.sum(F.coalesce(F.col("clicked"), F.lit(0))).alias("clicks"))
            .orderBy("position").collect())
    if not rows:
        return None
    try:
        fit = propensity.fit_power_law(*zip(*[(r.position, r.impressions, r.clicks) for r in rows], strict=True))
    except ValueError as err:
        log.warning("position bias not estimated: %s", err)
        return None
    return {**fit, "method": "result_randomisation", "requests": randomised.count()}


def build_spec(item_rows, lists, config: FeatureJobConfig, truth: list[str],
               position_bias: dict | None = None) -> FeatureSpec:
    """Vocabularies and normalisation statistics from the training split only."""
    from pyspark.sql import functions as F

    train_items = item_rows.filter(F.col("split") == "train")
    train_lists = lists.filter(F.col("split") == "train")
    features = []
    for scope_rows, scope in ((train_lists, "context"), (train_items, "item")):
        floats = [f for f in FEATURES if f.scope == scope and f.dtype == FLOAT]
        row = scope_rows.agg(*[F.avg(_transform_expr(f)).alias(f"{f.name}__mean") for f in floats],
                             *[F.stddev_pop(_transform_expr(f)).alias(f"{f.name}__std") for f in floats]).first()
        for f in FEATURES:
            if f.scope != scope:
                continue
            if f.dtype == FLOAT:
                features.append(dataclasses.replace(f, mean=float(row[f"{f.name}__mean"] or 0.0),
                                                    std=max(float(row[f"{f.name}__std"] or 0.0), 1e-6)))
            else:
                values = sorted(r[0] for r in scope_rows.select(f.name).distinct().collect() if r[0] is not None)
                features.append(dataclasses.replace(f, vocabulary=tuple(values)))
    order = {f.name: i for i, f in enumerate(FEATURES)}
    features.sort(key=lambda f: order[f.name])
    return FeatureSpec(features=tuple(features), list_size=config.list_size, label="label",
                       eval_label="relevance" if "relevance" in truth else "label", position="position",
                       oracle_score="true_score" if "true_score" in truth else None, segment="surface",
                       propensity_eta=position_bias["eta"] if position_bias else None, source="marketplace")


def run_feature_job(raw_uri: str | Path, out_uri: str | Path, config: FeatureJobConfig = FeatureJobConfig(),
                    spark=None, progress: Callable[[str], None] | None = None) -> dict:
    """Build listwise examples and the feature spec from raw logs. Returns the job's stats (also ``stats.json``).

    Output is written to a temporary directory and moved into place only when complete: a failed job leaves
    nothing behind.
    """

    say = progress or (lambda message: log.info(message))
    if not storage.is_s3(out_uri):
        check_output_dir(Path(out_uri))  # before any work: the job replaces what it finds there
    scratch = Path(tempfile.mkdtemp(prefix="marketrank-features-"))  # staging for s3:// input and output
    try:
        raw_dir = storage.stage_in(raw_uri, scratch / "raw") if storage.is_s3(raw_uri) else storage.stage_in(raw_uri)
        # resolved: the staging dir goes beside it, which for "." would be inside it
        local_out = scratch / "features" if storage.is_s3(out_uri) else Path(out_uri).resolve()
        stats = _run(spark, raw_dir, local_out, config, say)
        if storage.is_s3(out_uri):
            storage.stage_out(local_out, str(out_uri))
        return stats
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run(spark, raw_dir: Path, local_out: Path, config: FeatureJobConfig, say: Callable[[str], None]) -> dict:
    from pyspark.sql import functions as F

    tmp = local_out.parent / f".{local_out.name}.tmp-{uuid.uuid4().hex[:8]}"
    spark = spark or spark_session()
    spark.conf.set("spark.sql.shuffle.partitions", str(config.shuffle_partitions))
    try:
        say("validating raw tables")
        tables = read_raw_tables(spark, raw_dir)
        truth = [c for c in OPTIONAL_TRUTH if c in tables["impressions"].columns]
        say("computing point-in-time counters")
        items, requests, stream = _event_stream(tables)
        # Both the point-in-time windows and the online state read the stream: build it (joins, UDFs) once.
        events = (items, requests, stream.persist())
        raw = point_in_time_rows(tables, events)
        schema = _feature_schema(truth)
        keep = [field.name for field in schema.fields]

        def assemble(batches):
            for frame in batches:
                yield assemble_features(frame)[keep]

        rows = raw.mapInPandas(assemble, schema=schema)
        cuts = tables["requests"].select(_to_ms(tables["requests"], "ts").alias("t")).approxQuantile(
            "t", [config.train_fraction, config.train_fraction + config.valid_fraction], 0.0001)
        rows = rows.withColumn("split", F.when(F.col("ts_ms") < cuts[0], "train")
                               .when(F.col("ts_ms") < cuts[1], "valid").otherwise("test")).persist()
        say("grouping impressions into lists")
        context = [f.name for f in FEATURES if f.scope == "context"]
        per_item = ["item_id", "label", *truth, *(f.name for f in FEATURES if f.scope == "item")]
        lists = (rows.groupBy("request_id")
                 .agg(F.first("user_id").alias("user_id"), F.first("ts_ms").alias("ts_ms"),
                      F.first("split").alias("split"), *(F.first(c).alias(c) for c in context),
                      F.sort_array(F.collect_list(F.struct("position", *per_item))).alias("items"))
                 .select("request_id", "user_id", "ts_ms", "split", *context,
                         F.col("items.position").alias("position"), *(F.col(f"items.{c}").alias(c) for c in per_item))
                 .persist())
        say("writing Parquet shards")
        (lists.repartition(4, "split").sortWithinPartitions("ts_ms")
         .write.partitionBy("split").mode("overwrite").parquet(_uri(tmp)))
        say("writing the online feature state")
        item_state, user_state = online_state(tables, events)
        item_state.coalesce(1).write.parquet(_uri(tmp / ONLINE_DIR / "items"))
        user_state.coalesce(1).write.parquet(_uri(tmp / ONLINE_DIR / "users"))
        say("estimating position bias and the feature spec")
        position_bias = estimate_position_bias(tables, cuts[0])
        spec = build_spec(rows, lists, config, truth, position_bias)
        counts = {r["split"]: {"lists": r["lists"], "items": r["items"], "positives": r["positives"]}
                  for r in rows.groupBy("split").agg(F.countDistinct("request_id").alias("lists"),
                                                    F.count("*").alias("items"),
                                                    F.sum((F.col("label") > 0).cast("int")).alias("positives"))
                  .collect()}
        missing = [s for s in SPLITS if s not in counts]
        if missing:
            raise FeatureJobError(f"table 'requests' column 'ts': too few distinct times to fill the {missing} "
                                  f"split(s)")
        for split in SPLITS:
            (tmp / f"split={split}").rename(tmp / split)
        for marker in [*tmp.rglob("_SUCCESS"), *tmp.rglob(".*.crc")]:
            marker.unlink()
        spec.save(tmp)
        for split in SPLITS:  # each split channel carries the spec, so a training job needs nothing else
            spec.save(tmp / split)
        as_of = max(tables[t].select(F.max(_to_ms(tables[t], "ts"))).first()[0] for t in ("requests", "interactions"))
        stats = {"splits": counts, "time_cuts_ms": cuts, "features_fingerprint": features_fingerprint(),
                 "list_size": config.list_size, "position_bias": position_bias,
                 "online_as_of_ms": as_of,
                 "max_list_length": lists.select(F.max(F.size("item_id"))).first()[0]}
        (tmp / STATS_FILE).write_text(json.dumps(stats, indent=2))
        rows.unpersist()
        lists.unpersist()
        events[2].unpersist()
        _publish(tmp, local_out)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats


#: What the job writes into its output directory, and all it ever replaces there.
OUTPUTS = (*SPLITS, ONLINE_DIR, STATS_FILE, SPEC_FILE)


def check_output_dir(out: Path) -> None:
    """FeatureJobError unless ``out`` is new, empty, or an earlier run's output (only ``OUTPUTS``): the job
    replaces its output, and must never take a user's other files (their raw logs, say) with it."""
    if out.exists() and not out.is_dir():
        raise FeatureJobError(f"output {out} is a file, not a directory")
    other = sorted(child.name for child in out.iterdir() if child.name not in OUTPUTS) if out.is_dir() else []
    if other:
        raise FeatureJobError(f"output {out} holds files this job did not write ({', '.join(other[:5])}"
                              f"{', ...' if len(other) > 5 else ''}): choose a new or empty directory")


def _publish(tmp: Path, out: Path) -> None:
    """Put the finished output in place: one rename when ``out`` is new. An existing ``out`` keeps its directory
    and gets the new contents instead, because SageMaker mounts a processing job's output directories, and a
    mount point can be neither removed nor renamed onto ("Device or resource busy")."""
    if not out.exists():
        tmp.rename(out)
        return
    check_output_dir(out)  # again: something may have appeared there while the job ran
    for child in out.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()
    for child in tmp.iterdir():
        shutil.move(str(child), str(out / child.name))  # across file systems too: the mount is another one
    tmp.rmdir()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", default=os.environ.get("SM_CHANNEL_RAW", "/opt/ml/processing/input/raw"))
    parser.add_argument("--output", default="/opt/ml/processing/output/features")
    parser.add_argument("--list-size", type=int, default=FeatureJobConfig.list_size)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    stats = run_feature_job(args.input, args.output, FeatureJobConfig(list_size=args.list_size))
    log.info("feature job done: %s", json.dumps(stats["splits"]))


if __name__ == "__main__":
    main()
