"""The ranking API end to end: uvicorn on 127.0.0.1 in a thread, a real redis-server holding the materialised
tiny run, and a real model server over the tiny run's SavedModel (a small TF-Serving-compatible server whose
failure modes the tests switch: slow, garbage, down; plus ``serving.local_endpoint``). SageMaker's client wiring
runs on moto and botocore's Stubber.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from redis_fixtures import free_port, redis_factory, redis_server  # noqa: F401
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving import wire
from serving.app import Settings, create_app, parse_rank_request
from serving.backends import (
    CircuitBreaker,
    ModelBackend,
    Prediction,
    SageMakerBackend,
    TFServingBackend,
    score_within_budget,
)
from serving.errors import BadRequest, BreakerOpen, ModelBadResponse, ModelTimeout, ModelUnavailable
from serving.feature_store import RedisStore, RequestContext, build_inputs, fallback_scores, materialize

MODEL = "marketrank"


# --- servers ----------------------------------------------------------------------------------------------------

class Served:
    def __init__(self, server: uvicorn.Server, thread: threading.Thread, url: str):
        self.server, self.thread, self.url = server, thread, url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@contextlib.contextmanager
def serving(app):
    """Serve an ASGI app with uvicorn in a thread on a free loopback port; yields a Served (``.url``).

    uvicorn binds the port itself (port 0): a socket handed in as ``sockets=`` without IPPROTO_TCP would miss
    asyncio's TCP_NODELAY and add ~40 ms (Nagle + delayed ACK) to every keep-alive request.
    """
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    served = Served(server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}")
    try:
        yield served
    finally:
        served.stop()


class ModelServer:
    """TF Serving's REST predict/status API (and /ping, /invocations) over the real SavedModel, with switchable
    failure modes: ``ok``, ``slow`` (sleeps ``delay`` first), ``not_json``, ``nan``, ``wrong_shape``,
    ``rows_without_scores``, ``text_scores``, ``error``."""

    def __init__(self, signature, version: str):
        self.signature, self.version = signature, version
        self.specs = signature.structured_input_signature[1]
        self.mode, self.delay, self.calls, self.variant = "ok", 0.0, 0, None
        self.request_ids: list[str | None] = []

    def predict(self, body: dict) -> dict:
        import tensorflow as tf

        inputs, _, row_format = wire.request_inputs(body)
        tensors = {name: tf.constant(inputs[name], dtype=spec.dtype) for name, spec in self.specs.items()}
        return wire.predict_response({k: v.numpy() for k, v in self.signature(**tensors).items()}, row_format)

    async def handle_predict(self, request: Request) -> Response:
        self.calls += 1
        self.request_ids.append(request.headers.get("X-Amzn-SageMaker-Inference-Id"))
        body = wire.decode(await request.body())
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "not_json":
            return Response(b"<html>502 Bad Gateway</html>", 200, media_type="text/html")
        if self.mode == "error":
            return JSONResponse(wire.error_body("model crashed"), 500)
        answer = await run_in_threadpool(self.predict, body)
        if self.mode == "nan":
            answer = {"outputs": [[math.nan for _ in row] for row in answer["outputs"]]}
        if self.mode == "wrong_shape":
            answer = {"outputs": [row[:1] for row in answer["outputs"]]}
        if self.mode == "rows_without_scores":  # row format whose rows lack the signature's output
            answer = {"predictions": [{"other": row} for row in answer["outputs"]]}
        if self.mode == "text_scores":  # numbers as text: float() would take them, the wire contract does not
            answer = {"outputs": [[str(x) for x in row] for row in answer["outputs"]]}
        headers = {"X-Amzn-Invoked-Production-Variant": self.variant} if self.variant else None
        return Response(json.dumps(answer).encode(), 200, headers, media_type="application/json")

    async def handle_models(self, request: Request) -> Response:
        path = request.url.path
        if path.endswith(":predict") and request.method == "POST":
            return await self.handle_predict(request)
        return JSONResponse(wire.model_status([(self.version, "AVAILABLE")]))

    async def ping(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/models/{rest:path}", self.handle_models, methods=["GET", "POST"]),
                                 Route("/ping", self.ping), Route("/invocations", self.handle_predict,
                                                                  methods=["POST"])])


@pytest.fixture(scope="module")
def signature(tiny_run):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(tiny_run["export_dir"]))
    signature = loaded.signatures["serving_default"]
    signature._loaded = loaded  # keep the variables alive
    return signature


@pytest.fixture
def model_server(signature, tiny_run):
    model = ModelServer(signature, tiny_run["export_dir"].name)
    with serving(model.app()) as served:
        model.url, model.served = served.url, served
        yield model


@pytest.fixture(scope="module")
def spec(tiny_run):
    from training.export import load_spec

    return load_spec(tiny_run["export_dir"])


@pytest.fixture(scope="module")
def store_url(tiny_run, spec, redis_server):  # noqa: F811
    store = RedisStore(redis_server.url)
    materialize(tiny_run["features"], store, spec)
    store.close()
    return redis_server.url


@pytest.fixture(scope="module")
def catalogue(tiny_run):
    import pyarrow.parquet as pq

    items = pq.read_table(tiny_run["features"] / "online" / "items").to_pandas()
    users = pq.read_table(tiny_run["features"] / "online" / "users").to_pandas()
    active = users.sort_values("user_clicks", ascending=False)["user_id"].tolist()
    return {"items": items["item_id"].tolist(), "users": active}


@contextlib.contextmanager
def api(store_url: str, model_url: str, **overrides):
    settings = Settings(**{"feature_store": store_url, "model_url": model_url, "model_name": MODEL,
                           "budget_ms": 1000, "probe_ttl_s": 0.05, **overrides})
    app = create_app(settings)
    with serving(app) as served, httpx.Client(base_url=served.url, timeout=10) as client:
        client.app = app
        yield client


def rank(client: httpx.Client, **body) -> dict:
    response = client.post("/v1/rank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def metric_samples(client: httpx.Client) -> list:
    response = client.get("/metrics")
    assert response.status_code == 200
    return [s for family in text_string_to_metric_families(response.text) for s in family.samples]


def sample(samples: list, name: str, **labels) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"{name}{labels} not exported"
    return found[0]


# --- end to end -------------------------------------------------------------------------------------------------

def test_personalised_ranking_end_to_end(store_url, model_server, catalogue, signature, spec, tiny_run):
    candidates = catalogue["items"][:30]
    user = catalogue["users"][0]
    with api(store_url, model_server.url) as client:
        before = int(time.time() * 1000)
        body = rank(client, request_id="req-1", user_id=user, surface="search", query="vintage jeans",
                    candidates=candidates, k=10)
        other = rank(client, user_id=catalogue["users"][1], surface="search", query="vintage jeans",
                     candidates=candidates)
    assert body["request_id"] == "req-1" and body["fallback"] is False and body["reason"] is None
    assert body["model"] == {"name": MODEL, "version": tiny_run["export_dir"].name, "variant": None}
    assert [i["rank"] for i in body["items"]] == list(range(1, 11))
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and body["unknown_items"] == []
    assert set(body["timings_ms"]) == {"features", "model", "rank", "total"}
    assert body["timings_ms"]["total"] >= body["timings_ms"]["model"] > 0

    # The scores are the SavedModel's on the store's state (same code path, checked with plain TF here).
    store = RedisStore(store_url)
    fetched = store.fetch(user, candidates)
    meta = store.meta()
    store.close()
    # The API's "now" is the online state's as-of time plus the time since materialising (see Ranker.now_ms).
    now = before + int(meta["as_of_ms"]) - int(meta["materialized_ms"])
    assert abs(now - int(meta["as_of_ms"])) < 10 * 60_000  # simulated logs: "now" is their end, not today
    inputs = build_inputs(spec, RequestContext("search", "vintage jeans", now), fetched.user, fetched.items)
    import tensorflow as tf

    specs = signature.structured_input_signature[1]
    expected = signature(**{k: tf.constant(v, dtype=specs[k].dtype) for k, v in inputs.items()})["scores"].numpy()[0]
    expected_by_id = dict(zip(candidates, expected, strict=True))
    for item in body["items"]:
        assert item["score"] == pytest.approx(float(expected_by_id[item["item_id"]]), rel=1e-3, abs=1e-3)
    top = [i["item_id"] for i in body["items"]]
    assert top == [candidates[j] for j in np.argsort(-expected, kind="stable")[:10]]
    # Personalised: another user's scores for the same candidates differ.
    other_scores = {i["item_id"]: i["score"] for i in other["items"]}
    assert any(abs(other_scores[i["item_id"]] - i["score"]) > 1e-4 for i in body["items"])
    assert model_server.request_ids[0] == "req-1"  # the request id travels as the inference id


def test_unknown_user_is_a_cold_start_and_unknown_items_come_last(store_url, model_server, catalogue):
    candidates = ["i-ghost-1", *catalogue["items"][:8], "i-ghost-2"]
    with api(store_url, model_server.url) as client:
        body = rank(client, user_id="u-first-visit", surface="feed", candidates=candidates)
    assert body["fallback"] is False
    assert [i["item_id"] for i in body["items"][-2:]] == ["i-ghost-1", "i-ghost-2"]
    assert [i["score"] for i in body["items"][-2:]] == [None, None]
    assert body["unknown_items"] == ["i-ghost-1", "i-ghost-2"]
    known = [i["score"] for i in body["items"][:-2]]
    assert known == sorted(known, reverse=True) and all(isinstance(s, float) for s in known)


INVALID = [
    ({"user_id": "u1", "surface": "home", "candidates": ["a"]}, "surface"),
    ({"user_id": "u1", "surface": "feed", "candidates": []}, "candidates"),
    ({"user_id": "u1", "surface": "feed", "candidates": [f"i{i}" for i in range(1001)]}, "candidates"),
    ({"user_id": "u1", "surface": "feed", "candidates": "i1"}, "candidates"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a", "b", "a"]}, "candidates[2]"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a", 7]}, "candidates[1]"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "k": 0}, "k"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "k": "3"}, "k"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "k": True}, "k"),
    ({"surface": "feed", "candidates": ["a"]}, "user_id"),
    ({"user_id": 12, "surface": "feed", "candidates": ["a"]}, "user_id"),
    ({"user_id": "u1", "surface": "search", "candidates": ["a"]}, "query"),
    ({"user_id": "u1", "surface": "search", "query": 3, "candidates": ["a"]}, "query"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "request_id": "x" * 65}, "request_id"),
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "request_id": "über-1"}, "request_id"),  # InferenceId
    ({"user_id": "u1", "surface": "feed", "candidates": ["a"], "limit": 3}, "limit"),
    ([1, 2], "body"),
]


def test_validation_errors_name_the_field(store_url, model_server):
    with api(store_url, model_server.url) as client:
        for body, field in INVALID:
            response = client.post("/v1/rank", json=body)
            assert response.status_code == 400, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == "bad_request" and error["field"] == field, (body, error)
            assert error["message"].startswith(field), error
        response = client.post("/v1/rank", content=b"{oops", headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["field"] == "body"
        assert sample(metric_samples(client), "marketrank_requests_total", status="400") == len(INVALID) + 1
        # Accepted edge cases: empty search query, query on the feed (ignored), k above the list length.
        assert len(rank(client, user_id="u1", surface="search", query="", candidates=["a", "b"])["items"]) == 2
        assert len(rank(client, user_id="u1", surface="feed", query="x", candidates=["a"], k=50)["items"]) == 1
        # no route, or a wrong method: the same error body as every other 4xx (not FastAPI's {"detail"})
        for response, status, code in ((client.get("/v1/rank"), 405, "method_not_allowed"),
                                       (client.get("/v2/rank"), 404, "not_found"),
                                       (client.post("/healthz"), 405, "method_not_allowed")):
            assert response.status_code == status and response.json()["error"]["code"] == code, response.text
        assert "POST" in client.get("/v1/rank").headers["allow"]
        assert client.head("/healthz").status_code == 200
    assert model_server.calls == 0  # unknown items only: nothing to score


def test_model_down_falls_back_to_popularity_and_readiness_follows(store_url, model_server, catalogue):
    candidates = catalogue["items"][:20]
    with api(store_url, model_server.url) as client:
        assert rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates)["fallback"] is False
        assert client.get("/readyz").status_code == 200
        model_server.served.stop()
        response = client.post("/v1/rank", json={"user_id": catalogue["users"][0], "surface": "feed",
                                                 "candidates": candidates})
        assert response.status_code == 200
        body = response.json()
        assert body["fallback"] is True and body["reason"] == "model_unavailable"
        assert body["model"]["name"] == "fallback:popularity_recency"
        time.sleep(0.06)  # the readiness probe's cache (probe_ttl_s=0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["model"]["ok"] is False and ready.json()["checks"]["feature_store"]["ok"]
        assert client.get("/healthz").status_code == 200
    store = RedisStore(store_url)
    states = store.fetch("x", candidates).items
    store.close()
    expected = fallback_scores(states, int(time.time() * 1000))
    assert [i["item_id"] for i in body["items"]] == [candidates[j] for j in np.argsort(-expected, kind="stable")]


def test_slow_model_times_out_within_the_budget(store_url, model_server, catalogue):
    model_server.mode, model_server.delay = "slow", 3.0
    budget_ms = 200
    with api(store_url, model_server.url, budget_ms=budget_ms) as client:
        rank(client, user_id="u-warm", surface="feed", candidates=catalogue["items"][:2])  # connections warm
        started = time.monotonic()
        body = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=catalogue["items"][:40])
        elapsed_ms = (time.monotonic() - started) * 1000
        samples = metric_samples(client)
    assert body["fallback"] is True and body["reason"] == "timeout"
    assert len(body["items"]) == 40 and all(isinstance(i["score"], float) for i in body["items"])
    assert body["timings_ms"]["total"] < budget_ms + 20
    assert elapsed_ms < budget_ms + 150  # the client's view: budget + fallback + HTTP overhead
    assert sample(samples, "marketrank_fallback_total", reason="timeout") == 2


@pytest.mark.parametrize("mode", ["not_json", "nan", "wrong_shape", "rows_without_scores", "text_scores"])
def test_garbage_from_the_model_falls_back(store_url, model_server, catalogue, mode):
    model_server.mode = mode
    with api(store_url, model_server.url) as client:
        body = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=catalogue["items"][:12])
    assert body["fallback"] is True and body["reason"] == "bad_response"
    assert model_server.calls == 1  # a bad answer is not retried


@pytest.mark.parametrize("mode", ["not_json", "rows_without_scores"])
def test_breaker_opens_on_any_unusable_answer(store_url, model_server, catalogue, mode):
    model_server.mode = mode
    request = {"user_id": catalogue["users"][0], "surface": "feed", "candidates": catalogue["items"][:10]}
    with api(store_url, model_server.url, breaker_failures=2, breaker_reset_s=60) as client:
        reasons = [rank(client, **request)["reason"] for _ in range(4)]
        samples = metric_samples(client)
    assert reasons == ["bad_response"] * 2 + ["breaker_open"] * 2 and model_server.calls == 2
    assert sample(samples, "marketrank_model_calls_total", outcome="bad_response") == 2


def test_open_breaker_builds_no_features(store_url, model_server, catalogue, monkeypatch):
    """With the breaker open no model call is made, so no features are built for one: under overload that CPU
    is what the fallback answers wait for. Half-open, the probe request builds them again."""
    from serving import app as app_module

    built = []
    real = app_module.build_inputs
    monkeypatch.setattr(app_module, "build_inputs", lambda *args: built.append(1) or real(*args))
    model_server.mode = "not_json"
    request = {"user_id": catalogue["users"][0], "surface": "feed", "candidates": catalogue["items"][:10]}
    with api(store_url, model_server.url, breaker_failures=2, breaker_reset_s=0.5) as client:
        bodies = [rank(client, **request) for _ in range(4)]
        assert [b["reason"] for b in bodies] == ["bad_response"] * 2 + ["breaker_open"] * 2
        assert len(built) == 2 and model_server.calls == 2
        assert all(b["fallback"] and len(b["items"]) == 10 and b["model"]["name"] == "fallback:popularity_recency"
                   for b in bodies)
        model_server.mode = "ok"
        time.sleep(0.55)
        probe = rank(client, **request)
    assert probe["fallback"] is False and len(built) == 3 and model_server.calls == 3


def test_server_errors_are_retried_within_the_budget(store_url, model_server, catalogue):
    model_server.mode = "error"
    with api(store_url, model_server.url, model_attempts=3) as client:
        body = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=catalogue["items"][:5])
    assert body["reason"] == "model_unavailable" and model_server.calls == 3


def test_breaker_opens_after_n_failures_stops_calling_then_recovers(store_url, model_server, catalogue):
    model_server.mode = "not_json"
    request = {"user_id": catalogue["users"][0], "surface": "feed", "candidates": catalogue["items"][:10]}
    with api(store_url, model_server.url, breaker_failures=3, breaker_reset_s=0.5) as client:
        reasons = [rank(client, **request)["reason"] for _ in range(3)]
        assert reasons == ["bad_response"] * 3 and model_server.calls == 3
        assert sample(metric_samples(client), "marketrank_breaker_state") == 2
        started = time.monotonic()
        reasons = [rank(client, **request)["reason"] for _ in range(4)]
        assert reasons == ["breaker_open"] * 4
        assert model_server.calls == 3  # open: the backend is not called at all
        assert time.monotonic() - started < 0.5
        model_server.mode = "ok"
        time.sleep(0.55)
        assert sample(metric_samples(client), "marketrank_breaker_state") == 1  # half-open
        body = rank(client, **request)  # the probe request goes through and closes the breaker
        assert body["fallback"] is False and model_server.calls == 4
        assert sample(metric_samples(client), "marketrank_breaker_state") == 0


def test_readiness_follows_the_feature_store(redis_factory, tiny_run, spec, model_server, catalogue):  # noqa: F811
    server = redis_factory()
    with api(server.url, model_server.url) as client:
        not_yet = client.get("/readyz")
        assert not_yet.status_code == 503 and not_yet.json()["checks"]["spec"]["ok"] is False
        store = RedisStore(server.url)
        materialize(tiny_run["features"], store, spec)
        store.close()
        ready = client.get("/readyz")  # the spec is re-read on readiness checks
        assert ready.status_code == 200 and ready.json()["ready"] is True
        server.stop()
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["feature_store"]["ok"] is False
        assert client.get("/healthz").status_code == 200
        candidates = catalogue["items"][:6]
        body = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates, k=4)
        assert body["fallback"] is True and body["reason"] == "feature_store_unavailable"
        assert [i["item_id"] for i in body["items"]] == candidates[:4]  # request order, no scores
        assert [i["score"] for i in body["items"]] == [None] * 4 and body["model"]["name"] == "fallback:request_order"
        assert sample(metric_samples(client), "marketrank_ready") == 0


def test_a_store_filled_after_start_up_reaches_the_running_api(redis_factory, tiny_run, spec, model_server,  # noqa: F811
                                                              catalogue):
    """In AWS nothing calls /readyz (health checks use /healthz): the first fill, and a refill with a new champion's
    spec, must reach running tasks on their own (MARKETRANK_SPEC_TTL_S), off the request path."""
    server = redis_factory()
    candidates = catalogue["items"][:6]
    with api(server.url, model_server.url, spec_ttl_s=0.2) as client:
        before = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates)
        assert before["fallback"] is True and before["reason"] == "no_known_items"  # empty store: nothing to score
        store = RedisStore(server.url)
        materialize(tiny_run["features"], store, spec)
        deadline = time.monotonic() + 10
        while (body := rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates))[
                "fallback"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert body["fallback"] is False and body["model"]["name"] == MODEL  # ranked by the model, no restart
        ranker = client.app.state.runtime
        refilled = dataclasses.replace(spec, list_size=spec.list_size + 1)  # a new champion's spec
        store.put_spec(refilled, meta={"as_of_ms": 1, "materialized_ms": 1})
        store.close()
        while ranker.spec.list_size != refilled.list_size and time.monotonic() < deadline + 10:
            rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates)
            time.sleep(0.1)
        assert ranker.spec.list_size == refilled.list_size
        server.stop()  # a store that stops answering keeps the spec the API has
        time.sleep(0.3)
        rank(client, user_id=catalogue["users"][0], surface="feed", candidates=candidates)
        time.sleep(0.3)
        assert ranker.spec.list_size == refilled.list_size


def test_corrupt_stored_values_cost_their_own_ids_only(redis_factory, tiny_run, spec, model_server, catalogue,  # noqa: F811
                                                     caplog):
    server = redis_factory()
    store = RedisStore(server.url)
    materialize(tiny_run["features"], store, spec)
    bad = {"mr:item:" + catalogue["items"][1]: "null", "mr:item:" + catalogue["items"][2]: "[1]",
           "mr:item:" + catalogue["items"][3]: '{"views": Infinity}', "mr:user:" + catalogue["users"][0]: "{oops"}
    store.client.mset(bad)
    candidates = catalogue["items"][:8]
    with api(server.url, model_server.url) as client:
        body = rank(client, request_id="corrupt-1", user_id=catalogue["users"][0], surface="feed",
                    candidates=candidates)
        ready = client.get("/readyz")
        samples = metric_samples(client)
    assert body["fallback"] is False and body["reason"] is None  # the model still ranks the healthy ids
    assert body["unknown_items"] == candidates[1:4]
    assert [i["item_id"] for i in body["items"][-3:]] == candidates[1:4]
    assert all(isinstance(i["score"], float) for i in body["items"][:5])
    assert sample(samples, "marketrank_corrupt_states_total") == 4 and ready.status_code == 200
    warning = next(r.getMessage() for r in caplog.records if "corrupt stored states" in r.getMessage())
    assert "corrupt-1" in warning and "mr:item:" + candidates[1] in warning and "mr:user:" in warning

    # Corrupt materialisation metadata: the API still starts; /readyz says which check fails, as JSON.
    for meta in ("not json", json.dumps({"as_of_ms": "2024-01-01", "materialized_ms": 1})):
        store.client.set("mr:meta", meta)
        with api(server.url, model_server.url) as client:
            ready = client.get("/readyz")
            assert rank(client, user_id="u1", surface="feed", candidates=candidates[4:6])["fallback"] is False
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["feature_store"]["ok"] is False
        assert "mr:meta" in ready.json()["checks"]["feature_store"]["error"] or "as_of_ms" in ready.text
    store.close()


def test_oversized_body_is_refused_before_it_is_read(store_url, model_server, caplog):
    caplog.set_level(logging.INFO, logger="marketrank.serving")
    huge = b'{"user_id": "u1", "surface": "feed", "candidates": ["' + b"a" * (5 << 20) + b'"]}'
    with api(store_url, model_server.url) as client:
        response = client.post("/v1/rank", content=huge, headers={"Content-Type": "application/json"})
        chunked = client.post("/v1/rank", content=iter([huge[:1 << 20]] * 5),
                              headers={"Content-Type": "application/json"})  # no Content-Length
        refused = client.post("/v1/rank", json={"request_id": "bad-1", "user_id": "u1", "surface": "home",
                                                "candidates": ["a"]})
    for answer in (response, chunked):
        assert answer.status_code == 413, answer.text
        assert answer.json()["error"]["code"] == "payload_too_large" and answer.json()["error"]["field"] == "body"
    assert refused.status_code == 400
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "marketrank.serving" and r.getMessage().startswith("{")]
    assert any(x.get("request_id") == "bad-1" and x["status"] == 400 and x["field"] == "surface" for x in lines)


def test_shadow_agreement_gauges_follow_the_latest_shadow_report(store_url, model_server, tmp_path, caplog):
    report = tmp_path / "latest.json"
    with api(store_url, model_server.url, shadow_report=str(report), shadow_report_ttl_s=0.01) as client:
        assert math.isnan(sample(metric_samples(client), "marketrank_shadow_agreement", measure="overlap"))
        assert "not read" in caplog.text  # no report yet: said, not raised
        report.write_text(json.dumps({"pairs": 250, "agreement": {
            "overlap": {"mean": 0.8, "p50": 0.9}, "spearman": {"mean": 0.65}, "drift": {"mean": 0.3}}}))
        time.sleep(0.02)
        samples = metric_samples(client)
        assert sample(samples, "marketrank_shadow_agreement", measure="overlap") == 0.8
        assert sample(samples, "marketrank_shadow_agreement", measure="spearman") == 0.65
        report.write_text("not json")
        time.sleep(0.02)
        assert math.isnan(sample(metric_samples(client), "marketrank_shadow_agreement", measure="spearman"))


def test_metrics_and_request_log(store_url, model_server, catalogue, caplog):
    caplog.set_level(logging.INFO, logger="marketrank.serving")
    with api(store_url, model_server.url) as client:
        rank(client, request_id="log-me", user_id=catalogue["users"][2], surface="feed",
             candidates=catalogue["items"][:7])
        rank(client, user_id="u1", surface="feed", candidates=["i-none"])
        samples = metric_samples(client)
    for stage in ("features", "model", "rank", "total"):
        assert sample(samples, "marketrank_stage_seconds_count", stage=stage) == 2
        assert sample(samples, "marketrank_stage_seconds_bucket", stage=stage, le="+Inf") == 2
    assert sample(samples, "marketrank_fallback_total", reason="no_known_items") == 1
    assert sample(samples, "marketrank_requests_total", status="200") == 2
    assert sample(samples, "marketrank_model_calls_total", outcome="ok") == 1
    assert sample(samples, "marketrank_unknown_items_total") == 1
    assert math.isnan(sample(samples, "marketrank_shadow_agreement", measure="overlap"))  # no report configured
    lines = [json.loads(r.getMessage()) for r in caplog.records
             if r.name == "marketrank.serving" and r.getMessage().startswith("{")]
    line = next(x for x in lines if x.get("request_id") == "log-me")
    assert line["user_id"] == catalogue["users"][2] and line["n_candidates"] == 7 and line["fallback"] is False
    assert line["reason"] is None and set(line["timings_ms"]) == {"features", "model", "rank", "total"}


def test_variant_from_a_sagemaker_style_container(store_url, model_server, catalogue):
    model_server.variant = "champion"
    with api(store_url, model_server.url + "/invocations", model_version="7") as client:
        assert client.get("/readyz").status_code == 200  # probes GET /ping
        body = rank(client, user_id=catalogue["users"][0], surface="feed", candidates=catalogue["items"][:5])
    assert body["fallback"] is False
    assert body["model"] == {"name": MODEL, "version": "7", "variant": "champion"}


def test_against_the_local_endpoint(store_url, tiny_run, catalogue, tmp_path):
    from serving import local_endpoint

    models = tmp_path / "models"
    shutil.copytree(tiny_run["export_dir"], models / MODEL / tiny_run["export_dir"].name)
    with serving(local_endpoint.create_app(models, poll_seconds=60)) as endpoint, \
            api(store_url, endpoint.url) as client:
        assert client.get("/readyz").status_code == 200
        body = rank(client, user_id=catalogue["users"][0], surface="search", query="boots",
                    candidates=catalogue["items"][:15], k=5)
    assert body["fallback"] is False and body["model"]["version"] == tiny_run["export_dir"].name
    assert [i["rank"] for i in body["items"]] == [1, 2, 3, 4, 5]


# --- the parts, without HTTP ------------------------------------------------------------------------------------

def test_settings_from_env_name_the_variable(tmp_path):
    settings = Settings.from_env({"MARKETRANK_FEATURE_STORE": "redis://cache:6379/0", "MARKETRANK_BUDGET_MS": "80",
                                  "MARKETRANK_MODEL_BACKEND": "sagemaker", "MARKETRANK_ENDPOINT_NAME": "marketrank",
                                  "AWS_REGION": "eu-west-1", "MARKETRANK_BREAKER_FAILURES": "7"})
    assert (settings.feature_store, settings.budget_ms, settings.endpoint_name, settings.aws_region,
            settings.breaker_failures) == ("redis://cache:6379/0", 80.0, "marketrank", "eu-west-1", 7)
    embedded = Settings.from_env({"MARKETRANK_HOME": str(tmp_path)})
    assert embedded.feature_store == "embedded" and embedded.store_path == str(tmp_path / "feature_store.json")
    for env, needle in [({"MARKETRANK_BUDGET_MS": "fast"}, "MARKETRANK_BUDGET_MS"),
                        ({"MARKETRANK_MODEL_BACKEND": "sagemaker"}, "MARKETRANK_ENDPOINT_NAME"),
                        ({"MARKETRANK_FEATURE_STORE": "memcached://x"}, "MARKETRANK_FEATURE_STORE"),
                        ({"MARKETRANK_BREAKER_FAILURES": "0"}, "MARKETRANK_BREAKER_FAILURES")]:
        with pytest.raises(ValueError, match=needle):
            Settings.from_env(env)


def test_parse_rank_request_defaults():
    parsed = parse_rank_request({"user_id": "u", "surface": "feed", "candidates": ["a", "b"], "query": "x"},
                                ts_ms=5)
    assert parsed.k == 2 and parsed.query is None and parsed.ts_ms == 5 and len(parsed.request_id) == 32
    with pytest.raises(BadRequest) as err:
        parse_rank_request({"user_id": "u", "surface": "feed", "candidates": ["a"] * 3}, max_candidates=2)
    assert err.value.field == "candidates"


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_circuit_breaker_states():
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=2, reset_timeout_s=10, clock=clock)
    breaker.record_failure()
    breaker.record_success()  # consecutive failures only
    breaker.record_failure()
    assert breaker.state == "closed" and breaker.allow()
    breaker.record_failure()
    assert breaker.state == "open" and not breaker.allow()
    clock.now = 10.0
    assert breaker.state == "half_open"
    assert breaker.allow() and not breaker.allow()  # one probe at a time
    breaker.record_failure()
    assert breaker.state == "open"  # the failed probe re-opens for a full cool-down
    clock.now = 19.9
    assert not breaker.allow()
    clock.now = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.allow()


class ScriptedBackend(ModelBackend):
    """Fails with the scripted errors, then answers; records the timeout of each call."""

    def __init__(self, errors: list[Exception], clock: FakeClock, cost_s: float = 0.0):
        super().__init__("scripted")
        self.errors, self.clock, self.cost_s, self.timeouts = list(errors), clock, cost_s, []

    async def score(self, inputs, request_id, timeout_s):
        self.timeouts.append(timeout_s)
        self.clock.now += self.cost_s
        if self.errors:
            raise self.errors.pop(0)
        return Prediction(np.zeros(3))

    async def probe(self, timeout_s):
        return {}


def test_retries_only_connection_failures_and_only_within_the_budget():
    inputs = {"mask": np.ones((1, 3), bool)}
    clock = FakeClock()

    def run(backend, breaker, deadline, attempts=3):
        return asyncio.run(score_within_budget(backend, breaker, inputs, "r", deadline, max_attempts=attempts,
                                               clock=clock))

    backend = ScriptedBackend([ModelUnavailable("reset")], clock, cost_s=0.01)
    assert run(backend, CircuitBreaker(), deadline=0.1).attempts == 2
    assert backend.timeouts == pytest.approx([0.1, 0.09])  # the retry gets what is left

    clock.now = 0.0
    backend = ScriptedBackend([ModelUnavailable("refused")] * 3, clock, cost_s=0.098)
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(ModelUnavailable):
        run(backend, breaker, deadline=0.1)
    assert len(backend.timeouts) == 1 and breaker.state == "open"  # no time left for a retry; one failure
    with pytest.raises(BreakerOpen):
        run(backend, breaker, deadline=10)

    clock.now = 0.0
    backend = ScriptedBackend([ModelBadResponse("nan")], clock)
    with pytest.raises(ModelBadResponse):
        run(backend, CircuitBreaker(), deadline=1.0)
    assert len(backend.timeouts) == 1  # garbage is not retried

    clock.now = 0.0
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(ModelBadResponse, match="KeyError") as raised:  # a backend bug counts as a failed call
        run(ScriptedBackend([KeyError("scores")], clock), breaker, deadline=1.0)
    assert raised.value.attempts == 1 and breaker.state == "open"

    clock.now = 0.0
    breaker = CircuitBreaker(failure_threshold=1)
    with pytest.raises(ModelTimeout, match="no time left"):
        run(ScriptedBackend([], clock), breaker, deadline=0.001)
    assert breaker.state == "closed"  # no call was made: not a failure


# --- SageMaker client wiring --------------------------------------------------------------------------------------

def _inputs(n: int) -> dict[str, np.ndarray]:
    return {"surface": np.array(["feed"], dtype=object), "views": np.ones((1, n), np.float32),
            "mask": np.ones((1, n), bool)}


def test_sagemaker_backend_on_moto(aws_env):
    import boto3
    import requests
    from moto import mock_aws

    with mock_aws():
        sm = boto3.client("sagemaker", region_name="eu-west-1")
        sm.create_model(ModelName="m1", ExecutionRoleArn="arn:aws:iam::123456789012:role/sm",
                        PrimaryContainer={"Image": "123456789012.dkr.ecr.eu-west-1.amazonaws.com/tfs:2.14"})
        sm.create_endpoint_config(EndpointConfigName="c1", ProductionVariants=[
            {"VariantName": "champion", "ModelName": "m1", "InstanceType": "ml.m5.large",
             "InitialInstanceCount": 1}])
        sm.create_endpoint(EndpointName="marketrank", EndpointConfigName="c1")
        answer = wire.encode(wire.predict_response({"scores": np.array([[0.5, -1.0, 2.0]])}))
        requests.post("http://motoapi.amazonaws.com/moto-api/static/sagemaker/endpoint-results",
                      json={"region": "eu-west-1", "results": [
                          {"Body": answer.decode(), "ContentType": "application/json",
                           "InvokedProductionVariant": "champion"},
                          {"Body": "not json", "ContentType": "text/plain"}]}, timeout=10)
        backend = SageMakerBackend("marketrank", "eu-west-1", model_name=MODEL)
        config = backend.runtime.meta.config
        assert config.retries["total_max_attempts"] == 1 and config.max_pool_connections == 32

        async def go():
            probe = await backend.probe(2.0)
            first = await backend.score(_inputs(3), "rid-1", 2.0)
            with pytest.raises(ModelBadResponse):
                await backend.score(_inputs(2), "rid-2", 2.0)
            await backend.aclose()
            return probe, first

        probe, first = asyncio.run(go())
    assert probe["status"] == "InService" and probe["variants"] == ["champion"]
    assert first.variant == "champion" and first.scores.tolist() == [0.5, -1.0, 2.0]


def test_sagemaker_backend_request_parameters_and_errors(aws_env):
    import boto3
    from botocore.response import StreamingBody
    from botocore.stub import Stubber

    runtime = boto3.client("sagemaker-runtime", region_name="eu-west-1")
    sagemaker = boto3.client("sagemaker", region_name="eu-west-1")
    inputs = _inputs(2)
    body = wire.encode(wire.predict_request(inputs))
    payload = wire.encode({"outputs": [[1.0, 2.0]]})
    with Stubber(runtime) as stub:
        stub.add_response("invoke_endpoint",
                          {"Body": StreamingBody(io.BytesIO(payload), len(payload)),
                           "InvokedProductionVariant": "challenger"},
                          {"EndpointName": "ep", "ContentType": "application/json", "Accept": "application/json",
                           "Body": body, "InferenceId": "req-42"})
        # The container's 4xx (ModelError, 424) and a refused request (ValidationError) reject this request: a
        # bad response, not retried; throttling and 5xx are worth a retry within the budget.
        # ModelError says what the container answered (OriginalStatusCode): its 5xx is an outage, retried.
        errors = [("ModelError", 424, ModelBadResponse, {"OriginalStatusCode": 400}),
                  ("ModelError", 424, ModelUnavailable, {"OriginalStatusCode": 503}),
                  ("ValidationError", 400, ModelBadResponse, {}),
                  ("ValidationError", 400, ModelUnavailable, {"message": "Endpoint ep of account 1 not found."}),
                  ("ThrottlingException", 400, ModelUnavailable, {}), ("ServiceUnavailable", 503, ModelUnavailable, {}),
                  ("ModelNotReadyException", 429, ModelUnavailable, {})]
        for code, status, _, extra in errors:
            stub.add_client_error("invoke_endpoint", service_error_code=code, http_status_code=status,
                                  service_message=extra.get("message", ""),
                                  modeled_fields={k: v for k, v in extra.items() if k != "message"} or None)
        backend = SageMakerBackend("ep", runtime_client=runtime, sagemaker_client=sagemaker)

        async def go():
            ok = await backend.score(inputs, "req-42", 1.0)
            for code, _, error, _ in errors:
                with pytest.raises(error, match=code):
                    await backend.score(inputs, "req-43", 1.0)
            await backend.aclose()
            return ok

        ok = asyncio.run(go())
        stub.assert_no_pending_responses()
    assert ok.variant == "challenger" and ok.scores.tolist() == [1.0, 2.0]

    # Ready while the endpoint still answers: AWS patching it (SystemUpdating), or a failed update rolled back.
    for status, ready in [("InService", True), ("SystemUpdating", True), ("UpdateRollbackFailed", True),
                          ("Updating", True), ("RollingBack", True), ("Creating", False), ("Failed", False),
                          ("OutOfService", False)]:
        with Stubber(sagemaker) as stub:
            stub.add_response("describe_endpoint", {
                "EndpointName": "ep", "EndpointArn": "arn:aws:sagemaker:eu-west-1:123456789012:endpoint/ep",
                "EndpointConfigName": "c", "EndpointStatus": status, "CreationTime": 0, "LastModifiedTime": 0})
            async def probe(backend: SageMakerBackend) -> str:
                try:
                    return (await backend.probe(1.0))["status"]
                finally:
                    await backend.aclose()

            backend = SageMakerBackend("ep", runtime_client=runtime, sagemaker_client=sagemaker)
            if ready:
                assert asyncio.run(probe(backend)) == status
            else:
                with pytest.raises(ModelUnavailable, match=status):
                    asyncio.run(probe(backend))


def test_tfserving_backend_timeout_and_refused(model_server):
    model_server.mode, model_server.delay = "slow", 3.0

    async def go():
        slow = TFServingBackend(model_server.url, MODEL)
        started = time.monotonic()
        with pytest.raises(ModelTimeout):
            await slow.score(_inputs(2), "r", 0.2)
        assert time.monotonic() - started < 1.5  # gave up at its timeout, not after the server's 3 s
        await slow.aclose()
        refused = TFServingBackend(f"http://127.0.0.1:{free_port()}", MODEL)
        with pytest.raises(ModelUnavailable):
            await refused.score(_inputs(2), "r", 0.5)
        with pytest.raises(ModelUnavailable):
            await refused.probe(0.5)
        await refused.aclose()

    asyncio.run(go())


def test_api_module_does_not_need_tensorflow():
    import subprocess
    import sys

    code = ("import sys, serving.app, serving.backends, serving.feature_store, serving.materialize; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "assert 'pyspark' not in sys.modules, 'pyspark imported'")  # the image has neither
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1], timeout=60)
    assert result.returncode == 0, result.stderr
