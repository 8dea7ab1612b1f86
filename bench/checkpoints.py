"""Checkpoint-index benchmark: a 1,000,000-checkpoint index, and promotion throughput.

Run ``.venv/bin/python bench/checkpoints.py [--count N] [--promote-mib M] [--repeat R]``
(the defaults are the issue's sizes and 3 rounds; ``--count 100000
--promote-mib 256`` is a quick check, ``--promote-mib 0`` skips promotion).
It prints a table and writes ``bench/results/checkpoints.json``:

1. the index: ``--count`` automatic checkpoints (default 1,000,000; 30 days at
   5 s is about 518,000), one VM, 5 s apart, as one index snapshot encoded
   exactly as the writer stores it; its size in the bucket (bytes per
   checkpoint, target < 40);
2. the time to load and list it (decode + ``IndexState``), to list it again
   from memory, and to find the latest checkpoint before a given time
   (``IndexState.latest_before``, worst case: the oldest; target < 50 ms);
3. one dilution pass at the default tiers (``_dilution.to_drop`` plus the
   encoding of the rewritten snapshot; target < 1 s);
4. promotion throughput: ``--promote-mib`` (default 1024) of journal written
   through ``VpgRuntime`` into a local-directory storage account, then
   promoted into recovery disks by ``maintain()`` (clock moved past the
   history); against plain create-only PUTs of the same number of bytes
   as 4 MiB objects into the same account (ratio, target >= 0.7). Both
   put with 8 requests in flight, fsync file and directory per object, and
   read their source from memory (the journal was just written: page
   cache). Two promotion times: ``ratio`` is the whole ``maintain()`` pass
   (replay, chunk stores, maps, commit, garbage collection of the promoted
   journal, index rewrite); ``ratio_to_commit`` stops when the recovery disks
   are durable and the manifest switched (``Promotion.commit_seconds``), so
   without deleting the 1 GiB of journal, which the plain PUT has no
   counterpart of. ``--repeat`` rounds (promotion, then plain PUT, each on a
   fresh account): the median ratios and their spread (min..max) are printed,
   as a busy machine moves single runs a lot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "engine"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import ebbtide_engine as ebbtide  # noqa: E402
from ebbtide_engine import _dilution, _format, _index  # noqa: E402

NS = 1_000_000_000
MiB = 1 << 20


def _records(count: int, start_ns: int) -> list[_format.IndexRecord]:
    records = [
        _index.config_record(1, start_ns, 1, {"web": {"root": 1 << 30}}),
        _format.IndexRecord(
            record=_format.RECORD_TAKEOVER,
            seq=1,
            lsn=1,
            time_ns=start_ns,
            epoch=1,
            detail=json.dumps({"valid_through": 0, "writer": "bench"}),
            positions=(),
        ),
    ]
    lsn = 1
    for i in range(count):
        lsn += 3
        records.append(
            _format.IndexRecord(
                record=_format.RECORD_CHECKPOINT,
                seq=2 + i // 4,
                lsn=lsn,
                time_ns=start_ns + i * 5 * NS,
                epoch=1,
                kind=0,
                positions=(("web", lsn - 1),),
            )
        )
    return records


def bench_index(count: int) -> dict[str, float]:
    start_ns = 1_700_000_000 * NS
    records = _records(count, start_ns)
    seq = records[-1].seq
    started = time.perf_counter()
    body = _format.encode_index(records, vpg="bench", fmt="index-snapshot", seq=seq)
    encode = time.perf_counter() - started

    started = time.perf_counter()
    state = _index.IndexState("bench")
    state.apply(_format.decode_index("k", body, vpg="bench", fmt="index-snapshot", seq=seq))
    load = time.perf_counter() - started
    started = time.perf_counter()
    listed = list(state.checkpoints)
    list_again = time.perf_counter() - started
    assert len(listed) == count

    lookups = []
    for moment in (start_ns + 7 * NS, start_ns + (count // 2) * 5 * NS, start_ns + count * 5 * NS):
        started = time.perf_counter()
        found = state.latest_before(moment)
        lookups.append(time.perf_counter() - started)
        assert found is not None

    now_ns = start_ns + count * 5 * NS
    spec = ebbtide.DilutionSpec()
    started = time.perf_counter()
    drop = set(_dilution.to_drop_state(state, now_ns=now_ns, spec=spec))
    select = time.perf_counter() - started
    kept = [r for r in records if r.record != _format.RECORD_CHECKPOINT or r.lsn not in drop]
    rewritten = _format.encode_index(kept, vpg="bench", fmt="index-snapshot", seq=seq + 1)
    dilution = time.perf_counter() - started
    return {
        "checkpoints": count,
        "index_bytes": len(body),
        "bytes_per_checkpoint": len(body) / count,
        "encode_seconds": encode,
        "load_and_list_seconds": load,
        "list_in_memory_seconds": list_again,
        "latest_before_worst_ms": max(lookups) * 1000,
        "dilution_select_seconds": select,
        "dilution_pass_seconds": dilution,
        "kept_after_dilution": count - len(drop),
        "rewritten_index_bytes": len(rewritten),
    }


async def _promotion_round(total_mib: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as directory:
        root = pathlib.Path(directory)
        (root / "a").mkdir()
        (root / "b").mkdir()
        now = [1_800_000_000.0]
        size = total_mib * MiB
        spec = ebbtide.VpgSpec.parse(
            "promo",
            {"vms": [{"name": "web", "disks": [{"name": "root", "size": size}]}]},
        )
        store = ebbtide.open_store((root / "a").as_uri())
        options = ebbtide.RuntimeOptions(
            auto_checkpoints=False, clock=lambda: now[0], maintenance_seconds=None
        )
        chunk = os.urandom(MiB + 8)[:MiB]  # incompressible: the journal stores it as is
        async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
            for i in range(total_mib):
                block = i.to_bytes(8, "little") + chunk[8:]
                await runtime.write("web", "root", i * MiB, block)
            await runtime.checkpoint()
            now[0] += 2 * 86400
            await runtime.checkpoint()
            started = time.perf_counter()
            result = await runtime.maintain()
            promote = time.perf_counter() - started
            assert result.promotion is not None
            applied = result.promotion.bytes_applied
            to_commit = result.promotion.commit_seconds
            collect = result.promotion.collect_seconds
        await store.close()

        plain = ebbtide.open_store((root / "b").as_uri())
        started = time.perf_counter()
        slots = asyncio.Semaphore(8)

        async def put(i: int) -> None:
            async with slots:
                block = (i.to_bytes(8, "little") + chunk[8:]) * 4
                await plain.put_new(f"plain/{i:08d}", block)

        await asyncio.gather(*(put(i) for i in range(total_mib // 4)))
        put_seconds = time.perf_counter() - started
        await plain.close()
    return {
        "journal_bytes_promoted": applied,
        "promotion_seconds": promote,
        "promotion_to_commit_seconds": to_commit,
        "promotion_gc_seconds": collect,
        "promotion_mb_per_s": applied / promote / 1e6,
        "plain_put_mb_per_s": size / put_seconds / 1e6,
        "ratio": (applied / promote) / (size / put_seconds),
        "ratio_to_commit": (applied / to_commit) / (size / put_seconds),
    }


async def bench_promotion(total_mib: int, repeat: int) -> dict[str, float]:
    rounds = []
    for number in range(repeat):
        rounds.append(await _promotion_round(total_mib))
        r = rounds[-1]
        print(
            f"round {number + 1}: promotion {r['promotion_mb_per_s']:.0f} MB/s "
            f"(to commit {r['promotion_to_commit_seconds']:.2f} s, gc "
            f"{r['promotion_gc_seconds']:.2f} s), plain PUT {r['plain_put_mb_per_s']:.0f} MB/s, "
            f"ratio {r['ratio']:.3f}, to commit {r['ratio_to_commit']:.3f}",
            flush=True,
        )
    summary = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
    for name in ("ratio", "ratio_to_commit"):
        summary[f"{name}_min"] = min(r[name] for r in rounds)
        summary[f"{name}_max"] = max(r[name] for r in rounds)
    summary["rounds"] = repeat
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--promote-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3, help="promotion rounds (median, spread)")
    args = parser.parse_args()
    index = bench_index(args.count)
    promotion = (
        asyncio.run(bench_promotion(args.promote_mib, args.repeat)) if args.promote_mib else {}
    )
    for name, value in {**index, **promotion}.items():
        print(f"{name:28} {value:,.3f}" if isinstance(value, float) else f"{name:28} {value:,}")
    out = REPO / "bench" / "results" / "checkpoints.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"index": index, "promotion": promotion}, indent=2) + "\n")


if __name__ == "__main__":
    main()
