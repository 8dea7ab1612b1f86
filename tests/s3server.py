"""A real S3-protocol server for the tests: moto's server, in a subprocess.

The storage contract suite, the engine tests and the benchmarks talk HTTP to
it through the real S3 backend, so signing, retries, conditional writes and
pagination all run for real. It binds to 127.0.0.1 on a free port, is ready
in about a second, keeps everything in memory, and ``reset()`` wipes it
between tests. By default it checks no credentials; :meth:`MotoServer.enforce_auth`
turns IAM authentication on (for the wrong-credentials tests).

By default the server handles one request at a time (``python -m
tests.s3server``: moto's own app and request handler behind a lock). The
stock ``moto_server`` serves each request in a thread and checks
``If-None-Match``/``If-Match`` before storing without a lock, so under CPU
load two racing conditional PUTs can both succeed (measured: 2 double
winners in 400 races of 16 writers); AWS, MinIO and LocalStack do not do
that, and fencing tests must not flake on it. ``serialize=False`` starts the
stock binary instead.

Nothing here touches the environment of the test process: credentials are
passed to each boto3 client explicitly.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import boto3  # type: ignore[import-untyped]
import botocore.config

_REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REGION = "us-east-1"
#: What moto accepts for anything while authentication is off.
DUMMY_ACCESS_KEY = "testing"
DUMMY_SECRET_KEY = "testing"  # a well-known dummy, not a secret


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


class MotoServer:
    """A running ``moto_server`` process; use :meth:`start`, then :meth:`stop`."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: pathlib.Path) -> None:
        self.process = process
        self.port = port
        self.log = log
        self.endpoint = f"http://{HOST}:{port}"

    @classmethod
    def start(
        cls,
        *,
        env: Mapping[str, str] | None = None,
        serialize: bool = True,
        timeout: float = 30.0,
    ) -> MotoServer:
        """Start a server on a free port and wait (up to ``timeout`` s) until it answers.

        ``env`` adds variables to the server's environment (for instance
        ``INITIAL_NO_AUTH_ACTION_COUNT``); AWS credentials of the test process
        are not passed on.
        """
        if serialize:
            command = [sys.executable, "-m", "tests.s3server", "--host", HOST, "--port"]
        else:
            command = [str(pathlib.Path(sys.executable).parent / "moto_server"), "-H", HOST, "-p"]
        child_env = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith("AWS_") and name != "INITIAL_NO_AUTH_ACTION_COUNT"
        }
        child_env.update(env or {})
        log = pathlib.Path(tempfile.mkstemp(prefix="moto-server-", suffix=".log")[1])
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [*command, str(port)],
                cwd=_REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env,
            )
        server = cls(process, port, log)
        try:
            server._wait_until_ready(timeout)
        except BaseException:
            server.stop()
            raise
        return server

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"moto_server exited with {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.endpoint}/moto-api/data.json", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # it answered: good enough
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"moto_server did not answer on {self.endpoint} within {timeout} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def _post(self, path: str, body: bytes = b"") -> None:
        # Not urllib's default form content type: Flask would parse the body away.
        request = urllib.request.Request(
            f"{self.endpoint}{path}",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def reset(self) -> None:
        """Forget every bucket, object, IAM user… (``POST /moto-api/reset``)."""
        self._post("/moto-api/reset")

    def enforce_auth(self, *, after_requests: int = 0) -> None:
        """Check signatures and IAM permissions from now on (after ``after_requests`` more).

        The same switch as the ``INITIAL_NO_AUTH_ACTION_COUNT`` variable, but
        set at a known moment, so the set-up calls need not be counted.
        """
        self._post("/moto-api/reset-auth", str(after_requests).encode())

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit within 10 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.log.unlink()

    def client(
        self,
        service: str = "s3",
        *,
        access_key: str = DUMMY_ACCESS_KEY,
        secret_key: str = DUMMY_SECRET_KEY,
    ) -> Any:
        """A boto3 client of ``service`` on this server, with the given credentials."""
        return client(service, endpoint=self.endpoint, access_key=access_key, secret_key=secret_key)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)


def client(
    service: str,
    *,
    endpoint: str | None,
    access_key: str | None = None,
    secret_key: str | None = None,
    region: str = REGION,
) -> Any:
    """A boto3 client (credentials from the arguments, else the usual AWS chain)."""
    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=botocore.config.Config(
            retries={"mode": "standard", "max_attempts": 3},
            s3={"addressing_style": "path"},
        ),
    )


class _OneAtATime:
    """WSGI middleware: run the wrapped app for one request at a time."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()

    def __call__(self, environ: Any, start_response: Any) -> list[bytes]:
        with self.lock:
            return list(self.app(environ, start_response))


def _serve(argv: list[str]) -> None:
    """moto_server's main(), minus the races: see the module docstring."""
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import run_simple

    parser = argparse.ArgumentParser(description=_serve.__doc__)
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_PORT", str(args.port))
    app = DomainDispatcherApplication(create_backend_app)
    run_simple(
        args.host,
        args.port,
        _OneAtATime(app),
        threaded=True,  # connections in threads (keep-alive), requests one by one
        request_handler=MotoRequestHandler,
    )


if __name__ == "__main__":
    _serve(sys.argv[1:])
