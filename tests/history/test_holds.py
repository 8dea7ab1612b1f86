"""Holds on S3 (moto): readers keep promotion's deletions off; fenced writers delete nothing.

The interleavings are made deterministic by a store wrapper that stops
chosen requests at a gate until the test opens it (no sleeps).
"""

from __future__ import annotations

import asyncio
import pathlib
import random
from collections.abc import Callable

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _keys, _lease, _mirror, _promotion, _recovery, storage
from tests.engine import model
from tests.engine.conftest import FaultyStore

HOUR = 3600.0
START = 1_800_000_000.0


class Gated(FaultyStore):
    """Requests whose key ``stop(op, key)`` picks wait until ``gate`` opens."""

    def __init__(self, inner: storage.ObjectStore, stop: Callable[[str, str], bool]) -> None:
        super().__init__(inner)
        self.stop = stop
        self.gate.clear()
        self.reached = asyncio.Event()  # a request is waiting at the gate

    async def _pass(self, op: str, key: str) -> None:
        if not self.gate.is_set() and self.stop(op, key):
            self.reached.set()
            await self.gate.wait()

    async def put_new(self, key: str, data: bytes) -> storage.ObjectInfo:
        await self._pass("put_new", key)
        return await self.inner.put_new(key, data)

    async def get(
        self, key: str, *, byte_range: tuple[int, int] | None = None
    ) -> storage.StoredObject:
        await self._pass("get", key)
        return await self.inner.get(key, byte_range=byte_range)


def _options(now: list[float], **overrides: object) -> ebbtide.RuntimeOptions:
    return model.options(
        clock=lambda: now[0], maintenance_seconds=None, mirror_chunk_size=4096, **overrides
    )


def _setup(name: str) -> tuple[ebbtide.VpgSpec, model.DisksModel, list[float], _keys.VpgLayout]:
    spec = model.spec(name, journalHistory="1h")
    return spec, model.DisksModel(spec), [START], _keys.VpgLayout(name)


async def _keys_under(store: storage.ObjectStore, prefix: str) -> set[str]:
    return {info.key async for info in store.list(prefix)}


async def test_hold_lifecycle_on_s3(s3_url: str) -> None:
    async with ebbtide.open_store(s3_url) as store:
        layout = _keys.VpgLayout("held")
        lease = await ebbtide.place_hold(store, "held", owner="cli/test/1", purpose="restore")
        hold = lease.hold
        assert hold.expires - hold.created == pytest.approx(600.0)
        assert await _keys_under(store, layout.holds_prefix) == {layout.hold(hold.hold_id)}
        assert await ebbtide.list_holds(store, "held") == [hold]
        assert await ebbtide.list_holds(store, "held", now=hold.expires + 1) == []
        await lease.renew()
        assert lease.hold.expires >= hold.expires
        assert await ebbtide.list_holds(store, "held") == [lease.hold]
        await lease.release()
        await lease.release()  # idempotent
        assert await ebbtide.list_holds(store, "held") == []
        assert await _keys_under(store, layout.holds_prefix) == set()


async def test_held_context_renews_in_background_and_gc_removes_expired_holds(
    s3_url: str,
) -> None:
    async with ebbtide.open_store(s3_url) as store:
        layout = _keys.VpgLayout("held")
        stale = await ebbtide.place_hold(store, "held", owner="dead", purpose="x", ttl_seconds=0.01)
        async with await ebbtide.place_hold(
            store, "held", owner="alive", purpose="restore", ttl_seconds=0.3
        ) as lease:
            first = lease.hold.expires
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while lease.hold.expires == first:  # renewed every ttl/3 by the background task
                assert loop.time() < deadline, "the hold was never renewed"
                await asyncio.sleep(0.02)
            owners = [h.owner for h in await ebbtide.list_holds(store, "held")]
            assert owners == ["alive"]
            # Garbage collection defers while the live hold exists, deletes the expired one.
            collected = await _promotion.collect_garbage(store, layout, 1)
            assert [h.owner for h in collected.deferred_by] == ["alive"]
            assert await _keys_under(store, layout.holds_prefix) == {
                layout.hold(lease.hold.hold_id)
            }
        assert await _keys_under(store, layout.holds_prefix) == set()
        await stale.release()  # already gone: still fine


