"""Journal benchmark: ingest and recovery throughput against their S3 ceilings, and memory.

Run ``.venv/bin/python bench/journal.py [--quick]``. It starts a moto S3 server
on 127.0.0.1 (``tests/s3server.py``), runs every measured phase in a child
process, prints a table and writes the same figures to
``bench/results/journal.json``. What it measures (see bench/README.md):

1. ingest: random, incompressible writes of 4 KiB, 64 KiB and 1 MiB, in
   order over a disk as large as the bytes written, through ``VpgRuntime``
   with the spec's default journal settings and automatic checkpoints (5 s);
   timed from the first write to the end of ``await runtime.checkpoint()``
   (the durable checkpoint that covers every write);
2. its ceiling: plain aiobotocore PUTs of objects of exactly the sizes the
   engine produced, 8 at a time (``uploadConcurrency``), on the same server;
   the ratio engine / ceiling is the share of the server's PUT speed the
   engine reaches;
3. recovery with ``recover_to_files`` of a disk written once with 1 MiB
   writes, against plain GETs of the same segment objects, 4 at a time
   (recovery's prefetch), and against the same GETs with each body written
   into a local file that is then fsynced (recovery's unavoidable I/O); the
   recovered image is checked against a hash of what was written, and
   deleted;
4. each phase's peak RSS (VmHWM of its child process), for 256 MiB and
   1 GiB disks side by side (``--quick`` skips the 1 GiB ones).

Each engine/ceiling pair runs back to back (order alternating between
repetitions). Tables show the best of ``--reps`` repetitions (the fastest
engine run and the fastest ceiling run: on a shared machine the least
disturbed ones); the JSON keeps every run and the median of per-pair ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import logging
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import _common
from _common import GiB, KiB, MiB

SCRIPT = pathlib.Path(__file__).resolve()
BUCKET = "ebbtide-bench"
VM = "vm"
DISK = "disk"
WRITE_SIZES = (4 * KiB, 64 * KiB, 1 * MiB)
PUT_CONCURRENCY = 8  # JournalSpec.upload_concurrency's default
GET_CONCURRENCY = 4  # recover_to_files' default prefetch
BUSY_SHARE = 0.15  # other processes using more than this share of a core disturb the figures
TARGETS = {
    "ingest 64 KiB": 0.8,  # engine / plain-PUT ceiling
    "recovery": 0.8,  # engine / plain-GET ceiling
}


# ======================================================================================
# Child phases: each runs in its own process and writes one JSON result.
# ======================================================================================


def _store_url(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint={endpoint}&region={_common.REGION}"


def _journal_prefix(prefix: str, vpg: str) -> str:
    """Where a VPG's journal segments live in the bucket (FORMAT.md: vpgs/<vpg>/journal/)."""
    return f"{prefix}/vpgs/{vpg}/journal/"


def _s3_client(endpoint: str) -> Any:
    """A plain aiobotocore S3 client configured like the engine's S3 backend.

    Same retry mode and attempts, pool size and checksum settings as
    ``ebbtide_engine.storage._s3.S3Store``, so the ceiling differs from the
    engine only by what the engine does around the requests.
    """
    import aiobotocore.config
    import aiobotocore.session

    config = aiobotocore.config.AioConfig(
        retries={"mode": "standard", "max_attempts": 5},
        s3={"addressing_style": "path"},
        connect_timeout=5.0,
        read_timeout=60.0,
        max_pool_connections=32,
        request_checksum_calculation="when_supported",
        response_checksum_validation="when_supported",
    )
    return aiobotocore.session.get_session().create_client(
        "s3",
        region_name=_common.REGION,
        endpoint_url=endpoint,
        aws_access_key_id=_common.ACCESS_KEY,
        aws_secret_access_key=_common.SECRET_KEY,
        config=config,
    )


def _expected_image(data: _common.RandomData, count: int, disk_size: int) -> str:
    """SHA-256 of the disk after ``count`` sequential writes from offset 0 (rest zeros)."""
    digest = hashlib.sha256()
    for i in range(count):
        digest.update(data.chunk(i))
    digest.update(bytes(disk_size - count * data.size))
    return digest.hexdigest()


