"""A local stand-in for TF Serving's REST API and a SageMaker real-time endpoint with a shadow variant.

Production runs the real TF Serving image (on SageMaker, behind ``/ping`` and ``/invocations``). Here there is
no Docker and no TF Serving binary, so this module plays both parts over the workspace, speaking the wire
format of ``serving.wire``:

* **Model server** (TF Serving): every ``<models_dir>/<model_name>/`` is one model's base path; of its numeric
  version dirs (``<version>/saved_model.pb``; dot-prefixed staging dirs are ignored) the highest one that loads
  is served (TF Serving's default "latest" policy). A background poller notices new and removed versions, loads
  the new one, then swaps it in, so requests are never dropped. A version that fails to load is logged and tried
  again only once its files change; the previous version stays in service meanwhile.
  ``POST /v1/models/<name>[/versions/<v>]:predict``, ``GET /v1/models/<name>[/versions/<v>]`` (status),
  ``GET /v1/models/<name>[/versions/<v>]/metadata``. Bad input: 400, unknown model or version: 404, both with
  ``{"error": "..."}``.
* **Endpoint** (SageMaker): the variants come from the endpoint manifest that ``pipelines.deploy.LocalBackend``
  writes (re-read whenever the file changes, so ``marketrank endpoint promote`` takes effect live): variant
  ``champion`` = ``state.production``, ``challenger`` = ``state.shadow``. ``GET /ping`` answers 200 once the
  production model is loaded (503 before); ``POST /invocations`` (a TF Serving predict body) is answered by the
  production variant, with ``X-Amzn-Invoked-Production-Variant: champion``. The endpoint's name is also a TF
  Serving model name (``/v1/models/<endpoint>:predict``) that behaves like ``/invocations``.
* **Sidecar**: what SageMaker runs away from the production variant's instances (the shadow variant and data
  capture) runs here in a child process (``Sidecar``). Start-up waits (``SIDECAR_READY_SECONDS`` at most)
  while it loads the shadow model; then it drops to the lowest CPU priority (Linux's ``SCHED_IDLE``). After
  the production answer is computed, the request/response pair is queued for it (``MAX_PENDING_SHADOW``
  waiting at most, plus what the pipe holds; beyond that, pairs are dropped, counted, and logged once per
  ``DROP_LOG_SECONDS``). The response never waits: a slow, stalled, crashed or failing sidecar cannot delay or
  fail production. A sidecar that dies is logged and restarted (at most once per ``SIDECAR_RESTART_SECONDS``).
* **Shadow**: with probability = the shadow variant's weight, the sidecar runs the request on the shadow
  variant's model (loaded there, latest version, hot-reloaded like the server's), in a thread of its own
  with its own queue: the production capture is written first, so a slow shadow drops shadow copies, not
  captures. A shadow failure is only logged.
* **Data capture** (``capture_dir``): the sidecar appends each variant's request/response pair as a SageMaker
  capture record to ``<capture_dir>/<endpoint>/<variant>/<yyyy>/<mm>/<dd>/<hh>/<sidecar-id>.jsonl`` (UTC),
  SageMaker's S3 layout::

      {"captureData": {"endpointInput": {"observedContentType": "application/json", "mode": "INPUT",
                                         "data": "<request JSON text>", "encoding": "JSON"},
                       "endpointOutput": {"observedContentType": "application/json", "mode": "OUTPUT",
                                          "data": "<response JSON text>", "encoding": "JSON"}},
       "eventMetadata": {"eventId": "<uuid4>", "inferenceId": "<X-Amzn-SageMaker-Inference-Id>",
                         "inferenceTime": "2024-05-01T12:00:00Z",
                         "latencyMs": 3.2, "modelName": "<model>", "modelVersion": "<version>"},
       "eventVersion": "0"}

  ``latencyMs`` (the model's predict time), ``modelName`` and ``modelVersion`` are this endpoint's additions.
  The production and shadow records of one request share ``inferenceId`` and ``inferenceTime`` (the time the
  request arrived), so a shadow report can pair them. As on SageMaker, a request sent without an inference id is
  captured without ``inferenceId``: it cannot be paired (the ranking API always sends one). Only successful
  predictions are captured.

The production predict (~1 ms for 300 items) runs on the event loop: a thread hop cost more than it overlapped on
the benchmark's two cores, at the price of serialising model calls (``/ping`` waits behind one). Model loading
runs in a thread; shadow copies and data capture in the sidecar process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import queue
import random
import signal
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import tensorflow as tf
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import config_pb2
from tensorflow.python.util import deprecation

from pipelines.deploy import PRODUCTION, SHADOW, EndpointState
from serving import heap, wire
from serving.shadow_report import read_capture  # noqa: F401  (re-exported: the capture format lives there)

log = logging.getLogger(__name__)

INFERENCE_ID_HEADER, VARIANT_HEADER = wire.INFERENCE_ID_HEADER, wire.VARIANT_HEADER
#: Extra ``eventMetadata`` keys of the capture records.
LATENCY_KEY, MODEL_KEY, VERSION_KEY = "latencyMs", "modelName", "modelVersion"
MAX_PENDING_SHADOW = 64  # answers queued for the sidecar; beyond that they are neither captured nor shadowed
#: The sidecar's CPU priority: shadow copies and capture can wait, the production answer cannot. Linux's
#: SCHED_IDLE runs it only on CPU time nothing else wants; the nice value is the fallback elsewhere.
SIDECAR_NICE = 19
SIDECAR_READY_SECONDS = 30.0  # start-up waits this long at most for the sidecar to load the shadow model
SIDECAR_RESTART_SECONDS = 10.0  # a sidecar that died is started again at most once per this interval
DROP_LOG_SECONDS = 10.0  # dropped hand-offs are logged at most once per this interval, with their count
SERVE_TAG = "serve"


class NotFound(LookupError):
    """Unknown model or version (404)."""


class Unavailable(RuntimeError):
    """The endpoint cannot answer yet: no production variant, or its model is not loaded (503)."""


# ---------------------------------------------------------------------------------------------- model server

@dataclasses.dataclass
class Servable:
    """One loaded SavedModel version, run the way TF Serving runs it: the ``serve`` MetaGraph in a session of
    its own, ``serving_default``'s feeds and fetches bound once into a Session::Run callable, NumPy in and out.

    The eager ``tf.saved_model.load`` signature gives the same scores but costs a tensor per input and a function
    dispatch: on the 2-core dev VM, a 300-item call after an idle gap (as open-loop load finds the model) took
    ~2.4 ms that way (the tensors included) and ~0.6 ms this way."""

    name: str
    version: int
    path: Path
    session: Any  # tf.compat.v1.Session; closed when the servable is garbage (no request holds it any more)
    inputs: dict[str, tf.TensorSpec]  # in feed order
    outputs: tuple[str, ...]  # in fetch order
    signature_def: dict[str, dict]  # {"inputs": {name: tensor_info}, "outputs": {...}} for metadata
    run: Any = dataclasses.field(repr=False)  # the bound Session::Run: arrays in ``inputs`` order, ``outputs`` back
    checks: dict[str, InputCheck] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.checks = {name: InputCheck.of(name, spec) for name, spec in self.inputs.items()}

    @classmethod
    def load(cls, name: str, version: int, path: Path, config: Any = None) -> Servable:
        """``config``: the session's ``tf.compat.v1.ConfigProto`` (default ``session_config()``)."""
        graph = tf.Graph()
        session = tf.compat.v1.Session(graph=graph, config=session_config() if config is None else config)
        try:
            # The v1 loader is deliberate (a session, as TF Serving's SavedModelBundle); its deprecation notice is not.
            with graph.as_default(), deprecation.silence():
                meta = tf.compat.v1.saved_model.loader.load(session, [SERVE_TAG], str(path))
            if wire.SIGNATURE not in meta.signature_def:
                raise ValueError(f"no {wire.SIGNATURE!r} signature (has {sorted(meta.signature_def)})")
            signature = meta.signature_def[wire.SIGNATURE]
            inputs = {key: _spec(info) for key, info in sorted(signature.inputs.items())}
            outputs = tuple(sorted(signature.outputs))
            # A callable made from options (private, but what Keras' TF1 backend builds on) takes the arrays
            # straight to Session::Run; the public ``make_callable`` with a feed list goes through
            # ``Session.run``'s per-feed Python: 0.6 ms against 0.2 ms for a 300-item call back to back, 1.4
            # against 0.6 ms after an idle gap (2-core dev VM). ``_array`` checks the inputs before they get here.
            # (A signature that outputs one of its inputs fails here: "both fed and fetched".)
            run = session._make_callable_from_options(config_pb2.CallableOptions(
                feed=[signature.inputs[k].name for k in inputs], fetch=[signature.outputs[k].name for k in outputs]))
            servable = cls(name, version, path, session, inputs, outputs, _signature_def(signature), run)
            servable.warm_up()
        except BaseException:
            session.close()
            raise
        return servable

    def warm_up(self) -> None:
        """One request before serving (TF Serving's model warmup): the first call allocates, and would otherwise
        show up as a latency outlier of whichever variant happens to take it."""
        def dummy(spec: tf.TensorSpec) -> np.ndarray:
            dims = spec.shape.as_list() if spec.shape.rank is not None else [None]  # unknown rank: try a vector
            shape = [d if d is not None else 1 if i == 0 else 2 for i, d in enumerate(dims)]
            if spec.dtype == tf.string:
                return np.full(shape, "", dtype=object)
            return np.full(shape, spec.dtype == tf.bool, dtype=spec.dtype.as_numpy_dtype)

        try:
            self.call({name: dummy(spec) for name, spec in self.inputs.items()})
        except Exception as err:  # noqa: BLE001 - made-up inputs a valid model may refuse: only time is lost
            log.warning("model %s version %s: warm-up call refused (%s); the first request will be slower",
                        self.name, self.version, str(err).splitlines()[0] if str(err) else type(err).__name__)

    def call(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The model alone (TF Serving's ``Session::Run``): each signature input as an array, each output back."""
        return dict(zip(self.outputs, self.run(*(arrays[name] for name in self.inputs)), strict=True))

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        """A predict response body for a predict request body; ``wire.WireError`` names what is wrong."""
        inputs, signature, row_format = wire.request_inputs(body)
        if signature != wire.SIGNATURE:
            raise wire.WireError(f"signature {signature!r} not found (the model has {wire.SIGNATURE!r})")
        unknown = sorted(set(inputs) - set(self.inputs))
        if unknown:
            raise wire.WireError(f"unknown input {unknown[0]!r}: the signature's inputs are {sorted(self.inputs)}")
        missing = sorted(set(self.inputs) - set(inputs))
        if missing:
            raise wire.WireError(f"missing input {', '.join(map(repr, missing))}: the signature needs all of "
                                 f"{sorted(self.inputs)}")
        with np.errstate(over="ignore"):  # once per request, not per input (~8 us each): _array checks ranges
            arrays = {name: _array(inputs[name], check) for name, check in self.checks.items()}
        batch = {name: a.shape[0] for name, a in arrays.items() if a.ndim}
        if len(set(batch.values())) > 1:
            raise wire.WireError(f"inputs disagree on the batch size: {batch}")
        try:
            outputs = self.call(arrays)
        except tf.errors.InvalidArgumentError as err:
            raise wire.WireError(f"the model rejected the inputs: {err.message}") from err
        return wire.predict_response(outputs, row_format)


def _dims(info: Any) -> list[int] | None:
    """A SignatureDef TensorInfo's dims as stored (-1: any size); None for an unknown rank."""
    return None if info.tensor_shape.unknown_rank else [d.size for d in info.tensor_shape.dim]


def _spec(info: Any) -> tf.TensorSpec:
    """A SignatureDef TensorInfo as a TensorSpec (a -1 dim: any size)."""
    dims = _dims(info)
    return tf.TensorSpec(None if dims is None else [d if d >= 0 else None for d in dims], tf.as_dtype(info.dtype))


def _signature_def(signature: Any) -> dict[str, dict]:
    """A SignatureDef as TF Serving's metadata API shows it."""
    def infos(tensors) -> dict[str, dict]:
        return {key: wire.tensor_info(t.name, types_pb2.DataType.Name(t.dtype), _dims(t))
                for key, t in sorted(tensors.items())}

    return {"inputs": infos(signature.inputs), "outputs": infos(signature.outputs)}


@dataclasses.dataclass(frozen=True)
class InputCheck:
    """What one signature input accepts, worked out once per load (a request checks ~30 inputs)."""

    name: str
    dtype: tf.DType
    kind: str  # "string", "bool" or "number"
    dims: tuple[int | None, ...] | None  # None: any rank

    @classmethod
    def of(cls, name: str, spec: tf.TensorSpec) -> InputCheck:
        kind = "string" if spec.dtype == tf.string else "bool" if spec.dtype == tf.bool else "number"
        return cls(name, spec.dtype, kind, None if spec.shape.rank is None else tuple(spec.shape.as_list()))

    @property
    def integer(self) -> bool:
        return self.kind == "number" and self.dtype.is_integer

    def fits(self, shape: tuple[int, ...]) -> bool:
        return self.dims is None or (len(shape) == len(self.dims)
                                     and all(d is None or d == s for d, s in zip(self.dims, shape, strict=True)))

    def error(self, got: tuple[int, ...] | None = None) -> wire.WireError:
        dtype = wire.DTYPES.get(np.dtype(self.dtype.as_numpy_dtype), self.dtype.name)
        shape = "any" if self.dims is None else [-1 if d is None else d for d in self.dims]
        if got is None:
            return wire.WireError(f"input {self.name!r} must be a rectangular array of {dtype} with shape {shape} "
                                  f"(-1: any size)")
        return wire.WireError(f"input {self.name!r} must have shape {shape} (-1: any size), got {list(got)}")


def _array(value: Any, check: InputCheck) -> np.ndarray:
    """One JSON input as an array of the signature's dtype and shape, or a WireError naming the input. As TF
    Serving's JSON rules: an integer input takes integers only (in its range), a float input any number, a bool
    input true/false, and empty lists fit any dtype. (Unlike TF Serving, ``true`` among numbers reads as 1, and
    integers past float32's exact range are rounded rather than refused: a scan per value would cost more.)"""
    try:
        if check.kind == "string":
            array = np.asarray(value, dtype=object)
            ok = set(map(type, array.flat)) <= {str}  # C-level loop: ~20x faster than isinstance per value
        else:
            array = np.asarray(value)
            ok = array.size == 0 or (array.dtype == np.bool_ if check.kind == "bool" else array.dtype.kind in (
                "iu" if check.integer else "iuf"))
    except (TypeError, ValueError):  # ragged nested lists
        ok = False
    if not ok:
        raise check.error()
    if not check.fits(array.shape):
        raise check.error(array.shape)
    if check.kind == "string":
        return array
    converted = array.astype(check.dtype.as_numpy_dtype, copy=False)  # overflow warnings off: see predict
    if check.integer and converted is not array and not np.array_equal(converted, array):  # wrapped around
        raise check.error()
    if not check.integer and converted is not array and np.isinf(converted).any() and not np.isinf(array).any():
        raise check.error()  # past the float dtype's range
    return converted


def _fingerprint(path: Path) -> tuple:
    return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                        for p in path.rglob("*") if p.is_file()))


