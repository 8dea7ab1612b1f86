"""Real NBD clients against an endpoint, then recovery compared with what they wrote.

One VPG with a proxy disk (a local file the endpoint serves) and a mirror
target (a local replica), journaling to the moto S3 server. The same client
sessions run against both: qemu-img convert and compare, nbdcopy in and
out, qemu-io with aligned, unaligned, FUA, zeroing and discard requests and
pattern reads, nbdinfo. An in-memory model follows every byte; a checkpoint
freezes it, and recovery from the bucket alone must equal the frozen model.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
from collections.abc import Callable

import pytest

from ebbtide_engine import _endpoint

from ._support import (
    EndpointEnv,
    MiB,
    assert_same,
    journal_rows,
    mirror_disk,
    proxy_disk,
    run,
    vpg_spec,
)

SIZE = 8 * MiB
DISKS = ("proxy", "mirror")


def _random_image(path: pathlib.Path, rng: random.Random, *, holes: bool) -> bytes:
    """A raw image of SIZE bytes: random data, or random data with 1 MiB holes between."""
    data = bytearray(rng.randbytes(SIZE))
    with path.open("wb") as file:
        if holes:
            for start in range(0, SIZE, 2 * MiB):
                data[start + MiB : start + 2 * MiB] = bytes(MiB)
                file.seek(start)
                file.write(data[start : start + MiB])
            file.truncate(SIZE)
        else:
            file.write(data)
    return bytes(data)


async def test_clients_write_through_both_modes_and_recovery_is_exact(
    s3_env: EndpointEnv, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(7)
    source = tmp_path / "proxy.raw"
    with source.open("wb") as file:
        file.write(rng.randbytes(3 * MiB))  # existing data: the initial sync journals it
        file.truncate(SIZE)
    spec = vpg_spec(
        "clients", {"vm": [proxy_disk("proxy", SIZE, source), mirror_disk("mirror", SIZE)]}
    )
    endpoint = await s3_env.open(spec)
    states = {d.disk: d.state for d in endpoint.status().disks}
    assert states["mirror"] == _endpoint.SyncState.INITIAL_SYNC
    await endpoint.resynced()
    models = {"proxy": bytearray(source.read_bytes()), "mirror": bytearray(SIZE)}
    assert endpoint.status().disks[0].state == _endpoint.SyncState.PROTECTING

    converted = _random_image(tmp_path / "convert.raw", rng, holes=False)
    copied = _random_image(tmp_path / "copy.raw", rng, holes=True)
    syncs = 0
    real_fdatasync = os.fdatasync

    def counting_fdatasync(fd: int) -> None:
        nonlocal syncs
        syncs += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_fdatasync)
    for disk in DISKS:
        url = endpoint.url("vm", disk)
        model = models[disk]

        await run(
            "qemu-img",
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            str(tmp_path / "convert.raw"),
            url,
        )
        await run(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", str(tmp_path / "convert.raw"), url
        )
        model[:] = converted

        await run("nbdcopy", str(tmp_path / "copy.raw"), url)  # no --flush: nbdcopy sends none
        model[:] = copied

        def fill(offset: int, length: int, value: int, model: bytearray = model) -> None:
            model[offset : offset + length] = bytes([value]) * length

        commands: list[tuple[str, Callable[[], None]]] = [
            ("write -P 0x11 0 64k", lambda: fill(0, 65536, 0x11)),
            ("write -P 0x22 -f 64k 64k", lambda: fill(65536, 65536, 0x22)),  # FUA
            ("write -P 0x33 1000 333", lambda: fill(1000, 333, 0x33)),  # unaligned
            ("write -P 0x44 -f 200001 70001", lambda: fill(200001, 70001, 0x44)),
            ("write -z 4096 8192", lambda: fill(4096, 8192, 0)),
            ("write -z 300000 1", lambda: fill(300000, 1, 0)),
            ("discard 1M 512k", lambda: fill(MiB, 512 * 1024, 0)),
            ("write -P 0x55 3M 2M", lambda: fill(3 * MiB, 2 * MiB, 0x55)),
            ("flush", lambda: None),
        ]
        args = ["qemu-io", "-f", "raw", "-t", "writeback"]
        before = syncs
        for command, update in commands:
            args += ["-c", command]
            update()
        args += ["-c", "read -P 0x11 0 1000", "-c", "read -P 0x33 1000 333"]
        args += ["-c", "read -P 0 4096 8192", "-c", "read -P 0x55 3M 2M", url]
        result = await run(*args)
        assert "Pattern verification failed" not in result.stdout, result.describe()
        assert syncs - before >= 3, "FUA writes and FLUSH must reach fdatasync"

        # qemu-io's default (writethrough) cache mode: FUA on every write.
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x66 7M 4k", url)
        model[7 * MiB : 7 * MiB + 4096] = b"\x66" * 4096

        out = tmp_path / f"{disk}.out"
        out.write_bytes(b"")
        await run("nbdcopy", url, str(out))
        assert_same(out.read_bytes(), bytes(model), f"nbdcopy out of {disk}")

    listed = json.loads(
        (await run("nbdinfo", "--list", "--json", endpoint.url("vm", "proxy"))).stdout
    )
    sizes = {e["export-name"]: e["export-size"] for e in listed["exports"]}
    assert sizes == {"clients/vm/proxy": SIZE, "clients/vm/mirror": SIZE}

    checkpoint = await endpoint.runtime.checkpoint(tag="after-clients")
    frozen = {disk: bytes(model) for disk, model in models.items()}
    # A write after the cut must not show in its recovery.
    await run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 4k", endpoint.url("vm", "proxy"))
    models["proxy"][:4096] = b"\x77" * 4096

    recovered = await s3_env.recover("clients", checkpoint.id)
    for disk in DISKS:
        assert_same(recovered[("vm", disk)], frozen[disk], f"recovered {disk}")
    assert_same(source.read_bytes(), bytes(models["proxy"]), "the proxy's source file")

    # TRIM and WRITE_ZEROES are journaled as what they are, not as buffers of zeros.
    rows = await journal_rows(s3_env.store, "clients", "vm")
    for disk in DISKS:
        ops = [(r.op, r.offset, r.length, r.data_bytes) for r in rows if r.disk == disk]
        assert ("trim", MiB, 512 * 1024, 0) in ops
        assert ("zero", 4096, 8192, 0) in ops
        assert ("zero", 300000, 1, 0) in ops
        assert ("zero", MiB, MiB, 0) in ops  # nbdcopy's hole in copy.raw
    # The proxy's initial sync: its data as writes, its hole as one zeroing.
    initial = [(r.op, r.offset, r.length) for r in rows if r.disk == "proxy"][:4]
    assert initial == [
        ("write", 0, MiB),
        ("write", MiB, MiB),
        ("write", 2 * MiB, MiB),
        ("zero", 3 * MiB, 5 * MiB),
    ]

    # The mirror target saw a whole disk written: its first pass is complete.
    mirror = next(d for d in endpoint.status().disks if d.disk == "mirror")
    assert mirror.state == _endpoint.SyncState.PROTECTING, mirror
