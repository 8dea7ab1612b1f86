"""A runtime on an unusable storage account fails at open with what to fix, writing nothing."""

from __future__ import annotations

import pathlib
import time

import pytest

import ebbtide_engine as ebbtide
from tests import s3server
from tests.engine import model


async def test_missing_local_directory(tmp_path: pathlib.Path) -> None:
    store = ebbtide.open_store((tmp_path / "nowhere").as_uri())
    with pytest.raises(ebbtide.BucketNotFound, match="nowhere"):
        await ebbtide.VpgRuntime.open(model.spec(), store, options=model.options())


async def test_missing_bucket(s3_url: str) -> None:
    url = s3_url.replace("s3://ebbtide-test/", "s3://no-such-bucket/")
    store = ebbtide.open_store(url)
    try:
        with pytest.raises(ebbtide.BucketNotFound, match="no-such-bucket"):
            await ebbtide.VpgRuntime.open(model.spec(), store, options=model.options())
    finally:
        await store.close()


async def test_unreachable_endpoint_fails_fast_and_names_it(aws_test_credentials: None) -> None:
    port = s3server.free_port()
    store = ebbtide.open_store(
        f"s3://bucket?endpoint=http://127.0.0.1:{port}", max_attempts=2, connect_timeout=1
    )
    started = time.monotonic()
    try:
        with pytest.raises(ebbtide.StorageUnavailable, match=f"127.0.0.1:{port}"):
            await ebbtide.VpgRuntime.open(model.spec(), store, options=model.options())
    finally:
        await store.close()
    assert time.monotonic() - started < 15
