"""Failover-test exports over real NBD clients, against recovery and the model, on moto."""

from __future__ import annotations

import asyncio
import pathlib
import random

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _keys, _mirror
from tests.nbd import _raw
from tests.nbd._support import need, run
from tests.testexport.conftest import CHUNK, VPG, KiB, Protected

TEST = ebbtide.CheckpointSelector(tag="test")


async def _open(
    protected: Protected, tmp_path: pathlib.Path, **options: object
) -> ebbtide.RecoveryExport:
    return await ebbtide.RecoveryExport.open(
        protected.store,
        VPG,
        TEST,
        tmp_path / "scratch",
        options=ebbtide.RecoveryExportOptions(**options),  # type: ignore[arg-type]
        owner="tests/testexport",
    )


async def _bucket(store: ebbtide.ObjectStore) -> dict[str, str]:
    """Every object of the VPG with its ETag, but its holds and the manifest.

    The manifest changes as the open runtime renews its lease.
    """
    layout = _keys.VpgLayout(VPG)
    return {
        info.key: info.etag
        async for info in store.list(layout.root)
        if not info.key.startswith(layout.holds_prefix) and info.key != layout.manifest
    }


async def _copy(url: str, path: pathlib.Path) -> bytes:
    await run("nbdcopy", url, str(path))
    return await asyncio.to_thread(path.read_bytes)


async def test_export_serves_the_checkpoint_exactly_as_recovery_does(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    need("qemu-img")
    recovered = await ebbtide.recover_to_files(protected.store, VPG, TEST, tmp_path / "files")
    expected = protected.model.checkpoints[protected.test.id]
    async with await _open(protected, tmp_path) as export:
        assert export.checkpoint == protected.test
        urls = export.urls()
        assert set(urls) == set(expected)
        port = urls[("web", "root")].rsplit(":", 1)[1].split("/")[0]
        assert urls[("web", "root")] == f"nbd://127.0.0.1:{port}/{VPG}/web/root"
        for disk in recovered.disks:
            url = urls[(disk.vm, disk.disk)]
            await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(disk.path), url)
            copied = await _copy(url, tmp_path / f"{disk.vm}-{disk.disk}.raw")
            assert copied == expected[(disk.vm, disk.disk)]  # the oracle, not only recovery
            assert copied != protected.model.checkpoints[protected.after.id][(disk.vm, disk.disk)]
        status = export.status()
        assert status.reads > 0
        assert status.writes == 0
        assert status.overlay_bytes == 0


