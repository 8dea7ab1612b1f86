"""Test support: disks and servers (NbdEnv), a recording backend, clients, polling."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import pathlib
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from ebbtide_engine import _nbd

MiB = 1024 * 1024

#: Which Debian package provides each client binary (scripts/install installs them).
DEBIAN_PACKAGES = {
    "qemu-io": "qemu-utils",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "nbdinfo": "libnbd-bin",
    "nbdcopy": "libnbd-bin",
}


def need(tool: str) -> str:
    """The path of a client binary, or skip the test naming the package to install."""
    path = shutil.which(tool)
    if path is None:
        package = DEBIAN_PACKAGES.get(tool, tool)
        pytest.skip(f"{tool} is not installed: apt-get install {package} (or run scripts/install)")
    return path


@dataclasses.dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.args)}\nexit {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


async def run(*args: str, within: float = 30.0, check: bool = True) -> Result:
    """Run a client as a subprocess without blocking the event loop the server runs in."""
    need(args[0])
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        async with asyncio.timeout(within):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        process.kill()
        stdout, stderr = await process.communicate()
        raise AssertionError(
            f"{args[0]} did not finish within {within} s:\n"
            + Result(args, -9, stdout.decode(errors="replace"), stderr.decode()).describe()
        ) from None
    assert process.returncode is not None
    result = Result(args, process.returncode, stdout.decode(errors="replace"), stderr.decode())
    if check and result.returncode != 0:
        raise AssertionError(result.describe())
    return result


async def eventually(condition: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail with ``what`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for: {what}")
        await asyncio.sleep(0.005)


@dataclasses.dataclass(frozen=True)
class Call:
    """One call that reached the backend, recorded as it was made."""

    op: str
    offset: int = 0
    length: int = 0
    data: bytes | None = None
    fua: bool = False
    may_trim: bool | None = None


class RecordingBackend:
    """Wraps a backend; records every call in order, can fail or hold calls on demand."""

    def __init__(self, inner: _nbd.FileBackend) -> None:
        self.inner = inner
        self.path = pathlib.Path(inner.path)
        self.calls: list[Call] = []
        self.disconnects = 0
        #: Raised by the next data call (read/write/flush/trim/zero), then cleared.
        self.fail_next: BaseException | None = None
        #: When set, writes wait for this event before touching the file.
        self.gate: asyncio.Event | None = None

    @property
    def size(self) -> int:
        return self.inner.size

    @property
    def read_only(self) -> bool:
        return self.inner.read_only

    @property
    def writes(self) -> list[Call]:
        return [call for call in self.calls if call.op == "write"]

    def _record(self, call: Call) -> None:
        self.calls.append(call)
        failure, self.fail_next = self.fail_next, None
        if failure is not None:
            raise failure

    async def read(self, offset: int, length: int) -> bytes:
        self._record(Call("read", offset, length))
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        # ``data`` is the connection's buffer, reused after this call: keep a copy.
        self._record(Call("write", offset, len(data), bytes(data), fua))
        if self.gate is not None:
            await self.gate.wait()
        await self.inner.write(offset, data, fua=fua)

    async def flush(self) -> None:
        self._record(Call("flush"))
        await self.inner.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self._record(Call("trim", offset, length, fua=fua))
        await self.inner.trim(offset, length, fua=fua)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        self._record(Call("write_zeroes", offset, length, fua=fua, may_trim=may_trim))
        await self.inner.write_zeroes(offset, length, fua=fua, may_trim=may_trim)

    async def disconnected(self) -> None:
        self.disconnects += 1


class NbdEnv:
    """Makes disks (recorded FileBackends) and servers; cleans both up after the test."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[_nbd.NbdServer] = []
        self.files: list[_nbd.FileBackend] = []

    def disk(
        self, size: int = 4 * MiB, *, read_only: bool = False, content: bytes | None = None
    ) -> RecordingBackend:
        """A new file of ``size`` bytes (sparse zeroes or ``content``) as a recorded backend."""
        path = self.tmp_path / f"disk{len(self.files)}.img"
        with path.open("wb") as file:
            if content is not None:
                file.write(content)
            file.truncate(size)
        backend = _nbd.FileBackend(path, read_only=read_only)
        self.files.append(backend)
        return RecordingBackend(backend)

    async def serve(
        self, exports: Mapping[str, _nbd.ExportBackend], **settings: Any
    ) -> _nbd.NbdServer:
        server = _nbd.NbdServer(exports, **settings)
        self.servers.append(server)
        await server.start()
        return server

    async def aclose(self) -> None:
        for server in self.servers:
            await server.close()
        for backend in self.files:
            backend.close()
