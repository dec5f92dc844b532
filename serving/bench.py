"""The serving benchmark: the ranking API and the local endpoint under open-loop load, against the model's floor.

``run_serving_benchmark(home, ...)`` serves a workspace the way ``marketrank serve`` does, in this process: the
local endpoint (``serving.local_endpoint``, uvicorn in a thread; ``model_server="process"`` runs it in a child
process instead, as production runs TF Serving apart from the API) and the ranking API (``serving.app`` with the
workspace's embedded feature store, uvicorn in a thread), all on 127.0.0.1 with free ports. The feature store is
materialised first when it is empty. Then, per candidate count:

* **Unloaded**: ``unloaded_requests`` requests one at a time (closed loop, after 5 unrecorded ones): the service
  time with no queueing, and its stage timings.
* **Load**: an open-loop generator (``aiohttp`` on uvloop, keep-alive, loopback only) sends requests at ``rate``
  per second (Poisson arrivals by default) for ``warmup_seconds`` (not recorded) and then ``seconds``. It runs
  in a child process by default, so the client's JSON work does not hold the servers' GIL. Requests are built
  from the workspace with a fixed seed: users from the raw users table (users without online state are cold
  starts, as in production), both surfaces (55% search, the simulator's share), search queries made of real
  ``[brand] [style] category`` words, candidates sampled from the store's items (on search, the query's
  category first). Per request: HTTP status, client-side latency (from the send, and from the scheduled send),
  the API's ``timings_ms`` and its ``fallback`` flag.
* **Floor**: the production SavedModel's ``serving_default`` signature run as the local endpoint (and TF
  Serving) runs it, in a session with the endpoint's thread settings (``Servable.call``), on batches that
  ``build_inputs`` made from the same requests (``floor_calls`` calls), plus the in-process cost of every
  other step of the model stage (store fetch, ``build_inputs``, predict-body encoding, the endpoint's own
  decode + predict + encode, response decoding), measured with no load running, back to back; then the
  signature and the endpoint's predict path again, *paced*: each call after an idle
  pause drawn like the load's arrival gaps (``floor.paced``, and the API's ``ratio_to_paced_floor``). Under
  open-loop load every request finds the cores idle, and on the 2-core dev VM such a call takes longer than
  one right after another (a waking vCPU, colder caches).
* **Endpoint alone** (``endpoint_alone``, on by default): the same arrivals again, sent straight to the model
  endpoint's predict route with the predict body the API would send for each request (built before the load).
  It is the model stage at this rate with nothing in front of it: a lower bound for the API's latency, up to
  run-to-run noise. At most ``ALONE_BODIES`` distinct bodies are built and cycled (a 1000-candidate body is
  ~190 KB).
* **Transport floor** (``transport_floor``, on by default): the same arrivals and rank bodies once more, through
  an API and an endpoint that do no ranking work on the same stacks (``serving.transport_floor``: FastAPI and
  Starlette on uvicorn, the API's model client with one request's inputs, canned answers of the load's sizes).
  It is what the HTTP servers, the JSON parses, the model client's encoding and call, and this machine's
  scheduling cost at this rate, without features, model, ranking, validation, logging, metrics, capture or
  shadow: a part of the API's latency that no change to that work can remove.

The report (``out/serving.json`` and ``out/serving_latency.png`` when ``out`` is given) holds per candidate
count the latency percentiles of all answers (and of model-ranked and fallback answers apart), the achieved
throughput, errors (non-200 or transport failure) and fallbacks (``fallback: true``, by reason) counted
separately, the stage timings of model-ranked answers, the unloaded block, the floor and the API/floor ratios,
additive breakdowns of the mean latency unloaded and under load ("where the time goes"), CPU use (this process,
the client, the whole machine: a busy neighbour shows as ``other_processes_cores``), the breaker's state, the
machine, versions, settings, and whether the project's target is met: API p99 <= 10 ms at 100 req/s for 300
candidates with no error and no fallback. Between phases it waits for a breaker the previous phase opened.

Data capture goes to a temporary directory (deleted afterwards) so synthetic traffic never reaches the
workspace's shadow report; the API's per-request JSON log lines go to a temporary file (their cost is kept).
The endpoint's shadow variant, if the manifest has one, runs as it does under ``marketrank serve``.

CLI: ``python -m serving.bench --home $MARKETRANK_HOME --out /tmp/bench`` (``main``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("marketrank.bench")

#: The project's stated target; Metarank publishes ~20 ms for ranking 300 items.
TARGET = {"p99_ms": 10.0, "rate_rps": 100.0, "candidates": 300, "errors": 0, "fallbacks": 0,
          "reference": "Metarank publishes ~20 ms for 300 items"}
SEARCH_SHARE = 0.55  # the simulator's share of search requests
QUERY_BRAND_P, QUERY_STYLE_P, OWN_TASTE_P = 0.35, 0.35, 0.7  # the simulator's query intents
MAX_REQUESTS_PER_PHASE = 100_000
MAX_RATE, MAX_SECONDS = 5_000.0, 600.0
CLIENT_CONNECTIONS = 100
#: Idle keep-alive connections are dropped by the client before uvicorn's 5 s ``timeout_keep_alive`` closes them:
#: otherwise a request can race the server's close and fail with a ReadError that is the client's doing.
CLIENT_KEEPALIVE_S = 4.0
REQUEST_TIMEOUT_S = 10.0
FLOOR_BATCHES = 10
UNLOADED_WARM = 5  # unloaded requests sent first and not recorded
#: Distinct predict bodies the endpoint-alone phase builds and cycles (a 1000-candidate body is ~190 KB).
ALONE_BODIES = 500
REPO_ROOT = Path(__file__).resolve().parents[1]
JSON_FILE, PNG_FILE = "serving.json", "serving_latency.png"
HOST = "127.0.0.1"


# ---------------------------------------------------------------------------------------------- workspace

@dataclasses.dataclass
class Workspace:
    home: Path
    endpoint: str
    manifest: Path
    state: dict[str, Any]
    model_name: str
    model_dir: Path
    store_path: Path
    materialized_now: bool
    dataset: str | None
    raw_dir: Path | None
    #: ``training.features.features_fingerprint()`` of the feature job that built the served data (None: unknown).
    features_fingerprint: str | None = None


def _latest_report(home: Path) -> dict[str, Any] | None:
    path = home / "runs" / "latest" / "report.json"
    return json.loads(path.read_text()) if path.exists() else None


def _dataset_dir(home: Path, report: dict[str, Any] | None, kind: str) -> Path | None:
    """``data/<dataset>/<kind>`` of the latest run, inside ``home`` first (the workspace may have been copied)."""
    if not report:
        return None
    dataset = report.get("dataset") or {}
    local = home / "data" / str(dataset.get("name")) / kind
    if local.exists():
        return local
    recorded = Path(dataset[kind]) if dataset.get(kind) else None
    return recorded if recorded is not None and recorded.exists() else None


def open_workspace(home: Path, endpoint: str = "marketrank") -> Workspace:
    """The workspace's endpoint, production model and feature store (materialised here when empty)."""
    from pipelines.deploy import LocalBackend
    from serving.feature_store import DEFAULT_STORE_FILE, materialize, open_store
    from training.export import latest_version, load_spec
    from training.feature_job import built_fingerprint

    home = Path(home).resolve()
    backend = LocalBackend(home / "endpoints", endpoint)
    state = backend.current()
    if state is None or state.production is None:
        raise FileNotFoundError(f"no local endpoint {endpoint!r} with a production model in {home} "
                                f"({backend.path}): run `marketrank run` first")
    model_dir = latest_version(home / "models" / state.production.model_name)
    report = _latest_report(home)
    store_path = home / DEFAULT_STORE_FILE
    features = _dataset_dir(home, report, "features")
    store = open_store("embedded", store_path)
    try:
        materialized_now = store.get_spec() is None
        if materialized_now:
            if features is None:
                raise FileNotFoundError(f"the feature store {store_path} is empty and no run's features were found "
                                        f"under {home}: run `marketrank features materialize` first")
            log.info("materializing %s into %s", features, store_path)
            materialize(features, store, load_spec(model_dir))
    finally:
        store.close()
    return Workspace(home=home, endpoint=endpoint, manifest=backend.path, state=state.to_dict(),
                     model_name=state.production.model_name, model_dir=model_dir, store_path=store_path,
                     materialized_now=materialized_now,
                     dataset=(report or {}).get("dataset", {}).get("name"), raw_dir=_dataset_dir(home, report, "raw"),
                     features_fingerprint=built_fingerprint(features) if features is not None else None)


