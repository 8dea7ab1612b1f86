"""SLA status of a VPG: is it protected, and how well? (Zerto's VPG phases.)

A pure function of what the engine knows: the spec (target RPO, journal
history, journal limits), the durable checkpoints, the time now (the
runtime's clock), the journal bytes per VM and whether the first sync
still runs. Both the writer (``VpgRuntime.status().sla``) and a reader of
the bucket use it, and the operator copies the result into the
VirtualProtectionGroup's status: ``phase`` and the conditions below, each
with a ``reason`` (CamelCase) and a ``message`` for people.

Rules (FORMAT.md does not store any of this; docs/history.md explains them):

- **RPO**: actual RPO = now - the newest durable checkpoint's time; met when
  it is at most ``targetRPO``.
- **History**: actual history = now - the oldest recoverable checkpoint's
  time. Promotion keeps the oldest checkpoint *inside* the window, so the
  actual history is a little under ``journalHistory`` by design; it is met
  while it is at least ``journalHistory`` minus the coarsest dilution
  bucket (15 min by default), or while the VPG has not been protected that
  long yet (history is still building up). It is not met whenever a VM's
  journal is at its hard limit (promotion then runs early and shortens it).
- **Journal**: per VM, bytes against the hard limit and the warning threshold.

Phases: ``Syncing`` while the first sync runs, ``Initializing`` until the
first durable checkpoint, then ``MeetingSLA``, ``RPONotMeetingSLA``,
``HistoryNotMeetingSLA`` or ``NotMeetingSLA`` (both).
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Mapping, Sequence
from typing import Literal

from ebbtide_engine import _index, _spec

Phase = Literal[
    "Initializing",
    "Syncing",
    "MeetingSLA",
    "RPONotMeetingSLA",
    "HistoryNotMeetingSLA",
    "NotMeetingSLA",
]
ConditionStatus = Literal["True", "False", "Unknown"]

RPO_CONDITION = "RPOMeetingSLA"
HISTORY_CONDITION = "HistoryMeetingSLA"
NEAR_LIMIT_CONDITION = "JournalNearLimit"
HARD_LIMIT_CONDITION = "JournalHardLimitReached"


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """One status condition, shaped like a Kubernetes ``metav1.Condition`` (minus times)."""

    type: str
    status: ConditionStatus
    reason: str
    message: str


@dataclasses.dataclass(frozen=True, slots=True)
class VmJournal:
    """One VM's journal against its limits (bytes; None: no such limit)."""

    vm: str
    bytes: int
    hard_limit: int | None
    warning_threshold: int | None

    @property
    def at_hard_limit(self) -> bool:
        return self.hard_limit is not None and self.bytes >= self.hard_limit

    @property
    def near_limit(self) -> bool:
        return self.warning_threshold is not None and self.bytes >= self.warning_threshold


@dataclasses.dataclass(frozen=True, slots=True)
class SlaStatus:
    """The SLA view of a VPG at one moment."""

    phase: Phase
    actual_rpo_seconds: float | None  # None: no durable checkpoint yet
    target_rpo_seconds: float
    actual_history_seconds: float | None
    configured_history_seconds: float
    journals: dict[str, VmJournal]
    conditions: list[Condition]

    def condition(self, kind: str) -> Condition:
        return next(c for c in self.conditions if c.type == kind)

    @property
    def message(self) -> str:
        """One line for the status's ``message``: the conditions that are not fine."""
        bad = [
            c.message
            for c in self.conditions
            if (c.type in (RPO_CONDITION, HISTORY_CONDITION) and c.status != "True")
            or (c.type in (NEAR_LIMIT_CONDITION, HARD_LIMIT_CONDITION) and c.status == "True")
        ]
        return "; ".join(bad) if bad else f"VPG is {self.phase}"


def history_tolerance(spec: _spec.VpgSpec) -> float:
    """How far under ``journalHistory`` the actual history may be and still meet the SLA."""
    return max([tier.per for tier in spec.dilution.tiers], default=spec.checkpoint_interval)


