"""The dirty-region map: its file format, write-ahead order, cost, and clearing."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable

import numpy as np
import pytest

from ebbtide_engine import _endpoint, _nbd
from ebbtide_engine._endpoint import _dirtymap

from ._support import EndpointEnv, MiB, proxy_disk, run, vpg_spec

SIZE = 16 * MiB


def _map_path(env: EndpointEnv, vpg: str, disk: str = "root") -> pathlib.Path:
    return env.state_dir / vpg / "vm" / f"{disk}.dirty"


def _set_bits(image: _endpoint.MapImage | None) -> list[int]:
    assert image is not None
    return [int(i) for i in np.flatnonzero(image.bits)]


def _source(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "source.raw"
    with path.open("wb") as file:
        file.truncate(SIZE)
    return path


def test_format_round_trip_and_every_damage_is_refused() -> None:
    bits = np.zeros(37, dtype=np.bool_)
    bits[[0, 5, 36]] = True
    image = _dirtymap.MapImage(_dirtymap.FLAG_FULL, 7, 37 * 4096 - 512, 4096, bits)
    data = _dirtymap.encode(image)
    assert len(data) == 48 + 5 + 4
    assert data[:8] == b"EBTDIRTY"
    decoded = _dirtymap.decode(data)
    assert (decoded.flags, decoded.epoch, decoded.size, decoded.region_size) == (
        1,
        7,
        37 * 4096 - 512,
        4096,
    )
    assert decoded.full
    assert [int(i) for i in np.flatnonzero(decoded.bits)] == [0, 5, 36]
    for index in range(len(data)):
        damaged = bytearray(data)
        damaged[index] ^= 0x01
        with pytest.raises(ValueError):  # noqa: PT011 - any reason will do, as long as it is refused
            _dirtymap.decode(bytes(damaged))
    with pytest.raises(ValueError, match="too short"):
        _dirtymap.decode(data[:20])


async def test_bit_is_durable_before_the_write_lands_and_cleared_by_a_checkpoint(
    env: EndpointEnv, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = vpg_spec("ahead", {"vm": [proxy_disk("root", SIZE, _source(tmp_path))]})
    endpoint = await env.open(spec)
    await endpoint.resynced()
    path = _map_path(env, "ahead")
    assert _set_bits(_endpoint.read_dirty_map(path)) == []
    seen: list[tuple[int, list[int]]] = []
    original: Callable[..., Awaitable[None]] = _nbd.FileBackend.write

    async def checking_write(
        self: _nbd.FileBackend, offset: int, data: bytes, *, fua: bool
    ) -> None:
        # What a crash right now would leave on disk: the map must already name the region.
        seen.append((offset, _set_bits(_endpoint.read_dirty_map(path))))
        await original(self, offset, data, fua=fua)

    monkeypatch.setattr(_nbd.FileBackend, "write", checking_write)
    url = endpoint.url("vm", "root")
    await run("qemu-io", "-f", "raw", "-c", "write -P 1 3M 4k", "-c", "write -P 2 9M 8k", url)
    assert seen == [(3 * MiB, [3]), (9 * MiB, [3, 9])]

    await endpoint.runtime.checkpoint()
    assert endpoint.status().disks[0].dirty_regions == 0
    await endpoint.close()
    assert _set_bits(_endpoint.read_dirty_map(path)) == []


async def test_hot_regions_cost_no_map_write_and_streams_few(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    spec = vpg_spec("cost", {"vm": [proxy_disk("root", SIZE, _source(tmp_path))]})
    endpoint = await env.open(spec)
    await endpoint.resynced()
    url = endpoint.url("vm", "root")

    def map_writes() -> int:
        return endpoint.status().disks[0].map_writes

    before = map_writes()
    commands = [arg for i in range(50) for arg in ("-c", f"write -P {i + 1} {i * 4096} 4k")]
    await run("qemu-io", "-f", "raw", "-t", "writeback", *commands, url)
    # 50 writes to one region: one map write (and maybe one more once the checkpoint
    # taken when qemu-io disconnected clears the bit).
    assert map_writes() - before <= 2

    image = tmp_path / "image.raw"
    image.write_bytes(np.random.default_rng(1).bytes(SIZE))
    before = map_writes()
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url)
    # 8 writes of 2 MiB, each to new regions; regions are set ahead of the stream, so
    # two map writes (plus at most one for each checkpoint that clears bits).
    assert map_writes() - before <= 4
    assert endpoint.status().disks[0].dirty_regions in (0, SIZE // MiB)


async def test_a_long_stream_marks_ahead_in_growing_runs_written_before_it_gets_there(
    tmp_path: pathlib.Path,
) -> None:
    """1 GiB written sequentially in 1 MiB regions: few map writes, and the stream never waits.

    The stream here is slower than a map write (it lets background map writes
    finish after each write, as a real client's I/O does), so every region it
    reaches was already durable, except at its very start.
    """
    regions = 1024
    dirty = _dirtymap.DirtyMap(
        tmp_path / "disk.dirty",
        size=regions * MiB,
        region_size=MiB,
        epoch=1,
        full=False,
        mark_ahead=32,
        max_mark_ahead=256,
    )
    waited = 0
    for region in range(regions):
        waited += not dirty._durable_bits[region]
        marked = await dirty.mark(region * MiB, MiB)
        dirty.written(marked, region + 1)
        ahead = int(np.argmin(dirty.bits[region + 1 :])) if not dirty.bits[-1] else 0
        assert ahead <= dirty.max_mark_ahead, f"{ahead} regions set ahead at {region}"
        await asyncio.gather(*dirty._background)
    # A fixed mark-ahead of 32 took 32 map writes, each waited for by the stream.
    assert dirty.persists <= 12, dirty.persists
    assert waited <= 2, waited
    assert _set_bits(_endpoint.read_dirty_map(tmp_path / "disk.dirty")) == list(range(regions))


async def test_random_writes_set_nothing_ahead(tmp_path: pathlib.Path) -> None:
    dirty = _dirtymap.DirtyMap(
        tmp_path / "disk.dirty", size=64 * MiB, region_size=MiB, epoch=1, full=False
    )
    for region in (40, 7, 22, 3, 60):
        dirty.written(await dirty.mark(region * MiB, 4096), 1)
    assert [int(i) for i in np.flatnonzero(dirty.bits)] == [3, 7, 22, 40, 60]
