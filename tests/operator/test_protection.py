"""The main flow, driven with kubectl: protect a VPG, checkpoint it, restore it, delete it."""

from __future__ import annotations

import pathlib
from typing import Any

import aiohttp

import ebbtide_engine
import ebbtide_operator
from tests import s3server
from tests.k8s.waiting import wait_for

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
        assert refused["message"].startswith("a Restore cannot target NbdExport")
        assert refused["conditions"][0]["reason"] == "InvalidTarget"


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


@needs_kubectl
async def test_an_endpoint_that_cannot_serve_says_what_to_fix_and_recovers(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    low = s3server.free_port()
    config = endpoint_config(tmp_path / "state", endpoint_ports=(low, low))  # one port only
    source = tmp_path / "data.raw"
    proxy = [
        {
            "name": "web",
            "disks": [
                {"name": "data", "size": "1Mi", "mode": "Proxy", "source": {"path": str(source)}}
            ],
        }
    ]
    async with operators.run(config) as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("first", "local"))
        await cluster.wait_status(
            "VirtualProtectionGroup", "first", lambda s: s.get("phase") == "Syncing"
        )
        await cluster.apply(vpg("second", "local"), vpg("proxied", "local", vms=proxy))

        for name, reason, text in (
            ("second", "PortRangeExhausted", f"no free port left in --endpoint-ports {low}-{low}"),
            ("proxied", "ProxySourceMissing", f"source.path {source} does not exist"),
        ):
            status = await cluster.wait_status(
                "VirtualProtectionGroup", name, lambda s: s.get("phase") == "Error"
            )
            condition = await cluster.condition("VirtualProtectionGroup", name, "EndpointReady")
            assert (condition["status"], condition["reason"]) == ("False", reason)
            assert text in condition["message"]
            assert text in status["message"]
            assert {d["syncState"] for vm in status["vms"] for d in vm["disks"]} == {"NotServed"}
            events = await cluster.events(name)
            warned = [e for e in events if e["reason"] == reason]
            assert len(warned) == 1, events  # once, not on every retry
            assert controller.runtime("default", name) is not None  # the journal stays open

        # Fixed: the source exists, and deleting "first" frees the one port. The retries
        # serve one of the two waiting VPGs; the other still says the range is full, until
        # the served one goes too.
        source.write_bytes(b"\x01" * (1 << 20))
        await cluster.delete("VirtualProtectionGroup", "first")

        async def served_one() -> tuple[str, str] | None:
            ready = {
                name: await cluster.condition("VirtualProtectionGroup", name, "EndpointReady")
                for name in ("second", "proxied")
            }
            reasons = sorted((c.get("reason"), name) for name, c in ready.items())
            if [reason for reason, _ in reasons] != ["PortRangeExhausted", "Serving"]:
                return None
            return reasons[1][1], reasons[0][1]

        found = await wait_for(served_one, 20, what="one VPG served, one waiting")
        assert found is not None
        served, waiting = found
        status = await cluster.status("VirtualProtectionGroup", served)
        assert all(d.get("url") for vm in status["vms"] for d in vm["disks"])
        await cluster.delete("VirtualProtectionGroup", served)
        await cluster.wait_status(
            "VirtualProtectionGroup",
            waiting,
            lambda s: (
                s.get("phase") in ("Syncing", "MeetingSLA")
                and all(d.get("url") for vm in s["vms"] for d in vm["disks"])
            ),
            timeout=20,
        )


@needs_kubectl
async def test_a_storage_account_change_reopens_its_vpgs_without_losing_data(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    alias = tmp_path / "alias"  # the same directory under another URL: the data must carry on
    alias.symlink_to(account_dir)
    async with operators.run() as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("web", "root", 0, WRITTEN)  # not yet checkpointed: must survive

        await cluster.apply(account("local", alias.as_uri()))
        await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: "epoch 2" in str(s.get("conditions"))
        )
        reopened = controller.runtime("default", "shop")
        assert reopened is not None
        assert reopened is not runtime
        previous = reopened.status().previous_writer
        assert previous is not None
        assert previous.clean_shutdown  # closed cleanly: everything shipped
        events = [e["reason"] for e in await cluster.events("shop")]
        assert "StorageAccountChanged" in events
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)

        # A new URL that cannot be reached: protection goes on with the old one.
        await cluster.apply(account("local", (tmp_path / "missing").as_uri()))
        await cluster.wait_status("StorageAccount", "local", lambda s: s.get("phase") == "Error")
        assert controller.runtime("default", "shop") is reopened

    target = tmp_path / "restore"
    store = ebbtide_engine.open_store(account_dir.as_uri())
    try:
        await ebbtide_engine.recover_to_files(
            store, "shop", ebbtide_engine.CheckpointSelector(latest=True), target
        )
    finally:
        await store.close()
    assert (target / "web" / "root.raw").read_bytes()[:4096] == WRITTEN


@needs_kubectl
async def test_a_spec_change_reopens_the_runtime_and_reattaches_the_endpoint(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    def urls(status: dict[str, Any]) -> dict[str, str]:
        return {
            f"{vm['name']}/{d['name']}": d.get("url", "")
            for vm in status.get("vms", [])
            for d in vm.get("disks", [])
        }

    async with operators.run(endpoint_config(tmp_path / "state")) as controller:
        body = vpg("shop", "local")
        await cluster.apply(account("local", account_dir.as_uri()), body)
        before = await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: all(urls(s).values()) and urls(s)
        )
        body["spec"]["vms"][0]["disks"].append({"name": "extra", "size": "1Mi"})
        await cluster.apply(body)
        after = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: urls(s).get("web/extra") and "epoch 2" in str(s.get("conditions")),
        )
        assert after["observedGeneration"] == 2
        assert urls(after)["web/root"] == urls(before)["web/root"]  # the same port again
        served = controller.endpoint_status("default", "shop")
        assert served is not None
        assert served.runtime.epoch == 2  # served by the reopened runtime
        assert [d.export for d in served.disks] == [
            "shop/web/root",
            "shop/web/extra",
            "shop/db/log",
        ]
