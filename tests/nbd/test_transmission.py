"""Transmission phase over a raw socket: validation, error mapping, replies, order."""

from __future__ import annotations

import errno
import os
import struct

import pytest

from ebbtide_engine import _nbd

from . import _raw
from ._support import Call, MiB, NbdEnv, RecordingBackend, eventually

SIZE = MiB


@pytest.fixture
def disk(env: NbdEnv) -> RecordingBackend:
    return env.disk(SIZE)


@pytest.fixture
async def server(env: NbdEnv, disk: RecordingBackend) -> _nbd.NbdServer:
    return await env.serve(
        {"vpg/vm/disk": disk, "vpg/vm/ro": env.disk(SIZE, read_only=True)}, max_payload=MiB
    )


@pytest.fixture
async def client(server: _nbd.NbdServer) -> _raw.RawClient:
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk")
    return client


@pytest.mark.parametrize(
    ("type_", "offset", "length", "flags", "expected"),
    [
        pytest.param(_raw.CMD_READ, SIZE - 1, 2, 0, _raw.EINVAL, id="read-beyond-end"),
        pytest.param(_raw.CMD_READ, 2**64 - 1, 1, 0, _raw.EINVAL, id="read-offset-wraps"),
        pytest.param(_raw.CMD_READ, 0, MiB + 1, 0, _raw.EINVAL, id="read-over-max-payload"),
        pytest.param(_raw.CMD_WRITE_ZEROES, SIZE, 1, 0, _raw.ENOSPC, id="zero-beyond-end"),
        pytest.param(_raw.CMD_TRIM, SIZE - 10, 11, 0, _raw.EINVAL, id="trim-beyond-end"),
        pytest.param(_raw.CMD_FLUSH, 1, 0, 0, _raw.EINVAL, id="flush-with-offset"),
        pytest.param(_raw.CMD_FLUSH, 0, 1, 0, _raw.EINVAL, id="flush-with-length"),
        pytest.param(_raw.CMD_CACHE, 0, 512, 0, _raw.EINVAL, id="cache-unsupported"),
        pytest.param(_raw.CMD_BLOCK_STATUS, 0, 512, 0, _raw.EINVAL, id="block-status"),
        pytest.param(99, 0, 0, 0, _raw.EINVAL, id="unknown-command"),
        pytest.param(_raw.CMD_READ, 0, 512, _raw.CMD_FLAG_NO_HOLE, _raw.EINVAL, id="read-no-hole"),
        pytest.param(_raw.CMD_READ, 0, 512, _raw.CMD_FLAG_DF, _raw.EINVAL, id="df-without-sr"),
        pytest.param(_raw.CMD_TRIM, 0, 512, 0x8000, _raw.EINVAL, id="unknown-flag"),
        pytest.param(
            _raw.CMD_WRITE_ZEROES, 0, 512, _raw.CMD_FLAG_FAST_ZERO, _raw.EINVAL, id="fast-zero"
        ),
    ],
)
async def test_invalid_requests_get_errors_and_the_connection_stays(
    client: _raw.RawClient,
    disk: RecordingBackend,
    type_: int,
    offset: int,
    length: int,
    flags: int,
    expected: int,
) -> None:
    error, data = await client.command(type_, offset, length, flags=flags, handle=77)
    assert (error, data) == (expected, b"")
    assert disk.calls == []
    assert await client.write(0, b"ok") == 0
    await client.disconnect()


@pytest.mark.parametrize(("length", "expected"), [(1, _raw.ENOSPC), (0, 0)])
async def test_write_beyond_the_end_is_enospc(
    client: _raw.RawClient, disk: RecordingBackend, length: int, expected: int
) -> None:
    assert await client.write(SIZE - length + (1 if length else 0), b"z" * length) == expected
    assert disk.writes == []  # zero-length writes succeed without a backend call
    await client.disconnect()


async def test_fua_is_accepted_on_every_command(client: _raw.RawClient) -> None:
    fua = _raw.CMD_FLAG_FUA
    assert await client.write(0, b"a" * 512, flags=fua) == 0
    assert await client.command(_raw.CMD_READ, 0, 512, flags=fua) == (0, b"a" * 512)
    assert await client.command(_raw.CMD_FLUSH, flags=fua) == (0, b"")
    assert await client.command(_raw.CMD_TRIM, 0, 512, flags=fua) == (0, b"")
    await client.disconnect()


