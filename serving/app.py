"""The real-time ranking API (FastAPI on uvicorn; ECS Fargate in production).

``POST /v1/rank``::

    {"request_id"?: str (1..64 printable ASCII), "user_id": str, "surface": "search" | "feed",
     "query"?: str (required on search, may be empty; ignored on the feed), "candidates": [item_id, ...] (1..1000,
     distinct), "k"?: int >= 1 (default: all candidates)}
    -> 200 {"request_id", "items": [{"item_id", "score", "rank"}], "model": {"name", "version", "variant"},
            "fallback": bool, "reason": str | null, "unknown_items": [item_id, ...],
            "timings_ms": {"features", "model", "rank", "total"}}

Contract:

* Validation errors are 400 ``{"error": {"code": "bad_request", "field": "<name>", "message"}}`` (unknown
  fields too), a body over ``MAX_BODY_BYTES`` is 413 (``payload_too_large``), a path no route takes 404
  (``not_found``) and a wrong method 405 (``method_not_allowed``, with ``Allow``); nothing else is a 4xx. A
  dependency outage is never an error status: the answer is a ranking.
* Items are sorted by ``score`` (descending), ``rank`` is 1..k. An unknown user is a cold start (no personal
  features), not an error. Unknown item ids (no feature-store state) cannot be scored: they come after every
  known item, in request order, with ``score: null``, and are listed in ``unknown_items``. So are ids whose
  stored state is corrupt (not a JSON object), which are also logged and counted
  (``marketrank_corrupt_states_total``): one bad value costs its own id, not the request's ranking.
* ``fallback: true`` means the model did not rank: ``reason`` is ``timeout`` (budget spent), ``model_unavailable``
  (refused, reset, 5xx, AWS errors, after retries), ``bad_response`` (not the wire contract, wrong shape, NaN),
  ``breaker_open`` (no call made), ``model_error`` (the backend raised something unexpected), ``no_spec``
  (nothing materialised), ``features_error``: the items are then
  ranked by popularity + recency from the store (``feature_store.fallback_scores``; model
  ``fallback:popularity_recency``); or ``feature_store_unavailable`` and ``no_known_items`` (nothing to score):
  request order, ``score: null`` (model ``fallback:request_order``).
* Budget: ``MARKETRANK_BUDGET_MS`` from the request's arrival. The model call gets what the feature stage left,
  minus ``MARKETRANK_RANK_RESERVE_MS`` for ranking; retries (connection failures only) happen only while time
  remains. The answer comes within the budget plus the fallback's few milliseconds.
* ``model``: ``name`` from settings; ``version`` from the endpoint (``X-Model-Version`` header, TF Serving's status
  API) else ``MARKETRANK_MODEL_VERSION``; ``variant`` from ``X-Amzn-Invoked-Production-Variant`` (SageMaker)
  else ``MARKETRANK_MODEL_VARIANT``.

``/healthz``: the process is alive. ``/readyz``: 200 when the feature store answers, holds a feature spec, and the
model backend's cached probe passes; else 503 with the failing checks. Each readiness check re-reads the spec
(``mr:spec``, written by ``materialize`` from the model artifact). ``/metrics``: Prometheus text (see ``Metrics``).
One JSON log line per request (logger ``marketrank.serving``).

Run: ``uvicorn serving.app:app`` (the module-level ``app`` is built from the environment on first access) or
``serving.app.serve(settings)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import heap
from serving.backends import (
    CachedProbe,
    CircuitBreaker,
    ModelBackend,
    Prediction,
    SageMakerBackend,
    TFServingBackend,
    score_within_budget,
)
from serving.errors import (
    ApiError,
    BadRequest,
    HttpError,
    ModelError,
    NotReady,
    PayloadTooLarge,
    ServingError,
    StoreUnavailable,
    error_response,
)
from serving.feature_store import (
    DEFAULT_STORE_FILE,
    FeatureStore,
    RequestContext,
    build_inputs,
    fallback_scores,
    open_store,
)
from serving.shadow_report import AGREEMENT_MEASURES, agreement_summary

log = logging.getLogger("marketrank.serving")

SURFACES = ("search", "feed")
REQUEST_FIELDS = ("request_id", "user_id", "surface", "query", "candidates", "k")
MAX_ID_CHARS, MAX_QUERY_CHARS = 128, 512
MAX_REQUEST_ID_CHARS = 64  # SageMaker's InferenceId limit
#: A valid request is at most ~0.8 MB (1000 ids of 128 characters, each \u-escaped); beyond this the body is
#: refused before it is read whole.
MAX_BODY_BYTES = 4 << 20
FALLBACK_MODEL = {"name": "fallback:popularity_recency", "version": None, "variant": None}
ORDER_MODEL = {"name": "fallback:request_order", "version": None, "variant": None}
STAGES = ("features", "model", "rank", "total")


# --- settings ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Settings:
    """API settings; ``from_env`` reads the ``MARKETRANK_*`` variables named beside each field."""

    feature_store: str = "embedded"  # MARKETRANK_FEATURE_STORE: "embedded" | "redis://host:port/0"
    store_path: str | None = None  # MARKETRANK_STORE_PATH (default $MARKETRANK_HOME/feature_store.json)
    redis_timeout_ms: float = 100.0  # MARKETRANK_REDIS_TIMEOUT_MS: connect and socket timeouts
    model_backend: str = "tfserving"  # MARKETRANK_MODEL_BACKEND: "tfserving" | "sagemaker"
    model_url: str = "http://127.0.0.1:8501"  # MARKETRANK_MODEL_URL (TF Serving root, or .../invocations)
    model_name: str = "marketrank"  # MARKETRANK_MODEL_NAME
    model_version: str | None = None  # MARKETRANK_MODEL_VERSION: pins the TF Serving version; reported otherwise
    model_variant: str | None = None  # MARKETRANK_MODEL_VARIANT: reported when the endpoint does not say
    endpoint_name: str | None = None  # MARKETRANK_ENDPOINT_NAME (sagemaker)
    aws_region: str | None = None  # AWS_REGION / AWS_DEFAULT_REGION (sagemaker)
    budget_ms: float = 150.0  # MARKETRANK_BUDGET_MS: whole-request budget
    rank_reserve_ms: float = 5.0  # MARKETRANK_RANK_RESERVE_MS: kept from the model call for ranking
    model_attempts: int = 2  # MARKETRANK_MODEL_ATTEMPTS: attempts per request (connection failures only)
    breaker_failures: int = 5  # MARKETRANK_BREAKER_FAILURES: consecutive failed requests that open it
    breaker_reset_s: float = 10.0  # MARKETRANK_BREAKER_RESET_S: open -> half-open cool-down
    probe_ttl_s: float = 5.0  # MARKETRANK_PROBE_TTL_S: readiness probe cache
    max_candidates: int = 1000  # MARKETRANK_MAX_CANDIDATES
    io_threads: int = 32  # MARKETRANK_IO_THREADS: thread pool for blocking store calls
    log_level: str = "INFO"  # MARKETRANK_LOG_LEVEL
    #: MARKETRANK_SHADOW_REPORT: the latest shadow report (path or s3:// URI; `marketrank shadow report` writes it),
    #: re-read at most every ``shadow_report_ttl_s`` on scrape for the marketrank_shadow_agreement gauges.
    shadow_report: str | None = None
    shadow_report_ttl_s: float = 60.0  # MARKETRANK_SHADOW_REPORT_TTL_S
    #: MARKETRANK_SPEC_TTL_S: the feature spec and store metadata are re-read in the background at most this often
    #: while requests arrive, so a refill (``serving.materialize``) reaches running tasks without a restart.
    spec_ttl_s: float = 30.0

    ENV = {"feature_store": "MARKETRANK_FEATURE_STORE", "store_path": "MARKETRANK_STORE_PATH",
           "redis_timeout_ms": "MARKETRANK_REDIS_TIMEOUT_MS", "model_backend": "MARKETRANK_MODEL_BACKEND",
           "model_url": "MARKETRANK_MODEL_URL", "model_name": "MARKETRANK_MODEL_NAME",
           "model_version": "MARKETRANK_MODEL_VERSION", "model_variant": "MARKETRANK_MODEL_VARIANT",
           "endpoint_name": "MARKETRANK_ENDPOINT_NAME", "budget_ms": "MARKETRANK_BUDGET_MS",
           "rank_reserve_ms": "MARKETRANK_RANK_RESERVE_MS", "model_attempts": "MARKETRANK_MODEL_ATTEMPTS",
           "breaker_failures": "MARKETRANK_BREAKER_FAILURES", "breaker_reset_s": "MARKETRANK_BREAKER_RESET_S",
           "probe_ttl_s": "MARKETRANK_PROBE_TTL_S", "max_candidates": "MARKETRANK_MAX_CANDIDATES",
           "io_threads": "MARKETRANK_IO_THREADS", "log_level": "MARKETRANK_LOG_LEVEL",
           "shadow_report": "MARKETRANK_SHADOW_REPORT", "shadow_report_ttl_s": "MARKETRANK_SHADOW_REPORT_TTL_S",
           "spec_ttl_s": "MARKETRANK_SPEC_TTL_S"}

    def __post_init__(self) -> None:
        def fail(field: str, message: str):
            raise ValueError(f"{self.ENV.get(field, field)}: {message}")

        if not (self.feature_store == "embedded" or self.feature_store.startswith(("redis://", "rediss://"))):
            fail("feature_store", f"expected 'embedded' or a redis:// URL, got {self.feature_store!r}")
        if self.model_backend not in ("tfserving", "sagemaker"):
            fail("model_backend", f"expected 'tfserving' or 'sagemaker', got {self.model_backend!r}")
        if self.model_backend == "sagemaker" and not self.endpoint_name:
            fail("endpoint_name", "required when MARKETRANK_MODEL_BACKEND=sagemaker")
        if self.model_backend == "tfserving" and not self.model_url.startswith(("http://", "https://")):
            fail("model_url", f"expected an http(s):// URL, got {self.model_url!r}")
        for name in ("budget_ms", "redis_timeout_ms", "breaker_reset_s", "probe_ttl_s", "shadow_report_ttl_s",
                     "spec_ttl_s"):
            if not getattr(self, name) > 0:
                fail(name, f"must be > 0, got {getattr(self, name)}")
        if not 0 <= self.rank_reserve_ms < self.budget_ms:
            fail("rank_reserve_ms", f"must be in [0, budget_ms), got {self.rank_reserve_ms}")
        for name in ("model_attempts", "breaker_failures", "max_candidates", "io_threads"):
            if getattr(self, name) < 1:
                fail(name, f"must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        for field, var in cls.ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = types[field]
            try:
                values[field] = float(raw) if kind == "float" else int(raw) if kind == "int" else raw
            except ValueError:
                raise ValueError(f"{var}: expected {'a number' if kind == 'float' else 'an integer'}, got {raw!r}"
                                 ) from None
        values.setdefault("aws_region", env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"))
        if values.get("feature_store", "embedded") == "embedded" and "store_path" not in values:
            values["store_path"] = str(Path(env.get("MARKETRANK_HOME") or "workspace") / DEFAULT_STORE_FILE)
        return cls(**values)


# --- request parsing --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RankRequest:
    request_id: str
    user_id: str
    surface: str
    query: str | None  # None on the feed
    candidates: tuple[str, ...]
    k: int
    ts_ms: int  # arrival time: the features' "now"


def _string(body: Mapping[str, Any], field: str, max_chars: int, *, required: bool = True,
            allow_empty: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise BadRequest(field, "is required")
        return None
    if not isinstance(value, str):
        raise BadRequest(field, f"must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRequest(field, "must not be empty")
    if len(value) > max_chars:
        raise BadRequest(field, f"must be at most {max_chars} characters")
    return value


def parse_rank_request(body: Any, *, max_candidates: int = 1000, ts_ms: int | None = None) -> RankRequest:
    """A validated RankRequest; BadRequest names the first offending field."""
    if not isinstance(body, dict):
        raise BadRequest("body", "must be a JSON object")
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(unknown[0], f"unknown field (expected {', '.join(REQUEST_FIELDS)})")
    request_id = _string(body, "request_id", MAX_REQUEST_ID_CHARS, required=False)
    # It travels as SageMaker's InferenceId: printable ASCII (Java's \p{Print}), not starting with a space.
    if request_id is not None and not (request_id.isascii() and request_id.isprintable() and request_id[0] != " "):
        raise BadRequest("request_id", "must be printable ASCII and not start with a space")
    user_id = _string(body, "user_id", MAX_ID_CHARS)
    surface = _string(body, "surface", 16)
    if surface not in SURFACES:
        raise BadRequest("surface", f"must be one of {', '.join(SURFACES)}, got {surface!r}")
    query = _string(body, "query", MAX_QUERY_CHARS, required=surface == "search", allow_empty=True)
    if surface == "feed":
        query = None  # the feed has no query in training either
    candidates = body.get("candidates")
    if candidates is None:
        raise BadRequest("candidates", "is required")
    if not isinstance(candidates, list):
        raise BadRequest("candidates", f"must be a list of item ids, got {type(candidates).__name__}")
    if not 1 <= len(candidates) <= max_candidates:
        raise BadRequest("candidates", f"must hold 1 to {max_candidates} item ids, got {len(candidates)}")
    seen: dict[str, int] = {}
    for i, item in enumerate(candidates):
        if not isinstance(item, str) or not item:
            raise BadRequest(f"candidates[{i}]", f"must be a non-empty string, got {item!r}")
        if len(item) > MAX_ID_CHARS:
            raise BadRequest(f"candidates[{i}]", f"must be at most {MAX_ID_CHARS} characters")
        if item in seen:
            raise BadRequest(f"candidates[{i}]", f"duplicate item id {item!r} (also at index {seen[item]})")
        seen[item] = i
    k = body.get("k", len(candidates))
    if k is None:
        k = len(candidates)
    if isinstance(k, bool) or not isinstance(k, int):
        raise BadRequest("k", f"must be an integer, got {type(k).__name__}")
    if k < 1:
        raise BadRequest("k", f"must be >= 1, got {k}")
    return RankRequest(request_id=request_id or uuid.uuid4().hex, user_id=user_id, surface=surface, query=query,
                       candidates=tuple(candidates), k=min(k, len(candidates)),
                       ts_ms=int(time.time() * 1000) if ts_ms is None else ts_ms)


# --- metrics ----------------------------------------------------------------------------------------------------

#: How long a /metrics scrape waits for the shadow report (a file, or S3 with short timeouts).
SHADOW_READ_WAIT_S = 2.0


class Metrics:
    """The API's Prometheus metrics, in their own registry (one per app).

    * ``marketrank_stage_seconds{stage}``: latency histograms of features, model, rank and total.
    * ``marketrank_fallback_total{reason}``: rankings that did not come from the model, by reason.
    * ``marketrank_requests_total{status}``: /v1/rank answers by HTTP status.
    * ``marketrank_model_calls_total{outcome}``: requests that reached the model: ok, or the failure reason.
    * ``marketrank_unknown_items_total``: candidates without feature-store state.
    * ``marketrank_corrupt_states_total``: stored states that are not a JSON object, read as unknown.
    * ``marketrank_breaker_state``: 0 closed, 1 half-open, 2 open (read at scrape time).
    * ``marketrank_ready``: 1 when the last /readyz passed.
    * ``marketrank_shadow_agreement{measure}``: the challenger's agreement with the champion (mean top-k
      ``overlap`` and rank ``spearman``) in the latest shadow report (``Settings.shadow_report``), read at scrape
      time: the shadow's answers go to data capture, never through the API. NaN without a report.
    """

    BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)

    def __init__(self, breaker: CircuitBreaker):
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram("marketrank_stage_seconds", "Latency of each /v1/rank stage", ["stage"],
                               buckets=self.BUCKETS, registry=r)
        self.fallback = Counter("marketrank_fallback", "Rankings not from the model, by reason", ["reason"],
                                registry=r)
        self.requests = Counter("marketrank_requests", "/v1/rank answers by HTTP status", ["status"], registry=r)
        self.model_calls = Counter("marketrank_model_calls", "Requests that reached the model, by outcome",
                                   ["outcome"], registry=r)
        self.unknown_items = Counter("marketrank_unknown_items", "Candidates without feature-store state",
                                     registry=r)
        self.corrupt_states = Counter("marketrank_corrupt_states", "Stored states that are not a JSON object, "
                                      "read as unknown", registry=r)
        self.breaker = Gauge("marketrank_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open",
                             registry=r)
        self.breaker.set_function(breaker.gauge)
        self.ready = Gauge("marketrank_ready", "1 when the last readiness check passed", registry=r)
        self.shadow_agreement = Gauge("marketrank_shadow_agreement",
                                      "Shadow challenger's agreement with the champion (latest shadow report)",
                                      ["measure"], registry=r)
        for measure in AGREEMENT_MEASURES:
            self.shadow_agreement.labels(measure=measure).set(math.nan)
        for stage in STAGES:
            self.stage.labels(stage=stage)


# --- logging ----------------------------------------------------------------------------------------------------

class JsonFormatter(logging.Formatter):
    """JSON lines: request lines are JSON already; anything else is wrapped."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if message.startswith("{") and not record.exc_info:
            return message
        line = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name, "message": message}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _json_line(line)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to pass ``limit`` bytes: no unbounded buffering."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise PayloadTooLarge(f"{int(length)} bytes is over the {limit} bytes allowed")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"over the {limit} bytes allowed")
        chunks.append(chunk)
    return b"".join(chunks)


