"""The chart's RBAC grants what the operator uses, and nothing else.

What the operator uses is read from its source, not from a list kept by
hand: every ``(group, version, plural)`` tuple (``_state.VPGS``...), every
resource named in a ``kopf.on.*``/``kopf.index``/``kopf.timer``/``kopf.daemon``
call and every ``/api/...`` or ``/apis/...`` path in
``operator/ebbtide_operator/*.py``. Kopf itself adds CRDs (discovery), events
(``kopf.info``/``kopf.warn``), the ``/status`` subresource of the kinds it
patches, and namespaces when it serves a list of them. A resource the code
starts to use without a rule fails here; so does a rule nothing uses.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from . import chart

SOURCES = chart.ROOT / "operator" / "ebbtide_operator"
_VERSION = re.compile(r"^v\d+((alpha|beta)\d+)?$")
_PATH = re.compile(r"/apis?/(?:([a-z0-9.-]+)/)?(v\d+\w*)/(?:namespaces/[^/]+/)?([a-z]+)")
_KOPF_WATCHERS = {"index", "timer", "daemon"}  # kopf.<x>(...) that list and watch a resource
CLUSTER_SCOPED = {("apiextensions.k8s.io", "customresourcedefinitions"), ("", "namespaces")}

#: Built-in resources the operator may name in an API call (``api.create("jobs", ...)``),
#: with their API groups. Naming one missing here fails the scanner's own test.
BUILTIN_PLURALS = {
    "pods": "",
    "secrets": "",
    "configmaps": "",
    "services": "",
    "serviceaccounts": "",
    "persistentvolumeclaims": "",
    "persistentvolumes": "",
    "namespaces": "",
    "events": "",
    "jobs": "batch",
    "cronjobs": "batch",
    "deployments": "apps",
    "statefulsets": "apps",
    "daemonsets": "apps",
    "leases": "coordination.k8s.io",
}
#: Method names of API calls, and the RBAC verb each needs.
_METHOD_VERBS = {
    "create": "create",
    "post": "create",
    "get": "get",
    "list": "list",
    "watch": "watch",
    "patch": "patch",
    "put": "update",
    "update": "update",
    "replace": "update",
    "delete": "delete",
}


def _crd_plurals() -> dict[str, tuple[str, str]]:
    """Kind -> (group, plural) of our CRDs."""
    found = {}
    for path in (chart.ROOT / "crds").glob("*.yaml"):
        spec = yaml.safe_load(path.read_text())["spec"]
        found[spec["names"]["kind"]] = (spec["group"], spec["names"]["plural"])
    return found


@dataclasses.dataclass(frozen=True)
class Use:
    group: str
    resource: str
    verbs: frozenset[str]
    where: str


def _constant_strings(
    nodes: list[ast.expr], strings: dict[str, str] | None = None
) -> list[str] | None:
    """The values of string literals, or of names bound to one (``GROUP``), else None."""
    values = []
    for node in nodes:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            values.append(node.value)
        elif isinstance(node, ast.Name) and strings and node.id in strings:
            values.append(strings[node.id])
        else:
            return None
    return values or None


def _string_constants(trees: list[ast.Module]) -> dict[str, str]:
    """``GROUP, VERSION = "ebbtide.io", "v1alpha1"`` and ``NAME = "..."`` at module level."""
    strings: dict[str, str] = {}
    for tree in trees:
        for node in tree.body:
            if not isinstance(node, ast.Assign):
                continue
            for target in node.targets:
                names = target.elts if isinstance(target, ast.Tuple) else [target]
                values = node.value.elts if isinstance(node.value, ast.Tuple) else [node.value]
                for name, value in zip(names, values, strict=False):
                    if (
                        isinstance(name, ast.Name)
                        and isinstance(value, ast.Constant)
                        and isinstance(value.value, str)
                    ):
                        strings[name.id] = value.value
    return strings


def _kopf_call(node: ast.Call) -> str | None:
    """'on.create', 'index', ... for kopf.on.create(...), on.create(...), kopf.index(...)."""
    name = ast.unparse(node.func)
    for prefix in ("kopf.on.", "on."):
        if name.startswith(prefix):
            return "on"
    return name.removeprefix("kopf.") if name.startswith("kopf.") else None


def _resource_constants(
    trees: list[ast.Module], strings: dict[str, str]
) -> dict[str, tuple[str, str]]:
    """NAME -> (group, plural) for ``NAME = ("group", "v1", "plural")`` anywhere in the package."""
    constants: dict[str, tuple[str, str]] = {}
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                parts = _constant_strings(node.value.elts, strings)
                if parts and len(parts) == 3 and _VERSION.match(parts[1]):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            constants[target.id] = (parts[0], parts[2])
    return constants


def _aliases(tree: ast.Module, constants: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    """Local names bound to a constant: ``on, vpgs = kopf.on, _state.VPGS`` makes ``vpgs``."""
    found = dict(constants)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assign):
            continue
        for target in node.targets:
            pairs = (
                zip(target.elts, node.value.elts, strict=False)
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                else [(target, node.value)]
            )
            for name, value in pairs:
                source = ast.unparse(value).rsplit(".", 1)[-1]
                if isinstance(name, ast.Name) and source in constants:
                    found[name.id] = constants[source]
    return found


def uses_in_source() -> Iterator[Use]:
    """Every resource the operator's code refers to, with the verbs the reference implies."""
    files = sorted(SOURCES.glob("*.py"))
    trees = [ast.parse(path.read_text(), filename=str(path)) for path in files]
    strings = _string_constants(trees)
    constants = _resource_constants(trees, strings)
    handled: set[tuple[str, str]] = set()
    for path, tree in zip(files, trees, strict=True):
        names = _aliases(tree, constants)
        for node in ast.walk(tree):
            where = f"{path.name}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Tuple):
                parts = _constant_strings(node.elts, strings)
                if parts and len(parts) == 3 and _VERSION.match(parts[1]):
                    yield Use(parts[0], parts[2], frozenset({"get"}), where)
            elif isinstance(node, ast.Call) and (kind := _kopf_call(node)):
                if kind != "on" and kind not in _KOPF_WATCHERS:
                    continue
                writes = kind in ("on", "timer", "daemon")  # handlers patch what they handle
                verbs = frozenset({"list", "watch", "patch"} if writes else {"list", "watch"})
                for resource in _call_resources(node, names):
                    yield Use(*resource, verbs, where)
                    if writes:
                        handled.add(resource)
            elif isinstance(node, ast.Call) and (call := _api_call(node)):
                plural, verb = call
                yield Use(BUILTIN_PLURALS[plural], plural, frozenset({verb}), where)
            elif isinstance(node, ast.Dict) and (owner := _blocking_owner(node)):
                # blockOwnerDeletion needs `update` on the owner's finalizers where the
                # OwnerReferencesPermissionEnforcement admission plugin is on.
                group, plural = _crd_plurals()[owner]
                yield Use(group, f"{plural}/finalizers", frozenset({"update"}), where)
            elif isinstance(node, ast.Constant | ast.JoinedStr):
                for group, _, plural in _PATH.findall(ast.unparse(node)):
                    yield Use(group or "", plural, frozenset({"get"}), where)
    for group, plural in sorted(handled):  # Kopf writes status through /status
        if group == "ebbtide.io":
            yield Use(group, f"{plural}/status", frozenset({"patch"}), "kopf: status")


