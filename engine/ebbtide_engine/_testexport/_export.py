"""A VPG's disks as of a checkpoint, served over NBD at once for failover tests.

``RecoveryExport.open`` does, in this order:

1. makes a private scratch directory under the caller's ``scratch_dir`` (so an
   unwritable one is reported before anything else happens);
2. checks the VPG exists, then places a hold (``_holds``: promotion deletes
   nothing while the export lives) and only then reads the manifest and
   index, so nothing it plans against can be garbage-collected under it;
3. selects the checkpoint and the VMs exactly as recovery does
   (``_recovery.select``) and plans the journal segments above the promoted
   LSN (``_mirror.plan_vm``); reads each segment once, verifying it and its
   place in the chain (``_mirror.ChainCheck``), and builds each disk's
   journal extent map from the rows with ``promoted < LSN < checkpoint``;
   reads each disk's chunk map at the promoted LSN;
4. serves every chosen disk as NBD export ``<vpg>/<vm>/<disk>`` (``_disk``).

Opening reads the journal above the promoted LSN (it has no separate row
index: the rows live in the segments with the data) and the chunk maps, but
no chunk: chunks are fetched when a read needs them. Segments that fit the
cache stay there for the reads that follow.

What it keeps in the scratch directory, per export
(``<scratch_dir>/ebbtide-<vpg>-<random>/``): ``<vm>/<disk>.overlay``, a
sparse file of the disk's size holding what test VMs wrote. ``close`` stops
serving, deletes that directory and releases the hold. Nothing is ever
written to the bucket but the hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import shutil
import socket
import ssl
import tempfile
import urllib.parse
from collections.abc import Sequence
from typing import Any

import numpy as np

from ebbtide_engine import (
    _errors,
    _format,
    _holds,
    _index,
    _keys,
    _lease,
    _mirror,
    _nbd,
    _recovery,
)
from ebbtide_engine._testexport import _cache, _disk, _extents
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.testexport")

#: The hold outlives a stuck export by at most this long (renewed every third of it).
HOLD_TTL_SECONDS = 600.0
#: Journal segments fetched ahead of the one being planned.
PLAN_PREFETCH = 4


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RecoveryExportOptions:
    """Where a test export listens and how much it caches; defaults suit one test."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    advertise_host: str | None = None  # host name put into the URLs (default: host)
    cache_bytes: int = 256 << 20  # bounded cache of fetched segments/chunks
    tls: ssl.SSLContext | None = None  # when set, clients must use TLS (nbds:// URLs)


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryExportStatus:
    """What a test export did so far."""

    checkpoint: _index.Checkpoint
    connections: int  # NBD client connections open now
    bytes_fetched: int  # journal segments and chunks read from the bucket
    overlay_bytes: int  # bytes of the disks the test VMs wrote, trimmed or zeroed
    reads: int  # NBD read requests served
    writes: int  # NBD write, trim and write-zeroes requests (all to the overlay)


