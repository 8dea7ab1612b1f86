"""A writer process for the kill -9 tests: a deterministic workload on one VPG.

``python -m tests.engine.crash_writer URL SEED`` opens the VPG ``crash``
(forcing a takeover: the previous process was killed), prints ``ready``
and then performs ``operations(seed)`` forever: writes, trims, zero-writes
and, every few operations, a checkpoint that it does *not* wait for, so
that uploads and commits are in flight whenever it is killed. The test
replays the same operations to know what every checkpoint must contain.
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Iterator

import ebbtide_engine as ebbtide
from tests.engine import model

VPG = "crash"


def spec() -> ebbtide.VpgSpec:
    return model.spec(VPG, journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"})


def operations(seed: int) -> Iterator[tuple[str, str, str, int, int, bytes]]:
    """(op, vm, disk, offset, length, data) forever; op is write/trim/zero/checkpoint."""
    rng = random.Random(seed)
    sizes = {(vm.name, d.name): d.size for vm in spec().vms for d in vm.disks}
    keys = sorted(sizes)
    while True:
        if rng.random() < 0.012:
            yield ("checkpoint", "", "", 0, 0, b"")
            continue
        vm, disk = rng.choice(keys)
        offset = rng.randrange(sizes[(vm, disk)])
        length = rng.randint(1, min(20_000, sizes[(vm, disk)] - offset))
        roll = rng.random()
        if roll < 0.85:
            yield ("write", vm, disk, offset, length, rng.randbytes(length))
        else:
            yield ("trim" if roll < 0.93 else "zero", vm, disk, offset, length, b"")


async def main(url: str, seed: int) -> None:
    store = ebbtide.open_store(url)
    runtime = await ebbtide.VpgRuntime.open(
        spec(),
        store,
        options=ebbtide.RuntimeOptions(
            auto_checkpoints=False, takeover="force", retry_initial_seconds=0.01
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
            pending.append(runtime.request_checkpoint())
        await asyncio.sleep(0.001)  # about 500 operations a second: a busy, not a flooding, VM


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
