"""The CRDs: structural, complete, accepting every example and refusing real mistakes.

Validation goes through :mod:`crdvalidate`: the OpenAPI schema with a real
validator and every CEL rule with a real CEL runtime, as the API server would.
The engine parses the same VPG spec with pydantic, so a table of edge cases
checks that both draw the line in the same place.
"""

from __future__ import annotations

import copy
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import yaml

from ebbtide_engine import SpecError, VpgSpec

from . import crdvalidate

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
CRDS = crdvalidate.load_crds()

Mutation = Callable[[dict[str, Any]], None]


def _examples() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc


def _example(kind: str, name: str | None = None) -> dict[str, Any]:
    for _, doc in _examples():
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return copy.deepcopy(doc)
    raise LookupError(kind)


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node, with its path."""
    if isinstance(node, dict):
        yield path, node
        for key, child in node.get("properties", {}).items():
            yield from _walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from _walk(node["additionalProperties"], f"{path}{{}}")
        for branch in node.get("anyOf", ()):
            yield from _walk(branch, f"{path}|")


# ---------------------------------------------------------------- the CRDs themselves


def test_every_kind_has_its_crd() -> None:
    assert sorted(CRDS) == ["Checkpoint", "Recovery", "StorageAccount", "VirtualProtectionGroup"]


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_crd_is_structural_and_complete(kind: str) -> None:
    crd = CRDS[kind]
    assert (crd.group, crd.version, crd.namespaced) == ("ebbtide.io", "v1alpha1", True)
    assert crd.categories == ("ebbtide",)
    assert crd.short_names
    assert crd.subresources == {"status"}
    assert [c.name for c in crd.printer_columns][-1] == "Age"
    assert set(crd.schema["properties"]) == {"apiVersion", "kind", "metadata", "spec", "status"}
    for path, node in _walk(crd.schema):
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        if path.endswith("|"):
            continue  # an anyOf branch of an int-or-string node
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
        else:
            assert "type" in node, f"{path} has no type (not structural)"
        if node.get("type") == "object" and path != ".metadata":
            assert node.get("properties"), f"{path} is an object without properties"
        if node.get("type") == "string" and "enum" not in node and "format" not in node:
            assert "maxLength" in node or path.endswith((".apiVersion", ".kind")), (
                f"{path}: strings need maxLength (CEL cost estimates and etcd size)"
            )


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_printer_columns_point_at_fields_of_the_schema(kind: str) -> None:
    crd = CRDS[kind]
    for column in crd.printer_columns:
        node: Any = crd.schema
        parts = column.json_path.lstrip(".").split(".")
        if parts[0] == "metadata":
            continue
        for part in parts:
            node = node["properties"][part]
        types = {"date": "string", "number": "number", "integer": "integer", "string": "string"}
        assert node["type"] == types[column.type], column
        if column.type == "date":
            assert node.get("format") == "date-time", column


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_cel_rule_compiles(kind: str) -> None:
    rules = [
        rule[field]
        for _, node in _walk(CRDS[kind].schema)
        for rule in node.get("x-kubernetes-validations", ())
        for field in ("rule", "messageExpression")
        if field in rule
    ]
    assert rules
    for rule in rules:
        crdvalidate.compile_rule(rule)  # raises on a syntax or type error


# ---------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("where", "doc"), list(_examples()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_every_example_validates(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] == "Secret":
        assert set(doc.get("stringData", {})) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        return
    stored = crdvalidate.validate(CRDS[doc["kind"]], doc)
    assert stored["spec"]
    if doc["kind"] == "VirtualProtectionGroup":
        # What the operator will read back (defaults filled in) is what the engine accepts.
        spec = VpgSpec.from_resource(stored)
        assert spec.name == doc["metadata"]["name"]


def test_defaults_are_filled_in_as_the_api_server_would() -> None:
    stored = crdvalidate.validate(
        CRDS["VirtualProtectionGroup"], _example("VirtualProtectionGroup")
    )
    spec = stored["spec"]
    assert spec["journal"] == {
        "segmentMaxBytes": "16Mi",
        "maxUnshippedBytes": "256Mi",
        "uploadConcurrency": 8,
        "hardLimit": "Unlimited",
        "maxSpillBytes": "4Gi",
        "burstShipDelay": "10s",
    }
    assert spec["onDelete"] == "Retain"
    assert {disk["mode"] for vm in spec["vms"] for disk in vm["disks"]} == {"Mirror"}
    engine = VpgSpec.from_resource(stored)
    assert engine.journal == VpgSpec.parse("x", {"vms": spec["vms"]}).journal

    recovery = crdvalidate.validate(CRDS["Recovery"], _example("Recovery", "shop-test"))
    assert recovery["spec"]["commitPolicy"] == "None"
    assert recovery["spec"]["commitTimeout"] == "1h"
    assert recovery["spec"]["stop"] is False
    credentials = crdvalidate.validate(
        CRDS["StorageAccount"], _example("StorageAccount", "offsite")
    )
    assert credentials["spec"]["credentialsSecretRef"]["accessKeyIdKey"] == "AWS_ACCESS_KEY_ID"


# ---------------------------------------------------------------- realistic mistakes


def _set(path: str, value: Any) -> Mutation:
    """A mutation setting a dotted path ("spec.vms.0.name")."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _append(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for part in path.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node.append(value)

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(doc)

    return mutate


