"""The embedded demo: protect a small VPG with a made-up workload, then prove recovery exact.

``ebbtide demo`` is the README's first command, so it needs nothing but this
package: no cluster, no S3 (the storage account defaults to the local
directory ``./.ebbtide/demo``). It loads the VPG of ``examples/demo.yaml``,
runs it with :class:`ebbtide_engine.VpgRuntime` in this process, and drives
a write workload at a modest rate (random offsets, 4 KiB-256 KiB, some
overwrites, TRIMs and WRITE_ZEROES, across every disk) while a live display
shows what the runtime reports.

Alongside, it keeps a byte-exact model of every disk (a ``bytearray`` each).
Every few seconds it asks for a tagged checkpoint and freezes the model at
that very moment: ``request_checkpoint`` takes the cut synchronously, and
nothing is written between the cut and the copy. At the end it closes the
runtime cleanly, recovers the last tagged checkpoint and the first one from
the storage account alone, and compares every recovered disk with the
frozen model byte for byte.

The storage account may already hold earlier runs of the same VPG (the
journal continues, under a new writer epoch). The demo therefore starts by
zeroing its disks with WRITE_ZEROES, so that the model (all zeros at the
start) is exact whatever came before.

Frozen copies share memory: the model is split into 64 KiB chunks, and a
copy re-freezes only the chunks written since the previous one.

This module also holds the small rich helpers the CLI reuses (sizes, ages,
the checkpoint table, the recovery progress bar).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence

import rich.console
import rich.filesize
import rich.live
import rich.logging
import rich.markup
import rich.panel
import rich.progress
import rich.table
import rich.text
import yaml

from ebbtide_engine import _errors, _index, _recovery, _runtime, _spec, storage

DEMO_FILE = "demo.yaml"
DEMO_VPG = "demo"
DEFAULT_SECONDS = 20.0
#: The workload's pace, in bytes of write payload per second.
WRITE_RATE = 5_000_000
#: A tagged checkpoint at most this often (more often in short runs, so there are several).
TAG_EVERY = 5.0
DISPLAY_EVERY = 0.25

_SECTOR = 512
_LENGTHS = (
    [4 << 10] * 4 + [8 << 10] * 3 + [16 << 10] * 2 + [32 << 10, 64 << 10, 128 << 10, 256 << 10]
)
_RANGE_COST = 4 << 10  # what a TRIM or WRITE_ZEROES counts for in the pacing
_CHUNK = 64 << 10

KIND_NAMES = {
    _index.CheckpointKind.AUTOMATIC: "Automatic",
    _index.CheckpointKind.TAGGED: "Tagged",
    _index.CheckpointKind.APPLICATION_CONSISTENT: "ApplicationConsistent",
    _index.CheckpointKind.FAILOVER_TEST: "FailoverTest",
}

DiskKey = tuple[str, str]  # (vm, disk)
Snapshot = dict[DiskKey, tuple[bytes, ...]]  # the model's chunks, frozen


# --- small rich helpers (shared with the CLI) ---------------------------------


def format_bytes(count: int) -> str:
    """Decimal units, as rich's progress bars use: ``12.3 MB``."""
    return str(rich.filesize.decimal(count))


