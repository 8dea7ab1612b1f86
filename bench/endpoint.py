"""Endpoint benchmark: a 1 GiB image written through the replication endpoint vs qemu-nbd.

Run ``.venv/bin/python bench/endpoint.py [--quick]``. It starts a moto S3
server on 127.0.0.1 (``tests/s3server.py``), generates a 1 GiB random
(incompressible) raw image, and writes it into an NBD export with two
clients, ``qemu-img convert -n`` and ``nbdcopy``, served two ways:

1. ``ebbtide endpoint`` (a child process) with one Proxy disk backed by a
   sparse 1 GiB file, journaling every write to the moto bucket with the
   spec's default journal settings (segmentMaxBytes 16 MiB, uploadConcurrency
   8, maxUnshippedBytes 256 MiB, maxSpillBytes 4 GiB: past the memory bound,
   segments spill to the state directory, on the same local disk);
2. ``qemu-nbd -f raw`` serving a plain sparse 1 GiB file: the ceiling.

Timed span: the client process, start to exit (qemu-img sends a FLUSH at
the end, nbdcopy none): the *acknowledged* throughput, which the target
ratio is about. For the endpoint it also records when the checkpoint taken
as the client disconnected became durable (every byte in the bucket: the
*durable* throughput, and the endpoint's CPU time up to then), the most
bytes its spill directory held (sampled every 20 ms), and the endpoint
process's peak RSS (VmHWM, read from /proc before it is stopped). After
each endpoint run, outside any timing, the latest checkpoint is recovered
from the bucket and its SHA-256 compared with the image's: a wrong byte
fails the benchmark. Then the S3 server is emptied (moto holds objects in
its own memory; a real bucket is not on the endpoint's machine).

Target: endpoint >= 0.5 of qemu-nbd for each client. Results: a table, and
JSON in ``bench/results/endpoint.json``. See bench/README.md and
docs/endpoint.md for the figures and how to read them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common
from _common import GiB, MiB

BUCKET = "ebbtide-bench"
TARGET = 0.5  # endpoint / qemu-nbd
CLIENTS = ("qemu-img", "nbdcopy")
EBBTIDE = pathlib.Path(sys.executable).parent / "ebbtide"
SCRIPT = pathlib.Path(__file__).resolve()
BUSY_SHARE = 0.15

SPEC = """\
apiVersion: ebbtide.io/v1alpha1
kind: VirtualProtectionGroup
metadata:
  name: {name}
spec:
  checkpointInterval: 1h  # only the checkpoint taken when the client disconnects
  journal:
    maxUnshippedBytes: {bound}
  vms:
    - name: vm
      disks:
        - name: disk
          size: {size}
          mode: Proxy
          source:
            path: {path}
"""


def _image(path: pathlib.Path, size: int) -> str:
    """Write ``size`` random bytes to ``path``; returns their SHA-256."""
    import numpy as np

    rng = np.random.default_rng(20261122)
    digest = hashlib.sha256()
    with path.open("wb") as file:
        for _ in range(size // (64 * MiB)):
            chunk = rng.bytes(64 * MiB)
            digest.update(chunk)
            file.write(chunk)
    return digest.hexdigest()


def _sparse(path: pathlib.Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with path.open("wb") as file:
        file.truncate(size)


def _client_command(client: str, image: pathlib.Path, url: str) -> list[str]:
    if client == "qemu-img":
        return ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), url]
    return ["nbdcopy", str(image), url]


def _vm_hwm(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


class Measure:
    """Wall time of a span, with the CPU time of given processes and of everything else."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def __enter__(self) -> Measure:
        self._busy = _common.machine_busy_seconds()
        self._cpu = {name: _common.process_cpu_seconds(pid) for name, pid in self.pids.items()}
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu = {
            name: _common.process_cpu_seconds(pid) - self._cpu[name]
            for name, pid in self.pids.items()
        }
        busy = _common.machine_busy_seconds() - self._busy
        self.others = max(0.0, busy - sum(self.cpu.values()))


class SpillSampler:
    """The largest total size of the files in a directory, sampled in a thread."""

    def __init__(self, directory: pathlib.Path) -> None:
        import threading

        self.directory = directory
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> SpillSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            total = 0
            with contextlib.suppress(FileNotFoundError):  # no spill directory (yet)
                for entry in os.scandir(self.directory):
                    with contextlib.suppress(FileNotFoundError):  # uploaded meanwhile
                        total += entry.stat().st_size
            self.peak = max(self.peak, total)


