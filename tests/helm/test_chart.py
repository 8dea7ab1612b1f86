"""The chart lints, renders valid Kubernetes objects, refuses bad values, and ships our CRDs.

Rendering and linting go through Helm's own Go code (helm-python-sdk);
every rendered object is checked against the Kubernetes OpenAPI schemas of
the oldest supported release (kubernetes-validate, strict: unknown fields
fail), and the objects are checked against each other (selectors, port names,
volumes, the ServiceAccount).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import tomllib
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from . import chart

VARIANTS = sorted(chart.VARIANTS)


# ---------------------------------------------------------------- metadata, lint, CRDs


def test_chart_metadata_follows_the_package() -> None:
    meta = yaml.safe_load((chart.CHART / "Chart.yaml").read_text())
    project = tomllib.loads((chart.ROOT / "pyproject.toml").read_text())["project"]
    assert meta["apiVersion"] == "v2"
    assert meta["name"] == "ebbtide"
    assert meta["version"] == "0.1.0"
    assert meta["appVersion"] == project["version"], "Chart.yaml appVersion != pyproject version"
    assert meta["kubeVersion"] == f">={chart.KUBE_VERSION}.0-0"


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_strict_finds_nothing(variant: str) -> None:
    report = chart.lint(chart.VARIANTS[variant])
    assert report["errors"] == []
    # Severity 1 is "info" (only "icon is recommended"); strict fails on 2 (warning) and 3.
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert problems == []


def test_helm_lint_reports_a_broken_chart(tmp_path: pathlib.Path) -> None:
    broken = tmp_path / "ebbtide"
    shutil.copytree(chart.CHART, broken)
    (broken / "templates" / "service.yaml").write_text("{{ .Values.nope.deeper }}\n")
    report = helm.lint(broken, strict=True)
    assert report["errors"] or any(m["severity"] == 3 for m in report["messages"])


def test_the_chart_crds_are_byte_identical_copies_of_crds() -> None:
    sources = {p.name: p.read_bytes() for p in (chart.ROOT / "crds").glob("*.yaml")}
    copies = {p.name: p.read_bytes() for p in (chart.CHART / "crds").glob("*.yaml")}
    assert sorted(copies) == sorted(sources), "run scripts/sync-chart-crds"
    stale = [name for name in sources if copies[name] != sources[name]]
    assert stale == [], f"{stale} differ from crds/: run scripts/sync-chart-crds"
    with helm.Chart.load(chart.CHART) as loaded:
        shipped = {pathlib.PurePath(c["filename"]).name for c in loaded.crds}
    assert shipped == set(sources)  # Helm reads them from crds/ (installs them before templates)


def test_sync_chart_crds_copies_changes_and_removes_stale_copies(tmp_path: pathlib.Path) -> None:
    for part in ("scripts/sync-chart-crds", "crds", "charts/ebbtide/crds"):
        source, target = chart.ROOT / part, tmp_path / part
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
    changed = tmp_path / "crds" / "checkpoints.yaml"
    changed.write_bytes(changed.read_bytes() + b"# changed\n")
    (tmp_path / "charts/ebbtide/crds/gone.yaml").write_text("kind: CustomResourceDefinition\n")
    result = subprocess.run(
        [str(tmp_path / "scripts/sync-chart-crds")], capture_output=True, text=True, check=True
    )
    assert "checkpoints.yaml" in result.stdout
    assert "gone.yaml" in result.stdout
    copies = tmp_path / "charts/ebbtide/crds"
    assert sorted(p.name for p in copies.iterdir()) == sorted(
        p.name for p in (tmp_path / "crds").iterdir()
    )
    assert (copies / "checkpoints.yaml").read_bytes() == changed.read_bytes()


def test_the_chart_packages_into_an_archive_that_loads(tmp_path: pathlib.Path) -> None:
    archive = pathlib.Path(helm.package(chart.CHART, destination=tmp_path))
    assert archive.name == "ebbtide-0.1.0.tgz"
    # Helm keeps the whole chart in a release Secret (1 MiB at most, gzipped).
    assert archive.stat().st_size < 256 * 1024
    with helm.Chart.load(archive) as packed:
        assert len(packed.crds) == len(list((chart.ROOT / "crds").glob("*.yaml")))
        assert packed.schema is not None
        assert packed.render(name=chart.RELEASE, namespace=chart.NAMESPACE) == chart.render()


# ---------------------------------------------------------------- rendered objects


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid_for_kubernetes(variant: str) -> None:
    for obj in chart.manifests(chart.VARIANTS[variant]):
        if obj["kind"] == "ServiceMonitor":  # a Prometheus Operator CRD: no schema offline
            _check_service_monitor(obj)
            continue
        for version in (chart.KUBE_VERSION, kubernetes_validate.utils.latest_version()):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(str(p) for p in exc.path)
                pytest.fail(f"{obj['kind']} {obj['metadata']['name']} at {path}: {exc.message}")


def test_the_kubernetes_schemas_catch_what_the_values_schema_leaves_to_kubernetes() -> None:
    # podSecurityContext is passed through as given; a typo in it is Kubernetes' to refuse.
    objs = chart.manifests({"podSecurityContext": {"runAsNonRot": True}})
    with pytest.raises(kubernetes_validate.ValidationError, match="runAsNonRot"):
        kubernetes_validate.validate(chart.one(objs, "Deployment"), chart.KUBE_VERSION, strict=True)


def _check_service_monitor(obj: dict[str, Any]) -> None:
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = obj["spec"]["endpoints"]
    assert endpoint == {
        "port": "metrics",
        "path": "/metrics",
        "interval": "30s",
        "scrapeTimeout": "10s",
    }
    assert obj["spec"]["namespaceSelector"] == {"matchNames": [chart.NAMESPACE]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_objects_refer_to_each_other_correctly(variant: str) -> None:
    values = chart.VARIANTS[variant]
    objs = chart.manifests(values)
    deployment = chart.one(objs, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = chart.container(objs)
    port_names = {p["name"] for p in container.get("ports", [])}

    services = [o for o in objs if o["kind"] == "Service"]
    for service in services:
        assert service["spec"]["selector"] == selector
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names
    monitors = [o for o in objs if o["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= services[0]["metadata"]["labels"].items()
        )
        assert monitor["metadata"]["labels"]["release"] == "prom"

    probe = container.get("livenessProbe")
    if probe:
        assert probe["httpGet"] == {"path": "/healthz", "port": "healthz"}
        assert "healthz" in port_names

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= set(volumes)
    state_dir = values.get("stateDir", {}).get("path", "/var/lib/ebbtide")
    (state,) = [m for m in container["volumeMounts"] if m["mountPath"] == state_dir]
    claims = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
    if values.get("stateDir", {}).get("type") == "persistentVolumeClaim":
        claim_name = volumes[state["name"]]["persistentVolumeClaim"]["claimName"]
        existing = values["stateDir"]["persistentVolumeClaim"].get("existingClaim")
        if existing:
            assert claim_name == existing
            assert claims == []
        else:
            (claim,) = claims
            assert claim["metadata"]["name"] == claim_name
            assert claim["spec"]["resources"]["requests"]["storage"] == "20Gi"
            assert claim["spec"]["storageClassName"] == "fast"
    else:
        assert "emptyDir" in volumes[state["name"]]
        assert claims == []

    account = pod["spec"]["serviceAccountName"]
    accounts = [o["metadata"]["name"] for o in objs if o["kind"] == "ServiceAccount"]
    assert accounts in ([account], [])  # created here, or named and made by someone else
    for binding in (o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": chart.NAMESPACE}
        ]
        ref, namespace = binding["roleRef"], binding["metadata"].get("namespace")
        roles = [
            o
            for o in objs
            if (o["kind"], o["metadata"]["name"]) == (ref["kind"], ref["name"])
            and o["metadata"].get("namespace") == namespace
        ]
        assert len(roles) == 1, f"{binding['kind']} in {namespace} refers to no {ref}"

    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_pod_runs_without_privileges() -> None:
    objs = chart.manifests()
    pod = chart.one(objs, "Deployment")["spec"]["template"]["spec"]
    container = chart.container(objs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] >= 1000
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "hostNetwork" not in pod
    assert "privileged" not in context
    # Unprivileged ports only: nothing needs NET_BIND_SERVICE.
    assert all(p["containerPort"] >= 1024 for p in container["ports"])
    assert container["resources"]["limits"]["memory"] == "1Gi"


def test_default_nbd_ports_match_the_operators_default_range() -> None:
    objs = chart.manifests()
    nbd = [p["port"] for p in chart.one(objs, "Service")["spec"]["ports"] if p["name"] != "metrics"]
    assert nbd == list(range(10809, 10873))
    assert "--endpoint-ports=10809-10872" in chart.container(objs)["args"]


def test_watching_namespaces_gives_a_role_per_namespace_and_no_cluster_wide_access() -> None:
    objs = chart.manifests(chart.VARIANTS["namespaced"])
    roles = {o["metadata"]["namespace"]: o for o in objs if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"] for o in objs if o["kind"] == "RoleBinding"}
    assert set(roles) == bindings == {"shop", "finance"}
    cluster = chart.one(objs, "ClusterRole")
    resources = {r for rule in cluster["rules"] for r in rule["resources"]}
    assert resources == {"customresourcedefinitions", "namespaces"}
    assert {"--namespace=shop", "--namespace=finance"} <= set(chart.container(objs)["args"])


def test_notes_say_how_to_upgrade_the_crds() -> None:
    notes = chart.render()["ebbtide/templates/NOTES.txt"]
    assert "kubectl apply -f charts/ebbtide/crds/" in notes
    assert "every namespace" in notes
    assert "ebbtide.ebbtide-system.svc, ports 10809-10872" in notes
    notes = chart.render(chart.VARIANTS["namespaced"])["ebbtide/templates/NOTES.txt"]
    assert "the namespaces shop, finance" in notes


# ---------------------------------------------------------------- values and their schema


BAD_VALUES = [
    ({"metrics": {"port": "9090"}}, "at '/metrics/port': got string, want integer"),
    ({"metrics": {"prot": 9090}}, "at '/metrics': additional properties 'prot' not allowed"),
    ({"replicas": 2}, "additional properties 'replicas' not allowed"),
    ({"endpoint": {"ports": {"first": 80}}}, "at '/endpoint/ports/first': minimum: got 80"),
    ({"endpoint": {"ports": {"first": 70000}}}, "maximum: got 70,000, want 65,535"),
    ({"endpoint": {"ports": {"count": 0}}}, "at '/endpoint/ports/count': minimum: got 0"),
    ({"endpoint": {"ports": {"count": 500}}}, "at '/endpoint/ports/count': maximum: got 500"),
    ({"endpoint": {"address": "everywhere"}}, "at '/endpoint/address'"),
    ({"watchNamespaces": ["team-*"]}, "at '/watchNamespaces/0': 'team-*' does not match"),
    ({"watchNamespaces": "shop"}, "at '/watchNamespaces': got string, want array"),
    (
        {"stateDir": {"type": "hostPath"}},
        "value must be one of 'emptyDir', 'persistentVolumeClaim'",
    ),
    ({"stateDir": {"path": "relative/dir"}}, "at '/stateDir/path'"),
    ({"image": {"pullPolicy": "Sometimes"}}, "value must be one of 'Always', 'IfNotPresent'"),
    ({"resources": {"requests": {"cpu": "lots"}}}, "at '/resources/requests/cpu'"),
    ({"statusRefreshSeconds": 0}, "at '/statusRefreshSeconds': minimum: got 0"),
    ({"serviceMonitor": {"enabled": "yes"}}, "at '/serviceMonitor/enabled': got string"),
    ({"service": {"type": "ExternalName"}}, "at '/service/type': value must be one of"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_the_values_schema_refuses_bad_values_saying_where(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError) as refused:
        chart.render(values)
    assert message in str(refused.value)
    assert "values don't meet the specifications of the schema" in str(refused.value)


BAD_COMBINATIONS = [
    (
        {"endpoint": {"ports": {"first": 65530, "count": 16}}},
        "endpoint.ports: 16 ports from 65530 end at 65545, past 65535",
    ),
    ({"metrics": {"port": 10810}}, "metrics.port 10810 is inside the NBD port range"),
    ({"liveness": {"port": 10872}}, "liveness.port 10872 is inside the NBD port range"),
    ({"metrics": {"port": 8080}}, "metrics.port and liveness.port are both 8080"),
    (
        {"serviceMonitor": {"enabled": True}, "metrics": {"enabled": False}},
        "serviceMonitor.enabled needs metrics.enabled",
    ),
    (
        {"serviceAccount": {"create": False}},
        "serviceAccount.name is required when serviceAccount.create is false",
    ),
]


@pytest.mark.parametrize(
    ("values", "message"), BAD_COMBINATIONS, ids=[str(v) for v, _ in BAD_COMBINATIONS]
)
def test_inconsistent_values_fail_rendering_with_what_to_change(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        chart.render(values)


def test_a_disabled_endpoint_frees_its_ports() -> None:
    objs = chart.manifests({"endpoint": {"enabled": False}, "metrics": {"port": 10810}})
    assert "--no-endpoint" in chart.container(objs)["args"]
    assert [p["port"] for p in chart.one(objs, "Service")["spec"]["ports"]] == [10810]


def schema_leaves(schema: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """Dotted paths of the values the schema describes, down to free-form maps and lists."""
    leaves: dict[str, dict[str, Any]] = {}
    for key, sub in schema.get("properties", {}).items():
        path = f"{prefix}{key}"
        if "properties" in sub:
            leaves.update(schema_leaves(sub, f"{path}."))
        else:
            leaves[path] = sub
    return leaves


def value_at(values: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        values = values[part]
    return values


def test_values_yaml_sets_every_value_the_schema_knows() -> None:
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    leaves = set(schema_leaves(schema)) - {"global"}
    for path in leaves:
        value_at(values, path)  # KeyError names a value the schema has and values.yaml lacks
    with helm.Chart.load(chart.CHART) as loaded:
        loaded.validate_schema(values)
        assert loaded.schema == schema


def test_docs_helm_md_has_a_row_for_every_value_with_its_default() -> None:
    schema = json.loads((chart.CHART / "values.schema.json").read_text())
    values = yaml.safe_load((chart.CHART / "values.yaml").read_text())
    doc = (chart.ROOT / "docs" / "helm.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Za-z.]+)` \| `([^`]*)` \|", doc, flags=re.MULTILINE))
    leaves = set(schema_leaves(schema)) - {"global"}
    assert sorted(set(rows) - leaves) == [], "docs/helm.md documents values the chart lacks"
    assert sorted(leaves - set(rows)) == [], "values missing from the table in docs/helm.md"
    for path, shown in rows.items():
        default = value_at(values, path)
        assert shown == json.dumps(default, separators=(", ", ": ")), f"default of {path}"


# ---------------------------------------------------------------- the image


def test_the_dockerfile_matches_the_chart() -> None:
    dockerfile = (chart.ROOT / "Dockerfile").read_text()
    values = chart.default_values()
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, flags=re.MULTILINE)
    assert user, "the image must run as a numeric non-root user"
    assert int(user[1]) == values["podSecurityContext"]["runAsUser"]
    assert int(user[2]) == values["podSecurityContext"]["runAsGroup"]
    copied = re.findall(r"^COPY (.+) \S+$", dockerfile, flags=re.MULTILINE)
    ignore = (chart.ROOT / ".dockerignore").read_text().split()
    for source in " ".join(copied).split():
        assert (chart.ROOT / source).exists(), f"the Dockerfile copies {source}, which is missing"
        assert f"!{source}" in ignore, f".dockerignore leaves {source} out of the build context"
    assert "RUN pip install ." in dockerfile
    command = chart.container(chart.manifests())["command"]
    assert command == ["python", "-m", "ebbtide_operator"]
    assert 'CMD ["python", "-m", "ebbtide_operator"]' in dockerfile
