"""Checkpoint dilution: which old automatic checkpoints to forget (Zerto's rules by default).

Dilution thins the listing, never the data: the journal keeps every write,
and every checkpoint that stays listed recovers exactly as before. Only
*automatic* checkpoints are ever dropped; tagged, application-consistent
and failover-test checkpoints stay for as long as the history keeps them.

The rule, deterministic so that tests can check it exactly and repeated
passes are stable:

- Nothing happens while the VPG has at most ``spec.dilution.threshold``
  automatic checkpoints.
- A checkpoint of age ``a`` (by the runtime's clock) belongs to the last
  tier whose ``olderThan <= a``; younger than the first tier, it is kept.
- Within a tier, time is cut into buckets of ``per`` seconds aligned to the
  Unix epoch (bucket = ``time // per``, so buckets do not move as time
  passes), and per (tier, bucket) the ``keep`` *earliest* automatic
  checkpoints are kept, the rest dropped.

With the defaults (every checkpoint of the last 2 h; 3 per 15 min from 2 h
to 4.5 h; 1 per 15 min beyond) a 30-day history at 5-second checkpoints
keeps about 4,300 checkpoints instead of 518,000. Because the earliest are
kept, a checkpoint that survives as a bucket's first keeps surviving when
it ages into a coarser tier with the same bucket size.

Applying the result is an index rewrite (``IndexWriter.rewrite``): a new
snapshot without the dropped records, switched in by compare-and-swap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ebbtide_engine import _index, _spec

_NS = 1_000_000_000


def to_drop(
    checkpoints: Sequence[_index.Checkpoint], *, now_ns: int, spec: _spec.DilutionSpec
) -> list[int]:
    """The ids of the checkpoints one dilution pass at ``now_ns`` drops (ascending)."""
    if not checkpoints:
        return []
    ids = np.fromiter((c.id for c in checkpoints), dtype=np.int64, count=len(checkpoints))
    times = np.fromiter((c.time_ns for c in checkpoints), dtype=np.int64, count=len(checkpoints))
    kinds = np.fromiter((int(c.kind) for c in checkpoints), dtype=np.uint8, count=len(checkpoints))
    return to_drop_arrays(ids, times, kinds, now_ns=now_ns, spec=spec)


def to_drop_state(state: _index.IndexState, *, now_ns: int, spec: _spec.DilutionSpec) -> list[int]:
    """:func:`to_drop` for the checkpoints an index lists (fast: no per-object work)."""
    ids, times, kinds = state.checkpoint_columns()
    if not ids:
        return []
    return to_drop_arrays(
        np.array(ids, dtype=np.int64),
        np.array(times, dtype=np.int64),
        np.array(kinds, dtype=np.uint8),
        now_ns=now_ns,
        spec=spec,
    )


def to_drop_arrays(
    ids: np.ndarray[Any, np.dtype[np.int64]],
    times: np.ndarray[Any, np.dtype[np.int64]],
    kinds: np.ndarray[Any, np.dtype[np.uint8]],
    *,
    now_ns: int,
    spec: _spec.DilutionSpec,
) -> list[int]:
    """:func:`to_drop` on columns (id, time_ns, kind): the fast path for large indexes."""
    automatic = kinds == int(_index.CheckpointKind.AUTOMATIC)
    if int(np.count_nonzero(automatic)) <= spec.threshold or not spec.tiers:
        return []
    edges = np.array([int(tier.older_than * _NS) for tier in spec.tiers], dtype=np.int64)
    tier_of = np.searchsorted(edges, now_ns - times, side="right") - 1
    dropped: list[np.ndarray[Any, np.dtype[np.int64]]] = []
    for number, tier in enumerate(spec.tiers):
        members = np.nonzero(automatic & (tier_of == number))[0]
        if members.size == 0:
            continue
        member_times = times[members]
        buckets = member_times // int(tier.per * _NS)
        order = np.lexsort((ids[members], member_times, buckets))
        buckets = buckets[order]
        first_of_bucket = np.searchsorted(buckets, buckets, side="left")
        rank = np.arange(buckets.size) - first_of_bucket
        dropped.append(ids[members[order][rank >= tier.keep]])
    if not dropped:
        return []
    return sorted(int(i) for i in np.concatenate(dropped))
