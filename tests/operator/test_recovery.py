"""Recovery progress, and one operation at a time per VPG."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import ebbtide_engine
import ebbtide_operator

from .conftest import Cluster, Operators, account, needs_kubectl, protecting, recovery, vpg


@needs_kubectl
async def test_progress_is_reported_and_a_second_recovery_of_the_vpg_is_refused(
    cluster: Cluster,
    operators: Operators,
    account_dir: pathlib.Path,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = asyncio.Event()
    real = ebbtide_engine.recover_to_files

    async def held(
        store: ebbtide_engine.ObjectStore,
        vpg_name: str,
        selector: ebbtide_engine.CheckpointSelector,
        out_dir: pathlib.Path,
        *,
        vms: Sequence[str] | None = None,
        progress: Callable[[int, int], None] | None = None,
        **kwargs: Any,
    ) -> ebbtide_engine.RecoveryResult:
        assert progress is not None
        progress(25, 100)  # a quarter done, then wait for the test
        await release.wait()
        return await real(store, vpg_name, selector, out_dir, vms=vms, progress=progress)

    monkeypatch.setattr(ebbtide_engine, "recover_to_files", held)
    async with operators.run() as controller:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        await cluster.apply(recovery("first", "shop", tmp_path / "a", vms=["db"]))
        running = await cluster.wait_status(
            "Recovery", "first", lambda s: s.get("progress", {}).get("percent") == 25
        )
        assert running["phase"] == "Running"
        assert running["progress"] == {"bytesDone": 25, "bytesTotal": 100, "percent": 25}
        metrics = ebbtide_operator.registry_for(controller)
        ratio = metrics.get_sample_value(
            "ebbtide_recovery_progress_ratio",
            {"namespace": "default", "recovery": "first", "vpg": "shop"},
        )
        assert ratio == 0.25

        await cluster.apply(recovery("second", "shop", tmp_path / "b"))
        refused = await cluster.wait_status(
            "Recovery", "second", lambda s: s.get("phase") == "Failed"
        )
        assert refused["message"].startswith(
            "Recovery 'first' (Restore) is already running for VPG 'shop'"
        )
        condition = await cluster.condition("Recovery", "second", "Running")
        assert condition["reason"] == "Conflict"
        assert any(e["reason"] == "Conflict" for e in await cluster.events("second"))

        release.set()
        done = await cluster.wait_status(
            "Recovery", "first", lambda s: s.get("phase") == "Succeeded"
        )
        assert done["progress"]["percent"] == 100
        assert (tmp_path / "a" / "db" / "log.raw").exists()
        assert not (tmp_path / "a" / "web").exists()  # only the VMs asked for


@needs_kubectl
async def test_a_missing_tag_fails_the_recovery_with_what_exists(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run():
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        await cluster.apply(recovery("r", "shop", tmp_path / "r", checkpoint={"tag": "nope"}))
        failed = await cluster.wait_status("Recovery", "r", lambda s: s.get("phase") == "Failed")
        assert "VPG 'shop' has no checkpoint tagged 'nope'" in failed["message"]
        assert failed["conditions"][0]["reason"] == "CheckpointNotFound"