class ModelServer:
    """TF Serving's model manager over ``models_dir``: one base path per model name, its latest version served."""

    def __init__(self, models_dir: str | Path, names: set[str] | None = None):
        self.models_dir = Path(models_dir)
        #: The model names to serve (None: every base path); the sidecar loads only the shadow models it is sent.
        self.names = names
        self._served: dict[str, Servable] = {}  # replaced, never mutated: readers need no lock
        self._failed: dict[Path, tuple[tuple, str]] = {}  # version dir -> (fingerprint, load error)
        self._lock = threading.Lock()

    def get(self, name: str, version: int | str | None = None) -> Servable:
        servable = self._served.get(name)
        if servable is None:
            errors = [f"{p.name}: {e}" for p, (_, e) in self._failed.copy().items() if p.parent.name == name]
            hint = f" (failed to load {'; '.join(errors)})" if errors else ""
            raise NotFound(f"Servable not found for request: Latest({name}){hint}")
        if version is not None and int(version) != servable.version:
            raise NotFound(f"Servable not found for request: Specific({name}, {version}) "
                           f"(serving version {servable.version})")
        return servable

    def _versions(self) -> dict[str, list[tuple[int, Path]]]:
        """Complete version dirs (``<version>/saved_model.pb``) per model name, highest first."""
        found: dict[str, list[tuple[int, Path]]] = {}
        if not self.models_dir.is_dir():
            return found
        for base in self.models_dir.iterdir():
            if base.name.startswith(".") or not base.is_dir() or (self.names is not None
                                                                   and base.name not in self.names):
                continue
            versions = [(int(p.name), p) for p in base.iterdir()
                        if p.name.isdigit() and (p / "saved_model.pb").is_file()]
            if versions:
                found[base.name] = sorted(versions, reverse=True)
        return found

    def _load(self, name: str, version: int, path: Path) -> Servable | None:
        fingerprint = _fingerprint(path)
        if path in self._failed and self._failed[path][0] == fingerprint:
            return None  # failed before and unchanged since
        started = time.perf_counter()
        try:
            servable = Servable.load(name, version, path)
        except Exception as err:  # noqa: BLE001 - any broken SavedModel must leave the server running
            self._failed[path] = (fingerprint, f"{type(err).__name__}: {err}".splitlines()[0])
            log.error("model %s version %s failed to load from %s: %s", name, version, path, self._failed[path][1])
            return None
        self._failed.pop(path, None)
        log.info("model %s version %s loaded from %s in %.1fs", name, version, path, time.perf_counter() - started)
        return servable

    def poll(self) -> None:
        """Load new versions (then swap them in) and drop removed ones."""
        with self._lock:
            found = self._versions()
            served = dict(self._served)
            for name, versions in found.items():
                current = served.get(name)
                for version, path in versions:  # the highest version that is loaded or loads
                    if current is not None and current.path == path:
                        break
                    servable = self._load(name, version, path)
                    if servable is not None:
                        served[name] = servable
                        if current is not None:
                            log.info("model %s: version %s replaces version %s", name, version, current.version)
                        break
                else:  # the served version is gone and no other one loads
                    if current is not None:
                        log.warning("model %s: version %s was removed and no other version loads, unloaded",
                                    name, current.version)
                        del served[name]
            for name in set(served) - set(found):
                log.info("model %s: no versions left under %s, unloaded", name, self.models_dir / name)
                del served[name]
            self._failed = {p: f for p, f in self._failed.items() if p.exists()}
            changed = served.keys() != self._served.keys() or any(v is not self._served[k] for k, v in served.items())
            self._served = served
        if changed:
            heap.settle("a model (re)load")  # one pause here rather than a full collection inside requests


