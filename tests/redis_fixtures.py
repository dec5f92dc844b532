"""A real ``redis-server`` for tests: loopback only, a free port, a temporary directory, no persistence.

``from redis_fixtures import redis_server`` gives a module-scoped server (``.url``); ``RedisServer`` itself can be
started and stopped inside a test (e.g. to check that readiness follows the store). Tests skip, with the reason,
only when the binary is absent.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REDIS_BINARY = shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists()
                                                else None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1; ``start()`` waits until it answers PING."""

    def __init__(self, binary: str | None = None):
        self.binary = binary or REDIS_BINARY
        if not self.binary:
            raise FileNotFoundError("redis-server binary not found on PATH or at /usr/bin/redis-server")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="marketrank-redis-"))
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        import redis

        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", "",
             "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.2, socket_timeout=0.2)
        try:
            while True:
                if self.process.poll() is not None:
                    output = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: {output}")
                try:
                    if client.ping():
                        return self
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise TimeoutError(f"redis-server did not answer on {self.url} within {timeout_s}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process is not None and self.process.stdout:
            self.process.stdout.close()
        self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


def _require_binary() -> None:
    if not REDIS_BINARY:
        pytest.skip("redis-server binary is absent (apt-get install redis-server); the Redis store tests need it")


@pytest.fixture(scope="module")
def redis_server():
    """A running real redis-server for the module; yields the RedisServer (``.url``)."""
    _require_binary()
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_factory():
    """Start extra servers inside one test (each stopped at the end): ``server = redis_factory()``."""
    _require_binary()
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        servers.append(RedisServer().start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()
