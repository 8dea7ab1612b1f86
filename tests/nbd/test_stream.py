"""Channel's write side: small writes gathered per turn of the loop, order kept."""

from __future__ import annotations

import asyncio

from ebbtide_engine._nbd import _stream


class RecordingTransport(asyncio.Transport):
    """Records each ``write`` call as one send."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.sends: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.sends.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True
        asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _channel() -> tuple[_stream.Channel, RecordingTransport]:
    channel = _stream.Channel(lambda _: None)
    transport = RecordingTransport(channel)
    channel.connection_made(transport)
    return channel, transport


async def test_small_writes_of_one_turn_go_out_as_one_send() -> None:
    channel, transport = await _channel()
    for i in range(5):
        channel.write(bytes([i]) * 16)  # five reply headers
    assert transport.sends == []  # not yet: the loop has not turned
    await asyncio.sleep(0)
    assert transport.sends == [b"".join(bytes([i]) * 16 for i in range(5))]


async def test_a_large_write_sends_what_was_gathered_first() -> None:
    channel, transport = await _channel()
    channel.write(b"h" * 16)
    payload = b"d" * 4096
    channel.write(payload)  # a READ's data after its reply header
    channel.write(b"n" * 16)
    await asyncio.sleep(0)
    assert transport.sends == [b"h" * 16, payload, b"n" * 16]


async def test_close_sends_what_was_gathered() -> None:
    channel, transport = await _channel()
    channel.write(b"x" * 16)
    await channel.close(within=5)
    assert transport.sends == [b"x" * 16]
    assert transport.closed


async def test_writes_after_the_connection_is_gone_are_dropped() -> None:
    channel, transport = await _channel()
    channel.write(b"x" * 16)
    channel.connection_lost(None)
    await asyncio.sleep(0)
    assert transport.sends == []
