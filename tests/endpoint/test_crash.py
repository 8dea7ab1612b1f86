"""kill -9 of a proxy-mode endpoint process: the dirty map brings the journal back to the disk.

``ebbtide endpoint`` runs as a separate process, journaling to the moto S3
server. A client writes, the test records what each durable checkpoint
must hold, then the endpoint is killed with SIGKILL while a qemu-io session
is writing (none of those writes is in a checkpoint yet). The map left in
the state directory must name every region those writes touched; the
restarted endpoint re-reads exactly those regions from the source file and
journals them; after more writes and a clean stop (SIGTERM: final
checkpoint), the latest checkpoint recovers to the source file byte for
byte, and every checkpoint listed before the crash still recovers to what
the disk was then.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import random
import re
import signal
import sys

import numpy as np
import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _endpoint
from tests import s3server

from ._support import EndpointEnv, InteractiveQemuIo, MiB, assert_same, eventually, run

SIZE = 32 * MiB
REGION = MiB
EBBTIDE = pathlib.Path(sys.executable).parent / "ebbtide"

SPEC = """\
apiVersion: ebbtide.io/v1alpha1
kind: VirtualProtectionGroup
metadata:
  name: crash
spec:
  checkpointInterval: 1h   # only the checkpoints the test causes
  journal:
    segmentMaxBytes: 256Ki
    maxUnshippedBytes: 4Mi
  vms:
    - name: vm
      disks:
        - name: root
          size: 32Mi
          mode: Proxy
          source:
            path: {source}
"""


class EndpointProcess:
    """``ebbtide endpoint`` in a child process; its stdout is collected line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, stderr: pathlib.Path) -> EndpointProcess:
        env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
        with stderr.open("ab") as errors:
            process = await asyncio.create_subprocess_exec(
                str(EBBTIDE),
                "endpoint",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                env=env,
            )
        endpoint = cls(process)
        await endpoint.wait_for("stops cleanly", within=30)
        return endpoint

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode().rstrip())

    async def wait_for(self, text: str, *, within: float = 20) -> str:
        def found() -> bool:
            return any(text in line for line in self.lines) or self.process.returncode is not None

        await eventually(found, f"the endpoint to print {text!r}", within=within)
        for line in self.lines:
            if text in line:
                return line
        raise AssertionError(f"the endpoint exited ({self.process.returncode}):\n{self.output}")

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    async def stop(self, signum: int) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signum)
        async with asyncio.timeout(30):
            code = await self.process.wait()
            await self._reader
        return code


async def _checkpoints(store: ebbtide.ObjectStore) -> list[ebbtide.Checkpoint]:
    return await ebbtide.list_checkpoints(store, "crash")


async def _next_checkpoint(store: ebbtide.ObjectStore, known: int) -> ebbtide.Checkpoint:
    """Wait for the checkpoint the endpoint takes when a writing client disconnects."""
    listed: list[ebbtide.Checkpoint] = []
    async with asyncio.timeout(20):
        while len(listed) <= known:
            listed = await _checkpoints(store)
            await asyncio.sleep(0.05)
    assert len(listed) == known + 1, listed
    return listed[-1]


def _endpoint_args(
    tmp_path: pathlib.Path,
    store_url: str,
    state_dir: pathlib.Path,
    spec: str,
    *,
    seed: int,
    data_mib: int,
) -> tuple[pathlib.Path, list[str], str]:
    """A Proxy source with ``data_mib`` of random data, its spec; endpoint args and NBD URL."""
    source = tmp_path / "source.raw"
    with source.open("wb") as file:
        file.write(random.Random(seed).randbytes(data_mib * MiB))
        file.truncate(SIZE)
    spec_file = tmp_path / "vpg.yaml"
    spec_file.write_text(spec.format(source=source))
    port = s3server.free_port()
    args = ["--storage", store_url, "--state-dir", str(state_dir), "--port", str(port)]
    args += ["--takeover", "force", str(spec_file)]
    return source, args, f"nbd://127.0.0.1:{port}/crash/vm/root"


async def _assert_recoveries(env: EndpointEnv, now: bytes, expected: dict[int, bytes]) -> None:
    """The latest checkpoint equals ``now`` (the source); each of ``expected`` is unchanged."""
    listed = await _checkpoints(env.store)
    latest = await env.recover("crash", listed[-1].id)
    assert_same(latest[("vm", "root")], now, "the latest checkpoint")
    for checkpoint_id, image in expected.items():
        recovered = await env.recover("crash", checkpoint_id)
        assert_same(
            recovered[("vm", "root")], image, f"checkpoint {checkpoint_id} (before the crash)"
        )


def _dirty_regions(path: pathlib.Path) -> list[int]:
    image = _endpoint.read_dirty_map(path)
    assert image is not None
    assert not image.full
    assert image.region_size == REGION
    return [int(i) for i in np.flatnonzero(image.bits)]


@pytest.mark.slow
async def test_kill_9_then_restart_resyncs_the_dirty_regions(
    s3_env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source, args, url = _endpoint_args(
        tmp_path, s3_env.store_url, s3_env.state_dir, SPEC, seed=9, data_mib=8
    )
    stderr = tmp_path / "endpoint.stderr"
    expected: dict[int, bytes] = {}

    first = await EndpointProcess.start(*args, stderr=stderr)
    try:
        assert f"{url}  Proxy  InitialSync" in first.output
        await first.wait_for("crash/vm/root: Protecting")
        (initial,) = await _checkpoints(s3_env.store)
        expected[initial.id] = source.read_bytes()
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x31 4M 3M", "-c", "write -z 0 1M", url)
        settled = await _next_checkpoint(s3_env.store, 1)
        expected[settled.id] = source.read_bytes()

        # A burst of writes nobody checkpoints, then the endpoint dies mid-session.
        session = await InteractiveQemuIo.start(url, "-t", "writeback")
        rng = random.Random(4)
        for _ in range(24):
            offset = rng.randrange(0, SIZE - 65536, 512)
            reply = await session.command(f"write -P {rng.randrange(1, 256)} {offset} 64k")
            assert reply.startswith("wrote"), reply
        await first.stop(signal.SIGKILL)
        await session.close()
    finally:
        await first.stop(signal.SIGKILL)

    # Write-ahead: every region that differs from the last checkpoint is in the map.
    now = source.read_bytes()
    before = expected[settled.id]
    changed = {
        r
        for r in range(SIZE // REGION)
        if now[r * REGION : (r + 1) * REGION] != before[r * REGION : (r + 1) * REGION]
    }
    dirty = _dirty_regions(s3_env.state_dir / "crash" / "vm" / "root.dirty")
    assert changed, "the burst changed nothing?"
    assert changed <= set(dirty), f"regions changed but not marked: {changed - set(dirty)}"
    assert len(dirty) < SIZE // REGION

    second = await EndpointProcess.start(*args, stderr=stderr)
    try:
        assert f"Resyncing: re-reading {len(dirty)} dirty regions of the source" in second.output
        await second.wait_for("crash/vm/root: Protecting")
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x32 30M 2M", url)
        code = await second.stop(signal.SIGTERM)
    finally:
        await second.stop(signal.SIGKILL)
    assert code == 0, f"{second.output}\n{stderr.read_text()}"
    assert re.search(r"Closed cleanly: final checkpoint \d+ durable", second.output)
    assert _dirty_regions(s3_env.state_dir / "crash" / "vm" / "root.dirty") == []

    await _assert_recoveries(s3_env, source.read_bytes(), expected)
