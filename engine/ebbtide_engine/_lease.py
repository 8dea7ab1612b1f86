"""The VPG manifest and the writer lease it carries (fencing of a second writer).

``vpgs/<vpg>/manifest.json`` is the one object Ebbtide ever overwrites, and
only with compare-and-swap (``put_if_match``). It holds what a LIST cannot
tell: the writer epoch (a fencing token, bumped by every writer that
starts), who holds the lease, and which index snapshot is current. Its
JSON shape is in FORMAT.md.

A writer acquires the lease before it writes anything and renews it every
``lease_seconds / 3``. A second writer that finds the lease held waits for
it to stop changing for ``lease_seconds`` (judged on its own monotonic
clock, so clock skew between nodes does not matter) and then takes over;
with ``takeover="fail"`` it raises :class:`FencedError` at once, and with
``"force"`` it takes over immediately (for when the caller knows the other
writer is dead). A writer that was taken over from finds out at its next
renewal or index append, raises :class:`FencedError`, and can never make the
new writer's data unreadable: every object it might still write carries its
old epoch, which readers ignore above the cut recorded at takeover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ebbtide_engine import _errors, _keys
from ebbtide_engine.storage import _base

MANIFEST_FORMAT = "ebbtide.manifest"
MANIFEST_VERSION = 1

Takeover = Literal["wait", "fail", "force"]


@dataclasses.dataclass(frozen=True, slots=True)
class Manifest:
    vpg: str
    epoch: int
    writer: str | None  # None: released cleanly
    lease_seconds: float
    renewed_at: float  # informational (wall clock of the holder)
    index_snapshot_seq: int | None = None
    promoted_lsn: int = 0

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            **dataclasses.asdict(self),
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, key: str, data: bytes) -> Manifest:
        try:
            body = json.loads(data)
            if body.pop("format") != MANIFEST_FORMAT:
                raise ValueError("not an Ebbtide manifest")
            version = body.pop("version")
            if version != MANIFEST_VERSION:
                raise _errors.CorruptObjectError(
                    key, f"manifest version {version} is not supported; upgrade Ebbtide"
                )
            return cls(**body)
        except (ValueError, KeyError, TypeError) as exc:
            raise _errors.CorruptObjectError(key, f"unreadable manifest ({exc})") from exc


def default_writer_id() -> str:
    return f"{socket.gethostname()}/pid-{os.getpid()}/{uuid.uuid4().hex[:8]}"


async def read_manifest(store: _base.ObjectStore, layout: _keys.VpgLayout) -> Manifest | None:
    """The current manifest, or None if the VPG has never been written."""
    try:
        stored = await store.get(layout.manifest)
    except _errors.ObjectNotFound:
        return None
    return Manifest.from_json(layout.manifest, stored.data)


class WriterLease:
    """This process's hold on a VPG. All manifest updates go through it."""

    def __init__(
        self, store: _base.ObjectStore, layout: _keys.VpgLayout, manifest: Manifest, etag: str
    ) -> None:
        self._store = store
        self._layout = layout
        self.manifest = manifest
        self._etag = etag
        self._lock = asyncio.Lock()
        self.lost: _errors.FencedError | None = None
        #: time.monotonic() until which a writer this one forced out may still be deleting
        #: garbage (see :meth:`confirm`); promotion waits for it before storing chunks
        self.foreign_deletions_until = 0.0

    @property
    def epoch(self) -> int:
        return self.manifest.epoch

    @classmethod
    async def acquire(
        cls,
        store: _base.ObjectStore,
        layout: _keys.VpgLayout,
        writer_id: str,
        *,
        lease_seconds: float = 15.0,
        takeover: Takeover = "wait",
        acquire_timeout: float | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> WriterLease:
        """Become the VPG's writer with a new epoch; see the module docstring.

        With ``takeover="wait"``, gives up with FencedError after
        ``acquire_timeout`` seconds (default: three of the holder's lease
        periods) of a holder that keeps renewing.
        """
        watched: tuple[str, float] | None = None  # (etag, monotonic time first seen)
        started = monotonic()
        while True:
            try:
                stored = await store.get(layout.manifest)
            except _errors.ObjectNotFound:
                fresh = Manifest(
                    vpg=layout.vpg,
                    epoch=1,
                    writer=writer_id,
                    lease_seconds=lease_seconds,
                    renewed_at=clock(),
                )
                try:
                    info = await store.put_new(layout.manifest, fresh.to_json())
                except _errors.ObjectExists:
                    continue  # another writer created it first; look again
                return cls(store, layout, fresh, info.etag)
            current = Manifest.from_json(layout.manifest, stored.data)
            expired = (
                watched is not None
                and watched[0] == stored.etag
                and (monotonic() - watched[1] >= current.lease_seconds)
            )
            if current.writer is not None and takeover != "force" and not expired:
                patience = 3 * current.lease_seconds if acquire_timeout is None else acquire_timeout
                if takeover == "fail" or monotonic() - started > patience:
                    raise _errors.FencedError(_held_message(layout, current))
                if watched is None or watched[0] != stored.etag:
                    watched = (stored.etag, monotonic())
                await sleep(min(1.0, current.lease_seconds / 4))
                continue
            taken = dataclasses.replace(
                current,
                epoch=current.epoch + 1,
                writer=writer_id,
                lease_seconds=lease_seconds,
                renewed_at=clock(),
            )
            try:
                info = await store.put_if_match(layout.manifest, taken.to_json(), etag=stored.etag)
            except _errors.PreconditionFailed:
                watched = None
                continue  # it changed under us: someone renewed or took over; look again
            lease = cls(store, layout, taken, info.etag)
            if current.writer is not None and not expired:  # forced over a live-looking lease
                lease.foreign_deletions_until = time.monotonic() + current.lease_seconds / 2
            return lease

    async def update(self, change: Callable[[Manifest], Manifest]) -> Manifest:
        """Compare-and-swap the manifest; raises FencedError if another writer took over."""
        async with self._lock:
            if self.lost is not None:
                raise self.lost
            new = change(self.manifest)
            try:
                info = await self._store.put_if_match(
                    self._layout.manifest, new.to_json(), etag=self._etag
                )
            except _errors.PreconditionFailed:
                # A retried put whose first attempt landed looks like a conflict:
                # if the manifest now holds exactly what we wrote, it was ours.
                try:
                    stored = await self._store.get(self._layout.manifest)
                except _errors.ObjectNotFound:
                    stored = _base.StoredObject(data=b"", etag="", size=0)
                if stored.data != new.to_json():
                    self.lost = _errors.FencedError(await self._fenced_message())
                    raise self.lost from None
                info = _base.ObjectInfo(self._layout.manifest, len(stored.data), stored.etag)
            self.manifest, self._etag = new, info.etag
            return new

    async def renew(self, now: float) -> None:
        await self.update(lambda m: dataclasses.replace(m, renewed_at=now))

    async def confirm(self, monotonic: Callable[[], float] = time.monotonic) -> float:
        """Prove this writer still holds the lease; returns a monotonic deadline until it does.

        Renews by compare-and-swap with new bytes (a new etag), so a writer
        waiting to take over (``takeover="wait"``) starts its ``lease_seconds``
        of patience again: until ``lease_seconds / 2`` after this call began,
        no such writer can have taken over. Raises FencedError if one already
        did. Destructive steps (garbage collection) run only before the deadline.
        """
        started = monotonic()
        await self.update(
            lambda m: dataclasses.replace(m, renewed_at=max(time.time(), m.renewed_at + 0.001))
        )
        return started + self.manifest.lease_seconds / 2

    async def wait_for_foreign_deletions(self) -> None:
        """After a forced takeover, wait until the old writer's deletion proof has expired.

        A writer forced out may be in the middle of a garbage collection that
        proved the lease less than ``lease_seconds / 2`` before the takeover;
        until then a chunk this writer finds already stored (content-addressed)
        may still be deleted under it.
        """
        remaining = self.foreign_deletions_until - time.monotonic()
        if remaining > 0:
            await asyncio.sleep(remaining)

    async def release(self) -> None:
        """Give the lease up after a clean shutdown, so the next writer starts at once."""
        await self.update(lambda m: dataclasses.replace(m, writer=None))

    def fence(self, error: _errors.FencedError) -> None:
        """Record that another writer took over (found by an index append)."""
        self.lost = self.lost or error

    async def _fenced_message(self) -> str:
        try:
            current = await read_manifest(self._store, self._layout)
        except _errors.EbbtideError:
            current = None
        who = (
            "another writer"
            if current is None
            else f"writer {current.writer!r} (epoch {current.epoch})"
        )
        return (
            f"VPG {self._layout.vpg!r}: this writer (epoch {self.manifest.epoch}) was fenced off: "
            f"{who} took over the journal in {self._store.description}. "
            "Stop this instance; the other one is now protecting the VPG."
        )


def _held_message(layout: _keys.VpgLayout, manifest: Manifest) -> str:
    return (
        f"VPG {layout.vpg!r} is being written by {manifest.writer!r} (epoch {manifest.epoch}). "
        "Two writers for one VPG are never allowed. Stop the other writer, or if it is dead, "
        f"start this one with takeover='wait' (it takes over once the lease has not been renewed "
        f"for {manifest.lease_seconds:g} s) or takeover='force'."
    )