async def test_flags_reach_the_backend(client: _raw.RawClient, disk: RecordingBackend) -> None:
    await client.write(0, b"1" * 10)
    await client.write(10, b"2" * 10, flags=_raw.CMD_FLAG_FUA)
    await client.command(_raw.CMD_WRITE_ZEROES, 0, 4096)
    await client.command(_raw.CMD_WRITE_ZEROES, 4096, 4096, flags=_raw.CMD_FLAG_NO_HOLE)
    await client.command(
        _raw.CMD_WRITE_ZEROES, 8192, 4096, flags=_raw.CMD_FLAG_NO_HOLE | _raw.CMD_FLAG_FUA
    )
    await client.command(_raw.CMD_TRIM, 0, 8192, flags=_raw.CMD_FLAG_FUA)
    await client.command(_raw.CMD_FLUSH)
    assert disk.calls == [
        Call("write", 0, 10, b"1" * 10, fua=False),
        Call("write", 10, 10, b"2" * 10, fua=True),
        Call("write_zeroes", 0, 4096, fua=False, may_trim=True),
        Call("write_zeroes", 4096, 4096, fua=False, may_trim=False),
        Call("write_zeroes", 8192, 4096, fua=True, may_trim=False),
        Call("trim", 0, 8192, fua=True),
        Call("flush"),
    ]
    await client.disconnect()


async def test_read_only_export_refuses_every_write_with_eperm(server: _nbd.NbdServer) -> None:
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/ro")
    assert await client.write(0, b"nope") == _raw.EPERM
    assert (await client.command(_raw.CMD_TRIM, 0, 512))[0] == _raw.EPERM
    assert (await client.command(_raw.CMD_WRITE_ZEROES, 0, 512))[0] == _raw.EPERM
    assert await client.command(_raw.CMD_FLUSH) == (0, b"")
    assert await client.read(0, 4) == bytes(4)
    await client.disconnect()


async def test_structured_replies(server: _nbd.NbdServer, disk: RecordingBackend) -> None:
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk", structured=True)
    assert await client.write(100, b"hello") == 0
    # A read: one OFFSET_DATA chunk, flagged DONE.
    await client.send(_raw.request(_raw.CMD_READ, 98, 9, handle=5))
    [chunk] = await client.chunks()
    assert (chunk.flags, chunk.type, chunk.handle) == (
        _raw.REPLY_FLAG_DONE,
        _raw.REPLY_TYPE_OFFSET_DATA,
        5,
    )
    assert chunk.payload == struct.pack(">Q", 98) + b"\0\0hello\0\0"
    # DF is allowed once structured replies are on.
    await client.send(_raw.request(_raw.CMD_READ, 100, 5, flags=_raw.CMD_FLAG_DF, handle=6))
    assert (await client.chunks())[0].payload[8:] == b"hello"
    # A failed read: an ERROR chunk with a message, never a simple reply.
    await client.send(_raw.request(_raw.CMD_READ, SIZE, 1, handle=7))
    [chunk] = await client.chunks()
    assert (chunk.type, chunk.handle, chunk.flags) == (_raw.REPLY_TYPE_ERROR, 7, 1)
    error, message_length = struct.unpack(">IH", chunk.payload[:6])
    assert error == _raw.EINVAL
    assert b"beyond the export size" in chunk.payload[6 : 6 + message_length]
    # A zero-length read: just NONE + DONE.
    await client.send(_raw.request(_raw.CMD_READ, 0, 0, handle=8))
    [chunk] = await client.chunks()
    assert (chunk.type, chunk.handle, chunk.payload) == (_raw.REPLY_TYPE_NONE, 8, b"")
    # Other successes may stay simple replies.
    await client.send(_raw.request(_raw.CMD_FLUSH, handle=9))
    [chunk] = await client.chunks()
    assert (chunk.type, chunk.handle, chunk.payload) == (-1, 9, bytes(4))
    # Other failures come as error chunks too.
    await client.send(_raw.request(_raw.CMD_WRITE, SIZE, 1, handle=10) + b"!")
    [chunk] = await client.chunks()
    assert (chunk.type, struct.unpack(">I", chunk.payload[:4])[0]) == (
        _raw.REPLY_TYPE_ERROR,
        _raw.ENOSPC,
    )
    await client.disconnect()


async def test_oversized_write_is_drained_and_refused(
    client: _raw.RawClient, disk: RecordingBackend
) -> None:
    length = MiB + 1  # max_payload is 1 MiB here
    assert await client.write(0, b"\xee" * length) == _raw.EINVAL
    assert disk.writes == []
    # The stream is still in step: the next request is parsed correctly.
    assert await client.write(0, b"fine") == 0
    assert await client.read(0, 4) == b"fine"
    await client.disconnect()


async def test_requests_on_one_connection_reach_the_backend_in_order(
    client: _raw.RawClient, disk: RecordingBackend
) -> None:
    """Everything is pipelined in one send; calls and replies keep the sent order."""
    sent: list[Call] = []
    stream = b""
    for handle in range(200):
        offset = (handle * 7919) % (SIZE - 5000)
        if handle % 10 == 9:
            stream += _raw.request(_raw.CMD_FLUSH, handle=handle)
            sent.append(Call("flush"))
        elif handle % 10 == 5:
            stream += _raw.request(_raw.CMD_WRITE_ZEROES, offset, 100, handle=handle)
            sent.append(Call("write_zeroes", offset, 100, may_trim=True))
        else:
            data = os.urandom(1 + handle * 17 % 4000)
            stream += _raw.request(_raw.CMD_WRITE, offset, len(data), handle=handle) + data
            sent.append(Call("write", offset, len(data), data))
    await client.send(stream)
    handles = [(await client.simple_reply())[:2] for _ in range(200)]
    assert handles == [(0, handle) for handle in range(200)]
    assert disk.calls == sent
    await client.disconnect()