def evaluate(
    spec: _spec.VpgSpec,
    checkpoints: Sequence[_index.Checkpoint],
    *,
    now: float,
    journal_bytes: Mapping[str, int],
    protected_since: float | None = None,
    syncing: bool = False,
    cut_short: bool = False,
    cut_short_vms: Sequence[str] = (),
) -> SlaStatus:
    """The SLA status of ``spec``'s VPG at time ``now`` (seconds since the epoch).

    ``checkpoints``: the recoverable ones, oldest first. ``protected_since``:
    when protection started (the first writer's takeover, in seconds); if
    None, the oldest checkpoint's time is taken instead. ``syncing``: the
    first full sync still runs. ``cut_short``: a hard limit made promotion run
    early and the history has not grown back yet (``cut_short_vms``: whose).
    """
    journals = {}
    for vm in spec.vms:
        hard, warning = spec.journal_limits(vm.name)
        journals[vm.name] = VmJournal(vm.name, journal_bytes.get(vm.name, 0), hard, warning)
    conditions = [*_journal_conditions(journals)]
    at_hard_limit = [j for j in journals.values() if j.at_hard_limit]

    target, history = spec.target_rpo, spec.journal_history
    if not checkpoints:
        waiting = "the first sync is running" if syncing else "no durable checkpoint yet"
        conditions[:0] = [
            Condition(RPO_CONDITION, "Unknown", "NoCheckpoint", f"RPO unknown: {waiting}"),
            Condition(HISTORY_CONDITION, "Unknown", "NoCheckpoint", f"history unknown: {waiting}"),
        ]
        return SlaStatus(
            "Syncing" if syncing else "Initializing",
            None,
            target,
            None,
            history,
            journals,
            conditions,
        )

    newest, oldest = checkpoints[-1], checkpoints[0]
    rpo = max(0.0, now - newest.time_ns / 1e9)
    actual_history = max(0.0, now - oldest.time_ns / 1e9)
    rpo_met = rpo <= target
    rpo_condition = Condition(
        RPO_CONDITION,
        "True" if rpo_met else "False",
        "RPOMet" if rpo_met else "RPOExceeded",
        f"actual RPO {_duration(rpo)} "
        + ("is within" if rpo_met else "exceeds")
        + f" the target {_duration(target)} (newest durable checkpoint {newest.id} at "
        f"{_when(newest.time_ns)})",
    )

    floor = max(0.0, history - history_tolerance(spec))
    started = oldest.time_ns / 1e9 if protected_since is None else protected_since
    building = now - started < floor
    if at_hard_limit or (cut_short and actual_history < floor):
        names = (
            ", ".join(repr(j.vm) for j in at_hard_limit)
            or ", ".join(repr(vm) for vm in cut_short_vms)
            or "(one or more VMs)"
        )
        history_condition = Condition(
            HISTORY_CONDITION,
            "False",
            "JournalHardLimitReached",
            f"history {_duration(actual_history)} is shorter than the configured "
            f"{_duration(history)}: the journal of VM {names} reached its hard limit, so older "
            "writes are promoted early",
        )
    elif actual_history >= floor:
        history_condition = Condition(
            HISTORY_CONDITION,
            "True",
            "HistoryMet",
            f"recovery reaches back {_duration(actual_history)} (configured {_duration(history)})",
        )
    elif building:
        history_condition = Condition(
            HISTORY_CONDITION,
            "True",
            "HistoryBuilding",
            f"recovery reaches back {_duration(actual_history)}; protected for "
            f"{_duration(max(0.0, now - started))} of the configured {_duration(history)} history",
        )
    else:
        history_condition = Condition(
            HISTORY_CONDITION,
            "False",
            "HistoryShort",
            f"recovery reaches back only {_duration(actual_history)} of the configured "
            f"{_duration(history)} (oldest recoverable checkpoint {oldest.id} at "
            f"{_when(oldest.time_ns)})",
        )
    history_met = history_condition.status == "True"
    conditions[:0] = [rpo_condition, history_condition]
    phase: Phase
    if syncing:
        phase = "Syncing"
    elif rpo_met and history_met:
        phase = "MeetingSLA"
    elif history_met:
        phase = "RPONotMeetingSLA"
    elif rpo_met:
        phase = "HistoryNotMeetingSLA"
    else:
        phase = "NotMeetingSLA"
    return SlaStatus(phase, rpo, target, actual_history, history, journals, conditions)


def _journal_conditions(journals: Mapping[str, VmJournal]) -> list[Condition]:
    near = [j for j in journals.values() if j.near_limit]
    full = [j for j in journals.values() if j.at_hard_limit]
    if near:
        near_condition = Condition(
            NEAR_LIMIT_CONDITION,
            "True",
            "WarningThresholdReached",
            "; ".join(
                f"journal of VM {j.vm!r} holds {_size(j.bytes)}, at or above its warning threshold "
                f"{_size(j.warning_threshold or 0)}"
                + (f" (hard limit {_size(j.hard_limit)})" if j.hard_limit is not None else "")
                for j in near
            ),
        )
    else:
        near_condition = Condition(
            NEAR_LIMIT_CONDITION,
            "False",
            "BelowWarningThreshold",
            "every journal is below its warning threshold",
        )
    if full:
        full_condition = Condition(
            HARD_LIMIT_CONDITION,
            "True",
            "HardLimitReached",
            "; ".join(
                f"journal of VM {j.vm!r} holds {_size(j.bytes)}, at its hard limit "
                f"{_size(j.hard_limit or 0)}: the oldest history is promoted early"
                for j in full
            ),
        )
    else:
        full_condition = Condition(
            HARD_LIMIT_CONDITION, "False", "BelowHardLimit", "every journal is below its hard limit"
        )
    return [near_condition, full_condition]


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min" + (f" {secs} s" if secs else "")
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    days, hours = divmod(hours, 24)
    return f"{days} d" + (f" {hours} h" if hours else "")


def _size(nbytes: int | None) -> str:
    value = float(nbytes or 0)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _when(time_ns: int) -> str:
    moment = datetime.datetime.fromtimestamp(time_ns / 1e9, tz=datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
