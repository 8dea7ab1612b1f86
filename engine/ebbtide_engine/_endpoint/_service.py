"""The replication endpoint: a VPG's runtime and one NBD export per disk, served together.

``Endpoint.open`` takes the VPG's writer lease (``VpgRuntime``), decides for
every disk from its dirty map and the bucket whether the journal may lack
something, writes the maps with this writer's epoch, starts the NBD server
(exports ``<vpg>/<vm>/<disk>``), and starts resynchronising the proxy disks
that need it while already serving them. ``close`` stops serving, ships
everything and commits a final checkpoint (a clean shutdown). docs/endpoint.md
describes the modes, the map, the states and how to feed an endpoint from QEMU.

What it keeps in the state directory, per VPG (``<state-dir>/<vpg>/``):

- ``.lock``: held (flock) while an endpoint runs, so two never share the maps;
- ``<vm>/<disk>.dirty``: the dirty-region map (format: ``_dirtymap``);
- ``<vm>/<disk>.replica``: a mirror-target disk's sparse local copy.
- ``spill/``: the runtime's spill files (encoded segments waiting for an
  upload past the memory bound; ``RuntimeOptions.spill_dir``), deleted at
  the next start if the endpoint died (the dirty map resends their writes).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import pathlib
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ebbtide_engine import _errors, _index, _nbd, _runtime, _spec
from ebbtide_engine._endpoint import _dirtymap, _disk
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.endpoint")

SyncState = _disk.SyncState


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class EndpointOptions:
    """Where the endpoint listens and how its dirty maps are cut; defaults suit production."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see Endpoint.urls)
    region_size: int = 1 << 20  # bytes per dirty-map bit, a power of two
    mark_ahead: int = 32  # regions set ahead of a sequential stream (see _dirtymap)
    max_mark_ahead: int = 256  # ... at most, as the stream goes on (the crash-resync price)
    tls: ssl.SSLContext | None = None  # NBD STARTTLS (docs/nbd.md, "TLS")
    tls_required: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class DiskStatus:
    """One export as the endpoint sees it."""

    export: str  # <vpg>/<vm>/<disk>
    url: str
    vm: str
    disk: str
    mode: str  # "Proxy" or "Mirror"
    size: int
    state: SyncState
    message: str  # why the state is what it is, and what to do (empty when Protecting)
    done_bytes: int  # progress of the sync in progress (== total_bytes when Protecting)
    total_bytes: int
    dirty_regions: int  # set bits (every region while a full pass is owed)
    region_size: int
    map_writes: int  # times the dirty map was written (write-ahead costs)
    writes: int
    bytes_written: int
    trims: int
    zeroes: int
    failures: int  # requests refused because the local file or the journal failed
    last_lsn: int


@dataclasses.dataclass(frozen=True, slots=True)
class EndpointStatus:
    """The endpoint and its runtime at one moment (RPO, backpressure, every disk)."""

    vpg: str
    state: str  # the runtime's: "protecting", "fenced" or "closed"
    rpo_seconds: float | None  # now minus the last durable checkpoint's time
    target_rpo_seconds: float
    unshipped_bytes: int  # accepted writes not yet in the bucket (in memory or spilled)
    max_unshipped_bytes: int  # the bound on unshipped data in memory
    connections: int
    disks: list[DiskStatus]
    runtime: _runtime.RuntimeStatus
    memory_bytes: int = 0  # unshipped data held in memory
    spilled_bytes: int = 0  # encoded segments waiting in the spill directory
    max_spill_bytes: int = 0  # the spill's bound (0: no spill); past both bounds writes wait
    spill_error: str | None = None  # why spilling is off or failed lately

    @property
    def writes_wait(self) -> bool:
        """Whether writers are (about to be) held back: memory full and no spill room."""
        return self.memory_bytes >= self.max_unshipped_bytes and (
            self.spill_error is not None
            or self.spilled_bytes >= self.max_spill_bytes - self.max_unshipped_bytes // 4
        )

    @property
    def synced(self) -> bool:
        return all(d.state == SyncState.PROTECTING for d in self.disks)


