"""Failover and Move: copy, wait in Ready for the commit policy, then Commit or Rollback."""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

import pytest

import ebbtide_engine
from ebbtide_operator import _recoveries
from tests.k8s.waiting import wait_for
from tests.nbd._support import need, run

from .conftest import (
    Cluster,
    Operators,
    account,
    endpoint_config,
    fast_config,
    needs_kubectl,
    protect_shop,
    protecting,
    recovery,
    shop_runtime,
    vpg,
)

SECRET_VALUE = "s3-secret-not-in-status-91"


class RecordingEndpoint:
    """An endpoint hook that records what the operator asks of it and serves no disks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.attached: dict[str, ebbtide_engine.VpgRuntime] = {}

    async def attach(self, namespace: str, name: str, runtime: ebbtide_engine.VpgRuntime) -> None:
        self.calls.append(("attach", name))
        self.attached[name] = runtime

    async def detach(self, namespace: str, name: str) -> None:
        self.calls.append(("detach", name))
        self.attached.pop(name, None)

    async def abort(self, namespace: str, name: str) -> None:
        self.attached.pop(name, None)

    def status(self, namespace: str, name: str) -> ebbtide_engine.EndpointStatus | None:
        runtime = self.attached.get(name)
        if runtime is None:
            return None
        status = runtime.status()
        return ebbtide_engine.EndpointStatus(
            vpg=name,
            state=status.state,
            rpo_seconds=status.rpo_seconds,
            target_rpo_seconds=60.0,
            unshipped_bytes=0,
            max_unshipped_bytes=1 << 30,
            connections=0,
            disks=[],
            runtime=status,
        )


def failover(name: str, kind: str, target: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body = recovery(name, "shop", None, **spec)
    body["spec"]["type"] = kind
    body["spec"]["target"] = target
    return body


async def _patch(cluster: Cluster, name: str, spec: dict[str, Any]) -> None:
    await cluster.kubectl(
        "patch", "recoveries", name, "--type=merge", "-p", json.dumps({"spec": spec})
    )


async def _vpg_phase(cluster: Cluster, phase: str) -> dict[str, Any]:
    return await cluster.wait_status(
        "VirtualProtectionGroup", "shop", lambda s: s.get("phase") == phase, what=phase
    )


async def _expected(
    account_dir: pathlib.Path, checkpoint_id: int, out: pathlib.Path
) -> dict[tuple[str, str], bytes]:
    store = ebbtide_engine.open_store(account_dir.as_uri())
    try:
        result = await ebbtide_engine.recover_to_files(
            store, "shop", ebbtide_engine.CheckpointSelector(id=checkpoint_id), out
        )
    finally:
        await store.close()
    return {(d.vm, d.disk): d.path.read_bytes() for d in result.disks}


@needs_kubectl
async def test_failover_waits_for_a_person_then_commits_and_the_vpg_protects_again(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))) as controller:
        await protect_shop(cluster, account_dir)
        runtime = shop_runtime(controller)
        await runtime.write("web", "root", 8192, b"w" * 4096)
        await runtime.write("db", "log", 0, b"d" * 4096)
        tagged = await runtime.checkpoint(tag="before-disaster")
        await runtime.write("web", "root", 8192, b"x" * 4096)  # after the chosen checkpoint

        out = tmp_path / "failed-over"
        await cluster.apply(
            failover(
                "fo",
                "Failover",
                {"type": "Images", "path": str(out)},
                checkpoint={"tag": "before-disaster"},
            )
        )
        ready = await cluster.wait_status("Recovery", "fo", lambda s: s.get("phase") == "Ready")
        assert ready["checkpointId"] == tagged.id
        assert (
            "waiting for a person to set spec.commitPolicy to Commit or Rollback"
            in (ready["message"])
        )
        assert "commitDeadline" not in ready
        assert sorted((e["vm"], e["disk"]) for e in ready["exports"]) == [
            ("db", "log"),
            ("web", "root"),
        ]
        expected = await _expected(account_dir, tagged.id, tmp_path / "expected")
        for (vm, disk), data in expected.items():
            assert (out / vm / f"{disk}.raw").read_bytes() == data
        assert expected["web", "root"][8192:12288] == b"w" * 4096
        vpg_status = await _vpg_phase(cluster, "FailingOver")
        operation = await cluster.condition("VirtualProtectionGroup", "shop", "OperationRunning")
        assert operation["status"] == "True"
        assert "Recovery 'fo' (Failover)" in operation["message"]
        assert vpg_status["lastCheckpoint"]  # protection goes on meanwhile

        await _patch(cluster, "fo", {"commitPolicy": "Commit"})
        done = await cluster.wait_status("Recovery", "fo", lambda s: s.get("phase") == "Succeeded")
        assert done["decision"] == "Commit"
        assert done["message"].startswith("committed: the recovered disks (2, status.exports)")
        assert (out / "web" / "root.raw").read_bytes() == expected["web", "root"]  # kept
        await _vpg_phase(cluster, "MeetingSLA")
        idle = await cluster.condition("VirtualProtectionGroup", "shop", "OperationRunning")
        assert (idle["status"], idle["reason"]) == ("False", "Idle")
        reasons = [e["reason"] for e in await cluster.events("fo")]
        assert {"Started", "Ready", "Committing", "Committed"} <= set(reasons)


@needs_kubectl
async def test_move_quiesces_takes_a_final_checkpoint_and_rolls_back_at_the_timeout(
    cluster: Cluster,
    operators: Operators,
    account_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    endpoint = RecordingEndpoint()
    config = fast_config(state_dir=str(tmp_path / "state"), endpoint=endpoint)
    async with operators.run(config) as controller:
        await protect_shop(cluster, account_dir)
        runtime = shop_runtime(controller)
        await runtime.write("web", "root", 0, b"last-write" * 100)  # no checkpoint after it
        endpoint.calls.clear()

        out = tmp_path / "moved"
        await cluster.apply(
            failover(
                "mv",
                "Move",
                {"type": "Images", "path": str(out)},
                commitPolicy="Rollback",
                commitTimeout="1m",
            )
        )
        ready = await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Ready")
        assert endpoint.calls == [("detach", "shop")]  # writes stopped before the final cut
        final = next(c for c in runtime.list_checkpoints() if c.tag == "move/mv")
        assert ready["checkpointId"] == final.id
        assert (out / "web" / "root.raw").read_bytes()[:1000] == b"last-write" * 100
        deadline = datetime.datetime.fromisoformat(ready["commitDeadline"])
        assert "Rollback at " + ready["commitDeadline"] in ready["message"]
        await _vpg_phase(cluster, "Moving")
        # A spec change reopens the VPG's runtime and attaches its endpoint: the Move
        # detaches it again within a tick.
        await cluster.apply(vpg("shop", "local", targetRpo="2m"))
        await wait_for(
            lambda: (
                endpoint.calls[1:]
                and endpoint.calls[-2:] == [("attach", "shop"), ("detach", "shop")]
            ),
            15,
            what="the reopened endpoint detached again",
        )
        endpoint.calls.clear()

        later = deadline + datetime.timedelta(seconds=1)
        monkeypatch.setattr(_recoveries, "now", lambda: later)
        stopped = await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Stopped")
        assert stopped["decision"] == "Rollback"
        assert stopped["message"].startswith("rolled back: removed 2 recovered images")
        assert not (out / "web" / "root.raw").exists()
        assert not (out / "db").exists()
        assert endpoint.calls == [("attach", "shop")]  # protection resumed
        await _vpg_phase(cluster, "MeetingSLA")
        events = await cluster.events("mv")
        assert any("commitTimeout passed" in e["message"] for e in events)


@needs_kubectl
async def test_failover_to_a_recovery_bucket_on_s3_and_a_rollback_removes_the_objects(
    cluster: Cluster,
    operators: Operators,
    account_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # only the Secret's keys can work
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE},
    }
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))) as controller:
        await cluster.apply(
            account("local", account_dir.as_uri()),
            secret,
            account("restores", s3_url, secret="s3"),
            vpg("shop", "local"),
        )
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("db", "log", 4096, b"q" * 4096)
        await runtime.checkpoint(tag="t")
        await cluster.apply(
            failover(
                "to-s3",
                "Failover",
                {"type": "Images", "storageAccountRef": {"name": "restores"}},
                vms=["db"],
            )
        )
        ready = await cluster.wait_status(
            "Recovery", "to-s3", lambda s: s.get("phase") in ("Ready", "Failed")
        )
        assert ready["phase"] == "Ready", ready["message"]
        base = s3_url.partition("?")[0]
        assert ready["exports"] == [
            {"vm": "db", "disk": "log", "url": f"{base}/recoveries/to-s3/db/log.raw"}
        ]
        expected = await _expected(account_dir, ready["checkpointId"], tmp_path / "expected")
        bucket = ebbtide_engine.open_store(
            s3_url, credentials=ebbtide_engine.S3Credentials("testing", SECRET_VALUE)
        )
        try:
            stored = await bucket.get("recoveries/to-s3/db/log.raw")
            assert stored.data == expected["db", "log"]
            assert stored.data[4096:8192] == b"q" * 4096

            await _patch(cluster, "to-s3", {"commitPolicy": "Rollback"})
            await cluster.wait_status("Recovery", "to-s3", lambda s: s.get("phase") == "Stopped")
            assert [i.key async for i in bucket.list("recoveries/")] == []
        finally:
            await bucket.close()
        assert SECRET_VALUE not in json.dumps(await cluster.get("Recovery", "to-s3"))


@needs_kubectl
async def test_a_failover_waiting_for_commit_survives_an_operator_restart(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    endpoint = RecordingEndpoint()
    config = fast_config(state_dir=str(tmp_path / "state"), endpoint=endpoint)
    out = tmp_path / "moved"
    async with operators.run(config):
        await protect_shop(cluster, account_dir)
        await cluster.apply(failover("mv", "Move", {"type": "Images", "path": str(out)}))
        await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Ready")
    # The operator stopped while the Move waited for a person.
    endpoint.calls.clear()
    async with operators.run(config):

        async def resumed() -> bool:
            return any(e["reason"] == "Resumed" for e in await cluster.events("mv"))

        await wait_for(resumed, 15, what="the Move picked up again")
        # The VPG reopens and attaches its endpoint; the Move detaches it again.
        await wait_for(lambda: endpoint.calls[-2:] == [("attach", "shop"), ("detach", "shop")], 20)
        await _vpg_phase(cluster, "Moving")
        assert (await cluster.status("Recovery", "mv"))["phase"] == "Ready"

        await _patch(cluster, "mv", {"commitPolicy": "Rollback"})
        await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Stopped")
        assert not (out / "web" / "root.raw").exists()
        assert endpoint.calls[-1] == ("attach", "shop")
        await _vpg_phase(cluster, "MeetingSLA")


@needs_kubectl
async def test_deleting_an_undecided_failover_rolls_it_back(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    out = tmp_path / "fo"
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))):
        await protect_shop(cluster, account_dir)
        await cluster.apply(failover("fo", "Failover", {"type": "Images", "path": str(out)}))
        await cluster.wait_status("Recovery", "fo", lambda s: s.get("phase") == "Ready")
        assert (out / "web" / "root.raw").exists()
        await cluster.delete("Recovery", "fo")
        assert not (out / "web" / "root.raw").exists()
        await _vpg_phase(cluster, "MeetingSLA")


@needs_kubectl
async def test_a_move_stops_the_real_endpoint_and_loses_no_write(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    need("qemu-io")
    need("qemu-img")
    config = endpoint_config(tmp_path / "state")
    async with operators.run(config):
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        served = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: (
                all(d.get("url") for vm in s.get("vms", []) for d in vm.get("disks", []))
                and s.get("vms")
            ),
            timeout=30,
            what="every disk served",
        )
        urls = {f"{vm['name']}/{d['name']}": d["url"] for vm in served["vms"] for d in vm["disks"]}
        sizes = {"web/root": 1 << 20, "db/log": 512 << 10}
        for key, size in sizes.items():  # the hypervisor's first full pass
            guest = tmp_path / f"{key.replace('/', '-')}.raw"
            guest.write_bytes(bytes([0x41]) * size)
            await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(guest), urls[key])
        await _vpg_phase(cluster, "MeetingSLA")
        # The last write before the Move: no checkpoint covers it yet.
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x77 4k 4k", urls["web/root"])

        out = tmp_path / "moved"
        await cluster.apply(failover("mv", "Move", {"type": "Images", "path": str(out)}))
        ready = await cluster.wait_status(
            "Recovery", "mv", lambda s: s.get("phase") in ("Ready", "Failed"), timeout=30
        )
        assert ready["phase"] == "Ready", ready["message"]
        image = (out / "web" / "root.raw").read_bytes()
        assert image[4096:8192] == b"\x77" * 4096  # nothing written was lost
        assert image[:4096] == b"\x41" * 4096
        refused = await run(
            "qemu-io", "-f", "raw", "-c", "read 0 4k", urls["web/root"], check=False
        )
        assert refused.returncode != 0  # quiesced: the endpoint accepts no more writes

        await _patch(cluster, "mv", {"commitPolicy": "Rollback"})
        await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Stopped")

        async def writable() -> bool:
            result = await run(
                "qemu-io", "-f", "raw", "-c", "write -P 0x78 0 4k", urls["web/root"], check=False
            )
            return result.returncode == 0

        await wait_for(writable, 15, what="the endpoint serving again after the rollback")
