"""FailoverTest: NBD exports of the checkpoint at once, protection going on, a recorded stop."""

from __future__ import annotations

import pathlib
from typing import Any

import ebbtide_engine
from tests.k8s.waiting import wait_for
from tests.nbd._support import need, run

from .conftest import (
    Cluster,
    Operators,
    fast_config,
    needs_kubectl,
    protect_shop,
    shop_runtime,
)
from .test_failover import _expected, _patch, failover


def failover_test(name: str, **spec: Any) -> dict[str, Any]:
    return failover(name, "FailoverTest", {"type": "NbdExport"}, **spec)


def _recorded(runtime: ebbtide_engine.VpgRuntime, name: str) -> ebbtide_engine.Checkpoint:
    found = [c for c in runtime.list_checkpoints() if c.tag == f"failover-test/{name}"]
    assert len(found) == 1, found
    assert found[0].kind == ebbtide_engine.CheckpointKind.FAILOVER_TEST
    return found[0]


@needs_kubectl
async def test_a_failover_test_serves_the_checkpoint_over_nbd_and_a_stop_records_it(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    need("qemu-img")
    need("qemu-io")
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))) as controller:
        await protect_shop(cluster, account_dir)
        runtime = shop_runtime(controller)
        await runtime.write("web", "root", 65536, b"T" * 8192)
        await runtime.write("db", "log", 0, b"L" * 4096)
        chosen = await runtime.checkpoint(tag="for-test")
        await runtime.write("web", "root", 65536, b"N" * 8192)  # after it: not in the test

        await cluster.apply(failover_test("drill", checkpoint={"tag": "for-test"}))
        ready = await cluster.wait_status(
            "Recovery", "drill", lambda s: s.get("phase") in ("Ready", "Failed")
        )
        assert ready["phase"] == "Ready", ready["message"]
        assert ready["checkpointId"] == chosen.id
        assert "protection goes on" in ready["message"]
        urls = {(e["vm"], e["disk"]): e["url"] for e in ready["exports"]}
        assert set(urls) == {("web", "root"), ("db", "log")}
        assert all(url.startswith("nbd://127.0.0.1:") for url in urls.values())
        assert urls["web", "root"].endswith("/shop/web/root")

        # What the export serves equals a recovery at the same checkpoint, byte for byte.
        expected = await _expected(account_dir, chosen.id, tmp_path / "expected")
        for key, url in urls.items():
            copy = tmp_path / f"{key[0]}-{key[1]}.raw"
            await run("qemu-img", "convert", "-f", "raw", "-O", "raw", url, str(copy))
            assert copy.read_bytes() == expected[key]
            await run("qemu-img", "compare", "-f", "raw", "-F", "raw", url, str(copy))
        # The test VM writes to its scratch overlay; protection and the bucket do not see it.
        await run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", urls["web", "root"])
        read = await run("qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 4k", urls["web", "root"])
        assert "read 4096/4096 bytes" in read.stdout
        used = await cluster.wait_status(
            "Recovery",
            "drill",
            lambda s: s.get("testExport", {}).get("overlayBytes", 0) >= 4096,
            what="status.testExport after the test VM wrote",
        )
        assert used["testExport"]["bytesFetched"] > 0
        assert used["testExport"]["reads"] > 0

        vpg_status = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: "FailoverTest" in str(s.get("conditions")),
            what="OperationRunning=True",
        )
        assert vpg_status["phase"] == "MeetingSLA"  # protection continues meanwhile
        before = len(runtime.list_checkpoints())
        await wait_for(lambda: len(runtime.list_checkpoints()) > before + 1, 10)

        await _patch(cluster, "drill", {"stop": True})
        stopped = await cluster.wait_status(
            "Recovery", "drill", lambda s: s.get("phase") == "Stopped"
        )
        recorded = _recorded(runtime, "drill")
        assert stopped["testCheckpointId"] == recorded.id
        assert stopped["message"] == (
            f"test stopped; recorded as checkpoint {recorded.id} (kind FailoverTest, tag "
            "failover-test/drill, never diluted)"
        )
        assert stopped["exports"] == []
        refused = await run(
            "qemu-io", "-f", "raw", "-c", "read 0 4k", urls["web", "root"], check=False
        )
        assert refused.returncode != 0  # the export is closed
        after = await _expected(account_dir, chosen.id, tmp_path / "after")
        assert after == expected  # the test's write never reached the journal
        idle = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: "Idle" in str(s.get("conditions")),
            what="OperationRunning=False",
        )
        assert idle["phase"] == "MeetingSLA"


@needs_kubectl
async def test_deleting_a_failover_test_ends_it_and_records_it(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run(fast_config(state_dir=str(tmp_path / "state"))) as controller:
        await protect_shop(cluster, account_dir)
        runtime = shop_runtime(controller)
        await cluster.apply(failover_test("drill", vms=["db"]))
        ready = await cluster.wait_status("Recovery", "drill", lambda s: s.get("phase") == "Ready")
        assert [(e["vm"], e["disk"]) for e in ready["exports"]] == [("db", "log")]
        await cluster.delete("Recovery", "drill")
        recorded = _recorded(runtime, "drill")
        events = await cluster.events("drill")
        assert any(f"recorded as checkpoint {recorded.id}" in e["message"] for e in events)
        assert not list((tmp_path / "state" / "scratch" / "default" / "drill").glob("**/*.raw"))


@needs_kubectl
async def test_a_failover_test_running_at_a_restart_is_ended_and_recorded(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    config = fast_config(state_dir=str(tmp_path / "state"))
    async with operators.run(config):
        await protect_shop(cluster, account_dir)
        await cluster.apply(failover_test("drill"))
        await cluster.wait_status("Recovery", "drill", lambda s: s.get("phase") == "Ready")
    async with operators.run(config) as controller:
        failed = await cluster.wait_status(
            "Recovery", "drill", lambda s: s.get("phase") == "Failed", timeout=30
        )
        runtime = controller.runtime("default", "shop")
        assert runtime is not None
        recorded = _recorded(runtime, "drill")
        assert failed["message"] == (
            "the operator restarted while the test ran: its NBD exports and their scratch "
            "overlays are gone (the test's writes are discarded); recorded as checkpoint "
            f"{recorded.id} (kind FailoverTest, tag failover-test/drill, never diluted); create "
            "a new Recovery to test again"
        )
        condition = await cluster.condition("Recovery", "drill", "Running")
        assert condition["reason"] == "OperatorRestarted"
        await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: "Idle" in str(s.get("conditions")),
            what="OperationRunning=False",
        )