def format_size(count: int) -> str:
    """A disk size in the binary units specs use: ``64 MiB``, else bytes."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift and count % (1 << shift) == 0:
            return f"{count >> shift} {unit}"
    return f"{count:,} B"


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def format_time(moment: datetime.datetime) -> str:
    """UTC, to the millisecond: checkpoints a few seconds apart stay distinguishable."""
    return moment.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_checkpoint(checkpoint: _index.Checkpoint) -> str:
    tag = f" {checkpoint.tag!r}" if checkpoint.tag else ""
    return f"checkpoint {checkpoint.id}{tag} ({format_time(checkpoint.time)})"


def checkpoint_table(checkpoints: Sequence[_index.Checkpoint], *, title: str) -> rich.table.Table:
    table = rich.table.Table(title=title, title_justify="left", title_style="bold")
    table.add_column("id", justify="right")
    table.add_column("time (UTC)")
    table.add_column("kind")
    table.add_column("tag")
    for checkpoint in checkpoints:
        table.add_row(
            str(checkpoint.id),
            format_time(checkpoint.time),
            KIND_NAMES.get(checkpoint.kind, checkpoint.kind.name),
            rich.text.Text(checkpoint.tag or ""),
        )
    return table


def recovery_progress(console: rich.console.Console) -> rich.progress.Progress:
    """A bytes progress bar for ``recover_to_files`` (journal bytes read).

    Transient: once done (or failed) it leaves the screen to the summary (or the error);
    and only on a terminal (in a log it would say nothing the summary does not).
    """
    return rich.progress.Progress(
        rich.progress.TextColumn("{task.description}"),
        rich.progress.BarColumn(),
        rich.progress.DownloadColumn(),
        rich.progress.TransferSpeedColumn(),
        rich.progress.TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )


async def recover_with_progress(
    console: rich.console.Console,
    store: storage.ObjectStore,
    vpg: str,
    selector: _recovery.CheckpointSelector,
    out_dir: pathlib.Path,
    *,
    label: str,
    vms: Sequence[str] | None = None,
) -> _recovery.RecoveryResult:
    """``recover_to_files`` with a progress bar of the journal bytes read."""
    with recovery_progress(console) as bar:
        task = bar.add_task(label, total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = await _recovery.recover_to_files(
            store, vpg, selector, out_dir, vms=vms, progress=report
        )
        bar.update(task, completed=result.bytes_read, total=result.bytes_read)
    return result


def error_text(message: str) -> rich.text.Text:
    return rich.text.Text.assemble(("error: ", "bold red"), (message, "red"))


# --- where the demo's VPG and storage come from -------------------------------


def default_examples_dir() -> pathlib.Path:
    """``./examples`` if it holds the demo, else the examples of this source tree."""
    here = pathlib.Path.cwd() / "examples"
    if (here / DEMO_FILE).is_file():
        return here
    return pathlib.Path(__file__).resolve().parents[2] / "examples"


def default_storage_url() -> str:
    return (pathlib.Path.cwd() / ".ebbtide" / "demo").resolve().as_uri()


def load_demo_spec(examples_dir: pathlib.Path) -> _spec.VpgSpec:
    """The VirtualProtectionGroup named "demo" in ``examples_dir/demo.yaml``."""
    path = examples_dir / DEMO_FILE
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    except FileNotFoundError:
        raise _errors.SpecError(
            f"{path} does not exist; run from the repository root, or pass --examples DIR "
            f"(the directory holding {DEMO_FILE})"
        ) from None
    except (OSError, yaml.YAMLError) as exc:
        raise _errors.SpecError(f"{path} is not readable YAML: {exc}") from None
    for doc in documents:
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "VirtualProtectionGroup"
            and (doc.get("metadata") or {}).get("name") == DEMO_VPG
        ):
            try:
                return _spec.VpgSpec.from_resource(doc)
            except _errors.SpecError as exc:
                raise _errors.SpecError(f"{path}: {exc}") from None
    raise _errors.SpecError(f"{path} has no VirtualProtectionGroup named {DEMO_VPG!r}")


# --- the model ----------------------------------------------------------------


class DiskModel:
    """What one disk must hold: every byte written, in order, TRIM and zeroes as zeros."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)
        full_zero = bytes(_CHUNK)
        self._frozen = [
            full_zero if start + _CHUNK <= size else bytes(size - start)
            for start in range(0, size, _CHUNK)
        ]
        self._dirty: set[int] = set()

    def write(self, offset: int, data: bytes) -> None:
        self.data[offset : offset + len(data)] = data
        self._touch(offset, len(data))

    def zero(self, offset: int, length: int) -> None:
        self.data[offset : offset + length] = bytes(length)
        self._touch(offset, length)

    def _touch(self, offset: int, length: int) -> None:
        self._dirty.update(range(offset // _CHUNK, (offset + length - 1) // _CHUNK + 1))

    def freeze(self) -> tuple[bytes, ...]:
        """The disk as it is now; chunks unchanged since the last freeze are shared."""
        for index in self._dirty:
            self._frozen[index] = bytes(self.data[index * _CHUNK : (index + 1) * _CHUNK])
        self._dirty.clear()
        return tuple(self._frozen)


@dataclasses.dataclass(frozen=True, slots=True)
class Mismatch:
    vm: str
    disk: str
    problem: str


def compare_disk(path: pathlib.Path, size: int, chunks: tuple[bytes, ...]) -> str | None:
    """None if the file at ``path`` holds exactly ``chunks``, else what differs."""
    actual = path.stat().st_size
    if actual != size:
        return f"{path} is {actual:,} bytes, the disk is {size:,}"
    with path.open("rb") as file:
        for index, expected in enumerate(chunks):
            got = file.read(len(expected))
            if got != expected:
                at = next(
                    (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
                    min(len(got), len(expected)),
                )
                offset = index * _CHUNK + at
                return f"differs from the model first at byte {offset:,} (of {size:,})"
    return None


# --- the workload -------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class WorkloadStats:
    writes: int = 0
    trims: int = 0
    zeroes: int = 0
    bytes_written: int = 0
    tagged: int = 0
    samples: collections.deque[tuple[float, int, int]] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=12)
    )

    @property
    def ops(self) -> int:
        return self.writes + self.trims + self.zeroes

    def sample(self, now: float) -> tuple[float, float]:
        """(bytes/s, requests/s) over the last few seconds."""
        self.samples.append((now, self.ops, self.bytes_written))
        first, last = self.samples[0], self.samples[-1]
        elapsed = last[0] - first[0]
        if elapsed <= 0:
            return 0.0, 0.0
        return (last[2] - first[2]) / elapsed, (last[1] - first[1]) / elapsed


@dataclasses.dataclass(slots=True)
class PendingTag:
    tag: str
    future: asyncio.Future[_index.Checkpoint | None]
    snapshot: Snapshot | None  # kept for the first and the latest only (those get verified)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelledCheckpoint:
    checkpoint: _index.Checkpoint
    snapshot: Snapshot


class Workload:
    """Writes, trims and zero-writes at a steady pace, mirrored into the model."""

    def __init__(self, runtime: _runtime.VpgRuntime, *, seed: int | None = None) -> None:
        self.runtime = runtime
        self.rng = random.Random(seed)
        self.models = {
            (vm.name, disk.name): DiskModel(disk.size)
            for vm in runtime.spec.vms
            for disk in vm.disks
        }
        self.recent: dict[DiskKey, collections.deque[int]] = {
            key: collections.deque(maxlen=64) for key in self.models
        }
        self.stats = WorkloadStats()
        self.pending: list[PendingTag] = []

    async def zero_all(self) -> None:
        """Start from known contents: zeros (the storage may hold earlier runs)."""
        for (vm, disk), model in self.models.items():
            await self.runtime.write_zeroes(vm, disk, 0, model.size)

    async def run(self, seconds: float, stop: asyncio.Event) -> None:
        """Run until ``seconds`` have passed or ``stop`` is set; then take a last tagged cut."""
        tag_every = min(TAG_EVERY, max(1.0, seconds / 3))
        start = time.monotonic()
        end = start + seconds
        next_tag = start + tag_every
        cost = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now >= end:
                break
            if now >= next_tag:
                self.tag()
                next_tag += tag_every
            budget = WRITE_RATE * (now - start)
            cost = max(cost, budget - WRITE_RATE)  # after a stall, no burst of over 1 s
            ahead = (cost - budget) / WRITE_RATE
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(ahead, next_tag - now, end - now)):
                        await stop.wait()
                continue
            cost += await self.one_request()
        self.tag()

    async def one_request(self) -> int:
        """Send one random request to a random disk; returns its pacing cost."""
        rng = self.rng
        key = rng.choice(list(self.models))
        vm, disk = key
        model = self.models[key]
        length = min(rng.choice(_LENGTHS), model.size)
        recent = self.recent[key]
        if recent and rng.random() < 0.25:
            offset = min(rng.choice(recent), model.size - length)  # an overwrite
        else:
            offset = rng.randrange(0, (model.size - length) // _SECTOR + 1) * _SECTOR
        recent.append(offset)
        dice = rng.random()
        if dice < 0.08:
            await self.runtime.trim(vm, disk, offset, length)
            model.zero(offset, length)
            self.stats.trims += 1
            return _RANGE_COST
        if dice < 0.16:
            await self.runtime.write_zeroes(vm, disk, offset, length)
            model.zero(offset, length)
            self.stats.zeroes += 1
            return _RANGE_COST
        data = rng.randbytes(length)
        await self.runtime.write(vm, disk, offset, data)
        model.write(offset, data)
        self.stats.writes += 1
        self.stats.bytes_written += length
        return length

    def tag(self) -> None:
        """Cut a tagged checkpoint and freeze the model at the same instant."""
        self.stats.tagged += 1
        tag = f"demo-{self.stats.tagged}"
        future = self.runtime.request_checkpoint(_index.CheckpointKind.TAGGED, tag)
        # No await between the cut and the copy: no write can slip in.
        snapshot = {key: model.freeze() for key, model in self.models.items()}
        if len(self.pending) > 1:
            self.pending[-1].snapshot = None  # no longer the latest: free its copies
        self.pending.append(PendingTag(tag, future, snapshot))

    async def durable(self) -> list[ModelledCheckpoint]:
        """Wait until every tagged checkpoint is durable; the first and the last, modelled."""
        modelled = []
        for pending in self.pending:
            checkpoint = await pending.future
            assert checkpoint is not None
            if pending.snapshot is not None:
                modelled.append(ModelledCheckpoint(checkpoint, pending.snapshot))
        self.pending.clear()
        return modelled


# --- the live display ---------------------------------------------------------


def vpg_panel(
    status: _runtime.RuntimeStatus,
    spec: _spec.VpgSpec,
    store: str,
    stats: WorkloadStats,
    rates: tuple[float, float],
    elapsed: float,
    seconds: float,
) -> rich.panel.Panel:
    grid = rich.table.Table.grid(padding=(0, 2))
    grid.add_column(style="bold cyan", no_wrap=True)
    grid.add_column()
    state_style = {"protecting": "green", "closed": "blue"}.get(status.state, "bold red")
    grid.add_row(
        "state",
        rich.text.Text.assemble(
            (status.state, state_style), f"   epoch {status.epoch}   next LSN {status.next_lsn:,}"
        ),
    )
    last = status.last_checkpoint
    if last is None:
        grid.add_row("checkpoint", rich.text.Text("none durable yet", style="yellow"))
    else:
        age = max(0.0, time.time() - last.time_ns / 1e9)
        kind = KIND_NAMES.get(last.kind, last.kind.name)
        tag = f" {last.tag!r}" if last.tag else ""
        grid.add_row("checkpoint", f"{last.id:,} ({kind}{tag}), {format_seconds(age)} ago")
    if status.rpo_seconds is None:
        grid.add_row("RPO", rich.text.Text("-", style="yellow"))
    else:
        rpo_style = "green" if status.rpo_seconds <= spec.target_rpo else "bold red"
        grid.add_row(
            "RPO",
            rich.text.Text.assemble(
                (format_seconds(status.rpo_seconds), rpo_style),
                f"   (target {format_seconds(spec.target_rpo)}, "
                f"checkpoint every {format_seconds(spec.checkpoint_interval)})",
            ),
        )
    grid.add_row(
        "shipping",
        f"unshipped {format_bytes(status.unshipped_bytes)}   "
        f"shipped {format_bytes(status.shipped_bytes)}   "
        f"uploads pending {status.pending_uploads}   retries {status.upload_retries}",
    )
    grid.add_row(
        "journal",
        "   ".join(
            f"{vm.name} {format_bytes(status.journal_bytes.get(vm.name, 0))}" for vm in spec.vms
        ),
    )
    grid.add_row(
        "last error",
        rich.text.Text(status.last_error, style="red")
        if status.last_error
        else rich.text.Text("none", style="dim"),
    )
    grid.add_row(
        "workload",
        f"{format_bytes(int(rates[0]))}/s   {rates[1]:.0f} writes/s   "
        f"({stats.writes:,} writes, {stats.trims:,} trims, {stats.zeroes:,} zero-writes, "
        f"{stats.tagged} tagged checkpoints)",
    )
    title = rich.text.Text.assemble(("VPG ", "bold"), (status.vpg, "bold magenta"), f" in {store}")
    clock = f"{min(elapsed, seconds):.1f} s / {seconds:g} s"
    return rich.panel.Panel(grid, title=title, title_align="left", subtitle=clock)


# --- the run ------------------------------------------------------------------


@contextlib.contextmanager
def _first_interrupt_stops(stop: asyncio.Event, console: rich.console.Console) -> Iterator[None]:
    """Ctrl-C sets ``stop`` once; a second Ctrl-C interrupts as usual."""
    loop = asyncio.get_running_loop()

    def interrupted() -> None:
        stop.set()
        loop.remove_signal_handler(signal.SIGINT)
        console.print(
            "[yellow]Interrupted:[/] stopping the workload, then closing cleanly and "
            "verifying (Ctrl-C again aborts at once)."
        )

    try:
        loop.add_signal_handler(signal.SIGINT, interrupted)
    except (NotImplementedError, RuntimeError, ValueError):
        yield  # not the main thread, or no signals here: Ctrl-C just interrupts
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)