async def test_unaligned_reads_across_every_layer_match_the_model(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    expected = protected.model.checkpoints[protected.test.id]
    rng = random.Random(5)
    async with await _open(protected, tmp_path, cache_bytes=3 * CHUNK) as export:
        url = export.urls()[("web", "data")]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        for (vm, disk), data in expected.items():
            client = await _raw.RawClient.connect(port)
            try:
                assert (await client.open(f"{VPG}/{vm}/{disk}")).size == len(data)
                for _ in range(60):
                    offset = rng.randrange(len(data))
                    length = rng.randint(1, min(3 * CHUNK, len(data) - offset))
                    got = await client.read(offset, length)
                    assert got == data[offset : offset + length], (vm, disk, offset, length)
            finally:
                await client.disconnect()


async def test_the_first_read_comes_before_anything_is_materialised(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    need("qemu-img")
    layout = _keys.VpgLayout(VPG)
    journal = 0  # the segments above the promoted checkpoint up to the exported one
    async for info in protected.store.list(layout.journals_prefix):
        name = layout.parse_segment(info.key)
        if name.last_lsn > protected.base.id and name.first_lsn <= protected.test.id:
            journal += info.size
    disk_bytes = sum(len(data) for data in protected.model.disks.values())
    async with await _open(protected, tmp_path) as export:
        assert export.status().bytes_fetched == journal  # no chunk yet
        assert journal < disk_bytes / 3
        url = export.urls()[("web", "root")]
        first = tmp_path / "first.raw"
        await run("qemu-img", "dd", "-f", "raw", "-O", "raw", "bs=4096", "count=1",
                  f"if={url}", f"of={first}")  # fmt: skip
        expected = protected.model.checkpoints[protected.test.id][("web", "root")]
        assert first.read_bytes() == expected[:4096]
        fetched = export.status().bytes_fetched - journal
        assert 0 < fetched <= CHUNK  # one chunk at most (qemu may probe the end too)
        assert export.status().bytes_fetched < disk_bytes / 3


async def test_test_vm_writes_change_the_export_but_not_the_bucket(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    need("qemu-io")
    before = await _bucket(protected.store)
    expected = bytearray(protected.model.checkpoints[protected.test.id][("db", "log")])
    async with await _open(protected, tmp_path) as export:
        url = export.urls()[("db", "log")]
        scratch = export.scratch_path
        assert scratch.is_dir()
        commands = [
            ("write -P 0xab 1000 10000", 1000, b"\xab" * 10000),
            ("write -z 100k 64k", 100 * KiB, bytes(64 * KiB)),
            ("discard 300k 128k", 300 * KiB, bytes(128 * KiB)),
            ("write -P 0x5c -f 900k 8k", 900 * KiB, b"\x5c" * 8 * KiB),  # FUA
        ]
        args = ["qemu-io", "-f", "raw", "-d", "unmap"]
        for command, offset, data in commands:
            args += ["-c", command]
            expected[offset : offset + len(data)] = data
        await run(*args, "-c", "flush", url)
        await run("qemu-io", "-f", "raw", "-r", "-c", "read -P 0xab 1000 10000", url)
        copied = await _copy(url, tmp_path / "log.raw")
        assert copied == bytes(expected)
        status = export.status()
        assert status.writes == 4
        assert status.overlay_bytes == 10000 + 64 * KiB + 128 * KiB + 8 * KiB
        assert status.connections == 0
        # The other disks are untouched, the bucket too.
        web = await _copy(export.urls()[("web", "root")], tmp_path / "root.raw")
        assert web == protected.model.checkpoints[protected.test.id][("web", "root")]
        assert await _bucket(protected.store) == before
    assert not scratch.exists()
    assert list((tmp_path / "scratch").iterdir()) == []
    assert await _bucket(protected.store) == before
    assert await ebbtide.list_holds(protected.store, VPG) == []
    # A later recovery, and a new export, still see the checkpoint as it was.
    recovered = await ebbtide.recover_to_files(protected.store, VPG, TEST, tmp_path / "files")
    protected.model.assert_recovered(protected.test.id, tmp_path / "files")
    assert recovered.checkpoint == protected.test
    async with await _open(protected, tmp_path) as again:
        copied = await _copy(again.urls()[("db", "log")], tmp_path / "again.raw")
        assert copied == protected.model.checkpoints[protected.test.id][("db", "log")]


async def test_a_promotion_meanwhile_does_not_break_the_export(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    """The hold keeps what the export planned against; no cache, so every read refetches."""
    layout = _keys.VpgLayout(VPG)
    expected = protected.model.checkpoints[protected.test.id]
    async with await _open(protected, tmp_path, cache_bytes=0) as export:
        holds = await ebbtide.list_holds(protected.store, VPG)
        assert [(h.purpose, h.owner) for h in holds] == [("failover-test", "tests/testexport")]
        # Two hours on: a history pass promotes past the exported checkpoint.
        protected.clock[0] += 2 * 3600
        await protected.churn(10)
        newest = await protected.checkpoint()
        maintenance = await protected.runtime.maintain()
        assert maintenance.promoted_lsn == newest.id > protected.test.id
        for (vm, disk), data in expected.items():
            copied = await _copy(export.urls()[(vm, disk)], tmp_path / f"{vm}-{disk}.raw")
            assert copied == data, (vm, disk)
    assert await ebbtide.list_holds(protected.store, VPG) == []
    # Without the hold, the next pass deletes what the promotion made dead.
    await protected.runtime.maintain()
    async for info in protected.store.list(layout.journals_prefix):
        assert layout.parse_segment(info.key).last_lsn > newest.id


async def test_bad_inputs_are_refused_clearly_and_leave_nothing_behind(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    store = protected.store
    scratch = tmp_path / "scratch"
    before = await _bucket(store)
    with pytest.raises(ebbtide.CheckpointNotFound, match="no VPG named 'nope'"):
        await ebbtide.RecoveryExport.open(store, "nope", TEST, scratch)
    assert [info.key async for info in store.list("vpgs/nope/")] == []
    with pytest.raises(ebbtide.CheckpointNotFound, match="has no checkpoint with id 999999"):
        await ebbtide.RecoveryExport.open(
            store, VPG, ebbtide.CheckpointSelector(id=999999), scratch
        )
    # Promoted away: no longer recoverable, and the message lists what is.
    with pytest.raises(ebbtide.CheckpointNotFound, match=f"ids {protected.base.id}\\.\\."):
        await ebbtide.RecoveryExport.open(
            store, VPG, ebbtide.CheckpointSelector(id=protected.base.id - 1), scratch
        )
    with pytest.raises(ebbtide.InvalidRequest, match=r"had no VM 'ghost'.*it had: db, web"):
        await ebbtide.RecoveryExport.open(store, VPG, TEST, scratch, vms=["web", "ghost"])
    with pytest.raises(ebbtide.InvalidRequest, match="at least one VM"):
        await ebbtide.RecoveryExport.open(store, VPG, TEST, scratch, vms=[])
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ebbtide.InvalidRequest, match=r"scratch directory .*file.* not usable"):
        await ebbtide.RecoveryExport.open(store, VPG, TEST, not_a_dir)
    with pytest.raises(ebbtide.InvalidRequest, match="cache_bytes"):
        await _open(protected, tmp_path, cache_bytes=-1)
    assert await ebbtide.list_holds(store, VPG) == []
    assert list(scratch.iterdir()) == []
    assert await _bucket(store) == before
    # A chosen VM only: the others are not exported.
    async with await ebbtide.RecoveryExport.open(store, VPG, TEST, scratch, vms=["db"]) as export:
        assert set(export.urls()) == {("db", "log")}
        refused = await run("nbdinfo", export.urls()[("db", "log")].replace("db/log", "web/root"),
                            check=False)  # fmt: skip
        assert refused.returncode != 0


async def test_advertised_host_goes_into_the_urls(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    async with await _open(protected, tmp_path, advertise_host="export.example.test") as export:
        url = export.urls()[("web", "data")]
        assert url.startswith("nbd://export.example.test:")
        assert url.endswith(f"/{VPG}/web/data")


async def test_tls_export_takes_only_tls_clients(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    from tests.nbd import _certs  # needs cryptography

    pki = _certs.make_certificates(tmp_path / "pki")
    client_pki = tmp_path / "client-pki"
    client_pki.mkdir()
    (client_pki / "ca-cert.pem").write_bytes((pki / "ca-cert.pem").read_bytes())
    async with await _open(protected, tmp_path, tls=_certs.server_context(pki)) as export:
        url = export.urls()[("web", "data")]
        assert url.startswith("nbds://127.0.0.1:")
        copied = await _copy(f"{url}?tls-certificates={client_pki}", tmp_path / "data.raw")
        assert copied == protected.model.checkpoints[protected.test.id][("web", "data")]
        plain = await run("nbdinfo", url.replace("nbds://", "nbd://"), check=False)
        assert plain.returncode != 0


async def test_corrupt_objects_are_never_served(
    protected: Protected, tmp_path: pathlib.Path
) -> None:
    """A chunk that does not match its SHA-256 gives EIO; a damaged segment fails the open."""
    store, layout = protected.store, _keys.VpgLayout(VPG)
    chunk_keys = [info.key async for info in store.list(layout.mirror_chunk_prefix("db", "log"))]
    victim = chunk_keys[0]
    original = (await store.get(victim)).data
    head = await store.head(victim)
    flipped = bytes([original[0] ^ 0xFF]) + original[1:]
    await store.put_if_match(victim, flipped, etag=head.etag)
    mirror = await _mirror.read_map(store, layout, "db", "log", protected.base.id)
    assert mirror is not None
    index = next(
        i for i, d in mirror.chunks.items() if layout.mirror_chunk("db", "log", d) == victim
    )
    async with await _open(protected, tmp_path, cache_bytes=0) as export:
        port = int(export.urls()[("db", "log")].rsplit(":", 1)[1].split("/")[0])
        client = await _raw.RawClient.connect(port)
        try:
            await client.open(f"{VPG}/db/log")
            # Every byte of that chunk the journal does not cover comes from the chunk.
            error, _ = await client.command(_raw.CMD_READ, index * CHUNK, CHUNK)
            assert error == 5  # EIO
            other = (index + 1) % len(mirror.chunks)
            assert (
                await client.read(other * CHUNK, 4096)
                == protected.model.checkpoints[protected.test.id][("db", "log")][
                    other * CHUNK : other * CHUNK + 4096
                ]
            )  # the connection goes on
        finally:
            await client.disconnect()
    await store.put_if_match(victim, original, etag=(await store.head(victim)).etag)
    segments = [
        info
        async for info in store.list(layout.journal_prefix("db"))
        if layout.parse_segment(info.key).last_lsn > protected.base.id
    ]
    segment = segments[0]
    body = (await store.get(segment.key)).data
    await store.put_if_match(segment.key, body[:-1] + bytes([body[-1] ^ 1]), etag=segment.etag)
    with pytest.raises(ebbtide.CorruptObjectError, match=segment.key):
        await _open(protected, tmp_path)
    assert await ebbtide.list_holds(store, VPG) == []
