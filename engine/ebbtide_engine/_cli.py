"""The ``ebbtide`` command: the demo, and a reader's view of a storage account.

Subcommands:

- ``demo``: the embedded demo (see ``_demo``), the README's first command;
- ``checkpoints``: the durable checkpoints of a VPG (a table, or ``--json``);
- ``recover``: materialise a VPG's disks at a checkpoint as raw image files;
- ``status``: what the storage account tells about a VPG (manifest, checkpoints,
  journal sizes) without taking its lease;
- ``endpoint``: the replication endpoint of one VPG: its disks as NBD exports,
  every write journaled, until Ctrl-C or SIGTERM (see docs/endpoint.md).
- ``test-export``: a VPG's disks at a checkpoint as NBD exports for failover
  tests, served at once, writes to a scratch overlay, until Ctrl-C or SIGTERM
  (see docs/testexport.md).

``checkpoints``, ``recover`` and ``status`` only read the storage account, so
they are safe while a writer (``demo``, ``endpoint``) protects the VPG.
Output is for people (rich tables and progress bars); ``--json`` is for
scripts. An error the engine raises on purpose
(``EbbtideError``), or a local file that cannot be written, prints one red
line and exits 2, like bad usage; a failed verification in the demo exits 1.
S3 credentials come from the standard AWS environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import rich.console
import rich.live
import rich.logging
import rich.markup
import rich.panel
import rich.table
import rich.text
import yaml

import ebbtide_engine as ebbtide
from ebbtide_engine import _demo, _endpoint

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ebbtide`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    console = rich.console.Console(highlight=False)
    errors = rich.console.Console(stderr=True, highlight=False)
    try:
        result: int = asyncio.run(args.handler(args, console))
    except ebbtide.EbbtideError as exc:
        errors.print(_demo.error_text(str(exc)), soft_wrap=True)  # greppable: one line
        return EXIT_ERROR
    except OSError as exc:  # the local side: --out not writable, disk full...
        errors.print(_demo.error_text(str(exc)), soft_wrap=True)  # greppable: one line
        return EXIT_ERROR
    except KeyboardInterrupt:
        errors.print(rich.text.Text("interrupted", style="yellow"))
        return EXIT_INTERRUPTED
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ebbtide",
        description="Continuous data protection for Kubernetes: journals, checkpoints, recovery.",
    )
    parser.add_argument("--version", action="version", version=f"ebbtide {ebbtide.__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="protect a demo VPG with a built-in workload, then verify its recovery",
        description="Protect the VPG of examples/demo.yaml with a built-in write workload and "
        "a live display, then recover two of its checkpoints from storage and compare them "
        "byte for byte with an in-memory model of the disks.",
    )
    demo.add_argument(
        "--storage",
        metavar="URL",
        help="storage account URL (default: file://$PWD/.ebbtide/demo, created if missing)",
    )
    demo.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=_demo.DEFAULT_SECONDS,
        metavar="N",
        help=f"how long the workload runs (default {_demo.DEFAULT_SECONDS:g})",
    )
    demo.add_argument(
        "--examples",
        type=pathlib.Path,
        metavar="DIR",
        help="directory holding demo.yaml (default: ./examples, else the source tree's)",
    )
    demo.set_defaults(handler=_run_demo)

    checkpoints = commands.add_parser(
        "checkpoints",
        help="list the durable checkpoints of a VPG",
        description="List the durable checkpoints of a VPG, oldest first (reads only).",
    )
    _storage_arguments(checkpoints)
    checkpoints.add_argument("--json", action="store_true", help="print JSON for scripts")
    checkpoints.set_defaults(handler=_run_checkpoints)

    recover = commands.add_parser(
        "recover",
        help="write a VPG's disks at a checkpoint as raw image files",
        description="Recover the disks of a VPG (all VMs, or those named by --vm) at a durable "
        "checkpoint into OUT/<vm>/<disk>.raw (reads only).",
    )
    _storage_arguments(recover)
    recover.add_argument(
        "--checkpoint",
        required=True,
        metavar="SELECTOR",
        help="latest | id:N | N | tag:NAME | before:ISO-TIME (e.g. before:2026-11-22T10:00:00Z)",
    )
    recover.add_argument("--out", required=True, type=pathlib.Path, metavar="DIR")
    recover.add_argument(
        "--vm",
        action="append",
        dest="vms",
        metavar="NAME",
        help="recover only this VM (repeat for several; default: all)",
    )
    recover.add_argument(
        "--disk-file",
        action="append",
        dest="disk_files",
        type=_disk_file,
        default=[],
        metavar="VM/DISK=PATH",
        help="then move that disk's image to PATH, e.g. onto its own volume (repeat for several)",
    )
    recover.set_defaults(handler=_run_recover)

    status = commands.add_parser(
        "status",
        help="what the storage account tells about a VPG",
        description="Show a VPG's manifest (writer epoch and lease), its checkpoints and the "
        "size of each VM's journal, as read from the storage account.",
    )
    _storage_arguments(status)
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.set_defaults(handler=_run_status)

    endpoint = commands.add_parser(
        "endpoint",
        help="serve a VPG's disks over NBD and journal every write",
        description="Run the replication endpoint of the VirtualProtectionGroup in SPEC: one NBD "
        "export per disk (<vpg>/<vm>/<disk>), Proxy disks served from their source.path, "
        "Mirror disks as targets of QEMU's blockdev-mirror; every write is journaled to the "
        "storage account. Stops cleanly (final checkpoint) on Ctrl-C or SIGTERM.",
    )
    endpoint.add_argument(
        "spec",
        type=pathlib.Path,
        metavar="SPEC.yaml",
        help="a YAML file with one VirtualProtectionGroup resource (like examples/demo.yaml)",
    )
    endpoint.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="s3://BUCKET/PREFIX?endpoint=URL&region=R or file:///PATH",
    )
    endpoint.add_argument(
        "--state-dir",
        required=True,
        type=pathlib.Path,
        metavar="DIR",
        help="local directory for the dirty-region maps and mirror replicas (keep it across "
        "restarts: without it, a restart resynchronises whole disks)",
    )
    endpoint.add_argument(
        "--port", type=int, default=10809, help="TCP port (default 10809; 0 picks a free one)"
    )
    endpoint.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    endpoint.add_argument(
        "--takeover",
        choices=["wait", "fail", "force"],
        default="wait",
        help="if another writer holds the VPG: wait until its lease expires (default), fail, "
        "or force the takeover at once (after a crash)",
    )
    endpoint.set_defaults(handler=_run_endpoint)
    _test_export_parser(commands)
    return parser


def _storage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        required=True,
        metavar="URL",
        help="s3://BUCKET/PREFIX?endpoint=URL&region=R or file:///PATH",
    )
    parser.add_argument("--vpg", required=True, metavar="NAME", help="the VPG's name")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0")
    return value


def _open_store(url: str) -> ebbtide.ObjectStore:
    return ebbtide.open_store(ebbtide.StorageAccount.parse(url))


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2) + "\n")


# --- demo -----------------------------------------------------------------------


async def _run_demo(args: argparse.Namespace, console: rich.console.Console) -> int:
    verified = await _demo.run_demo(
        console, storage_url=args.storage, seconds=args.seconds, examples_dir=args.examples
    )
    if verified:
        url = args.storage or _demo.default_storage_url()
        console.print(
            "\nNext, read what the demo left in storage:\n"
            f"  ebbtide checkpoints --storage {rich.markup.escape(url)} --vpg {_demo.DEMO_VPG}\n"
            f"  ebbtide status --storage {rich.markup.escape(url)} --vpg {_demo.DEMO_VPG}\n"
            f"  ebbtide recover --storage {rich.markup.escape(url)} --vpg {_demo.DEMO_VPG} "
            "--checkpoint tag:demo-1 --out ./recovered"
        )
    return EXIT_OK if verified else EXIT_FAILED


# --- checkpoints ----------------------------------------------------------------


def _checkpoint_json(checkpoint: ebbtide.Checkpoint) -> dict[str, Any]:
    return {
        "id": checkpoint.id,
        "time": _demo.format_time(checkpoint.time),
        "timeNs": checkpoint.time_ns,
        "kind": _demo.KIND_NAMES.get(checkpoint.kind, checkpoint.kind.name),
        "tag": checkpoint.tag,
        "epoch": checkpoint.epoch,
    }


async def _run_checkpoints(args: argparse.Namespace, console: rich.console.Console) -> int:
    async with _open_store(args.storage) as store:
        checkpoints = await ebbtide.list_checkpoints(store, args.vpg)
    if args.json:
        _print_json([_checkpoint_json(c) for c in checkpoints])
        return EXIT_OK
    if not checkpoints:
        console.print(f"VPG {args.vpg!r} has no durable checkpoint yet.")
        return EXIT_OK
    tagged = sum(1 for c in checkpoints if c.tag)
    title = f"{len(checkpoints)} durable checkpoints of VPG {args.vpg!r} ({tagged} tagged)"
    console.print(_demo.checkpoint_table(checkpoints, title=title))
    return EXIT_OK


# --- recover --------------------------------------------------------------------


async def _run_recover(args: argparse.Namespace, console: rich.console.Console) -> int:
    selector = ebbtide.CheckpointSelector.parse(args.checkpoint)
    out_dir: pathlib.Path = args.out.resolve()
    async with _open_store(args.storage) as store:
        result = await _demo.recover_with_progress(
            console,
            store,
            args.vpg,
            selector,
            out_dir,
            label=f"recovering {args.vpg}",
            vms=args.vms,
        )
    checkpoint = result.checkpoint
    kind = _demo.KIND_NAMES.get(checkpoint.kind, checkpoint.kind.name)
    console.print(
        rich.text.Text.assemble(
            ("Recovered ", "bold green"),
            f"VPG {result.vpg!r} at checkpoint {checkpoint.id} ({kind}",
            f", tag {checkpoint.tag!r}" if checkpoint.tag else "",
            f") taken {_demo.format_time(checkpoint.time)}",
        )
    )
    table = rich.table.Table()
    table.add_column("VM")
    table.add_column("disk")
    table.add_column("size", justify="right")
    table.add_column("path")
    placed = await asyncio.to_thread(_place_disks, result.disks, args.disk_files)
    for disk in result.disks:
        path = placed.get((disk.vm, disk.disk), disk.path)
        table.add_row(disk.vm, disk.disk, _demo.format_size(disk.size), str(path))
    console.print(table)
    total = sum(disk.size for disk in result.disks)
    rate = result.bytes_read / result.seconds if result.seconds > 0 else 0.0
    console.print(
        f"{_demo.plural(len(result.disks), 'disk')} ({_demo.format_size(total)}) from "
        f"{_demo.plural(result.segments_read, 'journal segment')} "
        f"({_demo.format_bytes(result.bytes_read)}) in {result.seconds:.2f} s, "
        f"{_demo.format_bytes(int(rate))}/s"
    )
    return EXIT_OK


def _disk_file(text: str) -> tuple[str, str, pathlib.Path]:
    name, sep, path = text.partition("=")
    vm, slash, disk = name.partition("/")
    if not (sep and slash and vm and disk and path):
        raise argparse.ArgumentTypeError(f"{text!r}: say VM/DISK=PATH, e.g. web/root=/v/disk.img")
    return vm, disk, pathlib.Path(path)


def _place_disks(
    disks: Sequence[ebbtide.RecoveredDisk], moves: Sequence[tuple[str, str, pathlib.Path]]
) -> dict[tuple[str, str], pathlib.Path]:
    """Move recovered images to the paths asked for (a copy, keeping holes, across filesystems)."""
    recovered = {(d.vm, d.disk): d.path for d in disks}
    placed: dict[tuple[str, str], pathlib.Path] = {}
    for vm, disk, target in moves:
        source = recovered.get((vm, disk))
        if source is None:
            raise ebbtide.InvalidRequest(
                f"--disk-file {vm}/{disk}: no such disk was recovered "
                f"(recovered: {', '.join(f'{v}/{d}' for v, d in sorted(recovered))})"
            )
        partial = target.with_name(target.name + ".partial")
        try:
            source.replace(target)
        except OSError:  # another filesystem (a volume): copy, keeping holes, then rename
            _copy_sparse(source, partial)
            partial.replace(target)
            source.unlink()
        placed[vm, disk] = target
    return placed


def _copy_sparse(source: pathlib.Path, target: pathlib.Path, block: int = 1 << 20) -> None:
    zero = bytes(block)
    with source.open("rb") as src, target.open("wb") as dst:
        size = os.fstat(src.fileno()).st_size
        while chunk := src.read(block):
            if chunk == zero[: len(chunk)]:
                dst.seek(len(chunk), os.SEEK_CUR)
            else:
                dst.write(chunk)
        dst.truncate(size)
        dst.flush()
        os.fsync(dst.fileno())


# --- status ---------------------------------------------------------------------


async def _run_status(args: argparse.Namespace, console: rich.console.Console) -> int:
    async with _open_store(args.storage) as store:
        status = await ebbtide.read_bucket_status(store, args.vpg)
    now = time.time()
    if args.json:
        manifest = status.manifest
        last = status.checkpoints[-1] if status.checkpoints else None
        _print_json(
            {
                "vpg": status.vpg,
                "storage": status.storage,
                "manifest": {
                    "epoch": manifest.epoch,
                    "writer": manifest.writer,
                    "renewedAt": manifest.renewed_at,
                    "leaseSeconds": manifest.lease_seconds,
                },
                "checkpoints": len(status.checkpoints),
                "lastCheckpoint": None if last is None else _checkpoint_json(last),
                "lastCheckpointAgeSeconds": None if last is None else now - last.time_ns / 1e9,
                "journals": {
                    vm: {
                        "segments": usage.segments,
                        "bytes": usage.bytes,
                        "firstLsn": usage.first_lsn,
                        "lastLsn": usage.last_lsn,
                    }
                    for vm, usage in status.journals.items()
                },
            }
        )
        return EXIT_OK
    console.print(_status_panel(status, now))
    return EXIT_OK


def _status_panel(status: ebbtide.BucketStatus, now: float) -> rich.table.Table:
    manifest = status.manifest
    grid = rich.table.Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    grid.add_row("VPG", rich.text.Text(status.vpg, style="bold magenta"))
    grid.add_row("storage", rich.text.Text(status.storage))
    renewed = max(0.0, now - manifest.renewed_at)
    if manifest.writer is None:
        writer = rich.text.Text(
            f"none (released cleanly {_demo.format_seconds(renewed)} ago)", style="dim"
        )
    else:
        stale = renewed > manifest.lease_seconds
        writer = rich.text.Text.assemble(
            manifest.writer,
            (
                f"  lease renewed {_demo.format_seconds(renewed)} ago",
                "yellow" if stale else "green",
            ),
            " (not renewed within its lease: the writer may be gone)" if stale else "",
        )
    grid.add_row("epoch", str(manifest.epoch))
    grid.add_row("writer", writer)
    tagged = sum(1 for c in status.checkpoints if c.tag)
    grid.add_row("checkpoints", f"{len(status.checkpoints)} durable ({tagged} tagged)")
    if status.checkpoints:
        last = status.checkpoints[-1]
        age = max(0.0, now - last.time_ns / 1e9)
        grid.add_row(
            "last checkpoint",
            rich.text.Text(f"{_demo.describe_checkpoint(last)}, {_demo.format_seconds(age)} ago"),
        )
        first = status.checkpoints[0]
        grid.add_row(
            "history",
            f"{_demo.format_seconds(max(0.0, (last.time_ns - first.time_ns) / 1e9))} "
            f"(from {_demo.format_time(first.time)})",
        )
    journals = rich.table.Table(box=None, padding=(0, 2, 0, 0), show_edge=False)
    journals.add_column("VM")
    journals.add_column("segments", justify="right")
    journals.add_column("bytes", justify="right")
    journals.add_column("LSNs")
    for vm, usage in status.journals.items():
        journals.add_row(
            vm,
            f"{usage.segments:,}",
            _demo.format_bytes(usage.bytes),
            f"{usage.first_lsn}..{usage.last_lsn}",
        )
    total = sum(u.bytes for u in status.journals.values())
    grid.add_row("journal", f"{_demo.format_bytes(total)} in all")
    grid.add_row("", journals if status.journals else rich.text.Text("empty", style="dim"))
    return grid


# --- endpoint -------------------------------------------------------------------

#: How often the live display (or, without a terminal, the state check) refreshes.
_ENDPOINT_REFRESH = 0.5


def _load_vpg(path: pathlib.Path) -> ebbtide.VpgSpec:
    """The one VirtualProtectionGroup in the YAML file at ``path``."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except FileNotFoundError:
        raise ebbtide.SpecError(f"{path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ebbtide.SpecError(f"{path} is not readable YAML: {exc}") from None
    found = [
        doc
        for doc in documents
        if isinstance(doc, dict) and doc.get("kind") == "VirtualProtectionGroup"
    ]
    if len(found) != 1:
        names = ", ".join(str((doc.get("metadata") or {}).get("name")) for doc in found)
        raise ebbtide.SpecError(
            f"{path} holds {len(found)} VirtualProtectionGroup resources"
            + (f" ({names})" if names else "")
            + "; an endpoint serves exactly one: keep one per file"
        )
    try:
        return ebbtide.VpgSpec.from_resource(found[0])
    except ebbtide.SpecError as exc:
        raise ebbtide.SpecError(f"{path}: {exc}") from None


async def _run_endpoint(args: argparse.Namespace, console: rich.console.Console) -> int:
    spec = _load_vpg(args.spec)
    account = ebbtide.StorageAccount.parse(args.storage)
    if account.scheme == "file":
        await asyncio.to_thread(pathlib.Path(account.bucket).mkdir, parents=True, exist_ok=True)
    options = _endpoint.EndpointOptions(host=args.host, port=args.port)
    runtime_options = ebbtide.RuntimeOptions(takeover=args.takeover)
    with _engine_log():
        async with ebbtide.open_store(account) as store:
            with console.status("Taking the writer lease and reading the journal from storage..."):
                endpoint = await _endpoint.Endpoint.open(
                    spec, store, args.state_dir, options=options, runtime_options=runtime_options
                )
            try:
                _print_exports(console, endpoint, store.description)
                stop = asyncio.Event()
                with _stop_on_signals(stop, console):
                    await _watch_endpoint(console, endpoint, stop)
            except BaseException:
                await endpoint.abort()
                raise
            console.print("Stopping: shipping every write and committing a final checkpoint...")
            await endpoint.close()
    status = endpoint.status()
    last = status.runtime.last_checkpoint
    console.print(
        f"[bold green]Closed cleanly:[/] final checkpoint {last.id if last else '-'} durable, "
        f"dirty maps written, writer lease released."
    )
    return EXIT_OK


def _print_exports(
    console: rich.console.Console, endpoint: _endpoint.Endpoint, storage: str
) -> None:
    status = endpoint.status()
    console.print(
        f"Serving VPG [bold magenta]{status.vpg}[/] (writer epoch {status.runtime.epoch}) "
        f"journaling to [bold]{rich.markup.escape(storage)}[/]"
    )
    for disk in status.disks:
        line = f"  {disk.url}  {disk.mode}  {disk.state}"
        console.print(line + (f": {disk.message}" if disk.message else ""), soft_wrap=True)
    console.print("Ctrl-C or SIGTERM stops cleanly.")


async def _watch_endpoint(
    console: rich.console.Console, endpoint: _endpoint.Endpoint, stop: asyncio.Event
) -> None:
    """A live panel on a terminal; otherwise one line per change of a disk's state."""
    if console.is_terminal:
        with rich.live.Live(
            _endpoint_panel(endpoint.status()), console=console, auto_refresh=False
        ) as live:
            while not await _wait(stop, _ENDPOINT_REFRESH):
                live.update(_endpoint_panel(endpoint.status()), refresh=True)
        return
    shown = {disk.export: disk.state for disk in endpoint.status().disks}
    while not await _wait(stop, _ENDPOINT_REFRESH):
        for disk in endpoint.status().disks:
            if shown[disk.export] != disk.state:
                shown[disk.export] = disk.state
                message = f": {disk.message}" if disk.message else ""
                console.print(f"{disk.export}: {disk.state}{message}", soft_wrap=True)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """True once ``event`` is set; False after ``seconds`` without it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
    return event.is_set()


def _endpoint_panel(status: _endpoint.EndpointStatus) -> rich.panel.Panel:
    runtime = status.runtime
    grid = rich.table.Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    style = {"protecting": "green", "closed": "blue"}.get(status.state, "bold red")
    grid.add_row(
        "state",
        rich.text.Text.assemble(
            (status.state, style),
            f"   epoch {runtime.epoch}   next LSN {runtime.next_lsn:,}   "
            f"{_demo.plural(status.connections, 'client connection')}",
        ),
    )
    last = runtime.last_checkpoint
    grid.add_row(
        "checkpoint",
        rich.text.Text("none durable yet", style="yellow")
        if last is None
        else rich.text.Text(_demo.describe_checkpoint(last)),
    )
    if status.rpo_seconds is None:
        grid.add_row("RPO", rich.text.Text("-", style="yellow"))
    else:
        good = status.rpo_seconds <= status.target_rpo_seconds
        grid.add_row(
            "RPO",
            rich.text.Text.assemble(
                (_demo.format_seconds(status.rpo_seconds), "green" if good else "bold red"),
                f"   (target {_demo.format_seconds(status.target_rpo_seconds)})",
            ),
        )
    waiting = status.writes_wait
    spill = (
        f"   spilled {_demo.format_bytes(status.spilled_bytes)} of "
        f"{_demo.format_bytes(status.max_spill_bytes)}"
        if status.max_spill_bytes
        else "   no spill"
    )
    grid.add_row(
        "shipping",
        rich.text.Text.assemble(
            (
                f"unshipped {_demo.format_bytes(status.unshipped_bytes)}, in memory "
                f"{_demo.format_bytes(status.memory_bytes)} of "
                f"{_demo.format_bytes(status.max_unshipped_bytes)}{spill}",
                "bold yellow" if waiting else "",
            ),
            " (writes wait)" if waiting else "",
            " (uploads hold for a burst)" if runtime.uploads_held else "",
            f"   shipped {_demo.format_bytes(runtime.shipped_bytes)}   "
            f"uploads pending {runtime.pending_uploads}   retries {runtime.upload_retries}",
        ),
    )
    if runtime.last_error:
        grid.add_row("last error", rich.text.Text(runtime.last_error, style="red"))
    disks = rich.table.Table(box=None, padding=(0, 2, 0, 0), show_edge=False)
    for column in ("export", "mode", "state", "progress", "dirty", "writes", "written"):
        disks.add_column(column, justify="right" if column in ("writes", "written") else "left")
    notes = []
    for disk in status.disks:
        done = disk.state == _endpoint.SyncState.PROTECTING
        percent = 100.0 * disk.done_bytes / disk.total_bytes if disk.total_bytes else 100.0
        disks.add_row(
            disk.export,
            disk.mode,
            rich.text.Text(str(disk.state), style="green" if done else "bold yellow"),
            "" if done else f"{percent:.0f}% of {_demo.format_bytes(disk.total_bytes)}",
            f"{disk.dirty_regions} x {_demo.format_size(disk.region_size)}",
            f"{disk.writes:,}",
            _demo.format_bytes(disk.bytes_written),
        )
        if disk.message:
            notes.append(rich.text.Text(f"{disk.export}: {disk.message}", style="yellow"))
    grid.add_row("disks", disks)
    for note in notes:
        grid.add_row("", note)
    title = rich.text.Text.assemble(("VPG ", "bold"), (status.vpg, "bold magenta"))
    hint = rich.text.Text("Ctrl-C stops cleanly", style="dim")
    return rich.panel.Panel(grid, title=title, title_align="left", subtitle=hint)


@contextlib.contextmanager
def _stop_on_signals(stop: asyncio.Event, console: rich.console.Console) -> Iterator[None]:
    """SIGTERM or a first Ctrl-C set ``stop`` (a clean close); a second Ctrl-C interrupts."""
    loop = asyncio.get_running_loop()

    def stopping(signum: int) -> None:
        stop.set()
        if signum == signal.SIGINT:
            loop.remove_signal_handler(signal.SIGINT)
        console.print(f"[yellow]{signal.Signals(signum).name}:[/] stopping cleanly.")

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stopping, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: the default handling stays
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


@contextlib.contextmanager
def _engine_log() -> Iterator[None]:
    """Engine warnings (resyncs, retries, a previous writer's void writes) go to stderr."""
    logger = logging.getLogger("ebbtide")
    handler = rich.logging.RichHandler(
        console=rich.console.Console(stderr=True, highlight=False),
        show_path=False,
        level=logging.WARNING,
    )
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


# --- test-export --------------------------------------------------------------------


def _test_export_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "test-export",
        help="serve a VPG's disks at a checkpoint over NBD for a failover test",
        description="Serve the disks of a VPG (all VMs, or those named by --vm) as they were at "
        "a durable checkpoint, as NBD exports <vpg>/<vm>/<disk>, at once: reads are fetched "
        "from the storage account on demand, writes go to a scratch overlay under --scratch "
        "and never to the bucket. Holds the VPG (promotion deletes nothing meanwhile). Ctrl-C "
        "or SIGTERM stops, deletes the scratch overlay and releases the hold.",
    )
    _storage_arguments(parser)
    parser.add_argument(
        "--checkpoint",
        required=True,
        metavar="SELECTOR",
        help="latest | id:N | N | tag:NAME | before:ISO-TIME (e.g. before:2026-11-22T10:00:00Z)",
    )
    parser.add_argument(
        "--scratch",
        required=True,
        type=pathlib.Path,
        metavar="DIR",
        help="local directory for the test VMs' writes (a private subdirectory, deleted at exit)",
    )
    parser.add_argument(
        "--vm", action="append", dest="vms", metavar="NAME", help="export only this VM (repeat)"
    )
    parser.add_argument(
        "--port", type=int, default=10810, help="TCP port (default 10810; 0 picks a free one)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument(
        "--advertise-host", metavar="NAME", help="host name to put in the URLs (default: --host)"
    )
    parser.add_argument(
        "--cache-mib", type=int, default=256, help="cache of fetched objects, MiB (default 256)"
    )
    parser.set_defaults(handler=_run_test_export)


async def _run_test_export(args: argparse.Namespace, console: rich.console.Console) -> int:
    selector = ebbtide.CheckpointSelector.parse(args.checkpoint)
    options = ebbtide.RecoveryExportOptions(
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        cache_bytes=args.cache_mib << 20,
    )
    owner = f"cli/{socket.gethostname()}/{os.getpid()}"
    with _engine_log():
        async with _open_store(args.storage) as store:
            with console.status("Holding the VPG and reading its journal..."):
                export = await ebbtide.RecoveryExport.open(
                    store, args.vpg, selector, args.scratch, vms=args.vms, options=options,
                    owner=owner,
                )  # fmt: skip
            async with export:
                checkpoint = export.checkpoint
                kind = _demo.KIND_NAMES.get(checkpoint.kind, checkpoint.kind.name)
                console.print(
                    f"Serving VPG [bold magenta]{args.vpg}[/] at checkpoint {checkpoint.id} "
                    f"({kind}{f', tag {checkpoint.tag!r}' if checkpoint.tag else ''}) taken "
                    f"{_demo.format_time(checkpoint.time)}; writes go to "
                    f"{rich.markup.escape(str(export.scratch_path))}"
                )
                for url in sorted(export.urls().values()):
                    console.print(f"  {url}", soft_wrap=True)
                console.print("Ctrl-C or SIGTERM stops, deletes the scratch overlay.")
                stop = asyncio.Event()
                with _stop_on_signals(stop, console):
                    await stop.wait()
            status = export.status()
    console.print(
        f"[bold green]Stopped:[/] {status.reads} reads, {status.writes} writes "
        f"({_demo.format_size(status.overlay_bytes)} in the overlay, now deleted), "
        f"{_demo.format_bytes(status.bytes_fetched)} fetched; hold released."
    )
    return EXIT_OK
