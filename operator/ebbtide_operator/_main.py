"""``python -m ebbtide_operator``: run the operator (what ``kopf run`` would do, plus metrics)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Sequence

import kopf

from ebbtide_operator import _controller, _metrics, _state


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ebbtide_operator",
        description="Ebbtide's Kubernetes operator: protects VirtualProtectionGroups.",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch this namespace (repeat for more; glob patterns allowed); default: all",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9090, help="Prometheus /metrics port (0: off)"
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="Kopf's liveness endpoint URL ('' to turn it off)",
    )
    parser.add_argument(
        "--pod-name",
        default=os.environ.get("POD_NAME", "ebbtide-operator"),
        help="this pod's name, part of the writer ids (default: $POD_NAME)",
    )
    parser.add_argument(
        "--status-refresh", type=float, default=30.0, help="seconds between routine status writes"
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> None:
    controller = _controller.Controller(
        _state.OperatorConfig(pod_name=args.pod_name, status_refresh_seconds=args.status_refresh)
    )
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_with_service_account)
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)
    controller.register(registry)
    operator = kopf.operator(
        registry=registry,
        settings=_controller.settings(),
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=args.liveness or None,
    )
    if not args.metrics_port:
        await operator
        return
    async with _metrics.serve(_metrics.registry_for(controller), port=args.metrics_port):
        await operator


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO)
    asyncio.run(run(args))
    return 0