# ---------------------------------------------------------------------------------------------- endpoint

def capture_record(request: bytes, response: bytes, inference_id: str | None, inference_time: datetime,
                   latency_ms: float, model_name: str, model_version: int | str) -> dict[str, Any]:
    """One SageMaker data-capture record (JSON-encoded request and response)."""
    def data(payload: bytes, mode: str) -> dict[str, str]:
        return {"observedContentType": wire.CONTENT_TYPE, "mode": mode,
                "data": payload.decode("utf-8", "replace"), "encoding": "JSON"}

    return {"captureData": {"endpointInput": data(request, "INPUT"), "endpointOutput": data(response, "OUTPUT")},
            "eventMetadata": {"eventId": str(uuid.uuid4()),
                              **({"inferenceId": inference_id} if inference_id is not None else {}),
                              "inferenceTime": inference_time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                              LATENCY_KEY: round(latency_ms, 3), MODEL_KEY: model_name,
                              VERSION_KEY: str(model_version)},
            "eventVersion": "0"}


def _timed_predict(servable: Servable, body: dict[str, Any]) -> tuple[bytes, float]:
    started = time.perf_counter()
    response = servable.predict(body)
    return wire.encode(response), (time.perf_counter() - started) * 1000


@dataclasses.dataclass(frozen=True)
class Answered:
    """A request the production variant answered, handed to the sidecar: capture it, and copy it to the shadow
    variant when it was sampled (``shadow_model``)."""

    request: bytes
    response: bytes
    inference_id: str | None  # the caller's; None without one (captured without inferenceId, as on SageMaker)
    received: datetime
    latency_ms: float
    model_name: str
    model_version: int
    shadow_model: str | None


