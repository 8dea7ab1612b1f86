"""Where a Recovery's disks go: image files in a directory, or objects in a recovery bucket.

A :class:`Placement` is what a copy produced: per disk a URL for
``status.exports``. Both targets are named deterministically from the
Recovery (``<path>/<vm>/<disk>.raw``; ``recoveries/<recovery>/<vm>/<disk>.raw``
in the bucket), so a Rollback — also after an operator restart — removes
exactly what the operation wrote from the (vm, disk) pairs in status.
PersistentVolumeClaims are the other target; their Jobs live in ``_restorejobs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence

import ebbtide_engine
from ebbtide_operator import _accounts

Progress = Callable[[int, int], None]

# Uploads of recovered images to a recovery bucket: S3 holds each part in flight
# about twice (see ObjectStore.put_file), so this bounds one upload's memory.
UPLOAD_PART_SIZE = 16 << 20
UPLOAD_MEMORY = 128 << 20
_S3_MAX_PARTS = 10_000  # a bigger image needs bigger parts: then fewer at a time
Export = tuple[str, str, str]  # (vm, disk, url)


def object_key(recovery: str, vm: str, disk: str) -> str:
    """Where a recovered image goes in a recovery bucket (under the account's prefix)."""
    return f"recoveries/{recovery}/{vm}/{disk}.raw"


def object_url(account: _accounts.ResolvedAccount, key: str) -> str:
    """``s3://bucket/prefix/key`` (or ``file:///dir/key``): the account URL without its query."""
    base = account.url.partition("?")[0].rstrip("/")
    return f"{base}/{key}"


async def copy_to_path(
    store: ebbtide_engine.ObjectStore,
    vpg: str,
    selector: ebbtide_engine.CheckpointSelector,
    path: pathlib.Path,
    *,
    vms: Sequence[str] | None,
    progress: Progress,
    owner: str,
) -> tuple[ebbtide_engine.RecoveryResult, list[Export]]:
    """Raw images ``<path>/<vm>/<disk>.raw`` (the engine renames ``*.partial`` at the end)."""
    result = await ebbtide_engine.recover_to_files(
        store,
        vpg,
        selector,
        path,
        vms=list(vms) if vms else None,
        progress=progress,
        hold_owner=owner,
    )
    return result, [(d.vm, d.disk, d.path.resolve().as_uri()) for d in result.disks]


async def copy_to_account(
    store: ebbtide_engine.ObjectStore,
    vpg: str,
    selector: ebbtide_engine.CheckpointSelector,
    account: _accounts.ResolvedAccount,
    recovery: str,
    scratch: pathlib.Path,
    *,
    vms: Sequence[str] | None,
    progress: Progress,
    owner: str,
) -> tuple[ebbtide_engine.RecoveryResult, list[Export]]:
    """Recover to a scratch directory, then upload each image into the recovery bucket.

    Each image is streamed with :meth:`ObjectStore.put_file` (S3: a multipart
    upload, aborted if it fails), so neither the operator's memory nor S3's
    5 GiB limit on a single PUT bounds a disk's size (the scratch directory
    must hold the recovered images; each is deleted once uploaded).
    An object left by an earlier attempt (the operator restarted) is
    replaced. ``progress`` covers both steps: the recovery is the first half
    of ``total``, the upload the second.
    """
    work = await asyncio.to_thread(_workdir, scratch, recovery)
    target = account.open()
    recovered_total = 0

    def recovering(done: int, total: int) -> None:
        nonlocal recovered_total
        recovered_total = total
        progress(done // 2, total)

    try:
        result = await ebbtide_engine.recover_to_files(
            store,
            vpg,
            selector,
            work,
            vms=list(vms) if vms else None,
            progress=recovering,
            hold_owner=owner,
        )
        sizes = [(await asyncio.to_thread(disk.path.stat)).st_size for disk in result.disks]
        total = max(recovered_total, sum(sizes))
        uploaded = 0
        exports: list[Export] = []
        for disk, size in zip(result.disks, sizes, strict=True):
            key = object_key(recovery, disk.vm, disk.disk)

            def uploading(done: int, before: int = uploaded) -> None:
                progress((total + before + done) // 2, total)

            part_size = max(UPLOAD_PART_SIZE, -(-size // _S3_MAX_PARTS))
            await target.put_file(
                key,
                disk.path,
                part_size=part_size,
                concurrency=max(1, min(4, UPLOAD_MEMORY // (2 * part_size))),
                progress=uploading,
            )
            uploaded += size
            await asyncio.to_thread(disk.path.unlink)
            exports.append((disk.vm, disk.disk, object_url(account, key)))
        return result, exports
    finally:
        await target.close()
        await asyncio.to_thread(shutil.rmtree, work, True)


def _workdir(scratch: pathlib.Path, recovery: str) -> pathlib.Path:
    scratch.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(tempfile.mkdtemp(prefix=f"{recovery}-", dir=scratch))


def remove_files(path: pathlib.Path, disks: Iterable[tuple[str, str]]) -> int:
    """Delete ``<path>/<vm>/<disk>.raw`` (and ``.partial``) and emptied VM directories."""
    removed = 0
    for vm, disk in disks:
        for name in (f"{disk}.raw", f"{disk}.raw.partial"):
            file = path / vm / name
            if file.exists():
                file.unlink()
                removed += 1
        with contextlib.suppress(OSError):
            (path / vm).rmdir()  # only if now empty
    return removed


async def remove_objects(
    account: _accounts.ResolvedAccount, recovery: str, disks: Iterable[tuple[str, str]]
) -> int:
    """Delete the recovered images of ``recovery`` from the recovery bucket."""
    target = account.open()
    removed = 0
    try:
        for vm, disk in disks:
            with contextlib.suppress(ebbtide_engine.ObjectNotFound):
                await target.delete(object_key(recovery, vm, disk))
                removed += 1
    finally:
        await target.close()
    return removed
