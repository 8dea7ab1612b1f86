"""End to end with the NBD endpoint: kubectl apply → NBD writes → Checkpoint → Restore → delete.

The operator runs in-process against the API emulator, driven with the real
kubectl; the storage account is a bucket on the moto S3 server with its keys
in a Secret; writes reach the disks through the URLs the VPG's status gives,
with qemu-img and qemu-io.
"""

from __future__ import annotations

import base64
import pathlib
import random
import socket
import urllib.parse
from typing import Any

import prometheus_client
import pytest
import yaml

import ebbtide_operator
from tests import s3server
from tests.nbd._support import need, run

from .conftest import Cluster, Operators, checkpoint, endpoint_config, needs_kubectl, recovery

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
MiB = 1 << 20
SIZE = 2 * MiB  # every disk of the test's copy of examples/vpg.yaml


def _examples(s3_url: str, source: pathlib.Path) -> list[dict[str, Any]]:
    """The examples' Secret, S3 StorageAccount and VPG, pointed at moto and made small."""
    secret, account = yaml.safe_load_all((EXAMPLES / "storage-account-s3.yaml").read_text())
    secret["stringData"] = {
        "AWS_ACCESS_KEY_ID": s3server.DUMMY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": s3server.DUMMY_SECRET_KEY,
    }
    account["spec"]["url"] = s3_url
    vpg = yaml.safe_load((EXAMPLES / "vpg.yaml").read_text())
    vpg["spec"]["storageAccountRef"]["name"] = account["metadata"]["name"]
    vpg["spec"]["checkpointInterval"] = "1s"
    modes = set()
    for vm in vpg["spec"]["vms"]:
        for disk in vm["disks"]:
            disk["size"] = SIZE
            modes.add(disk.get("mode", "Mirror"))
            if disk.get("mode") == "Proxy":
                disk["source"]["path"] = str(source)
    assert modes == {"Mirror", "Proxy"}, "examples/vpg.yaml shows both modes"
    return [secret, account, vpg]


def _disks(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{vm['name']}/{disk['name']}": disk
        for vm in status.get("vms", [])
        for disk in vm.get("disks", [])
    }


def _port_open(url: str) -> bool:
    parsed = urllib.parse.urlsplit(url)
    assert parsed.hostname is not None
    assert parsed.port is not None
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return True
    except OSError:
        return False