def _profile(args: argparse.Namespace, phase: str) -> contextlib.AbstractContextManager[None]:
    path = None
    if args.profile:
        path = _common.RESULTS / "profiles" / f"journal-{phase}-{args.vpg}-{args.prefix}.prof"
    return _common.maybe_profile(path)


async def _list_sizes(client: Any, prefix: str) -> list[tuple[str, int]]:
    found: list[tuple[str, int]] = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        found.extend((item["Key"], int(item["Size"])) for item in page.get("Contents", []))
    return found


async def _pool(concurrency: int, jobs: Iterator[Callable[[], Coroutine[Any, Any, None]]]) -> None:
    """Run the jobs ``concurrency`` at a time (a job starts as soon as a slot frees)."""

    async def worker() -> None:
        for job in jobs:  # one shared iterator: each job is taken once
            await job()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def phase_ingest(args: argparse.Namespace) -> dict[str, Any]:
    from ebbtide_engine import RuntimeOptions, S3Credentials, VpgRuntime, VpgSpec, open_store

    write_size, total, disk_size = args.write_size, args.total, args.disk_size
    if total % write_size or total > disk_size:
        raise _common.BenchError("total must be a multiple of the write size and fit the disk")
    count = total // write_size
    spec = VpgSpec.parse(
        args.vpg, {"vms": [{"name": VM, "disks": [{"name": DISK, "size": disk_size}]}]}
    )
    store = open_store(
        _store_url(args.endpoint, args.prefix),
        credentials=S3Credentials(_common.ACCESS_KEY, _common.SECRET_KEY),
    )
    data = _common.RandomData(write_size)
    options = RuntimeOptions(auto_checkpoints=True)
    runtime = await VpgRuntime.open(spec, store, options=options)
    baseline_rss = _common.current_rss()
    try:
        with _profile(args, "ingest"), _common.Stopwatch(args.server_pid) as watch:
            started = time.perf_counter()
            for i in range(count):
                await runtime.write(VM, DISK, i * write_size, data.chunk(i))
            accepted = time.perf_counter() - started
            checkpoint = await runtime.checkpoint(tag="bench")
        status = runtime.status()
        checkpoints = len(runtime.list_checkpoints())
    finally:
        await runtime.close()
    await store.close()
    peak = _common.peak_rss()
    async with _s3_client(args.endpoint) as client:
        segments = [
            size for _, size in await _list_sizes(client, _journal_prefix(args.prefix, args.vpg))
        ]
    if sum(segments) < total:
        raise _common.BenchError(
            f"the journal holds {sum(segments)} bytes in {len(segments)} segments, less than "
            f"the {total} bytes written: did the key layout change? (listed "
            f"{_journal_prefix(args.prefix, args.vpg)!r})"
        )
    return {
        **watch.as_dict(),
        "accept_seconds": accepted,
        "payload_bytes": total,
        "writes": count,
        "checkpoint_id": checkpoint.id,
        "segments": segments,
        "segment_bytes": sum(segments),
        "checkpoints": checkpoints,  # durable ones, the final tagged one included
        "upload_retries": status.upload_retries,
        "last_error": status.last_error,
        "baseline_rss": baseline_rss,
        "peak_rss": peak,
        **(
            {"expected_sha256": _expected_image(data, count, disk_size)}
            if args.expect_image
            else {}
        ),
    }


