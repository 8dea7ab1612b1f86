"""The main flow, driven with kubectl: protect a VPG, checkpoint it, restore it, delete it."""

from __future__ import annotations

import pathlib

import aiohttp

import ebbtide_engine
import ebbtide_operator
from tests import s3server

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

WRITTEN = bytes(range(256)) * 16  # 4 KiB


@needs_kubectl
async def test_vpg_protects_checkpoints_restores_and_retains_on_delete(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run() as controller:
        out = await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        assert "virtualprotectiongroup.ebbtide.io/shop created" in out

        status = await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        assert status["observedGeneration"] == 1
        assert status["lastCheckpoint"]["kind"] == "Automatic"
        assert status["lastCheckpoint"]["time"].endswith("Z")
        assert 0 <= status["actualRpoSeconds"] < 60
        assert [vm["name"] for vm in status["vms"]] == ["web", "db"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Ready"]["status"] == "True"
        assert conditions["SpecValid"]["status"] == "True"
        assert conditions["StorageReachable"]["status"] == "True"
        assert all(c["observedGeneration"] == 1 for c in conditions.values())
        account_status = await cluster.wait_status(
            "StorageAccount", "local", lambda s: s.get("phase") == "Ready"
        )
        assert account_status["conditions"][0]["type"] == "Reachable"
        obj = await cluster.get("VirtualProtectionGroup", "shop")
        assert obj is not None
        assert obj["metadata"]["finalizers"] == [ebbtide_operator.FINALIZER]
        assert not any(key.startswith("kopf.zalando.org") for key in obj["metadata"]["annotations"])
        assert "kopf" not in obj["status"]

        # Writes through the runtime the operator exposes (where the NBD endpoint will attach).
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("web", "root", 0, WRITTEN)
        await runtime.write("db", "log", 4096, WRITTEN[::-1])

        await cluster.apply(checkpoint("before-upgrade", "shop"))
        committed = await cluster.wait_status(
            "Checkpoint", "before-upgrade", lambda s: s.get("phase") == "Committed"
        )
        tagged_id = committed["checkpointId"]
        assert committed["time"].endswith("Z")
        await runtime.write("web", "root", 0, b"\xff" * 4096)  # after the checkpoint: not restored

        store = ebbtide_engine.open_store(account_dir.as_uri())
        try:
            stored = await ebbtide_engine.list_checkpoints(store, "shop")
        finally:
            await store.close()
        [tagged] = [c for c in stored if c.id == tagged_id]
        assert (tagged.tag, tagged.kind) == ("before-upgrade", ebbtide_engine.CheckpointKind.TAGGED)

        target = tmp_path / "restore"
        await cluster.apply(
            recovery("restore", "shop", target, checkpoint={"tag": "before-upgrade"})
        )
        done = await cluster.wait_status(
            "Recovery", "restore", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=20
        )
        assert done["phase"] == "Succeeded", done
        assert done["checkpointId"] == tagged_id
        assert done["progress"]["percent"] == 100
        assert done["startTime"] <= done["completionTime"]
        web = (target / "web" / "root.raw").read_bytes()
        db = (target / "db" / "log.raw").read_bytes()
        assert len(web) == 1 << 20
        assert web[:4096] == WRITTEN
        assert not any(web[4096:])
        assert db[4096:8192] == WRITTEN[::-1]
        assert not any(db[:4096])
        assert not any(db[8192:])

        _, out, _ = await cluster.kubectl("get", "vpg", "shop")
        assert "MeetingSLA" in out

        await cluster.delete("VirtualProtectionGroup", "shop")
        assert controller.runtime("default", "shop") is None
        assert (account_dir / "vpgs" / "shop" / "manifest.json").exists()  # Retain


@needs_kubectl
async def test_on_delete_delete_removes_the_stored_data(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run() as _controller:
        await cluster.apply(
            account("local", account_dir.as_uri()),
            vpg("gone", "local", onDelete="Delete"),
            vpg("kept", "local"),
        )
        for name in ("gone", "kept"):
            await cluster.wait_status("VirtualProtectionGroup", name, protecting)
        await cluster.delete("VirtualProtectionGroup", "gone")
        assert not list((account_dir / "vpgs").glob("gone/**/*.*"))
        assert (account_dir / "vpgs" / "kept" / "manifest.json").exists()
        events = await cluster.events("gone")
        assert any(
            e["reason"] == "Deleted" and "objects under vpgs/gone/" in e["message"] for e in events
        )


@needs_kubectl
async def test_checkpoint_of_a_missing_vpg_fails_and_unsupported_recoveries_say_so(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run() as _controller:
        await cluster.apply(checkpoint("orphan", "nosuch"), recovery("test", "nosuch", None))
        failed = await cluster.wait_status(
            "Checkpoint", "orphan", lambda s: s.get("phase") == "Failed"
        )
        assert "VPG 'nosuch' does not exist in namespace 'default'" in failed["message"]
        refused = await cluster.wait_status(
            "Recovery", "test", lambda s: s.get("phase") == "Failed"
        )
        assert refused["message"].startswith("not supported yet: a Restore to NbdExport")
        assert refused["conditions"][0]["reason"] == "NotSupported"


async def test_metrics_show_each_vpg_and_the_liveness_endpoint_answers(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    liveness = f"http://127.0.0.1:{s3server.free_port()}/healthz"
    async with operators.run(liveness_endpoint=liveness) as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        registry = ebbtide_operator.registry_for(controller)
        async with (
            ebbtide_operator.serve_metrics(registry, host="127.0.0.1", port=0) as url,
            aiohttp.ClientSession() as http,
            http.get(url) as response,
        ):
            text = await response.text()
        labels = '{namespace="default",vpg="shop"}'
        for name in (
            "ebbtide_vpg_rpo_seconds",
            "ebbtide_vpg_last_checkpoint_age_seconds",
            "ebbtide_vpg_journal_bytes",
            "ebbtide_vpg_unshipped_bytes",
            "ebbtide_vpg_upload_retries_total",
        ):
            assert f"{name}{labels} " in text, name
        assert "# HELP ebbtide_recovery_progress_ratio" in text
        async with aiohttp.ClientSession() as http, http.get(liveness) as response:
            assert response.status == 200


@needs_kubectl
async def test_a_spec_change_reopens_the_runtime_without_losing_data(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run() as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("web", "root", 0, WRITTEN)
        before = (await runtime.checkpoint(ebbtide_engine.CheckpointKind.TAGGED, "v1")).id

        grown = vpg("shop", "local")
        grown["spec"]["vms"].append({"name": "cache", "disks": [{"name": "tmp", "size": "1Mi"}]})
        await cluster.apply(grown)
        status = await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: s.get("observedGeneration") == 2
        )
        assert [vm["name"] for vm in status["vms"]] == ["web", "db", "cache"]
        reopened = controller.runtime("default", "shop")
        assert reopened is not None
        assert reopened is not runtime
        assert reopened.status().epoch == 2
        await reopened.write("cache", "tmp", 0, WRITTEN)
        await reopened.checkpoint(ebbtide_engine.CheckpointKind.TAGGED, "v2")

    store = ebbtide_engine.open_store(account_dir.as_uri())
    try:
        old = await ebbtide_engine.recover_to_files(
            store, "shop", ebbtide_engine.CheckpointSelector(id=before), tmp_path / "v1"
        )
        new = await ebbtide_engine.recover_to_files(
            store, "shop", ebbtide_engine.CheckpointSelector(tag="v2"), tmp_path / "v2"
        )
    finally:
        await store.close()
    assert sorted(d.vm for d in old.disks) == ["db", "web"]  # the layout at that checkpoint
    assert sorted(d.vm for d in new.disks) == ["cache", "db", "web"]
    assert (tmp_path / "v2" / "web" / "root.raw").read_bytes()[:4096] == WRITTEN
    assert (tmp_path / "v2" / "cache" / "tmp.raw").read_bytes()[:4096] == WRITTEN