VPG, SA, CP, RC = "VirtualProtectionGroup", "StorageAccount", "Checkpoint", "Recovery"
DISK0 = "spec.vms.0.disks.0"

MISTAKES: list[tuple[str, str, Mutation, str]] = [
    # (what a person did, kind, change to the example, what the API server says)
    (
        "interval above an hour",
        VPG,
        _set("spec.checkpointInterval", "2h"),
        'spec.checkpointInterval: Invalid value: "string": '
        "checkpointInterval must be between 1s and 1h",
    ),
    (
        "interval of zero",
        VPG,
        _set("spec.checkpointInterval", "0s"),
        "checkpointInterval must be between 1s and 1h",
    ),
    (
        "interval in milliseconds",
        VPG,
        _set("spec.checkpointInterval", "500ms"),
        'spec.checkpointInterval: Invalid value: "500ms": '
        "spec.checkpointInterval in body should match",
    ),
    (
        "history beyond 30 days",
        VPG,
        _set("spec.journalHistory", "31d"),
        'spec.journalHistory: Invalid value: "string": journalHistory must be between 1h and 30d',
    ),
    (
        "history below an hour",
        VPG,
        _set("spec.journalHistory", "30m"),
        "journalHistory must be between 1h and 30d",
    ),
    (
        "history as a bare number",
        VPG,
        _set("spec.journalHistory", "24"),
        "spec.journalHistory in body should match",
    ),
    (
        "an RPO shorter than the interval",
        VPG,
        _set("spec.targetRpo", "2s"),
        'spec.targetRpo: Invalid value: "object": targetRpo (2s) is shorter than '
        "checkpointInterval (5s): it could never be met",
    ),
    (
        "no storage account",
        VPG,
        _drop("spec.storageAccountRef"),
        "spec.storageAccountRef: Required value",
    ),
    ("no VMs", VPG, _set("spec.vms", []), "spec.vms in body should have at least 1 items"),
    (
        "the same VM twice",
        VPG,
        _append("spec.vms", {"name": "web", "disks": [{"name": "a", "size": "1Mi"}]}),
        'spec.vms: Invalid value: "array": VM names must be unique within a VPG',
    ),
    (
        "the same disk twice",
        VPG,
        _append("spec.vms.0.disks", {"name": "root", "size": "1Mi"}),
        "disk names must be unique within a VM",
    ),
    (
        "a capitalised VM name",
        VPG,
        _set("spec.vms.0.name", "Web"),
        'spec.vms[0].name: Invalid value: "Web": spec.vms[0].name in body should match',
    ),
    (
        "a VM without disks",
        VPG,
        _set("spec.vms.0.disks", []),
        "spec.vms[0].disks in body should have at least 1 items",
    ),
    (
        "a Proxy disk without a source",
        VPG,
        _set(f"{DISK0}.mode", "Proxy"),
        "spec.vms[0].disks[0].source: Required value: a Proxy disk needs source.path",
    ),
    (
        "mode in lower case",
        VPG,
        _set(f"{DISK0}.mode", "proxy"),
        'spec.vms[0].disks[0].mode: Unsupported value: "proxy": '
        'supported values: "Mirror", "Proxy"',
    ),
    (
        "size in GB, not G or Gi",
        VPG,
        _set(f"{DISK0}.size", "10GB"),
        "spec.vms[0].disks[0].size in body should match",
    ),
    (
        "size not a multiple of 512",
        VPG,
        _set(f"{DISK0}.size", 1000),
        "size must be a multiple of 512 bytes, from 512 to 1Pi",
    ),
    (
        "size in decimal kilobytes",
        VPG,
        _set(f"{DISK0}.size", "3k"),
        "size must be a multiple of 512 bytes",
    ),
    (
        "a disk larger than 1Pi",
        VPG,
        _set(f"{DISK0}.size", "2Pi"),
        "size must be a multiple of 512 bytes, from 512 to 1Pi",
    ),
    ("size as a boolean", VPG, _set(f"{DISK0}.size", True), "must be of type integer,string"),
    (
        "a warning above the hard limit",
        VPG,
        _set("spec.journal", {"hardLimit": "100Gi", "warningThreshold": "200Gi"}),
        'spec.journal.warningThreshold: Invalid value: "object": warningThreshold (200Gi) must be '
        "below hardLimit (100Gi)",
    ),
    (
        "a warning percentage above the limit's",
        VPG,
        _set("spec.journal", {"hardLimit": "50%", "warningThreshold": "80%"}),
        "warningThreshold (80%) must be below hardLimit (50%)",
    ),
    (
        "a limit of 150%",
        VPG,
        _set("spec.journal", {"hardLimit": "150%"}),
        "spec.journal.hardLimit in body should match",
    ),
    (
        "tiny segments",
        VPG,
        _set("spec.journal", {"segmentMaxBytes": "1Ki"}),
        "segmentMaxBytes must be between 64Ki and 1Gi",
    ),
    (
        "less unshipped room than two segments",
        VPG,
        _set("spec.journal", {"segmentMaxBytes": "64Mi", "maxUnshippedBytes": "100Mi"}),
        "maxUnshippedBytes must be at least twice segmentMaxBytes",
    ),
    (
        "no upload concurrency",
        VPG,
        _set("spec.journal", {"uploadConcurrency": 0}),
        "spec.journal.uploadConcurrency in body should be greater than or equal to 1",
    ),
    (
        "a burst ship delay of an hour",
        VPG,
        _set("spec.journal", {"burstShipDelay": "1h"}),
        "burstShipDelay must be at most 5m",
    ),
    (
        "onDelete spelled as in Velero",
        VPG,
        _set("spec.onDelete", "Orphan"),
        'Unsupported value: "Orphan": supported values: "Retain", "Delete"',
    ),
    ("a field that does not exist", VPG, _set("spec.rpo", "5m"), 'unknown field "spec.rpo"'),
    (
        "a capitalised object name",
        VPG,
        _set("metadata.name", "Shop"),
        'metadata.name: Invalid value: "Shop": a lowercase RFC 1123 subdomain',
    ),
    (
        "a status phase Zerto does not have",
        VPG,
        _set("status", {"phase": "Healthy"}),
        'status.phase: Unsupported value: "Healthy"',
    ),
    (
        "an http:// URL",
        SA,
        _set("spec.url", "http://minio:9000/bucket"),
        "spec.url in body should match",
    ),
    (
        "credentials in the URL",
        SA,
        _set("spec.url", "s3://key:secret@bucket/prefix"),
        "spec.url in body should match",
    ),
    (
        "a bucket name with capitals",
        SA,
        _set("spec.url", "s3://My_Bucket"),
        "spec.url in body should match",
    ),
    (
        "a misspelt URL option",
        SA,
        _set("spec.url", "s3://bucket/p?endpont=http://minio:9000"),
        'spec.url: Invalid value: "string": the options of an s3:// URL are endpoint=',
    ),
    (
        "an endpoint without a scheme",
        SA,
        _set("spec.url", "s3://bucket?endpoint=minio:9000"),
        "the options of an s3:// URL are",
    ),
    (
        "a relative file path",
        SA,
        _set("spec.url", "file://var/lib/ebbtide"),
        "spec.url in body should match",
    ),
    (
        "a Secret reference without a name",
        SA,
        _set("spec.credentialsSecretRef", {}),
        "spec.credentialsSecretRef.name: Required value",
    ),
    ("a checkpoint without a VPG", CP, _drop("spec.vpgRef"), "spec.vpgRef: Required value"),
    (
        "an automatic checkpoint asked for",
        CP,
        _set("spec.kind", "Automatic"),
        'spec.kind: Unsupported value: "Automatic"',
    ),
    ("a tag longer than 256 characters", CP, _set("spec.tag", "x" * 300), "spec.tag: Too long"),
    (
        "two ways of naming the checkpoint",
        RC,
        _set("spec.checkpoint", {"latest": True, "id": 3}),
        'spec.checkpoint: Invalid value: "object": give exactly one of checkpoint.latest, '
        "checkpoint.id, checkpoint.tag or checkpoint.before",
    ),
    ("no way of naming the checkpoint", RC, _set("spec.checkpoint", {}), "give exactly one of"),
    (
        "latest: false",
        RC,
        _set("spec.checkpoint", {"latest": False}),
        'spec.checkpoint.latest: Invalid value: "object": latest can only be true',
    ),
    (
        "a time that is not RFC 3339",
        RC,
        _set("spec.checkpoint", {"before": "yesterday"}),
        'spec.checkpoint.before: Invalid value: "yesterday": '
        "spec.checkpoint.before in body must be of type date-time",
    ),
    (
        "a recovery type in lower case",
        RC,
        _set("spec.type", "failover"),
        'spec.type: Unsupported value: "failover"',
    ),
    (
        "a commit policy on a test",
        RC,
        _set("spec.commitPolicy", "Commit"),
        'spec.commitPolicy: Invalid value: "object": '
        "commitPolicy applies only to Failover and Move",
    ),
    (
        "an Images target with nowhere to write",
        RC,
        _set("spec.target", {"type": "Images"}),
        "an Images target needs path (a directory on the node) or storageAccountRef",
    ),
    (
        "a storage class for NBD exports",
        RC,
        _set("spec.target.storageClassName", "fast"),
        'spec.target.storageClassName: Invalid value: "object": storageClassName applies only',
    ),
    (
        "a commit timeout of a month",
        RC,
        _set("spec.commitTimeout", "720h"),
        "commitTimeout must be between 1m and 168h",
    ),
    (
        "the same VM twice in a recovery",
        RC,
        _set("spec.vms", ["web", "web"]),
        'spec.vms[1]: Duplicate value: "web"',
    ),
    ("no target", RC, _drop("spec.target"), "spec.target: Required value"),
]


