"""Restarts: what the dirty map makes a proxy disk resend, and when it resends everything."""

from __future__ import annotations

import asyncio
import pathlib
import random

import ebbtide_engine as ebbtide
from ebbtide_engine import _endpoint
from tests.engine.conftest import FaultyStore

from ._support import (
    EndpointEnv,
    MiB,
    assert_same,
    eventually,
    journal_rows,
    proxy_disk,
    run,
    runtime_options,
    vpg_spec,
)

SIZE = 16 * MiB


def _source(tmp_path: pathlib.Path, *, data_mib: int = 4) -> pathlib.Path:
    path = tmp_path / "source.raw"
    with path.open("wb") as file:
        file.write(random.Random(5).randbytes(data_mib * MiB))
        file.truncate(SIZE)
    return path


def _disk(endpoint: _endpoint.Endpoint) -> _endpoint.DiskStatus:
    return endpoint.status().disks[0]


async def _latest_equals_source(
    env: EndpointEnv, endpoint: _endpoint.Endpoint, source: pathlib.Path
) -> None:
    checkpoint = await endpoint.runtime.checkpoint()
    recovered = await env.recover(endpoint.spec.name, checkpoint.id)
    image = await asyncio.to_thread(source.read_bytes)
    assert_same(recovered[("vm", "root")], image, "recovered disk")


