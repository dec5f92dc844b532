"""The local endpoint as a real HTTP server (uvicorn in a thread, httpx): hot reload, manifest-driven variants,
shadow copies and data capture, readiness and errors.

Model A is the session's exported model; model B is a stand-in with the same signature that scores every real
item ``B_SCORE``, so an answer shows which model gave it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest

from pipelines import deploy
from serving import local_endpoint, servers, wire

pytestmark = pytest.mark.slow

B_SCORE = 7.0
ENDPOINT = "shop"


@pytest.fixture(scope="module")
def model(tiny_run, tmp_path_factory) -> dict:
    """Model A's export dir, model B's, a test batch and both models' expected scores for it."""
    import tensorflow as tf

    from training import export
    from training.data import iter_batches
    from training.feature_spec import MASK

    export_dir = tiny_run["export_dir"]
    spec = export.load_spec(export_dir)
    batch = next(iter_batches(tiny_run["features"] / "test", spec, 2, list_size=None))
    inputs = {name: batch[name] for name in [*spec.names, MASK]}

    class Constant(tf.Module):
        @tf.function(input_signature=[export.input_signature(spec)])
        def serve(self, features):
            return {export.OUTPUT: tf.where(features[MASK], tf.constant(B_SCORE), tf.constant(export.PAD_SCORE))}

    constant = Constant()
    b_dir = tmp_path_factory.mktemp("model-b") / "1"
    tf.saved_model.save(constant, str(b_dir), signatures={wire.SIGNATURE: constant.serve})
    signature = tf.saved_model.load(str(export_dir)).signatures[wire.SIGNATURE]
    a_scores = signature(**{name: tf.constant(value) for name, value in inputs.items()})[wire.OUTPUT].numpy()
    b_scores = np.where(inputs[MASK], B_SCORE, export.PAD_SCORE)
    return {"a": export_dir, "b": b_dir, "version": int(export_dir.name), "inputs": inputs,
            "request": wire.encode(wire.predict_request(inputs)), "a_scores": a_scores, "b_scores": b_scores}


def install(src: Path, models: Path, name: str, version: int) -> Path:
    """Copy a SavedModel in as ``<models>/<name>/<version>`` the way training.export does: staged, then renamed."""
    staging = models / name / f".{version}.tmp"
    shutil.copytree(src, staging)
    return staging.rename(models / name / str(version))


