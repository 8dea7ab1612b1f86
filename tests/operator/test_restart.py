"""The operator can stop (or die) at any moment and rebuild everything from the bucket and API."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
import random
import socket
import time
import urllib.parse
from typing import Any

import ebbtide_engine
from ebbtide_operator import _endpoints
from tests.k8s.waiting import wait_for
from tests.nbd._support import need, run

from .conftest import (
    Cluster,
    Operators,
    account,
    checkpoint,
    endpoint_config,
    needs_kubectl,
    protecting,
    recovery,
    vpg,
)


async def _epoch(cluster: Cluster, name: str) -> int:
    condition = await cluster.condition("VirtualProtectionGroup", name, "Ready")
    return int(condition["message"].rsplit("epoch ", 1)[1])


@needs_kubectl
async def test_a_stopped_operator_resumes_protection_with_the_next_epoch(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run() as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("web", "root", 0, b"a" * 4096)
        await cluster.apply(checkpoint("first", "shop"))
        first = await cluster.wait_status(
            "Checkpoint", "first", lambda s: s.get("phase") == "Committed"
        )
        assert await _epoch(cluster, "shop") == 1
    # Stopped cleanly: the runtime shipped everything and released its lease.

    async with operators.run() as controller:
        await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: "epoch 2" in str(s.get("conditions"))
        )
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        assert runtime.status().epoch == 2
        assert first["checkpointId"] in [c.id for c in runtime.list_checkpoints()]
        committed = await cluster.status("Checkpoint", "first")
        assert committed["checkpointId"] == first["checkpointId"]  # not cut again on resume


@needs_kubectl
async def test_after_a_crash_the_same_pod_takes_its_own_lease_over_at_once(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run() as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        await controller.crash_all()  # no clean close: the lease stays held for 15 s
    manifest = json.loads((account_dir / "vpgs" / "shop" / "manifest.json").read_text())
    assert manifest["writer"] == "operator/test-pod/default/shop"

    started = time.monotonic()
    async with operators.run() as controller:
        await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: "epoch 2" in str(s.get("conditions"))
        )
        assert time.monotonic() - started < 10  # forced, not waiting out the lease
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        previous = runtime.status().previous_writer
        assert previous is not None
        assert not previous.clean_shutdown


@needs_kubectl
async def test_a_restore_running_at_a_restart_is_run_again(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run():
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
    # As if the operator had died during a restore: the Recovery says Running.
    target = tmp_path / "restore"
    await cluster.apply(recovery("restore", "shop", target))
    running = {"status": {"phase": "Running", "message": "restoring"}}
    await cluster.kubectl(
        "patch",
        "recovery",
        "restore",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(running),
    )
    async with operators.run():
        done = await cluster.wait_status(
            "Recovery", "restore", lambda s: s.get("phase") in ("Succeeded", "Failed")
        )
        assert done["phase"] == "Succeeded", done
        events = await cluster.events("restore")
        started = [e["message"] for e in events if e["reason"] == "Started"]
        assert any("restarted from the beginning" in message for message in started)
    assert (target / "web" / "root.raw").stat().st_size == 1 << 20
    store = ebbtide_engine.open_store(account_dir.as_uri())
    try:
        assert await ebbtide_engine.list_checkpoints(store, "shop")
    finally:
        await store.close()


def _disk_states(status: dict[str, Any]) -> dict[str, str]:
    return {
        f"{vm['name']}/{disk['name']}": disk["syncState"]
        for vm in status.get("vms", [])
        for disk in vm.get("disks", [])
    }


@needs_kubectl
async def test_a_crash_while_a_client_writes_reattaches_and_resyncs(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """Killed mid-stream: the restarted operator serves the same URLs and resyncs from the maps."""
    need("qemu-io")
    need("qemu-img")
    size = 2 << 20
    rng = random.Random(3)
    source = tmp_path / "data.raw"  # the Proxy disk
    source.write_bytes(rng.randbytes(size))
    guest = tmp_path / "guest.raw"  # mirrored into the Mirror disk
    guest.write_bytes(rng.randbytes(size))
    body = vpg(
        "shop",
        "local",
        vms=[
            {
                "name": "web",
                "disks": [
                    {"name": "root", "size": size, "mode": "Mirror"},
                    {
                        "name": "data",
                        "size": size,
                        "mode": "Proxy",
                        "source": {"path": str(source)},
                    },
                ],
            }
        ],
    )
    config = endpoint_config(tmp_path / "state")

    async with operators.run(config) as controller:
        await cluster.apply(account("local", account_dir.as_uri()), body)
        status = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: _disk_states(s).get("web/root") == "InitialSync",
            what="the Mirror disk waiting for its first pass",
        )
        assert status["phase"] == "Syncing"  # the first full sync runs
        urls = {disk["name"]: disk["url"] for vm in status["vms"] for disk in vm["disks"]}
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(guest), urls["root"])
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting, timeout=30)

        # A client writes the Proxy disk in a long stream; the operator dies under it.
        commands = [f"write -P {i % 200 + 1} {i * 64}k 64k" for i in range(size // 65536)]
        client = asyncio.create_task(
            run(
                "qemu-io",
                "-f",
                "raw",
                *[a for c in commands for a in ("-c", c)],
                urls["data"],
                check=False,
            )
        )

        def written() -> bool:
            served = controller.endpoint_status("default", "shop")
            return served is not None and served.disks[1].bytes_written > 0

        await wait_for(written, 20, interval=0.01, what="the client writing")
        await controller.crash_all()  # endpoint and runtime dropped: maps left dirty
        await client  # disconnected (or finished) without the operator
    assert _port_closed(urls["data"])

    restarted = dataclasses.replace(config, endpoint=_endpoints.Endpoints.from_config(config))
    async with operators.run(restarted) as controller:
        events = await wait_for(
            lambda: _protecting_events(cluster, "epoch 2"), 20, what="the Protecting event"
        )
        assert events is not None
        # Proxy: only the dirty regions are re-read from the source; Mirror: a pass is owed.
        assert "shop/web/data Resyncing" in events[-1], events
        assert "shop/web/root NeedsMirrorPass" in events[-1], events
        status = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: _disk_states(s) == {"web/root": "NeedsMirrorPass", "web/data": "Protecting"},
            timeout=30,
            what="the Proxy disk resynced, the Mirror disk asking for a pass",
        )
        assert status["phase"] == "Syncing"
        again = {disk["name"]: disk["url"] for vm in status["vms"] for disk in vm["disks"]}
        assert again == urls  # the same port: clients reconnect to the URL they know
        await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(guest), urls["root"])
        await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: protecting(s) and set(_disk_states(s).values()) == {"Protecting"},
            timeout=30,
        )
        await cluster.apply(checkpoint("after", "shop"))
        committed = await cluster.wait_status(
            "Checkpoint", "after", lambda s: s.get("phase") == "Committed"
        )
        target = tmp_path / "restore"
        await cluster.apply(
            recovery("restore", "shop", target, checkpoint={"id": committed["checkpointId"]})
        )
        done = await cluster.wait_status(
            "Recovery", "restore", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=30
        )
        assert done["phase"] == "Succeeded", done
        assert (target / "web" / "data.raw").read_bytes() == source.read_bytes()
        assert (target / "web" / "root.raw").read_bytes() == guest.read_bytes()


async def _protecting_events(cluster: Cluster, text: str) -> list[str] | None:
    messages = [e["message"] for e in await cluster.events("shop") if e["reason"] == "Protecting"]
    return messages if any(text in m for m in messages) else None


def _port_closed(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None
    assert parsed.port is not None
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return False
    except OSError:
        return True