class RecoveryExport:
    """Serve a VPG's disks at a checkpoint over NBD, writes to scratch. Use :meth:`open`."""

    checkpoint: _index.Checkpoint
    _options: RecoveryExportOptions
    _vpg: str
    _server: _nbd.NbdServer | None
    _disks: dict[tuple[str, str], _disk.ExportDisk]
    _hold: _holds.HoldLease | None
    _closed: bool
    _counters: _disk.Counters
    _object_cache: _cache.ObjectCache
    _scratch: pathlib.Path

    def __init__(self) -> None:
        raise TypeError("use `await RecoveryExport.open(store, vpg, selector, scratch_dir)`")

    @classmethod
    async def open(
        cls,
        store: _base.ObjectStore,
        vpg: str,
        selector: _recovery.CheckpointSelector,
        scratch_dir: str | os.PathLike[str],
        *,
        vms: Sequence[str] | None = None,
        options: RecoveryExportOptions | None = None,
        owner: str = "",
    ) -> RecoveryExport:
        """Hold the VPG, plan the disks at the checkpoint and start serving them.

        ``vms``: the VMs to export (default: every VM the VPG had at the
        checkpoint). ``owner`` is recorded in the hold (default
        ``engine/<host>/<pid>``). Raises ``CheckpointNotFound`` (no such VPG
        or checkpoint), ``InvalidRequest`` (unknown VM, unwritable scratch
        directory, bad options), ``CorruptObjectError`` and storage errors.
        """
        options = options or RecoveryExportOptions()
        _check_options(options)
        _keys.check_name("VPG", vpg)
        self = object.__new__(cls)
        self._options = options
        self._vpg = vpg
        self._server = None
        self._disks = {}
        self._hold = None
        self._closed = False
        self._counters = _disk.Counters()
        self._object_cache = _cache.ObjectCache(options.cache_bytes)
        self._scratch = await asyncio.to_thread(_make_scratch, pathlib.Path(scratch_dir), vpg)
        try:
            await self._open(store, vpg, selector, vms, owner)
        except BaseException:
            await self._shutdown()
            raise
        logger.info(
            "test export of VPG %s at checkpoint %d: %d disk(s) on %s",
            vpg,
            self.checkpoint.id,
            len(self._disks),
            ", ".join(self.urls().values()),
        )
        return self

    async def _open(
        self,
        store: _base.ObjectStore,
        vpg: str,
        selector: _recovery.CheckpointSelector,
        vms: Sequence[str] | None,
        owner: str,
    ) -> None:
        layout = _keys.VpgLayout(vpg)
        if await _lease.read_manifest(store, layout) is None:  # no hold on a VPG that is not
            raise _errors.CheckpointNotFound(
                f"{store.description} holds no VPG named {vpg!r} (no {layout.manifest})"
            )
        self._hold = await _holds.place_hold(
            store,
            vpg,
            owner=owner or f"engine/{socket.gethostname()}/{os.getpid()}",
            purpose="failover-test",
            ttl_seconds=HOLD_TTL_SECONDS,
        )
        await self._hold.__aenter__()  # renews in the background until close()
        state = await _recovery.read_index(store, vpg)
        self.checkpoint = _recovery.select(state, selector)
        layout_at_cut = state.layout_at(self.checkpoint.id)
        chosen = _choose_vms(vpg, self.checkpoint, layout_at_cut, vms)
        objects = _disk.Objects(store, layout, self._object_cache, self._counters)
        journals = await _plan_journals(objects, state, self.checkpoint, chosen, layout_at_cut)
        promoted = state.promoted_lsn
        existed = state.layout_at(promoted) if promoted else {}
        for vm in chosen:
            for disk, size in sorted(layout_at_cut[vm].items()):
                mirror = None
                if disk in existed.get(vm, {}):
                    mirror = await _mirror.required_map(store, layout, vm, disk, promoted)
                path = self._scratch / vm / f"{disk}.overlay"
                await asyncio.to_thread(_create_overlay, path)
                self._disks[(vm, disk)] = _disk.ExportDisk(
                    objects=objects,
                    vm=vm,
                    disk=disk,
                    size=size,
                    mirror=mirror,
                    journal=journals[(vm, disk)],
                    overlay_path=path,
                )
        options = self._options
        self._server = _nbd.NbdServer(
            {f"{vpg}/{vm}/{disk}": backend for (vm, disk), backend in self._disks.items()},
            host=options.host,
            port=options.port,
            tls=options.tls,
            tls_required=options.tls is not None,
        )
        await self._server.start()

    # --- what callers see -------------------------------------------------------------

    def urls(self) -> dict[tuple[str, str], str]:
        """``(vm, disk)`` -> ``nbd://host:port/<vpg>/<vm>/<disk>`` (``nbds://`` with TLS)."""
        assert self._server is not None
        host = self._options.advertise_host or self._options.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        scheme = "nbds" if self._options.tls is not None else "nbd"
        port = self._server.port
        return {
            (vm, disk): f"{scheme}://{host}:{port}/"
            + urllib.parse.quote(f"{self._vpg}/{vm}/{disk}", safe="/")
            for vm, disk in self._disks
        }

    def status(self) -> RecoveryExportStatus:
        counters = self._counters
        return RecoveryExportStatus(
            checkpoint=self.checkpoint,
            connections=self._server.connection_count if self._server is not None else 0,
            bytes_fetched=counters.bytes_fetched,
            overlay_bytes=sum(disk.written.covered for disk in self._disks.values()),
            reads=counters.reads,
            writes=counters.writes,
        )

    @property
    def scratch_path(self) -> pathlib.Path:
        """This export's private directory under ``scratch_dir`` (deleted by ``close``)."""
        return self._scratch

    # --- lifecycle --------------------------------------------------------------------

    async def close(self) -> None:
        """Stop serving (ending connections between requests), delete the scratch, release."""
        if self._closed:
            return
        self._closed = True
        await self._shutdown()

    async def _shutdown(self) -> None:
        try:
            if self._server is not None:
                await self._server.close()
            await self._object_cache.close()
            for disk in self._disks.values():
                disk.close()
            await asyncio.to_thread(shutil.rmtree, self._scratch, ignore_errors=True)
        finally:
            if self._hold is not None:
                try:
                    await self._hold.__aexit__(None, None, None)
                except _errors.StorageError as exc:
                    logger.warning(
                        "could not release hold %s (it expires by itself within %.0f s): %s",
                        self._hold.hold.hold_id,
                        HOLD_TTL_SECONDS,
                        exc,
                    )

    async def __aenter__(self) -> RecoveryExport:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def _check_options(options: RecoveryExportOptions) -> None:
    if options.cache_bytes < 0:
        raise _errors.InvalidRequest(
            f"cache_bytes={options.cache_bytes}: give the cache size in bytes (0 or more)"
        )
    if not 0 <= options.port <= 65535:
        raise _errors.InvalidRequest(f"port={options.port}: give a TCP port 0..65535 (0: any)")


