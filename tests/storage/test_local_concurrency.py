"""The local-directory account under concurrent deletes and puts in the same directories.

Promotion's garbage collection deletes many journal segments and chunks of one
directory at once. A delete prunes the directories it leaves empty, so
another delete (or put) in the same directory may find its directory gone
between its unlink and its directory fsync: that must neither fail nor lose
durability (the nearest directory still there is fsynced instead).
"""

from __future__ import annotations

import asyncio
import os
import pathlib

import pytest

from ebbtide_engine import storage
from ebbtide_engine.storage import _local


@pytest.fixture
def local_root(tmp_path: pathlib.Path) -> pathlib.Path:
    root = tmp_path / "account"
    root.mkdir()
    return root


async def _keys(store: storage.ObjectStore, prefix: str = "") -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_concurrent_deletes_in_one_directory_all_succeed(local_root: pathlib.Path) -> None:
    store = storage.LocalStore(local_root)
    for round_ in range(30):
        keys = [f"v/journal/r{round_}/seg{i}" for i in range(8)]
        await asyncio.gather(*(store.put_new(key, b"x" * 100) for key in keys))

        await asyncio.gather(*(store.delete(key) for key in keys))

        assert await _keys(store, f"v/journal/r{round_}/") == []
        assert not (local_root / "v" / "journal" / f"r{round_}").exists()
    assert not (local_root / "v").exists()  # every emptied directory pruned


async def test_concurrent_deletes_and_puts_in_one_directory(local_root: pathlib.Path) -> None:
    store = storage.LocalStore(local_root)
    for round_ in range(20):
        old = [f"m/chunk/r{round_}/old{i}" for i in range(6)]
        new = [f"m/chunk/r{round_}/new{i}" for i in range(3)]
        await asyncio.gather(*(store.put_new(key, b"o") for key in old))

        await asyncio.gather(
            *(store.delete(key) for key in old), *(store.put_new(key, b"n") for key in new)
        )

        assert await _keys(store, f"m/chunk/r{round_}/") == sorted(new)
        for key in new:
            assert (await store.get(key)).data == b"n"


async def test_delete_fsyncs_the_nearest_directory_left(
    local_root: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race made deterministic: another delete prunes the directory (and its
    # parent) between this delete's unlink and its directory fsync.
    store = storage.LocalStore(local_root)
    await store.put_new("a/b/c/obj", b"x")
    synced: list[pathlib.Path] = []
    real_fsync_dir = _local._fsync_dir

    def fsync_dir(path: pathlib.Path) -> None:
        if path == local_root / "a" / "b" / "c" and not synced:
            os.rmdir(path)  # what a concurrent delete's pruning does
            os.rmdir(path.parent)
        synced.append(path)
        real_fsync_dir(path)

    monkeypatch.setattr(_local, "_fsync_dir", fsync_dir)

    await store.delete("a/b/c/obj")

    assert local_root / "a" in synced  # the nearest directory still there was fsynced
    assert await _keys(store) == []
