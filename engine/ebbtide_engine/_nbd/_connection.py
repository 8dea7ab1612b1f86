"""One client connection: the fixed-newstyle handshake, then the transmission loop.

Why this is separate from the listener (``_server``): everything here is
per-connection state (TLS on or off, structured replies negotiated, the
chosen export) and per-connection failure. Whatever a client sends, the
damage stays inside its own ``Connection``: protocol violations end that
connection, backend errors become NBD error replies, and nothing propagates
to the server or to other clients.

Requests are received ahead and executed in order: a reader task receives
each request whole (header, then payload into a pooled buffer of its own),
validates it and queues it; a worker task takes the queue in arrival order,
calls the backend for one request at a time and sends the reply. Receiving
request N+1 thus overlaps the backend call of request N, while the backend
still sees the calls one at a time, in the order sent, which the journal
behind it relies on (and why the server never advertises
NBD_FLAG_CAN_MULTI_CONN). A window of ``_MAX_IN_FLIGHT`` requests or
``_MAX_QUEUED_BYTES`` of payload bounds what is received but not answered;
past it the reader waits and the client is slowed through TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Mapping

from ebbtide_engine._nbd import _backend, _protocol, _stream
from ebbtide_engine._nbd._protocol import Command, CommandFlag, Errno, Option, Reply

logger = logging.getLogger(__name__)

#: How long a closing connection may take to say goodbye (TLS close_notify).
_CLOSE_TIMEOUT = 5.0

# Plain ints: ``~`` on an IntFlag only inverts within the known members.
_SUPPORTED_CLIENT_FLAGS = int(_protocol.ClientFlag.FIXED_NEWSTYLE | _protocol.ClientFlag.NO_ZEROES)
_WRITING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: Pipelining: requests received ahead of the one being executed, at most this
#: many (qemu-img keeps up to 16 in flight, nbdcopy 64) and this many payload bytes.
_MAX_IN_FLIGHT = 16
_MAX_QUEUED_BYTES = 32 * 1024 * 1024
#: WRITE payloads above this are received into a pooled buffer; smaller ones
#: are copied out of the receive buffer.
_POOLED = 64 * 1024
_NO_PAYLOAD = memoryview(b"")


@dataclasses.dataclass(frozen=True, slots=True)
class Settings:
    """Server-wide settings every connection reads (validated by ``NbdServer``)."""

    tls: ssl.SSLContext | None
    tls_required: bool
    min_block: int
    preferred_block: int
    max_payload: int
    handshake_timeout: float


@dataclasses.dataclass(frozen=True, slots=True)
class _Selected:
    """The export a client chose, as advertised to it (size and flags do not change)."""

    name: str
    backend: _backend.ExportBackend
    size: int
    read_only: bool


class _Abort(Exception):
    """The client ended option haggling with NBD_OPT_ABORT."""


class Connection:
    """Serve one accepted client socket until it disconnects or is stopped."""

    def __init__(
        self,
        channel: _stream.Channel,
        *,
        exports: Mapping[str, _backend.ExportBackend],
        settings: Settings,
    ) -> None:
        self._channel = channel
        self._exports = exports
        self._settings = settings
        self.peer = channel.peer
        self._bound: _Selected | None = None
        self._tls_active = False
        self._structured = False
        self._no_zeroes = False
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_backend = False
        self._finishing = False
        #: Transmission requests received so far (the worker may not have run them yet).
        self.received = 0
        # The transmission phase's two tasks (see _transmission).
        self._reader: asyncio.Task[None] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def export_name(self) -> str | None:
        """The export this connection uses, once the client has picked one."""
        return self._bound.name if self._bound is not None else None

    # --- lifecycle -------------------------------------------------------------

    async def run(self) -> None:
        """Handshake, then serve requests; returns when the connection is over."""
        self._task = asyncio.current_task()
        clean = False
        try:
            if self._stopping:  # stopped before this task got to run
                return
            selected = await self._handshake_in_time()
            logger.debug("NBD %s: serving export %r", self.peer, selected.name)
            clean = await self._transmission(selected)
            if not clean:
                logger.debug("NBD %s: connection stopped by the server", self.peer)
        except _Abort:
            logger.debug("NBD %s: client aborted the handshake", self.peer)
            clean = True
        except _protocol.ProtocolError as exc:
            logger.info("NBD %s: protocol error, closing: %s", self.peer, exc)
        except ssl.SSLError as exc:
            logger.info("NBD %s: TLS failure, closing: %s", self.peer, exc)
        except (asyncio.IncompleteReadError, OSError) as exc:
            logger.debug("NBD %s: client went away: %r", self.peer, exc)
        except asyncio.CancelledError:
            logger.debug("NBD %s: connection stopped by the server", self.peer)
            raise
        except Exception:
            logger.exception("NBD %s: unexpected failure, closing the connection", self.peer)
        finally:
            self._finishing = True
            try:
                await self._close(clean=clean)
            finally:
                # Bound as soon as NBD_OPT_GO / NBD_OPT_EXPORT_NAME picked the export,
                # even if the reply never reached the client.
                if self._bound is not None:
                    await self._notify_disconnected(self._bound.backend)

    def stop(self) -> None:
        """End the connection soon, but never in the middle of a backend call."""
        self._stopping = True
        if self._finishing:
            return
        if self._reader is not None and self._worker is not None:
            # Transmission: stop reading now; the worker ends after the call in
            # progress (it checks _stopping before taking the next request).
            self._reader.cancel()
            if not self._in_backend:
                self._worker.cancel()
        elif self._task is not None and not self._in_backend:
            self._task.cancel()

    async def _handshake_in_time(self) -> _Selected:
        """The handshake, bounded so that half-open clients cannot pile up."""
        deadline = asyncio.timeout(self._settings.handshake_timeout)
        try:
            async with deadline:
                return await self._handshake()
        except TimeoutError:
            if deadline.expired():
                raise _protocol.ProtocolError(
                    f"handshake not finished within {self._settings.handshake_timeout} s"
                ) from None
            raise

    async def _close(self, *, clean: bool) -> None:
        if clean:
            await self._channel.close(within=_CLOSE_TIMEOUT)
        else:
            self._channel.abort()

    async def _notify_disconnected(self, backend: _backend.ExportBackend) -> None:
        self._in_backend = True
        try:
            await backend.disconnected()
        except Exception:
            logger.exception("NBD %s: backend.disconnected() failed", self.peer)
        finally:
            self._in_backend = False

    # --- handshake ---------------------------------------------------------------

    async def _handshake(self) -> _Selected:
        flags = _protocol.HandshakeFlag.FIXED_NEWSTYLE | _protocol.HandshakeFlag.NO_ZEROES
        self._channel.write(_protocol.greeting(flags))
        await self._channel.drain()
        (client_flags,) = _protocol.CLIENT_FLAGS.unpack(await self._channel.read_exactly(4))
        if client_flags & ~_SUPPORTED_CLIENT_FLAGS:
            raise _protocol.ProtocolError(f"unknown client flags 0x{client_flags:08x}")
        if not client_flags & _protocol.ClientFlag.FIXED_NEWSTYLE:
            raise _protocol.ProtocolError("client does not speak fixed newstyle negotiation")
        self._no_zeroes = bool(client_flags & _protocol.ClientFlag.NO_ZEROES)
        while True:
            header = await self._channel.read_exactly(_protocol.OPTION_HEADER.size)
            magic, option, length = _protocol.OPTION_HEADER.unpack(header)
            if magic != _protocol.IHAVEOPT:
                raise _protocol.ProtocolError(f"bad option magic 0x{magic:016x}")
            if length > _protocol.MAX_OPTION_LENGTH:
                if option == Option.EXPORT_NAME:
                    raise _protocol.ProtocolError(f"NBD_OPT_EXPORT_NAME of {length} bytes")
                await self._discard(length)
                await self._option_reply(option, Reply.ERR_TOO_BIG, "option data too large")
                continue
            data = await self._channel.read_exactly(length)
            selected = await self._option(option, data)
            if selected is not None:
                return selected

    async def _option(self, option: int, data: bytes) -> _Selected | None:
        """Answer one option; returns the export once transmission is to begin."""
        if (
            self._settings.tls_required
            and not self._tls_active
            and option not in (Option.STARTTLS, Option.ABORT)
        ):
            if option == Option.EXPORT_NAME:
                raise _protocol.ProtocolError("NBD_OPT_EXPORT_NAME before the required TLS")
            await self._option_reply(option, Reply.ERR_TLS_REQD, "TLS is required (STARTTLS)")
            return None
        try:
            if option == Option.EXPORT_NAME:
                return await self._opt_export_name(data)
            if option == Option.ABORT:
                await self._opt_abort()
            elif option == Option.LIST:
                await self._opt_list(data)
            elif option == Option.STARTTLS:
                await self._opt_starttls(data)
            elif option in (Option.INFO, Option.GO):
                return await self._opt_info_or_go(option, data)
            elif option == Option.STRUCTURED_REPLY:
                if data:
                    raise _protocol.OptionError(Reply.ERR_INVALID, "option takes no data")
                self._structured = True
                await self._option_reply(option, Reply.ACK)
            else:
                await self._option_reply(
                    option, Reply.ERR_UNSUP, f"option {_option_name(option)} is not supported"
                )
        except _protocol.OptionError as exc:
            await self._option_reply(option, exc.reply, exc.message)
        return None

    async def _opt_export_name(self, data: bytes) -> _Selected:
        try:
            name = _protocol.decode_string(data, "export name")
        except _protocol.OptionError as exc:
            raise _protocol.ProtocolError(exc.message) from None
        selected = self._select(name)
        if selected is None:
            # NBD_OPT_EXPORT_NAME cannot carry an error: the spec says hang up.
            raise _protocol.ProtocolError(f"unknown export {name!r} (NBD_OPT_EXPORT_NAME)")
        flags = self._transmission_flags(selected)
        self._channel.write(
            _protocol.export_name_reply(selected.size, flags, no_zeroes=self._no_zeroes)
        )
        await self._channel.drain()
        return selected

    async def _opt_abort(self) -> None:
        # The client may already have hung up; the reply is a courtesy.
        with contextlib.suppress(ConnectionError):
            await self._option_reply(Option.ABORT, Reply.ACK)
        raise _Abort

    async def _opt_list(self, data: bytes) -> None:
        if data:
            raise _protocol.OptionError(Reply.ERR_INVALID, "NBD_OPT_LIST takes no data")
        for name in sorted(self._exports):
            self._channel.write(
                _protocol.option_reply(Option.LIST, Reply.SERVER, _protocol.rep_server(name))
            )
        await self._option_reply(Option.LIST, Reply.ACK)

    async def _opt_starttls(self, data: bytes) -> None:
        context = self._settings.tls
        if context is None:
            raise _protocol.OptionError(Reply.ERR_POLICY, "TLS is not configured on this server")
        if self._tls_active:
            raise _protocol.OptionError(Reply.ERR_INVALID, "TLS is already active")
        if data:
            raise _protocol.OptionError(Reply.ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
        # Anything already buffered arrived in plaintext before our ACK: a correct
        # client waits for the ACK, so this is an injection attempt. Hang up.
        if self._channel.pending():
            raise _protocol.ProtocolError("client sent data before the TLS handshake")
        self._channel.write(_protocol.option_reply(Option.STARTTLS, Reply.ACK))
        # start_tls() pauses reading before it yields, so nothing sneaks in between.
        await self._channel.start_tls(context)
        self._tls_active = True
        # The spec: no negotiation state survives STARTTLS.
        self._structured = False

    async def _opt_info_or_go(self, option: int, data: bytes) -> _Selected | None:
        request = _protocol.parse_export_request(data)
        selected = self._select(request.name, bind=option == Option.GO)
        if selected is None:
            raise _protocol.OptionError(Reply.ERR_UNKNOWN, f"no export named {request.name!r}")
        flags = self._transmission_flags(selected)
        settings = self._settings
        infos = [
            _protocol.info_export(selected.size, flags),
            # Always sent, asked for or not: the limits are enforced either way.
            _protocol.info_block_size(
                settings.min_block, settings.preferred_block, settings.max_payload
            ),
        ]
        if _protocol.Info.NAME in request.infos:
            infos.append(_protocol.info_string(_protocol.Info.NAME, selected.name))
        if _protocol.Info.DESCRIPTION in request.infos:
            infos.append(_protocol.info_string(_protocol.Info.DESCRIPTION, _describe(selected)))
        for info in infos:
            self._channel.write(_protocol.option_reply(option, Reply.INFO, info))
        await self._option_reply(option, Reply.ACK)
        return selected if option == Option.GO else None

    def _select(self, name: str, *, bind: bool = True) -> _Selected | None:
        backend = self._exports.get(name)
        if backend is None:
            return None
        selected = _Selected(name, backend, backend.size, backend.read_only)
        if bind:
            # Set before any await, so remove_export() sees this connection.
            self._bound = selected
        return selected

    def _transmission_flags(self, selected: _Selected) -> _protocol.TransmissionFlag:
        flag = _protocol.TransmissionFlag
        flags = flag.HAS_FLAGS | flag.SEND_FLUSH | flag.SEND_FUA
        if selected.read_only:
            flags |= flag.READ_ONLY
        else:
            flags |= flag.SEND_TRIM | flag.SEND_WRITE_ZEROES
        if self._structured:
            # Every read is answered with one data chunk, so DF costs nothing.
            flags |= flag.SEND_DF
        return flags

    async def _option_reply(self, option: int, reply: Reply, message: str = "") -> None:
        self._channel.write(_protocol.option_reply(option, reply, message.encode("utf-8")))
        await self._channel.drain()

    async def _discard(self, length: int) -> None:
        await self._channel.discard(length)

    # --- transmission ------------------------------------------------------------------

    async def _transmission(self, selected: _Selected) -> bool:
        """Serve requests: a reader task receives, a worker task executes, in order.

        Returns when the client is done (NBD_CMD_DISC or end of stream between
        requests: True) or when ``stop()`` ended it (False); raises what ended
        it otherwise.
        """
        queue: asyncio.Queue[_Pending | None] = asyncio.Queue()
        window = _Window(_MAX_IN_FLIGHT, _MAX_QUEUED_BYTES)
        buffers = _Buffers(_MAX_IN_FLIGHT, _MAX_QUEUED_BYTES)
        reader = asyncio.create_task(self._receive(selected, queue, window, buffers))
        worker = asyncio.create_task(self._work(selected, queue, window, buffers))
        self._reader, self._worker = reader, worker
        try:
            await asyncio.wait((reader, worker), return_when=asyncio.FIRST_COMPLETED)
            if not reader.done():
                # The worker ended first: the connection broke under a reply, a bug,
                # or stop(). Nothing more is read.
                reader.cancel()
                await asyncio.wait((reader,))
            # Whatever the reader queued was received whole: the worker serves it
            # (unless stopping), then ends at the marker.
            queue.put_nowait(None)
            await asyncio.wait((worker,))
        except asyncio.CancelledError:
            # Forced by the server after its stop timeout: give up on the backend call.
            reader.cancel()
            worker.cancel()
            await asyncio.wait((reader, worker))
            raise
        finally:
            self._reader = self._worker = None
        # The worker's failure first: it may be why the reader was cancelled.
        for task in (worker, reader):
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc
        return not self._stopping

    async def _receive(
        self,
        selected: _Selected,
        queue: asyncio.Queue[_Pending | None],
        window: _Window,
        buffers: _Buffers,
    ) -> None:
        """Read requests (header and whole payload) and queue them for the worker."""
        max_payload = self._settings.max_payload
        while True:
            try:
                header = await self._channel.read_exactly(_protocol.REQUEST.size)
            except asyncio.IncompleteReadError as exc:
                if exc.partial:
                    raise
                # End of stream between requests: close gracefully, so replies
                # still queued reach a client that only shut down its sending side.
                logger.debug("NBD %s: client closed without NBD_CMD_DISC", self.peer)
                return
            request = _protocol.parse_request(header)
            if request.type == Command.DISC:
                logger.debug("NBD %s: client disconnected (NBD_CMD_DISC)", self.peer)
                return
            payload = _NO_PAYLOAD
            buffer: bytearray | None = None
            problem: tuple[Errno, str] | None = None
            writing = request.type == Command.WRITE
            if writing and request.length > max_payload:
                # Read and drop the payload in pieces: the stream stays in step and
                # the client gets a clean EINVAL instead of a hang-up.
                await self._discard(request.length)
                problem = (
                    Errno.EINVAL,
                    f"write of {request.length} bytes exceeds the maximum {max_payload}",
                )
                writing = False
            nbytes = request.length if writing else 0
            # Backpressure: wait for room before receiving the payload, so at most
            # the window's worth of requests is held here.
            await window.enter(nbytes)
            if nbytes > _POOLED:
                buffer = buffers.take(nbytes)
                payload = memoryview(buffer)[:nbytes]
                await self._channel.read_into(payload)
            elif nbytes:
                payload = memoryview(await self._channel.read_exactly(nbytes))
            if problem is None:
                problem = self._validate(selected, request)
            queue.put_nowait(_Pending(request, payload, buffer, nbytes, problem))
            self.received += 1

    async def _work(
        self,
        selected: _Selected,
        queue: asyncio.Queue[_Pending | None],
        window: _Window,
        buffers: _Buffers,
    ) -> None:
        """Execute queued requests strictly in arrival order, one at a time, and reply."""
        while True:
            pending = await queue.get()
            if pending is None or self._stopping:
                return
            try:
                if pending.problem is not None:
                    self._reply_error(pending.request, *pending.problem)
                else:
                    await self._execute(selected, pending.request, pending.payload)
            finally:
                if pending.buffer is not None:
                    buffers.give(pending.buffer)
                window.leave(pending.nbytes)
            await self._channel.drain()

    def _validate(
        self, selected: _Selected, request: _protocol.Request
    ) -> tuple[Errno, str] | None:
        """Why this request must be refused, or None if the backend may see it."""
        settings = self._settings
        try:
            command = Command(request.type)
        except ValueError:
            return Errno.EINVAL, f"unknown command {request.type}"
        known = _ALLOWED_FLAGS.get(command)
        if known is None:
            return Errno.EINVAL, f"command {command.name} is not supported"
        allowed = int(known)  # plain int: ~ on an IntFlag keeps unknown bits clear
        if command == Command.READ and self._structured:
            allowed |= CommandFlag.DF
        if request.flags & ~allowed:
            return Errno.EINVAL, f"flags 0x{request.flags:04x} not valid for {command.name}"
        if command in _WRITING_COMMANDS and selected.read_only:
            return Errno.EPERM, f"export {selected.name!r} is read-only"
        if command == Command.FLUSH:
            if request.offset or request.length:
                return Errno.EINVAL, "FLUSH needs offset and length 0"
            return None
        if command == Command.READ and request.length > settings.max_payload:
            return (
                Errno.EINVAL,
                f"read of {request.length} bytes exceeds the maximum {settings.max_payload}",
            )
        if request.offset + request.length > selected.size:
            writes = command in (Command.WRITE, Command.WRITE_ZEROES)
            error = Errno.ENOSPC if writes else Errno.EINVAL
            return error, (
                f"range {request.offset}+{request.length} is beyond the export size {selected.size}"
            )
        if request.offset % settings.min_block or request.length % settings.min_block:
            return Errno.EINVAL, f"range not aligned to the minimum block {settings.min_block}"
        return None

    async def _execute(
        self, selected: _Selected, request: _protocol.Request, payload: memoryview
    ) -> None:
        backend = selected.backend
        fua = bool(request.flags & CommandFlag.FUA)
        offset, length = request.offset, request.length
        if request.type == Command.READ:
            data = b""
            if length:
                problem, data = await self._call_read(backend, offset, length)
                if problem is not None:
                    self._reply_error(request, *problem)
                    return
            self._reply_data(request, data)
            return
        call: Awaitable[None] | None = None
        if request.type == Command.WRITE:
            call = backend.write(offset, payload, fua=fua) if length else None
        elif request.type == Command.FLUSH:
            call = backend.flush()
        elif request.type == Command.TRIM:
            call = backend.trim(offset, length, fua=fua) if length else None
        elif request.type == Command.WRITE_ZEROES:
            may_trim = not request.flags & CommandFlag.NO_HOLE
            call = (
                backend.write_zeroes(offset, length, fua=fua, may_trim=may_trim) if length else None
            )
        problem = await self._call(call) if call is not None else None
        if problem is not None:
            self._reply_error(request, *problem)
        else:
            self._channel.write(_protocol.simple_reply(request.handle))

    async def _call(self, call: Awaitable[None]) -> tuple[Errno, str] | None:
        """Await one backend call, turning its failure into an NBD error."""
        self._in_backend = True
        try:
            await call
        except Exception as exc:
            return self._backend_failure(exc)
        finally:
            self._in_backend = False
        return None

    async def _call_read(
        self, backend: _backend.ExportBackend, offset: int, length: int
    ) -> tuple[tuple[Errno, str] | None, bytes]:
        self._in_backend = True
        try:
            data = await backend.read(offset, length)
        except Exception as exc:
            return self._backend_failure(exc), b""
        finally:
            self._in_backend = False
        if len(data) != length:
            logger.error(
                "NBD %s: backend returned %d bytes for a read of %d at %d",
                self.peer,
                len(data),
                length,
                offset,
            )
            return (Errno.EIO, "backend returned a short read"), b""
        return None, data

    def _backend_failure(self, exc: Exception) -> tuple[Errno, str]:
        if isinstance(exc, _backend.NbdError):
            logger.debug("NBD %s: backend refused: %s", self.peer, exc)
            return exc.errno, exc.message
        if isinstance(exc, OSError):
            error = _protocol.nbd_errno_for_os_error(exc)
            logger.info("NBD %s: backend I/O error (%s): %s", self.peer, error.name, exc)
            return error, f"{error.name}: {exc.strerror or exc}"
        logger.error("NBD %s: backend raised unexpectedly", self.peer, exc_info=exc)
        return Errno.EIO, "internal error in the export backend"

    def _reply_data(self, request: _protocol.Request, data: bytes) -> None:
        if not self._structured:
            self._channel.write(_protocol.simple_reply(request.handle))
        elif data:
            self._channel.write(
                _protocol.offset_data_prefix(request.handle, request.offset, len(data), done=True)
            )
        else:
            self._channel.write(_protocol.none_chunk(request.handle))
        if data:
            self._channel.write(data)

    def _reply_error(self, request: _protocol.Request, error: Errno, message: str) -> None:
        logger.debug(
            "NBD %s: request type %d at %d+%d failed: %s (%s)",
            self.peer,
            request.type,
            request.offset,
            request.length,
            error.name,
            message,
        )
        if self._structured:
            self._channel.write(_protocol.error_chunk(request.handle, error, message))
        else:
            self._channel.write(_protocol.simple_reply(request.handle, error))


@dataclasses.dataclass(frozen=True, slots=True)
class _Pending:
    """A request received whole, waiting for the worker."""

    request: _protocol.Request
    payload: memoryview  # a WRITE's data (empty otherwise)
    buffer: bytearray | None  # the pooled buffer behind ``payload``, if any
    nbytes: int  # what it holds of the window's byte budget
    problem: tuple[Errno, str] | None  # why it is refused, found while receiving


class _Window:
    """Bounds what is received but not answered yet: requests and WRITE payload bytes.

    One request is always let in, however large (up to the advertised maximum
    payload), so a client is never stuck; only the reader task waits here.
    """

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self._max_requests = max_requests
        self._max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._waiter: asyncio.Future[None] | None = None

    async def enter(self, nbytes: int) -> None:
        while self.requests >= self._max_requests or (
            self.requests and self.bytes + nbytes > self._max_bytes
        ):
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self.requests += 1
        self.bytes += nbytes

    def leave(self, nbytes: int) -> None:
        self.requests -= 1
        self.bytes -= nbytes
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class _Buffers:
    """Reusable payload buffers: a fresh multi-MiB bytearray per request costs page faults.

    At most ``keep`` buffers and ``keep_bytes`` are kept while unused, so a
    connection holds at most that plus what the window lets in.
    """

    def __init__(self, keep: int, keep_bytes: int) -> None:
        self._keep = keep
        self._keep_bytes = keep_bytes
        self._free: list[bytearray] = []
        self._free_bytes = 0

    def take(self, length: int) -> bytearray:
        for i, buffer in enumerate(self._free):
            if len(buffer) >= length:
                self._free_bytes -= len(buffer)
                return self._free.pop(i)
        return bytearray(length)

    def give(self, buffer: bytearray) -> None:
        # Keep the larger ones: they serve any request, and the small drop out.
        self._free.append(buffer)
        self._free_bytes += len(buffer)
        self._free.sort(key=len, reverse=True)
        while len(self._free) > self._keep or self._free_bytes > self._keep_bytes:
            self._free_bytes -= len(self._free.pop())
        self._free.reverse()  # smallest first: take() picks the smallest that fits


#: Flags each supported command accepts. FUA is accepted on every command, as the
#: spec requires once NBD_FLAG_SEND_FUA is advertised; DF is added for READ when
#: structured replies are on.
_ALLOWED_FLAGS: dict[Command, CommandFlag] = {
    Command.READ: CommandFlag.FUA,
    Command.WRITE: CommandFlag.FUA,
    Command.FLUSH: CommandFlag.FUA,
    Command.TRIM: CommandFlag.FUA,
    Command.WRITE_ZEROES: CommandFlag.FUA | CommandFlag.NO_HOLE,
}


def _describe(selected: _Selected) -> str:
    parts = selected.name.split("/")
    mode = "read-only" if selected.read_only else "read-write"
    if len(parts) == 3:
        vpg, vm, disk = parts
        return f"Ebbtide disk {disk!r} of VM {vm!r} in VPG {vpg!r} ({mode})"
    return f"Ebbtide export {selected.name!r} ({mode})"


def _option_name(option: int) -> str:
    try:
        return f"NBD_OPT_{Option(option).name}"
    except ValueError:
        return str(option)