class CaptureWriter:
    """Appends capture records to ``<capture_dir>/<endpoint>/<variant>/<yyyy>/<mm>/<dd>/<hh>/<writer-id>.jsonl``."""

    def __init__(self, capture_dir: Path, endpoint: str):
        self.root, self.endpoint, self.file = Path(capture_dir) / endpoint, endpoint, f"{uuid.uuid4()}.jsonl"

    def write(self, variant: str, answered: Answered, response: bytes, latency_ms: float, model_name: str,
              model_version: int | str) -> None:
        """Capture one variant's response to ``answered``'s request."""
        record = capture_record(answered.request, response, answered.inference_id, answered.received, latency_ms,
                                model_name, model_version)
        path = self.root / variant / answered.received.strftime("%Y/%m/%d/%H") / self.file
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as out:
                out.write(orjson.dumps(record) + b"\n")
        except OSError as err:
            log.error("endpoint %s: data capture to %s failed: %s", self.endpoint, path, err)


class _Dropped:
    """Counts what was dropped and logs it at most once per ``DROP_LOG_SECONDS`` (not once per request)."""

    def __init__(self, what: str):
        self.what, self.total, self._unlogged, self._logged = what, 0, 0, -math.inf

    def add(self, endpoint: str, reason: str, inference_id: str) -> None:
        self.total += 1
        self._unlogged += 1
        if time.monotonic() - self._logged >= DROP_LOG_SECONDS:
            self.flush(endpoint, f"{reason} (latest: request {inference_id})")

    def flush(self, endpoint: str, reason: str) -> None:
        if self._unlogged:
            log.warning("endpoint %s: %d answers %s: %s", endpoint, self._unlogged, self.what, reason)
            self._unlogged, self._logged = 0, time.monotonic()


@dataclasses.dataclass
class _Child:
    """One sidecar process and the endpoint's ends of its pipes, with the queue and thread that feed it."""

    process: Any
    pipe: Any
    ready: Any
    pending: queue.Queue
    sender: threading.Thread | None = None