def _make_scratch(scratch_dir: pathlib.Path, vpg: str) -> pathlib.Path:
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        return pathlib.Path(tempfile.mkdtemp(prefix=f"ebbtide-{vpg}-", dir=scratch_dir))
    except OSError as exc:
        raise _errors.InvalidRequest(
            f"scratch directory {str(scratch_dir)!r} is not usable for the test VMs' writes "
            f"({exc.strerror or exc}); give a writable directory with room for them"
        ) from exc


def _create_overlay(path: pathlib.Path) -> None:
    path.parent.mkdir(exist_ok=True)
    path.touch(mode=0o600, exist_ok=False)  # FileBackend extends it (sparse) to the disk size


def _choose_vms(
    vpg: str,
    checkpoint: _index.Checkpoint,
    layout: dict[str, dict[str, int]],
    vms: Sequence[str] | None,
) -> list[str]:
    if vms is None:
        return sorted(layout)
    if isinstance(vms, str):
        raise _errors.InvalidRequest(f"vms={vms!r}: give a list of VM names, not one string")
    chosen = sorted(set(vms))
    if not chosen:
        raise _errors.InvalidRequest("vms=[]: name at least one VM to export (or None for all)")
    unknown = [vm for vm in chosen if vm not in layout]
    if unknown:
        raise _errors.InvalidRequest(
            f"VPG {vpg!r} had no VM {', '.join(map(repr, unknown))} at checkpoint "
            f"{checkpoint.id}; it had: {', '.join(sorted(layout)) or 'none'}"
        )
    return chosen


class _RowsBuilder:
    """Collects one disk's journal rows while the segments are read."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray[Any, Any], ...]] = []

    def add(
        self, segment_index: int, rows: _format.JournalRows, selected: np.ndarray[Any, Any]
    ) -> None:
        offsets = rows.offset[selected].astype(np.int64)
        self.parts.append(
            (
                offsets,
                rows.length[selected].astype(np.int64),
                rows.op[selected],
                np.full(len(selected), segment_index, dtype=np.int64),
                rows.data_offsets[selected].astype(np.int64) - offsets,
            )
        )

    def build(self, size: int) -> _disk.DiskJournal:
        if not self.parts:
            none = np.zeros(0, dtype=np.int64)
            return _disk.DiskJournal(
                op=np.zeros(0, dtype=np.uint8),
                segment=none,
                base=none,
                extents=_extents.JournalExtents.empty(),
            )
        offsets, lengths, ops, segments, bases = (
            np.concatenate(c) for c in zip(*self.parts, strict=True)
        )
        return _disk.DiskJournal(
            op=ops,
            segment=segments,
            base=bases,
            extents=_extents.JournalExtents.build(offsets, lengths, size=size),
        )


async def _plan_journals(
    objects: _disk.Objects,
    state: _index.IndexState,
    checkpoint: _index.Checkpoint,
    chosen: list[str],
    layout_at_cut: dict[str, dict[str, int]],
) -> dict[tuple[str, str], _disk.DiskJournal]:
    """Read and verify the journal above the promoted LSN; one extent map per disk."""
    ranges = state.recovery_ranges(checkpoint.id, state.promoted_lsn)
    plan: list[_mirror.PlannedSegment] = []
    for vm in chosen:
        plan.extend(await _mirror.plan_vm(objects.store, objects.layout, vm, ranges))
    objects.segments = plan
    objects.previous = [0] * len(plan)
    builders = {(vm, disk): _RowsBuilder() for vm in chosen for disk in layout_at_cut[vm]}
    check = _mirror.ChainCheck()
    fetches: dict[int, asyncio.Task[bytes]] = {}
    try:
        for i, item in enumerate(plan):
            for ahead in range(i, min(i + PLAN_PREFETCH, len(plan))):
                if ahead not in fetches:
                    fetches[ahead] = asyncio.ensure_future(objects.fetch(plan[ahead].key))
            body = await fetches.pop(i)
            segment = await asyncio.to_thread(check.decode, item, body)
            objects.previous[i] = segment.previous_lsn
            rows = segment.rows
            assert item.range.end is not None
            # The checkpoint's own marker row (LSN == id) is no write: skipped by op.
            wanted = (
                (rows.lsn >= item.range.start)
                & (rows.lsn <= item.range.end)
                & (rows.op != _format.OP_CHECKPOINT)
            )
            for index, disk in enumerate(segment.disks):
                builder = builders.get((item.vm, disk))
                if builder is not None:
                    selected = np.nonzero(wanted & (rows.disk == index))[0]
                    if len(selected):
                        builder.add(i, rows, selected)
            objects.cache.put(item.key, rows, _disk.rows_size(rows))
        check.check_ends(chosen, ranges)
    finally:
        for task in fetches.values():
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*fetches.values(), return_exceptions=True)
    sizes = {(vm, disk): size for vm in chosen for disk, size in layout_at_cut[vm].items()}
    journals = {}
    for key, builder in builders.items():
        journals[key] = await asyncio.to_thread(builder.build, sizes[key])
    return journals