@needs_kubectl
async def test_apply_write_through_nbd_checkpoint_restore_and_delete(
    cluster: Cluster,
    operators: Operators,
    s3_url: str,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    need("qemu-io")
    need("qemu-img")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # only the Secret's keys can work
    rng = random.Random(5)
    source = tmp_path / "web-data.raw"  # the Proxy disk itself
    source.write_bytes(rng.randbytes(SIZE))
    guest = tmp_path / "guest.raw"  # what a hypervisor mirrors into each Mirror disk
    guest.write_bytes(rng.randbytes(SIZE))
    secret, account, vpg = _examples(s3_url, source)
    name = vpg["metadata"]["name"]
    expected = {
        "web/root": bytearray(guest.read_bytes()),
        "web/data": bytearray(source.read_bytes()),
        "db/root": bytearray(guest.read_bytes()),
    }

    async with operators.run(endpoint_config(tmp_path / "state")) as controller:
        out = await cluster.apply(secret, account, vpg)
        assert f"virtualprotectiongroup.ebbtide.io/{name} created" in out

        # Served at once; the Mirror disks wait for their first full pass: Syncing.
        status = await cluster.wait_status(
            "VirtualProtectionGroup",
            name,
            lambda s: (
                s.get("phase") == "Syncing"
                and all(d.get("url") for d in _disks(s).values())
                and _disks(s)["web/data"]["syncState"] == "Protecting"
            ),
            timeout=30,
            what="Syncing, every disk served, the Proxy disk synced from its source",
        )
        disks = _disks(status)
        assert set(disks) == set(expected)
        assert disks["web/root"]["syncState"] == "InitialSync"
        assert disks["web/root"]["mode"] == "Mirror"
        assert "blockdev-mirror" in disks["web/root"]["message"]
        assert disks["web/data"]["mode"] == "Proxy"
        urls = {key: disk["url"] for key, disk in disks.items()}
        assert urls["web/root"].startswith("nbd://127.0.0.1:")
        assert urls["web/root"].endswith(f"/{name}/web/root")
        vms = {vm["name"]: vm for vm in status["vms"]}
        assert vms["web"]["syncState"] == "InitialSync"  # its least advanced disk
        ready = await cluster.condition("VirtualProtectionGroup", name, "EndpointReady")
        assert ready["status"] == "True"

        # The hypervisor's first full pass into each Mirror disk.
        for key in ("web/root", "db/root"):
            await run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(guest), urls[key])
        status = await cluster.wait_status(
            "VirtualProtectionGroup",
            name,
            lambda s: (
                s.get("phase") == "MeetingSLA"
                and all(d["syncState"] == "Protecting" for d in _disks(s).values())
            ),
            timeout=30,
            what="MeetingSLA once every disk had its full pass",
        )
        assert all(vm["syncState"] == "Protecting" for vm in status["vms"])
        assert _disks(status)["web/root"]["syncPercent"] == 100

        # Guest writes through the URLs in status: aligned, unaligned, FUA, zeroes.
        writes = {
            "web/root": [("write -P 0x11 0 64k", 0, 65536, 0x11)],
            "web/data": [
                ("write -P 0x22 1000 333", 1000, 333, 0x22),
                ("write -z 64k 128k", 65536, 131072, 0),
            ],
            "db/root": [("write -P 0x33 -f 1M 4k", MiB, 4096, 0x33)],
        }
        for key, commands in writes.items():
            args = ["qemu-io", "-f", "raw"]
            for command, offset, length, value in commands:
                args += ["-c", command]
                expected[key][offset : offset + length] = bytes([value]) * length
            await run(*args, urls[key])
        at_checkpoint = {key: bytes(data) for key, data in expected.items()}

        await cluster.apply(checkpoint("before-upgrade", name))
        committed = await cluster.wait_status(
            "Checkpoint", "before-upgrade", lambda s: s.get("phase") == "Committed"
        )
        checkpoint_id = committed["checkpointId"]

        # After the checkpoint: must not be in the restore.
        for key in expected:
            await run("qemu-io", "-f", "raw", "-c", "write -P 0xee 0 8k", urls[key])
        assert source.read_bytes()[:8192] == b"\xee" * 8192  # the Proxy disk is its source

        target = tmp_path / "restore"
        await cluster.apply(recovery("restore", name, target, checkpoint={"id": checkpoint_id}))
        done = await cluster.wait_status(
            "Recovery", "restore", lambda s: s.get("phase") in ("Succeeded", "Failed"), timeout=60
        )
        assert done["phase"] == "Succeeded", done
        assert done["checkpointId"] == checkpoint_id
        for key, data in at_checkpoint.items():
            restored = (target / f"{key}.raw").read_bytes()
            assert restored == data, f"{key} differs from what was written by the checkpoint"

        # Metrics from the endpoint's status.
        served = controller.endpoint_status("default", name)
        assert served is not None
        assert sum(d.bytes_written for d in served.disks) >= 2 * SIZE
        metrics = prometheus_client.generate_latest(
            ebbtide_operator.registry_for(controller)
        ).decode()
        labels = f'namespace="default",vpg="{name}"'
        for metric in (
            "ebbtide_vpg_shipping_lag_bytes",
            "ebbtide_vpg_written_bytes_total",
            "ebbtide_vpg_write_rate_bytes_per_second",
            "ebbtide_vpg_endpoint_connections",
        ):
            assert f"{metric}{{{labels}}}" in metrics, metric
        sync = [line for line in metrics.splitlines() if line.startswith("ebbtide_disk_sync")]
        assert sync == [
            f'ebbtide_disk_sync_ratio{{disk="{disk}",namespace="default",state="Protecting",'
            f'vm="{vm}",vpg="{name}"}} 1.0'
            for vm, disk in (("web", "root"), ("web", "data"), ("db", "root"))
        ], metrics
        secret_value = base64.b64encode(s3server.DUMMY_SECRET_KEY.encode()).decode()
        assert secret_value not in str(await cluster.status("VirtualProtectionGroup", name))

        await cluster.delete("VirtualProtectionGroup", name, timeout=30)
        assert controller.runtime("default", name) is None
        assert controller.endpoint_status("default", name) is None
        assert not any(_port_open(url) for url in urls.values())
