"""Spill to local disk: past the memory bound a burst is acknowledged at disk speed.

An endpoint journaling to the moto S3 server, whose segment uploads a store
wrapper holds back (a stalled bucket). With a spill directory (the endpoint
always has one: ``<state-dir>/<vpg>/spill``) the client's writes go on past
``maxUnshippedBytes``: encoded segments wait in spill files, are uploaded
in the order they were sealed once the bucket answers, and the checkpoint
after them recovers to the image. Past ``maxSpillBytes``, or when the spill
directory cannot be written, writers wait for the bucket instead: slower,
never a dropped write.

Bursts: while writes arrive faster than ``RuntimeOptions.burst_rate``, the
uploads hold back (``journal.burstShipDelay``, at most half the target
RPO), so a burst is acknowledged before any of it ships, and shipped as
soon as it pauses.
"""

from __future__ import annotations

import asyncio
import errno
import pathlib
import time
from collections.abc import Iterator

import numpy as np
import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _endpoint, _keys, _runtime, storage
from tests.engine.conftest import FaultyStore
from tests.nbd._support import Result

from ._support import EndpointEnv, MiB, assert_same, eventually, mirror_disk, run, vpg_spec

SIZE = 16 * MiB
WRITE = 2 * MiB  # what qemu-img convert sends at a time (a segment each, here)
BOUND = 1 * MiB  # maxUnshippedBytes
SEGMENT = 256 * 1024


class RecordingStore(FaultyStore):
    """A stallable store (``gate``) that records the order in which segment uploads start.

    Open it in ``stores`` so that a failing test still opens the gate, and the
    endpoint's close (which ships everything) does not wait for ever.
    """

    def __init__(self, inner: storage.ObjectStore) -> None:
        super().__init__(inner)
        self.segment_puts: list[str] = []
        self.segment_put_times: list[float] = []  # time.monotonic() as each one started

    async def put_new(self, key: str, data: bytes) -> storage.ObjectInfo:
        if "/journal/" in key:
            self.segment_puts.append(key)
            self.segment_put_times.append(time.monotonic())
        return await super().put_new(key, data)


@pytest.fixture
def stores(s3_env: EndpointEnv) -> Iterator[list[RecordingStore]]:
    opened: list[RecordingStore] = []
    yield opened
    for store in opened:
        store.gate.set()


def _recording(s3_env: EndpointEnv, stores: list[RecordingStore]) -> RecordingStore:
    store = RecordingStore(s3_env.store)
    stores.append(store)
    return store


def _spec(name: str, **journal: object) -> ebbtide.VpgSpec:
    settings: dict[str, object] = {
        "segmentMaxBytes": SEGMENT,
        "maxUnshippedBytes": BOUND,
        "uploadConcurrency": 2,
    }
    settings.update(journal)
    return vpg_spec(name, {"vm": [mirror_disk("root", SIZE)]}, journal=settings)


def _image(tmp_path: pathlib.Path, seed: int) -> pathlib.Path:
    image = tmp_path / "image.raw"
    image.write_bytes(np.random.default_rng(seed).bytes(SIZE))
    return image


def _spill_files(env: EndpointEnv, vpg: str) -> list[pathlib.Path]:
    directory = env.state_dir / vpg / "spill"
    return sorted(directory.iterdir()) if directory.exists() else []


