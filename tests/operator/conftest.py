"""Fixtures for the operator's end-to-end tests: the API server emulator, Kopf in-process.

- ``apiserver`` / ``kubeconfig``: from tests/k8s (the emulator in its own thread).
- ``kubectl``: the real kubectl against it (tests skip without one).
- ``operators``: starts :class:`ebbtide_operator.Controller` under ``kopf.operator``
  in the test's event loop (watching namespace ``default``) and stops it at
  teardown; call it again after a stop to "restart" the operator.
- ``account_dir``: an empty directory for a ``file://`` storage account.
- ``cluster``: reads objects, conditions and events from the emulator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import kopf
import pytest
import yaml

import ebbtide_engine
import ebbtide_operator
from ebbtide_operator import _endpoints
from tests import s3server
from tests.k8s import apiserver as emulation
from tests.k8s.conftest import apiserver, kubeconfig
from tests.k8s.test_apiserver import KUBECTL, Kubectl
from tests.k8s.waiting import wait_for

__all__ = ["apiserver", "kubeconfig"]

NAMESPACE = "default"
PLURALS = {
    "VirtualProtectionGroup": "virtualprotectiongroups",
    "StorageAccount": "storageaccounts",
    "Checkpoint": "checkpoints",
    "Recovery": "recoveries",
}
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary found")


def fast_config(**changes: Any) -> ebbtide_operator.OperatorConfig:
    """Operator settings for tests: short ticks and retries, so nothing waits for long."""
    base = ebbtide_operator.OperatorConfig(
        pod_name="test-pod",
        status_tick_seconds=0.2,
        status_refresh_seconds=1.0,
        retry_delay_seconds=0.5,
        checkpoint_wait_seconds=0.3,
        lease_seconds=15.0,
    )
    return dataclasses.replace(base, **changes)


def endpoint_config(state_dir: pathlib.Path, **changes: Any) -> ebbtide_operator.OperatorConfig:
    """``fast_config`` plus the NBD endpoint on 127.0.0.1 (ports from a free one up)."""
    low = s3server.free_port()
    changes.setdefault("endpoint_ports", (low, min(low + 15, 65535)))
    config = fast_config(state_dir=str(state_dir), **changes)
    return dataclasses.replace(config, endpoint=_endpoints.Endpoints.from_config(config))


class Operators:
    """Runs the operator in-process: ``async with operators.run() as controller: ...``.

    Stop it in the test's own task (the ``async with``), never in a fixture's
    teardown: Kopf cancels, as hung, every task created after it started, and a
    teardown runs in such a task.
    """

    def __init__(self, server: emulation.RunningApiServer) -> None:
        self.server = server

    @contextlib.asynccontextmanager
    async def run(
        self,
        config: ebbtide_operator.OperatorConfig | None = None,
        *,
        liveness_endpoint: str | None = None,
    ) -> AsyncIterator[ebbtide_operator.Controller]:
        controller = ebbtide_operator.Controller(config or fast_config())
        registry = kopf.OperatorRegistry()
        url = self.server.url

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=url)

        controller.register(registry)
        settings = ebbtide_operator.settings()
        settings.posting.idle_timeout = 0.1
        stop = asyncio.Event()
        task = asyncio.create_task(
            kopf.operator(
                registry=registry,
                settings=settings,
                clusterwide=False,
                namespaces=[NAMESPACE],
                standalone=True,
                stop_flag=stop,
                liveness_endpoint=liveness_endpoint,
            )
        )
        try:
            yield controller
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)


@pytest.fixture
def operators(apiserver: emulation.RunningApiServer) -> Operators:
    return Operators(apiserver)


@pytest.fixture
def kubectl(kubeconfig: pathlib.Path) -> Kubectl:
    if KUBECTL is None:
        pytest.skip("no kubectl binary found")
    return Kubectl(kubeconfig)


@pytest.fixture
def account_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "account"
    path.mkdir()
    return path


@dataclasses.dataclass
class Cluster:
    """Reads what the emulator stores (in its own loop), and applies manifests with kubectl."""

    server: emulation.RunningApiServer
    kubectl: Kubectl
    workdir: pathlib.Path

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        resource = (
            emulation.Resource("", "v1", "secrets")
            if kind == "Secret"
            else emulation.Resource("ebbtide.io", "v1alpha1", PLURALS[kind])
        )

        def read(emulator: emulation.KubernetesEmulator) -> dict[str, Any] | None:
            try:
                obj = emulator.objects[resource, NAMESPACE, name]
            except KeyError:
                return None
            return None if obj.deleted else json.loads(json.dumps(obj.raw))

        return await self.server.inspect(read)

    async def status(self, kind: str, name: str) -> dict[str, Any]:
        obj = await self.get(kind, name)
        return dict((obj or {}).get("status") or {})

    async def condition(self, kind: str, name: str, type_: str) -> dict[str, Any]:
        for condition in (await self.status(kind, name)).get("conditions", []):
            if condition["type"] == type_:
                return dict(condition)
        return {}

    async def events(self, name: str) -> list[dict[str, Any]]:
        _, out, _ = await self.kubectl("get", "events", "-o", "json")
        return [e for e in json.loads(out)["items"] if e["involvedObject"]["name"] == name]

    async def apply(self, *docs: dict[str, Any]) -> str:
        path = self.workdir / f"apply-{id(docs)}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        _, out, _ = await self.kubectl("apply", "--validate=false", "-f", str(path))
        return out

    async def delete(self, kind: str, name: str, *, timeout: float = 15.0) -> None:  # noqa: ASYNC109
        """``kubectl delete`` and wait until the object is gone (finalizers ran).

        ``--wait=false``: kubectl waits with a watch-list, which the emulator lacks.
        """
        await self.kubectl("delete", PLURALS[kind], name, "--wait=false")

        async def gone() -> bool:
            return await self.get(kind, name) is None

        await wait_for(gone, timeout, interval=0.05, what=f"{kind} {name} deleted")

    async def wait_status(
        self,
        kind: str,
        name: str,
        predicate: Callable[[dict[str, Any]], Any],
        *,
        timeout: float = 15.0,  # noqa: ASYNC109 - a polling helper: the deadline is its point
        what: str = "",
    ) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            status = await self.status(kind, name)
            return status if predicate(status) else None

        found = await wait_for(check, timeout, interval=0.05, what=what or f"{kind} {name} status")
        assert found is not None
        return dict(found)


@pytest.fixture
def cluster(
    apiserver: emulation.RunningApiServer, kubectl: Kubectl, tmp_path: pathlib.Path
) -> Cluster:
    return Cluster(apiserver, kubectl, tmp_path)


def account(name: str, url: str, *, secret: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"url": url}
    if secret is not None:
        spec["credentialsSecretRef"] = {"name": secret}
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "StorageAccount",
        "metadata": {"name": name},
        "spec": spec,
    }


def vpg(name: str, account_name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "VirtualProtectionGroup",
        "metadata": {"name": name},
        "spec": {
            "storageAccountRef": {"name": account_name},
            "checkpointInterval": "1s",
            "targetRpo": "1m",
            "vms": [
                {"name": "web", "disks": [{"name": "root", "size": "1Mi"}]},
                {"name": "db", "disks": [{"name": "log", "size": "512Ki"}]},
            ],
            **spec,
        },
    }


def checkpoint(name: str, vpg_name: str, *, tag: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"vpgRef": {"name": vpg_name}}
    if tag:
        spec["tag"] = tag
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "Checkpoint",
        "metadata": {"name": name},
        "spec": spec,
    }


def recovery(name: str, vpg_name: str, path: pathlib.Path | None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "vpgRef": {"name": vpg_name},
        "type": "Restore",
        "target": {"type": "Images", "path": str(path)} if path else {"type": "NbdExport"},
        **spec,
    }
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "Recovery",
        "metadata": {"name": name},
        "spec": body,
    }


def protecting(status: dict[str, Any]) -> bool:
    return status.get("phase") == "MeetingSLA" and "lastCheckpoint" in status


async def protect_shop(cluster: Cluster, account_dir: pathlib.Path) -> None:
    """The usual start: StorageAccount "local" on ``account_dir``, VPG "shop" on it, protecting."""
    await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
    await cluster.wait_status("VirtualProtectionGroup", "shop", protecting)


def shop_runtime(controller: ebbtide_operator.Controller) -> ebbtide_engine.VpgRuntime:
    """The open runtime of VPG "shop" in namespace default."""
    runtime = controller.runtime("default", "shop")
    assert runtime is not None
    return runtime


async def settled(awaitable: Awaitable[Any]) -> None:
    with contextlib.suppress(Exception):
        await awaitable
