"""Status conditions in the shape of a Kubernetes ``metav1.Condition``.

Every kind keeps ``status.conditions`` as a list keyed by ``type`` (the CRDs
say ``x-kubernetes-list-type: map``); a merge patch replaces the whole list,
so the operator always writes it whole, built by :func:`merge` from what is
stored: a condition whose ``status`` did not change keeps its
``lastTransitionTime``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

Status = Literal["True", "False", "Unknown"]


@dataclasses.dataclass(frozen=True, slots=True)
class Condition:
    """One condition as the operator decides it (times are filled in by :func:`merge`)."""

    type: str
    status: Status
    reason: str
    message: str


def now() -> str:
    """The time now as RFC 3339 with a ``Z`` (what Kubernetes writes)."""
    return rfc3339(datetime.datetime.now(tz=datetime.UTC))


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge(
    stored: Sequence[Mapping[str, Any]] | None,
    wanted: Iterable[Condition],
    *,
    generation: int | None,
    at: str | None = None,
) -> list[dict[str, Any]]:
    """The new ``status.conditions``: ``wanted`` replaces same-typed ones, others are kept."""
    when = at or now()
    result = {str(c.get("type")): dict(c) for c in stored or () if c.get("type")}
    for condition in wanted:
        old = result.get(condition.type)
        changed = old is None or old.get("status") != condition.status
        entry: dict[str, Any] = {
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason,
            "message": condition.message,
            "lastTransitionTime": when if changed or old is None else old["lastTransitionTime"],
        }
        if generation is not None:
            entry["observedGeneration"] = generation
        result[condition.type] = entry
    return list(result.values())


def same(a: Sequence[Mapping[str, Any]] | None, b: Sequence[Mapping[str, Any]] | None) -> bool:
    """Whether two condition lists say the same (type, status, reason), ignoring times."""

    def key(items: Sequence[Mapping[str, Any]] | None) -> set[tuple[Any, ...]]:
        return {(c.get("type"), c.get("status"), c.get("reason")) for c in items or ()}

    return key(a) == key(b)
