"""Corrupt, truncated, missing and foreign objects are reported by name, never used."""

from __future__ import annotations

import pathlib

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import storage
from tests.conftest import StoreFactory
from tests.engine import model


async def _two_checkpoints(store: storage.ObjectStore) -> tuple[int, int]:
    runtime = await ebbtide.VpgRuntime.open(model.spec(), store, options=model.options())
    await runtime.write("web", "root", 0, b"first" * 100)
    first = await runtime.checkpoint()
    await runtime.write("web", "root", 4096, b"second" * 100)
    second = await runtime.checkpoint()
    await runtime.close()
    return first.id, second.id


async def _segment_keys(store: storage.ObjectStore, vm: str) -> list[str]:
    return [info.key async for info in store.list(f"vpgs/vpg/journal/{vm}/")]


async def _replace(store: storage.ObjectStore, key: str, data: bytes) -> None:
    await store.delete(key)
    await store.put_new(key, data)


@pytest.mark.parametrize("damage", ["bitflip", "truncate", "garbage"])
async def test_a_damaged_segment_is_named_and_earlier_checkpoints_still_recover(
    store_factory: StoreFactory, tmp_path: pathlib.Path, damage: str
) -> None:
    store = store_factory()
    first, second = await _two_checkpoints(store)
    key = (await _segment_keys(store, "web"))[1]  # the one only the second checkpoint needs
    body = (await store.get(key)).data
    if damage == "bitflip":
        broken = bytearray(body)
        broken[len(broken) // 3] ^= 0x10
        body = bytes(broken)
    elif damage == "truncate":
        body = body[: len(body) // 2]
    else:
        body = b"not arrow at all"
    await _replace(store, key, body)

    with pytest.raises(ebbtide.CorruptObjectError) as caught:
        await ebbtide.recover_to_files(
            store, "vpg", ebbtide.CheckpointSelector(id=second), tmp_path / "second"
        )
    assert caught.value.key == key
    assert key in str(caught.value)
    assert not list((tmp_path / "second").rglob("*.raw")), "no half-recovered image is left"
    assert not list((tmp_path / "second").rglob("*.partial"))

    await ebbtide.recover_to_files(
        store, "vpg", ebbtide.CheckpointSelector(id=first), tmp_path / "first"
    )
    assert (tmp_path / "first/web/root.raw").read_bytes()[:500] == b"first" * 100


async def test_a_missing_segment_is_detected_not_silently_skipped(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    store = store_factory()
    _first, second = await _two_checkpoints(store)
    keys = await _segment_keys(store, "web")
    await store.delete(keys[0])  # the first segment: the chain check must catch it
    with pytest.raises(ebbtide.CorruptObjectError, match="a segment is missing"):
        await ebbtide.recover_to_files(
            store, "vpg", ebbtide.CheckpointSelector(id=second), tmp_path / "a"
        )
    await store.delete(keys[1])  # now the tail is gone too: the cut's positions catch it
    with pytest.raises(ebbtide.CorruptObjectError, match="a segment is missing"):
        await ebbtide.recover_to_files(
            store, "vpg", ebbtide.CheckpointSelector(id=second), tmp_path / "b"
        )


async def test_a_corrupt_index_entry_is_named(store_factory: StoreFactory) -> None:
    store = store_factory()
    await _two_checkpoints(store)
    key = "vpgs/vpg/index/log/00000000000000000002.arrow"
    body = bytearray((await store.get(key)).data)
    body[len(body) // 2] ^= 0xFF
    await _replace(store, key, bytes(body))
    with pytest.raises(ebbtide.CorruptObjectError, match=key):
        await ebbtide.list_checkpoints(store, "vpg")
    # A writer refuses to start on a damaged index rather than build on it.
    with pytest.raises(ebbtide.CorruptObjectError, match=key):
        await ebbtide.VpgRuntime.open(model.spec(), store, options=model.options())


async def test_an_index_entry_under_the_wrong_name_is_refused(
    store_factory: StoreFactory,
) -> None:
    store = store_factory()
    await _two_checkpoints(store)
    two = "vpgs/vpg/index/log/00000000000000000002.arrow"
    three = "vpgs/vpg/index/log/00000000000000000003.arrow"
    await _replace(store, three, (await store.get(two)).data)
    with pytest.raises(ebbtide.CorruptObjectError, match="its name says 3"):
        await ebbtide.list_checkpoints(store, "vpg")


async def test_a_newer_format_version_is_refused_with_advice(store_factory: StoreFactory) -> None:
    store = store_factory()
    await _two_checkpoints(store)
    manifest = (await store.get("vpgs/vpg/manifest.json")).data
    await _replace(
        store, "vpgs/vpg/manifest.json", manifest.replace(b'"version": 1', b'"version": 9')
    )
    with pytest.raises(ebbtide.CorruptObjectError, match="upgrade Ebbtide"):
        await ebbtide.list_checkpoints(store, "vpg")
