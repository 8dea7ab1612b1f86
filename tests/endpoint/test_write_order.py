"""Write-order fidelity across the VMs of a VPG, through real clients.

Two qemu-io processes, one per VM, write in lock step like a replicated
application: VM ``a`` writes sequence number ``i`` into block ``i``, and
only after that write is acknowledged does VM ``b`` write ``i`` into its
block ``i``, and only then does ``a`` write ``i + 1``. Meanwhile the test
takes checkpoints as fast as it likes. In every recovered checkpoint, each
disk must hold a prefix of its sequence, and with ``a`` holding ``na``
numbers and ``b`` holding ``nb``: ``nb <= na <= nb + 1``. A cut that was not
atomic across the VMs (one journal cut after the other, with writes
acknowledged in between) yields ``nb > na`` or ``na > nb + 1``; so does an
endpoint that acknowledged a write before journaling it.
"""

from __future__ import annotations

import asyncio
import random

import ebbtide_engine as ebbtide

from ._support import (
    EndpointEnv,
    InteractiveQemuIo,
    MiB,
    journal_rows,
    mirror_disk,
    vpg_spec,
)

BLOCK = 4096
BLOCKS = 256
SAMPLES = 16  # checkpoints recovered and checked (spread over the run)


def _pattern(i: int) -> int:
    return i % 255 + 1  # never 0, so a written block differs from an unwritten one


def _sequence_length(image: bytes, vm: str, checkpoint: int) -> int:
    """How many sequence numbers ``image`` holds; fails unless they form a prefix."""
    count = 0
    while count < BLOCKS and image[count * BLOCK] != 0:
        count += 1
    for i in range(BLOCKS):
        block = image[i * BLOCK : (i + 1) * BLOCK]
        want = bytes([_pattern(i)]) * BLOCK if i < count else bytes(BLOCK)
        assert block == want, f"checkpoint {checkpoint}: VM {vm} block {i} is not a prefix"
    return count


async def test_checkpoints_cut_both_vms_atomically(env: EndpointEnv) -> None:
    spec = vpg_spec(
        "order",
        {"a": [mirror_disk("disk", MiB)], "b": [mirror_disk("disk", MiB)]},
        journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"},
    )
    endpoint = await env.open(spec)
    writers = {
        vm: await InteractiveQemuIo.start(endpoint.url(vm, "disk"), "-t", "writeback")
        for vm in ("a", "b")
    }
    cuts: list[asyncio.Future[ebbtide.Checkpoint | None]] = []
    done = asyncio.Event()

    async def take_checkpoints() -> None:
        rng = random.Random(3)
        while not done.is_set():
            cuts.append(endpoint.runtime.request_checkpoint())
            await asyncio.sleep(rng.uniform(0.002, 0.02))

    cutter = asyncio.create_task(take_checkpoints())
    try:
        for i in range(BLOCKS):
            for vm in ("a", "b"):
                reply = await writers[vm].command(f"write -P {_pattern(i)} {i * BLOCK} {BLOCK}")
                assert reply.startswith("wrote"), reply
    finally:
        done.set()
        await cutter
        for writer in writers.values():
            await writer.close()
    checkpoints = [c for c in await asyncio.gather(*cuts) if c is not None]
    assert len(checkpoints) > SAMPLES

    # In LSN order, the journals interleave exactly as the writes were acknowledged.
    journaled = []
    for vm in ("a", "b"):
        rows = await journal_rows(env.store, "order", vm)
        journaled += [(row.lsn, vm, row.offset // BLOCK) for row in rows if row.op == "write"]
    journaled.sort()
    expected = [(vm, i) for i in range(BLOCKS) for vm in ("a", "b")]
    assert [(vm, block) for _, vm, block in journaled] == expected

    seen: list[tuple[int, int]] = []
    step = len(checkpoints) / SAMPLES
    for index in range(SAMPLES):
        checkpoint = checkpoints[int(index * step)]
        disks = await env.recover("order", checkpoint.id)
        na = _sequence_length(disks[("a", "disk")], "a", checkpoint.id)
        nb = _sequence_length(disks[("b", "disk")], "b", checkpoint.id)
        assert nb <= na <= nb + 1, f"checkpoint {checkpoint.id}: a holds {na}, b holds {nb}"
        seen.append((na, nb))
    assert len(set(seen)) > SAMPLES // 2, f"the checkpoints missed the writes: {seen}"
    # The check has teeth: VM a cut at an early checkpoint and VM b at a later one
    # (a cut that is not atomic) breaks it.
    (early_a, _), (_, late_b) = seen[0], seen[-1]
    assert not late_b <= early_a <= late_b + 1