class Sidecar:
    """What SageMaker does away from the production variant's instances: the shadow variant (on its own
    instances there) and data capture. Here a child process at the lowest CPU priority, fed through a bounded
    queue and a pipe: the production path only enqueues, so a slow, stalled, crashed or failing shadow can
    neither delay nor fail an answer, and the shadow's Python work never holds the production process's GIL
    (run in a thread of the endpoint process, it added ~6 ms to the serving benchmark's p99 at 300 candidates).
    A sidecar that dies is logged and started again in a thread of its own, at most once per
    ``SIDECAR_RESTART_SECONDS`` (a crash loop waits); answers meanwhile are dropped and counted."""

    def __init__(self, models_dir: Path, capture_dir: Path | None, endpoint: str, poll_seconds: float,
                 shadow_models: tuple[str, ...] = ()):
        self._context = multiprocessing.get_context("spawn")  # a fork of a process running TensorFlow is not safe
        self._args = (str(models_dir), str(capture_dir) if capture_dir else None, endpoint)
        self._poll_seconds = poll_seconds
        self.endpoint = endpoint
        self.dropped = _Dropped("were neither captured nor copied to the shadow")
        self.restarts = 0
        self._shadow_models = shadow_models  # the latest shadow model, preloaded by a restarted sidecar
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._reviver: threading.Thread | None = None
        self._started = time.monotonic()
        self._child = self._spawn()

    def _spawn(self) -> _Child:
        answers, pipe = self._context.Pipe(duplex=False)
        ready_end, ready = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_sidecar_main, name=f"{self.endpoint}-sidecar", daemon=True,
            args=(*self._args, answers, ready, self._shadow_models, self._poll_seconds,
                  logging.getLogger().getEffectiveLevel()))
        process.start()
        answers.close()  # the child's ends: once it is gone, sends fail instead of blocking
        ready.close()
        child = _Child(process, pipe, ready_end, queue.Queue(MAX_PENDING_SHADOW))
        child.sender = threading.Thread(target=_send_all, args=(child,), name=f"{self.endpoint}-sidecar-sender",
                                        daemon=True)
        child.sender.start()
        return child

    @property
    def pid(self) -> int | None:
        return self._child.process.pid

    def alive(self) -> bool:
        return self._child.process.is_alive()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the sidecar has loaded the shadow models it was started with (False: not within the time)."""
        child, deadline = self._child, time.monotonic() + timeout_s
        with contextlib.suppress(EOFError, OSError):
            while child.process.is_alive() and time.monotonic() < deadline:
                if child.ready.poll(0.2):
                    return child.ready.recv()
        child.process.join(0.5)  # an EOF above: the child is exiting
        if child.process.is_alive():
            log.warning("endpoint %s: the sidecar is not ready after %.0f s; serving meanwhile (answers wait in its "
                        "queue, %d at most)", self.endpoint, timeout_s, MAX_PENDING_SHADOW)
        else:
            self._revive(child)
        return False

    def hand_off(self, answered: Answered) -> None:
        """Queue ``answered`` without waiting; dropped (and counted) when the sidecar is gone or too far behind."""
        if answered.shadow_model is not None and self._shadow_models != (answered.shadow_model,):
            self._shadow_models = (answered.shadow_model,)
        child = self._child
        if not child.process.is_alive():
            self._revive(child)
            self.dropped.add(self.endpoint, "the sidecar is restarting", answered.inference_id)
            return
        try:
            child.pending.put_nowait(answered)
        except queue.Full:
            self.dropped.add(self.endpoint, f"{MAX_PENDING_SHADOW} already pending in the sidecar",
                             answered.inference_id)

    def _revive(self, dead: _Child) -> None:
        """Start a thread that replaces the ``dead`` child (once per death; never on the event loop)."""
        with self._lock:
            if self._closing.is_set() or self._child is not dead or self._reviver is not None:
                return
            wait = max(0.0, SIDECAR_RESTART_SECONDS - (time.monotonic() - self._started))
            log.error("endpoint %s: the sidecar process exited (code %s): no shadow copies or data capture until "
                      "it is restarted, in %.0f s", self.endpoint, dead.process.exitcode, wait)
            self._reviver = threading.Thread(target=self._restart, args=(dead, wait), daemon=True,
                                             name=f"{self.endpoint}-sidecar-restart")
            self._reviver.start()

    def _restart(self, dead: _Child, wait: float) -> None:
        self._closing.wait(wait)
        _release(dead)
        with self._lock:
            self._reviver = None
            if self._closing.is_set():
                return
            self._started = time.monotonic()  # the next restart waits from this attempt, failed or not
            try:
                self._child = self._spawn()
            except Exception:  # noqa: BLE001 - the next hand-off tries again
                log.exception("endpoint %s: the sidecar did not restart", self.endpoint)
                return
            self.restarts += 1
        log.warning("endpoint %s: sidecar restarted (pid %s, restart %d)", self.endpoint, self.pid, self.restarts)

    def close(self, timeout_s: float = 10.0) -> None:
        """Let the sidecar finish what is queued (up to ``timeout_s``), then stop it."""
        with self._lock:
            if self._closing.is_set():
                return
            self._closing.set()
            reviver = self._reviver
        if reviver is not None:
            reviver.join(5)
        child = self._child
        with contextlib.suppress(queue.Full):
            child.pending.put(None, timeout=1.0)  # after everything queued
        child.sender.join(timeout_s)
        if not child.sender.is_alive():
            child.pipe.close()  # EOF: the child captures what it has read, then exits
            child.process.join(timeout_s)
        _release(child)
        self.dropped.flush(self.endpoint, "since the last warning, at shutdown")


def _send_all(child: _Child) -> None:
    """A sender thread: pipe each queued answer to the child (blocking writes release the GIL)."""
    while (answered := child.pending.get()) is not None:
        try:
            child.pipe.send(answered)
        except (OSError, ValueError):  # the child is gone (EPIPE), or the pipe was closed
            break


def _release(child: _Child) -> None:
    """Stop ``child`` (terminate, then kill), its sender thread and pipes; safe on one that is already gone."""
    process = child.process
    if process.is_alive():
        process.terminate()
        with contextlib.suppress(OSError):  # a stopped child (SIGSTOP, a debugger) acts on SIGTERM only now
            os.kill(process.pid, signal.SIGCONT)
        process.join(5)
    if process.is_alive():
        process.kill()
        process.join(5)
    with contextlib.suppress(queue.Full):
        child.pending.put_nowait(None)  # a sender still waiting for work
    child.sender.join(5)  # a send blocked on the child failed (EPIPE) once it was gone
    child.pipe.close()
    child.ready.close()


def _sidecar_main(models_dir: str, capture_dir: str | None, endpoint: str, answers, ready,
                  shadow_models: tuple[str, ...], poll_seconds: float, log_level: int) -> None:
    """The sidecar process: capture each answer as it arrives; a thread runs the sampled ones on the shadow
    variant's model, so a slow shadow drops shadow copies (counted, logged) but never production captures."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the endpoint, which then stops this process
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[sidecar]: %(message)s")
    threads = apply_thread_settings()
    server = ModelServer(models_dir, names=set(shadow_models))  # only the shadow models, loaded before answers
    _poll(server)
    writer = CaptureWriter(Path(capture_dir), endpoint) if capture_dir else None
    log.info("endpoint %s sidecar up (pid %d): shadow models %s, data capture to %s, thread settings %s", endpoint,
             os.getpid(), sorted(server.names), capture_dir, threads or "TensorFlow's defaults")
    with contextlib.suppress(OSError):
        ready.send(True)
    ready.close()
    _lowest_priority()  # after loading: start-up must not wait for idle CPU time
    shadow_work: queue.Queue = queue.Queue(MAX_PENDING_SHADOW)
    worker = threading.Thread(target=_shadow_worker, args=(shadow_work, server, writer, endpoint, poll_seconds),
                              name="shadow", daemon=True)
    worker.start()
    dropped = _Dropped("were captured but not copied to the shadow")
    while True:
        try:
            answered = answers.recv()
        except (EOFError, OSError):  # the endpoint closed the pipe (shutdown) or died
            break
        try:
            if writer is not None:
                writer.write(PRODUCTION, answered, answered.response, answered.latency_ms, answered.model_name,
                             answered.model_version)
            if answered.shadow_model is not None:
                shadow_work.put_nowait(answered)
        except queue.Full:
            dropped.add(endpoint, f"{MAX_PENDING_SHADOW} shadow copies already pending", answered.inference_id)
        except Exception:  # noqa: BLE001 - one bad answer must not end capture for the rest
            log.exception("endpoint %s: sidecar failed on inference %s", endpoint, answered.inference_id)
    shadow_work.put(None)
    worker.join(30)
    dropped.flush(endpoint, "since the last warning, at shutdown")


