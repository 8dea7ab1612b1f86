"""Operator benchmark: time to the first durable checkpoint, and status-update load.

Runs the API server emulator (tests/k8s/apiserver.py) in this process and the
operator (``ebbtide_operator.Controller`` under ``kopf.operator``) in a child
process, so that the child's CPU seconds and peak RSS are the operator's own.
Storage is a ``file://`` account in a temporary directory.

1. **First checkpoint**: ``kubectl apply`` of a VPG (checkpointInterval 5s),
   then poll until ``status.lastCheckpoint`` appears; repeated ``--latency-runs``
   times, one VPG at a time.
2. **Load**: ``--vpgs`` VPGs (default 100, created by direct POSTs: kubectl
   apply of that many is slow on the emulator) on one operator; once all
   report a checkpoint and one refresh interval passed, count the API requests
   the emulator receives during ``--seconds`` (default 60; watch streams
   counted when opened), and the operator's CPU seconds in that window and
   its peak RSS.

Prints a table and writes bench/results/operator.json::

    .venv/bin/python bench/operator.py            # about 5 minutes
    .venv/bin/python bench/operator.py --quick    # 20 VPGs, 20 s window, about 1 minute
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import _common

_common.ensure_repo_on_path()

NAMESPACE = "bench"


# --- the operator, in the child ------------------------------------------------------


async def _run_operator(args: argparse.Namespace) -> dict[str, Any]:
    import kopf

    import ebbtide_operator

    config = ebbtide_operator.OperatorConfig(
        pod_name="bench",
        status_tick_seconds=args.tick,
        status_refresh_seconds=args.refresh,
    )
    controller = ebbtide_operator.Controller(config)
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=args.server)

    controller.register(registry)
    await kopf.operator(
        registry=registry,
        settings=ebbtide_operator.settings(),
        clusterwide=False,
        namespaces=[NAMESPACE],
        standalone=True,
    )
    return {"status_patches_decided": controller.status_patches()}


def operator_phase(args: argparse.Namespace) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    result = asyncio.run(_run_operator(args))
    usage = os.times()
    result.update(
        cpu_seconds=usage.user + usage.system,
        peak_rss_bytes=_common.peak_rss(),
    )
    _common.write_result(pathlib.Path(args.result), result)


# --- the parent ----------------------------------------------------------------------


def _vpg(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "ebbtide.io/v1alpha1",
        "kind": "VirtualProtectionGroup",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "storageAccountRef": {"name": "local"},
            "checkpointInterval": "5s",
            "targetRpo": "1m",
            "vms": [{"name": "web", "disks": [{"name": "root", "size": "64Mi"}]}],
        },
    }


async def _kubectl(kubeconfig: pathlib.Path, *args: str) -> str:
    kubectl = pathlib.Path(sys.executable).parent / "kubectl"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "HOME": str(kubeconfig.parent)}
    process = await asyncio.create_subprocess_exec(
        str(kubectl), *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await process.communicate()
    if process.returncode:
        raise _common.BenchError(f"kubectl {' '.join(args)}: {err.decode()}")
    return out.decode()


async def _apply(kubeconfig: pathlib.Path, docs: list[dict[str, Any]]) -> None:
    path = kubeconfig.parent / f"apply-{time.monotonic_ns()}.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    await _kubectl(kubeconfig, "apply", "--validate=false", "-f", str(path))


async def _checkpointed(server: Any, names: list[str]) -> set[str]:
    from tests.k8s import apiserver as emulation

    resource = emulation.Resource("ebbtide.io", "v1alpha1", "virtualprotectiongroups")
    wanted = set(names)

    def read(emulator: Any) -> set[str]:  # one pass: a lookup per name is slow in kmock
        return {
            name
            for (kind, namespace, name), obj in emulator.objects.items()
            if kind == resource
            and namespace == NAMESPACE
            and name in wanted
            and (obj.raw.get("status") or {}).get("lastCheckpoint")
        }

    found: set[str] = await server.inspect(read)
    return found


async def _wait_checkpointed(
    server: Any,
    names: list[str],
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.02,
) -> float:
    started = time.monotonic()
    while len(await _checkpointed(server, names)) < len(names):
        if time.monotonic() - started > timeout:
            raise _common.BenchError(f"VPGs without a checkpoint after {timeout:g} s")
        await asyncio.sleep(interval)
    return time.monotonic() - started


async def _create(url: str, docs: list[dict[str, Any]]) -> None:
    """POST the objects directly: kubectl apply of 100 objects is slow on the emulator."""
    import aiohttp

    base = f"{url}/apis/ebbtide.io/v1alpha1/namespaces/{NAMESPACE}/virtualprotectiongroups"
    async with aiohttp.ClientSession() as http:
        for doc in docs:
            async with http.post(base, json=doc) as response:
                if response.status != 201:
                    raise _common.BenchError(f"creating a VPG: {await response.text()}")


def _requests(emulator: Any) -> list[tuple[str, str]]:
    """(method, what) of every request so far; watches are "WATCH"."""
    seen = []
    for request in emulator:
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        if request.params.get("watch") in ("true", "1"):
            method = "WATCH"
        what = request.subresource or (request.resource.plural if request.resource else "")
        seen.append((method.upper(), str(what)))
    return seen


async def parent(args: argparse.Namespace) -> dict[str, Any]:
    from tests.k8s import apiserver as emulation

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench-operator-"))
    account = work / "account"
    account.mkdir()
    result_path = work / "operator.json"
    async with emulation.serve() as server:
        kubeconfig = work / "kubeconfig"
        kubeconfig.write_text(json.dumps(server.kubeconfig(namespace=NAMESPACE)))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--phase",
            "operator",
            "--result",
            str(result_path),
            "--server",
            server.url,
            "--tick",
            str(args.tick),
            "--refresh",
            str(args.refresh),
        )
        try:
            await _apply(
                kubeconfig,
                [
                    {
                        "apiVersion": "ebbtide.io/v1alpha1",
                        "kind": "StorageAccount",
                        "metadata": {"name": "local", "namespace": NAMESPACE},
                        "spec": {"url": account.as_uri()},
                    }
                ],
            )
            latencies = []
            for run in range(args.latency_runs):
                name = f"latency-{run}"
                started = time.monotonic()
                await _apply(kubeconfig, [_vpg(name)])
                await _wait_checkpointed(server, [name], timeout=60)
                latencies.append(time.monotonic() - started)

            names = [f"load-{i:03d}" for i in range(args.vpgs)]
            await _create(server.url, [_vpg(name) for name in names])
            all_ready = await _wait_checkpointed(server, names, timeout=300, interval=0.5)
            await asyncio.sleep(args.refresh)  # past the first routine refresh of every VPG

            before = len(await server.inspect(_requests))
            cpu_before = _common.process_cpu_seconds(child.pid)
            window_start = time.monotonic()
            await asyncio.sleep(args.seconds)
            window = time.monotonic() - window_start
            cpu = _common.process_cpu_seconds(child.pid) - cpu_before
            in_window = (await server.inspect(_requests))[before:]
        finally:
            child.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.wait(), timeout=120)
    operator = json.loads(result_path.read_text())
    kinds = collections.Counter(f"{method} {what}" for method, what in in_window)
    return {
        "machine": _common.machine(),
        "settings": {
            "vpgs": args.vpgs,
            "window_seconds": round(window, 1),
            "status_tick_seconds": args.tick,
            "status_refresh_seconds": args.refresh,
            "checkpoint_interval_seconds": 5,
        },
        "first_checkpoint_seconds": {
            "runs": [round(x, 2) for x in latencies],
            "median": round(statistics.median(latencies), 2),
        },
        "load": {
            "all_vpgs_checkpointed_seconds": round(all_ready, 1),
            "api_requests": len(in_window),
            "api_requests_per_minute": round(len(in_window) * 60 / window, 1),
            "api_requests_by_kind": dict(kinds.most_common()),
            "operator_cpu_seconds": round(cpu, 2),
            "operator_cpu_share": round(cpu / window, 3),
            "operator_peak_rss_mib": round(operator["peak_rss_bytes"] / _common.MiB, 1),
        },
    }


def print_table(data: dict[str, Any]) -> None:
    load, first = data["load"], data["first_checkpoint_seconds"]
    settings = data["settings"]
    rows = [
        ("kubectl apply -> first checkpoint in status (median)", f"{first['median']:.2f} s"),
        ("  runs", ", ".join(f"{x:.2f}" for x in first["runs"])),
        (
            f"{settings['vpgs']} VPGs: all checkpointed after",
            f"{load['all_vpgs_checkpointed_seconds']} s",
        ),
        (f"API requests in {settings['window_seconds']} s", str(load["api_requests"])),
        ("API requests per minute", str(load["api_requests_per_minute"])),
        ("  by kind", ", ".join(f"{k}: {v}" for k, v in load["api_requests_by_kind"].items())),
        (
            "operator CPU seconds in the window",
            f"{load['operator_cpu_seconds']}"
            f" ({load['operator_cpu_share'] * 100:.1f} % of one core)",
        ),
        ("operator peak RSS", f"{load['operator_peak_rss_mib']} MiB"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["operator"])
    parser.add_argument("--result")
    parser.add_argument("--server")
    parser.add_argument("--vpgs", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--latency-runs", type=int, default=5)
    parser.add_argument("--tick", type=float, default=2.0)
    parser.add_argument("--refresh", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.phase == "operator":
        operator_phase(args)
        return
    if args.quick:
        args.vpgs, args.seconds, args.latency_runs = 20, 20.0, 3
    data = asyncio.run(parent(args))
    print_table(data)
    _common.RESULTS.mkdir(parents=True, exist_ok=True)
    _common.write_result(_common.RESULTS / "operator.json", data)


if __name__ == "__main__":
    main()
