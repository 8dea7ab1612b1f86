"""Storage accounts that are wrong: each failure is the error class the contract names.

Against real servers: a bucket (or directory) that does not exist, an
endpoint nothing listens on, one that keeps answering 503, and a moto server
that checks IAM credentials. Every message must tell a person what to fix,
and none may contain the secret key or session token.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import pathlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from ebbtide_engine import _errors, storage
from tests import s3server

SECRET = "Wr0ng+Secret/Key-never-printed"  # distinctive, to search messages for
TOKEN = "session-token-never-printed"

Operation = Callable[[storage.ObjectStore], Awaitable[object]]


async def _list_all(store: storage.ObjectStore) -> list[storage.ObjectInfo]:
    return [info async for info in store.list("")]


# Every operation that talks to the account, by name (head is special: see below).
OPERATIONS: dict[str, Operation] = {
    "check": lambda store: store.check(),
    "put_new": lambda store: store.put_new("seg/1", b"data"),
    "put_if_match": lambda store: store.put_if_match("seg/1", b"data", etag="0" * 32),
    "get": lambda store: store.get("seg/1"),
    "get_range": lambda store: store.get("seg/1", byte_range=(1, 2)),
    "list": _list_all,
    "delete": lambda store: store.delete("seg/1"),
}

EVERY_OPERATION: dict[str, Operation] = {
    **OPERATIONS,
    "head": lambda store: store.head("seg/1"),
}


def _s3_store(url: str, **options: float) -> storage.ObjectStore:
    credentials = storage.S3Credentials("AKIDEBBTIDETEST", SECRET, TOKEN)
    return storage.open_store(url, credentials=credentials, **options)  # type: ignore[arg-type]


def _assert_no_secrets(error: BaseException) -> None:
    for text in (str(error), repr(error)):
        assert SECRET not in text
        assert TOKEN not in text


# -- missing bucket or directory ------------------------------------------------------


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_missing_s3_bucket(
    s3_server: s3server.MotoServer, aws_test_credentials: None, operation: str
) -> None:
    url = f"s3://no-such-bucket/p?endpoint={s3_server.endpoint}&region=us-east-1"
    async with _s3_store(url) as store:
        with pytest.raises(_errors.BucketNotFound) as caught:
            await OPERATIONS[operation](store)

    message = str(caught.value)
    assert "'no-such-bucket' does not exist" in message
    assert s3_server.endpoint in message
    assert "create it" in message
    _assert_no_secrets(caught.value)


async def test_missing_s3_bucket_reads_as_a_missing_object_on_head(
    s3_server: s3server.MotoServer, aws_test_credentials: None
) -> None:
    # HEAD responses have no body: S3 cannot say which of the two is missing.
    url = f"s3://no-such-bucket/p?endpoint={s3_server.endpoint}&region=us-east-1"
    async with _s3_store(url) as store:
        with pytest.raises(_errors.ObjectNotFound):
            await store.head("seg/1")


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_missing_local_directory(tmp_path: pathlib.Path, operation: str) -> None:
    root = tmp_path / "not" / "there"
    store = storage.LocalStore(root)

    with pytest.raises(_errors.BucketNotFound) as caught:
        await OPERATIONS[operation](store)

    assert f"file://{root}" in str(caught.value)
    assert f"mkdir -p {root}" in str(caught.value)
    assert not root.exists()  # never created behind the user's back


async def test_local_root_that_is_a_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    store = storage.LocalStore(tmp_path / "file")

    with pytest.raises(_errors.BucketNotFound, match="is not a directory"):
        await store.check()
    with pytest.raises(_errors.BucketNotFound):
        await store.put_new("k", b"")


async def test_local_create_makes_the_directory(tmp_path: pathlib.Path) -> None:
    store = storage.LocalStore.create(tmp_path / "new" / "account")

    await store.check()
    await store.put_new("k", b"v")
    assert (tmp_path / "new" / "account" / "k").read_bytes() == b"v"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
async def test_local_directory_without_write_permission(tmp_path: pathlib.Path) -> None:
    root = tmp_path / "readonly"
    root.mkdir(mode=0o500)
    store = storage.LocalStore(root)
    try:
        with pytest.raises(_errors.AccessDenied, match="permissions"):
            await store.check()
        with pytest.raises(_errors.AccessDenied):
            await store.put_new("k", b"")
    finally:
        root.chmod(0o700)


# -- unreachable or failing endpoint --------------------------------------------------


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections (bound, never listening)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_unreachable_endpoint_fails_after_retries_within_seconds(
    closed_port: int, aws_test_credentials: None
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    url = f"s3://bucket/p?endpoint={endpoint}&region=us-east-1"
    started = time.monotonic()
    async with _s3_store(url, max_attempts=2, connect_timeout=0.5, read_timeout=0.5) as store:
        with pytest.raises(_errors.StorageUnavailable) as caught:
            await store.put_new("seg/1", b"data")

    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"cannot reach {endpoint}" in message
    assert "2 attempts" in message
    assert "'seg/1'" in message
    _assert_no_secrets(caught.value)


@pytest.mark.parametrize("operation", EVERY_OPERATION)
async def test_unreachable_endpoint_for_every_operation(
    closed_port: int, aws_test_credentials: None, operation: str
) -> None:
    endpoint = f"http://127.0.0.1:{closed_port}"
    url = f"s3://bucket/p?endpoint={endpoint}&region=us-east-1"
    call = EVERY_OPERATION[operation]
    async with _s3_store(url, max_attempts=1, connect_timeout=0.5, read_timeout=0.5) as store:
        with pytest.raises(_errors.StorageUnavailable, match=f"cannot reach {endpoint}") as caught:
            await call(store)
    _assert_no_secrets(caught.value)


class _AlwaysBusy(http.server.BaseHTTPRequestHandler):
    """Answers every request with S3's 503 SlowDown, and counts them."""

    requests = 0

    def _busy(self) -> None:
        type(self).requests += 1
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = b"<Error><Code>SlowDown</Code><Message>Reduce your request rate.</Message></Error>"
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _busy

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def busy_endpoint() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysBusy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


