"""Render and lint charts/ebbtide with the Helm library itself (helm-python-sdk).

helm-python-sdk wraps Helm's Go SDK (v4) compiled into the wheel, so
``render`` is exactly ``helm template`` and ``lint`` is ``helm lint``, with no
helm binary, cluster or network. This module adds what the tests share: the
rendered manifests parsed into objects, the named variants of values the
tests render, and the operator's own argument parser (to compare flags with).
"""

from __future__ import annotations

import argparse
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any
from unittest import mock

import helm_python as helm
import yaml

from ebbtide_operator import _main

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ebbtide"
RELEASE, NAMESPACE = "ebbtide", "ebbtide-system"
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion; the CRDs' CEL needs it).
KUBE_VERSION = "1.30"

#: Values the tests render besides the defaults, by name.
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "namespaced": {"watchNamespaces": ["shop", "finance"]},
    "pvc": {
        "stateDir": {
            "type": "persistentVolumeClaim",
            "persistentVolumeClaim": {"size": "20Gi", "storageClassName": "fast"},
        }
    },
    "existing-claim": {
        "stateDir": {
            "type": "persistentVolumeClaim",
            "persistentVolumeClaim": {"existingClaim": "ebbtide-state-old"},
        }
    },
    "service-monitor": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
    "minimal": {
        "metrics": {"enabled": False},
        "liveness": {"enabled": False},
        "verbose": True,
        "serviceAccount": {"create": False, "name": "operator"},
        "rbac": {"create": False},
        "endpoint": {"ports": {"first": 20000, "count": 1}, "advertise": "nbd.example.test"},
        "jobImage": "registry.example.test/ebbtide-restore:1",
        "image": {"tag": "dev"},
    },
    "everything": {
        "watchNamespaces": ["shop"],
        "statusRefreshSeconds": 2.5,
        "stateDir": {"path": "/data/ebbtide", "sizeLimit": "5Gi"},
        "podAnnotations": {"example.test/owner": "storage"},
        "podLabels": {"tier": "backup"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "backup"}],
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]}
                    ]
                }
            }
        },
        "imagePullSecrets": [{"name": "pull"}],
        "priorityClassName": "system-cluster-critical",
        "service": {"type": "LoadBalancer", "annotations": {"example.test/lb": "internal"}},
        "extraVolumes": [{"name": "disks", "hostPath": {"path": "/dev/disk/by-id"}}],
        "extraVolumeMounts": [{"name": "disks", "mountPath": "/disks", "readOnly": True}],
    },
}


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, str]:
    """``helm template``: template path → rendered text (NOTES.txt included)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(dict(values or {}), name=release, namespace=namespace, is_install=True)


def objects(rendered: Mapping[str, str]) -> list[dict[str, Any]]:
    """The Kubernetes objects of a rendering (NOTES.txt and empty documents left out)."""
    found: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        found.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return found


def manifests(values: Mapping[str, Any] | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    return objects(render(values, **kwargs))


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``) in ``objs``."""
    matches = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator container of the Deployment."""
    pod = one(objs, "Deployment")["spec"]["template"]["spec"]
    (found,) = pod["containers"]
    assert isinstance(found, dict)
    return found


def lint(values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``helm lint --strict`` against the oldest supported Kubernetes."""
    return helm.lint(
        CHART,
        dict(values) if values is not None else None,
        strict=True,
        namespace=NAMESPACE,
        kube_version=f"v{KUBE_VERSION}.0",
    )


def default_values() -> dict[str, Any]:
    with helm.Chart.load(CHART) as chart:
        return chart.values


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__("parser captured")
        self.parser = parser


def operator_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m ebbtide_operator`` (``_main.parse_args`` builds it)."""

    def capture(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            _main.parse_args([])
        except _Captured as captured:
            return captured.parser
    raise AssertionError("ebbtide_operator._main.parse_args built no ArgumentParser")


def long_options(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """Each option's long name (``--metrics-port``) and its action; help left out."""
    for action in parser._actions:  # argparse has no public list of its actions
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        yield max(action.option_strings, key=len), action
