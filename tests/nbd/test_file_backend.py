"""FileBackend: the local file half of proxy mode (sizes, durability, trim and zeroing)."""

from __future__ import annotations

import ctypes
import errno
import os
import pathlib
import threading

import pytest

from ebbtide_engine._nbd import FileBackend, _file

MiB = 1024 * 1024


def contents(path: pathlib.Path) -> bytes:
    return path.read_bytes()


def allocated(path: pathlib.Path) -> int:
    return path.stat().st_blocks


@pytest.fixture
def path(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xff" * (2 * MiB))
    return path


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = os.fdatasync

    def counting(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", counting)
    return calls


def test_size_comes_from_the_file_or_extends_it(path: pathlib.Path) -> None:
    with FileBackend(path) as backend:
        assert backend.size == 2 * MiB
        assert not backend.read_only
    with FileBackend(path, size=MiB) as backend:
        assert backend.size == MiB  # serves a prefix; the file keeps its length
    assert path.stat().st_size == 2 * MiB
    with FileBackend(path, size=3 * MiB) as backend:
        assert backend.size == 3 * MiB
    assert path.stat().st_size == 3 * MiB


def test_read_only_cannot_grow_and_bad_sizes_are_refused(path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="smaller than the export size"):
        FileBackend(path, size=4 * MiB, read_only=True)
    with pytest.raises(ValueError, match="negative"):
        FileBackend(path, size=-1)
    with pytest.raises(FileNotFoundError):
        FileBackend(path.with_name("missing.img"))


async def test_read_write_and_fua(path: pathlib.Path, syncs: list[int]) -> None:
    with FileBackend(path) as backend:
        await backend.write(10, b"hello", fua=False)
        assert syncs == []
        await backend.write(1000, b"world", fua=True)
        assert len(syncs) == 1
        assert await backend.read(8, 9) == b"\xff\xffhello\xff\xff"
        await backend.flush()
        assert len(syncs) == 2
        await backend.disconnected()
    assert contents(path)[1000:1005] == b"world"


async def test_read_past_a_shrunk_file_reads_zeroes(path: pathlib.Path) -> None:
    with FileBackend(path) as backend:
        os.truncate(path, 100)
        assert await backend.read(90, 20) == b"\xff" * 10 + bytes(10)


@pytest.mark.parametrize(
    ("operation", "may_trim"), [("trim", None), ("zero", True), ("zero", False)]
)
async def test_trim_and_zeroes_read_back_as_zero(
    path: pathlib.Path, syncs: list[int], operation: str, may_trim: bool | None
) -> None:
    with FileBackend(path) as backend:
        if operation == "trim":
            await backend.trim(4096, MiB, fua=True)
        else:
            assert may_trim is not None
            await backend.write_zeroes(4096, MiB, fua=True, may_trim=may_trim)
        assert len(syncs) == 1
        assert await backend.read(4095, MiB + 2) == b"\xff" + bytes(MiB) + b"\xff"
    assert len(contents(path)) == 2 * MiB


async def test_trim_punches_a_hole_where_the_file_system_can(path: pathlib.Path) -> None:
    with FileBackend(path) as backend:
        before = allocated(path)
        await backend.trim(0, 2 * MiB, fua=False)
        if backend._unsupported_modes:
            pytest.skip(f"{path.parent} cannot punch holes")
        assert allocated(path) < before


async def test_without_fallocate_zeroes_are_written(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_file, "_fallocate", None)
    with FileBackend(path) as backend:
        await backend.trim(0, 3 * MiB // 2, fua=False)
        await backend.write_zeroes(MiB + MiB // 2, 100, fua=False, may_trim=False)
    assert contents(path) == bytes(3 * MiB // 2 + 100) + b"\xff" * (MiB // 2 - 100)


async def test_unsupported_fallocate_modes_are_remembered(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def refusing(fd: int, mode: int, offset: int, length: int) -> int:
        calls.append(mode)
        ctypes.set_errno(errno.EOPNOTSUPP)
        return -1

    monkeypatch.setattr(_file, "_fallocate", refusing)
    with FileBackend(path) as backend:
        for _ in range(3):
            await backend.write_zeroes(0, 4096, fua=False, may_trim=True)
        # Punch hole and zero range were each tried once, then written as zeroes.
        assert len(calls) == len(set(calls)) == 2
        assert await backend.read(0, 4096) == bytes(4096)


async def test_fallocate_errors_other_than_unsupported_are_raised(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int, mode: int, offset: int, length: int) -> int:
        ctypes.set_errno(errno.EIO)
        return -1

    monkeypatch.setattr(_file, "_fallocate", failing)
    with FileBackend(path) as backend, pytest.raises(OSError, match="fallocate") as caught:
        await backend.trim(0, 4096, fua=False)
    assert caught.value.errno == errno.EIO


def test_close_is_idempotent(path: pathlib.Path) -> None:
    backend = FileBackend(path)
    backend.close()
    backend.close()


async def test_plain_writes_run_on_the_loop_until_one_is_slow_then_in_threads(
    path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain small writes are page-cache copies: inline; FUA, big or throttled ones: threads."""
    threads: list[int] = []
    with FileBackend(path) as backend:
        real = backend._write

        def recording(offset: int, data: bytes | memoryview, fua: bool) -> None:
            threads.append(threading.get_ident())
            real(offset, data, fua)

        monkeypatch.setattr(backend, "_write", recording)
        loop_thread = threading.get_ident()
        await backend.write(0, b"\x01" * 4096, fua=False)
        await backend.write(4096, b"\x02" * 4096, fua=True)
        await backend.write(0, b"\x03" * (_file._INLINE_WRITE_MAX + 4096), fua=False)
        assert [t == loop_thread for t in threads] == [True, False, False]
        # The kernel throttles (a write took longer than the limit): threads for a while.
        monkeypatch.setattr(_file, "_INLINE_WRITE_SLOW", -1.0)
        await backend.write(8192, b"\x04" * 4096, fua=False)
        await backend.write(8192, b"\x05" * 4096, fua=False)
        assert [t == loop_thread for t in threads[3:]] == [True, False]
    data = contents(path)
    assert data[:4096] == b"\x03" * 4096
    assert data[8192:12288] == b"\x05" * 4096