@pytest.mark.parametrize(
    ("mistake", "kind", "mutate", "message"), MISTAKES, ids=[m[0] for m in MISTAKES]
)
def test_realistic_mistakes_are_refused_with_a_clear_message(
    mistake: str, kind: str, mutate: Mutation, message: str
) -> None:
    doc = _example(kind, {VPG: "shop", RC: "shop-test", SA: "local"}.get(kind))
    mutate(doc)
    with pytest.raises(crdvalidate.InvalidObject) as caught:
        crdvalidate.validate(CRDS[kind], doc)
    assert message in str(caught.value), f"{mistake}: {caught.value}"


# ---------------------------------------------------------------- updates (transition rules)


def _update(kind: str, name: str, mutate: Mutation) -> dict[str, Any]:
    old = crdvalidate.validate(CRDS[kind], _example(kind, name))
    new = copy.deepcopy(old)
    mutate(new)
    return crdvalidate.validate(CRDS[kind], new, old=old)


@pytest.mark.parametrize(
    ("kind", "name", "mutate", "message"),
    [
        (
            CP,
            "before-upgrade",
            _set("spec.tag", "after-upgrade"),
            "a Checkpoint's spec cannot change",
        ),
        (
            RC,
            "shop-test",
            _set("spec.type", "Failover"),
            'spec.type: Invalid value: "string": type cannot change',
        ),
        (RC, "shop-test", _set("spec.checkpoint", {"id": 4}), "checkpoint cannot change"),
        (RC, "shop-db-restore", _set("spec.vms", ["web"]), "vms cannot change"),
    ],
    ids=["checkpoint spec", "recovery type", "recovery checkpoint", "recovery VMs"],
)
def test_fixed_fields_cannot_change(kind: str, name: str, mutate: Mutation, message: str) -> None:
    with pytest.raises(crdvalidate.InvalidObject, match=message):
        _update(kind, name, mutate)


