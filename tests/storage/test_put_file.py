"""``ObjectStore.put_file``: a file of any size streamed into an object, on every backend.

The recovery operator uploads disk images this way (``copy_to_account``), so
these are the promises it relies on: the bytes round-trip over many parts, an
existing object is replaced, a failure or a cancellation leaves the old
object (or none) and, on S3, no multipart upload behind, and memory stays
near ``part_size * concurrency`` however large the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import pathlib
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any

import botocore.exceptions
import pytest

from ebbtide_engine import _errors, storage
from ebbtide_engine.storage import _local, _s3
from tests import s3server
from tests.storage.test_errors import SECRET, AuthServer, _assert_no_secrets, _s3_store

MIB = 1 << 20
PART = 5 * MIB  # S3's smallest part: the other backends take it as it is


def _write(path: pathlib.Path, size: int) -> bytes:
    """A file of ``size`` bytes whose every MiB differs (a part swap would show)."""
    data = b"".join(
        hashlib.sha256(i.to_bytes(8, "big")).digest() * (MIB // 32) for i in range(-(-size // MIB))
    )[:size]
    path.write_bytes(data)
    return data


def _write_bytes(path: pathlib.Path, data: bytes) -> None:
    path.write_bytes(data)


def _client_error(code: str, status: int, operation: str) -> botocore.exceptions.ClientError:
    """What botocore raises when the server answered ``status`` with S3 error ``code``."""
    response: Any = {"Error": {"Code": code, "Message": "injected"}}
    response["ResponseMetadata"] = {"HTTPStatusCode": status}
    return botocore.exceptions.ClientError(response, operation)


def _uploads(store: storage.ObjectStore) -> list[dict[str, Any]]:
    """The bucket's unfinished multipart uploads under the store's prefix (S3 only)."""
    assert isinstance(store, storage.S3Store)
    client = s3server.client("s3", endpoint=store.endpoint_url, region=s3server.REGION)
    found = client.list_multipart_uploads(Bucket=store.bucket, Prefix=store.prefix)
    uploads: list[dict[str, Any]] = found.get("Uploads", [])
    return uploads


def _leftovers(store: storage.ObjectStore) -> list[str]:
    """What a failed put_file may have left: S3 uploads, local temporary files."""
    if isinstance(store, storage.S3Store):
        return [upload["Key"] for upload in _uploads(store)]
    if isinstance(store, storage.LocalStore):
        tmp = store.root / ".ebbtide" / "tmp"
        return sorted(p.name for p in tmp.iterdir()) if tmp.exists() else []
    return []


@pytest.fixture
def source(tmp_path: pathlib.Path) -> pathlib.Path:
    return tmp_path / "disk.raw"


# -- round trips -----------------------------------------------------------------------


async def test_a_file_of_several_parts_round_trips(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    data = _write(source, 3 * PART + 12345)  # three whole parts and a short last one
    seen: list[int] = []

    info = await store.put_file("images/disk.raw", source, part_size=PART, progress=seen.append)

    assert (info.key, info.size) == ("images/disk.raw", len(data))
    assert await store.head("images/disk.raw") == info
    got = await store.get("images/disk.raw")
    assert got.size == len(data)
    assert got.data == data
    assert got.etag == info.etag
    assert (await store.get("images/disk.raw", byte_range=(PART - 3, PART + 3))).data == data[
        PART - 3 : PART + 3
    ]
    assert [i.key async for i in store.list("images/")] == ["images/disk.raw"]
    assert seen == sorted(seen)
    assert seen[-1] == len(data)
    assert len(seen) >= 4  # a report per part at least
    assert _leftovers(store) == []
    if isinstance(store, storage.S3Store):
        assert info.etag.endswith("-4")  # a multipart upload of four parts


async def test_a_file_smaller_than_a_part_is_one_put(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    _write_bytes(source, b"a small image")
    seen: list[int] = []

    info = await store.put_file("small", source, part_size=PART, progress=seen.append)

    assert info == storage.ObjectInfo(key="small", size=13, etag=info.etag)
    assert (await store.get("small")).data == b"a small image"
    assert "-" not in info.etag  # an MD5, as put_new's (S3: no multipart upload)
    assert info.etag == (await store.head("small")).etag
    assert seen == [13]


async def test_an_empty_file_is_an_empty_object(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    _write_bytes(source, b"")
    seen: list[int] = []

    info = await store.put_file("empty", source, progress=seen.append)

    assert info.size == 0
    assert info.etag == hashlib.md5(b"", usedforsecurity=False).hexdigest()
    got = await store.get("empty")
    assert (got.data, got.size, got.etag) == (b"", 0, info.etag)
    assert seen == [0]


async def test_put_file_replaces_an_existing_object(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    await store.put_new("images/disk.raw", b"the image of an earlier attempt")
    data = _write(source, 2 * PART + 1)

    first = await store.put_file("images/disk.raw", source, part_size=PART)
    assert (await store.get("images/disk.raw")).data == data

    _write_bytes(source, b"shorter now")
    second = await store.put_file("images/disk.raw", source, part_size=PART)
    got = await store.get("images/disk.raw")
    assert (got.data, got.etag, got.size) == (b"shorter now", second.etag, 11)
    assert second.etag != first.etag
    assert [i.key async for i in store.list("")] == ["images/disk.raw"]


async def test_concurrency_one_and_many_give_the_same_object(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    data = _write(source, 4 * PART)

    one = await store.put_file("one", source, part_size=PART, concurrency=1)
    many = await store.put_file("many", source, part_size=PART, concurrency=8)

    assert one.etag == many.etag
    assert (await store.get("many")).data == data


async def test_bad_options_and_an_unreadable_file_store_nothing(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await store.put_file("k", source)  # it does not exist
    _write_bytes(source, b"x")
    with pytest.raises(ValueError, match="part_size must be at least 1"):
        await store.put_file("k", source, part_size=0)
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        await store.put_file("k", source, concurrency=0)

    with pytest.raises(_errors.ObjectNotFound):
        await store.head("k")
    assert _leftovers(store) == []


# -- failures and cancellation -------------------------------------------------------------


async def test_cancelling_keeps_the_old_object_and_leaves_nothing_behind(
    store: storage.ObjectStore, source: pathlib.Path
) -> None:
    old = await store.put_new("images/disk.raw", b"the old image")
    data = _write(source, 8 * PART)
    started = asyncio.Event()

    def progress(done: int) -> None:
        assert done < len(data), "the upload finished before it was cancelled"
        started.set()

    # Small buffers for memory and local (S3 raises it to 5 MiB): many steps to cancel in.
    upload = asyncio.create_task(
        store.put_file("images/disk.raw", source, part_size=64 << 10, progress=progress)
    )
    await asyncio.wait_for(started.wait(), timeout=30)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload

    got = await store.get("images/disk.raw")
    assert (got.data, got.etag) == (b"the old image", old.etag)
    assert _leftovers(store) == []


async def test_s3_part_failure_aborts_the_upload(
    s3_url: str, source: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _write(source, 6 * PART)
    async with storage.open_store(s3_url) as store:
        assert isinstance(store, storage.S3Store)
        await store.put_new("images/disk.raw", b"the old image")
        client: Any = await store._get_client()
        real_upload_part = client.upload_part
        sent: list[int] = []

        async def upload_part(**kwargs: Any) -> Any:
            sent.append(kwargs["PartNumber"])
            if kwargs["PartNumber"] == 4:  # the server fails one part, after retries
                raise _client_error("InternalError", 500, "UploadPart")
            return await real_upload_part(**kwargs)

        monkeypatch.setattr(client, "upload_part", upload_part)
        with pytest.raises(_errors.StorageUnavailable, match=r"'images/disk\.raw'") as caught:
            await store.put_file("images/disk.raw", source, part_size=PART, concurrency=2)

        assert "InternalError" in str(caught.value)
        assert 4 in sent
        assert _uploads(store) == []  # aborted: no parts left to pay for
        got = await store.get("images/disk.raw")
        assert got.data == b"the old image"
        monkeypatch.undo()  # the same store uploads fine afterwards
        info = await store.put_file("images/disk.raw", source, part_size=PART, concurrency=2)
        assert (await store.get("images/disk.raw")).data == data
        assert info.etag.endswith("-6")


async def test_s3_cancelling_while_the_upload_is_created_aborts_it(
    s3_url: str, source: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(source, 2 * PART)
    store = storage.open_store(s3_url)
    assert isinstance(store, storage.S3Store)
    client: Any = await store._get_client()
    real_create = client.create_multipart_upload
    asked = asyncio.Event()

    async def create(**kwargs: Any) -> Any:
        asked.set()
        await asyncio.sleep(0.2)  # the server is slow to answer; meanwhile, a cancel
        return await real_create(**kwargs)

    monkeypatch.setattr(client, "create_multipart_upload", create)
    upload = asyncio.create_task(store.put_file("k", source, part_size=PART))
    await asyncio.wait_for(asked.wait(), timeout=10)
    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    await store.close()  # waits for the abort of the upload that was being created

    assert _uploads(store) == []
    async with storage.open_store(s3_url) as other:
        with pytest.raises(_errors.ObjectNotFound):
            await other.head("k")


async def test_s3_failure_to_complete_aborts_the_upload(
    s3_url: str, source: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(source, 2 * PART)
    async with storage.open_store(s3_url) as store:
        assert isinstance(store, storage.S3Store)
        client: Any = await store._get_client()

        async def complete(**kwargs: Any) -> Any:
            raise _client_error("AccessDenied", 403, "CompleteMultipartUpload")

        monkeypatch.setattr(client, "complete_multipart_upload", complete)
        with pytest.raises(_errors.AccessDenied, match="put_file refused"):
            await store.put_file("k", source, part_size=PART)
        assert _uploads(store) == []
        with pytest.raises(_errors.ObjectNotFound):
            await store.head("k")


async def test_s3_a_file_that_shrinks_while_uploading_aborts(
    s3_url: str, source: pathlib.Path
) -> None:
    _write(source, 6 * PART)

    def progress(done: int) -> None:
        os.truncate(source, PART)  # the file changed behind the upload's back

    async with storage.open_store(s3_url) as store:
        with pytest.raises(OSError, match="shrank while it was being uploaded"):
            await store.put_file("k", source, part_size=PART, concurrency=1, progress=progress)
        assert _uploads(store) == []
        with pytest.raises(_errors.ObjectNotFound):
            await store.head("k")


async def test_local_failure_before_publishing_keeps_the_old_object(
    tmp_path: pathlib.Path, source: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = storage.LocalStore.create(tmp_path / "account")
    await store.put_new("images/disk.raw", b"the old image")
    _write(source, 3 * PART)

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_local, "_save_etag", full)
    with pytest.raises(_errors.StorageUnavailable, match="No space left on device"):
        await store.put_file("images/disk.raw", source, part_size=PART)

    assert (await store.get("images/disk.raw")).data == b"the old image"
    assert _leftovers(store) == []


async def test_local_a_file_that_shrinks_while_copying_is_refused(
    tmp_path: pathlib.Path, source: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = storage.LocalStore.create(tmp_path / "account")
    _write(source, 3 * PART)
    real_copy = _local._copy

    def copy_after_shrinking(src: int, *args: Any) -> str:
        os.truncate(source, PART)
        return real_copy(src, *args)

    monkeypatch.setattr(_local, "_copy", copy_after_shrinking)
    with pytest.raises(OSError, match="shrank while it was being uploaded"):
        await store.put_file("k", source, part_size=PART)
    with pytest.raises(_errors.ObjectNotFound):
        await store.head("k")
    assert _leftovers(store) == []


# -- memory --------------------------------------------------------------------------------


@pytest.fixture
def traced() -> Iterator[None]:
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("store_kind", ["local", "s3"])
async def test_memory_stays_bounded_by_part_size_times_concurrency(
    store: storage.ObjectStore, source: pathlib.Path, traced: None
) -> None:
    # The memory store keeps whole objects in memory by design: not here.
    data = _write(source, 8 * PART)
    del data
    concurrency = 2
    with contextlib.suppress(_errors.ObjectNotFound):
        await store.head("warm-up")  # the S3 client exists before measuring
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]

    info = await store.put_file("big", source, part_size=PART, concurrency=concurrency)

    peak = tracemalloc.get_traced_memory()[1] - base
    assert info.size == 8 * PART
    # S3: each part in flight is held twice (its bytes, and the copy aiohttp makes of
    # the BytesIO botocore wraps them in); local: one buffer. All eight parts would be
    # 40 MiB (80 with the copies).
    assert peak < (2 * concurrency + 1) * PART, f"peak {peak / MIB:.1f} MiB"


# -- S3's limits and errors ----------------------------------------------------------------


def test_s3_part_size_respects_the_minimum_and_the_part_count() -> None:
    assert _s3.part_size_for(1, 1) == _s3.MIN_PART_SIZE
    assert _s3.part_size_for(100 * MIB, 64 * MIB) == 64 * MIB
    big = 1 << 40  # 1 TiB in 64 MiB parts would be 16,384 parts
    chosen = _s3.part_size_for(big, 64 * MIB)
    assert chosen % MIB == 0
    assert -(-big // chosen) <= _s3.MAX_PARTS
    assert -(-big // (chosen - MIB)) > _s3.MAX_PARTS  # the smallest whole MiB that fits


async def test_s3_part_size_below_the_minimum_is_raised(s3_url: str, source: pathlib.Path) -> None:
    data = _write(source, 2 * PART + 1)
    async with storage.open_store(s3_url) as store:
        info = await store.put_file("k", source, part_size=1024)
        assert info.etag.endswith("-3")  # 5 MiB parts, not 1 KiB ones
        assert (await store.get("k")).data == data


async def test_s3_missing_bucket(
    s3_server: s3server.MotoServer, aws_test_credentials: None, source: pathlib.Path
) -> None:
    url = f"s3://no-such-bucket/p?endpoint={s3_server.endpoint}&region=us-east-1"
    for size in (10, 2 * PART):  # one PUT, and a multipart upload
        _write(source, size)
        async with _s3_store(url) as store:
            with pytest.raises(_errors.BucketNotFound, match="'no-such-bucket' does not exist"):
                await store.put_file("k", source, part_size=PART)


async def test_local_missing_directory(tmp_path: pathlib.Path, source: pathlib.Path) -> None:
    _write_bytes(source, b"x")
    store = storage.LocalStore(tmp_path / "not" / "there")
    with pytest.raises(_errors.BucketNotFound, match="mkdir -p"):
        await store.put_file("k", source)
    assert not (tmp_path / "not").exists()


async def test_local_shape_conflict(tmp_path: pathlib.Path, source: pathlib.Path) -> None:
    store = storage.LocalStore.create(tmp_path / "account")
    await store.put_new("a/b", b"x")
    _write_bytes(source, b"y")
    with pytest.raises(_errors.StorageError, match="cannot hold both"):
        await store.put_file("a", source)
    with pytest.raises(_errors.StorageError, match="cannot hold both"):
        await store.put_file("a/b/c", source)
    assert (await store.get("a/b")).data == b"x"
    assert _leftovers(store) == []


async def test_s3_unreachable_endpoint(aws_test_credentials: None, source: pathlib.Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        url = f"s3://bucket/p?endpoint={endpoint}&region=us-east-1"
        for size in (10, 2 * PART):
            _write(source, size)
            async with _s3_store(url, max_attempts=1, connect_timeout=0.5) as store:
                with pytest.raises(_errors.StorageUnavailable, match=f"cannot reach {endpoint}"):
                    await store.put_file("k", source, part_size=PART)


@pytest.fixture(scope="module")
def auth_server() -> Iterator[AuthServer]:
    server = s3server.MotoServer.start()
    try:
        yield AuthServer(server)
    finally:
        server.stop()


async def test_s3_access_denied(auth_server: AuthServer, source: pathlib.Path) -> None:
    wrong = storage.S3Credentials(auth_server.writer.access_key_id, SECRET)
    for size in (10, 2 * PART):
        _write(source, size)
        async with storage.open_store(auth_server.url, credentials=wrong) as store:
            with pytest.raises(_errors.AccessDenied, match="check the credentials") as caught:
                await store.put_file("k", source, part_size=PART)
        _assert_no_secrets(caught.value)
    async with storage.open_store(auth_server.url, credentials=auth_server.nobody) as store:
        with pytest.raises(_errors.AccessDenied):
            await store.put_file("k", source, part_size=PART)