async def test_after_a_crash_only_dirty_regions_are_resent(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = _source(tmp_path)
    spec = vpg_spec("partial", {"vm": [proxy_disk("root", SIZE, source)]})
    endpoint = await env.open(spec)
    assert _disk(endpoint).state == _endpoint.SyncState.INITIAL_SYNC
    await endpoint.resynced()
    assert _disk(endpoint).state == _endpoint.SyncState.PROTECTING
    url = endpoint.url("vm", "root")
    await run("qemu-io", "-f", "raw", "-c", "write -P 7 2M 64k", "-c", "write -P 8 9M 1000", url)
    await endpoint.abort()  # a crash: those writes never reached a durable checkpoint

    endpoint = await env.open(spec, takeover="force")
    status = _disk(endpoint)
    assert status.state == _endpoint.SyncState.RESYNCING
    assert status.message == "re-reading 2 dirty regions of the source"
    assert status.total_bytes == 2 * MiB
    await endpoint.resynced()
    assert _disk(endpoint).state == _endpoint.SyncState.PROTECTING
    assert _disk(endpoint).dirty_regions == 0

    epoch = endpoint.runtime.status().epoch
    rows = await journal_rows(env.store, "partial", "vm")
    resent = [(r.op, r.offset, r.length) for r in rows if r.epoch == epoch and r.op != "checkpoint"]
    assert resent == [("write", 2 * MiB, MiB), ("write", 9 * MiB, MiB)]
    await _latest_equals_source(env, endpoint, source)


async def test_a_clean_restart_resends_nothing(env: EndpointEnv, tmp_path: pathlib.Path) -> None:
    source = _source(tmp_path)
    spec = vpg_spec("clean", {"vm": [proxy_disk("root", SIZE, source)]})
    endpoint = await env.open(spec)
    await endpoint.resynced()
    await run("qemu-io", "-f", "raw", "-c", "write -P 3 5M 4k", endpoint.url("vm", "root"))
    await endpoint.close()

    endpoint = await env.open(spec)
    assert _disk(endpoint).state == _endpoint.SyncState.PROTECTING
    await _latest_equals_source(env, endpoint, source)


async def test_an_untrustworthy_map_means_a_full_resync(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = _source(tmp_path)
    spec = vpg_spec("full", {"vm": [proxy_disk("root", SIZE, source)]})
    endpoint = await env.open(spec)
    await endpoint.resynced()
    await endpoint.close()
    path = env.state_dir / "full" / "vm" / "root.dirty"

    damaged = bytearray(path.read_bytes())
    damaged[50] ^= 0xFF
    path.write_bytes(bytes(damaged))
    endpoint = await env.open(spec)
    assert _disk(endpoint).state == _endpoint.SyncState.RESYNCING
    assert "unusable (CRC-32C mismatch (damaged))" in _disk(endpoint).message
    assert _disk(endpoint).total_bytes == SIZE
    await endpoint.resynced()
    await endpoint.close()

    # Another writer journaled this VPG meanwhile (without this state directory).
    runtime = await ebbtide.VpgRuntime.open(spec, env.store, options=runtime_options())
    await runtime.close()
    endpoint = await env.open(spec)
    assert "the journal was last written by writer epoch" in _disk(endpoint).message
    await endpoint.resynced()
    await _latest_equals_source(env, endpoint, source)


async def test_client_writes_during_a_resync_are_kept(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = _source(tmp_path, data_mib=16)
    spec = vpg_spec(
        "online",
        {"vm": [proxy_disk("root", SIZE, source)]},
        # No spill: the resync step must stall at the memory bound.
        journal={"segmentMaxBytes": "512Ki", "maxUnshippedBytes": "2Mi", "maxSpillBytes": 0},
    )
    store = FaultyStore(env.store)
    endpoint = await env.open(spec, store=store)
    # The initial sync of 16 MiB stalls at the 2 MiB bound while the bucket is stalled.
    store.gate.clear()
    try:
        await _writes_queue_behind_a_stalled_resync(endpoint, store)
    finally:
        store.gate.set()  # (also when the test fails: closing ships everything)
    await endpoint.resynced()
    image = source.read_bytes()
    assert image[12 * MiB] == 0xC1
    await _latest_equals_source(env, endpoint, source)


async def _writes_queue_behind_a_stalled_resync(
    endpoint: _endpoint.Endpoint, store: FaultyStore
) -> None:
    await eventually(
        lambda: (
            0 < _disk(endpoint).done_bytes < SIZE and endpoint.status().runtime.writes_waiting > 0
        ),
        "the initial sync to stall on the stalled bucket",
    )
    stalled_at = _disk(endpoint).done_bytes
    assert _disk(endpoint).state == _endpoint.SyncState.INITIAL_SYNC
    url = endpoint.url("vm", "root")
    writer = asyncio.create_task(
        run("qemu-io", "-f", "raw", "-c", "write -P 0xc1 12M 8k", "-c", "write -P 0xc2 0 4k", url)
    )
    # The client's writes queue behind the stalled resync step (ahead of region 12).
    await eventually(lambda: endpoint.status().connections == 1, "qemu-io to connect")
    assert _disk(endpoint).done_bytes == stalled_at
    store.gate.set()
    await writer


async def test_a_fenced_endpoint_refuses_writes_and_keeps_their_regions_dirty(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = _source(tmp_path)
    spec = vpg_spec("fenced", {"vm": [proxy_disk("root", SIZE, source)]})
    endpoint = await env.open(spec)
    await endpoint.resynced()
    # Another writer takes the VPG over; the endpoint finds out when it renews its lease.
    usurper = await ebbtide.VpgRuntime.open(
        spec, env.store, options=runtime_options(takeover="force")
    )
    try:
        await eventually(lambda: endpoint.status().state == "fenced", "the endpoint to be fenced")
        url = endpoint.url("vm", "root")
        result = await run("qemu-io", "-f", "raw", "-c", "write -P 9 6M 4k", url, check=False)
        assert "write failed" in result.stdout + result.stderr, result.describe()
        disk = _disk(endpoint)
        assert disk.failures == 1
        assert disk.dirty_regions == 1
        await endpoint.close()
        image = _endpoint.read_dirty_map(env.state_dir / "fenced" / "vm" / "root.dirty")
        assert image is not None
        assert [int(i) for i in image.bits.nonzero()[0]] == [6]
    finally:
        await usurper.abort()
