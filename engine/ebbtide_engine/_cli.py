"""The ``ebbtide`` command: the demo, and a reader's view of a storage account.

Subcommands:

- ``demo``: the embedded demo (see ``_demo``), the README's first command;
- ``checkpoints``: the durable checkpoints of a VPG (a table, or ``--json``);
- ``recover``: materialise a VPG's disks at a checkpoint as raw image files;
- ``status``: what the storage account tells about a VPG (manifest, checkpoints,
  journal sizes) without taking its lease.

Everything but ``demo`` only reads the storage account, so it is safe while a
writer protects the VPG. Output is for people (rich tables and progress bars);
``--json`` is for scripts. An error the engine raises on purpose
(``EbbtideError``), or a local file that cannot be written, prints one red
line and exits 2, like bad usage; a failed verification in the demo exits 1.
S3 credentials come from the standard AWS environment variables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import rich.console
import rich.markup
import rich.table
import rich.text

import ebbtide_engine as ebbtide
from ebbtide_engine import _demo

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
        errors.print(_demo.error_text(str(exc)))
        return EXIT_ERROR
    except OSError as exc:  # the local side: --out not writable, disk full...
        errors.print(_demo.error_text(str(exc)))
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
    for disk in result.disks:
        table.add_row(disk.vm, disk.disk, _demo.format_size(disk.size), str(disk.path))
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