def _shadow_worker(work: queue.Queue, server: ModelServer, writer: CaptureWriter | None, endpoint: str,
                   poll_seconds: float) -> None:
    polled = time.monotonic()
    while True:
        try:
            answered = work.get(timeout=poll_seconds)
        except queue.Empty:
            answered = False
        if answered is None:
            return
        if answered and answered.shadow_model not in server.names:  # a new shadow variant: serve only that one
            server.names = {answered.shadow_model}
            polled = -math.inf
        if time.monotonic() - polled >= poll_seconds:  # new versions, as the endpoint's own poller does
            _poll(server)
            polled = time.monotonic()
        if answered:
            _shadow_and_capture(answered, server, writer, endpoint)


def _poll(server: ModelServer) -> None:
    try:
        server.poll()
    except Exception:  # noqa: BLE001 - e.g. a version dir removed mid-scan: the next poll sees a settled tree
        log.exception("sidecar model poll of %s failed", server.models_dir)


def _lowest_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.nice(SIDECAR_NICE)
    with contextlib.suppress(OSError, AttributeError):  # Linux only
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _shadow_and_capture(answered: Answered, server: ModelServer, writer: CaptureWriter | None,
                        endpoint: str) -> None:
    """Run one answer's request on the shadow variant's model and capture the pair."""
    try:
        servable = server.get(answered.shadow_model)
        response, latency = _timed_predict(servable, wire.decode(answered.request))
    except Exception as err:  # noqa: BLE001 - a shadow failure is logged, never captured
        log.warning("endpoint %s: shadow variant %r (model %r) failed on inference %s: %s", endpoint, SHADOW,
                    answered.shadow_model, answered.inference_id, err)
        return
    if writer is not None:
        writer.write(SHADOW, answered, response, latency, servable.name, servable.version)