def wait_for(check, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s: {check.__doc__ or check}")
        time.sleep(0.05)
    return result


def scores(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return wire.parse_scores(response.json())


def status_version(http: httpx.Client, name: str) -> str | None:
    response = http.get(f"/v1/models/{name}")
    return response.json()["model_version_status"][0]["version"] if response.status_code == 200 else None


def close(actual: np.ndarray, expected: np.ndarray) -> bool:
    return actual.shape == expected.shape and np.allclose(actual, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- model server


def test_hot_reload_swaps_in_new_versions_without_dropping_requests(model, tmp_path) -> None:
    models, version = tmp_path / "models", model["version"]
    install(model["a"], models, "ranker", version)
    app = local_endpoint.create_app(models, None, None, poll_seconds=0.2)
    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert status_version(http, "ranker") == str(version)
        assert close(scores(http.post(wire.predict_path("ranker"), content=model["request"])), model["a_scores"])

        failures, served, stop = [], [0], threading.Event()

        def keep_predicting() -> None:
            with httpx.Client(base_url=url, timeout=30) as own:
                while not stop.is_set():
                    try:  # a dropped connection must fail the test, not end this thread with a warning
                        response = own.post(wire.predict_path("ranker"), content=model["request"])
                    except Exception as err:  # noqa: BLE001
                        failures.append(repr(err))
                        continue
                    served[0] += 1
                    if response.status_code != 200:
                        failures.append(response.text)

        load = threading.Thread(target=keep_predicting)
        load.start()
        try:
            # half-written versions are never loaded: a staging dir, and a version dir without saved_model.pb
            (models / "ranker" / f".{version + 5}.tmp").mkdir()
            (models / "ranker" / f".{version + 5}.tmp" / "saved_model.pb").write_bytes(b"half written")
            (models / "ranker" / str(version + 6)).mkdir()
            wait_for(lambda: served[0] > 0, timeout=8)
            started, before = time.monotonic(), served[0]
            install(model["b"], models, "ranker", version + 1)
            wait_for(lambda: status_version(http, "ranker") == str(version + 1), timeout=8)
            assert time.monotonic() - started < 8
            during = served[0] - before
        finally:
            stop.set()
            load.join()
        assert failures == [] and during > 0  # requests were answered while the new version loaded

        assert close(scores(http.post(wire.predict_path("ranker"), content=model["request"])), model["b_scores"])
        assert close(scores(http.post(wire.predict_path("ranker", version + 1), content=model["request"])),
                     model["b_scores"])
        # TF Serving's latest policy serves one version: the old one is gone
        assert http.post(wire.predict_path("ranker", version), content=model["request"]).status_code == 404

        shutil.rmtree(models / "ranker" / str(version + 1))  # removed: back to the highest remaining version
        wait_for(lambda: status_version(http, "ranker") == str(version), timeout=8)
        assert close(scores(http.post(wire.predict_path("ranker"), content=model["request"])), model["a_scores"])


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    models = tmp_path_factory.mktemp("served")
    install(model["a"], models, "ranker", model["version"])
    app = local_endpoint.create_app(models, None, None, poll_seconds=30)
    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http


def _bad_inputs(inputs: dict) -> list[tuple[str, dict, str]]:
    """(case, inputs, the input name the 400 must name)."""
    return [
        ("unknown input", {**inputs, "bogus": [1.0, 2.0]}, "bogus"),
        ("missing input", {k: v for k, v in inputs.items() if k != "mask"}, "mask"),
        ("float mask", {**inputs, "mask": inputs["mask"].astype(np.float32)}, "mask"),
        ("numbers for a string feature", {**inputs, "surface": [1.0, 2.0]}, "surface"),
        ("strings for a float feature", {**inputs, "views": np.full(inputs["views"].shape, "x", dtype=object)},
         "views"),
        ("context feature with an item axis", {**inputs, "user_history": [[1.0], [2.0]]}, "user_history"),
        ("item feature without one", {**inputs, "price_gap": [1.0, 2.0]}, "price_gap"),
        ("ragged item feature", {**inputs, "likes": [[1.0, 2.0], [1.0]]}, "likes"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_inputs_are_400s_that_name_the_input(served, model, case) -> None:
    name, inputs, culprit = _bad_inputs(model["inputs"])[case]
    assert culprit in {*model["inputs"], "bogus"}, "the test batch lost a feature it relies on"
    response = served.post(wire.predict_path("ranker"), content=wire.encode(wire.predict_request(inputs)))
    assert response.status_code == 400, (name, response.text)
    assert f"'{culprit}'" in response.json()["error"], (name, response.json())


def test_other_bad_requests_are_400s(served, model) -> None:
    short = {**model["inputs"], "user_history": model["inputs"]["user_history"][:1]}
    cases = [wire.encode(wire.predict_request(short)),  # the inputs disagree on the batch size
             wire.encode(wire.predict_request(model["inputs"], signature_name="classify")),
             wire.encode({"instances": "not rows"}), b"[1, 2]", b"{"]
    for body in cases:
        response = served.post(wire.predict_path("ranker"), content=body)
        assert response.status_code == 400 and set(response.json()) == {"error"}, (body[:40], response.text)


def test_unknown_models_versions_and_paths_are_404s(served, model) -> None:
    for response in (served.post(wire.predict_path("nope"), content=model["request"]),
                     served.post(wire.predict_path("ranker", 1), content=model["request"]),
                     served.get("/v1/models/nope"), served.get("/v1/models/nope/metadata"),
                     served.get("/v1/models/ranker/labels/stable"), served.post("/v1/models/ranker:classify")):
        assert response.status_code == 404, response.text
        assert set(response.json()) == {"error"}
    assert "nope" in served.get("/v1/models/nope").json()["error"]
    # routing's own 404 / 405 are TF Serving's JSON error too, not Starlette's plain text
    for response, status in ((served.get("/nope"), 404), (served.get("/invocations"), 405),
                             (served.post("/ping"), 405)):
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    assert "POST" in served.get("/invocations").headers["allow"]
    # no manifest: the SageMaker side answers, but is not ready
    assert served.get("/ping").status_code == 503
    assert served.post("/invocations", content=model["request"]).status_code == 503


# ---------------------------------------------------------------------------------------------- endpoint


def test_variants_follow_the_manifest_with_shadow_capture_and_live_promotion(model, tmp_path) -> None:
    models, capture = tmp_path / "models", tmp_path / "capture"
    install(model["a"], models, "model-a", model["version"])
    install(model["b"], models, "model-b", 1)
    backend = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    deploy.deploy_shadow(backend, deploy.Variant("model-a"))
    deploy.deploy_shadow(backend, deploy.Variant("model-b", weight=1.0))
    app = local_endpoint.create_app(models, backend.path, capture, poll_seconds=0.2)
    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        ping = http.get("/ping")
        assert ping.status_code == 200 and ping.json()[deploy.PRODUCTION]["model_name"] == "model-a"

        answers = []
        for inference_id in ("req-1", None):
            headers = {local_endpoint.INFERENCE_ID_HEADER: inference_id} if inference_id else {}
            response = http.post("/invocations", content=model["request"], headers=headers)
            assert response.headers[local_endpoint.VARIANT_HEADER] == deploy.PRODUCTION
            assert close(scores(response), model["a_scores"])  # the production variant answers
            answers.append(response.content)

        def records(variant: str) -> list[dict]:
            return local_endpoint.read_capture(capture, ENDPOINT, variant)

        wait_for(lambda: len(records(deploy.PRODUCTION)) == 2 and len(records(deploy.SHADOW)) == 2, timeout=30)
        production, shadow = records(deploy.PRODUCTION), records(deploy.SHADOW)
        for record in production + shadow:
            assert set(record) == {"captureData", "eventMetadata", "eventVersion"} and record["eventVersion"] == "0"
            assert set(record["captureData"]) == {"endpointInput", "endpointOutput"}
            for key, mode in (("endpointInput", "INPUT"), ("endpointOutput", "OUTPUT")):
                assert record["captureData"][key] | {"data": None} == {
                    "observedContentType": "application/json", "mode": mode, "data": None, "encoding": "JSON"}
            assert record["captureData"]["endpointInput"]["data"] == model["request"].decode()
            meta = record["eventMetadata"]
            uuid.UUID(meta["eventId"])
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", meta["inferenceTime"])
            assert isinstance(meta[local_endpoint.LATENCY_KEY], float) and meta[local_endpoint.LATENCY_KEY] >= 0
        assert [r["captureData"]["endpointOutput"]["data"].encode() for r in production] == answers
        for record in shadow:
            assert record["eventMetadata"][local_endpoint.MODEL_KEY] == "model-b"
            assert close(wire.parse_scores(wire.decode(record["captureData"]["endpointOutput"]["data"])),
                         model["b_scores"])
        ids = [r["eventMetadata"].get("inferenceId") for r in production]
        assert ids == ["req-1", None]  # as on SageMaker: captured without an id when the caller sent none
        assert ids == [r["eventMetadata"].get("inferenceId") for r in shadow]  # the shadow's copies: the same
        assert len({r["eventMetadata"]["eventId"] for r in production + shadow}) == 4

        # SageMaker's S3 layout: <endpoint>/<variant>/yyyy/mm/dd/hh/<file>.jsonl, the hour of inferenceTime
        for variant, found in ((deploy.PRODUCTION, production), (deploy.SHADOW, shadow)):
            hours = {re.sub(r"[-T]", "/", r["eventMetadata"]["inferenceTime"][:13]) for r in found}
            files = list((capture / ENDPOINT / variant).rglob("*.jsonl"))
            assert {f.parent for f in files} == {capture / ENDPOINT / variant / hour for hour in hours}, files

        assert deploy.promote(backend)["action"] == "promote"  # what `marketrank endpoint promote` does
        assert close(scores(http.post("/invocations", content=model["request"])), model["b_scores"])
        assert close(scores(http.post(wire.predict_path(ENDPOINT), content=model["request"])), model["b_scores"])
        assert http.get("/ping").json()[deploy.PRODUCTION]["model_name"] == "model-b"
        assert status_version(http, ENDPOINT) == "1"


def test_ping_is_503_until_the_production_model_is_loaded(model, tmp_path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    backend = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    app = local_endpoint.create_app(models, backend.path, None, poll_seconds=0.2)
    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/ping").status_code == 503  # no manifest yet
        deploy.deploy_shadow(backend, deploy.Variant("late"))
        response = http.get("/ping")
        assert response.status_code == 503 and "'late'" in response.json()["error"]
        invocation = http.post("/invocations", content=model["request"])
        assert invocation.status_code == 503 and set(invocation.json()) == {"error"}

        install(model["b"], models, "late", 3)
        wait_for(lambda: http.get("/ping").status_code == 200, timeout=8)
        assert close(scores(http.post("/invocations", content=model["request"])), model["b_scores"])


def test_shadow_failures_stalls_and_crashes_never_reach_production(model, tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setattr(local_endpoint, "SIDECAR_RESTART_SECONDS", 0.5)
    models, capture = tmp_path / "models", tmp_path / "capture"
    install(model["a"], models, "model-a", model["version"])
    install(model["b"], models, "model-b", 1)
    (models / "broken" / "1").mkdir(parents=True)
    (models / "broken" / "1" / "saved_model.pb").write_bytes(b"not a SavedModel")
    backend = deploy.LocalBackend(tmp_path / "endpoints", ENDPOINT)
    backend.apply(deploy.EndpointState(production=deploy.Variant("model-a"),
                                       shadow=deploy.Variant("broken", weight=1.0)))
    app = local_endpoint.create_app(models, backend.path, capture, poll_seconds=0.2)

    def answers_in_time(n: int, prefix: str) -> None:
        for i in range(n):
            started = time.monotonic()
            response = http.post("/invocations", content=model["request"],
                                 headers={local_endpoint.INFERENCE_ID_HEADER: f"{prefix}-{i}"})
            assert time.monotonic() - started < 1.0
            assert close(scores(response), model["a_scores"])

    def captured(variant: str) -> int:
        return len(local_endpoint.read_capture(capture, ENDPOINT, variant))

    with servers.running(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        sidecar = app.state.endpoint.sidecar
        # The shadow and data capture run in a child process at a lower CPU priority than the endpoint.
        assert sidecar.pid != os.getpid()
        wait_for(lambda: os.sched_getscheduler(sidecar.pid) == os.SCHED_IDLE, 30)

        assert "failed to load" in http.get("/v1/models/broken").json()["error"]
        answers_in_time(3, "broken")  # a shadow that does not load
        wait_for(lambda: captured(deploy.PRODUCTION) == 3, timeout=30)
        assert captured(deploy.SHADOW) == 0  # failures are not captured

        # A stalled sidecar: answers keep their time; once its queue and pipe are full, answers are dropped.
        backend.apply(deploy.EndpointState(production=deploy.Variant("model-a"),
                                           shadow=deploy.Variant("model-b", weight=1.0)))
        sent = local_endpoint.MAX_PENDING_SHADOW + 60
        os.kill(sidecar.pid, signal.SIGSTOP)
        try:
            answers_in_time(sent, "stalled")
        finally:
            os.kill(sidecar.pid, signal.SIGCONT)
        dropped = sidecar.dropped.total
        assert 1 <= dropped < 60
        warned = [m for m in caplog.messages if "neither captured nor copied" in m]
        assert len(warned) == 1 and warned[0].startswith(f"endpoint {ENDPOINT}: 1 answers were")  # then one per 10 s
        wait_for(lambda: captured(deploy.PRODUCTION) == 3 + sent - dropped, timeout=30)  # capture comes first
        # The burst outruns the shadow model inside the sidecar: it runs what its own queue holds, drops the rest.
        settled = wait_for(lambda: (n := captured(deploy.SHADOW)) >= local_endpoint.MAX_PENDING_SHADOW and (
            time.sleep(1.0) or captured(deploy.SHADOW) == n) and n, timeout=30)
        assert settled <= sent - dropped
        ids = {r["eventMetadata"]["inferenceId"] for r in local_endpoint.read_capture(capture, ENDPOINT,
                                                                                      deploy.PRODUCTION)}
        assert {r["eventMetadata"]["inferenceId"] for r in local_endpoint.read_capture(capture, ENDPOINT,
                                                                                       deploy.SHADOW)} <= ids

        # A sidecar killed with answers queued and a send blocked on it: production still answers, and a new
        # sidecar takes over (its captures in a file of their own).
        os.kill(sidecar.pid, signal.SIGSTOP)
        answers_in_time(30, "queued")
        killed = sidecar.pid
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: not sidecar.alive())
        answers_in_time(3, "crashed")
        assert sum("sidecar process exited" in m for m in caplog.messages) == 1
        assert http.get("/ping").status_code == 200
        wait_for(lambda: sidecar.restarts == 1 and sidecar.alive(), timeout=30)
        assert sidecar.pid != killed
        wait_for(lambda: os.sched_getscheduler(sidecar.pid) == os.SCHED_IDLE, 30)
        answers_in_time(3, "revived")
        wait_for(lambda: {f"revived-{i}" for i in range(3)} <= {
            r["eventMetadata"]["inferenceId"] for r in local_endpoint.read_capture(capture, ENDPOINT,
                                                                                   deploy.PRODUCTION)}, timeout=30)
        assert sum("sidecar restarted" in m for m in caplog.messages) == 1
    # Shutdown stopped the sender thread and counted the drops it had not logged yet.
    assert not [t for t in threading.enumerate() if t.name == f"{ENDPOINT}-sidecar-sender"]
    # Every drop was logged, in warnings at most once per 10 s and what was left at shutdown.
    logged = [int(m.split(" answers were")[0].rsplit(" ", 1)[1]) for m in caplog.messages
              if "answers were neither captured nor copied" in m]
    assert sum(logged) == sidecar.dropped.total > dropped  # the crashed-* answers too
    assert "neither captured nor copied to the shadow: since the last warning, at shutdown" in caplog.text


def test_a_caller_that_hangs_up_mid_body_gets_499_and_no_error_log(tmp_path, caplog):
    """The ranking API cancels a model call when its budget runs out: the endpoint must not log that as a 500."""
    import asyncio

    app = local_endpoint.create_app(tmp_path / "models")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
             "scheme": "http", "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 1234),
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"70000")]}
    incoming = [{"type": "http.request", "body": b'{"inputs": {"a', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
