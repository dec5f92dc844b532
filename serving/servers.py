"""Running the local servers: an ASGI app under uvicorn in a thread of this process (``running``), and the local
endpoint in a process of its own (``running_process``: ``python -m serving.local_endpoint``), as production runs
TF Serving apart from the ranking API.

Nothing here imports TensorFlow: ``marketrank serve`` keeps it out of the API's process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from serving.wire import INTER_OP_THREADS, INTRA_OP_THREADS

log = logging.getLogger("marketrank.servers")


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a background thread (port 0: a free one); yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="local-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start on {host}:{port} (see the log above)")
            time.sleep(0.02)
        yield f"http://{host}:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)


def process_environ(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the endpoint in a process of its own: one TensorFlow thread per pool
    (``thread_settings``) unless ``environ`` (default: this process's) sets them, and TensorFlow's C++ log quiet."""
    environ = os.environ if environ is None else environ
    return {INTRA_OP_THREADS: "1", INTER_OP_THREADS: "1", "TF_CPP_MIN_LOG_LEVEL": "3", **environ}


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (another process may take it before it is used: tests only)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_process(models_dir: str | Path, endpoint_manifest: Path | None, capture_dir: Path | None,
                    host: str = "127.0.0.1", port: int = 0, *, log_level: str = "warning",
                    timeout_s: float = 180.0) -> Iterator[tuple[str, int]]:
    """The local endpoint in a child process, as production runs TF Serving apart from the API (its own GIL and
    TensorFlow pools), with ``process_environ()``. Yields ``(base URL, pid)`` once ``/ping`` answers 200.

    The listening socket is bound here and handed to the child, so a busy port fails at once (OSError) and no
    other server can answer the readiness probe. The child stops by itself if this process dies; on exit it is
    stopped (SIGTERM, then SIGKILL after 15 s), and an exit before that is logged as an error. Port 0: a free
    one. RuntimeError if the child exits or is not ready within ``timeout_s``.
    """
    import httpx

    listener = socket.create_server((host, port))
    url = f"http://{host}:{listener.getsockname()[1]}"
    repo = str(Path(__file__).resolve().parents[1])
    env = {**process_environ(), "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "serving.local_endpoint", "--models", str(Path(models_dir).resolve()),
               "--fd", str(listener.fileno()), "--parent-pid", str(os.getpid()), "--log-level", log_level]
    if endpoint_manifest is not None:
        command += ["--manifest", str(Path(endpoint_manifest).resolve())]
    if capture_dir is not None:
        command += ["--capture", str(Path(capture_dir).resolve())]
    stopping = threading.Event()
    try:
        # From the repository root (a serving/ or training/ folder in the caller's directory must not shadow it),
        # in a session of its own: a terminal's Ctrl-C reaches this process only, which stops the API first and
        # then the endpoint.
        process = subprocess.Popen(command, env=env, cwd=repo, pass_fds=(listener.fileno(),),
                                   start_new_session=True)
    finally:
        listener.close()  # the child holds it now
    try:
        def watch() -> None:
            code = process.wait()
            if not stopping.is_set():
                log.error("the local endpoint process %d exited with %s: model calls fail until it is started "
                          "again", process.pid, code)

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=url, trust_env=False, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"the local endpoint process exited with {process.returncode} (see its log)")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ping").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the local endpoint process did not become ready in {timeout_s:.0f} s")
                time.sleep(0.2)
        threading.Thread(target=watch, name="local-endpoint-watch", daemon=True).start()
        yield url, process.pid
    finally:
        stopping.set()
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
        except BaseException:  # interrupted again while it stops: make sure it is gone
            process.kill()
            raise


def stop_with_parent(parent_pid: int, check_s: float = 1.0) -> None:
    """In a child: SIGTERM itself (a graceful stop) once ``parent_pid`` is no longer its parent, so a parent killed
    without cleanup (SIGKILL) leaves no server holding its port."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(check_s)
        log.warning("parent process %d is gone: stopping", parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
