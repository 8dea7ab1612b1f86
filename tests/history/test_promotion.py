"""Journal history and promotion: old writes move to the recovery disks, recovery still exact."""

from __future__ import annotations

import pathlib
import random

import ebbtide_engine as ebbtide
from ebbtide_engine import _keys, _lease
from tests.engine import model

HOUR = 3600.0
START = 1_800_000_000.0


async def _recover_all(
    store: ebbtide.ObjectStore, vpg: str, disks: model.DisksModel, out: pathlib.Path
) -> list[ebbtide.Checkpoint]:
    listed = await ebbtide.list_checkpoints(store, vpg)
    for checkpoint in listed:
        target = out / str(checkpoint.id)
        selector = ebbtide.CheckpointSelector(id=checkpoint.id)
        await ebbtide.recover_to_files(store, vpg, selector, target)
        disks.assert_recovered(checkpoint.id, target)
    return listed


async def _objects(store: ebbtide.ObjectStore, prefix: str) -> list[str]:
    return [info.key async for info in store.list(prefix)]


async def test_promotion_keeps_the_window_recoverable_and_drops_the_rest(
    tmp_path: pathlib.Path,
) -> None:
    now = [START]
    store = ebbtide.MemoryStore()
    spec = model.spec("promo", journalHistory="1h")
    disks = model.DisksModel(spec)
    rng = random.Random(7)
    options = model.options(clock=lambda: now[0], maintenance_seconds=None, mirror_chunk_size=4096)
    layout = _keys.VpgLayout("promo")
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        tagged: list[int] = []
        for step in range(40):  # a checkpoint every 6 minutes for 4 hours
            for _ in range(5):
                vm, disk = rng.choice([("web", "root"), ("web", "data"), ("db", "log")])
                size = disks.disks[(vm, disk)].__len__()
                offset = rng.randrange(size)
                length = rng.randint(1, min(9000, size - offset))
                if rng.random() < 0.8:
                    data = rng.randbytes(length)
                    await runtime.write(vm, disk, offset, data)
                    disks.write(vm, disk, offset, data)
                else:
                    await runtime.trim(vm, disk, offset, length)
                    disks.zero(vm, disk, offset, length)
            checkpoint = await runtime.checkpoint(tag=f"t{step}")
            tagged.append(checkpoint.id)
            disks.checkpoint(checkpoint.id)
            now[0] += 360
            if step % 10 == 9:
                result = await runtime.maintain()
                assert result.promotion is not None
                listed = runtime.list_checkpoints()
                window_start = int((now[0] - HOUR) * 1e9)
                assert listed[0].time_ns >= window_start  # nothing older than the window
                assert listed[0].id == result.promoted_lsn  # the oldest inside it is the base
                assert [c.id for c in listed] == [i for i in tagged if i >= listed[0].id]
                await _recover_all(store, "promo", disks, tmp_path / f"s{step}")
        manifest = await _lease.read_manifest(store, layout)
        assert manifest is not None
        promoted = manifest.promoted_lsn
        assert promoted > 0
        # No segment at or below the promoted LSN is left; the maps are those at it.
        for key in await _objects(store, layout.journals_prefix):
            assert layout.parse_segment(key).first_lsn > promoted
        maps = await _objects(store, layout.mirrors_prefix)
        map_keys = [key for key in maps if "/map/" in key]
        assert sorted(map_keys) == sorted(
            layout.mirror_map(vm, disk, promoted) for vm, disk in disks.disks
        )
        status = runtime.status()
        assert status.sla is not None
        assert status.sla.actual_history_seconds is not None
        assert status.sla.actual_history_seconds <= HOUR
    disks.checkpoint(runtime.list_checkpoints()[-1].id)  # the final one, at close
    # A new writer and a reader see the same: only the window is listed, all of it exact.
    listed = await _recover_all(store, "promo", disks, tmp_path / "end")
    assert listed[0].id >= promoted
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        assert runtime.list_checkpoints()[0].id == listed[0].id
        await runtime.write("db", "log", 0, b"after")
        disks.write("db", "log", 0, b"after")
        checkpoint = await runtime.checkpoint()
        disks.checkpoint(checkpoint.id)
        now[0] += 2 * HOUR
        await runtime.maintain()
        assert runtime.list_checkpoints()[0].id >= checkpoint.id
    disks.checkpoint(runtime.list_checkpoints()[-1].id)
    await _recover_all(store, "promo", disks, tmp_path / "again")
