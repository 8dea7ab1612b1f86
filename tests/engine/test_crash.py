"""kill -9 of a writer at random moments: every listed checkpoint still recovers exactly.

Each run starts ``crash_writer`` (a separate process doing a deterministic
workload with checkpoints it does not wait for), kills it with SIGKILL at a
random moment while it writes and uploads, and then checks, as a reader:
every object under the VPG decodes and verifies (no partial object is ever
visible), every listed checkpoint recovers byte for byte to the replayed
model, and a new writer can take over, write and checkpoint on top.
Runs alternate between the local-directory and the S3 (moto) backend.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import signal
import subprocess
import sys

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _format, _keys, storage
from tests.engine import crash_writer, model

RUNS = 20  # half local directory, half S3
REPO = pathlib.Path(__file__).resolve().parents[2]


def _start_writer(url: str, seed: int) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.engine.crash_writer", url, str(seed)],
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


def _expected(seed: int, first_lsn: int, cut: int, base: model.DisksModel) -> model.DisksModel:
    """Replay the writer's operations with LSN below ``cut`` on top of ``base``."""
    disks = base
    lsn = first_lsn
    for op, vm, disk, offset, length, data in crash_writer.operations(seed):
        if lsn >= cut:
            break
        if op == "write":
            disks.write(vm, disk, offset, data)
        elif op in ("trim", "zero"):
            disks.zero(vm, disk, offset, length)
        lsn += 1
    return disks


async def _all_objects_verify(store: storage.ObjectStore) -> None:
    layout = _keys.VpgLayout(crash_writer.VPG)
    async for info in store.list(layout.root):
        body = (await store.get(info.key)).data
        if info.key.startswith(layout.journals_prefix):
            name = layout.parse_segment(info.key)
            _format.decode_journal_segment(info.key, body, crc=name.crc32c)
        elif info.key.startswith(layout.index_log_prefix):
            seq = layout.parse_index_seq(info.key)
            _format.decode_index(info.key, body, vpg=layout.vpg, fmt="index-log", seq=seq)


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_kill_minus_nine_at_a_random_moment(
    run: int, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    url = (tmp_path / "account").as_uri() if run % 2 == 0 else request.getfixturevalue("s3_url")
    if url.startswith("file:"):
        (tmp_path / "account").mkdir()
    rng = random.Random(run)
    spec = crash_writer.spec()
    base = model.DisksModel(spec)  # the disks as of the last durable checkpoint
    base_id: int | None = None
    # Two generations: kill a writer, then kill the one that took over from it.
    for generation in range(2):
        seed = run * 10 + generation
        process, first_lsn = _start_writer(url, seed)
        await asyncio.sleep(rng.uniform(0.05, 1.2))  # the random moment of the kill
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        assert process.stdout is not None
        process.stdout.close()

        store = ebbtide.open_store(url)
        try:
            await _all_objects_verify(store)
            listed = await ebbtide.list_checkpoints(store, crash_writer.VPG)
            new = [c for c in listed if c.id >= first_lsn]
            for checkpoint in new:
                expected = _expected(seed, first_lsn, checkpoint.id, _copy(base, spec))
                expected.checkpoint(checkpoint.id)
                out = tmp_path / f"g{generation}-{checkpoint.id}"
                await ebbtide.recover_to_files(
                    store, crash_writer.VPG, ebbtide.CheckpointSelector(id=checkpoint.id), out
                )
                expected.assert_recovered(checkpoint.id, out)
            if base_id is not None:  # the earlier generation's checkpoints did not change
                assert base_id in [c.id for c in listed]
                out = tmp_path / f"g{generation}-again-{base_id}"
                await ebbtide.recover_to_files(
                    store, crash_writer.VPG, ebbtide.CheckpointSelector(id=base_id), out
                )
                base.assert_recovered(base_id, out)
            if new:
                base = _expected(seed, first_lsn, new[-1].id, _copy(base, spec))
                base.checkpoint(new[-1].id)
                base_id = new[-1].id
        finally:
            await store.close()


def _copy(disks: model.DisksModel, spec: ebbtide.VpgSpec) -> model.DisksModel:
    copy = model.DisksModel(spec)
    for key, data in disks.disks.items():
        copy.disks[key][:] = data
    copy.checkpoints = dict(disks.checkpoints)
    return copy
