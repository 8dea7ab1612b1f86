"""A storage account in a local directory: the durable embedded default.

Like Litestream's file replica, it lets Ebbtide run with no object store at
all (a laptop, a single node, a test) while keeping the exact contract of
:class:`ObjectStore`, so the engine cannot tell it from a bucket.

What it stores, under the account's root directory::

    ROOT/a/b/c                  the object "a/b/c", its bytes exactly (mode 0600)
    ROOT/.ebbtide/tmp/*.part    objects being written; never listed or read
    ROOT/.ebbtide/locks/NN.lock empty files that put_if_match and delete flock

Each object file carries the extended attribute ``user.ebbtide.etag`` =
``MD5HEX:SIZE:MTIME_NS``, written on the temporary file before it is
published, so it belongs to the same inode as the bytes. The etag is the MD5
of the content (as for the memory store and a single-part S3 upload); the
attribute only saves re-reading the file to list or compare it. When the
attribute is missing (a filesystem without user xattrs, files restored by a
tool that drops them) or its size and mtime no longer match the file (edited
in place), the etag is computed from the content instead: exact either way.

Why writes are safe:

- ``put_new`` writes a temporary file, fsyncs it, then ``os.link``s it to the
  final name. ``link`` fails if the name is taken, so create-only is atomic
  across threads and processes, and readers see the whole object or none.
  Then the directory is fsynced (and the parents of any directory created).
- ``put_if_match`` and ``delete`` hold an ``flock`` on one of
  ``_LOCK_STRIPES`` lock files chosen by a hash of the key, so a
  compare-and-swap is atomic against every other writer on the host; the new
  version is a fsynced temporary file moved over the old with ``os.replace``.
- ``put_file`` (an overwrite) streams the source through one buffer into a
  temporary file, hashing it on the way, fsyncs it, and moves it over the
  key with ``os.replace`` under the key's lock, then fsyncs the directory.
- A crash leaves at most a stray file in ``.ebbtide/tmp``, which no read or
  listing ever looks at (it can be removed by hand when no writer runs).

A key ``a`` and a key ``a/b`` cannot both exist here (a file is not a
directory); the engine's key layout never needs both, and trying raises a
``StorageError`` that says so. Keys are ``/``-separated, relative, with no
empty, ``.`` or ``..`` parts, and cannot start with ``.ebbtide/``.
Several hosts sharing one directory over NFS are not supported: ``flock`` and
``link`` are only trusted on a local filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import os
import pathlib
import stat
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

from ebbtide_engine import _errors
from ebbtide_engine.storage import _base

_RESERVED = ".ebbtide"
_XATTR = "user.ebbtide.etag"
_LOCK_STRIPES = 64
_FILE_MODE = 0o600  # objects hold disk contents: readable by the owner only
_READ_CHUNK = 1 << 20
_INFO_BATCH = 256  # files stat-ed per thread hop while listing
_LINK_ATTEMPTS = 10  # a concurrent delete may remove a parent dir we just made
_COPY_CHUNK = 8 << 20  # put_file's buffer (or part_size, if smaller)

# (Named here because inside the class, ``list`` is the method.)
_Paths = list[pathlib.Path]
_Entries = list[tuple[str, bool]]  # (name, is a directory)
_KeyedPaths = list[tuple[str, pathlib.Path]]
_Infos = list[_base.ObjectInfo]


class LocalStore(_base.ObjectStore):
    """Objects as files under ``root``, which must exist (see :meth:`create`).

    Blocking file I/O runs in worker threads (``asyncio.to_thread``), so a
    large object never stalls the event loop.
    """

    def __init__(self, root: pathlib.Path) -> None:
        self.root = pathlib.Path(root).absolute()
        self.description = f"file://{self.root}"
        self._tmp_dir = self.root / _RESERVED / "tmp"
        self._lock_dir = self.root / _RESERVED / "locks"

    @classmethod
    def create(cls, root: pathlib.Path) -> LocalStore:
        """Create ``root`` (and its parents) if needed, and open a store there.

        Opening with the constructor never creates the directory: a missing
        root then raises ``BucketNotFound``, as a missing bucket would.
        """
        pathlib.Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root)

    # -- the ObjectStore contract --------------------------------------------------

    async def put_new(self, key: str, data: bytes) -> _base.ObjectInfo:
        path = self._path(key)
        return await asyncio.to_thread(self._put_new, key, path, data)

    async def put_if_match(self, key: str, data: bytes, *, etag: str) -> _base.ObjectInfo:
        path = self._path(key)
        return await asyncio.to_thread(self._put_if_match, key, path, data, etag)

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        part_size: int = _base.DEFAULT_PART_SIZE,
        concurrency: int = _base.DEFAULT_CONCURRENCY,
        progress: _base.Progress | None = None,
    ) -> _base.ObjectInfo:
        """Stream the file into a temporary file (one buffer), fsync, rename over ``key``.

        One worker thread copies and hashes; ``concurrency`` does not apply.
        A cancellation stops the copy at its next buffer and waits for the
        thread to clean up, so nothing is published after it (unless the
        rename was already under way).
        """
        _base.check_part_options(part_size, concurrency)
        target = self._path(key)
        loop = asyncio.get_running_loop()
        cancelled = threading.Event()

        def report(done: int) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, done)

        copy = asyncio.ensure_future(
            asyncio.to_thread(
                self._put_file, key, target, path, min(part_size, _COPY_CHUNK), report, cancelled
            )
        )
        try:
            return await asyncio.shield(copy)
        except asyncio.CancelledError:
            cancelled.set()
            while not copy.done():  # let the thread remove its temporary file
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([copy])
            copy.exception()  # _Cancelled, most likely: retrieved, not logged
            raise

    async def get(
        self, key: str, *, byte_range: tuple[int, int] | None = None
    ) -> _base.StoredObject:
        path = self._path(key)
        if byte_range is not None and (byte_range[0] < 0 or byte_range[1] < 0):
            raise ValueError(f"byte range {byte_range} must not be negative")
        return await asyncio.to_thread(self._get, key, path, byte_range)

    async def head(self, key: str) -> _base.ObjectInfo:
        path = self._path(key)
        return await asyncio.to_thread(self._head, key, path)

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[_base.ObjectInfo]:
        await asyncio.to_thread(self._require_root, "list", prefix)
        dir_part, slash, name_prefix = prefix.rpartition("/")
        parts = dir_part.split("/") if slash else []
        if (
            any(part in ("", ".", "..") for part in parts)
            or parts[:1] == [_RESERVED]
            or "\x00" in prefix
        ):
            return  # no valid key has such a prefix
        directory = self.root.joinpath(*parts)
        key_prefix = dir_part + slash
        async for info in self._walk(directory, key_prefix, name_prefix, start_after):
            yield info

    async def delete(self, key: str) -> None:
        path = self._path(key)
        await asyncio.to_thread(self._delete, key, path)

    async def check(self) -> None:
        await asyncio.to_thread(self._require_root, "check", None)
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise _errors.AccessDenied(
                f"{self.description}: the directory is not writable by this process "
                f"(uid {os.getuid()}); fix its owner or permissions"
            )

    # -- keys and errors ---------------------------------------------------------------

    def _path(self, key: str) -> pathlib.Path:
        parts = key.split("/")
        problem = None
        if not key:
            problem = "it is empty"
        elif "\x00" in key:
            problem = "it contains a NUL byte"
        elif any(part in ("", ".", "..") for part in parts):
            problem = "it has an empty, '.' or '..' part (or a leading or trailing '/')"
        elif parts[0] == _RESERVED:
            problem = f"{_RESERVED}/ is reserved for the store's own files"
        if problem is not None:
            raise ValueError(f"{self.description}: invalid object key {key!r}: {problem}")
        return self.root.joinpath(*parts)

    def _require_root(self, op: str, key: str | None) -> None:
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise self._os_error(exc, op, key) from exc
        if st is None or not stat.S_ISDIR(st.st_mode):
            what = "does not exist" if st is None else "is not a directory"
            raise _errors.BucketNotFound(
                f"{self.description}: the directory {what}; create it (mkdir -p {self.root}) "
                "or fix the storage account URL"
            )

    def _os_error(self, exc: OSError, op: str, key: str | None) -> _errors.StorageError:
        where = self.description if key is None else f"{self.description}: {key!r}"
        if isinstance(exc, PermissionError):
            return _errors.AccessDenied(
                f"{where}: {op} refused ({exc.strerror}); fix the directory's owner or permissions"
            )
        return _errors.StorageUnavailable(f"{where}: {op} failed: {exc.strerror or exc}")

    def _missing(self, op: str, key: str) -> _errors.StorageError:
        """``ObjectNotFound``, unless the whole root is gone (``BucketNotFound``)."""
        self._require_root(op, key)
        return _errors.ObjectNotFound(f"{self.description}: no object {key!r}")

    def _shape_conflict(self, key: str) -> _errors.StorageError:
        return _errors.StorageError(
            f"{self.description}: cannot store {key!r}: a local directory cannot hold both "
            "an object 'x' and objects under 'x/'; one of them already exists"
        )

    # -- blocking helpers (run in worker threads) -------------------------------------

    def _put_new(self, key: str, path: pathlib.Path, data: bytes) -> _base.ObjectInfo:
        try:
            temp, info = self._write_temp(key, data)
            try:
                created: _Paths = []
                for _ in range(_LINK_ATTEMPTS):
                    try:
                        os.link(temp, path)
                    except FileNotFoundError:
                        # A directory above it is missing: the first object there, or
                        # a concurrent delete pruned it (even one we just made). Make
                        # them and try again. (Not before: mkdir of every parent on
                        # every put costs syscalls that contend for the directories.)
                        self._require_root("put", key)
                        created.extend(self._make_parents(key, path))
                        continue
                    except FileExistsError:
                        if path.is_dir():
                            raise self._shape_conflict(key) from None
                        raise _errors.ObjectExists(
                            f"{self.description}: {key!r} already exists"
                        ) from None
                    except NotADirectoryError:
                        raise self._shape_conflict(key) from None
                    for directory in {path.parent, *created}:
                        self._fsync_dir_left(directory)  # gone: deleted since (same key)
                    return info
                raise _errors.StorageUnavailable(
                    f"{self.description}: {key!r}: its directory kept vanishing while "
                    "writing (concurrent deletes); try again"
                )
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        except OSError as exc:
            raise self._os_error(exc, "put_new", key) from exc

    def _put_if_match(
        self, key: str, path: pathlib.Path, data: bytes, etag: str
    ) -> _base.ObjectInfo:
        try:
            temp, info = self._write_temp(key, data)
            try:
                with self._key_lock(key):
                    current = self._current(path)
                    if current is None or current[0] != etag:
                        now = "it does not exist" if current is None else "it changed"
                        raise _errors.PreconditionFailed(
                            f"{self.description}: {key!r} was not replaced: {now} "
                            f"since etag {etag!r} was read"
                        )
                    os.replace(temp, path)
                    _fsync_dir(path.parent)
                return info
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        except OSError as exc:
            raise self._os_error(exc, "put_if_match", key) from exc

    def _put_file(
        self,
        key: str,
        path: pathlib.Path,
        source: str | os.PathLike[str],
        chunk: int,
        report: Callable[[int], None],
        cancelled: threading.Event,
    ) -> _base.ObjectInfo:
        src = os.open(source, os.O_RDONLY | os.O_CLOEXEC)  # unreadable: its OSError as is
        try:
            try:
                temp, fd = self._open_temp(key)
            except OSError as exc:
                raise self._os_error(exc, "put_file", key) from exc
            try:
                try:
                    size = os.fstat(src).st_size
                    etag = _copy(src, fd, size, chunk, report, cancelled)
                    _save_etag(fd, etag, os.fstat(fd))
                    os.fsync(fd)
                except _ReadFailed as failed:
                    raise failed.error from None  # the source's problem, not the store's
                except _WriteFailed as failed:
                    raise self._os_error(failed.error, "put_file", key) from failed.error
                except OSError as exc:
                    raise self._os_error(exc, "put_file", key) from exc
                finally:
                    os.close(fd)
                self._publish(key, path, temp, cancelled)
                if size == 0:
                    report(0)
                return _base.ObjectInfo(key=key, size=size, etag=etag)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp)
        finally:
            os.close(src)

    def _open_temp(self, key: str) -> tuple[str, int]:
        """A new, empty temporary file in ``.ebbtide/tmp``: its name and descriptor."""
        self._require_root("put", key)
        temp = str(self._tmp_dir / f"{uuid.uuid4().hex}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            return temp, os.open(temp, flags, _FILE_MODE)
        except FileNotFoundError:  # the first put here: make .ebbtide/tmp
            _mkdir(self._tmp_dir.parent)
            _mkdir(self._tmp_dir)
            return temp, os.open(temp, flags, _FILE_MODE)

    def _publish(self, key: str, path: pathlib.Path, temp: str, cancelled: threading.Event) -> None:
        """Move the fsynced ``temp`` over ``path`` (an overwrite), durably."""
        try:
            created: _Paths = []
            for _ in range(_LINK_ATTEMPTS):
                with self._key_lock(key):
                    if cancelled.is_set():
                        raise _Cancelled
                    try:
                        os.replace(temp, path)
                    except FileNotFoundError:
                        missing = True  # a directory above it: make them, then again
                    except (IsADirectoryError, NotADirectoryError):
                        raise self._shape_conflict(key) from None
                    else:
                        missing = False
                if missing:
                    self._require_root("put", key)
                    created.extend(self._make_parents(key, path))
                    continue
                for directory in {path.parent, *created}:
                    self._fsync_dir_left(directory)
                return
            raise _errors.StorageUnavailable(
                f"{self.description}: {key!r}: its directory kept vanishing while "
                "writing (concurrent deletes); try again"
            )
        except OSError as exc:
            raise self._os_error(exc, "put_file", key) from exc

    def _get(
        self, key: str, path: pathlib.Path, byte_range: tuple[int, int] | None
    ) -> _base.StoredObject:
        try:
            with self._open_object("get", key, path) as (fd, st):
                etag = _etag_of(fd, st)
                start, end = (0, st.st_size) if byte_range is None else byte_range
                start, end = min(start, st.st_size), min(end, st.st_size)
                data = _pread_exactly(fd, max(0, end - start), start)
                return _base.StoredObject(data=data, etag=etag, size=st.st_size)
        except OSError as exc:
            raise self._os_error(exc, "get", key) from exc

    def _head(self, key: str, path: pathlib.Path) -> _base.ObjectInfo:
        try:
            with self._open_object("head", key, path) as (fd, st):
                return _base.ObjectInfo(key=key, size=st.st_size, etag=_etag_of(fd, st))
        except OSError as exc:
            raise self._os_error(exc, "head", key) from exc

    def _delete(self, key: str, path: pathlib.Path) -> None:
        try:
            self._require_root("delete", key)
            with self._key_lock(key):
                try:
                    os.unlink(path)
                except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    return  # no such object: deleting is idempotent
                self._fsync_dir_left(path.parent)
            # Prune directories left empty, so the tree does not fill with husks.
            # A put_new racing with this retries if its parent vanishes; a
            # delete racing with this may find its directory gone (above).
            directory = path.parent
            while directory != self.root:
                try:
                    directory.rmdir()
                except OSError:
                    break  # not empty (or gone): stop here
                self._fsync_dir_left(directory.parent)
                directory = directory.parent
        except OSError as exc:
            raise self._os_error(exc, "delete", key) from exc

    def _fsync_dir_left(self, directory: pathlib.Path) -> None:
        """Fsync ``directory``, or if a concurrent delete pruned it, the nearest one left.

        The entry this thread just removed (or added) was in ``directory``;
        if ``directory`` itself is gone, its removal is recorded in an
        ancestor, and fsyncing the nearest existing one makes the state
        durable in which neither exists.
        """
        while True:
            try:
                _fsync_dir(directory)
                return
            except (FileNotFoundError, NotADirectoryError):
                if directory == self.root:
                    raise
                directory = directory.parent

    def _write_temp(self, key: str, data: bytes) -> tuple[str, _base.ObjectInfo]:
        """A fsynced temporary file holding ``data`` and its etag attribute."""
        self._require_root("put", key)
        temp = str(self._tmp_dir / f"{uuid.uuid4().hex}.part")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(temp, flags, _FILE_MODE)
        except FileNotFoundError:  # the first put here: make .ebbtide/tmp
            _mkdir(self._tmp_dir.parent)
            _mkdir(self._tmp_dir)
            fd = os.open(temp, flags, _FILE_MODE)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            etag = hashlib.md5(data, usedforsecurity=False).hexdigest()
            st = os.fstat(fd)
            _save_etag(fd, etag, st)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        os.close(fd)
        return temp, _base.ObjectInfo(key=key, size=len(data), etag=etag)

    def _make_parents(self, key: str, path: pathlib.Path) -> _Paths:
        """Create the missing directories above ``path``; returns the ones to fsync."""
        created: _Paths = []
        directory = self.root
        for part in key.split("/")[:-1]:
            directory = directory / part
            try:
                directory.mkdir()
            except FileExistsError:
                continue
            except FileNotFoundError:
                self._require_root("put", key)
                raise
            except NotADirectoryError:
                raise self._shape_conflict(key) from None
            created.append(directory.parent)
        return created

    def _current(self, path: pathlib.Path) -> tuple[str, int] | None:
        """Etag and size of the object file at ``path``, or None if there is none."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            return None
        try:
            st = os.fstat(fd)
            return (_etag_of(fd, st), st.st_size) if stat.S_ISREG(st.st_mode) else None
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _open_object(
        self, op: str, key: str, path: pathlib.Path
    ) -> Iterator[tuple[int, os.stat_result]]:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise self._missing(op, key) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise self._missing(op, key)
            yield fd, st
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        """Hold this key's stripe lock (exclusive ``flock``) across processes."""
        _mkdir(self._lock_dir.parent)
        _mkdir(self._lock_dir)
        stripe = hashlib.sha256(key.encode()).digest()[0] % _LOCK_STRIPES
        fd = os.open(
            self._lock_dir / f"{stripe:02x}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    # -- listing -----------------------------------------------------------------------

    async def _walk(
        self,
        directory: pathlib.Path,
        key_prefix: str,
        name_prefix: str,
        start_after: str | None,
    ) -> AsyncIterator[_base.ObjectInfo]:
        """Yield the objects under ``directory`` in key order, a batch at a time."""
        entries = await asyncio.to_thread(self._scan, directory, key_prefix == "")
        files: _KeyedPaths = []
        for name, is_dir in entries:
            if not name.startswith(name_prefix):
                continue
            key = key_prefix + name
            if not is_dir:
                if start_after is None or key > start_after:
                    files.append((key, directory / name))
                    if len(files) >= _INFO_BATCH:
                        for info in await asyncio.to_thread(self._infos, files):
                            yield info
                        files = []
                continue
            subtree = f"{key}/"
            if (
                start_after is not None
                and start_after >= subtree
                and not start_after.startswith(subtree)
            ):
                continue  # every key below sorts before start_after
            for info in await asyncio.to_thread(self._infos, files):
                yield info
            files = []
            async for info in self._walk(directory / name, subtree, "", start_after):
                yield info
        for info in await asyncio.to_thread(self._infos, files):
            yield info

    def _scan(self, directory: pathlib.Path, at_root: bool) -> _Entries:
        """The entries of ``directory`` as (name, is_dir), sorted as their keys sort.

        A directory ``n`` holds keys ``n/...``, so it sorts as ``n/``: that puts
        ``a-c`` < ``a/b`` < ``a0``, which is the keys' own string order.
        """
        try:
            with os.scandir(directory) as it:
                entries = [
                    (entry.name, entry.is_dir(follow_symlinks=False))
                    for entry in it
                    if not (at_root and entry.name == _RESERVED)
                ]
        except (FileNotFoundError, NotADirectoryError):
            self._require_root("list", None)
            return []
        except OSError as exc:
            raise self._os_error(exc, "list", None) from exc
        entries.sort(key=lambda entry: f"{entry[0]}/" if entry[1] else entry[0])
        return entries

    def _infos(self, files: _KeyedPaths) -> _Infos:
        infos: _Infos = []
        for key, path in files:
            try:
                current = self._current(path)
            except OSError as exc:
                raise self._os_error(exc, "list", key) from exc
            if current is not None:  # else deleted while listing
                infos.append(_base.ObjectInfo(key=key, size=current[1], etag=current[0]))
        return infos


def _mkdir(path: pathlib.Path) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir()


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Cancelled(Exception):
    """put_file's caller was cancelled: the copying thread stops and cleans up."""


class _WriteFailed(Exception):
    """Writing the temporary file failed (a store error, unlike reading the source)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _ReadFailed(_WriteFailed):
    """Reading put_file's source failed: its ``OSError`` goes to the caller unchanged."""


def _copy(
    src: int,
    dst: int,
    size: int,
    chunk: int,
    report: Callable[[int], None],
    cancelled: threading.Event,
) -> str:
    """Copy ``size`` bytes of ``src`` to ``dst`` through one ``chunk``-sized buffer; the MD5.

    Errors reading ``src`` (also one shorter than ``size``: it changed)
    raise ``_ReadFailed``, errors writing ``dst`` ``_WriteFailed``: the
    caller passes the first on as they are and makes the second a
    ``StorageError``.
    """
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    digest = hashlib.md5(usedforsecurity=False)
    done = 0
    while done < size:
        if cancelled.is_set():
            raise _Cancelled
        try:
            got = os.preadv(src, [view[: min(chunk, size - done)]], done)
        except OSError as exc:
            raise _ReadFailed(exc) from exc
        if not got:
            raise _ReadFailed(
                OSError(
                    f"the file shrank while it was being uploaded (nothing at byte {done}); "
                    "it must not change meanwhile"
                )
            )
        digest.update(view[:got])
        out = view[:got]
        try:
            while out:
                out = out[os.write(dst, out) :]
        except OSError as exc:
            raise _WriteFailed(exc) from exc
        done += got
        report(done)
    return digest.hexdigest()


def _pread_exactly(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            break  # the file shrank (edited behind our back): return what there is
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _save_etag(fd: int, etag: str, st: os.stat_result) -> None:
    if sys.platform == "linux":
        value = f"{etag}:{st.st_size}:{st.st_mtime_ns}".encode()
        try:
            os.setxattr(fd, _XATTR, value)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENOSPC, errno.E2BIG):
                raise
            # No user xattrs here: the etag is computed from the content when read.


def _etag_of(fd: int, st: os.stat_result) -> str:
    """The content's MD5: from the attribute if it still matches the file, else computed."""
    if sys.platform == "linux":
        try:
            saved = os.getxattr(fd, _XATTR).decode()
        except OSError:
            saved = ""
        etag, _, stamp = saved.partition(":")
        if stamp == f"{st.st_size}:{st.st_mtime_ns}" and len(etag) == 32:
            return etag
    digest = hashlib.md5(usedforsecurity=False)
    offset = 0
    while chunk := os.pread(fd, _READ_CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