def _json_line(fields: Mapping[str, Any]) -> str:
    return orjson.dumps(fields, default=str).decode()


def configure_logging(level: str = "INFO") -> None:
    """JSON lines on stdout for the ``marketrank`` loggers (idempotent)."""
    logger = logging.getLogger("marketrank")
    logger.setLevel(level.upper())
    if not any(getattr(h, "_marketrank", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(JsonFormatter())
        handler._marketrank = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


# --- the service ------------------------------------------------------------------------------------------------

def make_backend(settings: Settings) -> ModelBackend:
    if settings.model_backend == "sagemaker":
        return SageMakerBackend(settings.endpoint_name, settings.aws_region, model_name=settings.model_name,
                                read_timeout_s=max(settings.budget_ms / 1000, 0.5))
    return TFServingBackend(settings.model_url, settings.model_name, version=settings.model_version)


def make_store(settings: Settings) -> FeatureStore:
    timeout = settings.redis_timeout_ms / 1000
    if settings.feature_store == "embedded":
        return open_store("embedded", settings.store_path)
    return open_store(settings.feature_store, socket_timeout_s=timeout, connect_timeout_s=timeout,
                      max_connections=settings.io_threads)


class Ranker:
    """One app's dependencies and the /v1/rank pipeline: features -> model (or fallback) -> rank."""

    def __init__(self, settings: Settings, store: FeatureStore, backend: ModelBackend):
        self.settings, self.store, self.backend = settings, store, backend
        self.breaker = CircuitBreaker(settings.breaker_failures, settings.breaker_reset_s)
        self.probe = CachedProbe(backend, ttl_s=settings.probe_ttl_s)
        self.metrics = Metrics(self.breaker)
        self.executor = ThreadPoolExecutor(settings.io_threads, thread_name_prefix="store")
        self.spec = None
        #: Added to the wall clock to get the features' "now": the online state is as of the end of its logs
        #: (``meta.as_of_ms``), so ages and tenures are measured from there plus the time since materialising.
        #: ~0 when the logs are live; large for replayed or simulated logs, whose counters are not from today.
        self.clock_offset_ms = 0
        self._shadow_read = -math.inf  # monotonic time the shadow report was last read
        self._shadow_reading = False
        self._spec_read = -math.inf  # monotonic time the spec was last (re)loaded
        self._spec_task: asyncio.Task | None = None

    async def store_call(self, fn, timeout_s: float, *args: Any):
        """A store call, in the thread pool when it blocks; StoreUnavailable past ``timeout_s``."""
        if not self.store.blocking:
            return fn(*args)
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.wait_for(future, max(timeout_s, 0.001))
        except asyncio.TimeoutError:
            raise StoreUnavailable(f"{self.store.describe()} did not answer within {timeout_s * 1000:.0f} ms"
                                   ) from None

    def refresh_spec(self) -> None:
        """Re-read the spec and metadata in the background, at most every ``spec_ttl_s`` (off the request path: the
        request that notices the age uses the spec it has). A failed read keeps the current spec."""
        if time.monotonic() - self._spec_read < self.settings.spec_ttl_s or (
                self._spec_task is not None and not self._spec_task.done()):
            return

        async def reload() -> None:
            try:
                await self.load_spec()
            except Exception as err:  # noqa: BLE001 - the store's trouble: requests fall back on their own
                log.warning("feature spec not reloaded (kept the current one): %s: %s", type(err).__name__, err)

        self._spec_task = asyncio.get_running_loop().create_task(reload())  # load_spec stamps _spec_read

    async def load_spec(self, timeout_s: float = 1.0) -> None:
        self._spec_read = time.monotonic()
        self.spec = await self.store_call(self.store.get_spec, timeout_s)
        meta = await self.store_call(self.store.meta, timeout_s) or {}
        if meta.get("as_of_ms") and meta.get("materialized_ms"):
            try:
                self.clock_offset_ms = int(meta["as_of_ms"]) - int(meta["materialized_ms"])
            except (TypeError, ValueError) as err:
                raise StoreUnavailable(f"{self.store.describe()} metadata: as_of_ms / materialized_ms must be "
                                       f"epoch milliseconds, got {meta['as_of_ms']!r} / "
                                       f"{meta['materialized_ms']!r}") from err

    def now_ms(self) -> int:
        return int(time.time() * 1000) + self.clock_offset_ms

    async def rank(self, request: RankRequest, started: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """(response body, log fields) for a valid request that arrived at ``started`` (monotonic)."""
        settings = self.settings
        deadline = started + settings.budget_ms / 1000
        reason: str | None = None
        fetched = prediction = inputs = None
        attempts = 0

        t0 = time.monotonic()
        try:
            fetched = await self.store_call(self.store.fetch, deadline - t0, request.user_id, request.candidates)
        except StoreUnavailable as err:
            reason = err.reason
            log.warning("feature store unavailable for request %s: %s", request.request_id, err)
        if fetched is not None and fetched.corrupt:
            self.metrics.corrupt_states.inc(len(fetched.corrupt))
            log.warning("request %s: %d corrupt stored states read as unknown: %s", request.request_id,
                        len(fetched.corrupt), "; ".join(fetched.corrupt[:5]))
        known = [(i, s) for i, s in zip(request.candidates, fetched.items, strict=True) if s is not None] \
            if fetched is not None else []
        unknown = [i for i, s in zip(request.candidates, fetched.items, strict=True) if s is None] \
            if fetched is not None else []
        spec = self.spec
        if reason is None:
            if not known:
                reason = "no_known_items"
            elif spec is None:
                reason = "no_spec"
            elif self.breaker.state == CircuitBreaker.OPEN:
                # No model call will be made, so no features either: under overload (the breaker opens on
                # budget timeouts) that CPU is what the fallback answers behind this one wait for.
                err = self.breaker.open_error(self.backend)
                reason = err.reason
                log.warning("model failed for request %s (%s): %s", request.request_id, reason, err)
            else:
                try:
                    inputs = build_inputs(spec, RequestContext(request.surface, request.query, request.ts_ms),
                                          fetched.user, fetched.known_items())
                except Exception:  # noqa: BLE001 - a state the feature code cannot handle: rank without the model
                    reason = "features_error"
                    log.exception("features failed for request %s", request.request_id)
        t1 = time.monotonic()

        if inputs is not None:
            try:
                prediction = await score_within_budget(
                    self.backend, self.breaker, inputs, request.request_id,
                    deadline - settings.rank_reserve_ms / 1000, max_attempts=settings.model_attempts)
                attempts = prediction.attempts
                self.metrics.model_calls.labels(outcome="ok").inc()
            except ModelError as err:
                reason, attempts = err.reason, getattr(err, "attempts", 0)
                if attempts:
                    self.metrics.model_calls.labels(outcome=err.reason).inc()
                log.warning("model failed for request %s (%s): %s", request.request_id, err.reason, err)
            except Exception:  # noqa: BLE001 - backends' errors arrive as ModelError; this guards score_within_budget
                reason = "model_error"
                log.exception("model backend raised for request %s", request.request_id)
        t2 = time.monotonic()

        items, model = self._ranked(request, known, unknown, prediction)
        t3 = time.monotonic()
        timings = {"features": t1 - t0, "model": t2 - t1, "rank": t3 - t2, "total": t3 - started}
        for stage, seconds in timings.items():
            self.metrics.stage.labels(stage=stage).observe(seconds)
        if reason is not None:
            self.metrics.fallback.labels(reason=reason).inc()
        if unknown:
            self.metrics.unknown_items.inc(len(unknown))
        timings_ms = {stage: round(seconds * 1000, 3) for stage, seconds in timings.items()}
        body = {"request_id": request.request_id, "items": items, "model": model, "fallback": reason is not None,
                "reason": reason, "unknown_items": unknown, "timings_ms": timings_ms}
        fields = {"event": "rank", "request_id": request.request_id, "user_id": request.user_id,
                  "surface": request.surface, "n_candidates": len(request.candidates), "n_unknown": len(unknown),
                  "cold_start": fetched is not None and fetched.user is None, "k": request.k,
                  "fallback": reason is not None, "reason": reason, "attempts": attempts,
                  "variant": model["variant"], "timings_ms": timings_ms}
        return body, fields

    def _ranked(self, request: RankRequest, known: list[tuple[str, dict]], unknown: list[str],
                prediction: Prediction | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if prediction is not None:
            scores = prediction.scores
            model = {"name": self.settings.model_name,
                     "version": prediction.version or self.backend.version or self.settings.model_version,
                     "variant": prediction.variant or self.settings.model_variant}
        elif known:
            scores = fallback_scores([s for _, s in known], request.ts_ms)
            model = dict(FALLBACK_MODEL)
        else:
            scores = None
            model = dict(ORDER_MODEL)
        ranked: list[tuple[str, float | None]] = []
        if scores is not None:
            order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
            ranked = [(known[j][0], float(scores[j])) for j in order]
        scored = {item for item, _ in ranked}
        ranked += [(item, None) for item in request.candidates if item not in scored]  # unknown: request order
        return [{"item_id": item, "score": score, "rank": r + 1}
                for r, (item, score) in enumerate(ranked[: request.k])], model

    async def refresh_shadow(self) -> None:
        """Set the shadow agreement gauges from the report, at most once per TTL; a bad report is logged only."""
        location = self.settings.shadow_report
        if (not location or self._shadow_reading
                or time.monotonic() - self._shadow_read < self.settings.shadow_report_ttl_s):
            return
        self._shadow_read, self._shadow_reading = time.monotonic(), True
        read = asyncio.get_running_loop().run_in_executor(self.executor, agreement_summary, location)
        read.add_done_callback(lambda _: setattr(self, "_shadow_reading", False))
        try:  # a scrape waits at most SHADOW_READ_WAIT_S; a slower read finishes in the background, unused
            summary = await asyncio.wait_for(asyncio.shield(read), SHADOW_READ_WAIT_S)
        except asyncio.TimeoutError:
            log.warning("shadow report %s: no answer within %.0f s, gauges unchanged", location, SHADOW_READ_WAIT_S)
            return
        except Exception as err:  # noqa: BLE001 - missing, unreadable or not a report: the gauges go NaN
            log.warning("shadow report %s not read: %s: %s", location, type(err).__name__, err)
            summary = {}
        for measure in AGREEMENT_MEASURES:
            self.metrics.shadow_agreement.labels(measure=measure).set(summary.get(measure, math.nan))

    async def readiness(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        try:
            await self.store_call(self.store.ping, 1.0)
            await self.load_spec()
            checks["feature_store"] = {"ok": True, "store": self.store.describe()}
        except StoreUnavailable as err:
            checks["feature_store"] = {"ok": False, "store": self.store.describe(), "error": str(err)}
        checks["spec"] = {"ok": self.spec is not None,
                          "features": len(self.spec.features) if self.spec is not None else None}
        ok, info = await self.probe.check()
        checks["model"] = {"ok": ok, "backend": self.backend.describe(), "breaker": self.breaker.state, **info}
        ready = all(check["ok"] for check in checks.values())
        self.metrics.ready.set(1 if ready else 0)
        if not ready:
            failing = [name for name, check in checks.items() if not check["ok"]]
            raise NotReady(f"not ready: {', '.join(failing)}", checks)
        return {"ready": True, "checks": checks}

    async def aclose(self) -> None:
        if self._spec_task is not None:
            self._spec_task.cancel()
        await self.backend.aclose()
        self.store.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


def create_app(settings: Settings | None = None, *, store: FeatureStore | None = None,
               backend: ModelBackend | None = None) -> FastAPI:
    """The API; ``store`` / ``backend`` default to the ones ``settings`` names (created here, opened at startup).

    ``app.state.runtime`` is the Ranker (breaker, metrics, spec) once the app has started.
    """
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ranker = Ranker(settings, store or make_store(settings), backend or make_backend(settings))
        app.state.runtime = ranker
        try:
            await ranker.load_spec()
        except StoreUnavailable as err:
            log.warning("feature spec not loaded at start-up (retried on /readyz): %s", err)
        await ranker.probe.check()  # learns the served version where the backend can tell
        log.info("ranking API up: store %s, model %s, budget %.0f ms, spec %s", ranker.store.describe(),
                 ranker.backend.describe(), settings.budget_ms, "loaded" if ranker.spec else "missing")
        heap.settle("start-up")  # the store and the spec stay alive: keep full GC passes from walking them
        try:
            yield
        finally:
            await ranker.aclose()

    app = FastAPI(title="marketrank ranking API", version="1", lifespan=lifespan)
    app.state.settings = settings

    async def serving_error(request: Request, exc: Exception) -> Response:
        return error_response(exc)

    app.add_exception_handler(ServingError, serving_error)

    async def routing_error(request: Request, exc: StarletteHTTPException) -> Response:
        # No route (404) or a wrong method (405): the contract's error body, as every other 4xx.
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(HttpError(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}"),
                              headers=exc.headers)

    app.add_exception_handler(StarletteHTTPException, routing_error)

    @app.post("/v1/rank")
    async def rank(request: Request) -> Response:
        started = time.monotonic()
        ranker: Ranker = request.app.state.runtime
        body = None
        try:
            raw = await _read_body(request, MAX_BODY_BYTES)
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError as err:
                raise BadRequest("body", f"is not valid JSON: {err}") from None
            parsed = parse_rank_request(body, max_candidates=settings.max_candidates, ts_ms=ranker.now_ms())
        except ApiError as err:
            ranker.metrics.requests.labels(status=str(err.status)).inc()
            request_id = body.get("request_id") if isinstance(body, dict) else None
            if getattr(err, "field", None) == "request_id" or not isinstance(request_id, str):
                request_id = None  # the id is what is wrong: never copy an unchecked one into the log
            log.info(_json_line({"event": "rank", "status": err.status, "error": err.message,
                                 "field": getattr(err, "field", None), "request_id": request_id}))
            return error_response(err)
        response, fields = await ranker.rank(parsed, started)
        ranker.refresh_spec()
        ranker.metrics.requests.labels(status="200").inc()
        log.info(_json_line({**fields, "status": 200}))
        return Response(orjson.dumps(response), media_type="application/json")

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.api_route("/readyz", methods=["GET", "HEAD"])
    async def readyz(request: Request) -> dict[str, Any]:
        return await request.app.state.runtime.readiness()

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        ranker: Ranker = request.app.state.runtime
        await ranker.refresh_shadow()
        return Response(generate_latest(ranker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(settings: Settings | None = None, host: str = "0.0.0.0", port: int = 8080) -> None:
    """Run the API alone with uvicorn on ``host:port`` (``marketrank serve`` runs it beside the local endpoint
    instead; the container runs ``uvicorn serving.app:app``)."""
    import uvicorn

    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=host, port=port, access_log=False, log_level="warning")


def __getattr__(name: str) -> Any:
    """``uvicorn serving.app:app``: the app is built from the environment on first access, not at import."""
    if name == "app":
        settings = Settings.from_env()
        configure_logging(settings.log_level)
        globals()["app"] = application = create_app(settings)
        return application
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
