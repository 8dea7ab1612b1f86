"""An export backed by a local file or block device: the local half of proxy mode.

In proxy mode the export *is* the protected disk: reads come from a local
file or block device and every write lands there (and, one layer up, in the
journal). This backend does the local part with positional I/O (os.pread /
os.pwrite) in worker threads, so a slow disk never blocks the event loop;
except plain writes (no FUA, up to 4 MiB), which only copy into the page
cache: those are written on the loop itself. Handing each to a thread and
back cost more than the copy, because the thread must win the GIL back from
a busy loop before the reply can go (nbdcopy into a Proxy disk: 226-266
MB/s with threads, 304-351 MB/s inline, same machine and run). When the
kernel starts throttling (an inline write took over 10 ms: writeback is
behind), writes go to threads again for a second, so a slow disk still
never holds the loop for long.

Durability: FUA and FLUSH call fdatasync(2). Trim punches a hole
(fallocate PUNCH_HOLE|KEEP_SIZE); zeroing punches a hole when allowed, else
uses ZERO_RANGE; where the file system or device cannot do either, zeroes
are written. Unsupported fallocate modes are remembered per backend, so the
fallback costs one failed syscall, not one per request.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import stat
import threading
import time
from collections.abc import Callable

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10
_PUNCH_HOLE = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
_ZERO_RANGE = _FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE
#: errno values that mean "this file system / device cannot do that mode" (remembered).
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOSYS, errno.ENODEV})
#: Zeroes are written in pieces of this size when fallocate cannot help.
_ZERO_CHUNK = 1024 * 1024
_ZEROES = bytes(_ZERO_CHUNK)
#: Plain writes up to this size are written on the event loop (see the module docstring).
_INLINE_WRITE_MAX = 4 * 1024 * 1024
#: An inline write slower than this (seconds) sends writes to threads for _THREADED_FOR.
_INLINE_WRITE_SLOW = 0.01
_THREADED_FOR = 1.0


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate(2) (Python only wraps posix_fallocate, which has no modes)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    fallocate: Callable[[int, int, int, int], int] = function
    return fallocate


_fallocate = _load_fallocate()


class FileBackend:
    """Serve the first ``size`` bytes of a file or block device (an ExportBackend).

    ``size=None`` uses the file's size (the device size for a block device).
    A regular file smaller than ``size`` is extended (sparse) unless
    ``read_only``. The file is opened here and stays open until ``close()``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        size: int | None = None,
        read_only: bool = False,
    ) -> None:
        self.path = os.fspath(path)
        self._read_only = read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        self._fd = os.open(self.path, flags)
        try:
            self._size = self._prepare_size(size)
        except BaseException:
            os.close(self._fd)
            raise
        self._unsupported_modes: set[int] = set()
        self._lock = threading.Lock()
        self._threaded_until = 0.0  # time.monotonic(): plain writes use threads until then
        self._closed = False

    def _prepare_size(self, size: int | None) -> int:
        info = os.fstat(self._fd)
        is_file = stat.S_ISREG(info.st_mode)
        actual = info.st_size if is_file else os.lseek(self._fd, 0, os.SEEK_END)
        if size is None:
            return actual
        if size < 0:
            raise ValueError(f"{self.path}: size must not be negative, got {size}")
        if size > actual:
            if not is_file or self._read_only:
                raise ValueError(
                    f"{self.path}: is {actual} bytes, smaller than the export size {size}"
                )
            os.ftruncate(self._fd, size)
        return size

    # --- ExportBackend -------------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return self._read_only

    async def read(self, offset: int, length: int) -> bytes:
        return await asyncio.to_thread(self._read, offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        started = time.monotonic()
        if not fua and len(data) <= _INLINE_WRITE_MAX and started >= self._threaded_until:
            self._write(offset, data, False)
            ended = time.monotonic()
            if ended - started > _INLINE_WRITE_SLOW:
                self._threaded_until = ended + _THREADED_FOR
            return
        await asyncio.to_thread(self._write, offset, data, fua)

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await asyncio.to_thread(self._zero, offset, length, (_PUNCH_HOLE,), fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        modes = (_PUNCH_HOLE, _ZERO_RANGE) if may_trim else (_ZERO_RANGE,)
        await asyncio.to_thread(self._zero, offset, length, modes, fua)

    async def disconnected(self) -> None:
        """Nothing to do: the file stays open for the next connection."""

    # --- housekeeping -----------------------------------------------------------------

    def close(self) -> None:
        """Close the file; the backend must not be served any more."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)

    def __enter__(self) -> FileBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- blocking helpers (run in worker threads) ---------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        if len(data) == length:
            return data
        # Short read: keep reading; past the end of a (shrunk) file reads as zeroes.
        parts = [data]
        done = len(data)
        while done < length:
            piece = os.pread(self._fd, length - done, offset + done)
            if not piece:
                parts.append(bytes(length - done))
                break
            parts.append(piece)
            done += len(piece)
        return b"".join(parts)

    def _write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view = view[written:]
            offset += written
        if fua:
            os.fdatasync(self._fd)

    def _zero(self, offset: int, length: int, modes: tuple[int, ...], fua: bool) -> None:
        for mode in modes:
            if self._try_fallocate(mode, offset, length):
                break
        else:
            end = offset + length
            while offset < end:
                piece = min(end - offset, _ZERO_CHUNK)
                self._write(offset, _ZEROES if piece == _ZERO_CHUNK else bytes(piece), False)
                offset += piece
        if fua:
            os.fdatasync(self._fd)

    def _try_fallocate(self, mode: int, offset: int, length: int) -> bool:
        if _fallocate is None or mode in self._unsupported_modes:
            return False
        if _fallocate(self._fd, mode, offset, length) == 0:
            return True
        error = ctypes.get_errno()
        if error in _UNSUPPORTED:
            with self._lock:
                self._unsupported_modes.add(mode)
            return False
        if error == errno.EINVAL:
            # E.g. a block device refusing a range not aligned to its sectors:
            # fall back for this request only.
            return False
        raise OSError(error, f"fallocate(mode=0x{mode:x}) on {self.path}: {os.strerror(error)}")
