"""Ebbtide's control plane: the Kopf operator (public surface).

The operator turns the custom resources of docs/kubernetes.md into calls to
the engine's public API (``ebbtide_engine``) and writes what happened back
into their ``status``. In a cluster, run ``python -m ebbtide_operator``; in
tests or another program::

    controller = Controller(OperatorConfig(pod_name="test"))
    registry = kopf.OperatorRegistry()
    controller.register(registry)          # plus a @kopf.on.login handler
    await kopf.operator(registry=registry, settings=settings(), ...)
    controller.runtime("default", "shop")  # the VPG's open VpgRuntime

See docs/operator.md.
"""

from ebbtide_operator._accounts import AccountProblem, ResolvedAccount
from ebbtide_operator._controller import Controller, settings
from ebbtide_operator._main import main
from ebbtide_operator._metrics import Collector, registry_for
from ebbtide_operator._metrics import serve as serve_metrics
from ebbtide_operator._state import (
    FINALIZER,
    EndpointHook,
    OperatorConfig,
    Protection,
    RecoveryJob,
    writer_id,
)
from ebbtide_operator._vpgstatus import Publisher, phase

__all__ = [
    "FINALIZER",
    "AccountProblem",
    "Collector",
    "Controller",
    "EndpointHook",
    "OperatorConfig",
    "Protection",
    "Publisher",
    "RecoveryJob",
    "ResolvedAccount",
    "main",
    "phase",
    "registry_for",
    "serve_metrics",
    "settings",
    "writer_id",
]
