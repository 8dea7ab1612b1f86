"""The checkpoint index: an append-only log of Arrow entries plus snapshots.

The index is how a checkpoint becomes durable and listable. It is a linear
log, ``index/log/<seq>.arrow``, each entry written create-only with the
next sequence number, so appends are totally ordered and two writers can
never both append entry ``n`` (the loser is fenced). Entries hold records
(FORMAT.md, "Checkpoint index"):

- ``config``: the VMs and disk sizes from an LSN on (recovery needs no spec);
- ``takeover``: a writer started epoch ``e`` at LSN ``start``; writes of
  older epochs above ``valid_through`` (the last committed cut) are void;
- ``checkpoint``: a committed VPG-wide cut (its LSN is its id);
- ``shutdown``: the writer stopped cleanly after committing everything.

Every so often the writer compacts: it writes ``index/snapshot/<seq>.arrow``
with every record up to ``seq``, points the manifest at it (compare-and-swap,
so a fenced writer cannot), then deletes log entries below ``seq``. A reader
loads the manifest's snapshot and the log entries after it. Nothing is
ever overwritten.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime
import enum
import json
import logging
import random
from collections.abc import Iterable, Sequence

from ebbtide_engine import _errors, _format, _keys, _lease
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.index")


class CheckpointKind(enum.IntEnum):
    """Why a checkpoint was taken (stored as uint8 in the index)."""

    AUTOMATIC = 0
    TAGGED = 1
    APPLICATION_CONSISTENT = 2
    FAILOVER_TEST = 3


_KINDS = {int(kind): kind for kind in CheckpointKind}  # a dict lookup, not an enum call


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A durable, VPG-wide cut: recovery to it yields every write with LSN < ``id``.

    The id is the checkpoint marker's own LSN, so ids are unique and ordered
    like the writes they follow.
    """

    id: int
    time_ns: int
    kind: CheckpointKind
    tag: str | None
    epoch: int

    @property
    def time(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.time_ns / 1e9, tz=datetime.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class EpochRange:
    """LSNs whose writes from ``epoch`` count: ``start <= lsn <= end`` (end None: open)."""

    epoch: int
    start: int
    end: int | None
    #: per-VM journal positions at ``end`` (from the takeover that closed the epoch)
    end_positions: dict[str, int] | None = None
    #: per-VM positions the segment chains start from (promotion: the positions at the
    #: promoted LSN); None: every chain starts at 0
    start_positions: dict[str, int] | None = None


class IndexState:
    """The records of an index in sequence order, and views derived from them."""

    def __init__(self, vpg: str) -> None:
        self.vpg = vpg
        self.records: list[_format.IndexRecord] = []
        self.last_seq = 0
        self.checkpoints: list[Checkpoint] = []
        self._checkpoint_ids: list[int] = []
        self._checkpoint_times: list[int] = []  # parallel to the ids (bisect, dilution)
        self._checkpoint_kinds: list[int] = []
        self._times_sorted = True  # False if a clock went backwards: lookups scan instead
        self.positions: dict[int, dict[str, int]] = {}  # checkpoint id -> per-VM positions
        self.epochs: list[EpochRange] = []
        self.configs: list[tuple[int, dict[str, dict[str, int]]]] = []  # (from lsn, layout)
        self.clean_shutdown: bool | None = None  # None: nothing written yet
        self.max_lsn = 0
        self.protected_since_ns: int | None = None  # time of the first takeover record
        self.promotions: dict[int, dict[str, int]] = {}  # promoted LSN -> positions there
        #: promoted LSN -> VMs whose journal hard limit moved that promotion forward
        self.promoted_early: dict[int, list[str]] = {}
        self.promoted_lsn = 0  # from the manifest: checkpoints below it are not listed

    def apply(self, records: Iterable[_format.IndexRecord]) -> None:
        for record in records:
            self.records.append(record)
            if record.seq > self.last_seq:
                self.last_seq = record.seq
            if record.lsn > self.max_lsn:
                self.max_lsn = record.lsn
            if record.record == _format.RECORD_CHECKPOINT:
                kind = _KINDS.get(record.kind)
                checkpoint = Checkpoint(
                    id=record.lsn,
                    time_ns=record.time_ns,
                    kind=CheckpointKind(record.kind) if kind is None else kind,
                    tag=record.tag,
                    epoch=record.epoch,
                )
                if self._checkpoint_ids and checkpoint.id <= self._checkpoint_ids[-1]:
                    raise _errors.CorruptObjectError(
                        f"index entry {record.seq}", f"checkpoint {checkpoint.id} is out of order"
                    )
                self.checkpoints.append(checkpoint)
                self._checkpoint_ids.append(checkpoint.id)
                if self._checkpoint_times and checkpoint.time_ns < self._checkpoint_times[-1]:
                    self._times_sorted = False
                self._checkpoint_times.append(checkpoint.time_ns)
                self._checkpoint_kinds.append(int(checkpoint.kind))
                self.positions[checkpoint.id] = dict(record.positions or ())
                self.clean_shutdown = False
            elif record.record == _format.RECORD_TAKEOVER:
                valid_through = int(record.detail_json()["valid_through"])
                closing = dict(record.positions or ())
                self.epochs = [
                    r
                    if r.end is not None
                    else dataclasses.replace(r, end=valid_through, end_positions=closing)
                    for r in self.epochs
                ]
                self.epochs.append(EpochRange(epoch=record.epoch, start=record.lsn, end=None))
                self.clean_shutdown = False
                if self.protected_since_ns is None:
                    self.protected_since_ns = record.time_ns
            elif record.record == _format.RECORD_CONFIG:
                self.configs.append((record.lsn, record.detail_json()["vms"]))
            elif record.record == _format.RECORD_SHUTDOWN:
                self.clean_shutdown = True
            elif record.record == _format.RECORD_PROMOTION:
                self.promotions[record.lsn] = dict(record.positions or ())
                early = record.detail_json().get("early_for")
                if early:
                    self.promoted_early[record.lsn] = [str(vm) for vm in early]

    def prune_below(self, promoted_lsn: int) -> None:
        """Stop listing checkpoints below ``promoted_lsn`` (their writes are in the mirror)."""
        self.promoted_lsn = max(self.promoted_lsn, promoted_lsn)
        cut = bisect.bisect_left(self._checkpoint_ids, self.promoted_lsn)
        if cut:
            del self.checkpoints[:cut]
            del self._checkpoint_ids[:cut]
            del self._checkpoint_times[:cut]
            del self._checkpoint_kinds[:cut]

    def checkpoint_columns(self) -> tuple[list[int], list[int], list[int]]:
        """(ids, times in ns, kinds) of the listed checkpoints, oldest first (do not modify)."""
        return self._checkpoint_ids, self._checkpoint_times, self._checkpoint_kinds

    @property
    def times_sorted(self) -> bool:
        """Whether checkpoint times ascend with ids (False if a clock went backwards)."""
        return self._times_sorted

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def checkpoint(self, checkpoint_id: int) -> Checkpoint | None:
        index = bisect.bisect_left(self._checkpoint_ids, checkpoint_id)
        if index < len(self._checkpoint_ids) and self._checkpoint_ids[index] == checkpoint_id:
            return self.checkpoints[index]
        return None

    def latest_before(self, time_ns: int) -> Checkpoint | None:
        """The newest checkpoint taken at or before ``time_ns``."""
        if self._times_sorted:
            index = bisect.bisect_right(self._checkpoint_times, time_ns)
            return self.checkpoints[index - 1] if index else None
        best = None
        for checkpoint in reversed(self.checkpoints):
            if checkpoint.time_ns <= time_ns:
                best = checkpoint
                break
        return best

    def layout_at(self, lsn: int) -> dict[str, dict[str, int]]:
        """The VMs and disk sizes in force at ``lsn``."""
        layout: dict[str, dict[str, int]] = {}
        for start, vms in self.configs:
            if start > lsn:
                break
            layout = vms
        return layout

    def valid_ranges(self, cut: int) -> list[EpochRange]:
        """The epochs whose writes recovery to checkpoint ``cut`` uses, each cut to size.

        ``end_positions`` of each returned range are the per-VM journal
        positions at its end, which recovery checks the segment chain against.
        """
        ranges = []
        for r in self.epochs:
            if r.end is None or r.end >= cut:
                if r.start <= cut:
                    ranges.append(
                        dataclasses.replace(r, end=cut, end_positions=self.positions.get(cut, {}))
                    )
                break
            if r.start <= r.end:
                ranges.append(r)
        return ranges

    def recovery_ranges(self, cut: int, promoted_lsn: int) -> list[EpochRange]:
        """:meth:`valid_ranges` above ``promoted_lsn`` (the recovery disks hold the rest)."""
        ranges = self.valid_ranges(cut)
        if promoted_lsn == 0:
            return ranges
        positions = self.promotions.get(promoted_lsn)
        if positions is None:
            raise _errors.CorruptObjectError(
                f"index of VPG {self.vpg!r}",
                f"the manifest says LSN {promoted_lsn} was promoted, but the index has no "
                "promotion record for it",
            )
        result = []
        for r in ranges:
            assert r.end is not None
            if r.end <= promoted_lsn:
                continue  # every write of this range is in the recovery disks
            if r.start <= promoted_lsn:
                r = dataclasses.replace(r, start=promoted_lsn + 1, start_positions=positions)
            result.append(r)
        return result


async def put_new_idempotent(store: _base.ObjectStore, key: str, data: bytes) -> bool:
    """Create-only put that treats "exists with the same bytes" as success.

    Returns False if the key holds *other* bytes (another writer got there).
    A retried put whose first attempt did land but whose reply was lost
    must not look like a conflict.
    """
    try:
        await store.put_new(key, data)
    except _errors.ObjectExists:
        try:
            existing = await store.get(key)
        except _errors.ObjectNotFound:
            return False
        return existing.data == data
    return True


async def load(
    store: _base.ObjectStore, layout: _keys.VpgLayout, *, attempts: int = 5
) -> tuple[IndexState, _lease.Manifest | None]:
    """Read the index as a reader: manifest -> snapshot -> log entries after it.

    Retries when a concurrent compaction moved the snapshot under it.
    """
    for attempt in range(attempts):
        manifest = await _lease.read_manifest(store, layout)
        try:
            state = await _load_once(store, layout, manifest)
            state.prune_below(manifest.promoted_lsn if manifest else 0)
            return state, manifest
        except _MovedUnderUs:
            if attempt == attempts - 1:
                raise _errors.StorageUnavailable(
                    f"{store.description}: the index of VPG {layout.vpg!r} kept changing while "
                    "being read (compaction racing the reader); try again"
                ) from None
    raise AssertionError("unreachable")


class _MovedUnderUs(Exception):
    pass


async def _load_once(
    store: _base.ObjectStore, layout: _keys.VpgLayout, manifest: _lease.Manifest | None
) -> IndexState:
    state = IndexState(layout.vpg)
    start_after = None
    snapshot_seq = manifest.index_snapshot_seq if manifest else None
    if snapshot_seq is not None:
        key = layout.index_snapshot(snapshot_seq)
        try:
            stored = await store.get(key)
        except _errors.ObjectNotFound:
            raise _MovedUnderUs from None
        state.apply(
            _format.decode_index(
                key, stored.data, vpg=layout.vpg, fmt="index-snapshot", seq=snapshot_seq
            )
        )
        state.last_seq = snapshot_seq
        start_after = layout.index_log_entry(snapshot_seq)
    expected = state.last_seq + 1
    async for info in store.list(layout.index_log_prefix, start_after=start_after):
        seq = layout.parse_index_seq(info.key)
        if seq != expected:
            if snapshot_seq is not None or seq < expected:
                raise _MovedUnderUs
            raise _errors.CorruptObjectError(
                layout.index_log_entry(expected),
                f"index log entry {expected} is missing (found {seq} next); "
                "checkpoints after it cannot be trusted",
            )
        try:
            stored = await store.get(info.key)
        except _errors.ObjectNotFound:
            raise _MovedUnderUs from None
        state.apply(
            _format.decode_index(info.key, stored.data, vpg=layout.vpg, fmt="index-log", seq=seq)
        )
        expected += 1
    return state


class IndexWriter:
    """Appends to the log as the lease holder, and compacts it."""

    def __init__(
        self,
        store: _base.ObjectStore,
        layout: _keys.VpgLayout,
        lease: _lease.WriterLease,
        state: IndexState,
        *,
        compact_every: int = 256,
    ) -> None:
        self._store = store
        self._layout = layout
        self._lease = lease
        self.state = state
        self._compact_every = compact_every
        self._snapshots = asyncio.Lock()  # one compaction or rewrite at a time
        self._appends = asyncio.Lock()  # the committer and a rewrite both append

    async def append(self, records: Sequence[_format.IndexRecord]) -> int:
        """Commit ``records`` as the next log entry; raises FencedError on a conflict.

        A StorageError means the entry may or may not have landed: retry with
        the same records (the retry recognises its own bytes). A compaction
        that fails afterwards is not an append failure (retrying the append
        would commit the records twice); it is tried again after a later one.
        """
        await self._append_or_fence(records)
        snapshot = self._lease.manifest.index_snapshot_seq or 0
        if self.state.last_seq - snapshot >= self._compact_every:
            try:
                await self.compact()
            except _errors.FencedError:
                raise
            except _errors.StorageError as exc:
                logger.warning(
                    "VPG %s: index compaction failed (retried later): %s", self.state.vpg, exc
                )
        return self.state.last_seq

    async def append_retrying(
        self, records: Sequence[_format.IndexRecord], *, delay: float = 0.05, limit: float = 5.0
    ) -> int:
        """:meth:`append`, retried with backoff on storage errors until it lands or is fenced.

        Any appender other than the committer must use this: giving up after
        an append whose reply was lost would leave an entry the next append
        collides with (and takes for another writer's).
        """
        while True:
            try:
                return await self.append(records)
            except _errors.FencedError:
                raise
            except _errors.StorageError as exc:
                logger.warning("VPG %s: %s; retrying in %.2f s", self.state.vpg, exc, delay)
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, limit)

    async def _append_or_fence(self, records: Sequence[_format.IndexRecord]) -> None:
        if self._lease.lost is not None:
            raise self._lease.lost
        if not await self.try_append(records):
            error = _errors.FencedError(
                f"VPG {self._layout.vpg!r}: index entry {self.state.last_seq + 1} was written by "
                f"another writer; this writer (epoch {self._lease.epoch}) is fenced off and "
                "stops. The other writer now protects the VPG."
            )
            self._lease.fence(error)
            raise error

    async def try_append(self, records: Sequence[_format.IndexRecord]) -> bool:
        """Append ``records`` as entry ``last_seq + 1``; False if that entry is taken."""
        async with self._appends:
            seq = self.state.last_seq + 1
            stamped = [dataclasses.replace(record, seq=seq) for record in records]
            body = _format.encode_index(stamped, vpg=self._layout.vpg, fmt="index-log", seq=seq)
            if not await put_new_idempotent(self._store, self._layout.index_log_entry(seq), body):
                return False
            self.state.apply(stamped)
            return True

    async def compact(self) -> None:
        """Snapshot every record so far, point the manifest at it, drop older log entries."""
        async with self._snapshots:
            seq = self.state.last_seq
            previous = self._lease.manifest.index_snapshot_seq
            if seq == 0 or previous == seq:
                return
            body = _format.encode_index(
                self.state.records, vpg=self._layout.vpg, fmt="index-snapshot", seq=seq
            )
            await put_new_idempotent(self._store, self._layout.index_snapshot(seq), body)
            await self._lease.update(lambda m: dataclasses.replace(m, index_snapshot_seq=seq))
            await self._delete_before(seq, previous)

    async def rewrite(
        self,
        *,
        drop: Iterable[int] = (),
        below: int = 0,
        reason: str,
        time_ns: int,
    ) -> int:
        """Rewrite the index without the checkpoints ``drop`` and those with id < ``below``.

        Dilution and the end of the history window use it. Never exposes a
        half-written index: a marker record is appended first (so the
        snapshot's sequence number is fresh and this writer's alone), then the
        snapshot with every other record is created, then the manifest is
        switched to it by compare-and-swap (a fenced writer cannot), and only
        then are older log entries deleted; the previous snapshot stays for
        readers that loaded the old manifest. Config, takeover and the
        current promotion records are always kept. Returns the snapshot's seq.
        """
        dropped = set(drop)
        async with self._snapshots:
            promoted = self._lease.manifest.promoted_lsn
            marker = _format.IndexRecord(
                record=_format.RECORD_REWRITE,
                seq=0,
                lsn=self.state.max_lsn,
                time_ns=time_ns,
                epoch=self._lease.epoch,
                detail=json.dumps(
                    {"reason": reason, "dropped": len(dropped), "below": below}, sort_keys=True
                ),
            )
            delay = 0.05
            while True:  # as in append_retrying (a lost reply must be retried, not abandoned)
                try:
                    await self._append_or_fence([marker])
                    break
                except _errors.FencedError:
                    raise
                except _errors.StorageError:
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, 5.0)
            seq = self.state.last_seq
            previous = self._lease.manifest.index_snapshot_seq

            def kept(record: _format.IndexRecord) -> bool:
                if record.record == _format.RECORD_CHECKPOINT:
                    return record.lsn >= below and record.lsn not in dropped
                if record.record == _format.RECORD_PROMOTION:
                    return record.lsn >= promoted
                return record.record != _format.RECORD_REWRITE or record.seq == seq

            records = [r for r in self.state.records if r.seq <= seq and kept(r)]
            body = await asyncio.to_thread(
                _format.encode_index, records, vpg=self._layout.vpg, fmt="index-snapshot", seq=seq
            )
            if not await put_new_idempotent(self._store, self._layout.index_snapshot(seq), body):
                raise _errors.CorruptObjectError(
                    self._layout.index_snapshot(seq),
                    "holds another index snapshot although this writer appended entry "
                    f"{seq}; refusing to switch the index to it",
                )
            await self._lease.update(lambda m: dataclasses.replace(m, index_snapshot_seq=seq))
            # No await from here until the new state is in place: appends made
            # meanwhile (seq > snapshot) are carried over.
            state = IndexState(self._layout.vpg)
            state.apply(records)
            state.last_seq = seq
            state.apply(r for r in self.state.records if r.seq > seq)
            state.prune_below(self._lease.manifest.promoted_lsn)
            self.state = state
            await self._delete_before(seq, previous)
            return seq

    async def _delete_before(self, seq: int, previous: int | None) -> None:
        # Keep entry `seq` itself: a fenced writer re-creating deleted entries
        # runs into it, and readers start after it anyway.
        async for info in self._store.list(self._layout.index_log_prefix):
            if self._layout.parse_index_seq(info.key) >= seq:
                break
            await self._store.delete(info.key)
        # Keep the previous snapshot for readers that loaded the old manifest.
        async for info in self._store.list(self._layout.index_snapshot_prefix):
            old = self._layout.parse_index_seq(info.key)
            if previous is None or old >= previous:
                break
            await self._store.delete(info.key)


def config_record(
    lsn: int, time_ns: int, epoch: int, vms: dict[str, dict[str, int]]
) -> _format.IndexRecord:
    return _format.IndexRecord(
        record=_format.RECORD_CONFIG,
        seq=0,
        lsn=lsn,
        time_ns=time_ns,
        epoch=epoch,
        detail=json.dumps({"vms": vms}, sort_keys=True),
    )
