"""What the operator keeps in memory, and the status helpers every handler uses.

:class:`State` holds one engine runtime per VirtualProtectionGroup
(``(namespace, name)`` → :class:`Protection`) and one task per running
Recovery (→ :class:`RecoveryJob`); nothing else. Everything in it is rebuilt
at start from the API (Kopf's resume handlers) and the bucket (the runtime
reloads the index when it opens).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
from collections.abc import Mapping
from typing import Any, Protocol

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _vpgstatus

GROUP, VERSION = "ebbtide.io", "v1alpha1"
VPGS = (GROUP, VERSION, "virtualprotectiongroups")
ACCOUNTS = (GROUP, VERSION, "storageaccounts")
CHECKPOINTS = (GROUP, VERSION, "checkpoints")
RECOVERIES = (GROUP, VERSION, "recoveries")
SECRETS = ("", "v1", "secrets")
FINALIZER = "ebbtide.io/protection"

Key = tuple[str, str]  # (namespace, name)


class EndpointHook(Protocol):
    """Where the NBD endpoint attaches to a VPG's runtime (``_endpoints.Endpoints``).

    ``attach`` is called once the runtime is open (and again after every
    reopen on a spec or StorageAccount change); ``detach`` before it closes;
    ``abort`` only to simulate a crash. ``attach`` raises
    ``_endpoints.EndpointProblem`` when the VPG cannot be served now. The
    endpoint then turns NBD writes into ``runtime.write(...)``; ``status``
    feeds the VPG's status and the metrics (None while not served).
    """

    async def attach(
        self, namespace: str, name: str, runtime: ebbtide_engine.VpgRuntime
    ) -> None: ...

    async def detach(self, namespace: str, name: str) -> None: ...

    async def abort(self, namespace: str, name: str) -> None: ...

    def status(self, namespace: str, name: str) -> ebbtide_engine.EndpointStatus | None: ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class OperatorConfig:
    """How the operator behaves; the defaults suit production."""

    #: This pod's name: part of every writer id, "operator/<pod>/<namespace>/<vpg>".
    pod_name: str = dataclasses.field(
        default_factory=lambda: os.environ.get("POD_NAME", "ebbtide-operator")
    )
    #: How often the status timers look at the runtimes (cheap: no API call unless needed).
    status_tick_seconds: float = 2.0
    #: The longest a routine change (RPO, journal bytes, lastCheckpoint) waits to be written.
    status_refresh_seconds: float = 30.0
    #: Delay before a handler retries after a problem someone has to fix (missing Secret...).
    retry_delay_seconds: float = 10.0
    #: How many times a Checkpoint waits ``checkpoint_wait_seconds`` for its VPG to protect.
    checkpoint_wait_retries: int = 15
    checkpoint_wait_seconds: float = 2.0
    lease_seconds: float = 15.0
    #: Where VPG NBD endpoints listen (``--endpoint-address``; the Helm chart passes 0.0.0.0).
    endpoint_address: str = "127.0.0.1"
    #: The host name in the NBD URLs of status (``--endpoint-advertise``; None: the address).
    endpoint_advertise: str | None = None
    #: Ports for NBD servers, low and high inclusive, one per VPG (``--endpoint-ports``).
    endpoint_ports: tuple[int, int] = (10809, 10872)
    #: Dirty maps, mirror replicas, spill files (``--state-dir``): ``<dir>/<namespace>/<vpg>/``.
    state_dir: str = "/var/lib/ebbtide"
    #: The container image of restore Jobs (a PersistentVolumeClaims target, ``--job-image``).
    job_image: str = "ebbtide:0.1.0"
    #: The endpoint serving every VPG; ``python -m ebbtide_operator`` sets an
    #: ``_endpoints.Endpoints`` built from the fields above. None: no endpoint.
    endpoint: EndpointHook | None = None


@dataclasses.dataclass(slots=True)
class Protection:
    """One protected VPG: its spec, store and runtime, and what was last written to status."""

    namespace: str
    name: str
    spec: ebbtide_engine.VpgSpec
    store: ebbtide_engine.ObjectStore
    runtime: ebbtide_engine.VpgRuntime
    generation: int | None
    publisher: _vpgstatus.Publisher
    checkpoints: int = 0
    #: The StorageAccount as resolved when the runtime opened (a change reopens the runtime).
    account: _accounts.ResolvedAccount | None = None
    #: Why the endpoint is not serving (reason, message), and when to try again (monotonic).
    endpoint_problem: tuple[str, str] | None = None
    endpoint_retry_at: float = 0.0
    #: The Recovery type running against this VPG ("FailoverTest", "Failover", "Move"), if any.
    operation: str | None = None
    #: What the VPG's ``OperationRunning`` condition says about it (names the Recovery).
    operation_message: str = ""


@dataclasses.dataclass(slots=True)
class RecoveryJob:
    """A Recovery copying data in this process; the Recovery timer copies its progress to status."""

    namespace: str
    name: str
    vpg: str
    task: asyncio.Task[Any]
    bytes_done: int = 0
    bytes_total: int = 0
    published_percent: int = -1

    @property
    def ratio(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0


def writer_id(pod_name: str, namespace: str, name: str) -> str:
    """The runtime's writer id: a restarted pod of the same name recognises its own lease."""
    return f"operator/{pod_name}/{namespace}/{name}"


