"""`marketrank serve` as a user runs it: a real process, the local endpoint in a child process of its own (as
production runs TF Serving apart from the API), a ranking from the model over HTTP, and a clean stop on Ctrl-C
(SIGINT to the whole process group) or SIGTERM (to the parent alone)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process tree from /proc")


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _cmdline(pid: int) -> str:
    return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()


def _loads_tensorflow(pid: int) -> bool:
    return "_pywrap_tensorflow" in (Path("/proc") / str(pid) / "maps").read_text()


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _ports(n: int) -> list[int]:
    import socket

    sockets = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]  # held together: n distinct ports
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_serve_ranks_through_an_endpoint_process_and_stops_cleanly(tiny_run, tmp_path, stop):
    import pyarrow.parquet as pq

    items = pq.read_table(tiny_run["features"] / "online" / "items").column("item_id").to_pylist()
    users = pq.read_table(tiny_run["features"] / "online" / "users").column("user_id").to_pylist()
    home = tmp_path / "workspace"
    shutil.copytree(tiny_run["home"], home, symlinks=True)
    port, endpoint_port = _ports(2)
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        serve = subprocess.Popen([sys.executable, "-m", "marketrank.cli", "serve", "--port", str(port),
                                  "--endpoint-port", str(endpoint_port)],
                                 env={**os.environ, "MARKETRANK_HOME": str(home)}, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    group = serve.pid  # its own session: the group a terminal's Ctrl-C reaches
    tree: list[int] = []
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=10) as http:
            deadline = time.monotonic() + 180
            while True:
                assert serve.poll() is None, log_path.read_text()
                with contextlib.suppress(httpx.HTTPError):
                    if http.get("/readyz").status_code == 200:
                        break
                assert time.monotonic() < deadline, f"not ready in 180 s:\n{log_path.read_text()}"
                time.sleep(0.5)
            candidates = items[:20]
            response = http.post("/v1/rank", json={"user_id": users[0], "surface": "feed", "candidates": candidates,
                                                   "k": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["fallback"] is False and body["model"]["variant"] == "champion", body
        assert [item["rank"] for item in body["items"]] == [1, 2, 3, 4, 5]
        assert {item["item_id"] for item in body["items"]} <= set(candidates)

        endpoints = [pid for pid in _children(serve.pid) if "serving.local_endpoint" in _cmdline(pid)]
        assert len(endpoints) == 1, [_cmdline(pid) for pid in _children(serve.pid)]
        tree = [serve.pid, *endpoints, *_children(endpoints[0])]  # with the endpoint's sidecar (multiprocessing)
        assert any("multiprocessing" in _cmdline(pid) for pid in tree[2:]), [_cmdline(pid) for pid in tree]
        assert _loads_tensorflow(endpoints[0]) and not _loads_tensorflow(serve.pid)
        ping = httpx.get(f"http://127.0.0.1:{endpoint_port}/ping", trust_env=False, timeout=10)
        assert ping.status_code == 200 and ping.json()["endpoint"] == "marketrank"

        if stop == "ctrl-c":
            os.killpg(group, signal.SIGINT)
        else:
            serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, log_path.read_text()
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in tree if _alive(pid)], log_path.read_text()
        output = log_path.read_text()
        assert "stopped" in output and "Traceback" not in output, output
        assert "local endpoint process" not in output, output  # no exit taken for a crash
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)  # whatever is left of the tree, when an assertion failed
        serve.wait(10)



def test_endpoint_process_on_a_busy_port_fails_at_once(tmp_path):
    """The port is bound before the child starts: a busy one is an error now, not a readiness probe answered by
    whatever holds it."""
    import socket

    from serving.servers import running_process

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(OSError) as refused, running_process(tmp_path / "models", None, None, port=port):
            pass
    assert refused.value.errno == errno.EADDRINUSE, refused.value
    assert time.monotonic() - started < 5
    assert not [pid for pid in _children(os.getpid()) if "serving.local_endpoint" in _cmdline(pid)]


def test_serve_on_a_busy_port_fails_before_loading_anything(tmp_path, monkeypatch):
    import socket

    from typer.testing import CliRunner

    from marketrank.cli import app

    monkeypatch.setenv("MARKETRANK_HOME", str(tmp_path))
    (tmp_path / "endpoints").mkdir()
    (tmp_path / "endpoints" / "marketrank.json").write_text("{}")  # never read: the ports are checked first
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        for args, option in ((["--port", str(port)], "--port"), (["--endpoint-port", str(port)], "--endpoint-port")):
            result = CliRunner().invoke(app, ["serve", *args])
            assert result.exit_code == 1 and "Traceback" not in result.output, result.output
            assert f"{option} {port}: cannot listen on 127.0.0.1:{port}" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["endpoints"]  # no store opened, nothing materialised
    result = CliRunner().invoke(app, ["serve", "--budget-ms", "0"])
    assert result.exit_code == 1 and "--budget-ms must be > 0" in result.output
    result = CliRunner().invoke(app, ["serve", "--port", "18555", "--endpoint-port", "18555"])
    assert result.exit_code == 1 and "--port and --endpoint-port are both 18555" in result.output
    from marketrank.cli import _check_free

    _check_free("--port", "::1", 0)  # an IPv6 host is an address too (port 0: any free one)
