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


def phase(runtime: ebbtide_engine.RuntimeStatus, spec: ebbtide_engine.VpgSpec) -> str:
    """The VPG's phase (an enum value of the CRD's status.phase)."""
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
) -> tuple[dict[str, Any], list[_conditions.Condition]]:
    """(status fields, conditions) of a protecting VPG, from its runtime's status."""
    current = phase(runtime, spec)
    status: dict[str, Any] = {
        "phase": current,
        "journalBytes": sum(runtime.journal_bytes.values()),
        "vms": [
            {"name": vm.name, "journalBytes": runtime.journal_bytes.get(vm.name, 0)}
            for vm in spec.vms
        ],
    }
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
        *(
            _conditions.Condition(c.type, c.status, c.reason, c.message)
            for c in (sla.conditions if sla is not None else ())
        ),
    ]
    return status, conditions


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


def _significant(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    for field in ("phase", "observedGeneration"):
        if old.get(field) != new.get(field):
            return True
    if not _conditions.same(old.get("conditions"), new.get("conditions")):
        return True
    before, after = old.get("lastCheckpoint") or {}, new.get("lastCheckpoint") or {}
    if not before and after:
        return True
    return bool(
        after.get("kind", "Automatic") != "Automatic" and before.get("id") != after.get("id")
    )
