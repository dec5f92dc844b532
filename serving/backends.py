"""Model backends behind one interface, the circuit breaker, and the budgeted call that ties them together.

``ModelBackend.score(inputs, request_id, timeout_s) -> Prediction`` (``scores [L]`` plus what the endpoint said
about itself: production variant, version). Both backends speak TF Serving's REST predict API through
``serving.wire``:

* ``TFServingBackend(base_url, model_name)``: an aiohttp session (pooled keep-alive connections) POSTing
  ``/v1/models/<name>[/versions/<v>]:predict``; or, when the URL ends in ``/invocations``, a SageMaker-style
  container (the TF Serving inference image, or ``serving.local_endpoint``), POSTing the same body there.
  Readiness: ``GET /v1/models/<name>`` (a version AVAILABLE) or ``GET /ping``.
* ``SageMakerBackend(endpoint_name, region)``: boto3 ``sagemaker-runtime`` ``InvokeEndpoint`` (ContentType
  application/json, InferenceId = the request id) in a thread pool, never on the event loop; botocore retries
  are off and timeouts short, because retries happen in ``score_within_budget``. Readiness:
  ``DescribeEndpoint`` (InService or Updating).

Failures are ``serving.errors.ModelError`` subclasses: ``ModelTimeout``, ``ModelUnavailable`` (retryable),
``ModelBadResponse`` (not JSON, wrong shape, NaN), ``BreakerOpen``. ``score_within_budget`` retries only
``ModelUnavailable`` and only while the request's deadline leaves time for another attempt; the
``CircuitBreaker`` counts one failure per request (after its retries), opens after N consecutive failed requests,
and lets one probe request through after a cool-down (half-open).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from serving import wire
from serving.errors import BreakerOpen, ModelBadResponse, ModelError, ModelTimeout, ModelUnavailable

VARIANT_HEADER, INFERENCE_ID_HEADER = wire.VARIANT_HEADER, wire.INFERENCE_ID_HEADER
REQUEST_ID_HEADER = "X-Request-Id"
#: Optional response header a model server may set with the version that answered.
VERSION_HEADER = "X-Model-Version"


@dataclasses.dataclass(frozen=True)
class Prediction:
    scores: np.ndarray  # [L] float64, one per item sent
    variant: str | None = None
    version: str | None = None
    attempts: int = 1


def scores_from_body(body: Mapping[str, Any], n_items: int) -> np.ndarray:
    """``[L]`` scores from a predict response for one list of ``n_items``; ModelBadResponse otherwise."""
    try:
        scores = wire.parse_scores(body)
    except wire.WireError as err:
        raise ModelBadResponse(str(err)) from err
    except (TypeError, ValueError) as err:  # ragged or non-numeric values
        raise ModelBadResponse(f"scores are not a numeric array: {err}") from err
    if scores.shape != (1, n_items):
        raise ModelBadResponse(f"scores have shape {list(scores.shape)}, expected [1, {n_items}]")
    return scores[0]


def _n_items(inputs: Mapping[str, np.ndarray]) -> int:
    from training.feature_spec import MASK

    return int(np.asarray(inputs[MASK]).shape[1])


class ModelBackend(ABC):
    #: ``tfserving`` or ``sagemaker``.
    kind = "model"

    def __init__(self, model_name: str):
        self.model_name = model_name
        #: Version last reported by the readiness probe (None if the backend cannot tell).
        self.version: str | None = None

    @abstractmethod
    async def score(self, inputs: Mapping[str, np.ndarray], request_id: str, timeout_s: float) -> Prediction:
        """Scores for one list; raises a ModelError subclass, within ``timeout_s``."""

    @abstractmethod
    async def probe(self, timeout_s: float) -> dict[str, Any]:
        """Cheap reachability check: a description, or ModelError if the model cannot answer."""

    async def aclose(self) -> None:
        return None

    def describe(self) -> str:
        return f"{self.kind}:{self.model_name}"


class TFServingBackend(ModelBackend):
    """TF Serving's REST API (or a SageMaker-style container's ``/invocations``) over pooled HTTP connections."""

    kind = "tfserving"

    def __init__(self, base_url: str, model_name: str, *, version: str | int | None = None,
                 max_connections: int = 100):
        super().__init__(model_name)
        url = base_url.rstrip("/")
        self.sagemaker_style = url.endswith("/invocations")
        self.root = url[: -len("/invocations")] if self.sagemaker_style else url
        self.predict_url = url if self.sagemaker_style else self.root + wire.predict_path(model_name, version)
        self.status_url = self.root + ("/ping" if self.sagemaker_style else f"/v1/models/{model_name}" + (
            f"/versions/{version}" if version is not None else ""))
        self.pinned = str(version) if version is not None else None
        self.max_connections = max_connections
        self._session = None  # aiohttp wants its session made on the running loop: made on first use

    def _client(self):
        import aiohttp

        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, keepalive_timeout=30.0)
            # identity: aiohttp would otherwise offer gzip, and a compressing proxy would hand back undecodable bodies
            self._session = aiohttp.ClientSession(connector=connector, headers={
                "Accept": wire.CONTENT_TYPE, "Accept-Encoding": "identity"})
        return self._session

    async def _request(self, method: str, url: str, timeout_s: float, **kwargs: Any) -> tuple[int, Any, bytes]:
        """(status, headers, body). aiohttp, not httpx: ~0.15 ms a loopback call against httpx's ~0.65 ms."""
        import aiohttp

        async def call() -> tuple[int, Any, bytes]:
            async with self._client().request(method, url, **kwargs) as response:
                return response.status, response.headers, await response.read()

        try:
            return await asyncio.wait_for(call(), timeout_s)
        except asyncio.TimeoutError as err:
            raise ModelTimeout(f"{self.describe()}: no answer within {timeout_s * 1000:.0f} ms") from err
        except (aiohttp.ClientError, OSError) as err:
            raise ModelUnavailable(f"{self.describe()}: {type(err).__name__}: {err}") from err

    async def score(self, inputs: Mapping[str, np.ndarray], request_id: str, timeout_s: float) -> Prediction:
        body = wire.encode(wire.predict_request(inputs))
        headers = {"Content-Type": wire.CONTENT_TYPE, REQUEST_ID_HEADER: request_id,
                   INFERENCE_ID_HEADER: request_id}
        status, response_headers, content = await self._request("POST", self.predict_url, timeout_s, data=body,
                                                                headers=headers)
        if status >= 500 or status in (404, 408, 429):
            raise ModelUnavailable(f"{self.describe()}: HTTP {status}: {content[:200].decode('utf-8', 'replace')}")
        try:
            payload = wire.decode(content)
        except wire.WireError as err:
            raise ModelBadResponse(f"{self.describe()}: HTTP {status}: {err}") from err
        if status >= 400:
            raise ModelBadResponse(f"{self.describe()}: HTTP {status}: {payload.get('error')}")
        scores = scores_from_body(payload, _n_items(inputs))
        return Prediction(scores, variant=response_headers.get(VARIANT_HEADER),
                          version=response_headers.get(VERSION_HEADER) or self.pinned or self.version)

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        status_code, _, content = await self._request("GET", self.status_url, timeout_s)
        if status_code != 200:
            raise ModelUnavailable(f"{self.describe()}: GET {self.status_url} -> HTTP {status_code}")
        if self.sagemaker_style:
            return {"url": self.status_url, "status": 200}
        try:
            status = wire.decode(content).get("model_version_status") or []
            available = [s["version"] for s in status if s.get("state") == "AVAILABLE"]
        except (wire.WireError, AttributeError, KeyError, TypeError) as err:
            raise ModelBadResponse(f"{self.describe()}: model status is not TF Serving's: {err}") from err
        if not available:
            raise ModelUnavailable(f"{self.describe()}: no AVAILABLE version ({status})")
        self.version = max(available, key=lambda v: int(v) if str(v).isdigit() else -1)
        return {"url": self.status_url, "version": self.version}

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def describe(self) -> str:
        return f"tfserving:{self.predict_url}"


