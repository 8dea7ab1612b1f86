"""A VPG protected on moto, partly promoted, with a checkpoint to export and writes after it.

``protected`` builds, through a real ``VpgRuntime`` over HTTP to the moto
server (injected clock, history passes on demand):

- ``c0``: every disk filled with random data (the initial sync);
- two hours later, overlapping writes, trims and write-zeroes, then ``base``;
- a minute later more of them, then ``test`` (tagged "test");
- a history pass: ``c0`` is out of the one-hour window, so the recovery disks
  are promoted to ``base``; exporting ``test`` needs chunks *and* journal;
- more writes and the checkpoint ``after``, which the export must not show.

The runtime stays open for the test (it can promote again).
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import storage
from tests.engine import model

KiB = 1024
CHUNK = 64 * KiB
START = 1_800_000_000.0
VPG = "failover"


def spec() -> ebbtide.VpgSpec:
    return ebbtide.VpgSpec.parse(
        VPG,
        {
            "vms": [
                {
                    "name": "web",
                    "disks": [
                        {"name": "root", "size": 2048 * KiB},
                        {"name": "data", "size": 384 * KiB + 512},  # a short last chunk
                    ],
                },
                {"name": "db", "disks": [{"name": "log", "size": 1024 * KiB}]},
            ],
            "journal": {"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "4Mi"},
            "journalHistory": "1h",
        },
    )


@dataclasses.dataclass
class Protected:
    store: ebbtide.ObjectStore
    runtime: ebbtide.VpgRuntime
    model: model.DisksModel
    clock: list[float]
    base: ebbtide.Checkpoint  # promoted: the recovery disks hold it
    test: ebbtide.Checkpoint  # what the tests export
    after: ebbtide.Checkpoint  # written after "test"
    rng: random.Random

    async def churn(self, count: int) -> None:
        """Random writes (many overlapping), trims and write-zeroes, mirrored in the model."""
        rng, runtime, disks = self.rng, self.runtime, self.model
        for _ in range(count):
            vm, disk = rng.choice([("web", "root"), ("web", "data"), ("db", "log")])
            size = len(disks.disks[(vm, disk)])
            offset = rng.randrange(size)
            length = rng.randint(1, min(40 * KiB, size - offset))
            roll = rng.random()
            if roll < 0.6:
                data = rng.randbytes(length)
                await runtime.write(vm, disk, offset, data)
                disks.write(vm, disk, offset, data)
                # Overwrite part of it at once: the later write must win.
                inner = rng.randrange(offset, offset + length)
                patch = rng.randbytes(rng.randint(1, offset + length - inner))
                await runtime.write(vm, disk, inner, patch)
                disks.write(vm, disk, inner, patch)
            elif roll < 0.8:
                await runtime.trim(vm, disk, offset, length)
                disks.zero(vm, disk, offset, length)
            else:
                await runtime.write_zeroes(vm, disk, offset, length)
                disks.zero(vm, disk, offset, length)

    async def checkpoint(self, tag: str | None = None) -> ebbtide.Checkpoint:
        checkpoint = await self.runtime.checkpoint(tag=tag)
        self.model.checkpoint(checkpoint.id)
        return checkpoint


@pytest.fixture
async def s3_store(s3_url: str) -> AsyncIterator[ebbtide.ObjectStore]:
    store = storage.open_store(s3_url)
    yield store
    await store.close()


@pytest.fixture
async def protected(s3_store: ebbtide.ObjectStore) -> AsyncIterator[Protected]:
    clock = [START]
    the_spec = spec()
    options = model.options(
        clock=lambda: clock[0], maintenance_seconds=None, mirror_chunk_size=CHUNK
    )
    runtime = await ebbtide.VpgRuntime.open(the_spec, s3_store, options=options)
    try:
        rng = random.Random(20261122)
        disks = model.DisksModel(the_spec)
        for (vm, disk), data in disks.disks.items():  # the initial sync
            content = rng.randbytes(len(data))
            for offset in range(0, len(content), 256 * KiB):
                piece = content[offset : offset + 256 * KiB]
                await runtime.write(vm, disk, offset, piece)
                disks.write(vm, disk, offset, piece)
        checkpoint = await runtime.checkpoint()
        disks.checkpoint(checkpoint.id)
        state = Protected(s3_store, runtime, disks, clock, checkpoint, checkpoint, checkpoint, rng)
        clock[0] += 2 * 3600
        await state.churn(30)
        state.base = await state.checkpoint()
        clock[0] += 60
        await state.churn(30)
        state.test = await state.checkpoint(tag="test")
        clock[0] += 60
        maintenance = await runtime.maintain()
        assert maintenance.promoted_lsn == state.base.id  # chunks hold "base", journal the rest
        await state.churn(20)
        state.after = await state.checkpoint()
        yield state
    finally:
        await runtime.close()
