"""A VPG's ``status`` from its runtime, and when it is worth writing to the API.

:func:`phase` is the one place that decides the VPG's phase; today it takes
the engine's SLA evaluation (``RuntimeStatus.sla``) and falls back to RPO
against ``targetRpo``. :func:`project` builds the whole status except
conditions' times; :class:`Publisher` decides whether a new projection is
worth a PATCH: at once when something a person or a script waits for
changed (phase, a condition, a tagged checkpoint, the first checkpoint, the
generation), otherwise at most every ``refresh_seconds`` — automatic
checkpoints move ``lastCheckpoint`` and the RPO every few seconds, and
writing each one would cost the API server one write per VPG per interval.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import ebbtide_engine
from ebbtide_operator import _conditions

KIND_NAMES = {
    ebbtide_engine.CheckpointKind.AUTOMATIC: "Automatic",
    ebbtide_engine.CheckpointKind.TAGGED: "Tagged",
    ebbtide_engine.CheckpointKind.APPLICATION_CONSISTENT: "ApplicationConsistent",
    ebbtide_engine.CheckpointKind.FAILOVER_TEST: "FailoverTest",
}


#: The VPG phase while a Recovery of that type runs (a FailoverTest leaves the phase alone).
OPERATION_PHASES = {"Failover": "FailingOver", "Move": "Moving"}


def phase(
    runtime: ebbtide_engine.RuntimeStatus,
    spec: ebbtide_engine.VpgSpec,
    operation: str | None = None,
) -> str:
    """The VPG's phase (an enum value of the CRD's status.phase)."""
    if operation in OPERATION_PHASES:
        return OPERATION_PHASES[operation]
    if runtime.state != "protecting":
        return "Error"
    if runtime.sla is not None:
        return runtime.sla.phase
    if runtime.rpo_seconds is None:
        return "Initializing"
    return "MeetingSLA" if runtime.rpo_seconds <= spec.target_rpo else "RPONotMeetingSLA"


def checkpoint_status(checkpoint: ebbtide_engine.Checkpoint) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "id": checkpoint.id,
        "time": _conditions.rfc3339(checkpoint.time),
        "kind": KIND_NAMES[checkpoint.kind],
    }
    if checkpoint.tag:
        entry["tag"] = checkpoint.tag
    return entry


def project(
    runtime: ebbtide_engine.RuntimeStatus,
    spec: ebbtide_engine.VpgSpec,
    *,
    checkpoints: int,
    operation: str | None = None,
    operation_message: str = "",
    endpoint: ebbtide_engine.EndpointStatus | None = None,
    endpoint_enabled: bool = False,
    endpoint_problem: tuple[str, str] | None = None,
) -> tuple[dict[str, Any], list[_conditions.Condition]]:
    """(status fields, conditions) of a protecting VPG, from its runtime's status.

    With an endpoint (``endpoint_enabled``), ``vms[]`` carry the sync state
    and the per-disk NBD URL and progress, and a problem that keeps the
    endpoint from serving makes the phase ``Error`` (``EndpointReady``).
    """
    current = phase(runtime, spec, operation)
    not_served = endpoint_enabled and endpoint is None
    if not_served and runtime.state == "protecting" and current not in OPERATION_PHASES.values():
        current = "Error"
    elif current == "MeetingSLA" and endpoint is not None and not endpoint.synced:
        current = "Syncing"  # a resync or a mirror pass is owed: not every write is journaled
    status: dict[str, Any] = {
        "phase": current,
        "journalBytes": sum(runtime.journal_bytes.values()),
        "unshippedBytes": runtime.unshipped_bytes,
        "vms": [
            {"name": vm.name, "journalBytes": runtime.journal_bytes.get(vm.name, 0)}
            for vm in spec.vms
        ],
    }
    spilled = _spilled_bytes(runtime, endpoint)
    if spilled is not None:
        status["spilledBytes"] = spilled
    if endpoint_enabled:
        _sync_status(status["vms"], spec, endpoint, endpoint_problem)
    if endpoint is not None:
        status["endpoint"] = {"connections": endpoint.connections}
    if runtime.rpo_seconds is not None:
        status["actualRpoSeconds"] = round(runtime.rpo_seconds, 1)
    if runtime.last_checkpoint is not None:
        status["lastCheckpoint"] = checkpoint_status(runtime.last_checkpoint)
    sla = runtime.sla
    if sla is not None and sla.actual_history_seconds is not None:
        status["historySeconds"] = int(sla.actual_history_seconds)
    protecting = runtime.state == "protecting"
    if not protecting:
        message = f"protection stopped ({runtime.state}): {runtime.last_error or 'unknown'}"
    else:
        summary = sla.message if sla is not None else f"VPG is {current}"
        message = f"{summary}; {checkpoints} durable checkpoints (epoch {runtime.epoch})"
        if not_served:
            reason, why = endpoint_problem or ("NotServed", "the endpoint is starting")
            message = f"the NBD endpoint is not serving ({reason}): {why}; {message}"
        elif endpoint is not None and not endpoint.synced:
            syncing = "; ".join(
                f"{d.vm}/{d.disk} {d.state} {_percent(d)}%"
                + (f" ({d.message})" if d.message else "")
                for d in endpoint.disks
                if d.state != ebbtide_engine.SyncState.PROTECTING
            )
            message = f"{message}; sync: {syncing}"
    status["message"] = message
    conditions = [
        _conditions.Condition("SpecValid", "True", "Valid", "the spec is valid"),
        _conditions.Condition(
            "Ready",
            "True" if protecting else "False",
            "Protecting" if protecting else "RuntimeStopped",
            f"writer {runtime.writer}, epoch {runtime.epoch}" if protecting else message,
        ),
        _storage_condition(runtime),
        *([_endpoint_condition(endpoint, endpoint_problem)] if endpoint_enabled else []),
        _conditions.Condition(
            "OperationRunning",
            "True" if operation else "False",
            operation or "Idle",
            operation_message or "no Failover, Move or FailoverTest is running",
        ),
        *(
            _conditions.Condition(c.type, c.status, c.reason, c.message)
            for c in (sla.conditions if sla is not None else ())
        ),
    ]
    return status, conditions


#: A VM's sync state is its least advanced disk's, in this order of concern.
_SYNC_ORDER = ["NotServed", "NeedsMirrorPass", "InitialSync", "Resyncing", "Protecting"]


def _percent(disk: ebbtide_engine.DiskStatus) -> int:
    if not disk.total_bytes:
        return 100 if disk.state == ebbtide_engine.SyncState.PROTECTING else 0
    return min(100, disk.done_bytes * 100 // disk.total_bytes)


def _sync_status(
    vms: list[dict[str, Any]],
    spec: ebbtide_engine.VpgSpec,
    endpoint: ebbtide_engine.EndpointStatus | None,
    problem: tuple[str, str] | None,
) -> None:
    """Fill ``syncState`` and ``disks[]`` of each ``vms[]`` entry (in spec order)."""
    served = {(d.vm, d.disk): d for d in (endpoint.disks if endpoint is not None else ())}
    for entry, vm in zip(vms, spec.vms, strict=True):
        disks: list[dict[str, Any]] = []
        for disk in vm.disks:
            found = served.get((vm.name, disk.name))
            if found is None:
                disks.append(
                    {
                        "name": disk.name,
                        "mode": disk.mode,
                        "syncState": "NotServed",
                        "message": problem[1] if problem else "the endpoint is not serving",
                    }
                )
                continue
            item: dict[str, Any] = {
                "name": disk.name,
                "mode": found.mode,
                "url": found.url,
                "syncState": str(found.state),
                "syncedBytes": found.done_bytes,
                "syncTotalBytes": found.total_bytes,
                "syncPercent": _percent(found),
                "bytesWritten": found.bytes_written,
            }
            if found.message:
                item["message"] = found.message
            disks.append(item)
        entry["disks"] = disks
        entry["syncState"] = min(
            (d["syncState"] for d in disks), key=_SYNC_ORDER.index, default="Protecting"
        )


def _endpoint_condition(
    endpoint: ebbtide_engine.EndpointStatus | None, problem: tuple[str, str] | None
) -> _conditions.Condition:
    if endpoint is None:
        reason, message = problem or ("NotServing", "the NBD endpoint is not serving now")
        return _conditions.Condition("EndpointReady", "False", reason, message)
    return _conditions.Condition(
        "EndpointReady",
        "True",
        "Serving",
        f"serving {len(endpoint.disks)} NBD exports, {endpoint.connections} clients connected",
    )


def _spilled_bytes(
    runtime: ebbtide_engine.RuntimeStatus, endpoint: ebbtide_engine.EndpointStatus | None
) -> int | None:
    """Unshipped bytes kept on local disk, once the engine reports them (else None)."""
    for source in (endpoint, runtime):
        value = getattr(source, "spilled_bytes", None)
        if isinstance(value, int):
            return value
    return None


def _storage_condition(runtime: ebbtide_engine.RuntimeStatus) -> _conditions.Condition:
    if runtime.pending_uploads > 0 and runtime.last_error and runtime.upload_retries:
        return _conditions.Condition(
            "StorageReachable", "False", "UploadsRetrying", f"retrying: {runtime.last_error}"
        )
    return _conditions.Condition("StorageReachable", "True", "Reachable", "uploads succeed")


@dataclasses.dataclass(slots=True)
class Publisher:
    """Remembers what was last written for one object and decides when to write again."""

    refresh_seconds: float
    last: dict[str, Any] | None = None
    last_time: float = 0.0
    patches: int = 0

    def decide(self, new: Mapping[str, Any], *, now: float | None = None) -> bool:
        """True if ``new`` should be written now (and remember it as written)."""
        moment = time.monotonic() if now is None else now
        old = self.last
        if old == new:
            return False
        urgent = old is None or _significant(old, new)
        if not urgent and moment - self.last_time < self.refresh_seconds:
            return False
        self.last, self.last_time = dict(new), moment
        self.patches += 1
        return True

    def forget(self) -> None:
        """Write the next projection whatever it is (after someone else wrote the status)."""
        self.last = None


def _sync_view(status: Mapping[str, Any]) -> list[Any]:
    """What a client waits for in ``vms[]``: sync states and NBD URLs (not progress)."""
    return [
        (
            vm.get("name"),
            vm.get("syncState"),
            [(d.get("name"), d.get("syncState"), d.get("url")) for d in vm.get("disks") or ()],
        )
        for vm in status.get("vms") or ()
    ]


def _significant(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    for field in ("phase", "observedGeneration"):
        if old.get(field) != new.get(field):
            return True
    if _sync_view(old) != _sync_view(new):
        return True
    if not _conditions.same(old.get("conditions"), new.get("conditions")):
        return True
    before, after = old.get("lastCheckpoint") or {}, new.get("lastCheckpoint") or {}
    if not before and after:
        return True
    return bool(
        after.get("kind", "Automatic") != "Automatic" and before.get("id") != after.get("id")
    )