def _run_client(client: str, image: pathlib.Path, url: str, pids: dict[str, int]) -> Measure:
    command = _client_command(client, image, url)
    with Measure(pids) as measure:
        completed = subprocess.run(command, capture_output=True, check=False)
    if completed.returncode != 0:
        output = (completed.stdout + completed.stderr).decode(errors="replace")
        raise _common.BenchError(f"{' '.join(command)} failed:\n{output[-2000:]}")
    return measure


class Bench:
    def __init__(
        self, args: argparse.Namespace, endpoint_url: str, server_pid: int, work: pathlib.Path
    ) -> None:
        self.args = args
        self.s3 = endpoint_url
        self.server_pid = server_pid
        self.size: int = args.size_mib * MiB
        self.work = work
        self.image = self.work / "image.raw"
        self.target = self.work / "target.raw"
        self.runs = 0

    def storage_url(self, prefix: str) -> str:
        return f"s3://{BUCKET}/{prefix}?endpoint={self.s3}&region={_common.REGION}"

    def qemu_nbd(self, client: str) -> dict[str, Any]:
        _sparse(self.target, self.size)
        port = _free_port()
        target = [str(self.target)]
        server = subprocess.Popen(
            ["qemu-nbd", "-f", "raw", "-x", "disk", "-b", "127.0.0.1", "-p", str(port), *target],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_port(port)
            url = f"nbd://127.0.0.1:{port}/disk"
            measure = _run_client(client, self.image, url, {"server": server.pid})
        finally:
            server.terminate()
            server.wait(timeout=30)
        return {
            "server": "qemu-nbd",
            "client": client,
            "seconds": measure.seconds,
            "mb_per_s": _common.mb_per_s(self.size, measure.seconds),
            "server_cpu_seconds": measure.cpu["server"],
            "other_cpu_seconds": measure.others,
        }

    def endpoint(self, client: str, *, unbounded: bool = False) -> dict[str, Any]:
        """One run through ``ebbtide endpoint``; ``unbounded``: maxUnshippedBytes above the image.

        With the default bound (256 MiB) the client waits for the bucket once
        that much is unshipped; unbounded, it never waits, which shows what
        the endpoint's own path does (and what buffering a whole burst costs
        in memory).
        """
        self.runs += 1
        name = f"bench-{self.runs}"
        _sparse(self.target, self.size)
        spec = self.work / f"{name}.yaml"
        bound = self.size + 256 * MiB if unbounded else 256 * MiB
        spec.write_text(SPEC.format(name=name, size=self.size, path=self.target, bound=bound))
        state = self.work / "state"
        port = _free_port()
        url = f"nbd://127.0.0.1:{port}/{name}/vm/disk"
        storage = self.storage_url(f"run-{os.getpid()}")
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        log = (self.work / f"{name}.log").open("w+")
        rest = ["--port", str(port), str(spec)]
        endpoint = subprocess.Popen(
            [str(EBBTIDE), "endpoint", "--storage", storage, "--state-dir", str(state), *rest],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            _wait_for(log, f"{name}/vm/disk: Protecting", endpoint)
            known = len(asyncio.run(_checkpoints(storage, name)))
            pids = {"endpoint": endpoint.pid, "s3": self.server_pid}
            cpu_before = _common.process_cpu_seconds(endpoint.pid)
            with SpillSampler(state / name / "spill") as spill:
                measure = _run_client(client, self.image, url, pids)
                started = time.perf_counter() - measure.seconds
                asyncio.run(_durable(storage, name, known))
                durable_seconds = time.perf_counter() - started
            cpu_durable = _common.process_cpu_seconds(endpoint.pid) - cpu_before
            hwm = _vm_hwm(endpoint.pid)
            endpoint.send_signal(signal.SIGTERM)
            code = endpoint.wait(timeout=120)
            if code != 0:
                log.seek(0)
                raise _common.BenchError(f"the endpoint exited {code}:\n{log.read()[-3000:]}")
        finally:
            if endpoint.poll() is None:
                endpoint.kill()
                endpoint.wait()
            log.close()
        verified = asyncio.run(_recovered_sha256(storage, name, self.work / "recovered"))
        if verified != self.args.image_sha256:
            raise _common.BenchError(
                f"{name}: the recovered disk's SHA-256 is {verified}, the image's is "
                f"{self.args.image_sha256}: the endpoint lost or misplaced writes"
            )
        return {
            "server": "endpoint-unbounded" if unbounded else "endpoint",
            "max_unshipped_bytes": bound,
            "client": client,
            "seconds": measure.seconds,
            "mb_per_s": _common.mb_per_s(self.size, measure.seconds),
            "durable_seconds": durable_seconds,
            "durable_mb_per_s": _common.mb_per_s(self.size, durable_seconds),
            "endpoint_cpu_seconds": measure.cpu["endpoint"],
            "endpoint_cpu_durable_seconds": cpu_durable,
            "peak_spilled_bytes": spill.peak,
            "s3_cpu_seconds": measure.cpu["s3"],
            "other_cpu_seconds": measure.others,
            "peak_rss_bytes": hwm,
            "verified": True,
        }


def put_ceiling(storage: str, size: int) -> dict[str, Any]:
    """Plain create-only PUTs of 16 MiB objects through the engine's S3 backend, 8 at a time.

    What the journal's uploads cost without the engine around them: the same
    client, object size (segmentMaxBytes) and concurrency (uploadConcurrency).
    Runs in a child process, like the endpoint.
    """
    import numpy as np

    body = np.random.default_rng(7).bytes(16 * MiB)

    async def put_all() -> float:
        import ebbtide_engine as ebbtide

        async with ebbtide.open_store(storage) as store:
            keys = iter(range(size // len(body)))
            started = time.perf_counter()

            async def worker() -> None:
                for index in keys:
                    await store.put_new(f"ceiling/{index:06d}", body)

            await asyncio.gather(*(worker() for _ in range(8)))
            return time.perf_counter() - started

    seconds = asyncio.run(put_all())
    return {"seconds": seconds, "mb_per_s": _common.mb_per_s(size, seconds)}


async def _checkpoints(storage: str, vpg: str) -> list[Any]:
    import ebbtide_engine as ebbtide

    async with ebbtide.open_store(storage) as store:
        return await ebbtide.list_checkpoints(store, vpg)


async def _durable(storage: str, vpg: str, known: int) -> None:
    """Wait for the checkpoint the endpoint takes when the client disconnects.

    With a checkpoint interval of an hour it is the only one after the
    ``known`` ones: once it is listed, every byte the client wrote is in the
    bucket.
    """
    import ebbtide_engine as ebbtide

    async with ebbtide.open_store(storage) as store:
        deadline = time.monotonic() + 600
        while len(await ebbtide.list_checkpoints(store, vpg)) <= known:
            if time.monotonic() > deadline:
                raise _common.BenchError(f"{vpg}: no checkpoint after the client ended")
            await asyncio.sleep(0.05)


async def _recovered_sha256(storage: str, vpg: str, out_dir: pathlib.Path) -> str:
    import ebbtide_engine as ebbtide

    async with ebbtide.open_store(storage) as store:
        result = await ebbtide.recover_to_files(
            store, vpg, ebbtide.CheckpointSelector(latest=True), out_dir
        )
    digest = hashlib.sha256()
    path = result.disks[0].path
    with path.open("rb") as file:
        while chunk := file.read(16 * MiB):
            digest.update(chunk)
    path.unlink()
    return digest.hexdigest()


def _free_port() -> int:
    from tests import s3server

    return s3server.free_port()


def _wait_port(port: int, timeout: float = 10) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _empty(server: Any) -> None:
    """Empty the S3 server between runs and create the bucket again.

    moto keeps every object in its own memory: without this, the gigabytes of
    earlier runs squeeze the page cache that the next run writes through, and
    later runs measured slower than earlier ones of the same kind.
    """
    server.reset()
    server.create_bucket(BUCKET)


def _wait_for(log: Any, text: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        log.seek(0)
        content = log.read()
        if text in content:
            return
        if process.poll() is not None or time.monotonic() > deadline:
            raise _common.BenchError(f"the endpoint did not print {text!r}:\n{content[-3000:]}")
        time.sleep(0.05)


# --- report -------------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]], put_ceiling: float, size: int) -> list[dict[str, Any]]:
    gib = size / GiB
    rows = []
    for client in CLIENTS:
        ours = [r for r in runs if r["client"] == client and r["server"] == "endpoint"]
        unbounded = [
            r for r in runs if r["client"] == client and r["server"] == "endpoint-unbounded"
        ]
        ceiling = [r for r in runs if r["client"] == client and r["server"] == "qemu-nbd"]
        if not ours or not ceiling:
            continue
        ratios = [a["mb_per_s"] / b["mb_per_s"] for a, b in zip(ours, ceiling, strict=True)]
        durable_ratios = [
            a["durable_mb_per_s"] / b["mb_per_s"] for a, b in zip(ours, ceiling, strict=True)
        ]
        rows.append(
            {
                "client": client,
                "endpoint_mb_per_s": _common.median([r["mb_per_s"] for r in ours]),
                "durable_mb_per_s": _common.median([r["durable_mb_per_s"] for r in ours]),
                "unbounded_mb_per_s": _common.median([r["mb_per_s"] for r in unbounded])
                if unbounded
                else None,
                "unbounded_peak_rss_bytes": max(r["peak_rss_bytes"] for r in unbounded)
                if unbounded
                else None,
                "qemu_nbd_mb_per_s": _common.median([r["mb_per_s"] for r in ceiling]),
                "ratio": _common.median(ratios),
                "durable_ratio": _common.median(durable_ratios),
                "peak_spilled_bytes": max(r["peak_spilled_bytes"] for r in ours),
                "endpoint_cpu_seconds_per_gib": _common.median(
                    [r["endpoint_cpu_durable_seconds"] for r in ours]
                )
                / gib,
                "put_ceiling_mb_per_s": put_ceiling,
                "ratio_to_lower_ceiling": _common.median([r["mb_per_s"] for r in ours])
                / min(put_ceiling, _common.median([r["mb_per_s"] for r in ceiling])),
                "durable_ratio_to_lower_ceiling": _common.median(
                    [r["durable_mb_per_s"] for r in ours]
                )
                / min(put_ceiling, _common.median([r["mb_per_s"] for r in ceiling])),
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ours),
                "endpoint_cpu_seconds": _common.median([r["endpoint_cpu_seconds"] for r in ours]),
                "s3_cpu_seconds": _common.median([r["s3_cpu_seconds"] for r in ours]),
                "other_cpu_seconds": max(r["other_cpu_seconds"] for r in runs),
                "target": TARGET,
                "met": _common.median(ratios) >= TARGET,
            }
        )
    return rows


def render(console: Any, report: dict[str, Any]) -> None:
    import rich.table

    size = _common.size_label(report["size_bytes"])
    table = rich.table.Table(
        title=f"{size} random image into an NBD export, MB/s (median of {report['reps']})",
        title_justify="left",
    )
    for column in (
        "client",
        "endpoint acked",
        "durable",
        "qemu-nbd",
        "S3 PUT",
        "acked / qemu-nbd",
        "durable / qemu-nbd",
        "durable / lower ceiling",
        "peak spilled",
        "endpoint peak RSS",
        "endpoint CPU s/GiB",
        "unbounded (peak RSS)",
    ):
        table.add_column(column, justify="left" if column == "client" else "right")
    for row in report["summary"]:
        verdict = "[green]" if row["met"] else "[bold red]"
        unbounded = (
            "-"
            if row["unbounded_mb_per_s"] is None
            else f"{row['unbounded_mb_per_s']:.0f} "
            f"({_common.mib(row['unbounded_peak_rss_bytes']):.0f} MiB)"
        )
        table.add_row(
            row["client"],
            f"{row['endpoint_mb_per_s']:.0f}",
            f"{row['durable_mb_per_s']:.0f}",
            f"{row['qemu_nbd_mb_per_s']:.0f}",
            f"{row['put_ceiling_mb_per_s']:.0f}",
            f"{verdict}{row['ratio']:.2f}[/] (target {row['target']})",
            f"{row['durable_ratio']:.2f}",
            f"{row['durable_ratio_to_lower_ceiling']:.2f}",
            f"{_common.mib(row['peak_spilled_bytes']):.0f} MiB",
            f"{_common.mib(row['peak_rss_bytes']):.0f} MiB",
            f"{row['endpoint_cpu_seconds_per_gib']:.1f}",
            unbounded,
        )
    console.print(table)
    console.print(
        "endpoint acked: the client's run, start to exit, with the default journal settings "
        "(maxUnshippedBytes 256 MiB in memory, then a spill to local disk of up to 4 GiB); "
        "the target ratio is about it. durable: until the checkpoint taken when the client "
        "disconnected was committed (every byte in the bucket); S3 PUT: 16 MiB objects, 8 at "
        "a time, through the engine's S3 backend to the same moto server; lower ceiling: the "
        "slower of qemu-nbd and S3 PUT; peak spilled: the most the spill directory held; "
        "endpoint CPU: the endpoint process until durable, per GiB written; unbounded: "
        "maxUnshippedBytes above the image size, so nothing spills or waits. Every endpoint "
        "run was verified by recovering its latest checkpoint and comparing SHA-256s. CPU "
        "seconds per process are in the JSON.",
        style="dim",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 256 MiB image instead of 1 GiB")
    parser.add_argument("--reps", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--size-mib", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmpdir", help="where images go (a local disk; default: $TMPDIR)")
    parser.add_argument("--output", type=pathlib.Path, default=_common.RESULTS / "endpoint.json")
    parser.add_argument("--strict", action="store_true", help="exit 3 if a target is missed")
    parser.add_argument(
        "--no-unbounded",
        action="store_true",
        help="skip the runs with maxUnshippedBytes above the image size",
    )
    parser.add_argument("--phase", choices=["put"], help=argparse.SUPPRESS)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=pathlib.Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase == "put":
        _common.ensure_repo_on_path()
        size = (args.size_mib or GiB // MiB) * MiB
        _common.write_result(args.result, put_ceiling(args.storage, size))
        return 0
    args.size_mib = args.size_mib or (256 if args.quick else GiB // MiB)
    _common.ensure_repo_on_path()
    import rich.console
    from tests import s3server

    console = rich.console.Console()
    if not console.is_terminal:
        console = rich.console.Console(width=150)
    server = s3server.MotoServer.start()
    work = tempfile.TemporaryDirectory(prefix="ebbtide-bench-", dir=args.tmpdir)
    try:
        server.create_bucket(BUCKET)
        os.environ.update(
            AWS_ACCESS_KEY_ID=_common.ACCESS_KEY,
            AWS_SECRET_ACCESS_KEY=_common.SECRET_KEY,
            AWS_EC2_METADATA_DISABLED="true",
        )
        bench = Bench(args, server.endpoint, server.process.pid, pathlib.Path(work.name))
        with console.status(f"writing a {args.size_mib} MiB random image..."):
            args.image_sha256 = _image(bench.image, bench.size)
        runs: list[dict[str, Any]] = []
        ceilings: list[float] = []
        for rep in range(args.reps):
            with console.status(f"plain S3 PUTs (repetition {rep + 1})..."):
                storage = bench.storage_url(f"ceiling-{rep}")
                put = _common.run_phase(
                    SCRIPT, "put", ["--storage", storage, "--size-mib", str(args.size_mib)]
                )
            ceilings.append(put["mb_per_s"])
            _empty(server)
            console.print(f"  S3 PUT ceiling                       {put['mb_per_s']:7.0f} MB/s")
            for client in CLIENTS:
                order = ["endpoint", "qemu-nbd"] if rep % 2 == 0 else ["qemu-nbd", "endpoint"]
                if not args.no_unbounded:
                    order.append("endpoint-unbounded")
                for server_kind in order:
                    with console.status(f"{client} into {server_kind} (repetition {rep + 1})..."):
                        if server_kind == "qemu-nbd":
                            run = bench.qemu_nbd(client)
                        else:
                            run = bench.endpoint(client, unbounded=server_kind != "endpoint")
                    runs.append(run)
                    _empty(server)  # (each endpoint run was verified before it returned)
                    durable = (
                        f", durable after {run['durable_seconds']:.2f} s, peak spilled "
                        f"{_common.mib(run['peak_spilled_bytes']):.0f} MiB, peak RSS "
                        f"{_common.mib(run['peak_rss_bytes']):.0f} MiB"
                        if "durable_seconds" in run
                        else ""
                    )
                    console.print(
                        f"  {client:8} -> {server_kind:18} {run['mb_per_s']:7.0f} MB/s "
                        f"({run['seconds']:.2f} s{durable})"
                    )
    except _common.BenchError as exc:
        console.print(f"[bold red]benchmark failed:[/] {exc}")
        return 1
    finally:
        server.stop()
        work.cleanup()
    report = {
        "benchmark": "endpoint",
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": _common.machine(),
        "size_bytes": args.size_mib * MiB,
        "reps": args.reps,
        "runs": runs,
        "put_ceiling_mb_per_s": _common.median(ceilings),
        "summary": _summary(runs, _common.median(ceilings), args.size_mib * MiB),
    }
    busy = max(r["other_cpu_seconds"] / r["seconds"] for r in runs)
    if busy > BUSY_SHARE:
        console.print(
            f"[yellow]warning:[/] other processes used up to {busy:.0%} of a core during the "
            "runs; the figures are disturbed (run again on an idle machine)"
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    _common.write_result(args.output, report)
    render(console, report)
    console.print(f"results: {args.output}")
    if args.strict and not all(row["met"] for row in report["summary"]):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
