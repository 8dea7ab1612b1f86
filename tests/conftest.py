"""Storage fixtures shared by the whole suite: S3 servers, storage URLs and stores.

- ``s3_server``: one moto server per test session (per xdist worker).
- ``s3_url``: a fresh, empty bucket on it, as a storage-account URL; dummy
  AWS credentials are set in the environment for the test only.
- ``store_kind`` / ``store_url`` / ``store_factory`` / ``store``: one storage
  account per test, parametrized over every backend: ``memory``, ``local`` (a
  temporary directory), ``s3`` (moto) and ``s3-env`` (an external endpoint
  such as LocalStack or MinIO, named by ``EBBTIDE_TEST_S3_URL`` with
  credentials from the standard AWS variables; skipped when it is unset).

Engine- and NBD-specific fixtures live in their own directories' conftest.py.
"""

from __future__ import annotations

import os
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import botocore.exceptions
import pytest

from ebbtide_engine import storage
from tests import s3server

S3_ENV_VARIABLE = "EBBTIDE_TEST_S3_URL"
STORE_KINDS = [
    "memory",
    "local",
    "s3",
    pytest.param(
        "s3-env",
        marks=pytest.mark.skipif(
            not os.environ.get(S3_ENV_VARIABLE),
            reason=f"{S3_ENV_VARIABLE} is not set (see localstack/README.md)",
        ),
    ),
]

StoreFactory = Callable[[], storage.ObjectStore]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[s3server.MotoServer]:
    """A moto S3 server on 127.0.0.1, started once for the session."""
    server = s3server.MotoServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws_test_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials in the environment, and nothing of the developer's."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3server.DUMMY_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3server.DUMMY_SECRET_KEY)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_url(s3_server: s3server.MotoServer, aws_test_credentials: None) -> str:
    """An empty bucket on the moto server (wiped first), as ``s3://`` URL with a prefix."""
    s3_server.reset()
    bucket = "ebbtide-test"
    s3_server.create_bucket(bucket)
    return f"s3://{bucket}/tenant/account?endpoint={s3_server.endpoint}&region={s3server.REGION}"


@pytest.fixture
def s3_env_url() -> Iterator[str]:
    """A fresh prefix under ``EBBTIDE_TEST_S3_URL``; its objects are deleted afterwards."""
    base = os.environ.get(S3_ENV_VARIABLE)
    if not base:
        pytest.skip(f"{S3_ENV_VARIABLE} is not set (see localstack/README.md)")
    account = storage.StorageAccount.parse(base)
    test_prefix = f"{account.prefix}ebbtide-test-{uuid.uuid4().hex[:12]}"
    parts = urllib.parse.urlsplit(base)
    url = urllib.parse.urlunsplit(parts._replace(path=f"/{test_prefix}"))
    region = account.region or "us-east-1"
    client = s3server.client("s3", endpoint=account.endpoint_url, region=region)
    try:
        client.head_bucket(Bucket=account.bucket)
    except botocore.exceptions.ClientError:
        if region == "us-east-1":  # the one region that takes no location
            client.create_bucket(Bucket=account.bucket)
        else:
            where = {"LocationConstraint": region}
            client.create_bucket(Bucket=account.bucket, CreateBucketConfiguration=where)
    try:
        yield url
    finally:
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=account.bucket, Prefix=f"{test_prefix}/"):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=account.bucket, Key=item["Key"])


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest) -> str:
    """Which backend the storage fixtures below use for this test."""
    kind: str = request.param
    return kind


@pytest.fixture
def store_url(
    store_kind: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """The URL of an empty storage account of kind ``store_kind``."""
    if store_kind == "memory":
        return f"memory://test-{uuid.uuid4().hex}"
    if store_kind == "local":
        root = tmp_path_factory.mktemp("account")
        return root.as_uri()
    url: str = request.getfixturevalue("s3_url" if store_kind == "s3" else "s3_env_url")
    return url


@pytest.fixture
async def store_factory(store_kind: str, store_url: str) -> AsyncIterator[StoreFactory]:
    """Opens stores on one account, as separate processes would; closed at teardown.

    Memory stores are shared per name within the process, so every call gives
    the same one; the others are independent clients of the same account.
    """
    opened: list[storage.ObjectStore] = []
    # Not through open_store(): its registry of memory stores lives as long as
    # the process, and this one should go with the test.
    shared = (
        storage.MemoryStore(store_url.removeprefix("memory://")) if store_kind == "memory" else None
    )

    def open_store() -> storage.ObjectStore:
        store = shared or storage.open_store(store_url)
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


@pytest.fixture
async def store(store_factory: StoreFactory) -> storage.ObjectStore:
    """An empty storage account of every kind (see ``store_kind``)."""
    return store_factory()