def _api_call(node: ast.Call) -> tuple[str, str] | None:
    """(plural, verb) of ``api.create("jobs", ...)`` or ``kube.patch(self._url("pods", n))``."""
    if not isinstance(node.func, ast.Attribute) or node.func.attr not in _METHOD_VERBS:
        return None
    first = node.args[0] if node.args else None
    if isinstance(first, ast.Call) and first.args:  # a URL built from the plural
        first = first.args[0]
    if isinstance(first, ast.Constant) and first.value in BUILTIN_PLURALS:
        return first.value, _METHOD_VERBS[node.func.attr]
    return None


def _blocking_owner(node: ast.Dict) -> str | None:
    """The kind of an ownerReference literal with ``blockOwnerDeletion: True``."""
    fields = {
        k.value: v
        for k, v in zip(node.keys, node.values, strict=True)
        if isinstance(k, ast.Constant) and isinstance(k.value, str)
    }
    block, kind = fields.get("blockOwnerDeletion"), fields.get("kind")
    if isinstance(block, ast.Constant) and block.value is True and isinstance(kind, ast.Constant):
        return str(kind.value)
    return None


def _call_resources(
    node: ast.Call, constants: dict[str, tuple[str, str]]
) -> Iterator[tuple[str, str]]:
    for arg in node.args:
        if isinstance(arg, ast.Starred):  # kopf.on.create(*_state.VPGS, ...)
            name = ast.unparse(arg.value).rsplit(".", 1)[-1]
            if name in constants:
                yield constants[name]
    parts = _constant_strings([a for a in node.args if isinstance(a, ast.Constant)])
    if parts:  # kopf.on.create("batch", "v1", "jobs") or ("jobs",) or ("batch/v1", "jobs")
        group = parts[0] if len(parts) == 3 else parts[0].split("/")[0] if len(parts) == 2 else ""
        yield (group if group != "v1" else "", parts[-1])


