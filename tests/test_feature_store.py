"""Online feature store: materialisation from the real feature job output into both stores, one-round-trip
fetches (counted by a real redis-server), and model inputs that the real SavedModel accepts and that agree with
the features the Spark job wrote offline.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import redis
from redis_fixtures import free_port, redis_factory, redis_server  # noqa: F401

from serving.errors import StoreUnavailable
from serving.feature_store import (
    ITEM_PREFIX,
    SPEC_KEY,
    USER_PREFIX,
    EmbeddedStore,
    RedisStore,
    RequestContext,
    build_inputs,
    fallback_scores,
    materialize,
    open_store,
)
from training.feature_spec import MASK, STRING
from training.features import DAY_MS, FEATURES, ITEM_STATE_COLUMNS, USER_STATE_COLUMNS, item_state_columns

#: Features computed only from the request (surface, query, time) and static catalogue / profile attributes:
#: identical online and offline for the same request. The rest depend on counters that grow after the request.
STATIC = {"surface", "user_country", "user_tenure_days", "followed_brands", "declared_styles", "item_category",
          "item_style", "item_condition", "item_brand_tier", "log_price_index", "age_days", "photos", "seller_rating",
          "seller_sales", "same_country", "size_match", "fav_brand", "fav_style", "query_category_match",
          "query_brand_match", "query_style_match", "query_title_overlap"}
COUNTERS = {"user_history", "views", "likes", "bags"}  # only grow between the request and the end of the logs
DERIVED = {"price_gap", "like_rate", "brand_affinity", "style_affinity", "category_affinity", "brand_ctr", "style_ctr",
           "brand_searched", "style_searched"}


@pytest.fixture(scope="module")
def spec(tiny_run):
    from training.export import load_spec

    return load_spec(tiny_run["export_dir"])


@pytest.fixture(scope="module")
def stores(tiny_run, spec, redis_server, tmp_path_factory):  # noqa: F811
    path = tmp_path_factory.mktemp("store") / "feature_store.json"
    embedded = EmbeddedStore(path)
    cache = RedisStore(redis_server.url)
    counts = {"embedded": materialize(tiny_run["features"], embedded, spec),
              "redis": materialize(tiny_run["features"], cache, spec, batch_size=64)}
    yield {"embedded": embedded, "redis": cache, "counts": counts, "path": path}
    cache.close()


@pytest.fixture(scope="module")
def online(tiny_run):
    def read(kind: str) -> pd.DataFrame:
        return pq.read_table(tiny_run["features"] / "online" / kind).to_pandas()

    return {"items": read("items"), "users": read("users")}


@pytest.fixture(scope="module")
def saved_model(tiny_run):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tiny_run["export_dir"]))
    return loaded, loaded.signatures["serving_default"]


def _call(signature, inputs: dict[str, np.ndarray]) -> np.ndarray:
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    return signature(**{name: tf.constant(value, dtype=specs[name].dtype) for name, value in inputs.items()}
                     )["scores"].numpy()


def test_materialize_writes_every_id_and_the_models_spec(stores, online, spec):
    expected = {"items": len(online["items"]), "users": len(online["users"])}
    assert stores["counts"] == {"embedded": expected, "redis": expected}
    assert stores["embedded"].get_spec() == spec and stores["redis"].get_spec() == spec
    reloaded = EmbeddedStore(stores["path"])  # what `marketrank serve` loads from the workspace
    assert reloaded.get_spec() == spec and reloaded.meta()["items"] == expected["items"]
    some = list(online["items"]["item_id"][:20])
    assert reloaded.fetch("u000000", some).items == stores["embedded"].fetch("u000000", some).items


def test_redis_holds_plain_json_under_documented_keys(stores, online, redis_server):  # noqa: F811
    client = redis.Redis.from_url(redis_server.url)
    item_id = online["items"]["item_id"].iloc[0]
    item = json.loads(client.get(ITEM_PREFIX + item_id))
    assert sorted(item) == sorted(ITEM_STATE_COLUMNS)
    clicked = online["users"][online["users"]["user_clicks"] > 0]["user_id"].iloc[0]  # has per-brand counts
    stored_user = json.loads(client.get(USER_PREFIX + clicked))
    assert sorted(stored_user) == sorted(USER_STATE_COLUMNS)
    brand_clicks = stored_user["brand_clicks"]
    assert isinstance(brand_clicks, dict) and brand_clicks, brand_clicks  # Parquet map -> JSON object, not pairs
    assert json.loads(client.get(SPEC_KEY))["list_size"] == stores["redis"].get_spec().list_size
    client.close()


def test_both_stores_return_identical_states_and_inputs(stores, online, spec):
    users = list(online["users"]["user_id"])
    items = list(online["items"]["item_id"])
    for user_id in [*users[:40], "u-never-seen"]:
        left = stores["embedded"].fetch(user_id, items[:50])
        right = stores["redis"].fetch(user_id, items[:50])
        assert left == right
    with_history = next(u for u in users if (stores["redis"].fetch(u, []).user or {}).get("user_clicks"))
    fetched = stores["redis"].fetch(with_history, items[:80])
    assert isinstance(fetched.user["brand_clicks"], dict) and fetched.user["brand_clicks"] and all(
        isinstance(v, int) for v in fetched.user["brand_clicks"].values())
    for surface, query in (("search", "vintage jeans"), ("feed", None)):
        request = RequestContext(surface, query, int(pd.Timestamp("2025-11-01", tz="UTC").value // 1_000_000))
        embedded = stores["embedded"].fetch(with_history, [*items[:80], "i-never-seen"])
        assert embedded.known_columns is not None and fetched.known_columns is None
        a = build_inputs(spec, request, embedded.user, embedded.known_items())  # the catalogue's columns
        b = build_inputs(spec, request, fetched.user, fetched.known_items())  # Redis: states, one per item
        assert a.keys() == b.keys() == {*spec.names, MASK}
        for name in a:
            assert a[name].dtype == b[name].dtype, name
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_fetch_is_one_round_trip(stores, online, redis_server):  # noqa: F811
    store = stores["redis"]
    items = list(online["items"]["item_id"][:200]) + ["i-unknown"]
    store.fetch("u000001", items)  # the pooled connection exists: no handshake commands below
    admin = redis.Redis.from_url(redis_server.url)
    admin.config_resetstat()
    fetched = store.fetch("u000001", items)
    stats = {name.removeprefix("cmdstat_"): value["calls"] for name, value in admin.info("commandstats").items()}
    admin.close()
    stats = {name: calls for name, calls in stats.items() if not name.startswith(("config", "info"))}
    assert stats == {"mget": 1}
    assert len(fetched.items) == len(items) and fetched.items[-1] is None and fetched.items[0] is not None


def test_online_inputs_agree_with_offline_features_and_feed_the_saved_model(tiny_run, stores, spec, saved_model):
    features_dir: Path = tiny_run["features"]
    test = pd.concat([pd.read_parquet(p) for p in sorted((features_dir / "test").glob("*.parquet"))],
                     ignore_index=True)
    requests = pd.read_parquet(Path(tiny_run["report"]["dataset"]["raw"]) / "requests").set_index("request_id")
    assert {f.name for f in FEATURES} == STATIC | COUNTERS | DERIVED  # every feature is classified
    checked = 0
    for _, row in test.iterrows():
        if row["surface"] != "search" or checked >= 3:
            continue
        checked += 1
        query = requests.loc[row["request_id"], "query"]
        item_ids = list(row["item_id"])
        fetched = stores["redis"].fetch(row["user_id"], item_ids)
        assert fetched.user is not None and all(s is not None for s in fetched.items)
        inputs = build_inputs(spec, RequestContext("search", query, int(row["ts_ms"])), fetched.user, fetched.items)
        n = len(item_ids)
        for feature in spec.features:
            value = inputs[feature.name]
            offline = np.asarray(row[feature.name] if feature.scope == "item" else [row[feature.name]])
            assert value.shape == ((1, n) if feature.scope == "item" else (1,)), feature.name
            assert value.dtype == (object if feature.dtype == STRING else np.float32), feature.name
            online_values = value.reshape(-1)
            if feature.name in STATIC:
                if feature.dtype == STRING:
                    assert list(online_values) == list(offline), feature.name
                else:
                    np.testing.assert_allclose(online_values, offline.astype(np.float32), rtol=1e-5, atol=1e-5,
                                               err_msg=feature.name)
            elif feature.name in COUNTERS:
                assert (online_values >= offline.astype(np.float32) - 1e-4).all(), feature.name
        assert inputs[MASK].shape == (1, n) and inputs[MASK].all()
        scores = _call(saved_model[1], inputs)
        assert scores.shape == (1, n) and np.isfinite(scores).all()
    assert checked == 3

    signature = saved_model[1].structured_input_signature[1]
    assert set(signature) == set(inputs)
    for name, tensor in signature.items():
        assert tensor.shape.rank == inputs[name].ndim, name
        assert (tensor.dtype.name == "string") == (inputs[name].dtype == object), name


def test_cold_start_user_gets_neutral_features_and_scores(stores, online, spec, saved_model):
    items = list(online["items"]["item_id"][:25])
    fetched = stores["redis"].fetch("u-brand-new", items)
    assert fetched.user is None
    inputs = build_inputs(spec, RequestContext("feed", None, 1_760_000_000_000), fetched.user, fetched.items)
    assert inputs["user_country"].tolist() == ["unknown"] and inputs["user_history"].tolist() == [0.0]
    assert not inputs["brand_affinity"].any() and not inputs["fav_brand"].any()
    scores = _call(saved_model[1], inputs)
    assert scores.shape == (1, 25) and np.isfinite(scores).all()


def test_fallback_scores_are_popularity_plus_recency():
    now = 100 * DAY_MS
    states = [{"views": 10, "likes": 0, "bags": 0, "listed_ms": now},
              {"views": 10, "likes": 2, "bags": 1, "listed_ms": now},  # more engagement
              {"views": 10, "likes": 0, "bags": 0, "listed_ms": now - 28 * DAY_MS},  # four weeks older
              {"views": None, "likes": None, "bags": None, "listed_ms": None},  # nothing known: no boost at all
              {"views": math.inf, "likes": math.nan, "bags": 1, "listed_ms": now}]  # a hand-edited store file
    scores = fallback_scores(states, now)
    np.testing.assert_allclose(scores, [np.log1p(10), np.log1p(10 + 6 + 5), np.log1p(10) - 2.0, -100 / 14,
                                        np.log1p(5)])
    assert list(np.argsort(-scores)) == [1, 0, 4, 2, 3]
    # finite counters whose sum overflows: still a finite score (JSON has no infinity), and still ranked first
    huge = {"views": 1e308, "likes": 1e308, "bags": 1e308, "listed_ms": -1e308}
    scores = fallback_scores([states[0], huge], now)
    assert np.isfinite(scores).all() and scores[1] > scores[0]


def test_redis_store_that_cannot_be_reached_fails_fast():
    import time

    store = open_store(f"redis://127.0.0.1:{free_port()}/0", socket_timeout_s=0.2, connect_timeout_s=0.2)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="MGET"):
        store.fetch("u1", ["i1"])
    with pytest.raises(StoreUnavailable):
        store.ping()
    assert time.monotonic() - started < 1.0  # no retries inside redis-py
    store.close()


def test_open_store_and_embedded_store_without_a_file(tmp_path):
    store = open_store("embedded")
    assert isinstance(store, EmbeddedStore) and store.get_spec() is None
    assert store.fetch("u", ["i"]).items == [None]
    with pytest.raises(ValueError, match="feature store 'memcached://x'"):
        open_store("memcached://x")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(StoreUnavailable, match="broken.json"):
        EmbeddedStore(broken)


def test_embedded_columns_follow_writes_and_match_the_states() -> None:
    store = EmbeddedStore()
    first = {c: None for c in ITEM_STATE_COLUMNS} | {"price": 10.0, "title": "blue jeans", "views": 3}
    store.write("items", [("a", first)])
    assert store.fetch("u", ["a"]).known_columns["price"].tolist() == [10.0]
    second = first | {"price": "n/a", "title": "red dress"}  # text in a numeric field: the column turns object
    store.write("items", [("b", second), ("a", first | {"price": 12.5})])
    fetched = store.fetch("u", ["b", "missing", "a"])
    assert fetched.items[1] is None
    expected = item_state_columns([s for s in fetched.items if s is not None])
    assert fetched.known_columns.keys() == expected.keys()
    for column, values in expected.items():
        assert fetched.known_columns[column].dtype == values.dtype, column
        np.testing.assert_array_equal(fetched.known_columns[column], values, err_msg=column)
    assert fetched.known_columns["price"].tolist() == ["n/a", 12.5]


def test_materialize_task_fills_redis_from_s3(tiny_run, spec, stores, redis_factory, tmp_path, aws_env,  # noqa: F811
                                              capsys):
    """`python -m serving.materialize`, what the ranking service's image runs as a task in AWS: the feature job's
    output and the champion's model.tar.gz on S3 (moto), a real redis-server."""
    import tarfile

    import boto3
    from moto import mock_aws

    from serving import materialize as task
    from training import storage

    server = redis_factory()
    version_dir = tiny_run["export_dir"]
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:  # as SageMaker packs /opt/ml/model: <name>/<version>/...
        tar.add(version_dir.parent, arcname=version_dir.parent.name)
    no_spec = tmp_path / "weights-only.tar.gz"
    with tarfile.open(no_spec, "w:gz") as tar:
        tar.add(version_dir / "saved_model.pb", arcname="marketrank/1/saved_model.pb")
    features_uri, model_uri = "s3://features/executions/e1/features", "s3://artifacts/champion/model.tar.gz"
    with mock_aws():
        s3 = boto3.client("s3")
        for bucket in ("features", "artifacts"):
            s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
        storage.stage_out(tiny_run["features"], features_uri)
        s3.upload_file(str(archive), "artifacts", "champion/model.tar.gz")
        s3.upload_file(str(no_spec), "artifacts", "weights-only.tar.gz")
        assert task.main(["--features", features_uri, "--model", model_uri, "--store", server.url]) == 0
        counts = json.loads(capsys.readouterr().out)
        # the task after a pipeline execution: the newest output under the executions prefix (e2 written last)
        storage.stage_out(tiny_run["features"], "s3://features/executions/e3/features")
        time.sleep(1.1)  # S3's LastModified has one-second resolution
        (tmp_path / "e2").mkdir()
        (tmp_path / "e2" / "stats.json").write_text("{}")  # an output with no online state: names itself
        storage.stage_out(tmp_path / "e2", "s3://features/executions/e2/features")
        assert storage.newest_with("s3://features/executions", "stats.json") == "s3://features/executions/e2/features"
        assert task.main(["--executions", "s3://features/executions", "--model", model_uri, "--store",
                          server.url]) == 1
        assert "newest feature job output: s3://features/executions/e2/features" in capsys.readouterr().err
        assert task.main(["--executions", "s3://features/none", "--model", model_uri, "--store", server.url]) == 1
        assert "no feature job output (no stats.json) under s3://features/none" in capsys.readouterr().err
        # the event names its execution: that one, not the newest (e3 is older than e2)
        arn = "arn:aws:sagemaker:eu-west-1:123456789012:pipeline/marketrank-dev/execution/e3"
        assert task.main(["--executions", "s3://features/executions", "--execution", arn, "--model", model_uri,
                          "--store", server.url]) == 0
        assert json.loads(capsys.readouterr().out) == stores["counts"]["embedded"]
        failures = [(["--store", "embedded"], "expected a redis:// or rediss:// URL"),
                    (["--model", "s3://artifacts/weights-only.tar.gz"], "no feature_spec.json in the model"),
                    (["--model", "s3://artifacts/none.tar.gz"], "reading s3://artifacts/none.tar.gz failed")]
        for override, message in failures:
            args = {"--features": features_uri, "--model": model_uri, "--store": server.url}
            args.update(dict(zip(override[::2], override[1::2], strict=True)))
            assert task.main([x for pair in args.items() for x in pair]) == 1
            assert message in capsys.readouterr().err
    assert counts == stores["counts"]["embedded"]  # every item and user, as the local materialisation wrote
    loaded = RedisStore(server.url)
    try:
        assert loaded.get_spec().to_dict() == spec.to_dict()
        assert loaded.meta()["source"] == "s3://features/executions/e3/features"  # the last fill: where it read
        users, items = list(stores["embedded"]._data["users"])[:5], list(stores["embedded"]._data["items"])[:30]
        for user in users:
            assert loaded.fetch(user, items).items == stores["embedded"].fetch(user, items).items
    finally:
        loaded.close()
