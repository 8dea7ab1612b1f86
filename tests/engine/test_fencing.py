"""Two writers for one VPG never both succeed, and a fenced one cannot hurt the other."""

from __future__ import annotations

import asyncio
import pathlib
import time

import pytest

import ebbtide_engine as ebbtide
from tests.conftest import StoreFactory
from tests.engine import model


async def test_a_second_writer_is_refused_while_the_first_is_alive(
    store_factory: StoreFactory,
) -> None:
    spec = model.spec()
    first = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(writer_id="node-a")
    )
    with pytest.raises(ebbtide.FencedError, match="being written by 'node-a'") as refused:
        await ebbtide.VpgRuntime.open(
            spec, store_factory(), options=model.options(writer_id="node-b", takeover="fail")
        )
    assert "Stop the other writer" in str(refused.value)
    # Waiting does not help while the first keeps renewing its lease.
    started = time.monotonic()
    with pytest.raises(ebbtide.FencedError, match="node-a"):
        await ebbtide.VpgRuntime.open(
            spec,
            store_factory(),
            options=model.options(writer_id="node-c", takeover="wait", lease_seconds=0.5),
        )
    assert time.monotonic() - started >= 2 * 1.0  # three of the holder's 1 s leases, about
    await first.write("web", "root", 0, b"still mine")
    await first.checkpoint()
    await first.close()


async def test_a_dead_writers_lease_expires_and_the_next_one_takes_over(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    spec = model.spec()
    first = await ebbtide.VpgRuntime.open(spec, store_factory(), options=model.options())
    await first.write("web", "root", 0, b"before the crash")
    kept = await first.checkpoint()
    await first.abort()  # stops renewing, as a killed process would

    started = time.monotonic()
    second = await ebbtide.VpgRuntime.open(spec, store_factory(), options=model.options())
    assert time.monotonic() - started >= 1.0  # it waited for one lease period unchanged
    assert second.status().epoch == first.status().epoch + 1
    await second.close()
    await ebbtide.recover_to_files(
        store_factory(), "vpg", ebbtide.CheckpointSelector(id=kept.id), tmp_path
    )
    assert (tmp_path / "web/root.raw").read_bytes()[:16] == b"before the crash"


async def test_a_forced_takeover_fences_the_old_writer_without_harming_data(
    store_factory: StoreFactory, tmp_path: pathlib.Path
) -> None:
    spec = model.spec()
    disks = model.DisksModel(spec)
    # A long lease: this old writer must find out from its index append, not a renewal.
    old = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(writer_id="old", lease_seconds=60)
    )
    await old.write("web", "root", 0, b"A" * 4096)
    disks.write("web", "root", 0, b"A" * 4096)
    before = await old.checkpoint()
    disks.checkpoint(before.id)

    new = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(writer_id="new", takeover="force")
    )
    # The old writer is still running and tries to go on: its writes are
    # journaled under its old epoch, its checkpoint cannot commit.
    await old.write("web", "root", 0, b"X" * 8192)
    with pytest.raises(ebbtide.FencedError, match="fenced off"):
        await old.checkpoint()
    assert old.status().state == "fenced"
    with pytest.raises(ebbtide.FencedError):
        await old.write("web", "root", 0, b"X")
    await old.abort()

    await new.write("db", "log", 100, b"B" * 100)
    disks.write("db", "log", 100, b"B" * 100)
    after = await new.checkpoint()
    disks.checkpoint(after.id)
    await new.close()

    reader = store_factory()
    ids = [c.id for c in await ebbtide.list_checkpoints(reader, "vpg")]
    assert before.id in ids
    assert after.id in ids
    for checkpoint_id in (before.id, after.id):
        out = tmp_path / str(checkpoint_id)
        await ebbtide.recover_to_files(
            reader, "vpg", ebbtide.CheckpointSelector(id=checkpoint_id), out
        )
        disks.assert_recovered(checkpoint_id, out)


async def test_the_old_writer_finds_out_at_lease_renewal(store_factory: StoreFactory) -> None:
    spec = model.spec()
    old = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(lease_seconds=0.3)
    )
    new = await ebbtide.VpgRuntime.open(
        spec, store_factory(), options=model.options(takeover="force")
    )
    deadline = time.monotonic() + 10
    while old.status().state != "fenced":
        assert time.monotonic() < deadline, "the old writer never noticed the takeover"
        await asyncio.sleep(0.02)
    assert "took over" in (old.status().last_error or "")
    await old.abort()
    await new.close()