KOPF_ITSELF = [
    Use("apiextensions.k8s.io", "customresourcedefinitions", frozenset({"list", "watch"}), "kopf"),
    Use("", "events", frozenset({"create"}), "kopf.info/kopf.warn"),
    Use("events.k8s.io", "events", frozenset({"create"}), "events, newer API"),
]
KOPF_NAMESPACES = Use("", "namespaces", frozenset({"list", "watch"}), "kopf: --namespace")


def grants(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    granted: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((group, resource), set()).update(rule["verbs"])
    return granted


def _rules(objs: list[dict[str, Any]], kind: str, namespace: str | None = None) -> list[Any]:
    return [
        rule
        for o in objs
        if o["kind"] == kind and o["metadata"].get("namespace") == namespace
        for rule in o["rules"]
    ]


def test_the_scanner_finds_what_the_operator_is_known_to_use() -> None:
    found = {(u.group, u.resource) for u in uses_in_source()}
    assert {
        ("ebbtide.io", "virtualprotectiongroups"),
        ("ebbtide.io", "storageaccounts"),
        ("ebbtide.io", "checkpoints"),
        ("ebbtide.io", "recoveries"),
        ("ebbtide.io", "virtualprotectiongroups/status"),
        ("", "secrets"),
    } <= found


def test_the_scanner_reads_call_sites_and_api_paths() -> None:
    source = """
VPGS = ("ebbtide.io", "v1alpha1", "virtualprotectiongroups")
kopf.on.create(*_state.VPGS, registry=r)(f)
kopf.on.delete("batch", "v1", "jobs")(f)
kopf.index("pods")(f)
url = f"/api/v1/namespaces/{ns}/persistentvolumeclaims/{name}"
await api.create("jobs", manifest)
await kube.patch(self._url("persistentvolumeclaims", name), payload={})
status.get("conditions")
owner = {"kind": "Recovery", "controller": True, "blockOwnerDeletion": True}
"""
    tree = ast.parse(source)
    constants: dict[str, tuple[str, str]] = {"VPGS": ("ebbtide.io", "virtualprotectiongroups")}
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _kopf_call(n)]
    resources = [r for call in calls for r in _call_resources(call, constants)]
    assert resources == [("ebbtide.io", "virtualprotectiongroups"), ("batch", "jobs"), ("", "pods")]
    assert _PATH.findall(source)[-1] == ("", "v1", "persistentvolumeclaims")
    api_calls = [c for n in ast.walk(tree) if isinstance(n, ast.Call) and (c := _api_call(n))]
    assert api_calls == [("jobs", "create"), ("persistentvolumeclaims", "patch")]
    owners = [o for n in ast.walk(tree) if isinstance(n, ast.Dict) and (o := _blocking_owner(n))]
    assert owners == ["Recovery"]
    assert _crd_plurals()["Recovery"] == ("ebbtide.io", "recoveries")


