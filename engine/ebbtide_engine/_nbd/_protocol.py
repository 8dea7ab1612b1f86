"""NBD wire format: the constants, struct layouts and message builders the server speaks.

Why a module of its own: the server's state machine (``_connection``) should
read as protocol logic, not as byte shuffling, and every number that goes on
the wire should be written down once, next to the spec text it comes from.
The spec is the NBD protocol document, ``doc/proto.md`` in
github.com/NetworkBlockDevice/nbd; all integers are big-endian ("network
byte order").

Handshake (fixed newstyle only)::

    S: u64 NBDMAGIC  u64 IHAVEOPT  u16 handshake flags
    C: u32 client flags
    C: u64 IHAVEOPT  u32 option  u32 length  <length bytes>      (repeated)
    S: u64 REPLY_MAGIC  u32 option  u32 reply type  u32 length  <length bytes>

Transmission::

    C: u32 REQUEST_MAGIC  u16 flags  u16 type  u64 handle  u64 offset  u32 length
       [<length bytes> for WRITE]
    S: u32 SIMPLE_REPLY_MAGIC  u32 error  u64 handle  [<data> for a good READ]
    S: u32 STRUCTURED_REPLY_MAGIC  u16 flags  u16 type  u64 handle  u32 length  <payload>
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from typing import Final

# --- magic numbers -----------------------------------------------------------

NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC: Final = 0x0003E889045565A9
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

# --- sizes and limits ---------------------------------------------------------

#: The trailing reserved zeroes after an NBD_OPT_EXPORT_NAME reply.
EXPORT_NAME_PADDING: Final = 124
#: Strings (export names, messages) MUST be no longer than this (spec, "Conventions").
MAX_STRING: Final = 4096
#: Largest option payload the server reads into memory. NBD_OPT_GO carries a
#: name (<= 4096 bytes) and at most 65,535 two-byte info requests.
MAX_OPTION_LENGTH: Final = 4 + MAX_STRING + 2 + 2 * 0xFFFF
#: Lengths below 2**25 must never be treated as a denial of service (spec,
#: "Block size constraints"); it is also the interoperable READ/WRITE maximum.
INTEROPERABLE_MAX_PAYLOAD: Final = 2**25
#: The largest allowed minimum block size (spec, "Block size constraints").
MAX_MIN_BLOCK: Final = 2**16


class HandshakeFlag(enum.IntFlag):
    """Server handshake flags (16 bits, after NBDMAGIC IHAVEOPT)."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(enum.IntFlag):
    """Client flags (32 bits); any other bit set means the server must hang up."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class TransmissionFlag(enum.IntFlag):
    """Per-export transmission flags (16 bits)."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    """Option types the server knows by name (others are answered NBD_REP_ERR_UNSUP)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_REP_ERROR: Final = 1 << 31


