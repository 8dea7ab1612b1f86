"""Dilution: which automatic checkpoints are thinned, and the index rewrite that drops them."""

from __future__ import annotations

import collections
import pathlib
from collections.abc import Sequence

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _dilution, _keys, _lease
from tests.engine import model

HOUR = 3600
NS = 1_000_000_000
NOW = 1_800_000_000  # a multiple of 15 min: bucket edges are easy to reason about
DEFAULTS = ebbtide.DilutionSpec(threshold=0)
KIND = ebbtide.CheckpointKind


def _checkpoints(
    every: float, span: float, *, kind: ebbtide.CheckpointKind = KIND.AUTOMATIC
) -> list[ebbtide.Checkpoint]:
    count = int(span / every)
    return [
        ebbtide.Checkpoint(
            id=i + 1, time_ns=int((NOW - span + i * every) * NS), kind=kind, tag=None, epoch=1
        )
        for i in range(count + 1)
    ]


def tier_violations(
    checkpoints: Sequence[ebbtide.Checkpoint], now_ns: int, spec: ebbtide.DilutionSpec
) -> list[str]:
    """Every (tier, bucket) holding more automatic checkpoints than the tier keeps."""
    if sum(c.kind == KIND.AUTOMATIC for c in checkpoints) <= spec.threshold:
        return []
    counts: collections.Counter[tuple[int, int]] = collections.Counter()
    for c in checkpoints:
        if c.kind != KIND.AUTOMATIC:
            continue
        age = now_ns - c.time_ns
        tiers = [i for i, t in enumerate(spec.tiers) if age >= t.older_than * NS]
        if tiers:
            tier = spec.tiers[tiers[-1]]
            counts[(tiers[-1], c.time_ns // int(tier.per * NS))] += 1
    return [
        f"tier {tier} bucket {bucket}: {n} > {spec.tiers[tier].keep}"
        for (tier, bucket), n in counts.items()
        if n > spec.tiers[tier].keep
    ]


def test_zerto_defaults_keep_all_recent_three_then_one_per_quarter_hour() -> None:
    checkpoints = _checkpoints(5, 10 * HOUR)
    dropped = set(_dilution.to_drop(checkpoints, now_ns=NOW * NS, spec=DEFAULTS))
    kept = [c for c in checkpoints if c.id not in dropped]
    ages = [(NOW * NS - c.time_ns) / NS for c in kept]
    assert sum(age < 2 * HOUR for age in ages) == 2 * HOUR // 5  # every one of the last 2 h
    # 2 h .. 4.5 h: 10 buckets of 15 min, 3 each, plus the one exactly 2 h old (the oldest
    # in its bucket of the first tier); beyond: one per bucket
    assert sum(2 * HOUR <= age < 4.5 * HOUR for age in ages) == 31
    assert sum(age >= 4.5 * HOUR for age in ages) == 23
    assert tier_violations(kept, NOW * NS, DEFAULTS) == []
    # The earliest of each bucket is the one kept: stable when the pass runs again.
    assert _dilution.to_drop(kept, now_ns=NOW * NS, spec=DEFAULTS) == []
    assert all(
        c.time_ns % (900 * NS) == 0 for c in kept if (NOW * NS - c.time_ns) >= 4.5 * HOUR * NS
    )


def test_only_automatic_checkpoints_are_diluted() -> None:
    for kind in (KIND.TAGGED, KIND.APPLICATION_CONSISTENT, KIND.FAILOVER_TEST):
        assert (
            _dilution.to_drop(_checkpoints(5, 10 * HOUR, kind=kind), now_ns=NOW * NS, spec=DEFAULTS)
            == []
        )


def test_nothing_is_diluted_up_to_the_threshold() -> None:
    checkpoints = _checkpoints(60, 10 * HOUR)  # 601 automatic checkpoints
    spec = ebbtide.DilutionSpec(threshold=601)
    assert _dilution.to_drop(checkpoints, now_ns=NOW * NS, spec=spec) == []
    spec = ebbtide.DilutionSpec(threshold=600)
    assert _dilution.to_drop(checkpoints, now_ns=NOW * NS, spec=spec)


def test_tiers_are_configurable_and_validated() -> None:
    spec = ebbtide.VpgSpec.parse(
        "d",
        {
            "vms": [{"name": "web", "disks": [{"name": "root", "size": "1Mi"}]}],
            "dilution": {"threshold": 10, "tiers": [{"olderThan": "1h", "keep": 2, "per": "5m"}]},
        },
    )
    assert spec.dilution.tiers[0].older_than == HOUR
    assert spec.dilution.tiers[0].per == 300
    checkpoints = _checkpoints(10, 3 * HOUR)
    dropped = set(_dilution.to_drop(checkpoints, now_ns=NOW * NS, spec=spec.dilution))
    kept = [c for c in checkpoints if c.id not in dropped]
    assert tier_violations(kept, NOW * NS, spec.dilution) == []
    assert len(kept) == 360 + 1 + 2 * 24  # last hour all (+ the one at exactly 1 h), 2 per 5 min
    with pytest.raises(ebbtide.SpecError, match="tiers must be ordered by olderThan"):
        ebbtide.VpgSpec.parse(
            "d",
            {
                "vms": [{"name": "web", "disks": [{"name": "root", "size": "1Mi"}]}],
                "dilution": {
                    "tiers": [{"olderThan": "4h", "keep": 1}, {"olderThan": "2h", "keep": 3}]
                },
            },
        )


async def test_a_dilution_pass_rewrites_the_index_and_every_survivor_recovers(
    tmp_path: pathlib.Path,
) -> None:
    now = [float(NOW - 6 * HOUR)]
    store = ebbtide.MemoryStore()
    spec = model.spec("dil", dilution={"threshold": 20})
    disks = model.DisksModel(spec)
    options = model.options(clock=lambda: now[0], maintenance_seconds=None, compact_every=16)
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        tagged = None
        for i in range(6 * 60):  # one checkpoint a minute for 6 hours
            data = bytes([i % 251 + 1]) * 100
            await runtime.write("web", "root", (i * 100) % 60000, data)
            disks.write("web", "root", (i * 100) % 60000, data)
            kind = KIND.TAGGED if i == 10 else KIND.AUTOMATIC
            checkpoint = await runtime.checkpoint(kind, tag="early" if i == 10 else None)
            disks.checkpoint(checkpoint.id)
            tagged = checkpoint.id if i == 10 else tagged
            now[0] += 60
        before = runtime.list_checkpoints()
        result = await runtime.maintain()
        after = runtime.list_checkpoints()
        assert result.diluted == len(before) - len(after) > 0
        assert tier_violations(after, int(now[0] * NS), spec.dilution) == []
        assert tagged in [c.id for c in after]
        assert (await runtime.maintain()).diluted == 0  # stable
    listed = await ebbtide.list_checkpoints(store, "dil")
    assert [c.id for c in listed][:-1] == [c.id for c in after]  # + the final one at close
    sample = listed[:-1:7] + [c for c in listed if c.id == tagged]  # 360 segments per recovery
    for checkpoint in sample:
        out = tmp_path / str(checkpoint.id)
        await ebbtide.recover_to_files(
            store, "dil", ebbtide.CheckpointSelector(id=checkpoint.id), out
        )
        disks.assert_recovered(checkpoint.id, out)
    # The manifest points at the rewritten snapshot; older log entries are gone.
    layout = _keys.VpgLayout("dil")
    manifest = await _lease.read_manifest(store, layout)
    assert manifest is not None
    assert manifest.index_snapshot_seq is not None
    entries = [layout.parse_index_seq(i.key) async for i in store.list(layout.index_log_prefix)]
    assert min(entries) >= manifest.index_snapshot_seq - 16