class Endpoint:
    """A SageMaker endpoint's variants (from the manifest); the sidecar runs the shadow and data capture."""

    def __init__(self, manifest: Path | None, server: ModelServer, capture_dir: Path | None):
        self.manifest, self.server = (Path(manifest) if manifest else None), server
        self.name = self.manifest.stem if self.manifest else None  # LocalBackend names it <endpoint>.json
        self.capture_dir = Path(capture_dir) if capture_dir and self.name else None
        self._state: EndpointState | None = None
        self._stamp: tuple | None = None
        self._lock = threading.Lock()
        self._readiness: str | None = ""
        self.sidecar: Sidecar | None = None

    def start(self, poll_seconds: float) -> None:
        """Start the sidecar (endpoints only: a plain TF Serving model server has no variants to shadow). A
        sidecar that cannot start is logged, and the endpoint serves without shadow copies or capture."""
        if self.manifest is not None and self.sidecar is None:
            state = self.state()
            shadow = (state.shadow.model_name,) if state is not None and state.shadow is not None else ()
            try:
                self.sidecar = Sidecar(self.server.models_dir, self.capture_dir, self.name, poll_seconds, shadow)
            except Exception:  # noqa: BLE001 - production answers do not depend on it
                log.exception("endpoint %s: the sidecar did not start: no shadow copies or data capture", self.name)

    def state(self) -> EndpointState | None:
        """The manifest's state, re-read whenever the file changes (promote and rollback take effect live)."""
        if self.manifest is None:
            return None
        try:
            stat = self.manifest.stat()
            stamp = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._state = EndpointState.from_dict(json.loads(self.manifest.read_text())["state"]) \
                        if stamp else None
                    log.info("endpoint %s: variants %s", self.name, self._state.to_dict() if self._state else None)
                except (OSError, ValueError, KeyError, TypeError) as err:
                    log.error("endpoint manifest %s is unreadable, keeping the previous variants: %s",
                              self.manifest, err)
            return self._state

    def production(self) -> tuple[Servable, EndpointState]:
        if self.manifest is None:
            raise Unavailable("no endpoint manifest: this server only answers the TF Serving API")
        state = self.state()
        if state is None or state.production is None:
            raise Unavailable(f"endpoint {self.name!r} has no production variant (manifest {self.manifest})")
        try:
            return self.server.get(state.production.model_name), state
        except NotFound as err:
            raise Unavailable(f"endpoint {self.name!r}: production variant {PRODUCTION!r} (model "
                              f"{state.production.model_name!r}) is not loaded: {err}") from err

    def readiness(self) -> str | None:
        """None when the production variant can answer, else why not."""
        try:
            self.production()
        except Unavailable as err:
            return str(err)
        return None

    def log_readiness(self) -> None:
        problem = self.readiness() if self.manifest else None
        if problem != self._readiness and self.manifest:
            if problem:
                log.warning("endpoint %s is not ready: %s", self.name, problem)
            else:
                log.info("endpoint %s is ready", self.name)
        self._readiness = problem

    async def invoke(self, raw: bytes, inference_id: str | None) -> bytes:
        """The production variant's response to a predict body; the sidecar gets the pair off the response path."""
        received = datetime.now(timezone.utc)
        servable, state = self.production()
        body = wire.decode(raw)
        # On the event loop, not in a thread (see the module docstring).
        payload, latency = _timed_predict(servable, body)
        shadow = state.shadow.model_name if state.shadow is not None and random.random() < state.shadow.weight \
            else None
        if self.sidecar is not None and (shadow is not None or self.capture_dir is not None):
            self.sidecar.hand_off(Answered(raw, payload, inference_id or None, received, latency,
                                           servable.name, servable.version, shadow))
        return payload

    def close(self) -> None:
        if self.sidecar is not None:
            self.sidecar.close()


# ---------------------------------------------------------------------------------------------- app

def _json(payload: bytes | dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = payload if isinstance(payload, bytes) else wire.encode(payload)
    return Response(body, status, headers, media_type=wire.CONTENT_TYPE)


def _error_handler(status: int):
    async def handle(request: Request, err: Exception) -> Response:
        return _json(wire.error_body(str(err) if status < 500 or isinstance(err, Unavailable)
                                     else f"internal error: {type(err).__name__}: {err}"), status)

    return handle


#: The SageMaker TF Serving container's thread settings (``serving.wire``), honoured here the same way: each
#: model's session gets them (``session_config``).
INTRA_OP_THREADS, INTER_OP_THREADS = wire.INTRA_OP_THREADS, wire.INTER_OP_THREADS


def thread_settings(environ: dict[str, str] | None = None) -> dict[str, int]:
    """``SAGEMAKER_TFS_{INTRA,INTER}_OP_PARALLELISM`` from the environment (those set). One thread each suits a small
    ranking model on a few shared cores: handing work to pool threads costs more than it parallelises."""
    environ = os.environ if environ is None else environ
    settings = {}
    for name in (INTRA_OP_THREADS, INTER_OP_THREADS):
        value = environ.get(name, "").strip()
        if not value:
            continue
        if not value.isdigit():
            raise ValueError(f"{name} must be a whole number of threads, got {value!r}")
        settings[name] = int(value)
    return settings


def apply_thread_settings() -> dict[str, int]:
    """``thread_settings()``, also given to TensorFlow's eager context before anything else runs: TensorFlow
    sizes its process-wide pools from whichever comes first, a session or the eager context, so both must agree
    (each model's session gets them from ``session_config``). Returns the settings; logs when it is too late."""
    settings = thread_settings()
    setters = {INTRA_OP_THREADS: tf.config.threading.set_intra_op_parallelism_threads,
               INTER_OP_THREADS: tf.config.threading.set_inter_op_parallelism_threads}
    for name, value in settings.items():
        try:
            setters[name](value)
        except RuntimeError:  # TensorFlow already ran something in this process: its pools are fixed
            log.warning("%s=%s may not apply: TensorFlow is already initialised in this process", name, value)
    return settings


def session_config(environ: dict[str, str] | None = None) -> tf.compat.v1.ConfigProto:
    """A model session's config from ``thread_settings`` (see ``apply_thread_settings``)."""
    settings = thread_settings(environ)
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=settings.get(INTRA_OP_THREADS, 0),
                                    inter_op_parallelism_threads=settings.get(INTER_OP_THREADS, 0))


