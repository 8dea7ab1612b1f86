"""The rendered chart applies with the real kubectl, and its args start the real operator.

Both run against the API server emulation of tests/k8s (kmock plus the
project's layer), which stores what kubectl applies as an API server would.
Nothing runs the Deployment there, so the second test runs its container's
command line itself — ``python -m ebbtide_operator`` with the rendered args,
only the listen addresses moved to 127.0.0.1 and the ports to free ones —
and checks the liveness probe's URL, /metrics, a StorageAccount going Ready and
a VPG served on the rendered NBD port range under the Service's name.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import signal
import sys
from typing import Any

import aiohttp
import pytest
import yaml

from tests import s3server
from tests.k8s import apiserver as emulation
from tests.k8s.conftest import apiserver, kubeconfig
from tests.k8s.test_apiserver import KUBECTL, Kubectl
from tests.k8s.waiting import wait_for

from . import chart

__all__ = ["apiserver", "kubeconfig"]  # fixtures

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary found")

#: Kinds the chart renders that the emulator does not serve by default.
EXTRA_KINDS = [
    emulation.Kind(
        emulation.Resource("monitoring.coreos.com", "v1", "servicemonitors"),
        "ServiceMonitor",
        namespaced=True,
    ),
]


async def _serve_extra_kinds(server: emulation.RunningApiServer) -> None:
    def register(emulator: emulation.KubernetesEmulator) -> None:
        for kind in EXTRA_KINDS:
            if kind.resource not in emulator.resources:
                emulator.register(kind)

    await server.inspect(register)


def _write(objs: list[dict[str, Any]], path: pathlib.Path) -> pathlib.Path:
    path.write_text(yaml.safe_dump_all(objs, sort_keys=False))
    return path


def _ref(obj: dict[str, Any]) -> list[str]:
    """kubectl arguments naming ``obj``: kind.group/name [-n namespace]."""
    group = obj["apiVersion"].rpartition("/")[0]
    kind = obj["kind"].lower() + (f".{group}" if group else "")
    namespace = obj["metadata"].get("namespace")
    return [f"{kind}/{obj['metadata']['name']}", *(["-n", namespace] if namespace else [])]


def _outcomes(output: str) -> list[tuple[str, str]]:
    """`kubectl apply` output lines (``deployment.apps/ebbtide created``) → [(ref, outcome)]."""
    return [
        (ref, outcome)
        for ref, outcome in (line.rsplit(" ", 1) for line in output.splitlines() if line.strip())
    ]


@needs_kubectl
@pytest.mark.parametrize("variant", ["default", "namespaced", "pvc", "service-monitor"])
async def test_kubectl_applies_the_rendered_chart(
    variant: str,
    apiserver: emulation.RunningApiServer,
    kubeconfig: pathlib.Path,
    tmp_path: pathlib.Path,
) -> None:
    await _serve_extra_kinds(apiserver)
    kubectl = Kubectl(kubeconfig)
    objs = chart.manifests(chart.VARIANTS[variant])
    manifest = _write(objs, tmp_path / "ebbtide.yaml")

    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(manifest))
    outcomes = _outcomes(out)
    assert len(outcomes) == len(objs)
    assert {outcome for _, outcome in outcomes} == {"created"}

    for obj in objs:  # what the API stored is what Helm rendered
        _, out, _ = await kubectl("get", *_ref(obj), "-o", "json")
        stored = json.loads(out)
        for field in ("spec", "rules", "roleRef", "subjects"):
            if field in obj:
                assert stored[field] == obj[field], f"{obj['kind']} {field}"
        assert obj["metadata"]["labels"].items() <= stored["metadata"]["labels"].items()

    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(manifest))
    assert {outcome for _, outcome in _outcomes(out)} == {"unchanged"}

    # An upgrade with other values changes the Deployment and the Service in place.
    changed = chart.manifests({**chart.VARIANTS[variant], "metrics": {"port": 9191}})
    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(_write(changed, manifest)))
    upgraded = dict(_outcomes(out))
    assert upgraded["deployment.apps/ebbtide"] == "configured"
    assert upgraded["service/ebbtide"] == "configured"
    _, out, _ = await kubectl("get", "service", "ebbtide", "-n", chart.NAMESPACE, "-o", "json")
    assert {"name": "metrics", "port": 9191, "protocol": "TCP", "targetPort": "metrics"} in (
        json.loads(out)["spec"]["ports"]
    )


@needs_kubectl
async def test_the_documented_crd_upgrade_applies(
    apiserver: emulation.RunningApiServer, kubeconfig: pathlib.Path
) -> None:
    kubectl = Kubectl(kubeconfig)
    crds = str(chart.CHART / "crds")
    _, out, _ = await kubectl("apply", "--validate=false", "-f", crds)  # as docs/helm.md says
    applied = _outcomes(out)
    assert {ref for ref, _ in applied} == {
        f"customresourcedefinition.apiextensions.k8s.io/{name}" for name in _crd_names()
    }
    _, out, _ = await kubectl("apply", "--validate=false", "-f", crds)
    assert {outcome for _, outcome in _outcomes(out)} == {"unchanged"}


def _crd_names() -> set[str]:
    return {
        yaml.safe_load(path.read_text())["metadata"]["name"]
        for path in (chart.CHART / "crds").glob("*.yaml")
    }


async def _http_status(url: str) -> int:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            await response.read()
            return response.status
    except aiohttp.ClientError:
        return 0


@needs_kubectl
async def test_the_rendered_command_line_runs_the_operator(
    apiserver: emulation.RunningApiServer, kubeconfig: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    metrics, liveness, nbd = (s3server.free_port() for _ in range(3))
    values = {
        "metrics": {"port": metrics},
        "liveness": {"port": liveness},
        "endpoint": {"address": "127.0.0.1", "ports": {"first": nbd, "count": 1}},
        "stateDir": {"path": str(tmp_path / "state")},
    }
    objs = chart.manifests(values)
    container = chart.container(objs)
    kubectl = Kubectl(kubeconfig)
    await kubectl("apply", "--validate=false", "-f", str(_write(objs, tmp_path / "chart.yaml")))

    args = [a.replace("http://0.0.0.0:", "http://127.0.0.1:") for a in container["args"]]
    assert f"--liveness=http://127.0.0.1:{liveness}/healthz" in args  # tests bind loopback only
    command = [sys.executable, *container["command"][1:]]  # the venv's python, not the image's
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "ebbtide-abc12"}
    process = await asyncio.create_subprocess_exec(
        *command,
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        probe = container["livenessProbe"]["httpGet"]  # what the kubelet would ask
        await _wait_ok(f"http://127.0.0.1:{liveness}{probe['path']}")
        await _wait_ok(f"http://127.0.0.1:{metrics}/metrics")

        (tmp_path / "bucket").mkdir()
        account = {
            "apiVersion": "ebbtide.io/v1alpha1",
            "kind": "StorageAccount",
            "metadata": {"name": "local", "namespace": "default"},
            "spec": {"url": (tmp_path / "bucket").as_uri()},
        }
        await kubectl(
            "apply", "--validate=false", "-f", str(_write([account], tmp_path / "account.yaml"))
        )

        async def ready() -> bool:
            _, out, _ = await kubectl(
                "get", "storageaccount", "local", "-o", "jsonpath={.status.phase}"
            )
            return out == "Ready"

        await wait_for(ready, timeout=30, interval=0.2, what="StorageAccount local Ready")

        # A VPG gets its NBD endpoint from the rendered range, and status names the Service.
        vpg = {
            "apiVersion": "ebbtide.io/v1alpha1",
            "kind": "VirtualProtectionGroup",
            "metadata": {"name": "shop", "namespace": "default"},
            "spec": {
                "storageAccountRef": {"name": "local"},
                "vms": [{"name": "web", "disks": [{"name": "root", "size": "1Mi"}]}],
            },
        }
        await kubectl("apply", "--validate=false", "-f", str(_write([vpg], tmp_path / "vpg.yaml")))

        async def export_url() -> str:
            _, out, _ = await kubectl(
                "get", "vpg", "shop", "-o", "jsonpath={.status.vms[0].disks[0].url}"
            )
            return out

        url = await wait_for(export_url, timeout=60, interval=0.3, what="the disk's NBD URL")
        assert url == f"nbd://ebbtide.ebbtide-system.svc:{nbd}/shop/web/root"
        _, writer = await asyncio.open_connection("127.0.0.1", nbd)  # listening where rendered
        writer.close()
        await writer.wait_closed()
        assert any((tmp_path / "state").rglob("*")), "nothing in the rendered --state-dir"
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()[-2000:]


async def _wait_ok(url: str) -> None:
    async def ok() -> bool:
        return await _http_status(url) == 200

    await wait_for(ok, timeout=60, interval=0.2, what=url)
