"""QEMU's blockdev-mirror (write-blocking) into a mirror-target export, end to end.

qemu-storage-daemon stands in for a VM's QEMU: it holds the guest disk (a
raw file, node ``src``), exports it over NBD so the test can write to it as
a guest would, and runs a ``blockdev-mirror`` job with ``sync: full`` and
``copy-mode: write-blocking`` to the endpoint's export. After the full pass
(BLOCK_JOB_READY) every guest write is delivered to the endpoint before the
guest sees it complete, so a checkpoint taken after a guest write recovers
exactly the guest disk.
"""

from __future__ import annotations

import pathlib
import random

from ebbtide_engine import _endpoint

from ._support import (
    EndpointEnv,
    MiB,
    StorageDaemon,
    assert_same,
    eventually,
    mirror_disk,
    run,
    vpg_spec,
)

SIZE = 16 * MiB


def _guest_disk(path: pathlib.Path) -> None:
    """Random data in the first half of each 4 MiB, holes in the rest."""
    rng = random.Random(11)
    with path.open("wb") as file:
        for start in range(0, SIZE, 4 * MiB):
            file.seek(start)
            file.write(rng.randbytes(2 * MiB))
        file.truncate(SIZE)


def _state(endpoint: _endpoint.Endpoint) -> _endpoint.DiskStatus:
    return endpoint.status().disks[0]


async def _guest_writes(daemon: StorageDaemon, *commands: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for command in commands:
        args += ["-c", command]
    await run(*args, daemon.url)


async def test_mirror_pass_then_guest_writes_recover_exactly(
    s3_env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = tmp_path / "guest.raw"
    _guest_disk(source)
    spec = vpg_spec("qemu", {"vm": [mirror_disk("root", SIZE)]})
    endpoint = await s3_env.open(spec)
    assert _state(endpoint).state == _endpoint.SyncState.INITIAL_SYNC
    daemon = await StorageDaemon.start(tmp_path, source)
    try:
        await daemon.mirror_to(endpoint.url("vm", "root"), node="target", job="mirror")
        ready = await daemon.qmp.event("BLOCK_JOB_READY")
        assert ready["data"]["device"] == "mirror"
        # The full pass wrote (or zeroed) every byte: the initial sync is complete
        # once a checkpoint covers it.
        await eventually(
            lambda: _state(endpoint).state == _endpoint.SyncState.PROTECTING,
            "the mirror target to reach Protecting after the full pass",
        )

        # Guest writes, through the daemon's block layer and so through the mirror.
        await _guest_writes(
            daemon,
            "write -P 0xa1 0 64k",
            "write -P 0xa2 12345 6789",  # unaligned: forwarded one-for-one
            "write -z 2M 1M",
            "write -P 0xa3 15M 1M",
        )
        checkpoint = await endpoint.runtime.checkpoint(tag="guest")
        recovered = await s3_env.recover("qemu", checkpoint.id)
        assert_same(recovered[("vm", "root")], source.read_bytes(), "recovered guest disk")
        # The replica answers reads with what the guest wrote.
        assert_same(
            (s3_env.state_dir / "qemu" / "vm" / "root.replica").read_bytes(),
            source.read_bytes(),
            "the mirror target's replica",
        )
        await daemon.end_job("mirror", "target")
    finally:
        await daemon.stop()


async def test_after_a_crash_a_new_mirror_pass_resyncs(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    source = tmp_path / "guest.raw"
    _guest_disk(source)
    spec = vpg_spec("crashy", {"vm": [mirror_disk("root", SIZE)]})
    endpoint = await env.open(spec)
    daemon = await StorageDaemon.start(tmp_path, source)
    try:
        await daemon.mirror_to(endpoint.url("vm", "root"), node="target1", job="pass1")
        await daemon.qmp.event("BLOCK_JOB_READY")
        await eventually(
            lambda: _state(endpoint).state == _endpoint.SyncState.PROTECTING, "first pass"
        )
        await _guest_writes(daemon, "write -P 0xb1 1M 64k")

        # The endpoint dies: its unshipped writes are void, and the job loses its target.
        await endpoint.abort()
        await daemon.end_job("pass1", "target1")
        await _guest_writes(daemon, "write -P 0xb2 5M 64k")  # while nothing mirrors

        endpoint = await env.open(spec, takeover="force")
        status = _state(endpoint)
        assert status.state == _endpoint.SyncState.NEEDS_MIRROR_PASS, status
        assert "blockdev-mirror full pass" in status.message

        await daemon.mirror_to(endpoint.url("vm", "root"), node="target2", job="pass2")
        await daemon.qmp.event("BLOCK_JOB_READY")
        await eventually(
            lambda: _state(endpoint).state == _endpoint.SyncState.PROTECTING, "second pass"
        )
        await _guest_writes(daemon, "write -P 0xb3 9M 64k")
        checkpoint = await endpoint.runtime.checkpoint()
        recovered = await env.recover("crashy", checkpoint.id)
        assert_same(recovered[("vm", "root")], source.read_bytes(), "recovered after resync")
        await daemon.end_job("pass2", "target2")
    finally:
        await daemon.stop()
