"""Bad input gives a condition and an event saying what to fix, and no crash loop."""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Awaitable
from typing import Any

import pytest

from tests.k8s.waiting import wait_for

from .conftest import Cluster, Operators, account, needs_kubectl, protecting, vpg

SECRET_VALUE = "do-not-print-me-5c1e7"


def secret(name: str, **data: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data}


@needs_kubectl
async def test_a_missing_storage_account_is_reported_then_picked_up(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run():
        await cluster.apply(vpg("shop", "later"))
        status = await cluster.wait_status(
            "VirtualProtectionGroup", "shop", lambda s: s.get("phase") == "Error"
        )
        condition = await cluster.condition("VirtualProtectionGroup", "shop", "StorageReachable")
        assert condition["status"] == "False"
        assert condition["reason"] == "StorageAccountNotFound"
        assert "StorageAccount 'later' does not exist in namespace 'default'" in status["message"]
        assert "fix spec.storageAccountRef.name" in status["message"]

        async def retries() -> int:
            obj = await cluster.get("VirtualProtectionGroup", "shop")
            progress = (obj or {}).get("metadata", {}).get("annotations", {})
            return int(json.loads(progress.get("ebbtide.io/vpg-create", "{}")).get("retries", 0))

        await wait_for(lambda: _at_least(retries(), 3), what="three retries")
        events = await cluster.events("shop")
        assert [e["reason"] for e in events] == ["StorageAccountNotFound"]  # once, not per retry
        assert not (account_dir / "vpgs").exists()

        await cluster.apply(account("later", account_dir.as_uri()))  # the fix
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        condition = await cluster.condition("VirtualProtectionGroup", "shop", "StorageReachable")
        assert condition["status"] == "True"


@needs_kubectl
async def test_an_invalid_spec_is_reported_with_the_engines_message(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path
) -> None:
    async with operators.run():
        # Kubernetes accepts dots in names; the engine's keys need a DNS-1123 label.
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop.v2", "local"))
        status = await cluster.wait_status(
            "VirtualProtectionGroup", "shop.v2", lambda s: s.get("phase") == "Error"
        )
        condition = await cluster.condition("VirtualProtectionGroup", "shop.v2", "SpecValid")
        assert (condition["status"], condition["reason"]) == ("False", "InvalidSpec")
        assert "VPG name 'shop.v2' is not a DNS-1123 label" in condition["message"]
        assert status["observedGeneration"] == 1
        events = await cluster.events("shop.v2")
        assert [e["reason"] for e in events if e["type"] == "Warning"] == ["InvalidSpec"]
        assert not (account_dir / "vpgs").exists()


@needs_kubectl
async def test_missing_secrets_and_keys_and_unreachable_buckets(
    cluster: Cluster, operators: Operators, account_dir: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    async with operators.run():
        await cluster.apply(
            account("nosecret", "s3://bucket/p?endpoint=http://127.0.0.1:1", secret="creds"),
            account("nokey", "s3://bucket/p?endpoint=http://127.0.0.1:1", secret="partial"),
            secret("partial", AWS_ACCESS_KEY_ID="id", OTHER=SECRET_VALUE),
            account("nodir", (tmp_path / "missing").as_uri()),
            vpg("a", "nosecret"),
            vpg("b", "nodir"),
        )
        expected = {
            "nosecret": ("SecretNotFound", "Secret 'creds' does not exist in namespace 'default'"),
            "nokey": ("SecretKeyMissing", "Secret 'partial' has no key 'AWS_SECRET_ACCESS_KEY'"),
            "nodir": ("BucketNotFound", "the directory does not exist; create it (mkdir -p"),
        }
        for name, (reason, text) in expected.items():

            def says(status: dict[str, Any], text: str = text) -> bool:
                return text in status.get("message", "")

            status = await cluster.wait_status("StorageAccount", name, says)  # retried till then
            assert status["phase"] == "Error"
            condition = await cluster.condition("StorageAccount", name, "Reachable")
            assert (condition["status"], condition["reason"]) == ("False", reason)
        for name, reason in (("a", "SecretNotFound"), ("b", "BucketNotFound")):
            await cluster.wait_status(
                "VirtualProtectionGroup", name, lambda s: s.get("phase") == "Error"
            )
            condition = await cluster.condition("VirtualProtectionGroup", name, "StorageReachable")
            assert condition["reason"] == reason
        (tmp_path / "missing").mkdir()  # the fix: protection starts on the next retry
        await cluster.wait_status("VirtualProtectionGroup", "b", protecting)


@needs_kubectl
async def test_s3_credentials_come_from_the_secret_and_never_show(
    cluster: Cluster,
    operators: Operators,
    s3_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)  # only the Secret's keys can work
    caplog.set_level(logging.DEBUG)
    async with operators.run():
        await cluster.apply(
            secret("s3", AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY=SECRET_VALUE),
            account("s3", s3_url, secret="s3"),
            vpg("shop", "s3"),
        )
        await cluster.wait_status("StorageAccount", "s3", lambda s: s.get("phase") == "Ready")
        await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)
        shown = [
            str(await cluster.get("VirtualProtectionGroup", "shop")),
            str(await cluster.get("StorageAccount", "s3")),
            str(await cluster.events("shop")),
            str(await cluster.events("s3")),
        ]
    assert all(SECRET_VALUE not in text for text in shown)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert SECRET_VALUE not in logged


async def _at_least(value: Awaitable[int], minimum: int) -> bool:
    return await value >= minimum
