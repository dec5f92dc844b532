"""Local AWS emulators for the deploy tests: moto server and LocalStack (host mode, no Docker), on loopback only.

Each emulator runs as its own process group on a free 127.0.0.1 port, writes its log to a temporary file and is
killed (the whole group) on teardown. A start that fails or times out raises with the log's tail: these fixtures
never skip, because CI must run the deploy tests (``make test`` builds ``.venv-localstack`` and ``node_modules``).

``Emulator.aws_env()`` is the environment that points boto3 and the ``cdk`` CLI at the emulator: dummy
credentials, no shared config or credential files, so nothing can reach a real AWS account.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Python 3.13 venv with localstack-core (``make localstack``); override with MARKETRANK_LOCALSTACK_PYTHON.
LOCALSTACK_PYTHON = Path(os.environ.get("MARKETRANK_LOCALSTACK_PYTHON", ROOT / ".venv-localstack" / "bin" / "python"))
#: The npm ``aws-cdk`` CLI pinned in package.json (``make cdk-cli``).
CDK_CLI = ROOT / "node_modules" / ".bin" / "cdk"

#: Variables that could point a child process at a real account or profile; removed from every emulator env.
_AWS_LEAKS = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN",
              "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
              "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CA_BUNDLE")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def base_env(**extra: str) -> dict[str, str]:
    """The current environment without AWS endpoints, profiles or credentials, plus ``extra``."""
    env = {key: value for key, value in os.environ.items()
           if key not in _AWS_LEAKS and not key.startswith(("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY", "AWS_SECRET"))}
    env.update(extra)
    return env


class Emulator:
    """One emulator process; subclasses give the command, its environment and the readiness check."""

    name = "emulator"
    start_timeout_s = 60.0

    def __init__(self, account: str, region: str):
        self.account, self.region = account, region
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"marketrank-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.process: subprocess.Popen | None = None
        self.started_s: float | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- subclass hooks ---------------------------------------------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def process_env(self) -> dict[str, str]:
        return base_env()

    def ready(self) -> bool:
        raise NotImplementedError

    def credentials(self) -> tuple[str, str]:
        return "testing", "testing"

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def start(self) -> Emulator:
        began = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command(), env=self.process_env(), cwd=self.dir,
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        deadline = began + self.start_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode} while starting\n"
                                   f"{self.log_tail()}")
            if self.ready():
                self.started_s = time.monotonic() - began
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"{self.name} not ready on {self.endpoint} within {self.start_timeout_s:.0f}s\n"
                                   f"{self.log_tail()}")
            time.sleep(0.25)

    def stop(self) -> None:
        """SIGTERM, a short grace period (the state is throw-away), then SIGKILL to what is left of the group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self.process = None

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return f"({self.name}: no log at {self.log_path})"
        return f"--- last {min(lines, len(text))} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    # -- clients ----------------------------------------------------------------------------------------------------
    def aws_env(self, **extra: str) -> dict[str, str]:
        """Environment for a child process (the ``cdk`` CLI) that talks to this emulator only."""
        key, secret = self.credentials()
        return base_env(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_REGION=self.region,
                        AWS_DEFAULT_REGION=self.region, AWS_ENDPOINT_URL=self.endpoint,
                        AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
                        AWS_EC2_METADATA_DISABLED="true", **extra)

    def client(self, service: str):
        import boto3

        key, secret = self.credentials()
        return boto3.session.Session(aws_access_key_id=key, aws_secret_access_key=secret,
                                     region_name=self.region).client(service, endpoint_url=self.endpoint)

    def _get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.endpoint + path, timeout=2) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, b""
        except (OSError, urllib.error.URLError):
            return 0, b""


class MotoServer(Emulator):
    """``moto_server`` from this venv with the fixes in ``moto_launcher.py``; its default account is the stage's
    (MOTO_ACCOUNT_ID)."""

    name = "moto"
    start_timeout_s = 30.0

    def command(self) -> list[str]:
        return [sys.executable, str(ROOT / "tests" / "moto_launcher.py"), "-H", "127.0.0.1", "-p", str(self.port)]

    def process_env(self) -> dict[str, str]:
        return base_env(MOTO_ACCOUNT_ID=self.account, PYTHONUNBUFFERED="1")

    def ready(self) -> bool:
        return self._get("/moto-api/data.json")[0] == 200


