"""Request pipelining: the server receives ahead while a backend call runs, and keeps order.

Each connection has a reader task that receives requests (header and whole
payload) while a worker task executes the previous ones strictly in order.
These tests hold a backend write on an event (``RecordingBackend.gate``) and
watch the connection's ``received`` counter: it must move past the held
request (the overlap is real), stop at the window bound (backpressure), and
nothing behind the held write may reach the backend or be answered before it.
"""

from __future__ import annotations

import asyncio
import os

import pytest

from ebbtide_engine import _nbd
from ebbtide_engine._nbd import _connection

from . import _raw
from ._support import Call, MiB, NbdEnv, RecordingBackend, eventually, need

SIZE = 8 * MiB
KiB = 1024


@pytest.fixture
def disk(env: NbdEnv) -> RecordingBackend:
    return env.disk(SIZE)


@pytest.fixture
async def server(env: NbdEnv, disk: RecordingBackend) -> _nbd.NbdServer:
    return await env.serve({"vpg/vm/disk": disk}, max_payload=4 * MiB)


@pytest.fixture
async def client(server: _nbd.NbdServer) -> _raw.RawClient:
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk")
    return client


def _connection_of(server: _nbd.NbdServer) -> _connection.Connection:
    (conn,) = server._connections
    return conn


