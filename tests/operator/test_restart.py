"""The operator can stop (or die) at any moment and rebuild everything from the bucket and API."""

from __future__ import annotations

import json
import pathlib
import time

import ebbtide_engine

from .conftest import (
    Cluster,
    Operators,
    account,
    checkpoint,
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
