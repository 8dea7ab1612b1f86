"""A stalled bucket slows NBD writers down; it never makes the endpoint buffer without bound.

Without a spill; with one, see test_spill.py.
"""

from __future__ import annotations

import asyncio
import pathlib

import numpy as np

from ebbtide_engine._endpoint import Endpoint
from tests.engine.conftest import FaultyStore

from ._support import EndpointEnv, MiB, assert_same, eventually, mirror_disk, run, vpg_spec

SIZE = 16 * MiB
BOUND = 2 * MiB  # maxUnshippedBytes


async def test_a_stalled_bucket_slows_writers_and_rpo_grows(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    spec = vpg_spec(
        "pressure",
        {"vm": [mirror_disk("root", SIZE)]},
        # No spill (test_spill.py has it): the writers wait at the memory bound.
        journal={"segmentMaxBytes": "256Ki", "maxUnshippedBytes": BOUND, "maxSpillBytes": 0},
    )
    store = FaultyStore(env.store)
    endpoint = await env.open(spec, store=store)
    await endpoint.runtime.checkpoint()  # so that the RPO has a start
    image = tmp_path / "image.raw"
    image.write_bytes(np.random.default_rng(2).bytes(SIZE))

    store.gate.clear()  # the bucket stops answering uploads
    try:
        await _stalled(endpoint, image, store)
    finally:
        store.gate.set()  # (also when the test fails: closing ships everything)
    checkpoint = await endpoint.runtime.checkpoint()
    recovered = await env.recover("pressure", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered after the stall")


async def _stalled(endpoint: Endpoint, image: pathlib.Path, store: FaultyStore) -> None:
    url = endpoint.url("vm", "root")
    copy = asyncio.create_task(
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url, within=60)
    )
    await eventually(
        lambda: endpoint.status().unshipped_bytes >= BOUND - 256 * 1024,
        "qemu-img's writes to fill the unshipped bound",
    )
    first = endpoint.status()
    samples = []
    for _ in range(20):  # an invariant watched for half a second, not a sleep for luck
        await asyncio.sleep(0.025)
        status = endpoint.status()
        samples.append((status.unshipped_bytes, status.disks[0].bytes_written))
        assert not copy.done(), "qemu-img finished although nothing could be shipped"
    assert max(unshipped for unshipped, _ in samples) <= BOUND, samples
    assert max(written for _, written in samples) <= BOUND, samples  # accepted, not buffered
    last = endpoint.status()
    assert first.rpo_seconds is not None
    assert last.rpo_seconds is not None
    assert last.rpo_seconds > first.rpo_seconds  # status shows the RPO growing

    store.gate.set()
    await copy