class Reply(enum.IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _REP_ERROR + 1
    ERR_POLICY = _REP_ERROR + 2
    ERR_INVALID = _REP_ERROR + 3
    ERR_PLATFORM = _REP_ERROR + 4
    ERR_TLS_REQD = _REP_ERROR + 5
    ERR_UNKNOWN = _REP_ERROR + 6
    ERR_SHUTDOWN = _REP_ERROR + 7
    ERR_BLOCK_SIZE_REQD = _REP_ERROR + 8
    ERR_TOO_BIG = _REP_ERROR + 9


class Info(enum.IntEnum):
    """Information types in NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Command(enum.IntEnum):
    """Request types of the transmission phase."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(enum.IntFlag):
    """Request (command) flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


class ReplyFlag(enum.IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


class ChunkType(enum.IntEnum):
    """Structured reply chunk types; error chunks have bit 15 set."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Errno(enum.IntEnum):
    """The only error values NBD allows on the wire (spec, "Error values").

    They equal Linux errno numbers, but the protocol fixes them: a server on
    another platform must still send these.
    """

    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: Host errno -> NBD error value. EDQUOT and EFBIG map to ENOSPC as the spec asks;
#: ENOMEM maps to EIO because servers "SHOULD NOT return ENOMEM if at all possible".
_HOST_ERRNO_TO_NBD: Final[dict[int, Errno]] = {
    errno.EPERM: Errno.EPERM,
    errno.EACCES: Errno.EPERM,
    errno.EROFS: Errno.EPERM,
    errno.EINVAL: Errno.EINVAL,
    errno.ENOSPC: Errno.ENOSPC,
    errno.EDQUOT: Errno.ENOSPC,
    errno.EFBIG: Errno.ENOSPC,
    errno.EOVERFLOW: Errno.EOVERFLOW,
    errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno_for_os_error(exc: OSError) -> Errno:
    """The NBD error value to send for an OSError raised by a backend (EIO if unknown)."""
    if exc.errno is None:
        return Errno.EIO
    return _HOST_ERRNO_TO_NBD.get(exc.errno, Errno.EIO)


# --- struct layouts ------------------------------------------------------------

GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, handle, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, handle
CHUNK_HEADER: Final = struct.Struct(">IHHQI")  # magic, flags, type, handle, length

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_INFO_EXPORT: Final = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, flags
_INFO_BLOCK_SIZE: Final = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, min, preferred, max
_ERROR_CHUNK: Final = struct.Struct(">IH")  # error, message length


class ProtocolError(Exception):
    """The peer broke the protocol in a way that leaves no choice but to hang up."""


class OptionError(Exception):
    """An option request is malformed; answered with ``reply`` and haggling goes on."""

    def __init__(self, reply: Reply, message: str) -> None:
        super().__init__(message)
        self.reply = reply
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class Request:
    """One transmission-phase request header (the WRITE payload is read separately)."""

    flags: int
    type: int
    handle: int
    offset: int
    length: int


def parse_request(header: bytes) -> Request:
    """Decode a 28-byte request header; a wrong magic is a ProtocolError (hang up)."""
    magic, flags, type_, handle, offset, length = REQUEST.unpack(header)
    if magic != REQUEST_MAGIC:
        raise ProtocolError(f"bad request magic 0x{magic:08x}")
    return Request(flags=flags, type=type_, handle=handle, offset=offset, length=length)


@dataclasses.dataclass(frozen=True, slots=True)
class ExportRequest:
    """The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and info requests."""

    name: str
    infos: tuple[int, ...]


def decode_string(raw: bytes, what: str) -> str:
    """Decode a protocol string (UTF-8, no NUL, at most 4096 bytes) or raise OptionError."""
    if len(raw) > MAX_STRING:
        raise OptionError(Reply.ERR_INVALID, f"{what} is longer than {MAX_STRING} bytes")
    if b"\0" in raw:
        raise OptionError(Reply.ERR_INVALID, f"{what} contains a NUL byte")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise OptionError(Reply.ERR_INVALID, f"{what} is not valid UTF-8") from None


def parse_export_request(data: bytes) -> ExportRequest:
    """Decode NBD_OPT_INFO / NBD_OPT_GO data: u32 name length, name, u16 n, n x u16."""
    if len(data) < 6:
        raise OptionError(Reply.ERR_INVALID, "option data is shorter than 6 bytes")
    (name_length,) = _U32.unpack_from(data, 0)
    if name_length > len(data) - 6:
        raise OptionError(Reply.ERR_INVALID, "export name length overruns the option data")
    name = decode_string(data[4 : 4 + name_length], "export name")
    pos = 4 + name_length
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise OptionError(Reply.ERR_INVALID, "information request count does not match length")
    infos = struct.unpack_from(f">{count}H", data, pos)
    return ExportRequest(name=name, infos=tuple(infos))


# --- builders --------------------------------------------------------------------


def greeting(flags: HandshakeFlag) -> bytes:
    """The server's first message: NBDMAGIC, IHAVEOPT, handshake flags."""
    return GREETING.pack(NBDMAGIC, IHAVEOPT, flags)


def option_reply(option: int, reply: Reply, data: bytes = b"") -> bytes:
    """A fixed-newstyle option reply (header and data)."""
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def rep_server(name: str) -> bytes:
    """NBD_REP_SERVER data: u32 name length, name."""
    raw = name.encode("utf-8")
    return _U32.pack(len(raw)) + raw


def info_export(size: int, flags: TransmissionFlag) -> bytes:
    """NBD_REP_INFO data for NBD_INFO_EXPORT."""
    return _INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_string(info: Info, text: str) -> bytes:
    """NBD_REP_INFO data for NBD_INFO_NAME or NBD_INFO_DESCRIPTION."""
    return _U16.pack(info) + text.encode("utf-8")


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    """NBD_REP_INFO data for NBD_INFO_BLOCK_SIZE."""
    return _INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def export_name_reply(size: int, flags: TransmissionFlag, *, no_zeroes: bool) -> bytes:
    """The reply to NBD_OPT_EXPORT_NAME: size, flags and (unless NO_ZEROES) 124 zeroes."""
    reply = EXPORT_NAME_REPLY.pack(size, flags)
    return reply if no_zeroes else reply + bytes(EXPORT_NAME_PADDING)


def simple_reply(handle: int, error: int = 0) -> bytes:
    """A simple reply header (a successful READ's data follows it)."""
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, handle)


def chunk_header(handle: int, type_: ChunkType, length: int, *, done: bool) -> bytes:
    """A structured reply chunk header; ``length`` counts the payload that follows."""
    flags = ReplyFlag.DONE if done else ReplyFlag(0)
    return CHUNK_HEADER.pack(STRUCTURED_REPLY_MAGIC, flags, type_, handle, length)


def offset_data_prefix(handle: int, offset: int, data_length: int, *, done: bool) -> bytes:
    """Header and offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk; the data follows."""
    header = chunk_header(handle, ChunkType.OFFSET_DATA, 8 + data_length, done=done)
    return header + _U64.pack(offset)


def error_chunk(handle: int, error: int, message: str) -> bytes:
    """A final NBD_REPLY_TYPE_ERROR chunk with a human-readable message."""
    raw = message.encode("utf-8")[:MAX_STRING]
    payload = _ERROR_CHUNK.pack(error, len(raw)) + raw
    return chunk_header(handle, ChunkType.ERROR, len(payload), done=True) + payload


def none_chunk(handle: int) -> bytes:
    """A final, empty NBD_REPLY_TYPE_NONE chunk (success without data)."""
    return chunk_header(handle, ChunkType.NONE, 0, done=True)


def is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
