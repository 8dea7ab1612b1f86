"""``python -m ebbtide_operator``: run the operator (what ``kopf run`` would do, plus metrics)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
from collections.abc import Sequence

import kopf

from ebbtide_operator import _controller, _endpoints, _metrics, _state


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
    parser.add_argument(
        "--endpoint-address",
        default="127.0.0.1",
        help="address the VPGs' NBD endpoints listen on (default 127.0.0.1; in a pod: 0.0.0.0)",
    )
    parser.add_argument(
        "--endpoint-advertise",
        default=None,
        help="host name put in the NBD URLs of VPG status (default: --endpoint-address)",
    )
    parser.add_argument(
        "--endpoint-ports",
        type=_port_range,
        default=(10809, 10872),
        metavar="LOW-HIGH",
        help="ports for the NBD endpoints, one per VPG (default 10809-10872)",
    )
    parser.add_argument(
        "--state-dir",
        default="/var/lib/ebbtide",
        help="local state: dirty-region maps, mirror replicas, spill (default /var/lib/ebbtide)",
    )
    parser.add_argument(
        "--no-endpoint",
        action="store_true",
        help="do not serve NBD endpoints (status then shows no sync state)",
    )
    parser.add_argument(
        "--job-image",
        default="ebbtide:0.1.0",
        help="container image of the restore Jobs that fill PersistentVolumeClaims "
        "(it runs `ebbtide recover`; default ebbtide:0.1.0)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    return parser.parse_args(argv)


def _port_range(text: str) -> tuple[int, int]:
    try:
        return _endpoints.parse_port_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def config_from(args: argparse.Namespace) -> _state.OperatorConfig:
    """The operator's configuration from the command line, with its NBD endpoint hook."""
    config = _state.OperatorConfig(
        pod_name=args.pod_name,
        status_refresh_seconds=args.status_refresh,
        endpoint_address=args.endpoint_address,
        endpoint_advertise=args.endpoint_advertise,
        endpoint_ports=args.endpoint_ports,
        state_dir=args.state_dir,
        job_image=args.job_image,
    )
    if args.no_endpoint:
        return config
    return dataclasses.replace(config, endpoint=_endpoints.Endpoints.from_config(config))


async def run(args: argparse.Namespace) -> None:
    controller = _controller.Controller(config_from(args))
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