class LocalStack(Emulator):
    """LocalStack community in host mode (``localstack.runtime.main``) from ``.venv-localstack`` (Python 3.13).

    The account is the 12-digit access key id. Offline settings: no DNS server, no certificate download, no
    analytics; its filesystem (state, cache, logs) lives in the emulator's temporary directory.
    """

    name = "localstack"
    start_timeout_s = 120.0

    def __init__(self, account: str, region: str, python: Path = LOCALSTACK_PYTHON):
        if not python.exists():
            raise FileNotFoundError(f"LocalStack's Python is missing at {python}: run `make localstack` (Python 3.13 "
                                    "venv with localstack-core[runtime]) or set MARKETRANK_LOCALSTACK_PYTHON")
        self.python = python
        super().__init__(account, region)

    def command(self) -> list[str]:
        return [str(self.python), "-m", "localstack.runtime.main"]

    def process_env(self) -> dict[str, str]:
        env = base_env(OVERRIDE_IN_DOCKER="0", GATEWAY_LISTEN=f"127.0.0.1:{self.port}", GATEWAY_SERVER="hypercorn",
                       FILESYSTEM_ROOT=str(self.dir / "filesystem"), DNS_ADDRESS="0", SKIP_SSL_CERT_DOWNLOAD="1",
                       DISABLE_EVENTS="1", LOCALSTACK_TELEMETRY="0", PYTHONUNBUFFERED="1")
        for key in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the 3.11 venv's must not leak into 3.13
            env.pop(key, None)
        return env

    def ready(self) -> bool:
        status, body = self._get("/_localstack/init")
        if status != 200:
            return False
        try:
            return bool(json.loads(body)["completed"]["READY"])
        except (ValueError, KeyError, TypeError):
            return False

    def credentials(self) -> tuple[str, str]:
        return self.account, "test"


@contextlib.contextmanager
def running(emulator_type: type[Emulator], account: str, region: str) -> Iterator[Emulator]:
    """Start, yield, stop and remove its directory (the log's tail is in every error raised before that)."""
    emulator = emulator_type(account, region).start()
    try:
        yield emulator
    finally:
        emulator.stop()
        emulator.cleanup()


# -- the cdk CLI ----------------------------------------------------------------------------------------------------
class CdkError(AssertionError):
    pass


def cdk(args: list[str], env: Mapping[str, str], *, cwd: Path = ROOT, timeout_s: float = 300,
        emulator: Emulator | None = None) -> subprocess.CompletedProcess:
    """Run the pinned ``cdk`` CLI. A non-zero exit or a time-out (the CLI polls a stack that never completes
    forever) raises with its output and the emulator's log tail."""
    if not CDK_CLI.exists():
        raise FileNotFoundError(f"{CDK_CLI} is missing: run `make cdk-cli` (npm ci)")
    env = {**env, "CDK_DISABLE_VERSION_CHECK": "1", "CDK_DISABLE_CLI_TELEMETRY": "true", "CI": "true",
           "FORCE_COLOR": "0", "JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION": "20", "NODE_NO_WARNINGS": "1"}
    command = f"cdk {' '.join(args)}"
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen([str(CDK_CLI), *args], env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            returncode = process.wait(timeout=timeout_s)
            problem = f"exited with {returncode}" if returncode else ""
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode, problem = -signal.SIGKILL, f"did not finish within {timeout_s:.0f}s"
        output.seek(0)
        text = output.read()
    if problem:
        tail = "\n".join(text.splitlines()[-80:])
        where = f"\n{emulator.log_tail()}" if emulator else ""
        raise CdkError(f"{command} {problem}\n{tail}{where}")
    return subprocess.CompletedProcess([str(CDK_CLI), *args], returncode, text, "")