def test_a_failover_test_can_be_stopped_but_not_restarted() -> None:
    stopped = _update(RC, "shop-test", _set("spec.stop", True))
    with pytest.raises(crdvalidate.InvalidObject, match="a stopped Recovery cannot be restarted"):
        crdvalidate.validate(
            CRDS[RC], {**stopped, "spec": {**stopped["spec"], "stop": False}}, old=stopped
        )


def test_status_and_metadata_changes_pass_the_transition_rules() -> None:
    updated = _update(
        CP, "before-upgrade", _set("status", {"phase": "Committed", "checkpointId": 9})
    )
    assert updated["status"]["checkpointId"] == 9


# ---------------------------------------------------------------- the engine agrees


ENGINE_EDGES: list[tuple[str, Mutation]] = [
    ("interval 1s", _set("spec.checkpointInterval", "1s")),
    ("interval 1h", _both(_set("spec.checkpointInterval", "1h"), _set("spec.targetRpo", "1h"))),
    ("interval 3601s", _set("spec.checkpointInterval", "3601s")),
    ("history 1h", _set("spec.journalHistory", "1h")),
    ("history 59m", _set("spec.journalHistory", "59m")),
    ("history 30d", _set("spec.journalHistory", "30d")),
    ("history 721h", _set("spec.journalHistory", "721h")),
    ("size 512", _set(f"{DISK0}.size", 512)),
    ("size 1000", _set(f"{DISK0}.size", 1000)),
    ("size 0", _set(f"{DISK0}.size", 0)),
    ("size 1Pi", _set(f"{DISK0}.size", "1Pi")),
    ("size 1G", _set(f"{DISK0}.size", "1G")),
    ("VM name with a dot", _set("spec.vms.0.name", "web.1")),
    ("VM name of 64 characters", _set("spec.vms.0.name", "a" * 64)),
    ("segment 64Ki", _set("spec.journal", {"segmentMaxBytes": "64Ki"})),
    ("segment 63Ki", _set("spec.journal", {"segmentMaxBytes": "63Ki"})),
    (
        "unshipped = 2 segments",
        _set("spec.journal", {"segmentMaxBytes": "8Mi", "maxUnshippedBytes": "16Mi"}),
    ),
    (
        "unshipped < 2 segments",
        _set("spec.journal", {"segmentMaxBytes": "8Mi", "maxUnshippedBytes": "15Mi"}),
    ),
    ("concurrency 64", _set("spec.journal", {"uploadConcurrency": 64})),
    ("burst ship delay 0s", _set("spec.journal", {"burstShipDelay": "0s"})),
    ("burst ship delay 5m", _set("spec.journal", {"burstShipDelay": "5m"})),
    ("burst ship delay 301s", _set("spec.journal", {"burstShipDelay": "301s"})),
    ("concurrency 65", _set("spec.journal", {"uploadConcurrency": 65})),
    (
        "Proxy with a source",
        _set(
            DISK0, {"name": "root", "size": "1Mi", "mode": "Proxy", "source": {"path": "/dev/vdb"}}
        ),
    ),
    ("Proxy without a source", _set(DISK0, {"name": "root", "size": "1Mi", "mode": "Proxy"})),
]


@pytest.mark.parametrize(("edge", "mutate"), ENGINE_EDGES, ids=[e[0] for e in ENGINE_EDGES])
def test_the_crd_and_the_engine_draw_the_same_line(edge: str, mutate: Mutation) -> None:
    doc = _example(VPG, "shop")
    mutate(doc)
    admission = crdvalidate.admit(CRDS[VPG], doc)
    try:
        VpgSpec.from_resource(admission.object)
    except SpecError as exc:
        engine_error: str | None = str(exc)
    else:
        engine_error = None
    crd_error = "; ".join(str(e) for e in admission.errors) or None
    assert (crd_error is None) == (engine_error is None), (
        f"{edge}: CRD says {crd_error or 'ok'}, engine says {engine_error or 'ok'}"
    )