# ---------------------------------------------------------------------------------------------- requests

@dataclasses.dataclass
class Catalogue:
    """What realistic requests are made of: real user ids, item ids and query words."""

    users: list[str]  # the raw users table (all registered users), else the store's users
    users_source: str
    user_states: dict[str, dict[str, Any]]
    items: list[str]  # items with online state (the ones a retrieval stage would return)
    by_category: dict[str, np.ndarray]  # category -> indices into items
    brands: list[str]
    styles: list[str]

    @classmethod
    def load(cls, store_path: Path, raw_dir: Path | None) -> Catalogue:
        from serving.feature_store import ITEMS, USERS

        content = json.loads(Path(store_path).read_text())
        items, user_states = content[ITEMS], content[USERS]
        item_ids = sorted(items)
        if not item_ids:
            raise ValueError(f"the feature store {store_path} holds no items")
        categories: dict[str, list[int]] = {}
        for index, item in enumerate(item_ids):
            categories.setdefault(str(items[item].get("category")), []).append(index)
        brands = sorted({str(s["brand"]) for s in items.values() if s.get("brand")})
        styles = sorted({str(s["style"]) for s in items.values() if s.get("style")})
        users, source = sorted(user_states), "feature store"
        if raw_dir is not None and (raw_dir / "users").exists():
            import pyarrow.parquet as pq

            users = sorted(str(u) for u in pq.read_table(raw_dir / "users", columns=["user_id"])["user_id"]
                           .to_pylist())
            source = f"raw users table ({raw_dir / 'users'})"
        if not users:
            raise ValueError("no user ids: neither a raw users table nor users in the feature store")
        return cls(users=users, users_source=source, user_states=user_states, items=item_ids,
                   by_category={c: np.asarray(ix) for c, ix in sorted(categories.items())}, brands=brands,
                   styles=styles)


@dataclasses.dataclass
class Plan:
    """One phase's requests: send offsets (s, from the phase's start) and bodies; the first ``warmup`` are not
    recorded."""

    candidates: int
    offsets: list[float]
    requests: list[dict[str, Any]]
    warmup: int
    rate: float  # offered requests per second

    def bodies(self) -> list[str]:
        return [json.dumps(r, separators=(",", ":")) for r in self.requests]


def _query(rng: np.random.Generator, catalogue: Catalogue, user: str) -> tuple[str, str]:
    """``[brand] [style] category`` as the simulator's searches: mostly the user's own brands and styles."""
    category = str(rng.choice(list(catalogue.by_category)))
    state = catalogue.user_states.get(user) or {}
    words = []
    if catalogue.brands and rng.random() < QUERY_BRAND_P:
        own = state.get("user_fav_brands") or []
        words.append(str(rng.choice(own)) if own and rng.random() < OWN_TASTE_P else str(rng.choice(catalogue.brands)))
    if catalogue.styles and rng.random() < QUERY_STYLE_P:
        own = state.get("user_fav_styles") or []
        words.append(str(rng.choice(own)) if own and rng.random() < OWN_TASTE_P else str(rng.choice(catalogue.styles)))
    return " ".join([*words, category]), category


def _candidates(rng: np.random.Generator, catalogue: Catalogue, n: int, category: str | None) -> list[str]:
    """``n`` distinct item ids; on search the query's category first (a retrieval stage's output), then others."""
    if category is None:
        chosen = rng.choice(len(catalogue.items), size=n, replace=False)
    else:
        matching = catalogue.by_category.get(category, np.empty(0, dtype=int))
        first = rng.permutation(matching)[:n]
        rest = np.setdiff1d(np.arange(len(catalogue.items)), first, assume_unique=True)
        chosen = np.concatenate([first, rng.choice(rest, size=n - len(first), replace=False)])
        chosen = rng.permutation(chosen)
    return [catalogue.items[i] for i in chosen]


def build_plan(catalogue: Catalogue, candidates: int, rate: float, seconds: float, warmup_seconds: float,
               seed: int = 7, arrivals: str = "poisson", k: int | None = None) -> Plan:
    """A reproducible phase: ``rate * (warmup_seconds + seconds)`` requests of ``candidates`` items each."""
    rng = np.random.default_rng([seed, candidates])
    warmup, measured = round(rate * warmup_seconds), max(1, round(rate * seconds))
    total = warmup + measured
    if arrivals == "poisson":
        offsets = np.concatenate([[0.0], np.cumsum(rng.exponential(1 / rate, size=total - 1))])
    elif arrivals == "uniform":
        offsets = np.arange(total) / rate
    else:
        raise ValueError(f"arrivals: expected 'poisson' or 'uniform', got {arrivals!r}")
    requests = []
    for i in range(total):
        user = str(rng.choice(catalogue.users))
        body: dict[str, Any] = {"request_id": f"bench-{candidates}-{i}", "user_id": user}
        category = None
        if rng.random() < SEARCH_SHARE:
            body["surface"] = "search"
            body["query"], category = _query(rng, catalogue, user)
        else:
            body["surface"] = "feed"
        body["candidates"] = _candidates(rng, catalogue, candidates, category)
        if k is not None:
            body["k"] = k
        requests.append(body)
    return Plan(candidates, [float(x) for x in offsets], requests, warmup, rate)


# ---------------------------------------------------------------------------------------------- load generator

