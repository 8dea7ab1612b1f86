"""Real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy) against the server."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

from ._support import MiB, NbdEnv, eventually, run


async def test_nbdinfo_lists_every_export_with_its_size(env: NbdEnv) -> None:
    server = await env.serve(
        {
            "vpg1/vm1/disk0": env.disk(4 * MiB),
            "vpg1/vm1/disk1": env.disk(1 * MiB, read_only=True),
            "vpg1/vm2/disk0": env.disk(3 * MiB + 512),
        }
    )
    result = await run("nbdinfo", "--list", "--json", server.url("vpg1/vm1/disk0"))
    listed = {export["export-name"]: export for export in json.loads(result.stdout)["exports"]}
    assert {name: export["export-size"] for name, export in listed.items()} == {
        "vpg1/vm1/disk0": 4 * MiB,
        "vpg1/vm1/disk1": 1 * MiB,
        "vpg1/vm2/disk0": 3 * MiB + 512,
    }
    assert listed["vpg1/vm1/disk1"]["is_read_only"] is True
    assert listed["vpg1/vm1/disk0"]["is_read_only"] is False


async def test_nbdinfo_shows_the_advertised_flags_and_block_sizes(env: NbdEnv) -> None:
    server = await env.serve(
        {"vpg/vm/disk": env.disk()}, min_block=512, preferred_block=64 * 1024, max_payload=MiB
    )
    result = await run("nbdinfo", "--json", server.url("vpg/vm/disk"))
    info = json.loads(result.stdout)
    assert info["protocol"] == "newstyle-fixed"
    assert info["TLS"] is False
    export = info["exports"][0]
    assert export["block_size_minimum"] == 512
    assert export["block_size_preferred"] == 64 * 1024
    assert export["block_size_maximum"] == MiB
    assert export["can_multi_conn"] is False
    assert export["can_flush"] is True
    assert export["can_fua"] is True
    assert export["can_trim"] is True
    assert export["can_zero"] is True
    assert export["description"] == "Ebbtide disk 'disk' of VM 'vm' in VPG 'vpg' (read-write)"


async def test_nbdinfo_defaults_block_sizes(env: NbdEnv) -> None:
    server = await env.serve({"vpg/vm/disk": env.disk()})
    export = json.loads((await run("nbdinfo", "--json", server.url("vpg/vm/disk"))).stdout)
    sizes = [export["exports"][0][f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
    assert sizes == [1, 4096, 32 * MiB]


async def test_qemu_io_patterns_fua_discard_zero_flush(env: NbdEnv) -> None:
    disk = env.disk(2 * MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    url = server.url("vpg/vm/disk")
    expected = bytearray(2 * MiB)

    def fill(offset: int, length: int, value: int) -> None:
        expected[offset : offset + length] = bytes([value]) * length

    # -t writeback: plain writes carry no FUA, so -f is the only source of it.
    commands: list[tuple[str, Callable[[], None]]] = [
        ("write -P 0x11 0 64k", lambda: fill(0, 65536, 0x11)),
        ("write -P 0x22 -f 64k 64k", lambda: fill(65536, 65536, 0x22)),
        ("write -P 0x33 1000 333", lambda: fill(1000, 333, 0x33)),
        ("write -P 0x44 -f 200001 70001", lambda: fill(200001, 70001, 0x44)),
        ("write -z 4096 8192", lambda: fill(4096, 8192, 0)),
        ("write -z 300000 1", lambda: fill(300000, 1, 0)),
        ("discard 1M 512k", lambda: fill(MiB, 512 * 1024, 0)),
        ("flush", lambda: None),
    ]
    args = ["qemu-io", "-f", "raw", "-t", "writeback"]
    for command, update in commands:
        args += ["-c", command]
        update()
    args += [
        "-c",
        "read -P 0x11 0 1000",
        "-c",
        "read -P 0x33 1000 333",
        "-c",
        "read -P 0x22 64k 64k",
        "-c",
        "read -P 0x44 200001 70001",
        "-c",
        "read -P 0 4096 8192",
        url,
    ]
    result = await run(*args)
    assert "Pattern verification failed" not in result.stdout, result.describe()
    assert disk.path.read_bytes() == bytes(expected)

    writes = [(c.offset, c.length, c.fua) for c in disk.writes]
    assert writes == [
        (0, 65536, False),
        (65536, 65536, True),
        (1000, 333, False),
        (200001, 70001, True),
    ]
    ops = [c.op for c in disk.calls if c.op != "read"]
    assert ops.count("flush") >= 1
    assert [(c.offset, c.length) for c in disk.calls if c.op == "trim"] == [(MiB, 512 * 1024)]
    zeroes = [(c.offset, c.length) for c in disk.calls if c.op == "write_zeroes"]
    assert zeroes == [(4096, 8192), (300000, 1)]
    await eventually(lambda: disk.disconnects == 1, "1 disconnect(s) seen")


async def test_qemu_io_writethrough_makes_writes_durable(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", server.url("vpg/vm/disk"))
    # qemu's default cache mode is writethrough: each write is FUA or followed by FLUSH.
    durable = [c for c in disk.calls if c.op == "flush" or (c.op == "write" and c.fua)]
    assert durable, disk.calls


async def test_qemu_img_convert_then_compare(env: NbdEnv, tmp_path: pathlib.Path) -> None:
    size = 24 * MiB + 4096
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(size))
    disk = env.disk(size)
    server = await env.serve({"vpg/vm/disk": disk})
    url = server.url("vpg/vm/disk")
    await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(source), url)
    await run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), url)
    assert disk.path.read_bytes() == source.read_bytes()


async def test_nbdcopy_into_and_out_of_an_export(env: NbdEnv, tmp_path: pathlib.Path) -> None:
    size = 16 * MiB
    source = tmp_path / "in.raw"
    source.write_bytes(os.urandom(size))
    copy = tmp_path / "out.raw"
    copy.write_bytes(b"")
    disk = env.disk(size)
    server = await env.serve({"vpg/vm/disk": disk})
    url = server.url("vpg/vm/disk")
    await run("nbdcopy", "--flush", str(source), url)
    assert disk.path.read_bytes() == source.read_bytes()
    assert any(c.op == "flush" for c in disk.calls)
    await run("nbdcopy", url, str(copy))
    assert copy.read_bytes() == source.read_bytes()
    # Without multi-conn, nbdcopy must use one connection per run.
    await eventually(lambda: disk.disconnects == 2, "2 disconnect(s) seen")


async def test_unknown_export_is_refused_and_others_keep_working(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    refused = await run("nbdinfo", server.url("vpg/vm/nope"), check=False)
    assert refused.returncode != 0
    assert "vpg/vm/nope" in refused.stderr
    url = server.url("no/such/export")
    refused = await run("qemu-io", "-f", "raw", "-c", "read 0 4k", url, check=False)
    assert refused.returncode != 0
    assert "Requested export not available" in refused.stderr, refused.describe()
    await run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", server.url("vpg/vm/disk"))
    assert disk.path.read_bytes()[:4096] == b"\x07" * 4096
    await eventually(lambda: disk.disconnects == 1, "1 disconnect(s) seen")


async def test_read_only_export_refuses_qemu_writes(env: NbdEnv) -> None:
    disk = env.disk(MiB, read_only=True, content=b"\x42" * 4096)
    server = await env.serve({"vpg/vm/ro": disk})
    url = server.url("vpg/vm/ro")
    await run("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4k", url)
    refused = await run("qemu-io", "-f", "raw", "-c", "write 0 4k", url, check=False)
    # The READ_ONLY flag makes qemu refuse a read-write open before any write is sent.
    assert refused.returncode != 0
    assert "Permission denied" in refused.stderr, refused.describe()
    assert disk.writes == []


async def test_url_quotes_export_names_for_qemu_and_libnbd(env: NbdEnv) -> None:
    name = "vpg one/vm%2/disk#0?"
    disk = env.disk(MiB)
    server = await env.serve({name: disk})
    url = server.url(name)
    assert url == f"nbd://127.0.0.1:{server.port}/vpg%20one/vm%252/disk%230%3F"
    await run("qemu-io", "-f", "raw", "-c", "write -P 9 0 512", url)
    info = json.loads((await run("nbdinfo", "--json", url)).stdout)
    assert info["exports"][0]["export-name"] == name
    await eventually(lambda: disk.disconnects == 2, "2 disconnect(s) seen")


async def test_qemu_blockdev_options_as_json(env: NbdEnv) -> None:
    """The blockdev-add form from docs/nbd.md, through qemu-img's json: pseudo-protocol."""
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    node = {
        "driver": "raw",
        "file": {
            "driver": "nbd",
            "server": {"type": "inet", "host": "127.0.0.1", "port": str(server.port)},
            "export": "vpg/vm/disk",
        },
    }
    result = await run("qemu-img", "info", "--output=json", "json:" + json.dumps(node))
    assert json.loads(result.stdout)["virtual-size"] == MiB
