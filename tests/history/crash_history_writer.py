"""A writer process for the history kill -9 tests: writes, checkpoints, promotion, dilution.

``python -m tests.history.crash_history_writer URL SEED T0`` opens the VPG
``crash-history`` (forcing a takeover) with a clock that runs 7,200 times
faster than the wall clock from ``T0`` (one real second is two hours, so
the 1-hour history window and the dilution tiers are crossed within a
second), prints ``ready <first lsn>``, then performs ``operations(seed)``
forever without waiting for its checkpoints, while history passes
(promotion, GC, dilution, index rewrites) run back to back in the
background. The test kills it at a random moment and replays the same
operations to know what every checkpoint must contain.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Iterator

import ebbtide_engine as ebbtide
from tests.engine import model

VPG = "crash-history"
SPEED = 7200.0
DILUTION = {
    "threshold": 5,
    "tiers": [
        {"olderThan": "10m", "keep": 2, "per": "5m"},
        {"olderThan": "30m", "keep": 1, "per": "10m"},
    ],
}


def spec() -> ebbtide.VpgSpec:
    return model.spec(
        VPG,
        journalHistory="1h",
        dilution=DILUTION,
        journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"},
    )


def clock(t0: float) -> float:
    return 1_800_000_000.0 + (time.time() - t0) * SPEED


def operations(seed: int) -> Iterator[tuple[str, str, str, int, int, bytes]]:
    """(op, vm, disk, offset, length, data) forever; op is write/trim/zero/checkpoint."""
    rng = random.Random(seed)
    sizes = {(vm.name, d.name): d.size for vm in spec().vms for d in vm.disks}
    keys = sorted(sizes)
    while True:
        if rng.random() < 0.08:
            yield ("checkpoint", "", "", 0, 0, b"")
            continue
        vm, disk = rng.choice(keys)
        offset = rng.randrange(sizes[(vm, disk)])
        length = rng.randint(1, min(8_000, sizes[(vm, disk)] - offset))
        roll = rng.random()
        if roll < 0.85:
            yield ("write", vm, disk, offset, length, rng.randbytes(length))
        else:
            yield ("trim" if roll < 0.93 else "zero", vm, disk, offset, length, b"")


async def main(url: str, seed: int, t0: float) -> None:
    store = ebbtide.open_store(url)
    runtime = await ebbtide.VpgRuntime.open(
        spec(),
        store,
        options=ebbtide.RuntimeOptions(
            auto_checkpoints=False,
            takeover="force",
            retry_initial_seconds=0.01,
            clock=lambda: clock(t0),
            maintenance_seconds=0.02,
            mirror_chunk_size=4096,
            compact_every=16,
        ),
    )
    first_lsn = runtime.status().next_lsn
    print(f"ready {first_lsn}", flush=True)
    pending = []
    for op, vm, disk, offset, length, data in operations(seed):
        if op == "write":
            await runtime.write(vm, disk, offset, data)
        elif op == "trim":
            await runtime.trim(vm, disk, offset, length)
        elif op == "zero":
            await runtime.write_zeroes(vm, disk, offset, length)
        else:
            pending.append(runtime.request_checkpoint(ebbtide.CheckpointKind.AUTOMATIC))
        await asyncio.sleep(0.001)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3])))