def create_app(models_dir: str | Path, endpoint_manifest: Path | None = None, capture_dir: Path | None = None,
               poll_seconds: float = 2.0) -> Starlette:
    """The local endpoint as an ASGI app (``app.state.server``: the ModelServer, ``app.state.endpoint``)."""
    apply_thread_settings()  # before any model loads; a bad value fails here, at start-up
    server = ModelServer(models_dir)
    endpoint = Endpoint(endpoint_manifest, server, capture_dir)

    def refresh() -> None:
        server.poll()
        endpoint.log_readiness()

    def poll_forever(stop: threading.Event) -> None:
        while not stop.wait(poll_seconds):
            try:
                refresh()
            except Exception:  # noqa: BLE001 - the poller must survive a bad scan
                log.exception("model poll of %s failed", server.models_dir)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        log.info("local endpoint: models %s, manifest %s, capture %s", server.models_dir, endpoint.manifest,
                 endpoint.capture_dir)
        endpoint.start(poll_seconds)  # the sidecar loads the shadow model while this process loads the others
        await run_in_threadpool(refresh)
        if endpoint.sidecar is not None:
            await run_in_threadpool(endpoint.sidecar.wait_ready, SIDECAR_READY_SECONDS)
        stop = threading.Event()
        poller = threading.Thread(target=poll_forever, args=(stop,), name="model-poller", daemon=True)
        poller.start()
        try:
            yield
        finally:
            stop.set()
            poller.join(timeout=30)
            endpoint.close()

    async def tf_serving(request: Request) -> Response:
        try:
            parts = wire.parse_path(request.url.path)
        except wire.WireError as err:
            raise NotFound(f"Malformed request: {request.method} {request.url.path}") from err
        if parts["label"]:
            raise NotFound(f"version labels are not served here: {request.url.path}")
        name, version, predict = parts["name"], parts["version"], parts["verb"] == ":predict"
        if (request.method == "POST") != predict:
            return _json(wire.error_body(f"Malformed request: {request.method} {request.url.path}"), 405)
        alias = name == endpoint.name
        servable = endpoint.production()[0] if alias else server.get(name, version)
        if version is not None and int(version) != servable.version:
            raise NotFound(f"Servable not found for request: Specific({name}, {version})")
        if predict and alias:
            payload = await endpoint.invoke(await request.body(), request.headers.get(INFERENCE_ID_HEADER))
            return _json(payload, headers={VARIANT_HEADER: PRODUCTION})
        if predict:
            body = wire.decode(await request.body())
            return _json(_timed_predict(servable, body)[0])
        if parts["verb"] == "/metadata":
            return _json(wire.metadata(name, servable.version, **servable.signature_def))
        return _json(wire.model_status([(servable.version, "AVAILABLE")]))

    async def ping(request: Request) -> Response:
        servable, state = endpoint.production()
        return _json({"endpoint": endpoint.name, PRODUCTION: {"model_name": servable.name,
                                                              "version": str(servable.version)},
                      SHADOW: state.shadow.model_name if state.shadow else None})

    async def invocations(request: Request) -> Response:
        payload = await endpoint.invoke(await request.body(), request.headers.get(INFERENCE_ID_HEADER))
        return _json(payload, headers={VARIANT_HEADER: PRODUCTION})

    routes = [
        # TF Serving REST API: /v1/models/<name>[/versions/<v>][:predict|/metadata]
        Route("/v1/models/{path:path}", tf_serving, methods=["GET", "POST"]),
        # SageMaker real-time endpoint (the TF Serving inference image's container API)
        Route("/ping", ping, methods=["GET"]),
        Route("/invocations", invocations, methods=["POST"]),
    ]
    async def client_gone(request: Request, err: Exception) -> Response:
        # The caller gave up (the ranking API's time budget ran out) before sending the whole body: nothing to
        # answer and nothing wrong here. 499 is nginx's "client closed request"; no traceback in the logs.
        log.debug("client disconnected during %s %s", request.method, request.url.path)
        return Response(status_code=499)

    async def routing_error(request: Request, err: HTTPException) -> Response:
        # Starlette's own 404 (no route) and 405 (wrong method): TF Serving's error body too, not plain text.
        return _json(wire.error_body(f"{err.detail}: {request.method} {request.url.path}"), err.status_code,
                     err.headers)

    handlers = {wire.WireError: _error_handler(400), NotFound: _error_handler(404), Unavailable: _error_handler(503),
                HTTPException: routing_error, ClientDisconnect: client_gone, Exception: _error_handler(500)}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan)
    app.state.server, app.state.endpoint = server, endpoint
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m serving.local_endpoint``: serve until stopped (``serving.servers.running_process`` starts it
    this way, on a socket it bound). No access log: a line per request is CPU the model's answers would wait on."""
    import socket

    import uvicorn

    from serving.servers import stop_with_parent

    parser = argparse.ArgumentParser(prog="python -m serving.local_endpoint",
                                     description="The local endpoint: TF Serving REST, SageMaker /ping, /invocations")
    parser.add_argument("--models", type=Path, required=True, help="models dir: <name>/<version>/saved_model.pb")
    parser.add_argument("--manifest", type=Path, help="endpoint manifest (variants); without: a plain model server")
    parser.add_argument("--capture", type=Path, help="data-capture dir")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket instead of --host/--port")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is no longer the parent")
    parser.add_argument("--poll-seconds", type=float, default=2.0, help="how often new model versions are looked for")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s[endpoint]: %(message)s")
    if args.parent_pid:
        stop_with_parent(args.parent_pid)
    app = create_app(args.models, args.manifest, args.capture, args.poll_seconds)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)
    sockets = [socket.socket(fileno=args.fd)] if args.fd is not None else None
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
