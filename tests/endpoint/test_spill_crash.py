"""kill -9 of an endpoint with spilled segments: they are never shipped, the dirty map resends.

``ebbtide endpoint`` runs as a child process and reaches the moto S3 server
through a relay in this test that can hold back everything the endpoint
sends (a stalled bucket). While it is held, a client writes a burst: with
one upload in flight and a 1 MiB memory bound, the endpoint acknowledges it
by spilling segments to ``<state-dir>/<vpg>/spill``. Then it is killed with
SIGKILL, spill files and all. The restarted endpoint (a new writer epoch)
deletes those files instead of uploading them (their writes are void: no
checkpoint covers them), re-reads the regions its dirty map names from the
source, and after a clean stop the latest checkpoint recovers to the source
byte for byte, while every checkpoint listed before the crash still
recovers to what the disk was then.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import signal
import urllib.parse

import pytest

from tests import s3server

from ._support import EndpointEnv, eventually, run
from .test_crash import (
    EndpointProcess,
    _assert_recoveries,
    _checkpoints,
    _dirty_regions,
    _endpoint_args,
    _next_checkpoint,
)

SPEC = """\
apiVersion: ebbtide.io/v1alpha1
kind: VirtualProtectionGroup
metadata:
  name: crash
spec:
  checkpointInterval: 1h   # only the checkpoints the test causes
  journal:
    segmentMaxBytes: 256Ki
    maxUnshippedBytes: 1Mi
    maxSpillBytes: 64Mi
    uploadConcurrency: 1
  vms:
    - name: vm
      disks:
        - name: root
          size: 32Mi
          mode: Proxy
          source:
            path: {source}
"""


class Relay:
    """A TCP relay to the S3 server; while ``gate`` is clear, nothing the clients send passes."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.gate = asyncio.Event()
        self.gate.set()
        self.port = s3server.free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        forward = asyncio.create_task(self._pump(reader, upstream_writer, gated=True))
        back = asyncio.create_task(self._pump(upstream_reader, writer, gated=False))
        self._tasks.update((forward, back))
        await asyncio.gather(forward, back, return_exceptions=True)
        self._tasks.difference_update((forward, back))

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, gated: bool
    ) -> None:
        try:
            while data := await reader.read(1 << 16):
                if gated:
                    await self.gate.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        self.gate.set()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _through(store_url: str, relay: Relay) -> str:
    """``store_url`` with its endpoint= pointing at the relay."""
    parts = urllib.parse.urlsplit(store_url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["endpoint"] = f"http://127.0.0.1:{relay.port}"
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


@pytest.mark.slow
async def test_kill_9_with_spilled_segments_then_restart_resyncs(
    s3_env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    endpoint_url = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(s3_env.store_url).query))[
        "endpoint"
    ]
    target = urllib.parse.urlsplit(endpoint_url)
    assert target.hostname is not None
    assert target.port is not None
    relay = Relay(target.hostname, target.port)
    await relay.start()
    source, args, url = _endpoint_args(
        tmp_path, _through(s3_env.store_url, relay), s3_env.state_dir, SPEC, seed=7, data_mib=4
    )
    stderr = tmp_path / "endpoint.stderr"
    spill = s3_env.state_dir / "crash" / "spill"
    expected: dict[int, bytes] = {}
    try:
        first = await EndpointProcess.start(*args, stderr=stderr)
        try:
            await first.wait_for("crash/vm/root: Protecting")
            (initial,) = await _checkpoints(s3_env.store)
            expected[initial.id] = source.read_bytes()
            await run("qemu-io", "-f", "raw", "-c", "write -P 0x31 4M 1M", url)
            settled = await _next_checkpoint(s3_env.store, 1)
            expected[settled.id] = source.read_bytes()

            relay.gate.clear()  # the bucket stops answering
            # 12 MiB acknowledged with 1 MiB of memory: the rest goes to the spill.
            burst = [*range(8, 16), *range(20, 24)]
            writes = [f"write -P {0x40 + i} {region}M 1M" for i, region in enumerate(burst)]
            await run("qemu-io", "-f", "raw", *(f"-c{w}" for w in writes), url, within=60)
            await eventually(
                lambda: len(list(spill.glob("*.arrow"))) >= len(burst) - 2,
                "the burst to be spilled (one write uploads, one may be in memory)",
            )
            files = sorted(spill.glob("*.arrow"))
            await first.stop(signal.SIGKILL)
        finally:
            await first.stop(signal.SIGKILL)
        assert sorted(spill.glob("*.arrow")) == files  # a crash leaves them behind
        relay.gate.set()

        # The map names every region the unshipped burst touched.
        dirty = set(_dirty_regions(s3_env.state_dir / "crash" / "vm" / "root.dirty"))
        assert set(burst) <= dirty, f"regions written but not marked: {set(burst) - dirty}"

        second = await EndpointProcess.start(*args, stderr=stderr)
        try:
            assert "Resyncing" in second.output
            assert list(spill.glob("*.arrow")) == []  # deleted, never uploaded
            await second.wait_for("crash/vm/root: Protecting", within=60)
            code = await second.stop(signal.SIGTERM)
        finally:
            await second.stop(signal.SIGKILL)
        assert code == 0, f"{second.output}\n{stderr.read_text()}"
        assert "spill files" in stderr.read_text()  # the warning says what was deleted
    finally:
        with contextlib.suppress(Exception):
            await relay.close()

    await _assert_recoveries(s3_env, source.read_bytes(), expected)
