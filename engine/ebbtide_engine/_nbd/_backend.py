"""The contract between the NBD server and whatever stores an export's bytes.

The server speaks the protocol; a backend holds the data. Ebbtide has two
kinds: a local file or block device (``_file.FileBackend``, the local half of
proxy mode) and the journaled disk the endpoint builds on top of it. Keeping
the interface this small is what lets the protocol layer be tested with real
clients before the journal exists.

What the server guarantees to a backend:

- Every call has already been validated: ``offset + length <= size``, lengths
  within the advertised limits, and never a write call on a read-only export.
- Calls from one client connection arrive strictly in the order the client
  sent the requests, one at a time (the server receives the next requests
  meanwhile, but does not call the backend for them before this call
  returned); the reply is sent only after the call returns. Calls from
  different connections may interleave.
- A request whose payload did not arrive completely never reaches the
  backend, and a backend call is never cancelled half-way by the server
  (shutdown and export removal wait for the call in progress).
- ``disconnected()`` is called once for every connection that selected the
  export, when that connection ends for any reason.
- A write's ``data`` is usually a ``memoryview`` of a buffer the connection
  received the payload into (small payloads may come as ``bytes``): valid
  until the call returns, reused for a later request afterwards. A backend
  that keeps the bytes beyond the call copies them (``bytes(data)``).

What a backend promises:

- ``write``/``trim``/``write_zeroes`` return once the change is visible to
  later reads; with ``fua=True`` only once it is durable. ``flush`` returns
  once every change acknowledged before it is durable.
- Failures are raised as ``OSError`` (mapped to NBD error values: ENOSPC,
  EDQUOT and EFBIG to ENOSPC; EPERM, EACCES and EROFS to EPERM; the rest to
  EIO) or as ``NbdError`` carrying the NBD error value to send. The client
  gets an error reply and the connection stays up. Any other exception is a
  bug: it is logged with its traceback and the client gets EIO.
"""

from __future__ import annotations

from typing import Protocol

from ebbtide_engine import _errors
from ebbtide_engine._nbd import _protocol


class ExportBackend(Protocol):
    """The storage behind one NBD export (see the module docstring for the contract)."""

    @property
    def size(self) -> int:
        """The export size in bytes; fixed while the export is served."""
        ...

    @property
    def read_only(self) -> bool:
        """True if writes, trims and zeroing must be refused with EPERM."""
        ...

    async def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes from ``offset``."""
        ...

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        """Write ``data`` at ``offset``; durable before returning if ``fua``.

        ``data`` is valid only until this returns (see the module docstring).
        """
        ...

    async def flush(self) -> None:
        """Make every change that was acknowledged before this call durable."""
        ...

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        """The range is no longer needed; its contents are undefined until rewritten."""
        ...

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        """Make the range read as zeroes; ``may_trim=False`` forbids leaving a hole."""
        ...

    async def disconnected(self) -> None:
        """A client connection to this export ended (cleanly or not)."""
        ...


class NbdError(_errors.EbbtideError):
    """A backend failure with the exact NBD error value to send to the client.

    ``errno`` must be one of the values the protocol allows (``Errno``:
    EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN).
    The message is sent to clients that negotiated structured replies and
    logged; keep it free of secrets.
    """

    def __init__(self, errno: int, message: str = "") -> None:
        try:
            self.errno = _protocol.Errno(errno)
        except ValueError:
            allowed = ", ".join(f"{e.name}={e.value}" for e in _protocol.Errno)
            raise ValueError(
                f"NbdError({errno}): not an NBD error value; use one of {allowed}"
            ) from None
        self.message = message or self.errno.name
        super().__init__(self.message)
