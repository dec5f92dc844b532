"""The serving benchmark's transport floor: an API and a model endpoint that do no ranking work, on the same stacks.

``serving(...)`` starts, on 127.0.0.1, a *null endpoint* in a child process (Starlette on uvicorn, as the local
endpoint runs: it parses each predict body and answers a canned predict response) and a *null API* in a thread
of this process (FastAPI on uvicorn, as the ranking API: it parses each rank body, calls the null endpoint through
the API's own model client, ``TFServingBackend.score`` with canned inputs, and answers a canned rank response).
Driven with the load's arrivals and bodies, their latency is what the HTTP servers, the model client and this
machine's scheduling cost at that rate before any feature, model or ranking work: the part of the API's latency
that no change to that work can remove.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response

from serving import wire
from serving.servers import running

MODEL_NAME = "transport-floor"
READY_TIMEOUT_S = 60.0


def _endpoint_main(fd: int, answer_path: str, parent_pid: int) -> None:
    """The child process: serve the null endpoint on the inherited listening socket until stopped."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import Route

    from serving.servers import stop_with_parent

    answer = Path(answer_path).read_bytes()

    async def predict(request: Request) -> Response:
        wire.decode(await request.body())  # parsing its request is the least any endpoint does
        return Response(answer, media_type=wire.CONTENT_TYPE)

    async def ping(request: Request) -> Response:
        return Response(b"", status_code=200)

    app = Starlette(routes=[Route(wire.predict_path(MODEL_NAME), predict, methods=["POST"]), Route("/ping", ping)])
    stop_with_parent(parent_pid)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run(sockets=[socket.socket(fileno=fd)])


@contextlib.contextmanager
def _null_endpoint(answer: bytes, workdir: Path, host: str) -> Iterator[str]:
    import httpx

    answer_path = workdir / "transport-floor-answer.json"
    answer_path.write_bytes(answer)
    listener = socket.create_server((host, 0))
    url = f"http://{host}:{listener.getsockname()[1]}"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    code = ("import sys; from serving.transport_floor import _endpoint_main; "
            "_endpoint_main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))")
    try:
        process = subprocess.Popen([sys.executable, "-c", code, str(listener.fileno()), str(answer_path),
                                    str(os.getpid())], cwd=repo, env=env, pass_fds=(listener.fileno(),),
                                   start_new_session=True)
    finally:
        listener.close()  # the child holds it now
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        with httpx.Client(base_url=url, trust_env=False, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the transport floor's endpoint exited with {process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ping").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the transport floor's endpoint was not ready in {READY_TIMEOUT_S:.0f} s")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def _null_api(model_url: str, inputs: Mapping[str, np.ndarray], answer: bytes, timeout_s: float) -> FastAPI:
    import orjson

    from serving.backends import TFServingBackend

    backend = TFServingBackend(model_url, MODEL_NAME)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await backend.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/v1/rank")
    async def rank(request: Request) -> Response:
        body = orjson.loads(await request.body())
        await backend.score(inputs, str(body.get("request_id") or "transport-floor"), timeout_s)
        return Response(answer, media_type=wire.CONTENT_TYPE)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


@contextlib.contextmanager
def serving(inputs: Mapping[str, np.ndarray], model_answer: bytes, api_answer: bytes, workdir: Path,
            host: str = "127.0.0.1", timeout_s: float = 10.0) -> Iterator[str]:
    """The null API's base URL, with the null endpoint behind it, until the block ends. ``inputs``: one request's
    model inputs (``build_inputs``), sent as every predict body; ``model_answer``: the endpoint's predict response
    to them; ``api_answer``: a rank response body of the load's size."""
    with _null_endpoint(model_answer, workdir, host) as model_url, \
            running(_null_api(model_url, inputs, api_answer, timeout_s), host, 0) as api_url:
        yield api_url
