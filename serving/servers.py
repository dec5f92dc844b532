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
from collections.abc import Callable, Iterator, Mapping
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
    TensorFlow pools), with ``process_environ()`` (``child_server``: yields ``(base URL, pid)`` once ready)."""
    def command(fd: int) -> list[str]:
        argv = ["-m", "serving.local_endpoint", "--models", str(Path(models_dir).resolve()), "--fd", str(fd),
                "--parent-pid", str(os.getpid()), "--log-level", log_level]
        if endpoint_manifest is not None:
            argv += ["--manifest", str(Path(endpoint_manifest).resolve())]
        if capture_dir is not None:
            argv += ["--capture", str(Path(capture_dir).resolve())]
        return argv

    with child_server(command, "the local endpoint", host, port, environ=process_environ(),
                      timeout_s=timeout_s) as served:
        yield served


@contextlib.contextmanager
def child_server(command: Callable[[int], list[str]], what: str, host: str = "127.0.0.1", port: int = 0, *,
                 environ: Mapping[str, str] | None = None, timeout_s: float = 180.0) -> Iterator[tuple[str, int]]:
    """A server in a child Python process: ``command(fd)`` is its argv after the interpreter, to serve on the
    listening socket ``fd``. Yields ``(base URL, pid)`` once its ``/ping`` answers 200.

    The socket is bound here and handed to the child, so a busy port fails at once (OSError) and no other server
    can answer the readiness probe. The child runs from the repository root with it on ``PYTHONPATH``, in
    ``environ`` (default: this process's), and should stop itself when this process dies
    (``stop_with_parent``). On exit it is stopped (SIGTERM, then SIGKILL after 15 s), and an exit before that is
    logged as an error. RuntimeError if the child exits or is not ready within ``timeout_s``.
    """
    import httpx

    listener = socket.create_server((host, port))
    url = f"http://{host}:{listener.getsockname()[1]}"
    repo = str(Path(__file__).resolve().parents[1])
    environ = os.environ if environ is None else environ
    env = {**environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, environ.get("PYTHONPATH")]))}
    stopping = threading.Event()
    try:
        # From the repository root (a serving/ or training/ folder in the caller's directory must not shadow it),
        # in a session of its own: a terminal's Ctrl-C reaches this process only, which stops the API first and
        # then the child.
        process = subprocess.Popen([sys.executable, *command(listener.fileno())], env=env, cwd=repo,
                                   pass_fds=(listener.fileno(),), start_new_session=True)
    finally:
        listener.close()  # the child holds it now
    try:
        def watch() -> None:
            code = process.wait()
            if not stopping.is_set():
                log.error("%s (process %d) exited with %s: calls to it fail until it is started again", what,
                          process.pid, code)

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=url, trust_env=False, timeout=2.0) as client:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{what} process exited with {process.returncode} (see its log)")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get("/ping").status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{what} process did not become ready in {timeout_s:.0f} s")
                time.sleep(0.2)
        threading.Thread(target=watch, name="child-server-watch", daemon=True).start()
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
