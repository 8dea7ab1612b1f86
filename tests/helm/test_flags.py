"""The operator flags the chart renders are the ones ``python -m ebbtide_operator`` parses.

The container's ``args`` go through the operator's own parser
(``ebbtide_operator._main.parse_args``), so a renamed or removed flag fails
here rather than in a crash-looping pod, and every option the parser has
must be set by the chart (or be listed below with the reason it is not).
"""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from ebbtide_operator import _main

from . import chart

#: Options the chart sets another way, or leaves at the operator's default on purpose.
NOT_FLAGS = {
    "--pod-name": "POD_NAME from the downward API (the operator's default reads it)",
}


def _args(values: dict[str, Any]) -> list[str]:
    args = chart.container(chart.manifests(values))["args"]
    assert isinstance(args, list)
    return [str(a) for a in args]


def _parse(args: list[str]) -> argparse.Namespace:
    try:
        return _main.parse_args(args)
    except SystemExit:  # argparse has printed which flag it refused
        pytest.fail(f"python -m ebbtide_operator refuses the chart's args {args}")


def _expected(variant: dict[str, Any]) -> list[str]:
    """The command line the values mean, written out by hand from the values."""
    import helm_python as helm

    with helm.Chart.load(chart.CHART) as loaded:
        v = loaded.merge_values(variant)
    first, count = v["endpoint"]["ports"]["first"], v["endpoint"]["ports"]["count"]
    image = f"{v['image']['repository']}:{v['image']['tag'] or '0.1.0'}"
    args = [f"--namespace={ns}" for ns in v["watchNamespaces"]]
    args += [
        f"--metrics-port={v['metrics']['port'] if v['metrics']['enabled'] else 0}",
        "--liveness="
        + (f"http://0.0.0.0:{v['liveness']['port']}/healthz" if v["liveness"]["enabled"] else ""),
        f"--status-refresh={v['statusRefreshSeconds']}",
    ]
    if v["endpoint"]["enabled"]:
        args += [
            f"--endpoint-address={v['endpoint']['address']}",
            f"--endpoint-advertise={v['endpoint']['advertise'] or 'ebbtide.ebbtide-system.svc'}",
            f"--endpoint-ports={first}-{first + count - 1}",
        ]
    else:
        args.append("--no-endpoint")
    args.append(f"--state-dir={v['stateDir']['path']}")
    args.append(f"--job-image={v['jobImage'] or image}")
    if v["verbose"]:
        args.append("--verbose")
    return args


@pytest.mark.parametrize("variant", sorted(chart.VARIANTS))
def test_the_rendered_args_parse_to_what_the_values_say(variant: str) -> None:
    values = chart.VARIANTS[variant]
    rendered = _parse(_args(values))
    assert vars(rendered) == vars(_parse(_expected(values)))
    assert rendered.pod_name  # from $POD_NAME in the pod; the default here


def test_the_default_values_give_the_operator_its_cluster_settings() -> None:
    args = _parse(_args({}))
    assert args.namespace == []  # all namespaces: Kopf runs cluster-wide
    assert args.metrics_port == 9090
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.endpoint_address == "0.0.0.0"  # the operator's own default is 127.0.0.1
    assert args.endpoint_advertise == "ebbtide.ebbtide-system.svc"
    assert tuple(args.endpoint_ports) == (10809, 10872)
    assert args.state_dir == "/var/lib/ebbtide"
    assert args.job_image == "ebbtide:0.1.0"  # the operator's own image, at the chart's appVersion
    assert args.verbose is False


def test_turned_off_metrics_and_liveness_reach_the_operator_as_off() -> None:
    args = _parse(_args(chart.VARIANTS["minimal"]))
    assert args.metrics_port == 0  # _main: 0 serves no /metrics
    assert args.liveness == ""  # _main: '' starts no liveness endpoint
    assert args.no_endpoint is False
    assert args.endpoint_advertise == "nbd.example.test"
    assert tuple(args.endpoint_ports) == (20000, 20000)
    assert args.verbose is True


def test_every_operator_option_is_set_by_the_chart() -> None:
    rendered = {a.split("=", 1)[0] for values in chart.VARIANTS.values() for a in _args(values)}
    rendered |= {a.split("=", 1)[0] for a in _args({"endpoint": {"enabled": False}})}
    options = {name for name, _ in chart.long_options(chart.operator_parser())}
    missing = sorted(options - rendered - set(NOT_FLAGS))
    assert missing == [], f"the chart never sets {missing}: add values for them (or NOT_FLAGS)"
    assert sorted(rendered - options) == []
    assert set(NOT_FLAGS) <= options, "NOT_FLAGS names an option the operator no longer has"
    env = {e["name"] for e in chart.container(chart.manifests())["env"]}
    assert "POD_NAME" in env