async def _drive(base_url: str, bodies: Sequence[str], offsets: Sequence[float] | None, timeout_s: float,
                 max_connections: int = CLIENT_CONNECTIONS, path: str = "/v1/rank", health: str = "/healthz",
                 order: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Open loop: request i is sent at ``offsets[i]`` whatever happened to the earlier ones. ``offsets`` None:
    closed loop, one request at a time (the unloaded service time). ``path``: the API's rank route, or the
    endpoint's predict route (``health`` its ``/ping``) for the endpoint-alone phase. ``order``: request i sends
    ``bodies[order[i]]`` (a pool of distinct bodies cycled), else ``bodies[i]``."""
    import aiohttp

    if order is not None:
        bodies = [bodies[j] for j in order]  # references: no copy of the bodies themselves

    if not base_url.startswith(f"http://{HOST}:"):
        raise ValueError(f"the benchmark only talks to {HOST}, not {base_url}")
    results: list[dict[str, Any] | None] = [None] * len(bodies)
    # aiohttp rather than httpx: ~0.15 ms of client work per call instead of ~0.65 ms, which would be counted in
    # every latency and would take CPU from the servers on a 2-core machine.
    connector = aiohttp.TCPConnector(limit=max_connections, keepalive_timeout=CLIENT_KEEPALIVE_S)
    async with aiohttp.ClientSession(base_url=base_url, connector=connector, trust_env=False,
                                     timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     headers={"Content-Type": "application/json"}) as client:
        async with client.get(health) as answer:
            answer.raise_for_status()

        async def one(i: int, intended: float) -> None:
            sent = time.perf_counter()
            record: dict[str, Any] = {"lag_ms": (sent - intended) * 1000}
            try:
                async with client.post(path, data=bodies[i]) as response:
                    content = await response.read()
                done = time.perf_counter()
                record["status"] = response.status
                try:
                    payload = json.loads(content)
                    record.update(fallback=payload.get("fallback"), reason=payload.get("reason"),
                                  timings_ms=payload.get("timings_ms"), n_items=len(payload.get("items") or []),
                                  unknown=len(payload.get("unknown_items") or []))
                    if response.status != 200:
                        record["error"] = str(payload.get("error"))[:200]
                except ValueError:
                    record["error"] = f"not JSON: {content[:200].decode('utf-8', 'replace')}"
            except (aiohttp.ClientError, asyncio.TimeoutError) as err:
                done = time.perf_counter()
                record.update(status=None, error=f"{type(err).__name__}: {err}"[:200])
            record.update(latency_ms=(done - sent) * 1000, from_schedule_ms=(done - intended) * 1000,
                          sent_s=sent - start, done_s=done - start)
            results[i] = record

        tasks = []
        start = time.perf_counter() + 0.05
        if offsets is None:
            for i in range(len(bodies)):
                await one(i, time.perf_counter())
            offsets = []
        for i, offset in enumerate(offsets):
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, start + offset)))
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=timeout_s + 5)
            for task in pending:
                task.cancel()
    return [r if r is not None else {"status": None, "error": "not answered before the drain deadline"}
            for r in results]


def _run(coroutine):
    """``asyncio.run`` on uvloop where it is installed (as uvicorn runs the servers)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _client_main(plan_path: str, result_path: str) -> None:
    """The child process: run one phase's load from a plan file, write the records."""
    from serving import heap

    plan = json.loads(Path(plan_path).read_text())
    heap.settle("loading the plan")  # a full collection over the plan's bodies (~13 ms) must not land mid-load
    records = _run(_drive(plan["base_url"], plan["bodies"], plan.get("offsets"), plan["timeout_s"],
                          path=plan.get("path", "/v1/rank"), health=plan.get("health", "/healthz"),
                          order=plan.get("order")))
    Path(result_path).write_text(json.dumps(records))


def run_load(base_url: str, bodies: Sequence[str], offsets: Sequence[float] | None, workdir: Path,
             client_process: bool = True, timeout_s: float = REQUEST_TIMEOUT_S, path: str = "/v1/rank",
             health: str = "/healthz", order: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Every request's record, in order: open loop at ``offsets``, or one at a time when ``offsets`` is None.
    ``order``: which of ``bodies`` each request sends (see ``_drive``)."""
    if not client_process:
        return _run(_drive(base_url, bodies, offsets, timeout_s, path=path, health=health, order=order))
    plan_path, result_path = workdir / "plan.json", workdir / "records.json"
    plan_path.write_text(json.dumps({"base_url": base_url, "bodies": list(bodies), "offsets": offsets,
                                     "timeout_s": timeout_s, "path": path, "health": health,
                                     "order": list(order) if order is not None else None}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    code = "import sys; from serving.bench import _client_main; _client_main(sys.argv[1], sys.argv[2])"
    limit = (offsets[-1] if offsets else len(bodies) * timeout_s) + timeout_s + 60
    done = subprocess.run([sys.executable, "-c", code, str(plan_path), str(result_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=limit, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load generator failed (exit {done.returncode}): {done.stderr[-2000:]}")
    records = json.loads(result_path.read_text())
    plan_path.unlink(missing_ok=True)
    result_path.unlink(missing_ok=True)
    return records


# ---------------------------------------------------------------------------------------------- floor

def _stats(values: Sequence[float], percentiles: Sequence[int] = (50, 95, 99)) -> dict[str, float | int | None]:
    array = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if array.size == 0:
        return {**{f"p{p}": None for p in percentiles}, "max": None, "mean": None, "n": 0}
    out: dict[str, float | int | None] = {f"p{p}": round(float(np.percentile(array, p)), 3) for p in percentiles}
    out.update(max=round(float(array.max()), 3), mean=round(float(array.mean()), 3), n=int(array.size))
    return out


def _timed(fn: Callable[[int], Any], calls: int, pauses: Sequence[float] | None = None) -> list[float]:
    """ms per call of ``fn(i)``; with ``pauses``, call i waits ``pauses[i]`` seconds first (not timed)."""
    times = []
    for i in range(calls):
        if pauses is not None:
            time.sleep(pauses[i])
        started = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - started) * 1000)
    return times


def _paced(fn: Callable[[int], Any], calls: int, rate: float, seed: int = 0) -> list[float]:
    """``fn`` timed after idle pauses like the open-loop load's gaps (exponential, mean ``1 / rate``)."""
    return _timed(fn, calls, np.random.default_rng(seed).exponential(1 / rate, calls))


def predict_body(store: Any, spec: Any, request: dict[str, Any], now_ms: int) -> dict[str, Any]:
    """What the API sends the model for ``request``: its fetched state, ``build_inputs`` arrays and the encoded
    TF Serving predict body (``raw``)."""
    from serving import wire
    from serving.feature_store import RequestContext, build_inputs

    fetched = store.fetch(request["user_id"], request["candidates"])
    known = fetched.known_items()
    context = RequestContext(request["surface"], request.get("query"), now_ms)
    inputs = build_inputs(spec, context, fetched.user, known)
    return {"request": request, "context": context, "user": fetched.user, "known": known, "inputs": inputs,
            "raw": wire.encode(wire.predict_request(inputs))}


def measure_floor(servable: Any, store: Any, spec: Any, requests: Sequence[dict[str, Any]],
                  calls: int = 200, rate: float | None = None, *, now_ms: int) -> dict[str, Any]:
    """The SavedModel's own time (``servable.call``: its ``serving_default`` signature run in a session, as TF
    Serving runs it) on ``build_inputs`` batches of ``requests`` (cycled), and the in-process cost of the model
    stage's other steps on the same batches, all called back to back.

    With ``rate``, the signature and the endpoint's predict path are also timed *paced*: each call after an idle
    pause drawn like the load's arrival gaps. On this class of machine a call that finds the core idle runs
    slower than one right after another (a waking vCPU, colder caches), and under open-loop load at ``rate``
    every request does: the paced floor is the model's cost as the load meets it. ``now_ms``: the request time
    the features are built at, the API's own clock (``Ranker.now_ms``)."""
    from serving import wire
    from serving.backends import scores_from_body
    from serving.feature_store import build_inputs

    batches = []
    for request in requests[:FLOOR_BATCHES]:
        batch = predict_body(store, spec, request, now_ms)
        batches.append({**batch, "response": wire.encode(servable.predict(wire.decode(batch["raw"])))})
    if not batches:
        raise ValueError("no requests to measure the floor on")
    n = len(batches)

    def signature_call(i: int) -> None:
        servable.call(batches[i % n]["inputs"])  # build_inputs gives the signature's dtypes and shapes

    for i in range(2 * n):  # allocated and cached before timing
        signature_call(i)
    floor = _stats(_timed(signature_call, calls))
    parts = max(20, calls // 4)
    steps = {
        "store_fetch": lambda i: store.fetch(batches[i % n]["request"]["user_id"],
                                             batches[i % n]["request"]["candidates"]),
        "build_inputs": lambda i: build_inputs(spec, batches[i % n]["context"], batches[i % n]["user"],
                                               batches[i % n]["known"]),
        "encode_request": lambda i: wire.encode(wire.predict_request(batches[i % n]["inputs"])),
        "endpoint_predict": lambda i: wire.encode(servable.predict(wire.decode(batches[i % n]["raw"]))),
        "decode_response": lambda i: scores_from_body(wire.decode(batches[i % n]["response"]),
                                                      len(batches[i % n]["inputs"]["mask"][0])),
    }
    in_process = {name: _stats(_timed(fn, parts), (50, 99)) for name, fn in steps.items()}
    out = {"signature_ms": {"p50": floor["p50"], "p99": floor["p99"], "mean": floor["mean"], "max": floor["max"],
                            "calls": calls},
           "batches": n, "request_body_kb": round(float(np.mean([len(b["raw"]) for b in batches])) / 1024, 1),
           "in_process_ms": in_process}
    if rate:
        out["paced"] = {"mean_gap_ms": round(1000 / rate, 3),
                        "signature_ms": _stats(_paced(signature_call, calls, rate), (50, 99)),
                        "endpoint_predict_ms": _stats(_paced(steps["endpoint_predict"], parts, rate, 1), (50, 99))}
    return out


# ---------------------------------------------------------------------------------------------- summary

STAGES = ("features", "model", "rank", "total")


def stage_stats(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-stage stats of answered requests: the API's ``timings_ms`` plus ``parse`` (total - stages) and
    ``outside_ranker`` (client latency - API total)."""
    timed = [r for r in records if r.get("status") == 200 and isinstance(r.get("timings_ms"), dict)]
    stages = {stage: _stats([r["timings_ms"].get(stage) for r in timed], (50, 99)) for stage in STAGES}
    stages["parse"] = _stats([r["timings_ms"]["total"] - sum(r["timings_ms"][s] for s in STAGES[:3]) for r in timed],
                             (50, 99))
    stages["outside_ranker"] = _stats([r["latency_ms"] - r["timings_ms"]["total"] for r in timed], (50, 99))
    return stages


def summarize_unloaded(records: Sequence[dict[str, Any]], warm: int) -> dict[str, Any]:
    measured = list(records[warm:])
    ranked = [r for r in measured if r.get("status") == 200 and not r.get("fallback")]
    return {"requests": len(measured), "errors": sum(r.get("status") != 200 for r in measured),
            "fallbacks": sum(bool(r.get("fallback")) for r in measured if r.get("status") == 200),
            "latency_ms": _stats([r["latency_ms"] for r in ranked]), "stages_ms": stage_stats(ranked)}


def summarize_phase(plan: Plan, requested: int, records: Sequence[dict[str, Any]], floor: dict[str, Any],
                    catalogue: Catalogue, unloaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """One candidate count's result from its open-loop records (warm-up included), floor and unloaded block."""
    measured = list(records[plan.warmup:])
    requests = plan.requests[plan.warmup:]
    statuses = Counter(str(r.get("status")) for r in measured)
    ok = [r for r in measured if r.get("status") == 200]
    errors = [r for r in measured if r.get("status") != 200]
    fallbacks = [r for r in ok if r.get("fallback")]
    ranked = [r for r in ok if not r.get("fallback")]
    latency = _stats([r["latency_ms"] for r in measured if "latency_ms" in r])
    finished = [r for r in measured if "done_s" in r]
    duration = (max(r["done_s"] for r in finished) - min(r["sent_s"] for r in finished)) if finished else 0.0
    offered = (len(measured) - 1) / (plan.offsets[-1] - plan.offsets[plan.warmup]) \
        if len(measured) > 1 and plan.offsets[-1] > plan.offsets[plan.warmup] else None
    signature = floor["signature_ms"]
    rate = offered or 0.0

    def ratio(api: float | None, base: float | None) -> float | None:
        return round(api / base, 2) if api is not None and base else None

    result = {
        "candidates": plan.candidates,
        "candidates_requested": requested,
        "requests": len(measured),
        "warmup_requests": plan.warmup,
        "ok": len(ok),
        "errors": len(errors),
        "error_rate": round(len(errors) / len(measured), 5) if measured else None,
        "fallbacks": len(fallbacks),
        "fallback_rate": round(len(fallbacks) / len(measured), 5) if measured else None,
        "fallback_reasons": dict(Counter(str(r.get("reason")) for r in fallbacks)),
        "statuses": dict(statuses),
        "error_samples": sorted({str(r.get("error")) for r in errors})[:5],
        "short_answers": sum(1 for r, q in zip(measured, requests, strict=True)
                             if r.get("status") == 200 and r.get("n_items") != min(q.get("k") or plan.candidates,
                                                                                    plan.candidates)),
        "offered_rps": round(offered, 2) if offered else None,
        "throughput_rps": round(len(ok) / duration, 2) if duration > 0 else None,
        "duration_s": round(duration, 3),
        "latency_ms": latency,
        "latency_model_ranked_ms": _stats([r["latency_ms"] for r in ranked]),
        "latency_fallback_ms": _stats([r["latency_ms"] for r in fallbacks]),
        "latency_from_schedule_ms": _stats([r["from_schedule_ms"] for r in measured if "from_schedule_ms" in r]),
        "client_lag_ms": _stats([r["lag_ms"] for r in measured if "lag_ms" in r], (50, 99)),
        "stages_ms": stage_stats(ranked),
        "stages_ms_fallback": stage_stats(fallbacks),
        "unloaded": unloaded,
        "floor": floor,
        "ratio_to_floor": {"p50": ratio(latency["p50"], signature["p50"]),
                           "p99": ratio(latency["p99"], signature["p99"])},
        "ratio_to_paced_floor": {"p50": ratio(latency["p50"], paced["p50"]), "p99": ratio(latency["p99"], paced["p99"])}
        if (paced := (floor.get("paced") or {}).get("signature_ms")) else None,
        "mix": {"search_share": round(float(np.mean([r["surface"] == "search" for r in requests])), 3),
                "cold_start_share": round(float(np.mean([r["user_id"] not in catalogue.user_states
                                                         for r in requests])), 3),
                "distinct_users": len({r["user_id"] for r in requests}),
                "query_examples": [r["query"] for r in requests if r["surface"] == "search"][:3]},
    }
    result["breakdown_mean_ms"] = {
        "unloaded": breakdown(unloaded["stages_ms"], unloaded["latency_ms"], floor)
        if unloaded and unloaded["latency_ms"]["n"] else None,
        "under_load": breakdown(result["stages_ms"], result["latency_model_ranked_ms"], floor)
        if ranked else None,
    }
    if unloaded and unloaded["latency_ms"]["mean"]:
        # one GIL-bound server: the share of each second its service time takes at the offered rate
        result["estimated_utilization"] = round(rate * unloaded["latency_ms"]["mean"] / 1000, 2)
    return result


#: The additive parts of a mean client latency (``breakdown_mean_ms``), in request order.
BREAKDOWN = {
    "parse": "API: body read, JSON parse and validation (timings total - stages)",
    "features": "API features stage: store fetch + build_inputs",
    "model_signature": "model stage: the SavedModel signature itself (floor mean, no load)",
    "model_wire": "model stage: predict JSON encode, endpoint JSON decode/arrays/encode, response decode "
                  "(in-process means, no load)",
    "model_http": "model stage residual: HTTP hop to the endpoint, event loops, thread pools, GIL contention",
    "rank": "API rank stage: sort and response items",
    "outside_ranker": "client latency - API total: HTTP server, response JSON rendering, loopback, client",
}


def breakdown(stages: dict[str, Any], latency: dict[str, Any], floor: dict[str, Any]) -> dict[str, float]:
    """A mean client latency split into the additive parts of ``BREAKDOWN`` (means add up; percentiles do not),
    plus ``client_latency`` and ``features_in_process`` (store fetch + build_inputs with no load)."""
    parts = floor["in_process_ms"]

    def mean(block: dict[str, Any]) -> float:
        return float(block.get("mean") or 0.0)

    signature = float(floor["signature_ms"]["mean"] or 0.0)
    model_compute = mean(parts["encode_request"]) + mean(parts["endpoint_predict"]) + mean(parts["decode_response"])
    split = {
        "client_latency": mean(latency),
        "parse": mean(stages["parse"]),
        "features": mean(stages["features"]),
        "features_in_process": mean(parts["store_fetch"]) + mean(parts["build_inputs"]),
        "model_signature": signature,
        "model_wire": model_compute - signature,
        "model_http": mean(stages["model"]) - model_compute,
        "rank": mean(stages["rank"]),
        "outside_ranker": mean(stages["outside_ranker"]),
    }
    return {name: round(value, 3) for name, value in split.items()}


def _where_time_goes(results: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for result in results:
        for label, parts in result["breakdown_mean_ms"].items():
            if not parts:
                continue
            total = parts["client_latency"] or float("nan")
            top = sorted(((parts[k], k) for k in BREAKDOWN), reverse=True)
            lines.append(f"{result['candidates']} candidates, {label.replace('_', ' ')} (model-ranked answers): mean "
                         f"{total:.2f} ms = " + ", ".join(f"{k} {v:.2f} ({100 * v / total:.0f}%)" for v, k in top))
        paced = result["floor"].get("paced")
        if paced:
            back, idle = result["floor"]["signature_ms"], paced["signature_ms"]
            predict = result["floor"]["in_process_ms"]["endpoint_predict"]
            lines.append(f"{result['candidates']} candidates: called after idle pauses like the load's (mean "
                         f"{paced['mean_gap_ms']:g} ms), the signature takes p50 {idle['p50']} ms (back to back "
                         f"{back['p50']}) and the endpoint's predict path p50 {paced['endpoint_predict_ms']['p50']} "
                         f"ms (back to back {predict['p50']})"
                         + (": a core that was idle wakes slower and colder" if idle["p50"] > back["p50"] else ""))
        alone = result.get("endpoint_alone")
        if alone and alone["latency_ms"]["p99"] is not None:
            lines.append(f"{result['candidates']} candidates: the endpoint alone, sent the API's predict bodies "
                         f"({alone['request_body_kb']} KB) at the same arrival times, answers in p50 "
                         f"{alone['latency_ms']['p50']} ms, p99 {alone['latency_ms']['p99']} ms ({alone['errors']} "
                         f"errors), against the API's p50 {result['latency_ms']['p50']} ms, p99 "
                         f"{result['latency_ms']['p99']} ms")
        floor = result.get("transport_floor")
        if floor and floor["latency_ms"]["p99"] is not None:
            lines.append(f"{result['candidates']} candidates: through an API and an endpoint that do no ranking work "
                         f"(the same stacks and arrivals, the API's model client, {floor['predict_body_kb']} KB "
                         f"predict bodies, canned answers), requests take p50 "
                         f"{floor['latency_ms']['p50']} ms, p99 {floor['latency_ms']['p99']} ms ({floor['errors']} "
                         "errors): the transport floor")
        if result.get("estimated_utilization") is not None:
            unloaded_mean = result["unloaded"]["latency_ms"]["mean"]
            lines.append(f"{result['candidates']} candidates: {result['offered_rps']} req/s x unloaded mean "
                         f"{unloaded_mean} ms = utilization ~{result['estimated_utilization']} of one GIL-bound "
                         f"server; {result['fallbacks']} of {result['requests']} answers were fallbacks "
                         f"{result['fallback_reasons'] or ''}".rstrip())
    return lines


def evaluate_target(results: Sequence[dict[str, Any]], rate: float) -> dict[str, Any]:
    target = dict(TARGET)
    match = next((r for r in results if r["candidates"] == TARGET["candidates"]), None)
    if match is None or abs(rate - TARGET["rate_rps"]) > 1e-9:
        return {**target, "met": None, "detail": f"not measured at the target's conditions ({TARGET['candidates']} "
                                                 f"candidates at {TARGET['rate_rps']:.0f} req/s)"}
    p99 = match["latency_ms"]["p99"]
    met = p99 is not None and p99 <= TARGET["p99_ms"] and match["errors"] == 0 and match["fallbacks"] == 0
    # the model stage alone, and the stacks and the machine alone, at this rate: lower bounds for the API's
    for phase in ("endpoint_alone", "transport_floor"):
        bound = (match.get(phase) or {}).get("latency_ms", {}).get("p99")
        if bound is not None:
            target[f"{phase}_p99_ms"] = bound
    return {**target, "met": met, "measured_p99_ms": p99, "measured_errors": match["errors"],
            "measured_fallbacks": match["fallbacks"], "measured_throughput_rps": match["throughput_rps"],
            "detail": f"p99 {p99} ms vs {TARGET['p99_ms']} ms, {match['errors']} errors, {match['fallbacks']} "
                      f"fallbacks at {match['throughput_rps']} req/s"}


# ---------------------------------------------------------------------------------------------- environment

def machine_info() -> dict[str, Any]:
    cpu_model, ram_gib = platform.processor() or None, None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = round(int(line.split()[1]) / 2**20, 1)
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": os.cpu_count(), "usable_cores": usable, "cpu_model": cpu_model, "ram_gib": ram_gib,
            "platform": platform.platform()}


def versions() -> dict[str, Any]:
    from importlib import metadata
    from importlib.util import find_spec

    out: dict[str, Any] = {"python": platform.python_version()}
    for package in ("tensorflow", "numpy", "aiohttp", "orjson", "uvicorn", "uvloop", "httptools", "fastapi",
                    "starlette"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    out["uvloop_installed"] = find_spec("uvloop") is not None
    out["httptools_installed"] = find_spec("httptools") is not None
    return out


@contextlib.contextmanager
def _api_log(path: Path) -> Iterator[Path]:
    """The API's request log lines go to ``path`` (their cost is part of serving), not to the console."""
    from serving.app import JsonFormatter

    logger = logging.getLogger("marketrank.serving")
    handler = logging.FileHandler(path)
    handler.setFormatter(JsonFormatter())
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield path
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
        logger.propagate = propagate


def _log_problems(path: Path, limit: int = 5) -> list[str]:
    """Non-request lines of the API log (warnings, errors), the first few."""
    problems = []
    with contextlib.suppress(OSError), path.open() as lines:
        for line in lines:
            if '"event": "rank"' not in line:
                problems.append(line.strip()[:300])
                if len(problems) >= limit:
                    break
    return problems


# ---------------------------------------------------------------------------------------------- the benchmark

def _cpu_usage(since: tuple | None = None, model_pid: int | None = None, sidecar_pids: Sequence[int] = ()) -> Any:
    """(wall, this process's CPU s, waited-for children's CPU s, the model server process's CPU s, the endpoint
    sidecar's, machine jiffies); with ``since``: the cores each used meanwhile."""
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    now = (time.perf_counter(), me.ru_utime + me.ru_stime, children.ru_utime + children.ru_stime,
           _process_cpu_s(model_pid), sum(map(_process_cpu_s, sidecar_pids)), *_machine_jiffies())
    if since is None:
        return now
    wall = max(now[0] - since[0], 1e-9)
    out = {"servers_process_cores": round((now[1] - since[1]) / wall, 2),
           "client_process_cores_incl_startup": round((now[2] - since[2]) / wall, 2), "phase_wall_s": round(wall, 2)}
    if model_pid is not None:
        out["model_server_process_cores"] = round((now[3] - since[3]) / wall, 2)
    if sidecar_pids:
        out["sidecar_process_cores"] = round((now[4] - since[4]) / wall, 2)
    busy, total = now[5] - since[5], now[6] - since[6]
    if total > 0:  # the whole machine, from /proc/stat: a busy neighbour shows up as other_processes_cores
        machine = busy / total * (os.cpu_count() or 1)
        ours = sum(v for k, v in out.items() if k.endswith(("_cores", "_cores_incl_startup")))
        out.update(machine_busy_cores=round(machine, 2), other_processes_cores=round(max(machine - ours, 0.0), 2))
    return out


def _process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a running process (Linux /proc); 0 where unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (float(fields[11]) + float(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def _child_pids(pid: int) -> tuple[int, ...]:
    """Every process whose parent is ``pid`` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return tuple(found)


def _wait_quiet(max_s: float = 30.0, busy_cores: float = 0.3, window_s: float = 0.25) -> float:
    """Seconds waited (at most ``max_s``) until the machine's busy cores over a window drop below ``busy_cores``."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        before = _machine_jiffies()
        time.sleep(window_s)
        after = _machine_jiffies()
        total = after[1] - before[1]
        if total <= 0 or (after[0] - before[0]) / total * (os.cpu_count() or 1) < busy_cores:
            break
    return round(time.monotonic() - started, 2)


def _machine_jiffies() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine since boot; (0, 0) where /proc/stat is missing."""
    try:
        fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError, IndexError):
        return 0.0, 0.0
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _check(name: str, value: float, high: float, *, allow_zero: bool = False) -> None:
    if not ((value >= 0 if allow_zero else value > 0) and value <= high):
        raise ValueError(f"{name} must be in {'[' if allow_zero else '('}0, {high}], got {value}")


def run_serving_benchmark(home: Path, *, candidates: Sequence[int] = (50, 300, 1000), rate: float = 100.0,
                          seconds: float = 20.0, warmup_seconds: float = 3.0, endpoint: str = "marketrank",
                          budget_ms: float = 150.0, out: Path | None = None, seed: int = 7,
                          arrivals: str = "poisson", k: int | None = None, floor_calls: int = 200,
                          unloaded_requests: int = 50, client_process: bool = True, model_server: str = "thread",
                          endpoint_alone: bool = True, transport_floor: bool = True,
                          progress: Callable[[str], None] | None = None
                          ) -> dict[str, Any]:
    """Benchmark the ranking API over the workspace ``home`` (see the module doc); the report dict.
    ``endpoint_alone``: after each load, the same arrivals straight to the model endpoint (``_endpoint_alone``).
    ``transport_floor``: then through an API and an endpoint that do no ranking work (``_transport_floor``).

    Writes ``out/serving.json`` and ``out/serving_latency.png`` when ``out`` is given.
    """
    note = progress or (lambda message: log.info("%s", message))
    candidates = [int(n) for n in candidates]
    if not candidates or any(n < 1 for n in candidates):
        raise ValueError(f"candidates must be positive counts, got {candidates}")
    _check("rate", rate, MAX_RATE)
    _check("seconds", seconds, MAX_SECONDS)
    _check("warmup_seconds", warmup_seconds, MAX_SECONDS, allow_zero=True)
    if rate * (seconds + warmup_seconds) > MAX_REQUESTS_PER_PHASE:
        raise ValueError(f"rate x (seconds + warmup_seconds) is over {MAX_REQUESTS_PER_PHASE} requests per phase")
    if not 0 <= unloaded_requests <= 10_000:
        raise ValueError(f"unloaded_requests must be in [0, 10000], got {unloaded_requests}")
    if not 1 <= floor_calls <= 10_000:
        raise ValueError(f"floor_calls must be in [1, 10000], got {floor_calls}")
    if k is not None and k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if model_server not in ("thread", "process"):
        raise ValueError(f"model_server: expected 'thread' or 'process', got {model_server!r}")
    if arrivals not in ("poisson", "uniform"):
        raise ValueError(f"arrivals: expected 'poisson' or 'uniform', got {arrivals!r}")

    from serving import app as api
    from serving import heap, local_endpoint, wire
    from serving.feature_store import open_store
    from serving.servers import running, running_process

    endpoint_env = _endpoint_environ(model_server)

    started = time.time()
    loadavg_before = os.getloadavg()
    workspace = open_workspace(Path(home), endpoint)
    note(f"model {workspace.model_name} ({workspace.model_dir.name}); store {workspace.store_path}"
         + (" (materialized now)" if workspace.materialized_now else ""))
    catalogue = Catalogue.load(workspace.store_path, workspace.raw_dir)
    store = open_store("embedded", workspace.store_path)
    spec = store.get_spec()
    settings = None
    results: list[dict[str, Any]] = []
    log_problems: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="marketrank-bench-") as tmp_name, contextlib.ExitStack() as stack:
            tmp = Path(tmp_name)
            stack.enter_context(_api_log(tmp / "api.log"))
            if model_server == "thread":  # as `marketrank serve --model-server thread`
                model_app = local_endpoint.create_app(workspace.home / "models", workspace.manifest, tmp / "capture")
                model_url, model_pid = stack.enter_context(running(model_app, HOST, 0)), None
                sidecar = model_app.state.endpoint.sidecar
                sidecar_pids = (sidecar.pid,) if sidecar else ()
            else:  # as production: the model server is another process
                model_url, model_pid = stack.enter_context(running_process(
                    workspace.home / "models", workspace.manifest, tmp / "capture", HOST))
                sidecar_pids = _child_pids(model_pid)  # the endpoint's sidecar
            settings = api.Settings(feature_store="embedded", store_path=str(workspace.store_path),
                                    model_url=model_url, model_name=endpoint, budget_ms=budget_ms)
            api_app = api.create_app(settings)
            api_url = stack.enter_context(running(api_app, HOST, 0))
            _wait_ready(api_url)
            # the endpoint's predict path in process, for the breakdown; its model call alone is the floor
            servable = local_endpoint.Servable.load(workspace.model_name, int(workspace.model_dir.name),
                                                    workspace.model_dir, local_endpoint.session_config(endpoint_env))
            # The API runs in this process, which now holds TensorFlow for the floor (the real API never does):
            # freeze it too, or full GC passes over TF's objects (~200 ms) would land inside the API's requests.
            heap.settle("loading the floor models")
            servers = _Servers(api_url, api_app, servable, store, spec, catalogue, tmp, client_process, note,
                               model_pid, sidecar_pids, model_url if endpoint_alone else None,
                               wire.predict_path(endpoint), transport_floor)
            for requested in candidates:
                n = min(requested, len(catalogue.items), settings.max_candidates)
                plan = build_plan(catalogue, n, rate, seconds, warmup_seconds, seed, arrivals, k)
                results.append(_run_phase(servers, plan, requested, floor_calls, unloaded_requests))
            stack.close()
            log_problems = _log_problems(tmp / "api.log")
    finally:
        store.close()

    report = {
        "benchmark": "serving",
        "created": datetime.fromtimestamp(started, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "seconds": round(time.time() - started, 1),
        "target": evaluate_target(results, rate),
        "results": results,
        "where_time_goes": _where_time_goes(results),
        "machine": {**machine_info(), "loadavg_before": [round(x, 2) for x in loadavg_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "tf_model_threads": local_endpoint.thread_settings(endpoint_env) or "TensorFlow's defaults"},
        "versions": versions(),
        "settings": {
            "candidates": list(candidates), "rate_rps": rate, "seconds": seconds, "warmup_seconds": warmup_seconds,
            "arrivals": arrivals, "seed": seed, "k": k, "floor_calls": floor_calls,
            "unloaded_requests": unloaded_requests, "endpoint": endpoint, "endpoint_alone": endpoint_alone,
            "transport_floor": transport_floor,
            "budget_ms": budget_ms, "host": HOST,
            "client": {"process": "child process" if client_process else "in the servers' process",
                       "library": "aiohttp.ClientSession on uvloop", "keep_alive": True,
                       "max_connections": CLIENT_CONNECTIONS,
                       "keepalive_expiry_s": CLIENT_KEEPALIVE_S,
                       "timeout_s": REQUEST_TIMEOUT_S,
                       "latency": "from the send to the full response body (latency_ms); from the scheduled send "
                                  "(latency_from_schedule_ms) also counts client lag"},
            "model_server": model_server,
            "cpu_note": "cores = CPU seconds per wall second during the open-loop phase; servers_process = this "
                        "process (API, and the endpoint with model_server=thread); model_server_process_cores: the "
                        "endpoint's process with model_server=process; sidecar_process_cores: the endpoint's sidecar "
                        "process (shadow variant and data capture)",
            "servers": ("local endpoint + ranking API in this process, uvicorn in threads (as `marketrank serve`)"
                        if model_server == "thread" else "ranking API in this process (uvicorn in a thread), local "
                        "endpoint in a child process (uvicorn, as TF Serving runs beside the API in production)")
                       + "; data capture to a temporary dir; API request log to a temporary file",
            "api": dataclasses.asdict(settings) if settings else None,
        },
        "workspace": {
            "home": str(workspace.home), "dataset": workspace.dataset, "endpoint_state": workspace.state,
            "features_fingerprint": workspace.features_fingerprint,
            "model": {"name": workspace.model_name, "version": workspace.model_dir.name,
                      "path": str(workspace.model_dir)},
            "store": {"path": str(workspace.store_path), "materialized_now": workspace.materialized_now,
                      "items": len(catalogue.items), "users": len(catalogue.user_states),
                      "features": len(spec.features) if spec else None},
            "users": {"count": len(catalogue.users), "source": catalogue.users_source},
            "shadow_variant_active": bool(workspace.state.get("shadow")),
        },
        "api_log_problems": log_problems,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / JSON_FILE).write_text(json.dumps(report, indent=2))
        plot(report, out / PNG_FILE)
    return report


@dataclasses.dataclass
class _Servers:
    api_url: str
    api_app: Any
    servable: Any
    store: Any
    spec: Any
    catalogue: Catalogue
    workdir: Path
    client_process: bool
    note: Callable[[str], None]
    model_pid: int | None = None  # the local endpoint's process, when it runs in one
    sidecar_pids: tuple[int, ...] = ()  # the endpoint's sidecar: shadow variant and data capture
    #: The endpoint's base URL and predict route: the endpoint-alone phase drives it with the API's bodies.
    model_url: str | None = None
    predict_path: str | None = None
    transport_floor: bool = False  # also drive the no-work API and endpoint (``serving.transport_floor``)

    def wait_breaker_closed(self) -> float:
        """Seconds waited for an open breaker (a previous phase's) to reach half-open; the next request probes."""
        breaker = self.api_app.state.runtime.breaker
        started = time.monotonic()
        while breaker.state == breaker.OPEN and time.monotonic() - started < breaker.reset_timeout_s + 2:
            time.sleep(0.1)
        return round(time.monotonic() - started, 2)


def _run_phase(servers: _Servers, plan: Plan, requested: int, floor_calls: int, unloaded_requests: int
               ) -> dict[str, Any]:
    """One candidate count: unloaded requests one at a time, the open-loop load, then the floor."""
    n, note = plan.candidates, servers.note
    bodies = plan.bodies()
    unloaded = None
    waited = servers.wait_breaker_closed()
    if unloaded_requests:
        sequence = (bodies[plan.warmup:] * (1 + (unloaded_requests + UNLOADED_WARM) // max(len(bodies), 1)))
        note(f"{n} candidates: {unloaded_requests} requests one at a time (unloaded)")
        records = run_load(servers.api_url, sequence[: unloaded_requests + UNLOADED_WARM], None, servers.workdir,
                           servers.client_process)
        unloaded = summarize_unloaded(records, UNLOADED_WARM)
        waited += servers.wait_breaker_closed()
    note(f"{n} candidates: {len(plan.requests) - plan.warmup} requests (open loop) after {plan.warmup} warm-up "
         "requests")
    usage = _cpu_usage(model_pid=servers.model_pid, sidecar_pids=servers.sidecar_pids)
    records = run_load(servers.api_url, bodies, plan.offsets, servers.workdir, servers.client_process)
    cpu = _cpu_usage(usage, servers.model_pid, servers.sidecar_pids)
    breaker = servers.api_app.state.runtime.breaker.state
    quiet = _wait_quiet()  # cancelled model calls and queued data capture finish before the floor is timed
    note(f"{n} candidates: floor ({floor_calls} signature calls)")
    floor = measure_floor(servers.servable, servers.store, servers.spec, plan.requests[plan.warmup:], floor_calls,
                          plan.rate, now_ms=servers.api_app.state.runtime.now_ms())
    result = summarize_phase(plan, requested, records, floor, servers.catalogue, unloaded)
    if servers.model_url and servers.predict_path:
        result["endpoint_alone"] = _endpoint_alone(servers, plan)
    if servers.transport_floor:
        result["transport_floor"] = _transport_floor(servers, plan)
    result["cpu"] = {**cpu, "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    result["breaker"] = {"state_after_load": breaker, "waited_s": waited}
    result["floor"]["quiet_wait_s"] = quiet
    note(f"{n} candidates: p50 {result['latency_ms']['p50']} ms, p99 {result['latency_ms']['p99']} ms, "
         f"{result['throughput_rps']} req/s, {result['errors']} errors, {result['fallbacks']} fallbacks"
         f"{' ' + str(result['fallback_reasons']) if result['fallbacks'] else ''}; unloaded p50 "
         f"{unloaded['latency_ms']['p50'] if unloaded else None} ms; floor p50 {floor['signature_ms']['p50']} ms")
    return result


def _endpoint_alone(servers: _Servers, plan: Plan) -> dict[str, Any]:
    """The same open loop sent straight to the model endpoint: each request's predict body as the API would
    send it (built before the load; at most ``ALONE_BODIES`` distinct ones, cycled), at the same arrival times.
    Its latency is the model stage at this rate with nothing in front of it: a lower bound for the API's, up
    to run-to-run noise. A failure is recorded in the result instead of ending the benchmark."""
    servers.note(f"{plan.candidates} candidates: the endpoint alone, {len(plan.requests) - plan.warmup} predict "
                 "requests at the same arrival times")
    out: dict[str, Any] = {"requests": len(plan.requests) - plan.warmup, "ok": 0, "errors": None,
                           "latency_ms": _stats([])}
    try:
        now_ms = servers.api_app.state.runtime.now_ms()  # the API's own clock (its store's as-of time)
        pool = [predict_body(servers.store, servers.spec, request, now_ms)["raw"].decode()
                for request in plan.requests[:ALONE_BODIES]]
        out["quiet_wait_before_s"] = _wait_quiet()
        records = run_load(servers.model_url, pool, plan.offsets, servers.workdir, servers.client_process,
                           path=servers.predict_path, health="/ping",
                           order=[i % len(pool) for i in range(len(plan.requests))])[plan.warmup:]
    except Exception as err:  # noqa: BLE001 - a diagnostic phase: keep the API's results whatever happens here
        log.exception("the endpoint-alone phase failed")
        out["error"] = f"{type(err).__name__}: {err}"[:300]
        records = None
    out["quiet_wait_after_s"] = _wait_quiet()  # the sidecar's shadow copies drain before the next phase
    if records is None:
        return out
    return {**out, **_answered(records), "distinct_bodies": len(pool),
            "request_body_kb": round(float(np.mean([len(b) for b in pool])) / 1024, 1)}


def _transport_floor(servers: _Servers, plan: Plan) -> dict[str, Any]:
    """The same open loop (arrivals and rank bodies) through the no-work API and endpoint of
    ``serving.transport_floor`` (the endpoint in a process or a thread, as the real one runs; the model call
    within the API's budget), answering with canned bodies of this load's sizes: the first request's model
    inputs and the model's predict response to them, and a rank answer of its candidates. A failure is recorded
    in the result instead of ending the benchmark."""
    from serving import transport_floor, wire
    from serving.backends import scores_from_body

    servers.note(f"{plan.candidates} candidates: the transport floor, {len(plan.requests) - plan.warmup} requests "
                 "at the same arrival times through an API and an endpoint that do no ranking work")
    out: dict[str, Any] = {"requests": len(plan.requests) - plan.warmup, "ok": 0, "errors": None,
                           "latency_ms": _stats([]), "endpoint": "child process" if servers.model_pid else "thread"}
    runtime = servers.api_app.state.runtime
    try:
        request = plan.requests[0]
        batch = predict_body(servers.store, servers.spec, request, runtime.now_ms())
        model_answer = wire.encode(servers.servable.predict(wire.decode(batch["raw"])))
        scores = scores_from_body(wire.decode(model_answer), len(batch["inputs"]["mask"][0]))
        items = [{"item_id": item, "score": float(score), "rank": rank + 1}
                 for rank, (item, score) in enumerate(zip(request["candidates"], scores, strict=False))]
        api_answer = wire.encode({"request_id": "transport-floor", "items": items,
                                  "model": {"name": servers.servable.name, "version": str(servers.servable.version),
                                            "variant": "AllTraffic"}, "fallback": False, "reason": None,
                                  "unknown_items": [], "timings_ms": dict.fromkeys(STAGES, 0.0)})
        with transport_floor.serving(batch["inputs"], model_answer, api_answer, servers.workdir, HOST,
                                     runtime.settings.budget_ms / 1000, endpoint_process=bool(servers.model_pid)
                                     ) as url:
            out["quiet_wait_before_s"] = _wait_quiet()
            records = run_load(url, plan.bodies(), plan.offsets, servers.workdir, servers.client_process)
    except Exception as err:  # noqa: BLE001 - a diagnostic phase: keep the API's results whatever happens here
        log.exception("the transport-floor phase failed")
        return {**out, "error": f"{type(err).__name__}: {err}"[:300]}
    return {**out, **_answered(records[plan.warmup:]), "predict_body_kb": round(len(batch["raw"]) / 1024, 1),
            "answer_kb": round(len(api_answer) / 1024, 1)}


def _answered(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A diagnostic phase's counts and the latency of its 200 answers (the endpoint alone, the transport floor)."""
    ok = [r for r in records if r.get("status") == 200]
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok),
            "error_samples": sorted({r.get("error") or str(r.get("status")) for r in records
                                     if r.get("status") != 200})[:3],
            "latency_ms": _stats([r["latency_ms"] for r in ok])}


def _endpoint_environ(model_server: str) -> dict[str, str]:
    """The environment the local endpoint runs with: in its own process ``servers.process_environ()``; in a thread
    of this process, this one's."""
    from serving.servers import process_environ

    return process_environ() if model_server == "process" else dict(os.environ)


def _wait_ready(api_url: str, timeout_s: float = 30.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=api_url, trust_env=False, timeout=5.0) as client:
        while True:
            response = client.get("/readyz")
            if response.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the ranking API is not ready after {timeout_s:.0f} s: {response.text[:500]}")
            time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- chart and CLI

def plot(report: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and the floor vs candidate count; the mean latency's breakdown per count."""
    import matplotlib.ticker

    from serving.charts import pyplot, save_figure

    plt = pyplot()

    results = report["results"]
    xs = [r["candidates"] for r in results]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 6))
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-"), ("max", "x:")):
        left.plot(xs, [r["latency_ms"][key] for r in results], style, label=f"API {key} (all answers)")
    if all(r.get("unloaded") for r in results):
        for key, style in (("p50", "o-."), ("p99", "^-.")):
            left.plot(xs, [r["unloaded"]["latency_ms"][key] for r in results], style, color="tab:purple", alpha=0.7,
                      label=f"API {key} unloaded (one at a time)")
    left.plot(xs, [r["floor"]["signature_ms"]["p50"] for r in results], "o--", color="gray", label="floor p50")
    left.plot(xs, [r["floor"]["signature_ms"]["p99"] for r in results], "^--", color="black", label="floor p99")
    left.axhline(TARGET["p99_ms"], color="red", lw=0.8, ls="-.", label=f"target p99 {TARGET['p99_ms']:.0f} ms")
    left.set_xscale("log")
    left.set_yscale("log")
    left.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    left.set_xticks(xs, [str(x) for x in xs])
    left.set_xlabel("candidates per request")
    left.set_ylabel("latency (ms)")
    settings = report["settings"]
    left.set_title(f"/v1/rank at {settings['rate_rps']:g} req/s ({settings['arrivals']}), "
                   f"{report['machine']['usable_cores']} cores")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    left.grid(True, which="both", alpha=0.3)
    positions = np.arange(len(results))
    bottom = np.zeros(len(results))
    for index, key in enumerate(BREAKDOWN):
        values = np.array([max((r["breakdown_mean_ms"]["unloaded"] or {}).get(key, 0.0), 0.0) for r in results])
        right.bar(positions, values, width=0.6, bottom=bottom, color=f"C{index}", label=key)
        bottom += values
    for position, top, result in zip(positions, bottom, results, strict=True):
        loaded = result["latency_model_ranked_ms"]
        mean = f"{loaded['mean']:.1f}" if loaded["mean"] is not None else "-"
        right.annotate(f"under load: mean {mean} ms\n"
                       f"({loaded['n']} model-ranked, {result['fallbacks']} fallbacks)",
                       (position, top), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    right.set_ylim(0, max(float(bottom.max()), 1.0) * 1.3)
    right.set_xticks(positions, [str(x) for x in xs])
    right.set_xlabel("candidates per request")
    right.set_ylabel("mean latency, one request at a time (ms)")
    right.set_title("where the time goes (unloaded service time)")
    right.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    return save_figure(figure, path)


def format_table(report: dict[str, Any]) -> str:
    header = (f"{'cands':>5} {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8} {'req/s':>7} {'err':>4} {'fb':>5} "
              f"{'un-p50':>7} {'un-p99':>7} {'feat':>7} {'model':>7} {'rank':>7} {'floor50':>8} {'floor99':>8} "
              f"{'x50':>7} {'x99':>7} {'alone50':>8} {'alone99':>8} {'trans50':>8} {'trans99':>8}")
    lines = [header]
    def cell(value: Any, width: int) -> str:
        return f"{'-' if value is None else value:>{width}}"

    for r in report["results"]:
        lat, st, fl = r["latency_ms"], r["stages_ms"], r["floor"]["signature_ms"]
        unloaded = (r.get("unloaded") or {}).get("latency_ms") or {}
        alone = (r.get("endpoint_alone") or {}).get("latency_ms") or {}
        transport = (r.get("transport_floor") or {}).get("latency_ms") or {}
        lines.append(" ".join([cell(r["candidates"], 5), *(cell(lat[key], 8) for key in ("p50", "p95", "p99", "max")),
                               cell(r["throughput_rps"], 7), cell(r["errors"], 4), cell(r["fallbacks"], 5),
                               cell(unloaded.get("p50"), 7), cell(unloaded.get("p99"), 7),
                               *(cell(st[key]["mean"], 7) for key in ("features", "model", "rank")),
                               cell(fl["p50"], 8), cell(fl["p99"], 8), cell(r["ratio_to_floor"]["p50"], 7),
                               cell(r["ratio_to_floor"]["p99"], 7),
                               *(cell(alone.get(key), 8) for key in ("p50", "p99")),
                               *(cell(transport.get(key), 8) for key in ("p50", "p99"))]))
    target = report["target"]
    verdict = {True: "met", False: "NOT met", None: "n/a"}[target["met"]]
    lines.append(f"target (p99 <= {target['p99_ms']:g} ms at {target['rate_rps']:g} req/s, {target['candidates']} "
                 f"candidates, no errors/fallbacks): {verdict} - {target['detail']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("MARKETRANK_HOME", "workspace")))
    parser.add_argument("--candidates", default="50,300,1000", help="comma-separated candidate counts")
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--endpoint", default="marketrank")
    parser.add_argument("--budget-ms", type=float, default=150.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--arrivals", choices=("poisson", "uniform"), default="poisson")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--floor-calls", type=int, default=200)
    parser.add_argument("--unloaded-requests", type=int, default=50, help="one-at-a-time requests per count")
    parser.add_argument("--inline-client", action="store_true", help="run the load generator in this process")
    parser.add_argument("--model-server", choices=("thread", "process"), default="thread",
                        help="the local endpoint in a thread of this process (as `marketrank serve`) or in a child "
                             "process (as production's separate model server)")
    parser.add_argument("--no-endpoint-alone", action="store_true",
                        help="skip driving the endpoint alone at the same arrivals after each load")
    parser.add_argument("--no-transport-floor", action="store_true",
                        help="skip driving an API and an endpoint that do no ranking work at the same arrivals")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("absl", "tensorflow", "httpx", "serving.local_endpoint"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    report = run_serving_benchmark(
        args.home, candidates=[int(x) for x in args.candidates.split(",") if x.strip()], rate=args.rate,
        seconds=args.seconds, warmup_seconds=args.warmup_seconds, endpoint=args.endpoint, budget_ms=args.budget_ms,
        out=args.out, seed=args.seed, arrivals=args.arrivals, k=args.k, floor_calls=args.floor_calls,
        unloaded_requests=args.unloaded_requests, client_process=not args.inline_client,
        model_server=args.model_server, endpoint_alone=not args.no_endpoint_alone,
        transport_floor=not args.no_transport_floor)
    print(format_table(report))
    for line in report["where_time_goes"]:
        print(line)
    if args.out:
        print(f"report {args.out / JSON_FILE}, chart {args.out / PNG_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