class Endpoint:
    """Serve every disk of a VPG over NBD, journaling each change. Use :meth:`open`."""

    def __init__(self) -> None:
        raise TypeError("use `await Endpoint.open(spec, store, state_dir)` or `Endpoint.attach`")

    @classmethod
    async def open(
        cls,
        spec: _spec.VpgSpec,
        store: _base.ObjectStore,
        state_dir: str | os.PathLike[str],
        *,
        options: EndpointOptions | None = None,
        runtime_options: _runtime.RuntimeOptions | None = None,
    ) -> Endpoint:
        """Take the VPG's lease, check the disks, and start serving (resyncing as needed).

        Raises what ``VpgRuntime.open`` raises, ``FencedError`` if another
        endpoint uses the same state directory for this VPG, and ``SpecError``
        if a proxy disk's source cannot be opened.
        """
        self = object.__new__(cls)
        self._prepare(spec, state_dir, options or EndpointOptions(), owns_runtime=True)
        runtime_options = runtime_options or _runtime.RuntimeOptions()
        if runtime_options.spill_dir is None:
            # Guarded by the state directory's lock, like the maps.
            runtime_options = dataclasses.replace(runtime_options, spill_dir=self._dir / "spill")
        given = runtime_options
        await self._open_sources_then(lambda: _runtime.VpgRuntime.open(spec, store, options=given))
        return self

    @classmethod
    async def attach(
        cls,
        runtime: _runtime.VpgRuntime,
        state_dir: str | os.PathLike[str],
        *,
        options: EndpointOptions | None = None,
    ) -> Endpoint:
        """Serve the disks of a VPG whose runtime someone else opened (and will close).

        For an owner of the runtime such as the operator: ``close`` then stops
        serving, takes a checkpoint that covers every write served and writes
        the maps, but leaves the runtime open.
        """
        self = object.__new__(cls)
        self._prepare(runtime.spec, state_dir, options or EndpointOptions(), owns_runtime=False)

        async def given() -> _runtime.VpgRuntime:
            return runtime

        await self._open_sources_then(given)
        return self

    def _prepare(
        self,
        spec: _spec.VpgSpec,
        state_dir: str | os.PathLike[str],
        options: EndpointOptions,
        *,
        owns_runtime: bool,
    ) -> None:
        if options.region_size <= 0 or options.region_size & (options.region_size - 1):
            raise ValueError(f"region_size {options.region_size} is not a power of two")
        self.spec = spec
        self._options = options
        self._owns_runtime = owns_runtime
        self._dir = pathlib.Path(state_dir) / spec.name
        self._disks: dict[str, _disk.ProtectedDisk] = {}
        self._resyncs: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._server: _nbd.NbdServer | None = None
        self._urls: dict[str, str] = {}
        self._sources: dict[tuple[str, str], _nbd.FileBackend] = {}
        self._closed = False
        self._detached = False

    async def _open_sources_then(
        self, open_runtime: Callable[[], Awaitable[_runtime.VpgRuntime]]
    ) -> None:
        self._lock_fd = await asyncio.to_thread(_lock_state_dir, self._dir)
        # Proxy sources first: a missing one is reported before the lease is taken.
        try:
            for vm in self.spec.vms:
                for disk in vm.disks:
                    if disk.source is not None and disk.mode == "Proxy":
                        path = pathlib.Path(disk.source.path)
                        backend = await asyncio.to_thread(_open_source, vm.name, disk, path)
                        self._sources[(vm.name, disk.name)] = backend
            self.runtime = await open_runtime()
        except BaseException:
            for backend in self._sources.values():
                backend.close()
            _unlock(self._lock_fd)
            raise
        try:
            await self._start()
        except BaseException:
            # Nothing was served: stop as cleanly as the cause allows (lease released).
            await self._stop(clean=True)
            raise

    async def _start(self) -> None:
        status = self.runtime.status()
        for vm in self.spec.vms:
            for disk in vm.disks:
                protected = await asyncio.to_thread(self._open_disk, vm.name, disk, status)
                self._disks[protected.export] = protected
        self._update_syncing()
        # Every map carries this writer's epoch before anything is served.
        await asyncio.gather(*(d.dirty.persist() for d in self._disks.values()))
        self.runtime.add_durable_listener(self._on_durable)
        self._server = _nbd.NbdServer(
            self._disks,
            host=self._options.host,
            port=self._options.port,
            tls=self._options.tls,
            tls_required=self._options.tls_required,
        )
        await self._server.start()
        self._urls = {name: self._server.url(name) for name in self._disks}
        for protected in self._disks.values():
            if protected.state in (SyncState.INITIAL_SYNC, SyncState.RESYNCING) and (
                protected.mode == "Proxy"
            ):
                source = pathlib.Path(protected.local.path)
                task = asyncio.create_task(
                    protected.resync(source), name=f"resync of {protected.export}"
                )
                task.add_done_callback(self._resync_done)
                self._resyncs.append(task)
        logger.info(
            "VPG %s: serving %d exports on port %d", self.spec.name, len(self._disks), self.port
        )

    def _open_disk(
        self, vm: str, disk: _spec.DiskSpec, status: _runtime.RuntimeStatus
    ) -> _disk.ProtectedDisk:
        """Open a disk's local file and map, and decide its state (blocking: in a thread)."""
        (self._dir / vm).mkdir(parents=True, exist_ok=True)
        map_path = self._dir / vm / f"{disk.name}.dirty"
        _dirtymap.remove_temporary(map_path)
        fresh = status.last_checkpoint is None
        why_full = "initial sync" if fresh else None
        image: _dirtymap.MapImage | None = None
        try:
            image = _dirtymap.read(map_path)
        except ValueError as exc:
            why_full = why_full or f"the dirty map {map_path} is unusable ({exc})"
        previous = status.previous_writer
        if image is None:
            why_full = why_full or f"no dirty map at {map_path}"
        elif (image.size, image.region_size) != (disk.size, self._options.region_size):
            why_full = why_full or (
                f"the dirty map was made for a {image.size}-byte disk with "
                f"{image.region_size}-byte regions"
            )
        elif previous is None or image.epoch != previous.previous_epoch:
            why_full = why_full or (
                f"the journal was last written by writer epoch "
                f"{previous.previous_epoch if previous else '-'}, the map by epoch {image.epoch}"
            )
        elif image.full:
            why_full = "a full pass was not completed"
        usable = image is not None and why_full is None
        dirty = _dirtymap.DirtyMap(
            map_path,
            size=disk.size,
            region_size=self._options.region_size,
            epoch=status.epoch,
            full=why_full is not None,
            bits=image.bits if usable and image is not None else None,
            mark_ahead=self._options.mark_ahead,
            max_mark_ahead=self._options.max_mark_ahead,
        )
        if disk.mode == "Proxy":
            local = self._sources.pop((vm, disk.name))
        else:
            local = _open_replica(self._dir / vm / f"{disk.name}.replica", disk.size, fresh)
        protected = _disk.ProtectedDisk(
            runtime=self.runtime,
            vm=vm,
            disk=disk.name,
            mode=disk.mode,
            local=local,
            dirty=dirty,
            request_checkpoint=self._checkpoint_soon,
        )
        unclean = previous is not None and not previous.clean_shutdown
        if disk.mode == "Mirror":
            if fresh:
                protected.start_mirror_pass(
                    SyncState.INITIAL_SYNC, "waiting for the first blockdev-mirror full pass"
                )
            elif why_full or dirty.dirty_regions or unclean:
                reason = why_full or (
                    f"{dirty.dirty_regions} regions were dirty" if dirty.dirty_regions else ""
                )
                reason = reason or "the previous writer did not stop cleanly"
                protected.start_mirror_pass(
                    SyncState.NEEDS_MIRROR_PASS,
                    f"start a new blockdev-mirror full pass ({reason})",
                )
        elif why_full:
            protected.prepare_resync(
                SyncState.INITIAL_SYNC if fresh else SyncState.RESYNCING,
                f"re-reading the whole source ({why_full})",
            )
        elif dirty.dirty_regions:
            protected.prepare_resync(
                SyncState.RESYNCING, f"re-reading {dirty.dirty_regions} dirty regions of the source"
            )
        if protected.state != SyncState.PROTECTING:
            level = logging.INFO if fresh else logging.WARNING
            logger.log(level, "%s: %s: %s", protected.export, protected.state, protected.message)
        return protected

    # --- serving ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.port

    def urls(self) -> dict[str, str]:
        """The NBD URL of every export, by export name (``<vpg>/<vm>/<disk>``)."""
        return dict(self._urls)

    def url(self, vm: str, disk: str) -> str:
        """The NBD URL of one disk's export."""
        return self.urls()[f"{self.spec.name}/{vm}/{disk}"]

    async def resynced(self) -> None:
        """Wait until every proxy disk's resync is journaled and covered by a durable checkpoint."""
        await asyncio.gather(*self._resyncs)

    def expect_mirror_pass(self, vm: str, disk: str) -> None:
        """A mirror job ended or is about to restart: wait for a new full pass of this disk.

        For the orchestrator that watches QEMU (a BLOCK_JOB_COMPLETED with an
        error, or a new blockdev-mirror about to start): the disk shows
        NeedsMirrorPass until the new pass has written all of it.
        """
        protected = self._disks[f"{self.spec.name}/{vm}/{disk}"]
        if protected.mode != "Mirror":
            raise _errors.InvalidRequest(f"{protected.export} is a Proxy disk, not a mirror target")
        protected.start_mirror_pass(
            SyncState.NEEDS_MIRROR_PASS, "start a new blockdev-mirror full pass (the job ended)"
        )
        self._spawn(protected.dirty.persist())

    def _checkpoint_soon(self) -> _disk.CheckpointFuture | None:
        try:
            future = self.runtime.request_checkpoint()
        except _errors.EbbtideError as exc:
            logger.info("VPG %s: no checkpoint: %s", self.spec.name, exc)
            return None
        self._background.add(future)
        future.add_done_callback(self._background_done)
        return future

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if future.cancelled():
            return
        exc = future.exception()
        if isinstance(exc, _errors.RuntimeClosed):
            logger.debug("VPG %s: %s", self.spec.name, exc)
        elif exc is not None:
            logger.warning("VPG %s: %s", self.spec.name, exc)

    def _on_durable(self, checkpoint: _index.Checkpoint) -> None:
        if self._detached:
            return  # the maps were written for the last time at close
        for protected in self._disks.values():
            protected.on_durable(checkpoint.id)
        self._update_syncing()

    def _update_syncing(self) -> None:
        """The VPG's SLA phase is Syncing while a first full copy is being journaled."""
        syncing = any(d.state == SyncState.INITIAL_SYNC for d in self._disks.values())
        self.runtime.set_syncing(syncing)

    def _resync_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.error("%s failed: %s", task.get_name(), task.exception())

    # --- status -----------------------------------------------------------------------

    def status(self) -> EndpointStatus:
        runtime = self.runtime.status()
        urls = self._urls
        disks = [
            DiskStatus(
                export=d.export,
                url=urls.get(d.export, ""),
                vm=d.vm,
                disk=d.disk,
                mode=d.mode,
                size=d.size,
                state=d.state,
                message=d.message,
                done_bytes=d.done_bytes if d.state != SyncState.PROTECTING else d.size,
                total_bytes=d.total_bytes if d.state != SyncState.PROTECTING else d.size,
                dirty_regions=d.dirty.dirty_regions,
                region_size=d.dirty.region_size,
                map_writes=d.dirty.persists,
                writes=d.writes,
                bytes_written=d.bytes_written,
                trims=d.trims,
                zeroes=d.zeroes,
                failures=d.failures,
                last_lsn=d.last_lsn,
            )
            for d in self._disks.values()
        ]
        return EndpointStatus(
            vpg=self.spec.name,
            state=runtime.state,
            rpo_seconds=runtime.rpo_seconds,
            target_rpo_seconds=self.spec.target_rpo,
            unshipped_bytes=runtime.unshipped_bytes,
            max_unshipped_bytes=self.spec.journal.max_unshipped_bytes,
            connections=self._server.connection_count if self._server is not None else 0,
            disks=disks,
            runtime=runtime,
            memory_bytes=runtime.memory_bytes,
            spilled_bytes=runtime.spilled_bytes,
            max_spill_bytes=self.spec.journal.max_spill_bytes,
            spill_error=runtime.spill_error,
        )

    # --- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving, ship everything, commit a final checkpoint, write the maps."""
        await self._stop(clean=True)

    async def abort(self) -> None:
        """Stop at once, as a crash would: no final checkpoint, maps left as they are.

        The writer lease stays held until it expires (reopen with
        ``takeover="force"`` to take it at once).
        """
        await self._stop(clean=False)

    async def _stop(self, *, clean: bool) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._server is not None:
                await self._server.close()
            for task in self._resyncs:
                task.cancel()
            await asyncio.gather(*self._resyncs, return_exceptions=True)
            if clean:
                if self._owns_runtime:
                    await self.runtime.close()  # its final checkpoint clears the maps
                elif self.runtime.status().state == "protecting":
                    await self.runtime.checkpoint(_index.CheckpointKind.AUTOMATIC)
                await asyncio.gather(*self._background, return_exceptions=True)
                self._detached = True
                await asyncio.gather(*(d.dirty.persist() for d in self._disks.values()))
            else:
                self._detached = True
                if self._owns_runtime:
                    await self.runtime.abort()
                for future in self._background:
                    future.cancel()
                for protected in self._disks.values():
                    await protected.dirty.abandon()
        finally:
            for protected in self._disks.values():
                protected.local.close()
            for backend in self._sources.values():
                backend.close()
            _unlock(self._lock_fd)

    async def __aenter__(self) -> Endpoint:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _lock_state_dir(directory: pathlib.Path) -> int:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise _errors.FencedError(
            f"state directory {directory} is in use by another endpoint (pid {holder}); "
            "stop it, or give this one another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)  # closing the descriptor releases the flock


def _open_source(vm: str, disk: _spec.DiskSpec, path: pathlib.Path) -> _nbd.FileBackend:
    try:
        return _nbd.FileBackend(path, size=disk.size)
    except FileNotFoundError:
        raise _errors.SpecError(
            f"disk {vm}/{disk.name}: source.path {path} does not exist; create it (a file or "
            "block device of at least the disk's size) or fix the VPG spec"
        ) from None
    except (OSError, ValueError) as exc:
        raise _errors.SpecError(f"disk {vm}/{disk.name}: cannot serve {path}: {exc}") from None


def _open_replica(path: pathlib.Path, size: int, fresh: bool) -> _nbd.FileBackend:
    if fresh:
        # A new VPG's journal is empty, which recovers as zeros: so must the replica read.
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if not path.exists():
        with path.open("wb") as file:
            file.truncate(size)
    return _nbd.FileBackend(path, size=size)
