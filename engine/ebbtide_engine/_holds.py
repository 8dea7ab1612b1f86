"""Holds: a reader's "delete nothing while I read" note to promotion's garbage collection.

A recovery (or a test export) reads many objects over minutes: the manifest,
the index, chunk maps, chunks and journal segments. Meanwhile the writer's
history pass may promote past the reader's base and delete exactly those
objects. A hold prevents that without any lock between reader and writer:

- the reader creates ``vpgs/<vpg>/holds/<hold_id>.json`` (create-only, a small
  JSON: owner, purpose, created, expires in Unix seconds) FIRST, and only then
  reads the manifest and plans;
- promotion's deletion step lists the holds *after* its commit and defers all
  deletion while any live one exists. Deletion is implied by the manifest, so
  a later pass redoes it once the holds are gone.

Since the writer lists holds after the manifest switch and the reader reads
the manifest after its hold is visible (S3 is strongly consistent), either the
writer sees the hold, or the reader sees the new manifest: it never plans
against objects that are being deleted. A hold lives for ``ttl_seconds`` and
is renewed by :class:`HoldLease` every ``ttl / 3``; expired holds are ignored
and deleted by garbage collection (a crashed reader blocks nothing for long).
The object format is in FORMAT.md ("Holds").
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from ebbtide_engine import _errors, _keys
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.holds")

HOLD_FORMAT = "ebbtide.hold"
HOLD_VERSION = 1


class PromotedDuringRead(_errors.EbbtideError):
    """An object a reader planned to read was deleted by promotion meanwhile (retry)."""

    def __init__(self, vpg: str, what: str) -> None:
        self.what = what
        super().__init__(
            f"VPG {vpg!r}: an object this read needed is gone ({what}): the checkpoint's "
            "journal or recovery disk was promoted and garbage-collected during the read "
            "(the reader's hold had expired, or it placed none). Nothing is corrupt; start "
            "the recovery again, it will plan against the new recovery disks."
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Hold:
    """One reader's hold on a VPG's recovery disks and journal."""

    vpg: str
    hold_id: str
    owner: str  # e.g. "operator/<pod>/<ns>/<recovery>" or "cli/<host>/<pid>"
    purpose: str  # e.g. "restore", "failover-test"
    created: float  # unix seconds
    expires: float  # unix seconds

    def live(self, now: float) -> bool:
        return now < self.expires

    def to_json(self) -> bytes:
        body: dict[str, Any] = {
            "format": HOLD_FORMAT,
            "version": HOLD_VERSION,
            **dataclasses.asdict(self),
        }
        return json.dumps(body, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, key: str, data: bytes) -> Hold:
        try:
            body = json.loads(data)
            if body.get("format") != HOLD_FORMAT or body.get("version") != HOLD_VERSION:
                raise ValueError(f"not an {HOLD_FORMAT} version {HOLD_VERSION} object")
            return cls(
                vpg=str(body["vpg"]),
                hold_id=str(body["hold_id"]),
                owner=str(body["owner"]),
                purpose=str(body["purpose"]),
                created=float(body["created"]),
                expires=float(body["expires"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise _errors.CorruptObjectError(key, f"not a valid hold: {exc}") from None


class HoldLease:
    """A placed hold: renew it while reading, release it at the end.

    ``async with await place_hold(...) as lease:`` renews in the background
    every ``ttl / 3`` and releases on exit. A renewal that finds the hold gone
    (it expired and a garbage collection deleted it) puts it back, so that
    from then on nothing more is deleted; what was deleted meanwhile makes the
    reader fail with a "promoted during the read, retry" error.
    """

    def __init__(
        self,
        store: _base.ObjectStore,
        hold: Hold,
        *,
        ttl_seconds: float,
        etag: str,
        clock: Callable[[], float],
    ) -> None:
        self.hold = hold
        self._store = store
        self._key = _keys.VpgLayout(hold.vpg).hold(hold.hold_id)
        self._ttl = ttl_seconds
        self._etag = etag
        self._clock = clock
        self._released = False
        self._renewer: asyncio.Task[None] | None = None

    async def renew(self) -> None:
        """Push ``expires`` to now + ttl (re-creates the hold if it was deleted)."""
        if self._released:
            return
        now = self._clock()
        hold = dataclasses.replace(self.hold, expires=now + self._ttl)
        try:
            info = await self._store.put_if_match(self._key, hold.to_json(), etag=self._etag)
        except (_errors.PreconditionFailed, _errors.ObjectNotFound):
            logger.warning(
                "hold %s on VPG %s had expired and was removed; placing it again",
                hold.hold_id,
                hold.vpg,
            )
            try:
                info = await self._store.put_new(self._key, hold.to_json())
            except _errors.ObjectExists:  # changed under us: take whatever is there over
                current = await self._store.head(self._key)
                info = await self._store.put_if_match(self._key, hold.to_json(), etag=current.etag)
        self._etag = info.etag
        self.hold = hold

    async def release(self) -> None:
        """Remove the hold (idempotent)."""
        await self._stop_renewing()
        if self._released:
            return
        await self._store.delete(self._key)
        self._released = True

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl / 3)
            try:
                await self.renew()
            except _errors.StorageError as exc:
                logger.warning("renewing hold %s failed (retried): %s", self.hold.hold_id, exc)

    async def _stop_renewing(self) -> None:
        task, self._renewer = self._renewer, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aenter__(self) -> HoldLease:
        if self._renewer is None and not self._released:
            self._renewer = asyncio.ensure_future(self._renew_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


async def place_hold(
    store: _base.ObjectStore,
    vpg: str,
    *,
    owner: str,
    purpose: str,
    ttl_seconds: float = 600.0,
    clock: Callable[[], float] = time.time,
) -> HoldLease:
    """Create a hold on ``vpg`` (create-only, fresh id) and return its lease.

    Call it before reading the manifest. ``clock`` (wall-clock seconds) is for tests.
    """
    if ttl_seconds <= 0:
        raise _errors.InvalidRequest(f"a hold needs a positive ttl, not {ttl_seconds}")
    layout = _keys.VpgLayout(vpg)
    now = clock()
    hold = Hold(
        vpg=vpg,
        hold_id=uuid.uuid4().hex,
        owner=owner,
        purpose=purpose,
        created=now,
        expires=now + ttl_seconds,
    )
    info = await store.put_new(layout.hold(hold.hold_id), hold.to_json())
    return HoldLease(store, hold, ttl_seconds=ttl_seconds, etag=info.etag, clock=clock)


async def list_holds(store: _base.ObjectStore, vpg: str, *, now: float | None = None) -> list[Hold]:
    """The live holds of ``vpg`` (expired ones are left out; unreadable ones count as live)."""
    live, _expired = await _scan(store, _keys.VpgLayout(vpg), time.time() if now is None else now)
    return live


async def _scan(
    store: _base.ObjectStore, layout: _keys.VpgLayout, now: float
) -> tuple[list[Hold], list[str]]:
    live: list[Hold] = []
    expired: list[str] = []
    async for info in store.list(layout.holds_prefix):
        try:
            data = (await store.get(info.key)).data
        except _errors.ObjectNotFound:
            continue  # released meanwhile
        try:
            hold = Hold.from_json(info.key, data)
        except _errors.CorruptObjectError as exc:
            # Unreadable: someone meant to hold. Treat it as live for one ttl of ours
            # rather than delete under a reader; an operator can delete it.
            logger.warning("%s; treated as a live hold", exc)
            hold = Hold(
                vpg=layout.vpg,
                hold_id=info.key.rsplit("/", 1)[-1],
                owner="?",
                purpose="?",
                created=now,
                expires=float("inf"),
            )
        if hold.live(now):
            live.append(hold)
        else:
            expired.append(info.key)
    return live, expired


async def live_holds_or_collect(
    store: _base.ObjectStore, layout: _keys.VpgLayout, *, now: float | None = None
) -> list[Hold]:
    """For garbage collection: the live holds; deletes expired holds on the way."""
    live, expired = await _scan(store, layout, time.time() if now is None else now)
    for key in expired:
        await store.delete(key)
    return live
