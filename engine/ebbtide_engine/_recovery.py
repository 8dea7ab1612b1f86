"""Point-in-time recovery: materialise a VPG's disks at a durable checkpoint.

A reader, not a writer: it takes no lease and changes nothing the writer owns,
so it can run while the VPG is being protected. For each chosen VM it lists
the journal, keeps the segments of the epochs that count for the cut (see
``IndexState.valid_ranges``), fetches them a few at a time ahead of the one
being applied, verifies each one's checksum and its place in the VM's
segment chain (a missing or foreign segment is an error that names it,
never a silently wrong disk), and applies the rows with LSN up to the cut
in LSN order, so that where writes overlap the later one wins. TRIM and
WRITE_ZEROES become holes (zeros). Once writes were promoted, it starts from
the recovery disks at the promoted LSN (``_mirror``) and replays only the
journal above it. Output: one sparse raw image per disk,
written as ``<disk>.raw.partial`` and renamed once complete and fsynced.

Before reading anything, it places a hold (``_holds``) so that promotion
deletes none of the objects it is about to read; that hold is its only write.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import dataclasses
import datetime
import logging
import os
import pathlib
import socket
import time
from collections.abc import Callable, Sequence

import numpy as np

from ebbtide_engine import _errors, _format, _holds, _index, _keys, _lease, _mirror
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.recovery")


@dataclasses.dataclass(frozen=True, slots=True)
class CheckpointSelector:
    """Which checkpoint to recover: exactly one of latest / id / tag / before."""

    latest: bool = False
    id: int | None = None
    tag: str | None = None
    before: datetime.datetime | None = None

    def __post_init__(self) -> None:
        chosen = [self.latest, self.id is not None, self.tag is not None, self.before is not None]
        if sum(chosen) != 1:
            raise _errors.InvalidRequest(
                "choose exactly one checkpoint: latest, an id, a tag, or 'latest before' a time"
            )
        if self.before is not None and self.before.tzinfo is None:
            raise _errors.InvalidRequest(
                f"time {self.before.isoformat()} has no time zone; give one (e.g. '...Z')"
            )

    @classmethod
    def parse(cls, text: str) -> CheckpointSelector:
        """``latest``, ``id:N`` (or just ``N``), ``tag:NAME`` or ``before:ISO-TIME``."""
        kind, _, value = text.partition(":")
        if text == "latest":
            return cls(latest=True)
        if text.isdigit():
            return cls(id=int(text))
        if kind == "id" and value.isdigit():
            return cls(id=int(value))
        if kind == "tag" and value:
            return cls(tag=value)
        if kind == "before" and value:
            try:
                moment = datetime.datetime.fromisoformat(value)
            except ValueError as exc:
                raise _errors.InvalidRequest(f"{value!r} is not an ISO 8601 time") from exc
            return cls(before=moment)
        raise _errors.InvalidRequest(
            f"{text!r}: say 'latest', 'id:N', 'tag:NAME' or 'before:2026-11-22T10:00:00Z'"
        )

    def describe(self) -> str:
        """What was asked for, to complete "VPG 'x' has no ..."."""
        if self.latest:
            return "durable checkpoint"
        if self.id is not None:
            return f"checkpoint with id {self.id}"
        if self.tag is not None:
            return f"checkpoint tagged {self.tag!r}"
        assert self.before is not None
        return f"checkpoint taken at or before {_when(self.before)}"


def _when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def select(state: _index.IndexState, selector: CheckpointSelector) -> _index.Checkpoint:
    """Find the checkpoint ``selector`` names, or raise CheckpointNotFound saying what exists."""
    found: _index.Checkpoint | None = None
    if selector.latest:
        found = state.last_checkpoint
    elif selector.id is not None:
        found = state.checkpoint(selector.id)
    elif selector.tag is not None:
        found = next((c for c in reversed(state.checkpoints) if c.tag == selector.tag), None)
    elif selector.before is not None:
        found = state.latest_before(int(selector.before.timestamp() * 1e9))
    if found is not None:
        return found
    if not state.checkpoints:
        raise _errors.CheckpointNotFound(
            f"VPG {state.vpg!r} has no durable checkpoint yet; wait for the first one"
        )
    first, last = state.checkpoints[0], state.checkpoints[-1]
    tags = sorted({c.tag for c in state.checkpoints if c.tag})
    raise _errors.CheckpointNotFound(
        f"VPG {state.vpg!r} has no {selector.describe()}. Available: {len(state.checkpoints)} "
        f"checkpoints, ids {first.id}..{last.id}, {_when(first.time)} .. "
        f"{_when(last.time)}" + (f"; tags: {', '.join(tags)}" if tags else "")
    )


async def read_index(store: _base.ObjectStore, vpg: str) -> _index.IndexState:
    """The durable index of ``vpg``; raises CheckpointNotFound if the VPG was never written."""
    layout = _keys.VpgLayout(vpg)
    state, manifest = await _index.load(store, layout)
    if manifest is None:
        raise _errors.CheckpointNotFound(
            f"{store.description} holds no VPG named {vpg!r} (no {layout.manifest})"
        )
    return state


async def list_checkpoints(store: _base.ObjectStore, vpg: str) -> list[_index.Checkpoint]:
    """Every durable checkpoint of ``vpg``, oldest first (reads the bucket, takes no lease)."""
    return list((await read_index(store, vpg)).checkpoints)


@dataclasses.dataclass(frozen=True, slots=True)
class JournalUsage:
    segments: int = 0
    bytes: int = 0
    first_lsn: int | None = None
    last_lsn: int | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class BucketStatus:
    """What a reader can tell about a VPG from its storage account alone."""

    vpg: str
    storage: str
    manifest: _lease.Manifest
    checkpoints: list[_index.Checkpoint]
    journals: dict[str, JournalUsage]


async def read_bucket_status(store: _base.ObjectStore, vpg: str) -> BucketStatus:
    """Manifest, checkpoints and journal sizes of ``vpg``; takes no lease, writes nothing."""
    layout = _keys.VpgLayout(vpg)
    manifest = await _lease.read_manifest(store, layout)
    if manifest is None:
        raise _errors.CheckpointNotFound(
            f"{store.description} holds no VPG named {vpg!r} (no {layout.manifest})"
        )
    checkpoints = await list_checkpoints(store, vpg)
    journals: dict[str, JournalUsage] = collections.defaultdict(JournalUsage)
    async for info in store.list(layout.journals_prefix):
        name = layout.parse_segment(info.key)
        usage = journals[name.vm]
        journals[name.vm] = JournalUsage(
            segments=usage.segments + 1,
            bytes=usage.bytes + info.size,
            first_lsn=name.first_lsn if usage.first_lsn is None else usage.first_lsn,
            last_lsn=name.last_lsn,
        )
    return BucketStatus(
        vpg=vpg,
        storage=store.description,
        manifest=manifest,
        checkpoints=checkpoints,
        journals=dict(sorted(journals.items())),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveredDisk:
    vm: str
    disk: str
    path: pathlib.Path
    size: int


@dataclasses.dataclass(frozen=True, slots=True)
class RecoveryResult:
    vpg: str
    checkpoint: _index.Checkpoint
    disks: list[RecoveredDisk]
    segments_read: int
    bytes_read: int
    seconds: float


Progress = Callable[[int, int], None]  # (bytes read so far, bytes to read in all)


def default_hold_owner() -> str:
    """``cli/<host>/<pid>``: who holds the VPG while this process recovers."""
    return f"cli/{socket.gethostname()}/{os.getpid()}"


async def recover_to_files(
    store: _base.ObjectStore,
    vpg: str,
    selector: CheckpointSelector,
    out_dir: pathlib.Path,
    *,
    vms: Sequence[str] | None = None,
    prefetch: int = 4,
    progress: Progress | None = None,
    hold_owner: str | None = None,
    hold_purpose: str = "restore",
    hold_seconds: float = 600.0,
) -> RecoveryResult:
    """Write ``out_dir/<vm>/<disk>.raw`` for the chosen VMs (default all) at the checkpoint.

    Places a hold on the VPG first (``_holds``; renewed while reading,
    released at the end), so that promotion deletes none of the objects it
    reads. If the account refuses the hold (read-only credentials), recovery
    goes on without one; should promotion then delete what it reads, it fails
    with :class:`PromotedDuringRead` (start again) instead of a bare "not found".
    """
    try:
        hold: _holds.HoldLease | None = await _holds.place_hold(
            store,
            vpg,
            owner=hold_owner or default_hold_owner(),
            purpose=hold_purpose,
            ttl_seconds=hold_seconds,
        )
    except _errors.AccessDenied as exc:
        logger.warning("VPG %s: recovering without a hold (%s)", vpg, exc)
        hold = None
    if hold is None:
        return await _recover(store, vpg, selector, out_dir, vms, prefetch, progress)
    async with hold:
        return await _recover(store, vpg, selector, out_dir, vms, prefetch, progress)


async def _recover(
    store: _base.ObjectStore,
    vpg: str,
    selector: CheckpointSelector,
    out_dir: pathlib.Path,
    vms: Sequence[str] | None,
    prefetch: int,
    progress: Progress | None,
) -> RecoveryResult:
    started = time.monotonic()
    layout = _keys.VpgLayout(vpg)
    state = await read_index(store, vpg)
    checkpoint = select(state, selector)
    disks = state.layout_at(checkpoint.id)
    chosen = sorted(disks) if vms is None else list(vms)
    unknown = [vm for vm in chosen if vm not in disks]
    if unknown:
        raise _errors.InvalidRequest(
            f"VPG {vpg!r} had no VM {', '.join(map(repr, unknown))} at checkpoint "
            f"{checkpoint.id}; it had: {', '.join(sorted(disks))}"
        )
    promoted = state.promoted_lsn
    ranges = state.recovery_ranges(checkpoint.id, promoted)
    plan = [item for vm in chosen for item in await _mirror.plan_vm(store, layout, vm, ranges)]
    total = sum(item.size for item in plan)
    files = _DiskFiles(out_dir, {vm: disks[vm] for vm in chosen})
    done = 0
    fetches: dict[int, asyncio.Task[_base.StoredObject]] = {}
    try:
        if promoted:  # start from the recovery disks at the promoted LSN
            existed = state.layout_at(promoted)
            for (vm, disk), fd in files.fds.items():
                if disk in existed.get(vm, {}):
                    mirror = await _mirror.required_map(store, layout, vm, disk, promoted)
                    await _mirror.materialise(store, layout, mirror, fd, files.sizes[(vm, disk)])
        for i, item in enumerate(plan):
            for ahead in range(i, min(i + prefetch, len(plan))):
                if ahead not in fetches:
                    fetches[ahead] = asyncio.ensure_future(store.get(plan[ahead].key))
            stored = await fetches.pop(i)
            await asyncio.to_thread(_apply, item, stored.data, files)
            done += item.size
            if progress is not None:
                progress(done, total)
        _check_chain_ends(plan, chosen, ranges)
        result_disks = await asyncio.to_thread(files.commit)
    except BaseException as exc:
        for task in fetches.values():
            task.cancel()
        files.discard()
        if isinstance(exc, (_errors.ObjectNotFound, _errors.CorruptObjectError)):
            await _raise_if_promoted_meanwhile(store, layout, promoted, exc)
        raise
    return RecoveryResult(
        vpg=vpg,
        checkpoint=checkpoint,
        disks=result_disks,
        segments_read=len(plan),
        bytes_read=total,
        seconds=time.monotonic() - started,
    )


async def _raise_if_promoted_meanwhile(
    store: _base.ObjectStore, layout: _keys.VpgLayout, planned: int, exc: _errors.EbbtideError
) -> None:
    """A missing object because promotion moved past the planned base: say so (retry)."""
    try:
        manifest = await _lease.read_manifest(store, layout)
    except _errors.EbbtideError:
        return
    if manifest is not None and manifest.promoted_lsn > planned:
        what = repr(exc.key) if isinstance(exc, _errors.CorruptObjectError) else str(exc)
        raise _holds.PromotedDuringRead(layout.vpg, what) from exc


class _DiskFiles:
    """The output images being written, opened once, renamed into place at the end."""

    def __init__(self, out_dir: pathlib.Path, layout: dict[str, dict[str, int]]) -> None:
        self.fds: dict[tuple[str, str], int] = {}
        self.paths: dict[tuple[str, str], pathlib.Path] = {}
        self.sizes: dict[tuple[str, str], int] = {}
        self.chain: dict[tuple[str, int], int] = {}  # (vm, epoch) -> last LSN applied
        for vm, disks in layout.items():
            (out_dir / vm).mkdir(parents=True, exist_ok=True)
            for disk, size in disks.items():
                path = out_dir / vm / f"{disk}.raw"
                partial = path.with_name(path.name + ".partial")
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                os.ftruncate(fd, size)  # sparse: unwritten ranges read as zeros
                self.fds[(vm, disk)] = fd
                self.paths[(vm, disk)] = path
                self.sizes[(vm, disk)] = size

    def commit(self) -> list[RecoveredDisk]:
        result = []
        for key, fd in self.fds.items():
            os.fsync(fd)
            os.close(fd)
            path = self.paths[key]
            os.replace(path.with_name(path.name + ".partial"), path)
            result.append(RecoveredDisk(vm=key[0], disk=key[1], path=path, size=self.sizes[key]))
        for directory in {path.parent for path in self.paths.values()}:
            _fsync_dir(directory)
        self.fds.clear()
        return result

    def discard(self) -> None:
        for key, fd in self.fds.items():
            os.close(fd)
            path = self.paths[key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.with_name(path.name + ".partial"))
        self.fds.clear()


def _apply(item: _mirror.PlannedSegment, body: bytes, files: _DiskFiles) -> None:
    segment = _mirror.decode_segment(item, body)
    name = item.name
    chain_key = (item.vm, name.epoch)
    expected = files.chain.get(chain_key, (item.range.start_positions or {}).get(item.vm, 0))
    if segment.previous_lsn != expected:
        raise _errors.CorruptObjectError(
            item.key,
            f"journal chain broken: it follows LSN {segment.previous_lsn}, but the last segment "
            f"found for VM {item.vm!r} (epoch {name.epoch}) ends at {expected}; "
            "a segment is missing from the bucket",
        )
    files.chain[chain_key] = segment.last_lsn
    rows = segment.rows
    assert item.range.end is not None
    selected = np.nonzero((rows.lsn >= item.range.start) & (rows.lsn <= item.range.end))[0]
    fds = [files.fds.get((item.vm, disk)) for disk in segment.disks]
    for i in selected.tolist():
        op = int(rows.op[i])
        if op == _format.OP_CHECKPOINT:
            continue
        fd = fds[int(rows.disk[i])]
        if fd is None:
            continue  # a disk that no longer exists at this checkpoint
        offset = int(rows.offset[i])
        if op == _format.OP_WRITE:
            os.pwrite(
                fd, rows.data[int(rows.data_offsets[i]) : int(rows.data_offsets[i + 1])], offset
            )
        else:
            _zero(fd, offset, int(rows.length[i]))


def _check_chain_ends(
    plan: list[_mirror.PlannedSegment], vms: list[str], ranges: list[_index.EpochRange]
) -> None:
    """Every VM's journal must reach the position the cut recorded for it."""
    last: dict[tuple[str, int], int] = {}
    for item in plan:
        last[(item.vm, item.name.epoch)] = item.name.last_lsn
    for r in ranges:
        for vm in vms:
            want = (r.end_positions or {}).get(vm, 0)
            have = last.get((vm, r.epoch), (r.start_positions or {}).get(vm, 0))
            if want != have:
                raise _errors.CorruptObjectError(
                    f"journal of VM {vm!r}",
                    f"checkpoint {r.end} needs its writes up to LSN {want} (epoch {r.epoch}) but "
                    f"the segments in the bucket end at {have}; a segment is missing",
                )


_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ZEROS = bytes(1 << 20)


def _zero(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` read as zeros: punch a hole, else write zeros."""
    flags = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, flags, ctypes.c_int64(offset), ctypes.c_int64(length)) == 0:
        return
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, _ZEROS[: min(len(_ZEROS), end - offset)], offset)


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
