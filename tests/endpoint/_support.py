"""Test support for the endpoint: VPG specs, endpoints torn down per test, recovery, QMP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ebbtide_engine as ebbtide
from ebbtide_engine import _endpoint, _format, _keys, storage
from tests.nbd._support import MiB, eventually, need, run

__all__ = ["EndpointEnv", "MiB", "Qmp", "eventually", "need", "run"]

DiskKey = tuple[str, str]


def vpg_spec(
    name: str,
    vms: Mapping[str, Sequence[Mapping[str, Any]]],
    **overrides: Any,
) -> ebbtide.VpgSpec:
    """A VPG spec from ``{vm: [disk, ...]}`` (disk entries in the CRD's camelCase form)."""
    body: dict[str, Any] = {
        "vms": [{"name": vm, "disks": list(disks)} for vm, disks in vms.items()],
        "journal": {"segmentMaxBytes": "1Mi", "maxUnshippedBytes": "16Mi"},
        "checkpointInterval": "1h",  # tests take the checkpoints they need
    }
    body.update(overrides)
    return ebbtide.VpgSpec.parse(name, body)


def proxy_disk(name: str, size: int, path: pathlib.Path) -> dict[str, Any]:
    return {"name": name, "size": size, "mode": "Proxy", "source": {"path": str(path)}}


def mirror_disk(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "size": size, "mode": "Mirror"}


def runtime_options(**overrides: Any) -> ebbtide.RuntimeOptions:
    """Manual checkpoints, fast retries, a short lease (a killed endpoint is replaced fast)."""
    values: dict[str, Any] = {
        "auto_checkpoints": False,
        "retry_initial_seconds": 0.01,
        "retry_max_seconds": 0.05,
        "lease_seconds": 1.0,
    }
    values.update(overrides)
    return ebbtide.RuntimeOptions(**values)


class EndpointEnv:
    """Opens endpoints on one storage account and one state directory; closes them after."""

    def __init__(self, tmp_path: pathlib.Path, store_url: str) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"
        self.store_url = store_url
        self.store = storage.open_store(store_url)
        self.endpoints: list[_endpoint.Endpoint] = []

    async def open(
        self,
        spec: ebbtide.VpgSpec,
        *,
        store: storage.ObjectStore | None = None,
        options: _endpoint.EndpointOptions | None = None,
        **runtime: Any,
    ) -> _endpoint.Endpoint:
        endpoint = await _endpoint.Endpoint.open(
            spec,
            store or self.store,
            self.state_dir,
            options=options,
            runtime_options=runtime_options(**runtime),
        )
        self.endpoints.append(endpoint)
        return endpoint

    async def recover(
        self, vpg: str, checkpoint_id: int, *, name: str | None = None
    ) -> dict[DiskKey, bytes]:
        """Every disk of ``vpg`` at the checkpoint, read from the storage account alone."""
        out_dir = self.tmp_path / "recovered" / (name or str(checkpoint_id))
        result = await ebbtide.recover_to_files(
            self.store, vpg, ebbtide.CheckpointSelector(id=checkpoint_id), out_dir
        )
        return {(d.vm, d.disk): d.path.read_bytes() for d in result.disks}

    async def aclose(self) -> None:
        for endpoint in self.endpoints:
            await endpoint.close()
        await self.store.close()


def difference(got: bytes, want: bytes) -> str | None:
    """None if equal, else where and how the two images first differ."""
    if got == want:
        return None
    if len(got) != len(want):
        return f"sizes differ: {len(got)} != {len(want)}"
    at = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
    return f"first difference at byte {at} (block {at // 4096}): {got[at]:#x} != {want[at]:#x}"


def assert_same(got: bytes, want: bytes, what: str) -> None:
    problem = difference(got, want)
    assert problem is None, f"{what}: {problem}"


class Qmp:
    """A tiny QMP client (JSON lines over a unix socket), enough to drive a mirror job."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.events: list[dict[str, Any]] = []

    @classmethod
    async def connect(cls, path: pathlib.Path, *, within: float = 10.0) -> Qmp:
        await eventually(path.exists, f"QMP socket {path}", within=within)
        async with asyncio.timeout(within):
            while True:  # the socket file appears a moment before the daemon listens on it
                try:
                    reader, writer = await asyncio.open_unix_connection(path)
                    break
                except ConnectionRefusedError:
                    await asyncio.sleep(0.02)
            qmp = cls(reader, writer)
            greeting = await qmp._message()
            assert "QMP" in greeting, greeting
            await qmp.execute("qmp_capabilities")
        return qmp

    async def _message(self) -> dict[str, Any]:
        line = await self._reader.readline()
        if not line:
            raise ConnectionError("QMP connection closed")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run a command; returns its result, raises AssertionError with QMP's error."""
        request = {"execute": command, "arguments": arguments}
        self._writer.write(json.dumps(request).encode() + b"\n")
        await self._writer.drain()
        while True:
            message = await self._message()
            if "event" in message:
                self.events.append(message)
                continue
            assert "error" not in message, f"{command}: {message['error']}"
            return message["return"]

    async def event(self, name: str, *, within: float = 30.0) -> dict[str, Any]:
        """Wait for the next event called ``name`` (events seen earlier count)."""
        async with asyncio.timeout(within):
            while True:
                for index, seen in enumerate(self.events):
                    if seen["event"] == name:
                        del self.events[: index + 1]
                        return seen
                self.events.append(await self._message())

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


@dataclasses.dataclass(frozen=True)
class Row:
    """One journal row as a test sees it."""

    lsn: int
    epoch: int
    op: str  # write, trim, zero, checkpoint
    disk: str
    offset: int
    length: int
    data_bytes: int


_OPS = {0: "write", 1: "trim", 2: "zero", 3: "checkpoint"}


async def journal_rows(store: storage.ObjectStore, vpg: str, vm: str) -> list[Row]:
    """Every row of a VM's journal in the bucket, in LSN order (all epochs)."""
    layout = _keys.VpgLayout(vpg)
    rows: list[Row] = []
    async for info in store.list(layout.journal_prefix(vm)):
        name = layout.parse_segment(info.key)
        body = (await store.get(info.key)).data
        segment = _format.decode_journal_segment(info.key, body, crc=name.crc32c)
        r = segment.rows
        for i in range(len(r.lsn)):
            rows.append(
                Row(
                    lsn=int(r.lsn[i]),
                    epoch=segment.epoch,
                    op=_OPS[int(r.op[i])],
                    disk=segment.disks[int(r.disk[i])],
                    offset=int(r.offset[i]),
                    length=int(r.length[i]),
                    data_bytes=int(r.data_offsets[i + 1] - r.data_offsets[i]),
                )
            )
    return sorted(rows, key=lambda row: row.lsn)


class StorageDaemon:
    """qemu-storage-daemon serving a raw file as node ``src``, with QMP and an NBD export.

    The daemon stands in for a VM's QEMU: writes sent to its NBD export
    (``url``) go through its block layer, so a mirror job on ``src`` sees
    them as guest writes.
    """

    def __init__(self, process: asyncio.subprocess.Process, qmp: Qmp, url: str) -> None:
        self.process = process
        self.qmp = qmp
        self.url = url

    @classmethod
    async def start(cls, directory: pathlib.Path, source: pathlib.Path) -> StorageDaemon:
        binary = need("qemu-storage-daemon")
        qmp_path = directory / "qmp.sock"
        nbd_path = directory / "nbd.sock"
        process = await asyncio.create_subprocess_exec(
            binary,
            "--blockdev",
            f"driver=file,filename={source},node-name=src",
            "--chardev",
            f"socket,path={qmp_path},server=on,wait=off,id=qmp0",
            "--monitor",
            "chardev=qmp0",
            "--nbd-server",
            f"addr.type=unix,addr.path={nbd_path}",
            "--export",
            "type=nbd,id=exp0,node-name=src,name=src,writable=on",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            qmp = await Qmp.connect(qmp_path)
        except BaseException:
            process.kill()
            await process.wait()
            raise
        return cls(process, qmp, f"nbd+unix:///src?socket={nbd_path}")

    async def mirror_to(self, url: str, *, node: str, job: str) -> None:
        """blockdev-add an NBD node for ``url`` and start a write-blocking full mirror to it."""
        host_port, _, export = url.removeprefix("nbd://").partition("/")
        host, _, port = host_port.rpartition(":")
        await self.qmp.execute(
            "blockdev-add",
            driver="nbd",
            **{"node-name": node},
            server={"type": "inet", "host": host, "port": port},
            export=export,
        )
        await self.qmp.execute(
            "blockdev-mirror",
            **{"job-id": job, "copy-mode": "write-blocking"},
            device="src",
            target=node,
            sync="full",
        )

    async def end_job(self, job: str, node: str) -> None:
        """Cancel a mirror job (whatever state it is in) and remove its target node."""
        await self.qmp.execute("block-job-cancel", device=job, force=True)
        while any(j["device"] == job for j in await self.qmp.execute("query-block-jobs")):
            await self.qmp.event("JOB_STATUS_CHANGE", within=10)
        await self.qmp.execute("blockdev-del", **{"node-name": node})

    async def stop(self) -> None:
        if self.process.returncode is None:
            try:
                await self.qmp.execute("quit")
            except (ConnectionError, AssertionError):
                self.process.kill()
        await self.qmp.close()
        async with asyncio.timeout(10):
            await self.process.wait()


class InteractiveQemuIo:
    """A qemu-io process fed one command at a time: each ``write`` returns once acknowledged."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, url: str, *options: str) -> InteractiveQemuIo:
        process = await asyncio.create_subprocess_exec(
            need("qemu-io"),
            "-f",
            "raw",
            *options,
            url,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        return cls(process)

    async def command(self, command: str, *, within: float = 10.0) -> str:
        """Send one command and return its first line of output (after the prompt)."""
        assert self.process.stdin is not None
        assert self.process.stdout is not None
        self.process.stdin.write(command.encode() + b"\n")
        await self.process.stdin.drain()
        async with asyncio.timeout(within):
            line = (await self.process.stdout.readline()).decode()
            if line.removeprefix("qemu-io> ").startswith("wrote"):
                await self.process.stdout.readline()  # the statistics line
        return line.removeprefix("qemu-io> ").strip()

    async def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
