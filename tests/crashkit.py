"""What the crash (kill -9) tests and the state machines share: workload, replay, verification.

- :func:`operations`: a deterministic, endless workload (writes, trims,
  zero-writes, checkpoints) for a VPG spec and a seed; a writer process
  performs it (:func:`perform`) and the test replays it (:func:`replay`) to
  know what every checkpoint must contain.
- :func:`start_writer` / :func:`kill`: a writer module run as a separate
  process, killed with SIGKILL.
- :func:`verify_objects`: every object under a VPG decodes and verifies.
- :func:`recover_and_compare`: recover checkpoints as a reader and compare
  them byte for byte with a model of the disks.
- :func:`crash_generations`: the kill -9 test loop itself: two generations of
  writers, each killed at a random moment, every new checkpoint checked.
- :func:`run_machine`: runs a hypothesis state machine on a storage account
  (the engine one in ``tests/engine/test_state_machine.py`` and the history
  one that extends it; both verify through :func:`recover_and_compare`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test

import ebbtide_engine as ebbtide
from ebbtide_engine import _format, _keys, _lease, _recovery, storage
from tests.engine import model

REPO = pathlib.Path(__file__).resolve().parents[1]

#: (op, vm, disk, offset, length, data); op is write / trim / zero / checkpoint
Operation = tuple[str, str, str, int, int, bytes]


def operations(
    spec: ebbtide.VpgSpec, seed: int, *, checkpoint_probability: float, max_length: int
) -> Iterator[Operation]:
    """The workload of ``seed``, forever: every operation but a checkpoint takes one LSN."""
    rng = random.Random(seed)
    sizes = {(vm.name, d.name): d.size for vm in spec.vms for d in vm.disks}
    keys = sorted(sizes)
    while True:
        if rng.random() < checkpoint_probability:
            yield ("checkpoint", "", "", 0, 0, b"")
            continue
        vm, disk = rng.choice(keys)
        offset = rng.randrange(sizes[(vm, disk)])
        length = rng.randint(1, min(max_length, sizes[(vm, disk)] - offset))
        roll = rng.random()
        if roll < 0.85:
            yield ("write", vm, disk, offset, length, rng.randbytes(length))
        else:
            yield ("trim" if roll < 0.93 else "zero", vm, disk, offset, length, b"")


async def perform(
    runtime: ebbtide.VpgRuntime,
    workload: Iterable[Operation],
    *,
    kind: ebbtide.CheckpointKind | None = None,
) -> None:
    """Perform ``workload`` (a writer process's main loop); checkpoints are not waited for."""
    pending = []
    for op, vm, disk, offset, length, data in workload:
        if op == "write":
            await runtime.write(vm, disk, offset, data)
        elif op == "trim":
            await runtime.trim(vm, disk, offset, length)
        elif op == "zero":
            await runtime.write_zeroes(vm, disk, offset, length)
        elif kind is None:
            pending.append(runtime.request_checkpoint())
        else:
            pending.append(runtime.request_checkpoint(kind))
        await asyncio.sleep(0.001)  # about 500 operations a second: a busy, not a flooding, VM


async def serve(
    url: str,
    spec: ebbtide.VpgSpec,
    options: ebbtide.RuntimeOptions,
    workload: Iterable[Operation],
    *,
    kind: ebbtide.CheckpointKind | None = None,
) -> None:
    """A writer process: take the VPG over, say ``ready <first lsn>``, perform forever."""
    store = ebbtide.open_store(url)
    runtime = await ebbtide.VpgRuntime.open(spec, store, options=options)
    print(f"ready {runtime.status().next_lsn}", flush=True)
    await perform(runtime, workload, kind=kind)


def replay(
    workload: Iterable[Operation], first_lsn: int, cut: int, base: model.DisksModel
) -> model.DisksModel:
    """Apply the operations with LSN below ``cut`` (counted from ``first_lsn``) to ``base``."""
    lsn = first_lsn
    for op, vm, disk, offset, length, data in workload:
        if lsn >= cut:
            break
        if op == "write":
            base.write(vm, disk, offset, data)
        elif op in ("trim", "zero"):
            base.zero(vm, disk, offset, length)
        lsn += 1
    return base


def copy_disks(disks: model.DisksModel, spec: ebbtide.VpgSpec) -> model.DisksModel:
    copy = model.DisksModel(spec)
    for key, data in disks.disks.items():
        copy.disks[key][:] = data
    copy.checkpoints = dict(disks.checkpoints)
    return copy


async def verify_objects(store: storage.ObjectStore, vpg: str) -> int:
    """Every object of ``vpg`` verifies (no partial object is ever visible).

    Returns the promoted LSN; the recovery disks at it must exist.
    """
    layout = _keys.VpgLayout(vpg)
    async for info in store.list(layout.root):
        key = info.key
        body = (await store.get(key)).data
        if key.startswith(layout.journals_prefix):
            _format.decode_journal_segment(key, body, crc=layout.parse_segment(key).crc32c)
        elif key.startswith(layout.index_log_prefix):
            seq = layout.parse_index_seq(key)
            _format.decode_index(key, body, vpg=layout.vpg, fmt="index-log", seq=seq)
        elif "/chunk/" in key:
            assert hashlib.sha256(body).digest() == layout.parse_mirror_chunk(key), key
    manifest = await _lease.read_manifest(store, layout)
    assert manifest is not None
    promoted = manifest.promoted_lsn
    if promoted:
        index = await _recovery.read_index(store, vpg)
        for vm, disks in index.layout_at(promoted).items():
            for disk in disks:
                await store.head(layout.mirror_map(vm, disk, promoted))
    return promoted


async def recover_and_compare(
    store: storage.ObjectStore,
    vpg: str,
    checkpoint_ids: Iterable[int],
    expected: model.DisksModel | Callable[[int], model.DisksModel],
    out: pathlib.Path,
) -> None:
    """Recover each checkpoint into ``out/<id>`` and compare it byte for byte with the model."""
    for checkpoint_id in checkpoint_ids:
        target = out / str(checkpoint_id)
        selector = ebbtide.CheckpointSelector(id=checkpoint_id)
        await ebbtide.recover_to_files(store, vpg, selector, target)
        disks = expected if isinstance(expected, model.DisksModel) else expected(checkpoint_id)
        disks.assert_recovered(checkpoint_id, target)


def account_url(run: int, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> str:
    """Even runs: a local-directory account under ``tmp_path``; odd runs: S3 (moto)."""
    if run % 2:
        url: str = request.getfixturevalue("s3_url")
        return url
    (tmp_path / "account").mkdir()
    return (tmp_path / "account").as_uri()


def start_writer(module: str, *args: object) -> tuple[subprocess.Popen[str], int]:
    """Run ``python -m module args...``; returns it once it printed ``ready <first lsn>``."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", module, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert process.stdout is not None
    line = process.stdout.readline()  # blocks until the writer holds the VPG
    if not line.startswith("ready"):
        process.kill()
        raise AssertionError(f"writer did not start: {line!r}")
    return process, int(line.split()[1])


def kill(process: subprocess.Popen[str]) -> None:
    """kill -9, and reap it."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.stdout is not None
    process.stdout.close()


@dataclasses.dataclass
class CrashRun:
    """One kill -9 test run: which writer, on which account, killed when."""

    url: str
    vpg: str
    spec: ebbtide.VpgSpec
    module: str  # the writer, run as ``python -m module url seed *extra``
    workload: Callable[[int], Iterator[Operation]]  # seed -> the writer's operations
    kill_window: tuple[float, float]  # seconds after "ready"
    extra: tuple[object, ...] = ()
    #: the previous generation's last checkpoint must still be listed
    require_previous: bool = True
    #: if no promotion was committed yet, the last generation is killed only after one is
    require_promotion: bool = False


async def crash_generations(run: CrashRun, number: int, tmp_path: pathlib.Path) -> int:
    """Two generations: kill a writer, then the one that took over from it; check after each.

    After each kill: every object verifies, nothing below the promoted LSN is
    listed, every checkpoint the generation committed recovers byte for byte
    to the replayed workload, and the previous generation's last checkpoint
    still does. Returns the highest promoted LSN seen.
    """
    rng = random.Random(number)
    base = model.DisksModel(run.spec)  # the disks as of the last durable checkpoint
    base_id: int | None = None
    promoted_seen = 0
    for generation in range(2):
        seed = number * 10 + generation
        process, first_lsn = start_writer(run.module, run.url, seed, *run.extra)
        if run.require_promotion and generation == 1 and promoted_seen == 0:
            # A slow machine: the first generation died before any history pass promoted.
            await _promoted(run.url, run.vpg, within=60.0)
        await asyncio.sleep(rng.uniform(*run.kill_window))  # the random moment of the kill
        kill(process)
        store = ebbtide.open_store(run.url)
        try:
            promoted = await verify_objects(store, run.vpg)
            promoted_seen = max(promoted_seen, promoted)
            listed = [c.id for c in await ebbtide.list_checkpoints(store, run.vpg)]
            assert all(c >= promoted for c in listed)
            new = [c for c in listed if c >= first_lsn]

            def expected(
                cut: int, seed: int = seed, first: int = first_lsn, start: model.DisksModel = base
            ) -> model.DisksModel:
                disks = replay(run.workload(seed), first, cut, copy_disks(start, run.spec))
                disks.checkpoint(cut)
                return disks

            await recover_and_compare(store, run.vpg, new, expected, tmp_path / f"g{generation}")
            if base_id is not None:
                if run.require_previous:
                    assert base_id in listed
                if base_id in listed:
                    out = tmp_path / f"g{generation}-again"
                    await recover_and_compare(store, run.vpg, [base_id], base, out)
            if new:
                base = expected(new[-1])
                base_id = new[-1]
        finally:
            await store.close()
    return promoted_seen


async def _promoted(url: str, vpg: str, *, within: float) -> None:
    """Wait until the manifest of ``vpg`` names a promoted LSN (a promotion committed)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    store = ebbtide.open_store(url)
    try:
        while True:
            manifest = await _lease.read_manifest(store, _keys.VpgLayout(vpg))
            if manifest is not None and manifest.promoted_lsn > 0:
                return
            assert loop.time() < deadline, f"no promotion of {vpg} within {within} s"
            await asyncio.sleep(0.05)
    finally:
        await store.close()


M = TypeVar("M", bound=RuleBasedStateMachine)


def run_machine(
    machine: type[M], make_store: Callable[[], storage.ObjectStore], *, examples: int, steps: int
) -> None:
    """Run a state machine whose class attribute ``make_store`` opens its storage account."""
    bound = type(machine.__name__, (machine,), {"make_store": staticmethod(make_store)})
    run_state_machine_as_test(
        bound,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
