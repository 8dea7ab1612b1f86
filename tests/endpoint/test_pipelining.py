"""Many requests in flight through the endpoint: journal order is send order.

The NBD server receives requests ahead of executing them (docs/nbd.md,
"Pipelining"). Here a raw client sends a burst of overlapping WRITEs (small
and large, some FUA), WRITE_ZEROES, TRIMs and FLUSHes into a Proxy disk in
one go, without waiting for any reply. The replies must come back in order
and without error, the journal rows must carry the requests in the order
they were sent (LSNs ascending), and both the source file and the image
recovered at a checkpoint must equal what applying them in send order gives:
overlapping writes make any reordering visible.
"""

from __future__ import annotations

import asyncio
import random

import ebbtide_engine as ebbtide
from tests.nbd import _raw

from ._support import EndpointEnv, MiB, assert_same, journal_rows, proxy_disk, vpg_spec

SIZE = 4 * MiB
KiB = 1024
REQUESTS = 300


async def test_a_burst_is_journaled_in_send_order(env: EndpointEnv) -> None:
    source = env.tmp_path / "source.img"
    source.write_bytes(bytes(SIZE))
    spec = vpg_spec(
        "burst",
        {"vm": [proxy_disk("disk", SIZE, source)]},
        journal={"segmentMaxBytes": "1Mi", "maxUnshippedBytes": "4Mi"},
    )
    endpoint = await env.open(spec)
    rng = random.Random(7)
    image = bytearray(SIZE)
    stream = bytearray()
    expected: list[tuple[str, int, int]] = []
    for handle in range(REQUESTS):
        kind = rng.random()
        offset = rng.randrange(0, SIZE - MiB, 512)
        if kind < 0.05:
            stream += _raw.request(_raw.CMD_FLUSH, handle=handle)
        elif kind < 0.12:
            length = rng.randrange(512, 256 * KiB, 512)
            stream += _raw.request(_raw.CMD_WRITE_ZEROES, offset, length, handle=handle)
            image[offset : offset + length] = bytes(length)
            expected.append(("zero", offset, length))
        elif kind < 0.17:
            length = rng.randrange(512, 256 * KiB, 512)
            stream += _raw.request(_raw.CMD_TRIM, offset, length, handle=handle)
            image[offset : offset + length] = bytes(length)
            expected.append(("trim", offset, length))
        else:
            large = kind > 0.7
            length = rng.randrange(64 * KiB, MiB, 512) if large else rng.randrange(512, 8 * KiB)
            data = rng.randbytes(length)
            flags = _raw.CMD_FLAG_FUA if kind > 0.93 else 0
            stream += _raw.request(_raw.CMD_WRITE, offset, length, flags=flags, handle=handle)
            stream += data
            image[offset : offset + length] = data
            expected.append(("write", offset, length))

    client = await _raw.RawClient.connect(endpoint.port)
    await client.open(endpoint.runtime.spec.name + "/vm/disk")
    sending = asyncio.create_task(client.send(bytes(stream)))
    replies = [(await client.simple_reply())[:2] for _ in range(REQUESTS)]
    await sending
    assert replies == [(0, handle) for handle in range(REQUESTS)]
    await client.disconnect()

    checkpoint = await endpoint.runtime.request_checkpoint()
    assert isinstance(checkpoint, ebbtide.Checkpoint)
    rows = [row for row in await journal_rows(env.store, "burst", "vm") if row.op != "checkpoint"]
    journaled = [(row.op, row.offset, row.length) for row in rows]
    # The initial sync of the (all-zero) source comes first, as one zeroing.
    assert journaled == [("zero", 0, SIZE), *expected]
    assert_same(source.read_bytes(), bytes(image), "the source after the burst")
    disks = await env.recover("burst", checkpoint.id)
    assert_same(disks[("vm", "disk")], bytes(image), "the recovered checkpoint")
