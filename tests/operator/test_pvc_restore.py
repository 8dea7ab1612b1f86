"""Recovery to PersistentVolumeClaims: PVCs and a restore Job, run by a stand-in kubelet."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import pytest

import ebbtide_engine
from ebbtide_operator import _main
from tests.k8s import apiserver as emulation
from tests.nbd._support import run

from .conftest import (
    Cluster,
    Operators,
    account,
    fast_config,
    needs_kubectl,
    protecting,
    recovery,
    vpg,
)
from .kubelet import Kubelet
from .test_failover import _patch

SECRET_VALUE = "pvc-restore-secret-3f9a"
PVCS = emulation.Resource("", "v1", "persistentvolumeclaims")
JOBS = emulation.Resource("batch", "v1", "jobs")


def _secret() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET_VALUE},
    }


def to_claims(name: str, kind: str = "Restore", **spec: Any) -> dict[str, Any]:
    body = recovery(name, "shop", None, **spec)
    body["spec"]["type"] = kind
    body["spec"]["target"] = {"type": "PersistentVolumeClaims", "storageClassName": "fast"}
    return body


async def _objects(cluster: Cluster, resource: Any) -> dict[str, dict[str, Any]]:
    def read(emulator: emulation.KubernetesEmulator) -> dict[str, dict[str, Any]]:
        return {
            key[2]: json.loads(json.dumps(obj.raw))
            for key, obj in emulator.objects.items()
            if key[0] == resource and not obj.deleted
        }

    return await cluster.server.inspect(read)


@pytest.fixture
def s3_only(monkeypatch: pytest.MonkeyPatch, s3_url: str) -> str:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # only the Secret's keys can work
    return s3_url


async def _protect(cluster: Cluster, s3_url: str) -> None:
    await cluster.apply(_secret(), account("s3", s3_url, secret="s3"), vpg("shop", "s3"))
    await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)


async def _expected(s3_url: str, checkpoint_id: int, out: pathlib.Path) -> dict[str, bytes]:
    store = ebbtide_engine.open_store(
        s3_url, credentials=ebbtide_engine.S3Credentials("testing", SECRET_VALUE)
    )
    try:
        result = await ebbtide_engine.recover_to_files(
            store, "shop", ebbtide_engine.CheckpointSelector(id=checkpoint_id), out
        )
    finally:
        await store.close()
    return {f"{d.vm}/{d.disk}": d.path.read_bytes() for d in result.disks}


@needs_kubectl
async def test_a_restore_fills_one_pvc_per_disk_through_a_job_the_kubelet_really_runs(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    config = fast_config(state_dir=str(tmp_path / "state"), job_image="registry.example/eb:1")
    async with operators.run(config) as controller, kubelet.running():
        await _protect(cluster, s3_only)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("web", "root", 4096, b"R" * 4096)
        await runtime.write("db", "log", 0, b"D" * 8192)
        tagged = await runtime.checkpoint(tag="good")
        await runtime.write("web", "root", 4096, b"X" * 4096)

        await cluster.apply(to_claims("back", checkpoint={"tag": "good"}))
        done = await cluster.wait_status(
            "Recovery", "back", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=60
        )
        assert done["phase"] == "Succeeded", (done["message"], [r.stderr for r in kubelet.runs])
        assert done["checkpointId"] == tagged.id
        assert done["job"] == "back-restore"
        assert done["message"].startswith(
            f"restored 2 disks of VPG 'shop' at checkpoint {tagged.id}"
        )
        assert "restore Job 'back-restore'" in done["message"]
        assert sorted(e["url"] for e in done["exports"]) == [
            "pvc://default/back-db-log/disk.img",
            "pvc://default/back-web-root/disk.img",
        ]

        claims = await _objects(cluster, PVCS)
        assert set(claims) == {"back-web-root", "back-db-log"}
        web = claims["back-web-root"]
        assert web["spec"]["storageClassName"] == "fast"
        assert web["spec"]["volumeMode"] == "Filesystem"
        assert int(web["spec"]["resources"]["requests"]["storage"]) >= 1 << 20
        assert not web["metadata"].get("ownerReferences")  # kept after the Recovery goes

        jobs = await _objects(cluster, JOBS)
        job = jobs["back-restore"]
        (owner,) = job["metadata"]["ownerReferences"]
        recovery_obj = await cluster.get("Recovery", "back")
        assert recovery_obj is not None
        assert owner["uid"] == recovery_obj["metadata"]["uid"]
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["image"] == "registry.example/eb:1"
        assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]} == {
            "AWS_ACCESS_KEY_ID": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"},
            "AWS_SECRET_ACCESS_KEY": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"},
        }
        assert SECRET_VALUE not in json.dumps(job)
        assert SECRET_VALUE not in json.dumps(recovery_obj)

        (run,) = kubelet.runs
        assert run.env["AWS_SECRET_ACCESS_KEY"] == SECRET_VALUE  # resolved from the Secret
        expected = await _expected(s3_only, tagged.id, tmp_path / "expected")
        for disk, claim in (("web/root", "back-web-root"), ("db/log", "back-db-log")):
            image = kubelet.claim_dir(claim) / "disk.img"
            assert image.read_bytes() == expected[disk]
        assert expected["web/root"][4096:8192] == b"R" * 4096


@needs_kubectl
async def test_a_failover_to_pvcs_rolled_back_deletes_its_pvcs_and_job(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    async with (
        operators.run(fast_config(state_dir=str(tmp_path / "state"))),
        kubelet.running(),
    ):
        await _protect(cluster, s3_only)
        await cluster.apply(to_claims("fo", "Failover", vms=["db"]))
        ready = await cluster.wait_status(
            "Recovery", "fo", lambda s: s.get("phase") in ("Ready", "Failed"), timeout=60
        )
        assert ready["phase"] == "Ready", ready["message"]
        assert set(await _objects(cluster, PVCS)) == {"fo-db-log"}
        claim = (await _objects(cluster, PVCS))["fo-db-log"]
        assert claim["metadata"]["ownerReferences"][0]["name"] == "fo"  # undecided: owned

        await _patch(cluster, "fo", {"commitPolicy": "Rollback"})
        stopped = await cluster.wait_status("Recovery", "fo", lambda s: s.get("phase") == "Stopped")
        assert stopped["message"].startswith("rolled back: removed 1 recovered images")
        assert await _objects(cluster, PVCS) == {}
        assert await _objects(cluster, JOBS) == {}


@needs_kubectl
async def test_a_restore_job_running_at_an_operator_restart_is_watched_again(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    config = fast_config(state_dir=str(tmp_path / "state"))
    async with operators.run(config):
        await _protect(cluster, s3_only)
        await cluster.apply(to_claims("slow"))
        running = await cluster.wait_status(
            "Recovery", "slow", lambda s: s.get("phase") == "Running"
        )
        assert "through Job 'slow-restore'" in running["message"]
    # No kubelet yet: the Job had not run when the operator stopped.
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    async with operators.run(config), kubelet.running():
        done = await cluster.wait_status(
            "Recovery", "slow", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=60
        )
        assert done["phase"] == "Succeeded", done["message"]
        assert len(kubelet.runs) == 1  # the same Job, not a second one
        condition = await cluster.condition("Recovery", "slow", "Running")
        assert condition["reason"] == "Succeeded"
        events = await cluster.events("slow")
        assert any("watching its restore Job again" in e["message"] for e in events)


@needs_kubectl
async def test_an_unknown_vm_is_refused_before_anything_is_created(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    async with (
        operators.run(fast_config(state_dir=str(tmp_path / "state"))),
        kubelet.running(),
    ):
        await _protect(cluster, s3_only)
        await cluster.apply(to_claims("bad", vms=["nope"]))
        failed = await cluster.wait_status(
            "Recovery", "bad", lambda s: s.get("phase") == "Failed", timeout=30
        )
        assert failed["message"] == "the VPG has no VM 'nope'; it has: db, web"
        assert await _objects(cluster, JOBS) == {}
        assert await _objects(cluster, PVCS) == {}


@needs_kubectl
async def test_a_failing_restore_job_fails_the_recovery_with_its_message(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))):
        await _protect(cluster, s3_only)
        await cluster.apply(to_claims("orphan", vms=["db"]))
        await cluster.wait_status("Recovery", "orphan", lambda s: s.get("phase") == "Running")
        # Gone before the Job's pod starts: its container cannot get its credentials.
        await cluster.kubectl("delete", "secret", "s3")
        async with kubelet.running():
            failed = await cluster.wait_status(
                "Recovery", "orphan", lambda s: s.get("phase") == "Failed", timeout=30
            )
        assert failed["message"] == (
            "restore Job 'orphan-restore' failed: secret 's3' not found; see "
            "`kubectl logs job/orphan-restore`"
        )
        condition = await cluster.condition("Recovery", "orphan", "Running")
        assert condition["reason"] == "JobFailed"
        # Left for inspection, owned by the Recovery: deleting it lets the GC remove them.
        assert set(await _objects(cluster, PVCS)) == {"orphan-db-log"}
        assert await cluster.get("VirtualProtectionGroup", "shop") is not None


def test_the_job_image_comes_from_the_command_line() -> None:
    args = _main.parse_args(["--no-endpoint", "--job-image", "registry.example/ebbtide:9"])
    assert _main.config_from(args).job_image == "registry.example/ebbtide:9"
    default = _main.config_from(_main.parse_args(["--no-endpoint"]))
    assert default.job_image == "ebbtide:0.1.0"


@needs_kubectl
async def test_a_committed_move_to_pvcs_keeps_them_without_an_owner(
    cluster: Cluster, operators: Operators, s3_only: str, tmp_path: pathlib.Path
) -> None:
    kubelet = Kubelet(cluster.server, tmp_path / "node")
    async with (
        operators.run(fast_config(state_dir=str(tmp_path / "state"))) as controller,
        kubelet.running(),
    ):
        await _protect(cluster, s3_only)
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        await runtime.write("db", "log", 0, b"M" * 4096)  # covered only by the final checkpoint
        await cluster.apply(to_claims("mv", "Move", vms=["db"]))
        ready = await cluster.wait_status(
            "Recovery", "mv", lambda s: s.get("phase") in ("Ready", "Failed"), timeout=60
        )
        assert ready["phase"] == "Ready", ready["message"]
        final = next(c for c in runtime.list_checkpoints() if c.tag == "move/mv")
        assert ready["checkpointId"] == final.id
        image = kubelet.claim_dir("mv-db-log") / "disk.img"
        assert image.read_bytes()[:4096] == b"M" * 4096

        await _patch(cluster, "mv", {"commitPolicy": "Commit"})
        done = await cluster.wait_status("Recovery", "mv", lambda s: s.get("phase") == "Succeeded")
        assert done["decision"] == "Commit"
        claim = (await _objects(cluster, PVCS))["mv-db-log"]
        assert not claim["metadata"].get("ownerReferences")  # outlives the Recovery now
        await cluster.delete("Recovery", "mv")
        assert set(await _objects(cluster, PVCS)) == {"mv-db-log"}


async def test_the_cli_says_how_to_write_a_disk_file(tmp_path: pathlib.Path) -> None:
    result = await run(
        Kubelet.executable("ebbtide"),
        "recover",
        "--storage",
        tmp_path.as_uri(),
        "--vpg",
        "shop",
        "--checkpoint",
        "latest",
        "--out",
        str(tmp_path / "out"),
        "--disk-file",
        "web-root=/v/disk.img",
        check=False,
    )
    assert result.returncode == 2
    assert "'web-root=/v/disk.img': say VM/DISK=PATH, e.g. web/root=/v/disk.img" in result.stderr
