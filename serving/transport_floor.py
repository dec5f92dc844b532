"""The serving benchmark's transport floor: an API and a model endpoint that do no ranking work, on the same stacks.

``serving(...)`` starts, on 127.0.0.1, a *null endpoint* (Starlette on uvicorn, as the local endpoint runs, in a
child process or a thread as the benchmark runs the real one: it parses each predict body and answers a canned
predict response) and a *null API* in a thread of this process (FastAPI on uvicorn, as the ranking API: it
parses each rank body, calls the null endpoint through the API's own model client, ``TFServingBackend.score``,
with one request's model inputs, and answers a canned rank response).

What a request through them costs: both HTTP servers and the loopback, the rank body's JSON parse, the model
client (predict-body encoding, the pooled HTTP call, the response's score parsing and shape check), the
endpoint's JSON parse of the predict body, and this machine's scheduling at that rate. What it leaves out: the
feature fetch and ``build_inputs``, the model, ranking, the rank request's validation, rendering the answer,
the API's log line, metrics and breaker, and the endpoint's arrays, data capture and shadow copy. Driven with
the load's arrivals, it is the part of the API's latency that no change to that work can remove.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.applications import Starlette
from starlette.routing import Route

from serving import wire
from serving.errors import ModelError
from serving.servers import child_server, running

MODEL_NAME = "transport-floor"
READY_TIMEOUT_S = 60.0


def endpoint_app(answer: bytes) -> Starlette:
    """The null endpoint: TF Serving's predict route for ``MODEL_NAME`` (parses the body, answers ``answer``)
    and SageMaker's ``/ping``."""
    async def predict(request: Request) -> Response:
        wire.decode(await request.body())  # parsing its request is the least any endpoint does
        return Response(answer, media_type=wire.CONTENT_TYPE)

    async def ping(request: Request) -> Response:
        return Response(b"", status_code=200)

    return Starlette(routes=[Route(wire.predict_path(MODEL_NAME), predict, methods=["POST"]), Route("/ping", ping)])


def _endpoint_main(fd: int, answer_path: str, parent_pid: int) -> None:
    """The child process: serve the null endpoint on the inherited listening socket until stopped."""
    import uvicorn

    from serving.servers import stop_with_parent

    stop_with_parent(parent_pid)
    config = uvicorn.Config(endpoint_app(Path(answer_path).read_bytes()), log_level="warning", access_log=False)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


@contextlib.contextmanager
def _endpoint_process(answer: bytes, workdir: Path, host: str) -> Iterator[str]:
    """The null endpoint in a child process, started as the local endpoint is (``servers.child_server``)."""
    answer_path = workdir / "transport-floor-answer.json"
    answer_path.write_bytes(answer)
    code = ("import sys; from serving.transport_floor import _endpoint_main; "
            "_endpoint_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))")
    with child_server(lambda fd: ["-c", code, str(fd), str(answer_path), str(os.getpid())],
                      "the transport floor's endpoint", host, timeout_s=READY_TIMEOUT_S) as (url, _):
        yield url


def api_app(model_url: str, inputs: Mapping[str, np.ndarray], answer: bytes, timeout_s: float) -> FastAPI:
    """The null API: ``POST /v1/rank`` parses the body, scores ``inputs`` through ``TFServingBackend`` at
    ``model_url`` within ``timeout_s`` and answers ``answer`` (502 with the error when the model call fails);
    ``/healthz``."""
    import orjson

    from serving.backends import TFServingBackend

    backend = TFServingBackend(model_url, MODEL_NAME)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        try:
            yield
        finally:
            await backend.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/rank")
    async def rank(request: Request) -> Response:
        body = orjson.loads(await request.body())
        try:
            await backend.score(inputs, str(body.get("request_id") or "transport-floor"), timeout_s)
        except ModelError as err:
            return Response(orjson.dumps({"error": f"{err.reason}: {err}"}), status_code=502,
                            media_type=wire.CONTENT_TYPE)
        return Response(answer, media_type=wire.CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


@contextlib.contextmanager
def serving(inputs: Mapping[str, np.ndarray], model_answer: bytes, api_answer: bytes, workdir: Path,
            host: str = "127.0.0.1", timeout_s: float = 0.15, *, endpoint_process: bool = True) -> Iterator[str]:
    """The null API's base URL, with the null endpoint behind it, until the block ends. ``inputs``: one request's
    model inputs (``build_inputs``), scored by every rank call; ``model_answer``: the endpoint's predict response
    to them; ``api_answer``: a rank response body of the load's size; ``timeout_s``: the model call's budget;
    ``endpoint_process``: the null endpoint in a child process (else a thread of this one)."""
    with contextlib.ExitStack() as stack:
        model_url = stack.enter_context(_endpoint_process(model_answer, workdir, host) if endpoint_process
                                        else running(endpoint_app(model_answer), host, 0))
        yield stack.enter_context(running(api_app(model_url, inputs, api_answer, timeout_s), host, 0))