async def test_endpoint_failing_with_5xx_after_retries(
    busy_endpoint: str, aws_test_credentials: None
) -> None:
    url = f"s3://bucket/p?endpoint={busy_endpoint}&region=us-east-1"
    _AlwaysBusy.requests = 0
    async with _s3_store(url, max_attempts=2, connect_timeout=1, read_timeout=1) as store:
        with pytest.raises(_errors.StorageUnavailable) as caught:
            await store.get("seg/1")

    assert _AlwaysBusy.requests == 2  # botocore retried once, then gave up
    message = str(caught.value)
    assert busy_endpoint in message
    assert "after 2 attempts" in message
    assert "SlowDown" in message
    assert "'seg/1'" in message
    _assert_no_secrets(caught.value)


class _BreaksOffOnce(http.server.BaseHTTPRequestHandler):
    """Serves one object, but hangs up halfway through the body the first time."""

    protocol_version = "HTTP/1.1"
    body = bytes(range(256)) * 64
    requests = 0

    def do_GET(self) -> None:
        type(self).requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body)))
        self.send_header("ETag", '"0123456789abcdef0123456789abcdef"')
        self.end_headers()
        if type(self).requests == 1:
            self.wfile.write(self.body[: len(self.body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self.wfile.write(self.body)

    def log_message(self, format: str, *args: object) -> None:
        pass


async def test_a_body_that_breaks_off_is_read_again(aws_test_credentials: None) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BreaksOffOnce)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"s3://bucket/p?endpoint=http://127.0.0.1:{server.server_address[1]}"
        async with _s3_store(url, max_attempts=2, connect_timeout=1, read_timeout=1) as store:
            got = await store.get("seg/1")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    assert got.data == _BreaksOffOnce.body
    assert _BreaksOffOnce.requests == 2


# -- credentials ------------------------------------------------------------------------


class AuthServer:
    """A moto server that checks signatures and IAM policies, with two users."""

    def __init__(self, server: s3server.MotoServer) -> None:
        self.server = server
        self.url = f"s3://guarded/p?endpoint={server.endpoint}&region=us-east-1"
        iam = server.client("iam")
        allow_s3 = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.create_user(UserName="writer")
        iam.put_user_policy(UserName="writer", PolicyName="s3", PolicyDocument=json.dumps(allow_s3))
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        self.writer = storage.S3Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        iam.create_user(UserName="nobody")  # no policy: may do nothing
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        self.nobody = storage.S3Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        server.create_bucket("guarded")
        server.enforce_auth()  # from here on, every request is checked


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    server = s3server.MotoServer.start()
    try:
        yield AuthServer(server)
    finally:
        server.stop()


@pytest.fixture
async def writer_store(auth_server: AuthServer) -> AsyncIterator[storage.ObjectStore]:
    async with storage.open_store(auth_server.url, credentials=auth_server.writer) as store:
        yield store


async def test_right_credentials_work_on_the_checking_server(
    writer_store: storage.ObjectStore,
) -> None:
    await writer_store.check()
    info = await writer_store.put_new(f"ok/{time.monotonic_ns()}", b"signed")
    assert (await writer_store.get(info.key)).data == b"signed"


@pytest.mark.parametrize("operation", OPERATIONS)
async def test_wrong_secret_key(
    auth_server: AuthServer, writer_store: storage.ObjectStore, operation: str
) -> None:
    await writer_store.put_new(f"seg/{operation}", b"exists")  # refusals are not "missing"
    wrong = storage.S3Credentials(auth_server.writer.access_key_id, SECRET)
    async with storage.open_store(auth_server.url, credentials=wrong) as store:
        with pytest.raises(_errors.AccessDenied) as caught:
            await OPERATIONS[operation](store)

    message = str(caught.value)
    if operation != "check":  # a HEAD response has no body to name the error
        assert "SignatureDoesNotMatch" in message
    assert "check the credentials Secret" in message
    assert auth_server.server.endpoint in message
    _assert_no_secrets(caught.value)


async def test_invalid_session_token(auth_server: AuthServer) -> None:
    writer = auth_server.writer
    wrong = storage.S3Credentials(writer.access_key_id, writer.secret_access_key, TOKEN)
    async with storage.open_store(auth_server.url, credentials=wrong) as store:
        with pytest.raises(_errors.AccessDenied, match="InvalidToken") as caught:
            await store.put_new("seg/1", b"x")
    _assert_no_secrets(caught.value)
    assert writer.secret_access_key not in str(caught.value)


async def test_unknown_access_key(auth_server: AuthServer) -> None:
    unknown = storage.S3Credentials("AKIDNOTKNOWNHERE0000", SECRET)
    async with storage.open_store(auth_server.url, credentials=unknown) as store:
        with pytest.raises(_errors.AccessDenied, match="InvalidAccessKeyId") as caught:
            await store.put_new("seg/1", b"x")
    _assert_no_secrets(caught.value)


async def test_credentials_without_permission(auth_server: AuthServer) -> None:
    async with storage.open_store(auth_server.url, credentials=auth_server.nobody) as store:
        with pytest.raises(_errors.AccessDenied, match="AccessDenied") as caught:
            await store.get("seg/1")
        with pytest.raises(_errors.AccessDenied):
            await store.check()
    assert auth_server.nobody.secret_access_key not in str(caught.value)


async def test_no_credentials_at_all(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    async with storage.open_store(s3_url) as store:
        with pytest.raises(_errors.AccessDenied, match="no usable credentials"):
            await asyncio.wait_for(store.check(), timeout=10)
