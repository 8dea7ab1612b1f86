"""Protocol robustness: hypothesis throws malformed and truncated streams at the server.

After every example the server must still serve a good client, the fuzzing
connection must be gone, and every write that reached the backend must be a
whole WRITE request that was actually sent, in the order sent: never a partial
payload, never bytes from a request that was cut off.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ebbtide_engine import _nbd

from . import _raw
from ._support import MiB, NbdEnv, RecordingBackend, eventually, run

SIZE = MiB
MAX_PAYLOAD = 64 * 1024
NAME = "vpg/vm/disk"

pytestmark = pytest.mark.slow

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Target:
    """One server shared by all examples of a test (it must survive them all)."""

    def __init__(self, server: _nbd.NbdServer, disk: RecordingBackend) -> None:
        self.server = server
        self.disk = disk


@pytest.fixture
async def target(env: NbdEnv) -> Target:
    disk = env.disk(SIZE)
    server = await env.serve({NAME: disk}, max_payload=MAX_PAYLOAD, handshake_timeout=5)
    return Target(server, disk)


def framed_writes(stream: bytes) -> list[tuple[int, bytes]]:
    """The complete WRITE requests in a transmission-phase stream, as the spec frames them."""
    writes = []
    pos = 0
    while len(stream) - pos >= 28:
        magic, _, type_, _, offset, length = struct.unpack_from(">IHHQQI", stream, pos)
        pos += 28
        if magic != _raw.REQUEST_MAGIC or type_ == _raw.CMD_DISC:
            break
        if type_ == _raw.CMD_WRITE:
            if len(stream) - pos < length:
                break
            writes.append((offset, stream[pos : pos + length]))
            pos += length
    return writes


def is_subsequence(part: list[tuple[int, bytes]], whole: list[tuple[int, bytes]]) -> bool:
    remaining = iter(whole)
    return all(item in remaining for item in part)


async def throw(target: Target, stream: bytes, *, half_close: bool) -> None:
    """Send ``stream`` on a fresh connection, then end it and wait until the server has too."""
    target.disk.calls.clear()
    client = await _raw.RawClient.connect(target.server.port, greet=False)
    try:
        client.writer.write(stream)
        await client.writer.drain()
        if half_close:
            client.writer.write_eof()
            await client.wait_closed_by_server()
    except ConnectionError:
        pass  # the server may hang up before everything was sent
    finally:
        client.writer.transport.abort()
    await eventually(lambda: target.server.connection_count == 0, "fuzz connection closed")


async def check_still_serving(target: Target) -> None:
    client = await _raw.RawClient.connect(target.server.port)
    await client.open(NAME)
    offset = int.from_bytes(os.urandom(2)) * 8
    data = os.urandom(16)
    assert await client.write(offset, data) == 0
    assert await client.read(offset, 16) == data
    await client.disconnect()


# --- strategies ------------------------------------------------------------------

HANDSHAKE = struct.pack(">I", _raw.C_FIXED_NEWSTYLE | _raw.C_NO_ZEROES)
GO = _raw.option(_raw.OPT_GO, _raw.export_request(NAME))

options = st.one_of(
    st.builds(_raw.option, st.integers(0, 2**32 - 1), st.binary(max_size=40)),
    st.builds(
        _raw.option, st.sampled_from([1, 2, 3, 5, 6, 7, 8, 9, 10, 11]), st.binary(max_size=40)
    ),
    st.just(_raw.option(_raw.OPT_LIST)),
    st.just(_raw.option(_raw.OPT_STRUCTURED_REPLY)),
    st.builds(
        lambda magic, opt, length: struct.pack(">QII", magic, opt, length),
        st.integers(0, 2**64 - 1),
        st.integers(0, 20),
        st.integers(0, 2**32 - 1),
    ),
    st.binary(min_size=1, max_size=30),
)

valid_writes = st.integers(1, 300).flatmap(
    lambda n: st.builds(
        lambda offset, data: _raw.request(_raw.CMD_WRITE, offset, n) + data,
        st.integers(0, SIZE - n),
        st.binary(min_size=n, max_size=n),
    )
)

random_requests = st.builds(
    lambda magic, flags, type_, offset, length: struct.pack(
        ">IHHQQI", magic, flags, type_, 7, offset, length
    ),
    st.one_of(st.just(_raw.REQUEST_MAGIC), st.integers(0, 2**32 - 1)),
    st.one_of(st.just(0), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, 9), st.integers(0, 0xFFFF)),
    st.one_of(st.integers(0, SIZE), st.integers(0, 2**64 - 1)),
    st.one_of(st.integers(0, 2 * MAX_PAYLOAD), st.integers(0, 2**32 - 1)),
)

transmission = st.lists(
    st.one_of(valid_writes, random_requests, st.binary(min_size=1, max_size=64)), max_size=8
)


@FUZZ
@given(
    prefix=st.lists(options, max_size=4),
    flags=st.one_of(st.just(HANDSHAKE), st.binary(min_size=4, max_size=4)),
    data=st.data(),
    half_close=st.booleans(),
)
async def test_fuzzed_handshakes(
    target: Target, prefix: list[bytes], flags: bytes, data: st.DataObject, half_close: bool
) -> None:
    stream = flags + b"".join(prefix) + GO
    stream = stream[: data.draw(st.integers(0, len(stream)), label="cut")]
    await throw(target, stream, half_close=half_close)
    assert target.disk.writes == []
    await check_still_serving(target)


@FUZZ
@given(
    requests=transmission,
    structured=st.booleans(),
    data=st.data(),
    half_close=st.booleans(),
)
async def test_fuzzed_requests_after_a_valid_handshake(
    target: Target, requests: list[bytes], structured: bool, data: st.DataObject, half_close: bool
) -> None:
    sr = _raw.option(_raw.OPT_STRUCTURED_REPLY) if structured else b""
    body = b"".join(requests)
    body = body[: data.draw(st.integers(0, len(body)), label="cut")]
    await throw(target, HANDSHAKE + sr + GO + body, half_close=half_close)
    recorded = [(call.offset, call.data or b"") for call in target.disk.writes]
    assert is_subsequence(recorded, framed_writes(body)), (recorded, body)
    await check_still_serving(target)


async def test_real_client_after_fuzzing(target: Target) -> None:
    """A short burst of garbage connections, then qemu-io must work normally."""
    for junk in (b"\0" * 100, os.urandom(500), HANDSHAKE + GO + os.urandom(1000)):
        await throw(target, junk, half_close=True)
    url = target.server.url(NAME)
    await run(
        "qemu-io", "-f", "raw", "-c", "write -P 0x3c 512 4k", "-c", "read -P 0x3c 512 4k", url
    )
    assert target.disk.path.read_bytes()[512 : 512 + 4096] == b"\x3c" * 4096