async def test_next_requests_are_received_while_a_write_is_held(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    gate = disk.gate = asyncio.Event()
    first = os.urandom(256 * KiB)
    later = [os.urandom(300 * KiB) for _ in range(4)]
    stream = _raw.request(_raw.CMD_WRITE, 0, len(first), handle=1) + first
    for i, data in enumerate(later):
        stream += _raw.request(_raw.CMD_WRITE, (i + 1) * MiB, len(data), handle=i + 2) + data
    stream += _raw.request(_raw.CMD_FLUSH, handle=6)
    await client.send(stream)
    conn = _connection_of(server)
    # All six were received (payloads included) while the first write is held...
    await eventually(lambda: conn.received == 6, "the requests behind the held write received")
    # ...and none of them reached the backend or was answered before it.
    assert [call.op for call in disk.calls] == ["write"]
    gate.set()
    replies = [(await client.simple_reply())[:2] for _ in range(6)]
    assert replies == [(0, handle) for handle in range(1, 7)]
    expected = [Call("write", 0, len(first), first)]
    expected += [Call("write", (i + 1) * MiB, len(d), d) for i, d in enumerate(later)]
    assert disk.calls == [*expected, Call("flush")]
    content = disk.path.read_bytes()
    assert content[: len(first)] == first
    for i, data in enumerate(later):
        assert content[(i + 1) * MiB : (i + 1) * MiB + len(data)] == data
    await client.disconnect()


async def test_the_window_bounds_what_is_received_ahead(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    gate = disk.gate = asyncio.Event()
    count = _connection._MAX_IN_FLIGHT + 10
    datas = [os.urandom(4 * KiB) for _ in range(count)]
    stream = b"".join(
        _raw.request(_raw.CMD_WRITE, i * 4 * KiB, 4 * KiB, handle=i) + data
        for i, data in enumerate(datas)
    )
    await client.send(stream)
    conn = _connection_of(server)
    await eventually(
        lambda: conn.received == _connection._MAX_IN_FLIGHT, "the window filled while held"
    )
    # The reader waits for room: give it a moment to prove it does not go on.
    await asyncio.sleep(0.2)
    assert conn.received == _connection._MAX_IN_FLIGHT
    assert len(disk.calls) == 1
    gate.set()
    replies = [(await client.simple_reply())[:2] for _ in range(count)]
    assert replies == [(0, handle) for handle in range(count)]
    assert [call.data for call in disk.writes] == datas
    assert disk.path.read_bytes()[: count * 4 * KiB] == b"".join(datas)
    await client.disconnect()


async def test_byte_budget_lets_one_maximal_write_in(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    """Large writes in flight are bounded by bytes too, yet the largest always passes."""
    gate = disk.gate = asyncio.Event()
    datas = [os.urandom(4 * MiB) for _ in range(2)] + [os.urandom(4 * MiB - 512)]
    stream = b"".join(
        _raw.request(_raw.CMD_WRITE, 0, len(data), handle=i) + data for i, data in enumerate(datas)
    )
    sending = asyncio.create_task(client.send(stream))
    conn = _connection_of(server)
    await eventually(lambda: len(disk.calls) == 1, "the first write held")
    gate.set()
    await sending
    replies = [(await client.simple_reply())[:2] for _ in range(3)]
    assert replies == [(0, 0), (0, 1), (0, 2)]
    assert [call.data for call in disk.writes] == datas
    assert conn.received == 3
    # Overlapping writes, applied in order: the last one wins where it reaches.
    assert disk.path.read_bytes()[: 4 * MiB - 512] == datas[2]
    await client.disconnect()


async def test_fua_flush_and_errors_keep_order_with_many_in_flight(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    """A burst mixing large and small writes, FUA, FLUSH, zeroing and refusals."""
    sent: list[Call] = []
    expected_errors: dict[int, int] = {}
    stream = b""
    image = bytearray(SIZE)
    for handle in range(120):
        offset = (handle * 104729 * 512) % (SIZE - 2 * MiB)
        kind = handle % 8
        if kind == 7:
            stream += _raw.request(_raw.CMD_FLUSH, handle=handle)
            sent.append(Call("flush"))
        elif kind == 6:
            stream += _raw.request(_raw.CMD_WRITE_ZEROES, offset, 70 * KiB, handle=handle)
            sent.append(Call("write_zeroes", offset, 70 * KiB, may_trim=True))
            image[offset : offset + 70 * KiB] = bytes(70 * KiB)
        elif kind == 5:
            # Beyond the end: refused while received, answered in its turn.
            stream += _raw.request(_raw.CMD_WRITE, SIZE, 512, handle=handle) + bytes(512)
            expected_errors[handle] = _raw.ENOSPC
        else:
            fua = kind == 3
            length = (64 + handle * 37 % 1500) * KiB if kind % 2 else 1 + handle * 13 % 5000
            data = os.urandom(length)
            flags = _raw.CMD_FLAG_FUA if fua else 0
            stream += (
                _raw.request(_raw.CMD_WRITE, offset, length, flags=flags, handle=handle) + data
            )
            sent.append(Call("write", offset, length, data, fua))
            image[offset : offset + length] = data
    sending = asyncio.create_task(client.send(stream))
    replies = [(await client.simple_reply())[:2] for _ in range(120)]
    await sending
    assert replies == [(expected_errors.get(handle, 0), handle) for handle in range(120)]
    assert disk.calls == sent
    assert disk.path.read_bytes() == bytes(image)
    await client.disconnect()


async def test_disconnect_mid_payload_after_a_held_write(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    """A write received whole is still served; the truncated one behind it never is."""
    gate = disk.gate = asyncio.Event()
    whole = os.urandom(128 * KiB)
    await client.send(
        _raw.request(_raw.CMD_WRITE, 0, len(whole), handle=1)
        + whole
        + _raw.request(_raw.CMD_WRITE, MiB, 256 * KiB, handle=2)
        + b"\x99" * 1000
    )
    await eventually(lambda: len(disk.calls) == 1, "the first write held")
    await client.close()
    gate.set()
    await eventually(lambda: server.connection_count == 0, "connection closed")
    assert [(c.offset, c.data) for c in disk.writes] == [(0, whole)]
    assert disk.path.read_bytes()[MiB : MiB + 256 * KiB] == bytes(256 * KiB)
    assert disk.disconnects == 1


async def test_server_close_waits_for_the_held_write_and_drops_the_rest(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    gate = disk.gate = asyncio.Event()
    stream = b"".join(
        _raw.request(_raw.CMD_WRITE, i * KiB, KiB, handle=i) + bytes([i]) * KiB for i in range(5)
    )
    await client.send(stream)
    conn = _connection_of(server)
    await eventually(lambda: conn.received == 5, "all received")
    closing = asyncio.create_task(server.close())
    await asyncio.sleep(0.05)
    assert not closing.done()  # the held call is not cancelled half-way
    gate.set()
    await closing
    assert [call.offset for call in disk.writes] == [0]
    assert disk.disconnects == 1
    await client.close()


async def test_qemu_io_aio_writes_are_received_ahead_and_kept_in_order(
    env: NbdEnv, server: _nbd.NbdServer, disk: RecordingBackend
) -> None:
    need("qemu-io")
    gate = disk.gate = asyncio.Event()
    commands = []
    for i in range(8):
        fua = " -f" if i == 5 else ""
        commands += ["-c", f"aio_write{fua} -P {0x10 + i} {i * 512}k 512k"]
    commands += ["-c", "aio_flush"]
    url = server.url("vpg/vm/disk")
    process = await asyncio.create_subprocess_exec(
        "qemu-io",
        "-f",
        "raw",
        "-t",
        "writeback",
        *commands,
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await eventually(lambda: server.connection_count == 1, "qemu-io connected", within=30)
        conn = _connection_of(server)
        # qemu keeps several requests in flight: more than the held one are received.
        await eventually(lambda: conn.received >= 4, "requests received ahead", within=30)
        assert len(disk.calls) == 1
    finally:
        gate.set()
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, output.decode()
    writes = [(c.offset, c.length, c.fua) for c in disk.writes]
    assert sorted(writes) == [(i * 512 * KiB, 512 * KiB, i == 5) for i in range(8)]
    content = disk.path.read_bytes()
    for i in range(8):
        assert content[i * 512 * KiB : (i + 1) * 512 * KiB] == bytes([0x10 + i]) * 512 * KiB
    # aio_flush comes after every write it covers.
    ops = [c.op for c in disk.calls if c.op != "read"]
    assert ops[-1] == "flush"
    assert ops.count("write") == 8