async def run_demo(
    console: rich.console.Console,
    *,
    storage_url: str | None = None,
    seconds: float = DEFAULT_SECONDS,
    examples_dir: pathlib.Path | None = None,
) -> bool:
    """Run the demo; True if every recovered disk matched the model.

    Raises EbbtideError for anything the user can fix (storage, spec, lease).
    """
    spec = load_demo_spec(examples_dir or default_examples_dir())
    url = storage_url or default_storage_url()
    account = storage.StorageAccount.parse(url)
    if account.scheme == "file":
        await asyncio.to_thread(pathlib.Path(account.bucket).mkdir, parents=True, exist_ok=True)
    store = storage.open_store(account)
    try:
        return await _protect_and_verify(console, spec, store, seconds)
    finally:
        await store.close()


async def _protect_and_verify(
    console: rich.console.Console,
    spec: _spec.VpgSpec,
    store: storage.ObjectStore,
    seconds: float,
) -> bool:
    disks = sum(len(vm.disks) for vm in spec.vms)
    console.print(
        f"Protecting VPG [bold magenta]{spec.name}[/] ({len(spec.vms)} VMs, {disks} disks) "
        f"in [bold]{rich.markup.escape(store.description)}[/] for {seconds:g} s "
        "(Ctrl-C stops early)."
    )
    with console.status("Taking the writer lease and reading the journal from storage..."):
        runtime = await _runtime.VpgRuntime.open(spec, store)
    try:
        previous = runtime.status().previous_writer
        if previous is not None:
            how = "stopped cleanly" if previous.clean_shutdown else "did NOT stop cleanly"
            console.print(
                f"The storage already holds this VPG: the journal continues at epoch "
                f"{runtime.status().epoch} (the previous writer {how}; last checkpoint "
                f"{previous.last_checkpoint:,})."
            )
        workload = Workload(runtime)
        modelled = await _run_workload(console, runtime, workload, store.description, seconds)
    except BaseException:
        await runtime.abort()  # a crash, as far as the storage can tell: no clean close
        raise
    await runtime.close()
    final = runtime.status().last_checkpoint
    console.print(
        f"Closed cleanly: every write shipped, final checkpoint {final.id if final else '-'} "
        "committed, writer lease released."
    )

    checkpoints = await _recovery.list_checkpoints(store, spec.name)
    epoch = runtime.status().epoch
    ours = [c for c in checkpoints if c.epoch == epoch]
    earlier = len(checkpoints) - len(ours)
    console.print(checkpoint_table(ours, title=f"Durable checkpoints of this run (epoch {epoch})"))
    if earlier:
        console.print(f"(and {plural(earlier, 'checkpoint')} of earlier runs)", style="dim")

    return await _verify(console, store, spec, modelled)


