"""When a VPG's status is worth a PATCH: at once for what people wait for, else rarely."""

from __future__ import annotations

from typing import Any

import ebbtide_operator


def _view(**changes: Any) -> dict[str, Any]:
    view: dict[str, Any] = {
        "phase": "MeetingSLA",
        "observedGeneration": 1,
        "actualRpoSeconds": 1.0,
        "lastCheckpoint": {"id": 10, "kind": "Automatic"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "Protecting", "message": ""}],
    }
    view.update(changes)
    return view


def test_the_first_status_and_urgent_changes_are_written_at_once() -> None:
    publisher = ebbtide_operator.Publisher(refresh_seconds=30)
    assert publisher.decide(_view(), now=0)
    assert not publisher.decide(_view(), now=1)  # nothing changed
    assert publisher.decide(_view(phase="RPONotMeetingSLA"), now=2)
    assert publisher.decide(_view(phase="RPONotMeetingSLA", observedGeneration=2), now=3)
    tagged = {"id": 12, "kind": "Tagged", "tag": "x"}
    assert publisher.decide(
        _view(phase="RPONotMeetingSLA", observedGeneration=2, lastCheckpoint=tagged), now=4
    )
    not_ready = [{"type": "Ready", "status": "False", "reason": "RuntimeStopped", "message": ""}]
    assert publisher.decide(
        _view(phase="Error", observedGeneration=2, lastCheckpoint=tagged, conditions=not_ready),
        now=5,
    )
    assert publisher.patches == 5


def test_routine_changes_wait_for_the_refresh_interval() -> None:
    publisher = ebbtide_operator.Publisher(refresh_seconds=30)
    assert publisher.decide(_view(), now=0)
    for second in range(1, 30):
        automatic = {"id": 10 + second, "kind": "Automatic"}
        assert not publisher.decide(
            _view(actualRpoSeconds=second % 5, lastCheckpoint=automatic), now=second
        )
    assert publisher.decide(_view(actualRpoSeconds=3.0), now=30)
    assert publisher.patches == 2


def test_forget_writes_the_next_one_whatever_it_is() -> None:
    publisher = ebbtide_operator.Publisher(refresh_seconds=30)
    assert publisher.decide(_view(), now=0)
    publisher.forget()
    assert publisher.decide(_view(actualRpoSeconds=2.0), now=1)


def _vms(state: str, percent: int, url: str = "nbd://h:10809/shop/web/root") -> list[Any]:
    disk = {"name": "root", "syncState": state, "syncPercent": percent, "url": url}
    return [{"name": "web", "syncState": state, "disks": [disk]}]


def test_sync_states_and_urls_are_urgent_progress_is_not() -> None:
    publisher = ebbtide_operator.Publisher(refresh_seconds=30)
    assert publisher.decide(_view(vms=_vms("InitialSync", 0)), now=0)
    assert not publisher.decide(_view(vms=_vms("InitialSync", 40)), now=1)  # progress: waits
    assert publisher.decide(_view(vms=_vms("Protecting", 100)), now=2)  # state: at once
    moved = _vms("Protecting", 100, url="nbd://h:10810/shop/web/root")
    assert publisher.decide(_view(vms=moved), now=3)  # a new URL: at once
    assert publisher.patches == 3