async def test_disconnect_mid_payload_reaches_nothing(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    assert await client.write(0, b"whole") == 0
    await client.send(_raw.request(_raw.CMD_WRITE, 4096, 65536) + b"\x99" * 30000)
    await client.close()
    await eventually(lambda: server.connection_count == 0, "connection closed")
    assert [(c.offset, c.data) for c in disk.writes] == [(0, b"whole")]
    assert disk.path.read_bytes()[4096:8192] == bytes(4096)
    assert disk.disconnects == 1


async def test_bad_request_magic_closes_the_connection(
    server: _nbd.NbdServer, client: _raw.RawClient, disk: RecordingBackend
) -> None:
    await client.send(b"\x12\x34\x56\x78" + _raw.request(_raw.CMD_FLUSH)[4:])
    assert await client.wait_closed_by_server() == b""
    await client.close()
    await eventually(lambda: disk.disconnects == 1, "backend told of the disconnect")
    assert disk.calls == []


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        pytest.param(_nbd.NbdError(_nbd.Errno.ENOSPC, "journal full"), _raw.ENOSPC, id="nbd"),
        pytest.param(OSError(errno.EDQUOT, "quota"), _raw.ENOSPC, id="edquot"),
        pytest.param(OSError(errno.EFBIG, "big"), _raw.ENOSPC, id="efbig"),
        pytest.param(OSError(errno.EROFS, "ro"), _raw.EPERM, id="erofs"),
        pytest.param(OSError(errno.EIO, "disk"), _raw.EIO, id="eio"),
        pytest.param(OSError(errno.ENOMEM, "mem"), _raw.EIO, id="enomem"),
        pytest.param(OSError("no errno"), _raw.EIO, id="no-errno"),
        pytest.param(RuntimeError("backend bug"), _raw.EIO, id="bug"),
    ],
)
async def test_backend_failures_map_to_nbd_errors(
    client: _raw.RawClient, disk: RecordingBackend, failure: Exception, expected: int
) -> None:
    for type_, payload in [(_raw.CMD_WRITE, b"w" * 8), (_raw.CMD_READ, b""), (_raw.CMD_FLUSH, b"")]:
        disk.fail_next = failure
        length = 8 if type_ != _raw.CMD_FLUSH else 0
        assert await client.command(type_, 0, length, payload=payload) == (expected, b"")
    assert await client.write(0, b"recovered") == 0
    await client.disconnect()


async def test_backend_short_read_is_eio(
    client: _raw.RawClient, disk: RecordingBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def short_read(offset: int, length: int) -> bytes:
        return b"x"

    monkeypatch.setattr(disk, "read", short_read)
    assert await client.command(_raw.CMD_READ, 0, 10) == (_raw.EIO, b"")
    await client.disconnect()


async def test_minimum_block_size_is_enforced(env: NbdEnv) -> None:
    disk = env.disk(SIZE)
    server = await env.serve({"vpg/vm/disk": disk}, min_block=512)
    client = await _raw.RawClient.connect(server.port)
    export = await client.open("vpg/vm/disk")
    assert export.block_sizes == (512, 4096, 32 * MiB)
    assert await client.write(1, b"x" * 511) == _raw.EINVAL
    assert await client.write(512, b"x" * 100) == _raw.EINVAL
    assert (await client.command(_raw.CMD_READ, 100, 512))[0] == _raw.EINVAL
    assert await client.write(512, b"y" * 1024) == 0
    assert disk.writes == [Call("write", 512, 1024, b"y" * 1024)]
    await client.disconnect()


def test_nbd_error_only_takes_protocol_values() -> None:
    assert _nbd.NbdError(28).errno is _nbd.Errno.ENOSPC
    with pytest.raises(ValueError, match="not an NBD error value"):
        _nbd.NbdError(errno.ENOENT)


async def test_replies_still_arrive_after_the_client_shuts_down_sending(
    client: _raw.RawClient, disk: RecordingBackend
) -> None:
    """EOF between requests (no NBD_CMD_DISC) closes gracefully: queued replies go out.

    Eight 1 MiB reads are more than the socket buffers hold, so at EOF most of
    the replies are still queued in the server.
    """
    assert await client.write(0, b"\x77" * MiB) == 0
    await client.send(b"".join(_raw.request(_raw.CMD_READ, 0, MiB, handle=i) for i in range(8)))
    client.writer.write_eof()
    for handle in range(8):
        assert await client.simple_reply(MiB) == (0, handle, b"\x77" * MiB)
    assert await client.wait_closed_by_server() == b""
    await client.close()
