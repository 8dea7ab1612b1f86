"""A minimal raw NBD client for protocol tests, written from the spec on its own.

The numbers here are typed in again from doc/proto.md rather than imported
from the server's ``_protocol`` module, so a wrong constant on the server side
fails a test instead of agreeing with itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import struct

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

C_FIXED_NEWSTYLE = 1
C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_SET_META_CONTEXT = 10

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_TOO_BIG = 2**31 + 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_FAST_ZERO = 1 << 4

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_ERROR = 2**15 + 1

EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def export_request(name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,)) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def request(
    type_: int, offset: int = 0, length: int = 0, *, flags: int = 0, handle: int = 1
) -> bytes:
    return struct.pack(">IHHQQI", REQUEST_MAGIC, flags, type_, handle, offset, length)


@dataclasses.dataclass
class Export:
    size: int
    flags: int
    infos: dict[int, bytes]

    @property
    def block_sizes(self) -> tuple[int, int, int]:
        minimum, preferred, maximum = struct.unpack(">III", self.infos[INFO_BLOCK_SIZE])
        return minimum, preferred, maximum


@dataclasses.dataclass
class Chunk:
    flags: int
    type: int
    handle: int
    payload: bytes


class ServerClosed(Exception):
    """The server hung up where a reply was expected."""


class RawClient:
    """One NBD connection driven by hand; every read has a deadline."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.handshake_flags = 0

    @classmethod
    async def connect(cls, port: int, *, greet: bool = True) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        if greet:
            client.handshake_flags = await client.read_greeting()
        return client

    async def read_greeting(self) -> int:
        magic, ihaveopt, flags = struct.unpack(">QQH", await self.recv(18))
        assert (magic, ihaveopt) == (NBDMAGIC, IHAVEOPT)
        return int(flags)

    async def recv(self, n: int, within: float = 10.0) -> bytes:
        try:
            async with asyncio.timeout(within):
                return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError as exc:
            raise ServerClosed(f"server closed after {len(exc.partial)} of {n} bytes") from None
        except ConnectionError as exc:
            raise ServerClosed(str(exc)) from None

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def wait_closed_by_server(self, within: float = 10.0) -> bytes:
        """Read until the server hangs up; return whatever it sent meanwhile."""
        received = b""
        async with asyncio.timeout(within):
            while True:
                try:
                    piece = await self.reader.read(65536)
                except ConnectionError:
                    return received
                if not piece:
                    return received
                received += piece

    async def client_flags(self, flags: int = C_FIXED_NEWSTYLE | C_NO_ZEROES) -> None:
        await self.send(struct.pack(">I", flags))

    async def option(self, opt: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option, return every reply up to the final one (ACK or an error)."""
        await self.send(option(opt, data))
        replies = []
        while True:
            magic, reply_opt, reply_type, length = struct.unpack(">QIII", await self.recv(20))
            assert magic == OPTION_REPLY_MAGIC
            assert reply_opt == opt
            replies.append((reply_type, await self.recv(length)))
            if reply_type not in (REP_SERVER, REP_INFO):
                return replies

    async def go(
        self, name: str, infos: tuple[int, ...] = (INFO_BLOCK_SIZE,), *, opt: int = OPT_GO
    ) -> Export:
        replies = await self.option(opt, export_request(name, infos))
        final, message = replies[-1]
        if final != REP_ACK:
            raise AssertionError(f"GO {name!r} refused: {final:#x} {message!r}")
        found = {struct.unpack(">H", data[:2])[0]: data[2:] for kind, data in replies[:-1]}
        size, flags = struct.unpack(">QH", found[INFO_EXPORT])
        return Export(size=size, flags=flags, infos=found)

    async def open(self, name: str, *, structured: bool = False) -> Export:
        """Handshake and enter transmission on ``name`` with NBD_OPT_GO."""
        await self.client_flags()
        if structured:
            assert (await self.option(OPT_STRUCTURED_REPLY))[-1][0] == REP_ACK
        return await self.go(name)

    async def starttls(self, context: ssl.SSLContext) -> None:
        replies = await self.option(OPT_STARTTLS)
        assert replies[-1][0] == REP_ACK, replies
        await self.writer.start_tls(context, server_hostname="127.0.0.1")

    async def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        """(error, handle, data) of a simple reply; data only for a successful READ."""
        magic, error, handle = struct.unpack(">IIQ", await self.recv(16))
        assert magic == SIMPLE_REPLY_MAGIC, hex(magic)
        data = await self.recv(data_length) if data_length and not error else b""
        return error, handle, data

    async def chunks(self) -> list[Chunk]:
        """Every chunk of one structured reply (a simple reply comes back as type -1)."""
        result = []
        while True:
            (magic,) = struct.unpack(">I", await self.recv(4))
            if magic == SIMPLE_REPLY_MAGIC:
                error, handle = struct.unpack(">IQ", await self.recv(12))
                return [Chunk(REPLY_FLAG_DONE, -1, handle, struct.pack(">I", error))]
            assert magic == STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, type_, handle, length = struct.unpack(">HHQI", await self.recv(16))
            result.append(Chunk(flags, type_, handle, await self.recv(length)))
            if flags & REPLY_FLAG_DONE:
                return result

    async def command(
        self,
        type_: int,
        offset: int = 0,
        length: int = 0,
        *,
        flags: int = 0,
        payload: bytes = b"",
        handle: int = 1,
    ) -> tuple[int, bytes]:
        """Send one request and wait for its simple reply: (error, data)."""
        await self.send(request(type_, offset, length, flags=flags, handle=handle) + payload)
        error, reply_handle, data = await self.simple_reply(length if type_ == CMD_READ else 0)
        assert reply_handle == handle
        return error, data

    async def write(self, offset: int, data: bytes, *, flags: int = 0) -> int:
        error, _ = await self.command(CMD_WRITE, offset, len(data), flags=flags, payload=data)
        return error

    async def read(self, offset: int, length: int) -> bytes:
        error, data = await self.command(CMD_READ, offset, length)
        assert error == 0, f"read failed with {error}"
        return data

    async def disconnect(self) -> None:
        """NBD_CMD_DISC, then wait for the server to close the socket."""
        await self.send(request(CMD_DISC))
        await self.wait_closed_by_server()
        await self.close()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.wait_closed()
