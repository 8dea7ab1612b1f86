"""Every Recovery the operator refuses says why and what to do; one operation per VPG."""

from __future__ import annotations

import pathlib
from typing import Any

from .conftest import (
    Cluster,
    Operators,
    account,
    fast_config,
    needs_kubectl,
    protecting,
    vpg,
)
from .test_failover import failover


def _for_vpg(name: str, body: dict[str, Any]) -> dict[str, Any]:
    body["spec"]["vpgRef"] = {"name": name}
    return body


async def _failed(cluster: Cluster, name: str) -> tuple[str, str]:
    status = await cluster.wait_status("Recovery", name, lambda s: s.get("phase") == "Failed")
    condition = await cluster.condition("Recovery", name, "Running")
    return condition["reason"], status["message"]


@needs_kubectl
async def test_bad_combinations_are_refused_with_what_to_change(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    images = {"type": "Images", "path": str(tmp_path / "out")}
    cases: dict[str, tuple[dict[str, Any], str, str]] = {
        "test-to-images": (
            failover("test-to-images", "FailoverTest", images),
            "InvalidTarget",
            "a FailoverTest serves the disks over NBD: set target.type NbdExport (not Images)",
        ),
        "failover-to-nbd": (
            failover("failover-to-nbd", "Failover", {"type": "NbdExport"}),
            "InvalidTarget",
            "a Failover cannot target NbdExport: the exports' writes would live only in a "
            "scratch overlay that ends with the Recovery; use Images or PersistentVolumeClaims",
        ),
        "restore-to-nbd": (
            failover("restore-to-nbd", "Restore", {"type": "NbdExport"}),
            "InvalidTarget",
            "a Restore cannot target NbdExport: the exports' writes would live only in a "
            "scratch overlay that ends with the Recovery; use type FailoverTest",
        ),
        "move-at-a-tag": (
            failover("move-at-a-tag", "Move", images, checkpoint={"tag": "x"}),
            "InvalidCheckpoint",
            "a Move recovers at its own final checkpoint (tag move/move-at-a-tag), taken after "
            "writes stop; leave spec.checkpoint out (or {latest: true}) — use a Failover for an "
            "earlier checkpoint",
        ),
        "both-places": (
            failover("both-places", "Restore", {**images, "storageAccountRef": {"name": "local"}}),
            "InvalidTarget",
            "give either target.path (a directory) or target.storageAccountRef (a recovery "
            "bucket), not both",
        ),
        "no-such-vpg": (
            _for_vpg("nope", failover("no-such-vpg", "Failover", images)),
            "VpgNotFound",
            "VPG 'nope' does not exist in namespace 'default'; fix spec.vpgRef (a deleted VPG's "
            "retained data needs a VPG of the same name to recover)",
        ),
    }
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))):
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        for name, (body, reason, message) in cases.items():
            await cluster.apply(body)
            assert await _failed(cluster, name) == (reason, message), name
            assert any(e["reason"] == reason for e in await cluster.events(name)), name
        assert not (tmp_path / "out").exists()  # nothing was written


@needs_kubectl
async def test_one_operation_per_vpg_a_test_blocks_a_failover_and_the_other_way_round(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    images = {"type": "Images", "path": str(tmp_path / "out")}
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))):
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        await cluster.apply(failover("drill", "FailoverTest", {"type": "NbdExport"}))
        await cluster.wait_status("Recovery", "drill", lambda s: s.get("phase") == "Ready")
        await cluster.apply(failover("fo", "Failover", images))
        reason, message = await _failed(cluster, "fo")
        assert reason == "Conflict"
        assert message.startswith(
            "Recovery 'drill' (FailoverTest) is already running for VPG 'shop'; only one "
            "Recovery per VPG runs at a time"
        )
        await cluster.kubectl(
            "patch", "recoveries", "drill", "--type=merge", "-p", '{"spec":{"stop":true}}'
        )
        await cluster.wait_status("Recovery", "drill", lambda s: s.get("phase") == "Stopped")

        await cluster.apply(failover("mv", "Move", images))
        await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Ready")
        await cluster.apply(failover("drill2", "FailoverTest", {"type": "NbdExport"}))
        reason, message = await _failed(cluster, "drill2")
        assert reason == "Conflict"
        assert message.startswith("Recovery 'mv' (Move) is already running for VPG 'shop'")


@needs_kubectl
async def test_a_missing_storage_account_makes_a_recovery_wait_then_it_runs(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = fast_config(state_dir=str(tmp_path / "state"), checkpoint_wait_retries=2)
    async with operators.run(config):
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        await cluster.apply(
            failover(
                "to-bucket",
                "Restore",
                {"type": "Images", "storageAccountRef": {"name": "later"}},
            )
        )
        pending = await cluster.wait_status(
            "Recovery", "to-bucket", lambda s: s.get("phase") == "Pending"
        )
        assert pending["message"].startswith(
            "StorageAccount 'later' does not exist in namespace 'default'"
        )
        condition = await cluster.condition("Recovery", "to-bucket", "Running")
        assert condition["reason"] == "StorageAccountNotFound"
        later = tmp_path / "later"
        later.mkdir()
        await cluster.apply(account("later", later.as_uri()))
        await cluster.wait_status(
            "Recovery", "to-bucket", lambda s: s.get("phase") == "Succeeded", timeout=30
        )
        assert (later / "recoveries" / "to-bucket" / "web" / "root.raw").stat().st_size == 1 << 20

        # A VPG whose own account is missing: the Move waits, saying why.
        await cluster.apply(vpg("idle", "missing"))
        await cluster.apply(
            _for_vpg("idle", failover("mv", "Move", {"type": "Images", "path": str(tmp_path)}))
        )
        waiting = await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Pending")
        assert waiting["message"].startswith(
            "StorageAccount 'missing' does not exist in namespace 'default'"
        )
