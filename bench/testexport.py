"""Failover-test export benchmark: first read and sequential read of a 1 GiB disk vs recovery.

Run ``.venv/bin/python bench/testexport.py [--quick]``. It starts a moto S3
server on 127.0.0.1 (``tests/s3server.py``) and, in child processes
(``--phase``, one per measurement, see bench/README.md):

1. ``setup`` (not timed): protects a VPG with one disk (1 GiB; 256 MiB with
   ``--quick``) through ``VpgRuntime``: the whole disk written with random,
   incompressible data, a checkpoint, the clock moved past the history so a
   history pass promotes it into recovery disks (4 MiB chunks), then 64 MiB
   of random 64 KiB writes scattered over the disk (journal) and the
   checkpoint ``test``. Exporting ``test`` reads chunks *and* journal.
2. ``export``: ``RecoveryExport.open`` at ``test``, then one 4 KiB read at
   offset 0 through a plain NBD client; timed: from the call to ``open`` to
   the read's reply ("first read"). Then ``nbdcopy`` of the whole export to a
   file; timed: the nbdcopy process, start to exit ("sequential").
3. ``recover``: ``recover_to_files`` of the same checkpoint; timed: the call.

Both outputs are checked to have the same SHA-256 (outside the timings).
Results: a table (first-read time vs recovery time; sequential MB/s vs
recovery MB/s, and the ratios) and JSON in ``bench/results/testexport.json``.
A quick check only: the lead runs the figures on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import pathlib
import sys
import tempfile
import time
from typing import Any

import _common
from _common import GiB, KiB, MiB

BUCKET = "ebbtide-bench"
SCRIPT = pathlib.Path(__file__).resolve()
VPG = "bench"
CHUNK = 4 * MiB
JOURNAL_BYTES = 64 * MiB
WRITE = 64 * KiB


def _storage(endpoint: str) -> str:
    return f"s3://{BUCKET}/testexport?endpoint={endpoint}&region={_common.REGION}"


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while piece := file.read(16 * MiB):
            digest.update(piece)
    return digest.hexdigest()


async def _setup(storage: str, size: int) -> dict[str, Any]:
    import ebbtide_engine as ebbtide

    clock = [1_800_000_000.0]
    spec = ebbtide.VpgSpec.parse(
        VPG,
        {
            "vms": [{"name": "vm", "disks": [{"name": "disk", "size": size}]}],
            "journalHistory": "1h",
        },
    )
    options = ebbtide.RuntimeOptions(
        clock=lambda: clock[0], auto_checkpoints=False, maintenance_seconds=None
    )
    store = ebbtide.open_store(storage)
    data = _common.RandomData(4 * MiB)
    try:
        async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
            for i, offset in enumerate(range(0, size, 4 * MiB)):
                await runtime.write("vm", "disk", offset, data.chunk(i))
            await runtime.checkpoint()
            clock[0] += 2 * 3600
            small = _common.RandomData(WRITE, seed=1)
            for i in range(JOURNAL_BYTES // WRITE):
                offset = (i * 7_919 * WRITE) % (size - WRITE)
                await runtime.write("vm", "disk", offset, small.chunk(i))
            base = await runtime.checkpoint()
            maintenance = await runtime.maintain()
            if maintenance.promoted_lsn != base.id:
                raise _common.BenchError(f"promotion went to {maintenance.promoted_lsn}")
            for i in range(JOURNAL_BYTES // WRITE):
                offset = (i * 104_729 * WRITE + 12_345) % (size - WRITE)
                await runtime.write("vm", "disk", offset, small.chunk(i + 100_000))
            test = await runtime.checkpoint(tag="test")
    finally:
        await store.close()
    return {"checkpoint": test.id}


async def _export(storage: str, work: pathlib.Path) -> dict[str, Any]:
    from tests.nbd import _raw

    import ebbtide_engine as ebbtide

    store = ebbtide.open_store(storage)
    selector = ebbtide.CheckpointSelector(tag="test")
    try:
        started = time.perf_counter()
        async with await ebbtide.RecoveryExport.open(
            store, VPG, selector, work / "scratch"
        ) as export:
            opened = time.perf_counter()
            url = export.urls()[("vm", "disk")]
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            client = await _raw.RawClient.connect(port)
            await client.open(f"{VPG}/vm/disk")
            await client.read(0, 4096)
            first_read = time.perf_counter()
            fetched_at_first_read = export.status().bytes_fetched
            await client.disconnect()
            out = work / "export.raw"
            sequential_started = time.perf_counter()
            process = await asyncio.create_subprocess_exec("nbdcopy", url, str(out))
            if await process.wait() != 0:
                raise _common.BenchError(f"nbdcopy {url} failed")
            sequential = time.perf_counter() - sequential_started
            status = export.status()
    finally:
        await store.close()
    size = out.stat().st_size
    result = {
        "open_seconds": opened - started,
        "first_read_seconds": first_read - started,
        "fetched_at_first_read": fetched_at_first_read,
        "sequential_seconds": sequential,
        "bytes_fetched": status.bytes_fetched,
        "size_bytes": size,
        "sha256": _sha256(out),
        "peak_rss_bytes": _common.peak_rss(),
    }
    out.unlink()
    return result


async def _recover(storage: str, work: pathlib.Path) -> dict[str, Any]:
    import ebbtide_engine as ebbtide

    store = ebbtide.open_store(storage)
    try:
        started = time.perf_counter()
        result = await ebbtide.recover_to_files(
            store, VPG, ebbtide.CheckpointSelector(tag="test"), work / "recovered"
        )
        seconds = time.perf_counter() - started
    finally:
        await store.close()
    path = result.disks[0].path
    figures = {
        "seconds": seconds,
        "size_bytes": result.disks[0].size,
        "sha256": _sha256(path),
        "peak_rss_bytes": _common.peak_rss(),
    }
    path.unlink()
    return figures


def _phase(args: argparse.Namespace) -> int:
    _common.ensure_repo_on_path()
    work = pathlib.Path(args.work)
    if args.phase == "setup":
        result = asyncio.run(_setup(args.storage, args.size_mib * MiB))
    elif args.phase == "export":
        result = asyncio.run(_export(args.storage, work))
    else:
        result = asyncio.run(_recover(args.storage, work))
    _common.write_result(args.result, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB disk instead of 1 GiB")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--tmpdir", help="where images go (a local disk; default: $TMPDIR)")
    parser.add_argument("--output", type=pathlib.Path, default=_common.RESULTS / "testexport.json")
    parser.add_argument("--phase", choices=["setup", "export", "recover"], help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--size-mib", type=int, default=1024, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return _phase(args)
    _common.ensure_repo_on_path()
    from tests import s3server

    size = 256 * MiB if args.quick else GiB
    server = s3server.MotoServer.start()
    try:
        server.create_bucket(BUCKET)
        os.environ.update(
            AWS_ACCESS_KEY_ID=_common.ACCESS_KEY, AWS_SECRET_ACCESS_KEY=_common.SECRET_KEY
        )
        storage = _storage(server.endpoint)
        with tempfile.TemporaryDirectory(dir=args.tmpdir, prefix="bench-testexport-") as tmp:
            common = ["--storage", storage, "--work", tmp, "--size-mib", str(size // MiB)]
            print(f"setting up a protected {_common.size_label(size)} disk (not timed)...")
            _common.run_phase(SCRIPT, "setup", common)
            runs = []
            for rep in range(args.reps):
                order = ["export", "recover"] if rep % 2 == 0 else ["recover", "export"]
                pair = {phase: _common.run_phase(SCRIPT, phase, common) for phase in order}
                if pair["export"]["sha256"] != pair["recover"]["sha256"]:
                    raise _common.BenchError("the export and the recovered image differ")
                runs.append(pair)
    finally:
        server.stop()
    report = _report(runs, size)
    _common.write_result(args.output, report)
    _render(report)
    return 0


def _report(runs: list[dict[str, dict[str, Any]]], size: int) -> dict[str, Any]:
    best_export = min((r["export"] for r in runs), key=lambda e: e["sequential_seconds"])
    best_first = min(r["export"]["first_read_seconds"] for r in runs)
    best_recover = min((r["recover"] for r in runs), key=lambda e: e["seconds"])
    return {
        "machine": _common.machine(),
        "size_bytes": size,
        "journal_bytes_written": 2 * JOURNAL_BYTES,
        "runs": runs,
        "first_read_seconds": best_first,
        "recover_seconds": best_recover["seconds"],
        "first_read_vs_recover": best_first / best_recover["seconds"],
        "sequential_mb_per_s": _common.mb_per_s(size, best_export["sequential_seconds"]),
        "recover_mb_per_s": _common.mb_per_s(size, best_recover["seconds"]),
        "sequential_vs_recover": best_recover["seconds"] / best_export["sequential_seconds"],
        "fetched_at_first_read": best_export["fetched_at_first_read"],
    }


def _render(report: dict[str, Any]) -> None:
    size = _common.size_label(report["size_bytes"])
    rows = [
        ("first 4 KiB read after open (s)", report["first_read_seconds"],
         report["recover_seconds"], report["first_read_vs_recover"]),
        ("full sequential read (MB/s)", report["sequential_mb_per_s"],
         report["recover_mb_per_s"], report["sequential_vs_recover"]),
    ]  # fmt: skip
    print(f"\n{size} disk, export of checkpoint 'test' vs recover_to_files (best of runs)")
    print(f"{'':34} {'export':>10} {'recovery':>10} {'export/recovery':>16}")
    for label, export, recovery, ratio in rows:
        print(f"{label:34} {export:10.2f} {recovery:10.2f} {ratio:16.3f}")
    print(
        f"bytes fetched from the bucket by the first read (journal plan + 1 chunk): "
        f"{_common.mib(report['fetched_at_first_read']):.1f} MiB; recovery time is the whole "
        "recover_to_files call. Ratios: time (lower is better) for the first read, "
        "throughput (higher is better) for the sequential read."
    )


if __name__ == "__main__":
    sys.exit(main())
