"""kill -9 during promotion, garbage collection and dilution: every listed checkpoint survives.

Each run starts ``crash_history_writer`` (a deterministic workload with a
fast clock and history passes running back to back), kills it with SIGKILL
at a random moment, then checks as a reader: every object verifies, no
listed checkpoint is below the promoted LSN, the recovery disks at the
promoted LSN exist, and every listed checkpoint of the run recovers byte
for byte to the replayed model; then a second writer takes over (resuming
what the first left half done) and is killed in turn, and the checks
repeat, including the first generation's last checkpoint if still listed.
Runs alternate between the local-directory and the S3 (moto) backend.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _format, _keys, _lease, storage
from tests.engine import model
from tests.history import crash_history_writer as writer

RUNS = 20  # half local directory, half S3
REPO = pathlib.Path(__file__).resolve().parents[2]


def _start_writer(url: str, seed: int, t0: float) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.history.crash_history_writer", url, str(seed), str(t0)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("ready"):
        process.kill()
        raise AssertionError(f"writer did not start: {line!r}")
    return process, int(line.split()[1])


def _replay(seed: int, first_lsn: int, cut: int, base: model.DisksModel) -> model.DisksModel:
    lsn = first_lsn
    for op, vm, disk, offset, length, data in writer.operations(seed):
        if lsn >= cut:
            break
        if op == "write":
            base.write(vm, disk, offset, data)
        elif op in ("trim", "zero"):
            base.zero(vm, disk, offset, length)
        lsn += 1
    return base


def _copy(disks: model.DisksModel, spec: ebbtide.VpgSpec) -> model.DisksModel:
    copy = model.DisksModel(spec)
    for key, data in disks.disks.items():
        copy.disks[key][:] = data
    copy.checkpoints = dict(disks.checkpoints)
    return copy


async def _check_bucket(store: storage.ObjectStore) -> int:
    """Every object verifies; returns the promoted LSN, whose recovery disks must exist."""
    layout = _keys.VpgLayout(writer.VPG)
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
        for vm in writer.spec().vms:
            for disk in vm.disks:
                await store.head(layout.mirror_map(vm.name, disk.name, promoted))
    return promoted


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_kill_minus_nine_during_history_passes(
    run: int, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    url = (tmp_path / "account").as_uri() if run % 2 == 0 else request.getfixturevalue("s3_url")
    if url.startswith("file:"):
        (tmp_path / "account").mkdir()
    rng = random.Random(run)
    spec = writer.spec()
    t0 = time.time()
    base = model.DisksModel(spec)  # the disks as of the last durable checkpoint
    base_id: int | None = None
    promoted_seen = 0
    for generation in range(2):
        seed = run * 10 + generation
        process, first_lsn = _start_writer(url, seed, t0)
        await asyncio.sleep(rng.uniform(0.3, 1.5))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()

        store = ebbtide.open_store(url)
        try:
            promoted = await _check_bucket(store)
            promoted_seen = max(promoted_seen, promoted)
            listed = await ebbtide.list_checkpoints(store, writer.VPG)
            assert all(c.id >= promoted for c in listed)
            new = [c for c in listed if c.id >= first_lsn]
            for checkpoint in new:
                expected = _replay(seed, first_lsn, checkpoint.id, _copy(base, spec))
                expected.checkpoint(checkpoint.id)
                out = tmp_path / f"g{generation}-{checkpoint.id}"
                selector = ebbtide.CheckpointSelector(id=checkpoint.id)
                await ebbtide.recover_to_files(store, writer.VPG, selector, out)
                expected.assert_recovered(checkpoint.id, out)
            if base_id is not None and base_id in [c.id for c in listed]:
                out = tmp_path / f"g{generation}-again-{base_id}"
                selector = ebbtide.CheckpointSelector(id=base_id)
                await ebbtide.recover_to_files(store, writer.VPG, selector, out)
                base.assert_recovered(base_id, out)
            if new:
                base = _replay(seed, first_lsn, new[-1].id, _copy(base, spec))
                base.checkpoint(new[-1].id)
                base_id = new[-1].id
        finally:
            await store.close()
    assert promoted_seen > 0  # the kills did land among history passes