async def _run_workload(
    console: rich.console.Console,
    runtime: _runtime.VpgRuntime,
    workload: Workload,
    where: str,
    seconds: float,
) -> list[ModelledCheckpoint]:
    stop = asyncio.Event()
    started = time.monotonic()

    def render() -> rich.panel.Panel:
        now = time.monotonic()
        return vpg_panel(
            runtime.status(),
            runtime.spec,
            where,
            workload.stats,
            workload.stats.sample(now),
            now - started,
            seconds,
        )

    live = rich.live.Live(render(), console=console, auto_refresh=False, transient=False)
    with live, _warnings_above(console):

        async def refresh() -> None:
            while True:
                await asyncio.sleep(DISPLAY_EVERY)
                live.update(render(), refresh=True)

        refresher = asyncio.create_task(refresh())
        try:
            await workload.zero_all()
            with _first_interrupt_stops(stop, console):
                await workload.run(seconds, stop)
            modelled = await workload.durable()
        finally:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
            live.update(render(), refresh=True)
    if not console.is_terminal:
        console.print()  # a terminal gets its line break from Live itself
    return modelled


@contextlib.contextmanager
def _warnings_above(console: rich.console.Console) -> Iterator[None]:
    """Engine warnings (retries, a previous writer's void writes) print above the display."""
    logger = logging.getLogger("ebbtide")
    handler = rich.logging.RichHandler(console=console, show_path=False, level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


async def _verify(
    console: rich.console.Console,
    store: storage.ObjectStore,
    spec: _spec.VpgSpec,
    modelled: list[ModelledCheckpoint],
) -> bool:
    """Recover each modelled checkpoint (the last first) and compare it with the model."""
    disks_ok = bytes_ok = 0
    failures: list[str] = []
    cleanups: list[asyncio.Task[None]] = []
    with tempfile.TemporaryDirectory(prefix="ebbtide-demo-") as scratch:
        try:
            for item in reversed(modelled):
                out_dir = pathlib.Path(scratch) / str(item.checkpoint.id)
                by_tag = item is modelled[-1]  # exercise both ways of naming a checkpoint
                good, size, problems = await _verify_one(
                    console, store, spec, item, out_dir, by_tag
                )
                disks_ok, bytes_ok = disks_ok + good, bytes_ok + size
                failures += problems
                # Free the images while the next recovery runs (unlinking sparse files
                # with many punched holes takes a while).
                cleanups.append(asyncio.create_task(asyncio.to_thread(shutil.rmtree, out_dir)))
        finally:
            await asyncio.gather(*cleanups, return_exceptions=True)
    if failures or not modelled:
        for failure in failures or ["no tagged checkpoint became durable; nothing to verify"]:
            console.print(error_text(f"verification failed: {failure}"))
        return False
    console.print(f"[bold green]verified:[/] {disks_ok} disks, {bytes_ok:,} bytes identical")
    console.print(
        f"  ({plural(len(modelled), 'checkpoint')} recovered from storage alone, "
        "compared byte for byte with the in-memory model)",
        style="dim",
    )
    return True


async def _verify_one(
    console: rich.console.Console,
    store: storage.ObjectStore,
    spec: _spec.VpgSpec,
    item: ModelledCheckpoint,
    out_dir: pathlib.Path,
    by_tag: bool,
) -> tuple[int, int, list[str]]:
    """(disks identical, their bytes, what went wrong) for one modelled checkpoint."""
    checkpoint = item.checkpoint
    what = describe_checkpoint(checkpoint)
    selector = (
        _recovery.CheckpointSelector(tag=checkpoint.tag)
        if by_tag and checkpoint.tag
        else _recovery.CheckpointSelector(id=checkpoint.id)
    )
    try:
        result = await recover_with_progress(
            console, store, spec.name, selector, out_dir, label=f"recovering {checkpoint.tag}"
        )
    except _errors.EbbtideError as exc:
        return 0, 0, [f"recovering {what}: {exc}"]
    if result.checkpoint.id != checkpoint.id:
        found = result.checkpoint.id
        return 0, 0, [f"{selector.describe()} recovered checkpoint {found}, not {checkpoint.id}"]
    sizes = {(vm.name, disk.name): disk.size for vm in spec.vms for disk in vm.disks}
    mismatches = await asyncio.to_thread(_compare_all, result, item.snapshot, sizes)
    good = [d for d in result.disks if (d.vm, d.disk) not in {(m.vm, m.disk) for m in mismatches}]
    mark = "[green]ok[/]" if not mismatches else "[bold red]FAILED[/]"
    console.print(
        f"{mark} {rich.markup.escape(what)}: {plural(len(result.disks), 'disk')} recovered from "
        f"{plural(result.segments_read, 'segment')} ({format_bytes(result.bytes_read)}) "
        f"in {result.seconds:.2f} s, {len(good)} identical to the model"
    )
    problems = [f"{what}: {m.vm}/{m.disk} {m.problem}" for m in mismatches]
    return len(good), sum(d.size for d in good), problems


def _compare_all(
    result: _recovery.RecoveryResult, snapshot: Snapshot, sizes: dict[DiskKey, int]
) -> list[Mismatch]:
    mismatches = []
    recovered = {(d.vm, d.disk): d for d in result.disks}
    for key, chunks in snapshot.items():
        disk = recovered.get(key)
        if disk is None:
            mismatches.append(Mismatch(*key, "was not recovered"))
            continue
        problem = compare_disk(disk.path, sizes[key], chunks)
        if problem is not None:
            mismatches.append(Mismatch(*key, problem))
    return mismatches