def _copy(image: pathlib.Path, endpoint: _endpoint.Endpoint) -> asyncio.Task[Result]:
    url = endpoint.url("vm", "root")
    command = ("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    return asyncio.create_task(run(*command, within=120))


async def test_a_burst_spills_to_disk_and_ships_in_order_when_the_bucket_answers(
    s3_env: EndpointEnv, stores: list[RecordingStore], tmp_path: pathlib.Path
) -> None:
    store = _recording(s3_env, stores)
    endpoint = await s3_env.open(_spec("spill", maxSpillBytes="64Mi"), store=store)
    await endpoint.runtime.checkpoint()
    image = _image(tmp_path, 1)

    store.gate.clear()  # the bucket stops answering uploads
    await _copy(image, endpoint)  # and yet the whole image is acknowledged
    status = endpoint.status()
    assert status.disks[0].bytes_written == SIZE
    # Two uploads are stuck in flight (uploadConcurrency), each with one write; the
    # rest is in the spill, and memory holds no more than the bound besides.
    assert status.spilled_bytes >= SIZE - 2 * WRITE - BOUND, status
    assert status.runtime.memory_bytes <= 2 * WRITE + BOUND, status
    assert status.unshipped_bytes == SIZE  # nothing reached the bucket
    files = _spill_files(s3_env, "spill")
    assert sum(f.stat().st_size for f in files) == status.spilled_bytes
    assert all(f"-e{status.runtime.epoch:010d}-" in f.name for f in files)

    store.gate.set()
    checkpoint = await endpoint.runtime.checkpoint()
    status = endpoint.status()
    assert (status.spilled_bytes, status.unshipped_bytes, status.runtime.memory_bytes) == (0, 0, 0)
    assert _spill_files(s3_env, "spill") == []
    recovered = await s3_env.recover("spill", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered after the spill")
    # Uploads started in the order the segments were sealed, spilled or not.
    layout = _keys.VpgLayout("spill")
    firsts = [layout.parse_segment(key).first_lsn for key in store.segment_puts]
    assert len(firsts) >= SIZE // WRITE
    assert firsts == sorted(firsts)


async def test_past_the_spill_bound_writers_wait_and_nothing_is_dropped(
    s3_env: EndpointEnv, stores: list[RecordingStore], tmp_path: pathlib.Path
) -> None:
    spill_bound = 5 * MiB  # room for two segments of one 2 MiB write each
    store = _recording(s3_env, stores)
    endpoint = await s3_env.open(_spec("full", maxSpillBytes=spill_bound), store=store)
    await endpoint.runtime.checkpoint()
    image = _image(tmp_path, 2)

    store.gate.clear()
    copy = _copy(image, endpoint)
    await eventually(
        lambda: endpoint.status().spilled_bytes > 2 * WRITE,
        "the spill to fill up",
    )
    for _ in range(20):  # an invariant watched for half a second
        await asyncio.sleep(0.025)
        status = endpoint.status()
        assert not copy.done(), "qemu-img finished although the spill is full"
        assert status.spilled_bytes <= spill_bound, status
        # Accepted: at most the uploads in flight, the memory bound, the spill, one write.
        assert status.disks[0].bytes_written <= 2 * WRITE + BOUND + spill_bound + WRITE, status
    store.gate.set()
    await copy
    checkpoint = await endpoint.runtime.checkpoint()
    recovered = await s3_env.recover("full", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered after the wait")
    assert endpoint.status().spilled_bytes == 0


async def test_an_unusable_spill_directory_slows_writers_instead(
    s3_env: EndpointEnv, stores: list[RecordingStore], tmp_path: pathlib.Path
) -> None:
    (s3_env.state_dir / "blocked").mkdir(parents=True)
    (s3_env.state_dir / "blocked" / "spill").write_text("not a directory")
    store = _recording(s3_env, stores)
    endpoint = await s3_env.open(_spec("blocked", maxSpillBytes="64Mi"), store=store)
    status = endpoint.status()
    assert status.spill_error is not None
    assert "cannot use the spill directory" in status.spill_error
    assert "writes wait for the bucket instead" in status.spill_error
    await endpoint.runtime.checkpoint()
    image = _image(tmp_path, 3)

    store.gate.clear()
    copy = _copy(image, endpoint)
    await eventually(
        lambda: endpoint.status().runtime.memory_bytes >= BOUND - SEGMENT,
        "qemu-img's writes to fill the memory bound",
    )
    await asyncio.sleep(0.3)  # an invariant watched for a moment: the writer must wait
    assert not copy.done()
    assert endpoint.status().spilled_bytes == 0
    store.gate.set()
    await copy
    checkpoint = await endpoint.runtime.checkpoint()
    recovered = await s3_env.recover("blocked", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered without a spill")


async def test_a_full_disk_while_spilling_falls_back_to_waiting(
    s3_env: EndpointEnv,
    stores: list[RecordingStore],
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes = 0
    real_write = _runtime._write_spill

    def fill_up(path: pathlib.Path, body: bytes) -> None:
        nonlocal writes
        writes += 1
        if writes > 3:  # the disk fills up after three spill files
            path.write_bytes(body[: len(body) // 2])  # a partial file, as ENOSPC leaves
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, body)

    monkeypatch.setattr(_runtime, "_write_spill", fill_up)
    store = _recording(s3_env, stores)
    endpoint = await s3_env.open(_spec("enospc", maxSpillBytes="64Mi"), store=store)
    await endpoint.runtime.checkpoint()
    image = _image(tmp_path, 4)

    store.gate.clear()
    copy = _copy(image, endpoint)
    await eventually(lambda: endpoint.status().spill_error is not None, "a spill to fail")
    status = endpoint.status()
    assert status.spill_error is not None
    assert "No space left on device" in status.spill_error
    await asyncio.sleep(0.3)  # an invariant watched for a moment: the writer must wait
    assert not copy.done()
    files = _spill_files(s3_env, "enospc")
    assert len(files) == 3  # and no partial one
    assert sum(f.stat().st_size for f in files) == endpoint.status().spilled_bytes
    store.gate.set()
    await copy
    checkpoint = await endpoint.runtime.checkpoint()
    recovered = await s3_env.recover("enospc", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered after ENOSPC")
    assert _spill_files(s3_env, "enospc") == []  # the partial file was removed too


# --- bursts ---------------------------------------------------------------------------


async def test_a_burst_is_acknowledged_before_any_of_it_ships_then_ships_at_once(
    s3_env: EndpointEnv, stores: list[RecordingStore], tmp_path: pathlib.Path
) -> None:
    store = _recording(s3_env, stores)
    # Any write rate is a burst here, so the test does not depend on the machine's speed.
    endpoint = await s3_env.open(_spec("burst"), store=store, burst_rate=1)
    await endpoint.runtime.checkpoint()
    before = len(store.segment_puts)
    image = _image(tmp_path, 5)
    copying = _copy(image, endpoint)
    await eventually(lambda: endpoint.status().runtime.uploads_held > 0, "an upload held back")
    await copying
    acknowledged = time.monotonic()
    assert endpoint.status().disks[0].bytes_written == SIZE
    assert store.segment_puts[before:] == [], "nothing ships while the burst goes on"
    assert endpoint.status().spilled_bytes > 0  # past the memory bound, it spilled instead
    # Once writes pause, everything ships without waiting for the delay (10 s).
    checkpoint = await asyncio.wait_for(endpoint.runtime.checkpoint(), timeout=8)
    assert store.segment_put_times[before] - acknowledged < 5
    status = endpoint.status()
    assert (status.runtime.uploads_held, status.unshipped_bytes, status.spilled_bytes) == (0, 0, 0)
    layout = _keys.VpgLayout("burst")
    firsts = [layout.parse_segment(key).first_lsn for key in store.segment_puts]
    assert firsts == sorted(firsts)  # still in seal order
    recovered = await s3_env.recover("burst", checkpoint.id)
    assert_same(recovered[("vm", "root")], image.read_bytes(), "recovered after the burst")


async def test_with_burst_ship_delay_0_uploads_go_during_the_burst(
    s3_env: EndpointEnv, stores: list[RecordingStore], tmp_path: pathlib.Path
) -> None:
    store = _recording(s3_env, stores)
    spec = _spec("eager", burstShipDelay="0s")
    endpoint = await s3_env.open(spec, store=store, burst_rate=1)
    await endpoint.runtime.checkpoint()
    before = len(store.segment_puts)
    held = 0
    copying = _copy(_image(tmp_path, 6), endpoint)
    while not copying.done():
        held = max(held, endpoint.status().runtime.uploads_held)
        await asyncio.sleep(0.001)
    await copying
    assert held == 0
    assert len(store.segment_puts) > before, "segments shipped while the client wrote"


async def test_a_long_burst_ships_segments_once_they_waited_the_delay(
    s3_env: EndpointEnv, stores: list[RecordingStore]
) -> None:
    """A stream that never pauses: each segment ships after burstShipDelay, bounded by the RPO.

    burstShipDelay 30s, targetRpo 2s: the effective delay is 1 s (half the RPO).
    """
    store = _recording(s3_env, stores)
    spec = _spec("stream", burstShipDelay="30s").model_copy(update={"target_rpo": 2.0})
    endpoint = await s3_env.open(spec, store=store, burst_rate=1)
    await endpoint.runtime.checkpoint()
    before = len(store.segment_puts)
    data = bytes(range(256)) * 256  # 64 KiB
    started = time.monotonic()
    offset = 0
    while time.monotonic() - started < 3.0:  # a write every 5 ms, never a 0.5 s pause
        await endpoint.runtime.write("vm", "root", offset, data)
        offset = (offset + len(data)) % SIZE
        await asyncio.sleep(0.005)
    shipped = store.segment_put_times[before:]
    assert shipped, "segments shipped while the stream went on"
    assert shipped[0] - started >= 0.9, "the first segment waited the delay"
    assert shipped[0] - started < 2.5, "... and no longer"
    await endpoint.runtime.checkpoint()
    assert endpoint.status().unshipped_bytes == 0
