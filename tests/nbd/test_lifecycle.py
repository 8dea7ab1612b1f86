"""Server lifecycle: exports added and removed while serving, shutdown, settings."""

from __future__ import annotations

import asyncio
import struct

import pytest

from ebbtide_engine import _nbd

from . import _raw
from ._support import MiB, NbdEnv, eventually


async def test_disconnected_is_called_once_per_connection_to_the_export(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    # LIST and INFO alone do not connect to the export.
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    await client.option(_raw.OPT_LIST)
    await client.go("vpg/vm/disk", opt=_raw.OPT_INFO)
    await client.option(_raw.OPT_ABORT)
    await client.close()
    clients = []
    for _ in range(3):
        client = await _raw.RawClient.connect(server.port)
        await client.open("vpg/vm/disk")
        clients.append(client)
    await clients[0].disconnect()  # clean
    await clients[1].close()  # hard
    await clients[2].send(b"garbage garbage garbage garbage")  # protocol error
    await eventually(lambda: server.connection_count == 0, "connections closed")
    assert disk.disconnects == 3
    await clients[2].close()


async def test_exports_can_be_added_and_removed_while_serving(env: NbdEnv) -> None:
    first, second = env.disk(MiB), env.disk(2 * MiB)
    server = await env.serve({"vpg/vm/first": first})
    server.add_export("vpg/vm/second", second)
    with pytest.raises(ValueError, match="already served"):
        server.add_export("vpg/vm/second", second)

    on_first = await _raw.RawClient.connect(server.port)
    await on_first.open("vpg/vm/first")
    on_second = await _raw.RawClient.connect(server.port)
    assert (await on_second.open("vpg/vm/second")).size == 2 * MiB

    assert await server.remove_export("vpg/vm/second") is second
    assert second.disconnects == 1
    assert await on_second.wait_closed_by_server() == b""
    await on_second.close()
    with pytest.raises(KeyError, match="not served"):
        await server.remove_export("vpg/vm/second")

    # Other exports are untouched; the removed one is gone for new clients.
    assert await on_first.write(0, b"first") == 0
    late = await _raw.RawClient.connect(server.port)
    await late.client_flags()
    replies = await late.option(_raw.OPT_GO, _raw.export_request("vpg/vm/second"))
    assert replies[-1][0] == _raw.REP_ERR_UNKNOWN
    replies = await late.option(_raw.OPT_LIST)
    assert [data[4:] for _, data in replies[:-1]] == [b"vpg/vm/first"]
    await late.close()
    await on_first.disconnect()
    assert set(server.exports) == {"vpg/vm/first"}


async def test_remove_export_waits_for_the_backend_call_in_progress(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk")
    disk.gate = asyncio.Event()
    await client.send(_raw.request(_raw.CMD_WRITE, 0, 5, handle=3) + b"held!")
    await eventually(lambda: len(disk.writes) == 1, "write reached the backend")
    removal = asyncio.create_task(server.remove_export("vpg/vm/disk"))
    await asyncio.sleep(0.05)  # give removal a chance to (wrongly) cut the call short
    assert not removal.done()
    disk.gate.set()
    await removal
    # The call finished and was acknowledged before the connection closed.
    assert await client.simple_reply() == (0, 3, b"")
    assert await client.wait_closed_by_server() == b""
    assert disk.path.read_bytes()[:5] == b"held!"
    assert disk.disconnects == 1
    await client.close()


async def test_close_ends_every_connection_and_stops_listening(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    port = server.port
    serving = await _raw.RawClient.connect(server.port)
    await serving.open("vpg/vm/disk")
    haggling = await _raw.RawClient.connect(server.port)
    await haggling.client_flags()
    await server.close()
    assert server.connection_count == 0
    assert await serving.wait_closed_by_server() == b""
    assert await haggling.wait_closed_by_server() == b""
    assert disk.disconnects == 1
    with pytest.raises(OSError, match="Connect call failed"):
        await asyncio.open_connection("127.0.0.1", port)
    await server.close()  # idempotent
    await serving.close()
    await haggling.close()


async def test_close_cancels_a_backend_call_that_never_returns(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk}, stop_timeout=0.2)
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk")
    disk.gate = asyncio.Event()  # never set
    await client.send(_raw.request(_raw.CMD_WRITE, 0, 3) + b"abc")
    await eventually(lambda: len(disk.writes) == 1, "write reached the backend")
    await server.close()
    assert await client.wait_closed_by_server() == b""
    assert disk.disconnects == 1
    await client.close()


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_block"):
        _nbd.NbdServer({}, min_block=3)
    with pytest.raises(ValueError, match="min_block"):
        _nbd.NbdServer({}, min_block=2**17)
    with pytest.raises(ValueError, match="preferred_block"):
        _nbd.NbdServer({}, preferred_block=256)
    with pytest.raises(ValueError, match="preferred_block"):
        _nbd.NbdServer({}, min_block=8192, preferred_block=4096)
    with pytest.raises(ValueError, match="max_payload"):
        _nbd.NbdServer({}, min_block=512, max_payload=MiB + 1)
    with pytest.raises(ValueError, match="max_payload"):
        _nbd.NbdServer({}, max_payload=1024)
    with pytest.raises(ValueError, match="tls_required"):
        _nbd.NbdServer({}, tls_required=True)
    with pytest.raises(RuntimeError, match="start"):
        _ = _nbd.NbdServer({}).port


@pytest.mark.parametrize(
    "name", ["disk", "vpg/vm", "vpg/vm/disk/extra", "vpg//disk", "vpg/vm/ disk", "a\0/b/c"]
)
def test_export_names_must_be_vpg_vm_disk(name: str) -> None:
    with pytest.raises(ValueError, match="export name"):
        _nbd.validate_export_name(name)


async def test_url_forms(env: NbdEnv) -> None:
    server = await env.serve({})
    assert server.url("a/b/c") == f"nbd://127.0.0.1:{server.port}/a/b/c"
    assert server.url("a/b/c", tls=True) == f"nbds://127.0.0.1:{server.port}/a/b/c"
    assert server.url("ä b/c/d") == f"nbd://127.0.0.1:{server.port}/%C3%A4%20b/c/d"


async def test_a_connection_stuck_in_a_huge_write_does_not_block_others(env: NbdEnv) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk})
    hog = await _raw.RawClient.connect(server.port)
    await hog.open("vpg/vm/disk")
    # Declares a 4 GiB write, sends a little of it, then stalls.
    await hog.send(struct.pack(">IHHQQI", _raw.REQUEST_MAGIC, 0, 1, 1, 0, 2**32 - 1) + b"x" * MiB)
    other = await _raw.RawClient.connect(server.port)
    await other.open("vpg/vm/disk")
    assert await other.write(0, b"other") == 0
    await other.disconnect()
    await hog.close()
    await eventually(lambda: server.connection_count == 0, "hog dropped")
    assert [c.data for c in disk.writes] == [b"other"]