#: Endpoint statuses in which it still answers (with its current config, or the previous one while rolling back).
SERVING_STATUSES = ("InService", "Updating", "SystemUpdating", "RollingBack", "UpdateRollbackFailed")


def _rejected(code: str, response: Mapping[str, Any]) -> bool:
    """Whether an InvokeEndpoint error rejects the request itself (a bad response, not retried): the model
    container's 4xx (``ModelError`` carries its ``OriginalStatusCode``; a 5xx there is an outage, retried in
    budget) or a request SageMaker refused (``ValidationError``, but not "endpoint ... not found", an outage).
    Throttling, 5xx and ModelNotReady stay ``ModelUnavailable``."""
    if code == "ModelError":
        return int(response.get("OriginalStatusCode") or 500) < 500
    if code in ("ValidationError", "ValidationException"):
        return "not found" not in str(response.get("Error", {}).get("Message", "")).lower()
    return False


class SageMakerBackend(ModelBackend):
    """A SageMaker real-time endpoint (TF Serving container) via boto3, off the event loop."""

    kind = "sagemaker"

    def __init__(self, endpoint_name: str, region: str | None = None, *, model_name: str | None = None,
                 runtime_client: Any | None = None, sagemaker_client: Any | None = None,
                 executor: ThreadPoolExecutor | None = None, max_pool_connections: int = 32,
                 connect_timeout_s: float = 0.5, read_timeout_s: float = 2.0, target_variant: str | None = None):
        super().__init__(model_name or endpoint_name)
        self.endpoint_name = endpoint_name
        self.target_variant = target_variant
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(max_pool_connections, thread_name_prefix="sagemaker")
        if runtime_client is None or sagemaker_client is None:
            import boto3
            from botocore.config import Config

            config = Config(region_name=region, max_pool_connections=max_pool_connections,
                            connect_timeout=connect_timeout_s, read_timeout=read_timeout_s,
                            retries={"total_max_attempts": 1, "mode": "standard"}, tcp_keepalive=True)
            runtime_client = runtime_client or boto3.client("sagemaker-runtime", config=config)
            sagemaker_client = sagemaker_client or boto3.client("sagemaker", config=config)
        self.runtime, self.sagemaker = runtime_client, sagemaker_client
        from botocore import exceptions

        self._timeouts = (exceptions.ReadTimeoutError, exceptions.ConnectTimeoutError)
        self._unavailable = (exceptions.BotoCoreError, exceptions.ClientError)
        self._client_error = exceptions.ClientError

    def _invoke(self, body: bytes, request_id: str, deadline: float) -> tuple[bytes, str | None]:
        if time.monotonic() >= deadline:  # queued behind busy threads past the budget: do not call at all
            raise ModelTimeout(f"{self.describe()}: budget spent before the call left the thread pool")
        params: dict[str, Any] = {"EndpointName": self.endpoint_name, "ContentType": wire.CONTENT_TYPE,
                                  "Accept": wire.CONTENT_TYPE, "Body": body, "InferenceId": request_id}
        if self.target_variant:
            params["TargetVariant"] = self.target_variant
        try:
            response = self.runtime.invoke_endpoint(**params)
            return response["Body"].read(), response.get("InvokedProductionVariant")
        except self._timeouts as err:
            raise ModelTimeout(f"{self.describe()}: {err}") from err
        except self._client_error as err:
            code = err.response.get("Error", {}).get("Code", "")
            if _rejected(code, err.response):  # the endpoint answered "no" to this request: a retry gets the same
                raise ModelBadResponse(f"{self.describe()}: {code}: {err}") from err
            raise ModelUnavailable(f"{self.describe()}: {code or type(err).__name__}: {err}") from err
        except self._unavailable as err:
            raise ModelUnavailable(f"{self.describe()}: {type(err).__name__}: {err}") from err

    async def _in_thread(self, fn: Callable, timeout_s: float, *args: Any):
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, functools.partial(fn, *args))
        try:
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError as err:
            raise ModelTimeout(f"{self.describe()}: no answer within {timeout_s * 1000:.0f} ms") from err

    async def score(self, inputs: Mapping[str, np.ndarray], request_id: str, timeout_s: float) -> Prediction:
        body = wire.encode(wire.predict_request(inputs))
        raw, variant = await self._in_thread(self._invoke, timeout_s, body, request_id, time.monotonic() + timeout_s)
        try:
            payload = wire.decode(raw)
        except wire.WireError as err:
            raise ModelBadResponse(f"{self.describe()}: {err}") from err
        return Prediction(scores_from_body(payload, _n_items(inputs)), variant=variant, version=self.version)

    def _describe_endpoint(self) -> dict[str, Any]:
        try:
            return self.sagemaker.describe_endpoint(EndpointName=self.endpoint_name)
        except self._timeouts as err:
            raise ModelTimeout(f"{self.describe()}: DescribeEndpoint: {err}") from err
        except self._unavailable as err:
            raise ModelUnavailable(f"{self.describe()}: DescribeEndpoint: {type(err).__name__}: {err}") from err

    async def probe(self, timeout_s: float) -> dict[str, Any]:
        described = await self._in_thread(self._describe_endpoint, timeout_s)
        status = described.get("EndpointStatus")
        if status not in SERVING_STATUSES:
            raise ModelUnavailable(f"{self.describe()}: endpoint status {status}")
        variants = [v.get("VariantName") for v in described.get("ProductionVariants") or []]
        return {"endpoint": self.endpoint_name, "status": status, "variants": variants,
                "config": described.get("EndpointConfigName")}

    async def aclose(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> str:
        return f"sagemaker:{self.endpoint_name}"


class CircuitBreaker:
    """closed -> (N consecutive failures) -> open -> (cool-down) -> half-open: one probe -> closed or open."""

    CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
    #: Gauge values of the states (``marketrank_breaker_state``).
    GAUGE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}

    def __init__(self, failure_threshold: int = 5, reset_timeout_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        self.failure_threshold, self.reset_timeout_s, self.clock = failure_threshold, reset_timeout_s, clock
        self.failures = 0
        self._opened_at: float | None = None
        self._probe_started: float | None = None
        self._lock = threading.Lock()

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return self.CLOSED
        return self.HALF_OPEN if self.clock() - self._opened_at >= self.reset_timeout_s else self.OPEN

    def gauge(self) -> int:
        return self.GAUGE[self.state]

    def allow(self) -> bool:
        """May a request call the backend now? In half-open, only one probe at a time (its lease expires)."""
        with self._lock:
            state = self.state
            if state == self.CLOSED:
                return True
            if state == self.OPEN:
                return False
            now = self.clock()
            if self._probe_started is not None and now - self._probe_started < self.reset_timeout_s:
                return False
            self._probe_started = now
            return True

    def open_error(self, backend: ModelBackend) -> BreakerOpen:
        """What a request the breaker turns away is told."""
        return BreakerOpen(f"circuit breaker open after {self.failures} consecutive failures of "
                           f"{backend.describe()}")

    def release(self) -> None:
        """A request that was allowed made no call after all (no budget left): free the half-open probe."""
        with self._lock:
            self._probe_started = None

    def record_success(self) -> None:
        with self._lock:
            self.failures, self._opened_at, self._probe_started = 0, None, None

    def record_failure(self) -> None:
        with self._lock:
            self._probe_started = None
            if self._opened_at is not None:  # a failed half-open probe: open again for a full cool-down
                self._opened_at = self.clock()
                return
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._opened_at = self.clock()


async def score_within_budget(backend: ModelBackend, breaker: CircuitBreaker, inputs: Mapping[str, np.ndarray],
                              request_id: str, deadline: float, *, max_attempts: int = 2,
                              min_attempt_s: float = 0.005, clock: Callable[[], float] = time.monotonic
                              ) -> Prediction:
    """One request's model call: breaker first, then attempts while ``deadline`` (clock time) leaves time.

    Only ``ModelUnavailable`` is retried (connection refused or reset, 5xx); a timeout means the budget is spent
    and a bad response would come back the same. The breaker sees one outcome per request.
    """
    if not breaker.allow():
        raise breaker.open_error(backend)
    attempts, last = 0, None
    try:
        while True:
            remaining = deadline - clock()
            if remaining < min_attempt_s:
                if last is not None:
                    raise last
                breaker.release()
                raise ModelTimeout(f"no time left in the budget for {backend.describe()}")
            attempts += 1
            try:
                prediction = await backend.score(inputs, request_id, remaining)
            except ModelUnavailable as err:
                last = err
                if attempts < max_attempts:
                    continue
                raise
            breaker.record_success()
            return dataclasses.replace(prediction, attempts=attempts)
    except ModelError as err:
        if attempts:
            breaker.record_failure()
        err.attempts = attempts
        raise
    except Exception as err:  # a backend bug is a failed call too: the breaker must see it, or it never opens
        breaker.record_failure()
        failure = ModelBadResponse(f"{backend.describe()} raised {type(err).__name__}: {err}")
        failure.attempts = attempts
        raise failure from err
    except BaseException:  # cancelled (client went away): neither success nor failure
        breaker.release()
        raise


class CachedProbe:
    """The backend's readiness, probed at most once per ``ttl_s`` (concurrent checks share one probe)."""

    def __init__(self, backend: ModelBackend, ttl_s: float = 5.0, timeout_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.backend, self.ttl_s, self.timeout_s, self.clock = backend, ttl_s, timeout_s, clock
        self._at: float | None = None
        self._result: tuple[bool, dict[str, Any]] = (False, {})
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[bool, dict[str, Any]]:
        async with self._lock:
            if self._at is not None and self.clock() - self._at < self.ttl_s:
                return self._result
            try:
                self._result = (True, await self.backend.probe(self.timeout_s))
            except ModelError as err:
                self._result = (False, {"error": str(err), "reason": err.reason})
            self._at = self.clock()
            return self._result
