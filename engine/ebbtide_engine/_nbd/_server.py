"""The replication endpoint's NBD listener: exports by name, connections, shutdown.

Ebbtide receives every write of a protected disk over NBD, one export per
disk, named ``<vpg>/<vm>/<disk>``. This module owns the listening socket, the
table of exports (which changes while the server runs, as VPGs come and go)
and the set of live connections, so that removing an export or closing the
server can wait until no backend call is in progress. The protocol itself
lives in ``_connection`` and ``_protocol``; docs/nbd.md says what is
advertised and why.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import types
import urllib.parse
from collections.abc import Iterable, Mapping

from ebbtide_engine._nbd import _backend, _connection, _protocol, _stream

logger = logging.getLogger(__name__)

MiB = 1024 * 1024


def validate_export_name(name: str) -> None:
    """Raise ValueError unless ``name`` is a valid Ebbtide export name ``<vpg>/<vm>/<disk>``."""
    raw = name.encode("utf-8", errors="replace")
    if len(raw) > _protocol.MAX_STRING or "\0" in name:
        raise ValueError(
            f"export name {name!r} is not a valid NBD string "
            f"(at most {_protocol.MAX_STRING} UTF-8 bytes, no NUL)"
        )
    parts = name.split("/")
    if len(parts) != 3 or not all(part and part.strip() == part for part in parts):
        raise ValueError(
            f"export name {name!r} must be '<vpg>/<vm>/<disk>': three non-empty parts "
            "separated by '/', without surrounding spaces"
        )


class NbdServer:
    """An asyncio NBD server (fixed newstyle) serving named exports to many clients.

    ``exports`` is copied; change the set later with ``add_export`` and
    ``remove_export``. ``tls`` enables NBD_OPT_STARTTLS; with ``tls_required``
    every option other than STARTTLS and ABORT is refused until TLS is up
    (FORCEDTLS in the spec). ``min_block``, ``preferred_block`` and
    ``max_payload`` are advertised in NBD_INFO_BLOCK_SIZE and enforced.
    ``handshake_timeout`` bounds the time from accept to transmission phase;
    ``stop_timeout`` bounds how long ``close``/``remove_export`` wait for a
    backend call in progress before cancelling it.
    """

    def __init__(
        self,
        exports: Mapping[str, _backend.ExportBackend],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
        tls_required: bool = False,
        min_block: int = 1,
        preferred_block: int = 4096,
        max_payload: int = 32 * MiB,
        handshake_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        _check_block_sizes(min_block, preferred_block, max_payload)
        if tls_required and tls is None:
            raise ValueError("tls_required=True needs a TLS context (tls=ssl.SSLContext)")
        if handshake_timeout <= 0 or stop_timeout <= 0:
            raise ValueError("handshake_timeout and stop_timeout must be positive")
        self._settings = _connection.Settings(
            tls=tls,
            tls_required=tls_required,
            min_block=min_block,
            preferred_block=preferred_block,
            max_payload=max_payload,
            handshake_timeout=handshake_timeout,
        )
        self._host = host
        self._requested_port = port
        self._stop_timeout = stop_timeout
        self._exports: dict[str, _backend.ExportBackend] = {}
        for name, backend in exports.items():
            self.add_export(name, backend)
        self._server: asyncio.Server | None = None
        self._connections: dict[_connection.Connection, asyncio.Task[None]] = {}
        self._closing = False

    async def __aenter__(self) -> NbdServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- exports ------------------------------------------------------------------

    @property
    def exports(self) -> Mapping[str, _backend.ExportBackend]:
        """The exports served now (a read-only view)."""
        return types.MappingProxyType(self._exports)

    def add_export(self, name: str, backend: _backend.ExportBackend) -> None:
        """Serve ``backend`` as ``name`` from now on (new connections see it at once)."""
        validate_export_name(name)
        if name in self._exports:
            raise ValueError(f"export {name!r} is already served; remove_export() it first")
        self._exports[name] = backend

    async def remove_export(self, name: str) -> _backend.ExportBackend:
        """Stop serving ``name``: refuse new clients, end its connections, return its backend.

        Connections using the export are ended between requests; when this
        returns, no call into the backend is in progress and none will follow
        (each of those connections has called ``backend.disconnected()``).
        """
        try:
            backend = self._exports.pop(name)
        except KeyError:
            raise KeyError(f"export {name!r} is not served") from None
        users = [conn for conn in self._connections if conn.export_name == name]
        await self._stop(users)
        logger.info("NBD export %r removed (%d connection(s) ended)", name, len(users))
        return backend

    # --- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Listen on ``host:port`` (port 0 picks a free one; see ``port``)."""
        if self._server is not None:
            raise RuntimeError("NbdServer.start() was already called")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _stream.Channel(self._on_connected), self._host, self._requested_port
        )
        logger.info("NBD server listening on %s:%d", self._host, self.port)

    @property
    def port(self) -> int:
        """The TCP port the server listens on (after ``start``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the NBD server is not listening; await start() first")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def connection_count(self) -> int:
        """Client connections currently open (handshaking or transmitting)."""
        return len(self._connections)

    def url(self, export_name: str, *, tls: bool = False) -> str:
        """The NBD URI of an export, e.g. ``nbd://127.0.0.1:10809/vpg/vm/disk``.

        The export name is the URI path without its leading ``/`` (NBD URI
        spec); slashes stay as they are and other reserved characters are
        percent-encoded, which qemu (7.2) and libnbd (1.14) both decode.
        ``tls=True`` gives the ``nbds://`` form (TLS mandatory) that libnbd
        understands; qemu takes TLS from ``tls-creds`` instead.
        """
        host = f"[{self._host}]" if ":" in self._host else self._host
        scheme = "nbds" if tls else "nbd"
        return f"{scheme}://{host}:{self.port}/{urllib.parse.quote(export_name, safe='/')}"

    async def close(self) -> None:
        """Stop accepting, end every connection (between requests), stop listening."""
        if self._closing:
            return
        self._closing = True
        if self._server is not None:
            self._server.close()
        await self._stop(list(self._connections))
        if self._server is not None:
            await self._server.wait_closed()
        logger.info("NBD server closed")

    def _on_connected(self, channel: _stream.Channel) -> None:
        if self._closing:
            channel.abort()
            return
        conn = _connection.Connection(channel, exports=self._exports, settings=self._settings)
        logger.debug("NBD %s: connected", conn.peer)
        self._connections[conn] = asyncio.create_task(self._serve(conn))

    async def _serve(self, conn: _connection.Connection) -> None:
        try:
            await conn.run()
        except asyncio.CancelledError:
            # Our own stop(); the connection has cleaned up after itself.
            pass
        finally:
            del self._connections[conn]
            logger.debug("NBD %s: closed", conn.peer)

    async def _stop(self, connections: Iterable[_connection.Connection]) -> None:
        tasks = []
        for conn in connections:
            task = self._connections.get(conn)
            if task is not None:
                conn.stop()
                tasks.append(task)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=self._stop_timeout)
        if pending:
            logger.warning(
                "NBD: %d connection(s) did not stop within %.1f s; cancelling them",
                len(pending),
                self._stop_timeout,
            )
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)


def _check_block_sizes(min_block: int, preferred_block: int, max_payload: int) -> None:
    """Enforce the spec's rules for NBD_INFO_BLOCK_SIZE values ("Block size constraints")."""
    if not _protocol.is_power_of_two(min_block) or min_block > _protocol.MAX_MIN_BLOCK:
        raise ValueError(
            f"min_block={min_block}: must be a power of two, at most {_protocol.MAX_MIN_BLOCK}"
        )
    if not _protocol.is_power_of_two(preferred_block) or preferred_block < max(min_block, 512):
        raise ValueError(
            f"preferred_block={preferred_block}: must be a power of two and at least "
            f"max(min_block, 512)"
        )
    if max_payload % min_block or not preferred_block <= max_payload <= 2**31:
        raise ValueError(
            f"max_payload={max_payload}: must be a multiple of min_block, at least "
            f"preferred_block and at most 2 GiB"
        )