async def _history(
    store: storage.ObjectStore, spec: ebbtide.VpgSpec, disks: model.DisksModel, now: list[float]
) -> None:
    """Four hours of writes, a checkpoint every 6 minutes, one pass per hour."""
    rng = random.Random(11)
    async with await ebbtide.VpgRuntime.open(spec, store, options=_options(now)) as runtime:
        for step in range(40):
            for _ in range(4):
                vm, disk = rng.choice([("web", "root"), ("web", "data"), ("db", "log")])
                size = len(disks.disks[(vm, disk)])
                offset = rng.randrange(size)
                data = rng.randbytes(rng.randint(1, min(9000, size - offset)))
                await runtime.write(vm, disk, offset, data)
                disks.write(vm, disk, offset, data)
            disks.checkpoint((await runtime.checkpoint()).id)
            now[0] += 360
            if step % 10 == 9:
                await runtime.maintain()
    disks.checkpoint(runtime.list_checkpoints()[-1].id)


@pytest.mark.parametrize("held", [True, False], ids=["held", "negative-control-no-hold"])
async def test_recovery_racing_a_promotion_recovers_exactly_under_a_hold(
    s3_url: str, tmp_path: pathlib.Path, held: bool
) -> None:
    spec, disks, now, layout = _setup("race")
    async with ebbtide.open_store(s3_url) as writer_store, ebbtide.open_store(s3_url) as raw:
        await _history(writer_store, spec, disks, now)
        listed = await ebbtide.list_checkpoints(raw, "race")
        oldest = listed[len(listed) // 2]  # above the promoted base: it needs journal segments
        # The reader stops at its first journal GET: after the hold, the manifest and the plan.
        reader = Gated(raw, lambda op, key: op == "get" and key.startswith(layout.journals_prefix))
        selector = ebbtide.CheckpointSelector(id=oldest.id)
        out = tmp_path / "out"
        if held:
            recovery = asyncio.ensure_future(
                ebbtide.recover_to_files(reader, "race", selector, out, hold_owner="test/race")
            )
        else:  # the same recovery without its hold
            recovery = asyncio.ensure_future(
                _recovery._recover(reader, "race", selector, out, None, 4, None)
            )
        await asyncio.wait_for(reader.reached.wait(), 30)
        before = await _keys_under(raw, layout.root)
        # Meanwhile the writer promotes past the reader's checkpoint (and its base).
        now[0] += 2 * HOUR
        options = _options(now)
        async with await ebbtide.VpgRuntime.open(spec, writer_store, options=options) as runtime:
            result = await runtime.maintain()
            assert result.promotion is not None
            assert result.promoted_lsn > oldest.id
            assert result.promotion.deletion_deferred is held
            after = await _keys_under(raw, layout.root)
            old_segments = {k for k in before if k.startswith(layout.journals_prefix)}
            if held:
                assert old_segments <= after  # nothing the reader may need was deleted
            else:
                assert not old_segments <= after
            reader.gate.set()
            if held:
                recovered = await asyncio.wait_for(recovery, 60)
                assert recovered.checkpoint.id == oldest.id
                disks.assert_recovered(oldest.id, out)  # byte-exact, though promoted meanwhile
                assert await ebbtide.list_holds(raw, "race") == []  # released at the end
                # The next pass does the deferred deletion.
                again = await runtime.maintain()
                assert again.promotion is not None
                remaining = await _keys_under(raw, layout.journals_prefix)
                assert not old_segments & remaining
            else:
                with pytest.raises(ebbtide.PromotedDuringRead) as caught:
                    await asyncio.wait_for(recovery, 60)
                assert isinstance(caught.value.__cause__, ebbtide.ObjectNotFound)
                message = str(caught.value)
                assert "promoted" in message
                assert "start the recovery again" in message
                assert not (out / "web" / "root.raw").exists()


@pytest.mark.parametrize("guarded", [True, False], ids=["lease-checked", "negative-control"])
async def test_a_fenced_writer_deletes_nothing_the_new_writer_stored(
    s3_url: str, tmp_path: pathlib.Path, guarded: bool
) -> None:
    spec, disks, now, layout = _setup("fence")
    async with (
        ebbtide.open_store(s3_url) as store_a,
        ebbtide.open_store(s3_url) as raw_b,
        ebbtide.open_store(s3_url) as reader,
    ):
        old = await ebbtide.VpgRuntime.open(spec, store_a, options=_options(now))
        try:
            await old.write("web", "root", 0, b"a" * 5000)
            disks.write("web", "root", 0, b"a" * 5000)
            disks.checkpoint((await old.checkpoint()).id)
            now[0] += 2 * HOUR
            disks.checkpoint((await old.checkpoint()).id)
            first = await old.maintain()
            assert first.promoted_lsn > 0
            # Writer B takes over; its promotion stops before writing its chunk maps.
            store_b = Gated(raw_b, lambda op, key: op == "put_new" and "/map/" in key)
            new = await ebbtide.VpgRuntime.open(
                spec, store_b, options=_options(now, takeover="force")
            )
            try:
                rng = random.Random(5)
                for _ in range(6):
                    data = rng.randbytes(4096)
                    offset = rng.randrange(0, 60 * 1024)
                    await new.write("web", "root", offset, data)
                    disks.write("web", "root", offset, data)
                disks.checkpoint((await new.checkpoint()).id)
                now[0] += 2 * HOUR
                disks.checkpoint((await new.checkpoint()).id)
                promoting = asyncio.ensure_future(new.maintain())
                await asyncio.wait_for(store_b.reached.wait(), 30)
                referenced = set()
                mirror_keys = await _keys_under(reader, layout.mirrors_prefix)
                for key in mirror_keys:
                    if "/map/" in key:
                        vm, disk = key[len(layout.mirrors_prefix) :].split("/")[:2]
                        lsn = layout.parse_mirror_map_lsn(key)
                        mirror = await _mirror.read_map(reader, layout, vm, disk, lsn)
                        assert mirror is not None
                        referenced |= {
                            layout.mirror_chunk(vm, disk, d) for d in mirror.chunks.values()
                        }
                chunks = {k for k in mirror_keys if "/chunk/" in k}
                unmapped = chunks - referenced
                assert unmapped, "writer B stored no chunk yet"
                # The old writer (fenced, but still running) collects garbage now.
                fenced_lease = old._lease
                if guarded:
                    with pytest.raises(ebbtide.FencedError):
                        await _promotion.collect_garbage(
                            store_a, layout, first.promoted_lsn, lease=fenced_lease
                        )
                    left = await _keys_under(reader, layout.root)
                    assert unmapped <= left
                else:
                    await _promotion.collect_garbage(store_a, layout, first.promoted_lsn)
                    left = await _keys_under(reader, layout.root)
                    assert not unmapped <= left  # without the check, B's chunks are gone
                    store_b.gate.set()
                    promoting.cancel()
                    return
                store_b.gate.set()
                await asyncio.wait_for(promoting, 60)
                assert new.list_checkpoints()[0].id > first.promoted_lsn
                await new.close()
                disks.checkpoint(new.list_checkpoints()[-1].id)  # the final one, at close
            finally:
                store_b.gate.set()
                await new.close()
        finally:
            await old.abort()
        # Every listed checkpoint recovers byte for byte.
        for checkpoint in await ebbtide.list_checkpoints(reader, "fence"):
            target = tmp_path / str(checkpoint.id)
            await ebbtide.recover_to_files(
                reader, "fence", ebbtide.CheckpointSelector(id=checkpoint.id), target
            )
            disks.assert_recovered(checkpoint.id, target)


async def test_a_forced_takeover_waits_out_the_old_writers_deletions(s3_url: str) -> None:
    """Promotion after ``takeover="force"`` waits half the old lease before storing chunks."""
    async with ebbtide.open_store(s3_url) as store:
        layout = _keys.VpgLayout("forced")
        old = await _lease.WriterLease.acquire(store, layout, "old", lease_seconds=4.0)
        new = await _lease.WriterLease.acquire(store, layout, "new", takeover="force")
        loop = asyncio.get_running_loop()
        assert new.foreign_deletions_until > loop.time()  # both are time.monotonic()
        started = loop.time()
        await new.wait_for_foreign_deletions()
        assert loop.time() - started >= 1.0  # about 2 s: half the old writer's lease
        with pytest.raises(ebbtide.FencedError):
            await old.confirm()
        # A takeover from a writer that stopped cleanly waits for nothing.
        await new.release()
        after = await _lease.WriterLease.acquire(store, layout, "after", takeover="force")
        assert after.foreign_deletions_until == 0.0
