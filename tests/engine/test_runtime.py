"""The write path end to end on every backend: journal, checkpoint, recover, restart."""

from __future__ import annotations

import asyncio
import datetime
import os
import pathlib
import random

import pytest

import ebbtide_engine as ebbtide
from tests.conftest import StoreFactory
from tests.engine import model
from tests.engine.conftest import FaultyStore


async def _recover(
    store: ebbtide.ObjectStore, selector: ebbtide.CheckpointSelector, out: pathlib.Path
) -> ebbtide.RecoveryResult:
    return await ebbtide.recover_to_files(store, "vpg", selector, out)


async def test_recovery_at_each_checkpoint_is_exact(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    spec = model.spec()
    disks = model.DisksModel(spec)
    rng = random.Random(7)
    store = store_factory()
    runtime = await ebbtide.VpgRuntime.open(spec, store, options=model.options())
    checkpoint_ids = []
    for round_ in range(4):
        for _ in range(40):
            vm, disk = rng.choice([("web", "root"), ("web", "data"), ("db", "log")])
            size = spec.vm(vm).disks[[d.name for d in spec.vm(vm).disks].index(disk)].size
            offset = rng.randrange(size - 1)
            length = rng.randint(1, min(9000, size - offset))
            roll = rng.random()
            if roll < 0.8:
                data = rng.randbytes(length)
                await runtime.write(vm, disk, offset, data)
                disks.write(vm, disk, offset, data)
            elif roll < 0.9:
                await runtime.trim(vm, disk, offset, length)
                disks.zero(vm, disk, offset, length)
            else:
                await runtime.write_zeroes(vm, disk, offset, length)
                disks.zero(vm, disk, offset, length)
        checkpoint = await runtime.checkpoint(tag=f"round-{round_}")
        disks.checkpoint(checkpoint.id)
        checkpoint_ids.append(checkpoint.id)
    # Writes after the last checkpoint must not leak into it.
    await runtime.write("web", "root", 0, b"\xff" * 4096)
    await runtime.abort()

    reader = store_factory()
    listed = [c.id for c in await ebbtide.list_checkpoints(reader, "vpg")]
    assert listed == checkpoint_ids
    for checkpoint_id in checkpoint_ids:
        out = tmp_path / str(checkpoint_id)
        result = await _recover(reader, ebbtide.CheckpointSelector(id=checkpoint_id), out)
        assert result.checkpoint.id == checkpoint_id
        disks.assert_recovered(checkpoint_id, out)


async def test_selectors_tag_time_latest_and_chosen_vms(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    now = [1_800_000_000.0]
    store = store_factory()
    spec = model.spec()
    runtime = await ebbtide.VpgRuntime.open(
        spec, store, options=model.options(clock=lambda: now[0])
    )
    await runtime.write("web", "root", 0, b"A" * 512)
    first = await runtime.checkpoint(tag="before-upgrade")
    now[0] += 60
    await runtime.write("web", "root", 0, b"B" * 512)
    await runtime.write("db", "log", 0, b"C" * 512)
    second = await runtime.checkpoint(ebbtide.CheckpointKind.APPLICATION_CONSISTENT, "app")
    await runtime.close()

    at = datetime.datetime.fromtimestamp(now[0] - 30, tz=datetime.UTC)
    for selector, expected in [
        (ebbtide.CheckpointSelector(tag="before-upgrade"), first),
        (ebbtide.CheckpointSelector.parse(f"before:{at.isoformat()}"), first),
        (ebbtide.CheckpointSelector.parse(f"id:{second.id}"), second),
    ]:
        result = await _recover(store, selector, tmp_path / str(expected.id))
        assert result.checkpoint == expected
    assert second.kind is ebbtide.CheckpointKind.APPLICATION_CONSISTENT

    latest = await _recover(store, ebbtide.CheckpointSelector(latest=True), tmp_path / "latest")
    assert latest.checkpoint.id > second.id  # close() commits a final checkpoint
    assert (tmp_path / "latest/web/root.raw").read_bytes()[:512] == b"B" * 512

    only_db = await ebbtide.recover_to_files(
        store, "vpg", ebbtide.CheckpointSelector(id=second.id), tmp_path / "db-only", vms=["db"]
    )
    assert [(d.vm, d.disk) for d in only_db.disks] == [("db", "log")]
    assert not (tmp_path / "db-only/web").exists()

    with pytest.raises(ebbtide.CheckpointNotFound, match="tags: app, before-upgrade"):
        await _recover(store, ebbtide.CheckpointSelector(tag="nope"), tmp_path / "x")
    with pytest.raises(ebbtide.InvalidRequest, match="no VM 'mail'"):
        await ebbtide.recover_to_files(
            store, "vpg", ebbtide.CheckpointSelector(latest=True), tmp_path / "y", vms=["mail"]
        )
    with pytest.raises(ebbtide.CheckpointNotFound, match="holds no VPG named 'other'"):
        await ebbtide.list_checkpoints(store, "other")


async def test_restart_rebuilds_state_from_the_bucket(store_factory: StoreFactory) -> None:
    spec = model.spec()
    first = await ebbtide.VpgRuntime.open(spec, store_factory(), options=model.options())
    await first.write("web", "root", 0, b"x" * 100)
    checkpoint = await first.checkpoint()
    await first.close()
    assert first.status().state == "closed"

    second = await ebbtide.VpgRuntime.open(spec, store_factory(), options=model.options())
    status = second.status()
    assert status.epoch == first.status().epoch + 1
    assert status.next_lsn > checkpoint.id
    assert status.previous_writer is not None
    assert status.previous_writer.clean_shutdown
    assert next(c.id for c in second.list_checkpoints()) == checkpoint.id
    # Unshipped writes of a crashed writer are void, and reported as such.
    await second.write("web", "root", 0, b"y" * 100)
    kept = await second.checkpoint()
    for _ in range(2):  # past segmentMaxBytes: sealed and shipped on size
        await second.write("web", "root", 0, os.urandom(40_000))
    await asyncio.wait_for(_until(lambda: second.status().pending_uploads == 0), 10)
    await second.abort()

    third = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(takeover="force")
    )
    previous = third.status().previous_writer
    assert previous is not None
    assert not previous.clean_shutdown
    assert previous.last_checkpoint == kept.id
    assert previous.void_segments == 1
    assert previous.void_bytes > 80_000
    await third.close()


async def test_failed_uploads_are_retried_and_nothing_is_listed_before_it_is_durable(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    store = FaultyStore(store_factory())
    spec = model.spec()
    runtime = await ebbtide.VpgRuntime.open(spec, store, options=model.options())
    store.fail_puts, store.after_landing = 3, True  # lands, but the reply is "lost"
    await runtime.write("web", "root", 0, b"1" * 1000)
    first = await runtime.checkpoint()
    assert store.failed == 3
    assert runtime.status().upload_retries >= 2  # a retry that finds its own object is no failure
    assert "injected failure" in (runtime.status().last_error or "")

    store.gate.clear()  # the bucket stalls
    await runtime.write("db", "log", 0, b"2" * 1000)
    pending = runtime.request_checkpoint(ebbtide.CheckpointKind.TAGGED, "stalled")
    await asyncio.sleep(0)  # give the uploaders a turn; nothing can land
    listed = await ebbtide.list_checkpoints(store_factory(), "vpg")
    assert [c.id for c in listed] == [first.id]
    assert runtime.status().rpo_seconds is not None
    store.gate.set()
    second = await asyncio.wait_for(pending, 10)
    assert second is not None
    assert second.tag == "stalled"
    await runtime.close()
    await _recover(store, ebbtide.CheckpointSelector(tag="stalled"), tmp_path)
    assert (tmp_path / "db/log.raw").read_bytes()[:1000] == b"2" * 1000


async def test_unshipped_data_is_bounded_and_writers_wait(store_factory: StoreFactory) -> None:
    store = FaultyStore(store_factory())
    spec = model.spec(journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"})
    runtime = await ebbtide.VpgRuntime.open(spec, store, options=model.options())
    store.gate.clear()
    chunk = os.urandom(32 * 1024)
    written = 0

    async def writer() -> None:
        nonlocal written
        for i in range(64):  # 2 MiB, twice the bound
            await runtime.write("web", "root", (i % 2) * len(chunk), chunk)
            written += len(chunk)

    task = asyncio.ensure_future(writer())
    await _until(lambda: runtime.status().unshipped_bytes >= (1 << 20) - len(chunk))
    await asyncio.sleep(0.05)  # the writer had time to go on, and must not have
    assert not task.done()
    assert runtime.status().unshipped_bytes <= 1 << 20
    assert written < 2 << 20
    store.gate.set()
    await asyncio.wait_for(task, 20)
    checkpoint = await runtime.checkpoint()
    assert written == 2 << 20
    assert checkpoint.id > 64
    await runtime.close()


async def test_bad_requests_are_refused_with_the_reason(store_factory: StoreFactory) -> None:
    runtime = await ebbtide.VpgRuntime.open(model.spec(), store_factory(), options=model.options())
    with pytest.raises(ebbtide.InvalidRequest, match="no disk 'swap' in VM 'web'"):
        await runtime.write("web", "swap", 0, b"x")
    with pytest.raises(ebbtide.InvalidRequest, match="outside the disk"):
        await runtime.write("db", "log", 40 * 1024 - 1, b"xy")
    with pytest.raises(ebbtide.InvalidRequest, match="outside the disk"):
        await runtime.trim("db", "log", -1, 10)
    await runtime.close()
    with pytest.raises(ebbtide.RuntimeClosed):
        await runtime.write("web", "root", 0, b"x")


async def _until(predicate: object, within: float = 10.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)