class State:
    """The runtimes and recovery tasks of one operator process."""

    def __init__(self, config: OperatorConfig) -> None:
        self.config = config
        self.vpgs: dict[Key, Protection] = {}
        self.jobs: dict[Key, RecoveryJob] = {}
        self._locks: dict[Key, asyncio.Lock] = {}
        #: VPGs whose runtime closed for a StorageAccount change and did not reopen yet:
        #: the spec and generation to reopen with; the status timer retries.
        self.reopen: dict[Key, tuple[ebbtide_engine.VpgSpec, int | None]] = {}

    @property
    def retry_delay(self) -> float:
        return self.config.retry_delay_seconds

    def lock(self, key: Key) -> asyncio.Lock:
        """Serialises opening, reopening and closing one VPG's runtime."""
        return self._locks.setdefault(key, asyncio.Lock())


def write_status(
    patch: kopf.Patch,
    status: Mapping[str, Any],
    generation: int | None,
    *,
    phase: str,
    message: str,
    conditions: list[_conditions.Condition],
) -> None:
    patch.status["phase"] = phase
    patch.status["message"] = message
    if generation is not None:
        patch.status["observedGeneration"] = generation
    patch.status["conditions"] = _conditions.merge(
        status.get("conditions"), conditions, generation=generation
    )


def fail(
    body: kopf.Body,
    patch: kopf.Patch,
    status: Mapping[str, Any],
    generation: int | None,
    *,
    condition: str,
    reason: str,
    message: str,
) -> None:
    """Phase ``Failed``, ``condition`` False with ``reason``/``message``, and a Warning event."""
    write_status(
        patch,
        status,
        generation,
        phase="Failed",
        message=message,
        conditions=[_conditions.Condition(condition, "False", reason, message)],
    )
    kopf.warn(body, reason=reason, message=message)


def problem(exc: Exception) -> tuple[str, str]:
    """(reason, message) for a condition and an event; never carries credentials."""
    if isinstance(exc, _accounts.AccountProblem):
        return exc.reason, exc.message
    reason: dict[type[Exception], str] = {
        ebbtide_engine.BucketNotFound: "BucketNotFound",
        ebbtide_engine.AccessDenied: "AccessDenied",
        ebbtide_engine.StorageUnavailable: "StorageUnavailable",
        ebbtide_engine.FencedError: "WriterLeaseHeld",
    }
    return reason.get(type(exc), type(exc).__name__), str(exc)


def parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        raise ebbtide_engine.InvalidRequest(f"{value!r} is not an RFC 3339 time") from None


def warn_once(
    body: kopf.Body, status: Mapping[str, Any], condition: str, reason: str, message: str
) -> None:
    """Post a Warning event unless the stored ``condition`` already says exactly this.

    Handlers that retry every few seconds (a missing Secret, a bucket down) would
    otherwise post one event per attempt.
    """
    for stored in status.get("conditions") or ():
        if stored.get("type") == condition and (stored.get("reason"), stored.get("message")) == (
            reason,
            message,
        ):
            return
    kopf.warn(body, reason=reason, message=message)