async def phase_put(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(size) for size in args.sizes.split(",")]
    data = _common.RandomData(max(sizes))

    def put(client: Any, index: int, size: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def job() -> None:
            body = data.chunk(index)[:size] if size < data.size else data.chunk(index)
            await client.put_object(Bucket=BUCKET, Key=f"{args.prefix}/{index:06d}", Body=body)

        return job

    async with _s3_client(args.endpoint) as client:
        await client.head_bucket(Bucket=BUCKET)  # connect before the clock starts
        baseline_rss = _common.current_rss()
        with _common.Stopwatch(args.server_pid) as watch:
            await _pool(PUT_CONCURRENCY, (put(client, i, s) for i, s in enumerate(sizes)))
    return {
        **watch.as_dict(),
        "objects": len(sizes),
        "bytes": sum(sizes),
        "baseline_rss": baseline_rss,
        "peak_rss": _common.peak_rss(),
    }


async def phase_recover(args: argparse.Namespace) -> dict[str, Any]:
    from ebbtide_engine import CheckpointSelector, S3Credentials, open_store, recover_to_files

    store = open_store(
        _store_url(args.endpoint, args.prefix),
        credentials=S3Credentials(_common.ACCESS_KEY, _common.SECRET_KEY),
    )
    await store.check()  # create the client and connect before the clock starts
    out = pathlib.Path(tempfile.mkdtemp(prefix="ebbtide-bench-recovery-", dir=args.tmpdir))
    baseline_rss = _common.current_rss()
    try:
        with _profile(args, "recover"), _common.Stopwatch(args.server_pid) as watch:
            result = await recover_to_files(store, args.vpg, CheckpointSelector(latest=True), out)
        peak = _common.peak_rss()
        await store.close()
        (disk,) = result.disks
        if disk.size != args.disk_size:
            raise _common.BenchError(f"recovered disk is {disk.size} bytes, not {args.disk_size}")
        with disk.path.open("rb") as image:
            actual = hashlib.file_digest(image, "sha256").hexdigest()
        if actual != args.expected_sha256:
            raise _common.BenchError(
                f"the recovered image {disk.path} has SHA-256 {actual}, but what was written "
                f"hashes to {args.expected_sha256}: recovery returned the wrong bytes"
            )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {
        **watch.as_dict(),
        "disk_bytes": args.disk_size,
        "bytes_read": result.bytes_read,
        "segments_read": result.segments_read,
        "engine_seconds": result.seconds,
        "verified_sha256": actual,
        "baseline_rss": baseline_rss,
        "peak_rss": peak,
    }


async def phase_get(args: argparse.Namespace) -> dict[str, Any]:
    """Plain GETs of a journal's segments; with ``--write-image``, also write them to a file.

    The second form is the disk-inclusive reference for recovery: every body
    is written (in a worker thread, as recovery does) to one local file at
    its place, and the file is fsynced, all inside the timing.
    """
    received = 0
    fd = -1

    def get(client: Any, key: str, offset: int) -> Callable[[], Coroutine[Any, Any, None]]:
        async def job() -> None:
            nonlocal received
            response = await client.get_object(Bucket=BUCKET, Key=key)
            async with response["Body"] as body:
                data = await body.read()
            if fd >= 0:
                await asyncio.to_thread(os.pwrite, fd, data, offset)
            received += len(data)

        return job

    out = pathlib.Path(tempfile.mkdtemp(prefix="ebbtide-bench-get-", dir=args.tmpdir))
    try:
        async with _s3_client(args.endpoint) as client:
            objects = await _list_sizes(client, _journal_prefix(args.prefix, args.vpg))
            if not objects:
                raise _common.BenchError(f"no journal segments under {args.prefix}/ for {args.vpg}")
            offsets = [sum(size for _, size in objects[:i]) for i in range(len(objects))]
            jobs = (get(client, key, offsets[i]) for i, (key, _) in enumerate(objects))
            baseline_rss = _common.current_rss()
            with _common.Stopwatch(args.server_pid) as watch:
                if args.write_image:
                    fd = os.open(out / "image", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
                await _pool(GET_CONCURRENCY, jobs)
                if fd >= 0:
                    await asyncio.to_thread(os.fsync, fd)
    finally:
        if fd >= 0:
            os.close(fd)
        shutil.rmtree(out, ignore_errors=True)
    if received != sum(size for _, size in objects):
        raise _common.BenchError(f"read {received} bytes, expected {sum(s for _, s in objects)}")
    return {
        **watch.as_dict(),
        "objects": len(objects),
        "bytes": received,
        "wrote_image": args.write_image,
        "baseline_rss": baseline_rss,
        "peak_rss": _common.peak_rss(),
    }


PHASES = {
    "ingest": phase_ingest,
    "put": phase_put,
    "recover": phase_recover,
    "get": phase_get,
}


def run_child(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _common.ensure_repo_on_path()
    try:
        result = asyncio.run(PHASES[args.phase](args))
    except _common.BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _common.write_result(pathlib.Path(args.result), result)
    return 0


# ======================================================================================
# The parent: starts the server, runs the children, prints and saves the figures.
# ======================================================================================


class Runner:
    """Runs the phases against one moto server and keeps what they reported."""

    def __init__(self, server: Any, console: Any, tmpdir: str | None, profile: bool) -> None:
        self.server = server
        self.console = console
        self.tmpdir = tmpdir
        self.profile = profile

    def child(self, phase: str, **options: object) -> dict[str, Any]:
        argv = ["--endpoint", self.server.endpoint, "--server-pid", str(self.server.process.pid)]
        if self.tmpdir:
            argv += ["--tmpdir", self.tmpdir]
        for name, value in options.items():
            flag = f"--{name.replace('_', '-')}"
            if value is True:
                argv.append(flag)
            elif value is not False:
                argv += [flag, str(value)]
        return _common.run_phase(SCRIPT, phase, argv)

    def fresh_bucket(self) -> None:
        self.server.reset()
        self.server.create_bucket(BUCKET)

    def ingest(self, write_size: int, total: int, reps: int, *, keep: bool) -> dict[str, Any]:
        """``reps`` engine/ceiling pairs, each on an empty server; ``keep``: for recovery."""
        label = _common.size_label(write_size)
        vpg = f"ingest-{write_size // KiB}k-{total // MiB}m"
        runs: list[dict[str, Any]] = []
        sizes: list[int] | None = None
        for rep in range(reps):
            self.fresh_bucket()
            prefix = f"rep{rep}"
            engine_args = {
                "prefix": prefix,
                "vpg": vpg,
                "write_size": write_size,
                "total": total,
                "disk_size": total,
                "expect_image": keep and rep == reps - 1,  # the journal recovery will read
                "profile": self.profile,
            }
            if rep % 2 == 1 and sizes is not None:  # alternate the order: ceiling first
                ceiling = self.child("put", prefix=f"{prefix}-put", sizes=_csv(sizes))
                engine = self.child("ingest", **engine_args)
            else:
                engine = self.child("ingest", **engine_args)
                ceiling = self.child("put", prefix=f"{prefix}-put", sizes=_csv(engine["segments"]))
            sizes = engine["segments"]
            ratio = ceiling["seconds"] / engine["seconds"]
            runs.append({"engine": engine, "ceiling": ceiling, "ratio": ratio})
            self.console.log(
                f"ingest {label} writes, {_common.size_label(total)}, rep {rep + 1}/{reps}: "
                f"engine {_common.mb_per_s(total, engine['seconds']):.0f} MB/s, "
                f"PUT ceiling {_common.mb_per_s(ceiling['bytes'], ceiling['seconds']):.0f} MB/s "
                f"(same bytes: ratio {ratio:.2f}); "
                f"peak RSS {_common.mib(engine['peak_rss']):.0f} MiB"
            )
        last = runs[-1]["engine"]
        return {
            "write_size": write_size,
            "total_bytes": total,
            "disk_bytes": total,
            "vpg": vpg,
            "prefix": f"rep{reps - 1}",
            "expected_sha256": last.get("expected_sha256"),
            "runs": runs,
            **_summarise_ingest(runs, total),
        }

    def recovery(self, source: dict[str, Any], reps: int) -> dict[str, Any]:
        """``reps`` rounds of recovery, plain GETs and GET + write + fsync over ``source``.

        ``source`` is an ingest result whose journal is still in the bucket.
        """
        disk = source["disk_bytes"]
        common = {"prefix": source["prefix"], "vpg": source["vpg"]}
        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            recover_args = {
                **common,
                "disk_size": disk,
                "expected_sha256": source["expected_sha256"],
                "profile": self.profile,
            }
            # Three runs back to back, the order rotating between repetitions.
            order = ["recover", "get", "get+write"]
            order = order[rep % 3 :] + order[: rep % 3]
            measured: dict[str, dict[str, Any]] = {}
            for which in order:
                if which == "recover":
                    measured[which] = self.child("recover", **recover_args)
                else:
                    measured[which] = self.child("get", **common, write_image=which != "get")
            engine, ceiling = measured["recover"], measured["get"]
            reference = measured["get+write"]
            ratio = ceiling["seconds"] / engine["seconds"]
            runs.append(
                {"engine": engine, "ceiling": ceiling, "reference": reference, "ratio": ratio}
            )
            self.console.log(
                f"recovery of a {_common.size_label(disk)} disk, rep {rep + 1}/{reps}: "
                f"engine {_common.mb_per_s(disk, engine['seconds']):.0f} MB/s, "
                f"GET ceiling {_common.mb_per_s(ceiling['bytes'], ceiling['seconds']):.0f} MB/s "
                f"(ratio {ratio:.2f}), GET + write + fsync "
                f"{_common.mb_per_s(disk, reference['seconds']):.0f} MB/s; "
                f"peak RSS {_common.mib(engine['peak_rss']):.0f} MiB; image verified"
            )
        disk_reference = min((run["reference"] for run in runs), key=lambda r: float(r["seconds"]))
        engine, ceiling = _best(runs)
        return {
            "disk_bytes": disk,
            "disk_reference_mb_s": _common.mb_per_s(disk, disk_reference["seconds"]),
            "disk_reference_ratio": disk_reference["seconds"] / engine["seconds"],
            "write_size": source["write_size"],
            "segments": engine["segments_read"],
            "segment_bytes": engine["bytes_read"],
            "runs": runs,
            "engine_mb_s": _common.mb_per_s(disk, engine["seconds"]),
            "ceiling_mb_s": _common.mb_per_s(ceiling["bytes"], ceiling["seconds"]),
            "ratio": ceiling["seconds"] / engine["seconds"],
            "ratio_median_of_pairs": _common.median([run["ratio"] for run in runs]),
            **_summarise_cpu(runs),
        }


def _csv(values: list[int]) -> str:
    return ",".join(str(v) for v in values)


def _best(runs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fastest engine run and the fastest ceiling run (the least disturbed ones)."""
    engine = min((run["engine"] for run in runs), key=lambda e: float(e["seconds"]))
    ceiling = min((run["ceiling"] for run in runs), key=lambda c: float(c["seconds"]))
    return engine, ceiling


def _summarise_cpu(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """CPU shares of the best runs; peak RSS: the largest seen."""
    engine, ceiling = _best(runs)
    return {
        "engine_peak_rss": max(run["engine"]["peak_rss"] for run in runs),
        "engine_baseline_rss": engine["baseline_rss"],
        "ceiling_peak_rss": max(run["ceiling"]["peak_rss"] for run in runs),
        "engine_cpu_share": engine["cpu_seconds"] / engine["seconds"],
        "engine_server_cpu_share": engine["server_cpu_seconds"] / engine["seconds"],
        "ceiling_cpu_share": ceiling["cpu_seconds"] / ceiling["seconds"],
        "ceiling_server_cpu_share": ceiling["server_cpu_seconds"] / ceiling["seconds"],
        "other_cpu_share": max(
            engine["other_cpu_seconds"] / engine["seconds"],
            ceiling["other_cpu_seconds"] / ceiling["seconds"],
        ),
    }


def _summarise_ingest(runs: list[dict[str, Any]], total: int) -> dict[str, Any]:
    engine, ceiling = _best(runs)
    return {
        "segments": len(engine["segments"]),
        "segment_bytes": engine["segment_bytes"],
        "format_overhead": engine["segment_bytes"] / total - 1,
        "engine_mb_s": _common.mb_per_s(total, engine["seconds"]),
        "accept_mb_s": _common.mb_per_s(total, engine["accept_seconds"]),
        "ceiling_mb_s": _common.mb_per_s(ceiling["bytes"], ceiling["seconds"]),
        "ratio": ceiling["seconds"] / engine["seconds"],
        "ratio_median_of_pairs": _common.median([run["ratio"] for run in runs]),
        "upload_retries": sum(run["engine"]["upload_retries"] for run in runs),
        **_summarise_cpu(runs),
    }


def _memory(
    ingests: list[dict[str, Any]], recoveries: list[dict[str, Any]]
) -> dict[str, dict[int, dict[str, int]]]:
    """Peak and baseline RSS per phase and size (bytes written, or disk size)."""

    def entry(row: dict[str, Any], side: str) -> dict[str, int]:
        best = _best(row["runs"])[0 if side == "engine" else 1]
        return {"peak": int(row[f"{side}_peak_rss"]), "baseline": int(best["baseline_rss"])}

    table: dict[str, dict[int, dict[str, int]]] = {
        "ingest, 1 MiB writes": {},
        f"plain PUTs, {PUT_CONCURRENCY} at a time": {},
        "recovery": {},
        f"plain GETs, {GET_CONCURRENCY} at a time": {},
    }
    names = list(table)
    for row in ingests:
        table[names[0]][row["total_bytes"]] = entry(row, "engine")
        table[names[1]][row["total_bytes"]] = entry(row, "ceiling")
    for row in recoveries:
        table[names[2]][row["disk_bytes"]] = entry(row, "engine")
        table[names[3]][row["disk_bytes"]] = entry(row, "ceiling")
    return table


def _journal_defaults() -> dict[str, Any]:
    from ebbtide_engine import JournalSpec, VpgSpec

    journal = JournalSpec()
    return {
        "segment_max_bytes": journal.segment_max_bytes,
        "upload_concurrency": journal.upload_concurrency,
        "max_unshipped_bytes": journal.max_unshipped_bytes,
        "checkpoint_interval_seconds": VpgSpec.model_fields["checkpoint_interval"].default,
        "checkpoints": "automatic (RuntimeOptions.auto_checkpoints=True, the spec's default "
        "interval) plus one tagged checkpoint after the last write, awaited inside the timing",
        "put_concurrency": PUT_CONCURRENCY,
        "get_concurrency": GET_CONCURRENCY,
    }


def _pct(share: float) -> str:
    return f"{share * 100:.0f}%"


def _cpu_cells(row: dict[str, Any]) -> tuple[str, str, str]:
    other = row["other_cpu_share"]
    return (
        f"{_pct(row['engine_cpu_share'])}+{_pct(row['engine_server_cpu_share'])}",
        f"{_pct(row['ceiling_cpu_share'])}+{_pct(row['ceiling_server_cpu_share'])}",
        f"[red]{_pct(other)}[/]" if other > BUSY_SHARE else _pct(other),
    )


def _verdict(value: float, target: float | None) -> str:
    if target is None:
        return ""
    mark = "[green]met[/]" if value >= target else "[red]MISSED[/]"
    return f"≥ {target:.1f} {mark}"


def render(console: Any, report: dict[str, Any]) -> None:
    from rich.table import Table

    ingest = Table(title="Ingest through VpgRuntime vs plain PUTs of the same objects (best runs)")
    for column in (
        "writes",
        "bytes",
        "segments",
        "writes accepted MB/s",
        "engine MB/s",
        "PUT ceiling MB/s",
        "engine / ceiling",
        "target",
        "peak RSS",
        "CPU engine+moto",
        "CPU PUTs+moto",
        "CPU others",
    ):
        ingest.add_column(column, justify="right", no_wrap=column == "target")
    for row in report["ingest"]:
        target = TARGETS["ingest 64 KiB"] if row["write_size"] == 64 * KiB else None
        ingest.add_row(
            _common.size_label(row["write_size"]),
            _common.size_label(row["total_bytes"]),
            f"{row['segments']} (+{row['format_overhead'] * 100:.1f}%)",
            f"{row['accept_mb_s']:.0f}",
            f"{row['engine_mb_s']:.0f}",
            f"{row['ceiling_mb_s']:.0f}",
            f"{row['ratio']:.2f}",
            _verdict(row["ratio"], target),
            f"{_common.mib(row['engine_peak_rss']):.0f} MiB",
            *_cpu_cells(row),
        )
    console.print(ingest)

    recovery = Table(
        title="Recovery with recover_to_files vs plain GETs of the same segments (best runs)"
    )
    for column in (
        "disk",
        "recovery MB/s",
        "GET ceiling MB/s",
        "GET + write + fsync MB/s",
        "engine / ceiling",
        "target",
        "engine / (GET + write + fsync)",
        "peak RSS",
        "CPU engine+moto",
        "CPU GETs+moto",
        "CPU others",
    ):
        recovery.add_column(column, justify="right", no_wrap=column == "target")
    for row in report["recovery"]:
        recovery.add_row(
            _common.size_label(row["disk_bytes"]),
            f"{row['engine_mb_s']:.0f}",
            f"{row['ceiling_mb_s']:.0f}",
            f"{row['disk_reference_mb_s']:.0f}",
            f"{row['ratio']:.2f}",
            _verdict(row["ratio"], TARGETS["recovery"]),
            f"{row['disk_reference_ratio']:.2f}",
            f"{_common.mib(row['engine_peak_rss']):.0f} MiB",
            *_cpu_cells(row),
        )
    console.print(recovery)

    memory = Table(
        title="Peak RSS of each phase's process (VmHWM), by bytes written or disk size; "
        "in brackets: RSS just before the measured work"
    )
    memory.add_column("phase")
    sizes = sorted({size for entry in report["memory"].values() for size in entry})
    for size in sizes:
        memory.add_column(_common.size_label(int(size)), justify="right")
    for phase, by_size in report["memory"].items():
        memory.add_row(
            phase,
            *(
                f"{_common.mib(by_size[size]['peak']):.0f} MiB "
                f"({_common.mib(by_size[size]['baseline']):.0f})"
                if size in by_size
                else "—"
                for size in sizes
            ),
        )
    console.print(memory)
    console.print(
        "MB/s = 10^6 bytes/s. engine / ceiling = time of the plain requests over time of the "
        "engine for the same objects. CPU = CPU time over wall time (100% = one core of "
        f"{report['machine']['nproc']}): the engine's (or plain client's) process, all threads, "
        "+ the moto server's; 'others' = every other process on the machine meanwhile."
    )
    busy = [
        row for row in report["ingest"] + report["recovery"] if row["other_cpu_share"] > BUSY_SHARE
    ]
    if busy:
        console.print(
            "[bold yellow]warning:[/] other processes used more than "
            f"{_pct(BUSY_SHARE)} of a core during {len(busy)} of the measurements (red "
            "above): the machine was not quiet, and those figures are disturbed."
        )


def _targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for row in report["ingest"]:
        if row["write_size"] == 64 * KiB:
            found.append(
                {
                    "name": "ingest 64 KiB, engine / PUT ceiling",
                    "value": row["ratio"],
                    "target": TARGETS["ingest 64 KiB"],
                }
            )
    if report["recovery"]:
        largest = max(report["recovery"], key=lambda row: row["disk_bytes"])
        found.append(
            {
                "name": f"recovery of {_common.size_label(largest['disk_bytes'])}, "
                "engine / GET ceiling",
                "value": largest["ratio"],
                "target": TARGETS["recovery"],
            }
        )
    for item in found:
        item["met"] = item["value"] >= item["target"]
    return found


def run_parent(args: argparse.Namespace) -> int:
    from rich.console import Console

    _common.ensure_repo_on_path()
    from tests.s3server import MotoServer

    console = Console(width=None if sys.stdout.isatty() else 160)
    started = time.monotonic()
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    total = args.ingest_bytes
    big = 1 * GiB
    info = _common.machine()
    settings = _journal_defaults()
    console.rule("Ebbtide journal benchmark")
    console.print(
        f"machine: {info['nproc']} CPUs ({info['cpu']}), {info['memory_gib']} GiB RAM, "
        f"Linux {info['kernel']}; Python {info['python']}, pyarrow {info['pyarrow']}, "
        f"aiobotocore {info['aiobotocore']}, moto {info['moto']} (moto_server on 127.0.0.1, "
        "sharing the CPUs)"
    )
    console.print(
        f"journal: segmentMaxBytes {_common.size_label(settings['segment_max_bytes'])}, "
        f"uploadConcurrency {settings['upload_concurrency']}, maxUnshippedBytes "
        f"{_common.size_label(settings['max_unshipped_bytes'])}; checkpoints: automatic every "
        f"{settings['checkpoint_interval_seconds']:g} s, plus one tagged checkpoint after the "
        f"last write, inside the timing; {reps} repetition(s)"
        + ("; --quick: no 1 GiB variants" if args.quick else "")
    )
    server = MotoServer.start()
    try:
        runner = Runner(server, console, args.tmpdir, args.profile)
        ingest = [
            runner.ingest(size, total, reps, keep=size == WRITE_SIZES[-1]) for size in WRITE_SIZES
        ]
        # The last journal written (1 MiB writes over a disk of `total` bytes) stays in
        # the bucket: it is the source of the first recovery.
        recovery = [runner.recovery(ingest[-1], reps)]
        big_ingest = None
        if not args.quick:
            big_ingest = runner.ingest(1 * MiB, big, 1, keep=True)
            recovery.append(runner.recovery(big_ingest, reps))
        memory = _memory([ingest[-1]] + ([big_ingest] if big_ingest else []), recovery)
    except _common.BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}")
        return 1
    finally:
        server.stop()
    report: dict[str, Any] = {
        "bench": "journal",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([".venv/bin/python", "bench/journal.py", *sys.argv[1:]]),
        "quick": args.quick,
        "reps": reps,
        "machine": info,
        "settings": settings,
        "ingest": ingest,
        "big_ingest": big_ingest,
        "recovery": recovery,
        "memory": memory,
    }
    report["targets"] = _targets(report)
    report["seconds"] = time.monotonic() - started
    render(console, report)
    for target in report["targets"]:
        verdict = "[green]met[/]" if target["met"] else "[bold red]MISSED[/]"
        console.print(
            f"target: {target['name']} = {target['value']:.2f} (≥ {target['target']}) {verdict}"
        )
    out = pathlib.Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    _common.write_result(out, report)
    console.print(f"figures written to {out} ({report['seconds']:.0f} s in all)")
    if args.strict and not all(target["met"] for target in report["targets"]):
        return 3
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="one repetition, no 1 GiB variants")
    parser.add_argument("--reps", type=int, help="repetitions of each pair (default 3; 1 quick)")
    parser.add_argument(
        "--ingest-bytes",
        type=lambda text: int(text) * MiB,
        default=256 * MiB,
        metavar="MIB",
        help="bytes written per write size, in MiB (default 256)",
    )
    parser.add_argument(
        "--output",
        default=str(_common.RESULTS / "journal.json"),
        help="where to write the JSON figures (default bench/results/journal.json)",
    )
    parser.add_argument("--tmpdir", help="directory for the recovered images (default: $TMPDIR)")
    parser.add_argument(
        "--strict", action="store_true", help="exit 3 if a performance target is missed"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the engine phases under cProfile; profiles go to bench/results/profiles/",
    )
    # Internal: how the parent runs one phase in a child process.
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--vpg", help=argparse.SUPPRESS)
    parser.add_argument("--write-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--disk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", help=argparse.SUPPRESS)
    parser.add_argument("--expected-sha256", help=argparse.SUPPRESS)
    parser.add_argument("--expect-image", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--write-image", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        return run_child(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