@pytest.mark.parametrize("variant", ["default", "namespaced"])
def test_rbac_covers_every_resource_the_operator_uses(variant: str) -> None:
    values = chart.VARIANTS[variant]
    objs = chart.manifests(values)
    cluster = grants(_rules(objs, "ClusterRole"))
    needed = [*uses_in_source(), *KOPF_ITSELF]
    if values.get("watchNamespaces"):
        needed.append(KOPF_NAMESPACES)
        scopes = {ns: grants(_rules(objs, "Role", ns)) for ns in values["watchNamespaces"]}
    else:
        scopes = {"(all namespaces)": cluster}
    for use in needed:
        scoped = (use.group, use.resource) in CLUSTER_SCOPED
        for scope, granted in ({"(cluster)": cluster} if scoped else scopes).items():
            have = granted.get((use.group, use.resource), set())
            missing = sorted(use.verbs - have)
            assert not missing, (
                f"{use.where} uses {use.group or 'core'}/{use.resource}: "
                f"the chart's rules in {scope} lack {missing}"
            )


@pytest.mark.parametrize("variant", ["default", "namespaced"])
def test_rbac_grants_nothing_the_operator_does_not_use(variant: str) -> None:
    objs = chart.manifests(chart.VARIANTS[variant])
    used: dict[tuple[str, str], set[str]] = {}
    for use in [*uses_in_source(), *KOPF_ITSELF, KOPF_NAMESPACES]:
        used.setdefault((use.group, use.resource), set()).update(use.verbs)
    kinds = [o for o in objs if o["kind"] in ("ClusterRole", "Role")]
    for role in kinds:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert not {"deletecollection", "escalate", "bind", "impersonate"} & set(rule["verbs"])
            if "update" in rule["verbs"]:  # only ownerReferences' blockOwnerDeletion needs it
                assert all(r.endswith("/finalizers") for r in rule["resources"])
    granted = grants([rule for role in kinds for rule in role["rules"]])
    unused = sorted(set(granted) - set(used))
    assert unused == [], f"rules that nothing in the operator uses: {unused}"
    for key, verbs in granted.items():
        extra = sorted(verbs - used[key])
        assert extra == [], f"{key}: verbs {extra} granted, but nothing uses them"
    # Reading credentials is all the operator does with Secrets.
    assert granted[("", "secrets")] == {"get", "list", "watch"}
    for plural in ("virtualprotectiongroups", "storageaccounts", "checkpoints", "recoveries"):
        assert granted[("ebbtide.io", plural)] == {"get", "list", "watch", "patch"}


def test_the_operator_runs_kopf_standalone_so_no_peering_rules_are_needed() -> None:
    source = (SOURCES / "_main.py").read_text()
    assert "standalone=True" in source, "peering on: grant kopfpeerings (or clusterkopfpeerings)"


def test_docs_list_the_same_rules_as_the_chart() -> None:
    doc = (chart.ROOT / "docs" / "helm.md").read_text()
    block = re.search(r"<!-- rbac -->\n```yaml\n(.*?)```", doc, flags=re.DOTALL)
    assert block, "docs/helm.md has no ```yaml block after <!-- rbac -->"
    documented = grants(yaml.safe_load(block[1]))
    rendered = grants(_rules(chart.manifests(), "ClusterRole"))
    rendered_namespaced = grants(
        _rules(chart.manifests(chart.VARIANTS["namespaced"]), "ClusterRole")
    )
    assert documented == {**rendered, **rendered_namespaced}
