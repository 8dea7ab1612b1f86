"""The fixed-newstyle handshake and option haggling, byte by byte over a raw socket."""

from __future__ import annotations

import asyncio
import struct

import pytest

from . import _raw
from ._support import MiB, NbdEnv, eventually


@pytest.fixture
async def port(env: NbdEnv) -> int:
    server = await env.serve(
        {"vpg/vm/disk0": env.disk(MiB), "vpg/vm/disk1": env.disk(2 * MiB, read_only=True)}
    )
    return server.port


async def test_greeting_offers_fixed_newstyle_and_no_zeroes(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    assert client.handshake_flags == 0b11
    await client.close()


@pytest.mark.parametrize(("no_zeroes", "reply_length"), [(True, 10), (False, 134)])
async def test_export_name_reply_honours_no_zeroes(
    port: int, no_zeroes: bool, reply_length: int
) -> None:
    client = await _raw.RawClient.connect(port)
    flags = _raw.C_FIXED_NEWSTYLE | (_raw.C_NO_ZEROES if no_zeroes else 0)
    await client.client_flags(flags)
    await client.send(_raw.option(_raw.OPT_EXPORT_NAME, b"vpg/vm/disk1"))
    reply = await client.recv(reply_length)
    size, tflags = struct.unpack(">QH", reply[:10])
    assert size == 2 * MiB
    assert tflags & _raw.FLAG_READ_ONLY
    assert reply[10:] == bytes(reply_length - 10)
    # Transmission starts right after: a read works.
    assert await client.read(0, 512) == bytes(512)
    await client.disconnect()


@pytest.mark.parametrize(
    "client_flags",
    [
        pytest.param(0, id="plain-newstyle"),
        pytest.param(_raw.C_NO_ZEROES, id="no-zeroes-without-fixed"),
        pytest.param(_raw.C_FIXED_NEWSTYLE | 4, id="unknown-flag"),
        pytest.param(0xFFFFFFFF, id="all-flags"),
    ],
)
async def test_clients_without_fixed_newstyle_or_with_unknown_flags_are_dropped(
    port: int, client_flags: int
) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags(client_flags)
    assert await client.wait_closed_by_server() == b""
    await client.close()


async def test_go_sends_export_info_and_block_size_unasked(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    export = await client.go("vpg/vm/disk0", infos=())
    assert export.size == MiB
    expected = (
        _raw.FLAG_HAS_FLAGS
        | _raw.FLAG_SEND_FLUSH
        | _raw.FLAG_SEND_FUA
        | _raw.FLAG_SEND_TRIM
        | _raw.FLAG_SEND_WRITE_ZEROES
    )
    assert export.flags == expected
    assert not export.flags & _raw.FLAG_CAN_MULTI_CONN
    assert export.block_sizes == (1, 4096, 32 * MiB)
    assert await client.write(0, b"x" * 100) == 0
    await client.disconnect()


async def test_info_name_and_description_on_request(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    infos = (_raw.INFO_NAME, _raw.INFO_DESCRIPTION, _raw.INFO_BLOCK_SIZE, 999)
    export = await client.go("vpg/vm/disk1", infos, opt=_raw.OPT_INFO)
    assert export.infos[_raw.INFO_NAME] == b"vpg/vm/disk1"
    assert b"read-only" in export.infos[_raw.INFO_DESCRIPTION]
    assert export.flags & _raw.FLAG_READ_ONLY
    assert not export.flags & (_raw.FLAG_SEND_TRIM | _raw.FLAG_SEND_WRITE_ZEROES)
    # INFO does not enter transmission: haggling goes on, then GO.
    go = await client.go("vpg/vm/disk1", infos)
    assert (go.size, go.flags) == (export.size, export.flags)
    await client.disconnect()


async def test_structured_replies_add_df(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    assert await client.option(_raw.OPT_STRUCTURED_REPLY) == [(_raw.REP_ACK, b"")]
    export = await client.go("vpg/vm/disk0")
    assert export.flags & _raw.FLAG_SEND_DF
    await client.disconnect()


async def test_list_names_every_export(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    replies = await client.option(_raw.OPT_LIST)
    assert replies[-1] == (_raw.REP_ACK, b"")
    names = []
    for kind, data in replies[:-1]:
        assert kind == _raw.REP_SERVER
        (length,) = struct.unpack(">I", data[:4])
        names.append(data[4 : 4 + length].decode())
    assert names == ["vpg/vm/disk0", "vpg/vm/disk1"]
    await client.close()


@pytest.mark.parametrize(
    ("opt", "data", "expected"),
    [
        pytest.param(_raw.OPT_LIST, b"junk", _raw.REP_ERR_INVALID, id="list-with-data"),
        pytest.param(_raw.OPT_STRUCTURED_REPLY, b"x", _raw.REP_ERR_INVALID, id="sr-with-data"),
        pytest.param(_raw.OPT_STARTTLS, b"", _raw.REP_ERR_POLICY, id="starttls-without-tls"),
        pytest.param(4, b"", _raw.REP_ERR_UNSUP, id="peek-export"),
        pytest.param(_raw.OPT_SET_META_CONTEXT, b"\0" * 8, _raw.REP_ERR_UNSUP, id="meta"),
        pytest.param(0xDEADBEEF, b"whatever", _raw.REP_ERR_UNSUP, id="unknown"),
        pytest.param(
            _raw.OPT_GO, _raw.export_request("no/such/disk"), _raw.REP_ERR_UNKNOWN, id="unknown"
        ),
        pytest.param(_raw.OPT_INFO, b"\0\0", _raw.REP_ERR_INVALID, id="info-too-short"),
        pytest.param(_raw.OPT_GO, b"\0\0\0\x09abc\0\0", _raw.REP_ERR_INVALID, id="go-name-overrun"),
        pytest.param(
            _raw.OPT_GO, b"\0\0\0\x02\xff\xfe\0\0", _raw.REP_ERR_INVALID, id="go-bad-utf8"
        ),
        pytest.param(
            _raw.OPT_GO,
            _raw.export_request("vpg/vm/disk0") + b"\0",
            _raw.REP_ERR_INVALID,
            id="go-trailing",
        ),
    ],
)
async def test_bad_options_get_an_error_and_haggling_continues(
    port: int, opt: int, data: bytes, expected: int
) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    replies = await client.option(opt, data)
    assert [kind for kind, _ in replies] == [expected]
    assert replies[0][1], "error replies carry a message for humans"
    export = await client.go("vpg/vm/disk0")
    assert export.size == MiB
    await client.disconnect()


async def test_huge_option_length_is_discarded_not_buffered(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    length = 1 * MiB
    replies = await client.option(0x1234, b"\xaa" * length)
    assert [kind for kind, _ in replies] == [_raw.REP_ERR_TOO_BIG]
    assert (await client.go("vpg/vm/disk0")).size == MiB
    await client.disconnect()


async def test_export_name_of_unknown_export_closes(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    await client.send(_raw.option(_raw.OPT_EXPORT_NAME, b"vpg/vm/missing"))
    assert await client.wait_closed_by_server() == b""
    await client.close()


async def test_abort_is_acknowledged_then_closed(port: int) -> None:
    client = await _raw.RawClient.connect(port)
    await client.client_flags()
    assert await client.option(_raw.OPT_ABORT) == [(_raw.REP_ACK, b"")]
    assert await client.wait_closed_by_server() == b""
    await client.close()


@pytest.mark.parametrize(
    "junk",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"\0\0", id="half-flags"),
        pytest.param(struct.pack(">I", 3) + b"IHAVEOP", id="half-option"),
        pytest.param(struct.pack(">I", 3) + struct.pack(">QII", 0x1234, 7, 0), id="bad-magic"),
    ],
)
async def test_bad_or_truncated_handshakes_close_only_that_connection(
    env: NbdEnv, junk: bytes
) -> None:
    disk = env.disk(MiB)
    server = await env.serve({"vpg/vm/disk": disk}, handshake_timeout=5)
    good = await _raw.RawClient.connect(server.port)
    await good.open("vpg/vm/disk")
    bad = await _raw.RawClient.connect(server.port)
    await bad.send(junk)
    bad.writer.write_eof()
    await bad.wait_closed_by_server()
    await bad.close()
    assert await good.write(0, b"still here") == 0
    assert await good.read(0, 10) == b"still here"
    await good.disconnect()
    await eventually(lambda: server.connection_count == 0, "all connections closed")
    assert disk.disconnects == 1


async def test_handshake_timeout_drops_idle_clients(env: NbdEnv) -> None:
    server = await env.serve({"vpg/vm/disk": env.disk(MiB)}, handshake_timeout=0.2)
    idle = [await _raw.RawClient.connect(server.port, greet=False) for _ in range(5)]
    assert server.connection_count == 5
    for client in idle:
        # The greeting (18 bytes) arrives, then the server hangs up.
        assert len(await client.wait_closed_by_server(within=5)) == 18
        await client.close()
    await eventually(lambda: server.connection_count == 0, "idle connections dropped")
    # The timeout covers only the handshake: a served client may idle.
    client = await _raw.RawClient.connect(server.port)
    await client.open("vpg/vm/disk")
    # Proving that something does not happen takes time: idle past the timeout.
    await asyncio.sleep(0.4)
    assert await client.read(0, 4) == bytes(4)
    await client.disconnect()
