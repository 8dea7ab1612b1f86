"""SLA status: every phase, every journal limit, and the messages people read."""

from __future__ import annotations

import pytest

import ebbtide_engine as ebbtide
from tests.engine import model

HOUR = 3600.0
NOW = 1_800_000_000.0
MiB = 1 << 20


def _spec(**journal: object) -> ebbtide.VpgSpec:
    body: dict[str, object] = {
        "vms": [
            {"name": "web", "disks": [{"name": "root", "size": "64Mi"}]},
            {
                "name": "db",
                "disks": [{"name": "log", "size": "32Mi"}, {"name": "d", "size": "32Mi"}],
            },
        ],
        "targetRpo": "5m",
        "journalHistory": "24h",
        "journal": journal,
    }
    return ebbtide.VpgSpec.parse("sla", body)


def _checkpoints(*ages: float) -> list[ebbtide.Checkpoint]:
    """Checkpoints taken ``ages`` seconds before NOW, oldest first."""
    return [
        ebbtide.Checkpoint(
            id=i + 1,
            time_ns=int((NOW - age) * 1e9),
            kind=ebbtide.CheckpointKind.AUTOMATIC,
            tag=None,
            epoch=1,
        )
        for i, age in enumerate(sorted(ages, reverse=True))
    ]


def _evaluate(
    checkpoints: list[ebbtide.Checkpoint],
    *,
    spec: ebbtide.VpgSpec | None = None,
    journal_bytes: dict[str, int] | None = None,
    protected_for: float = 30 * 86400,
    syncing: bool = False,
) -> ebbtide.SlaStatus:
    return ebbtide.evaluate_sla(
        spec or _spec(),
        checkpoints,
        now=NOW,
        journal_bytes=journal_bytes or {},
        protected_since=NOW - protected_for,
        syncing=syncing,
    )


def test_meeting_sla() -> None:
    status = _evaluate(_checkpoints(24 * HOUR - 60, 3))
    assert status.phase == "MeetingSLA"
    assert status.actual_rpo_seconds == pytest.approx(3)
    assert status.actual_history_seconds == pytest.approx(24 * HOUR - 60)
    rpo = status.condition("RPOMeetingSLA")
    assert (rpo.status, rpo.reason) == ("True", "RPOMet")
    assert rpo.message.startswith("actual RPO 3 s is within the target 5 min")
    history = status.condition("HistoryMeetingSLA")
    assert (history.status, history.reason) == ("True", "HistoryMet")
    assert history.message == "recovery reaches back 23 h 59 min (configured 24 h)"
    assert status.message == "VPG is MeetingSLA"


def test_rpo_not_meeting_sla() -> None:
    status = _evaluate(_checkpoints(24 * HOUR, 7 * 60 + 3))
    assert status.phase == "RPONotMeetingSLA"
    rpo = status.condition("RPOMeetingSLA")
    assert (rpo.status, rpo.reason) == ("False", "RPOExceeded")
    assert rpo.message.startswith(
        "actual RPO 7 min 3 s exceeds the target 5 min (newest durable checkpoint 2 at "
    )
    assert status.message == rpo.message


def test_history_not_meeting_sla() -> None:
    status = _evaluate(_checkpoints(10 * HOUR, 1))
    assert status.phase == "HistoryNotMeetingSLA"
    history = status.condition("HistoryMeetingSLA")
    assert (history.status, history.reason) == ("False", "HistoryShort")
    assert history.message.startswith(
        "recovery reaches back only 10 h of the configured 24 h (oldest recoverable checkpoint 1"
    )


def test_not_meeting_sla_is_both() -> None:
    status = _evaluate(_checkpoints(10 * HOUR, 600))
    assert status.phase == "NotMeetingSLA"
    assert "exceeds the target" in status.message
    assert "reaches back only" in status.message


def test_history_within_one_dilution_bucket_still_meets() -> None:
    assert _evaluate(_checkpoints(24 * HOUR - 14 * 60, 1)).phase == "MeetingSLA"
    assert _evaluate(_checkpoints(24 * HOUR - 16 * 60, 1)).phase == "HistoryNotMeetingSLA"


def test_a_young_vpg_is_building_its_history() -> None:
    status = _evaluate(_checkpoints(2 * HOUR, 1), protected_for=2 * HOUR + 30)
    assert status.phase == "MeetingSLA"
    history = status.condition("HistoryMeetingSLA")
    assert (history.status, history.reason) == ("True", "HistoryBuilding")
    assert history.message == (
        "recovery reaches back 2 h; protected for 2 h of the configured 24 h history"
    )


def test_initializing_and_syncing_before_the_first_checkpoint() -> None:
    status = _evaluate([])
    assert status.phase == "Initializing"
    assert status.actual_rpo_seconds is None
    rpo = status.condition("RPOMeetingSLA")
    assert (rpo.status, rpo.reason, rpo.message) == (
        "Unknown",
        "NoCheckpoint",
        "RPO unknown: no durable checkpoint yet",
    )
    syncing = _evaluate([], syncing=True)
    assert syncing.phase == "Syncing"
    assert syncing.condition("HistoryMeetingSLA").message == (
        "history unknown: the first sync is running"
    )
    assert _evaluate(_checkpoints(60, 1), syncing=True).phase == "Syncing"


def test_journal_below_every_limit() -> None:
    status = _evaluate(
        _checkpoints(24 * HOUR, 1),
        spec=_spec(hardLimit="100Mi", warningThreshold="80Mi"),
        journal_bytes={"web": 79 * MiB, "db": 1},
    )
    assert status.phase == "MeetingSLA"
    near, full = status.condition("JournalNearLimit"), status.condition("JournalHardLimitReached")
    assert (near.status, near.reason) == ("False", "BelowWarningThreshold")
    assert (full.status, full.reason) == ("False", "BelowHardLimit")
    assert status.journals["web"].hard_limit == 100 * MiB


def test_journal_at_its_warning_threshold() -> None:
    status = _evaluate(
        _checkpoints(24 * HOUR, 1),
        spec=_spec(hardLimit="100Mi", warningThreshold="80Mi"),
        journal_bytes={"web": 80 * MiB},
    )
    assert status.phase == "MeetingSLA"  # a warning, not an SLA breach
    near = status.condition("JournalNearLimit")
    assert (near.status, near.reason) == ("True", "WarningThresholdReached")
    assert near.message == (
        "journal of VM 'web' holds 80.0 MiB, at or above its warning threshold 80.0 MiB "
        "(hard limit 100.0 MiB)"
    )
    assert status.message == near.message


def test_journal_at_its_hard_limit_breaks_the_history_sla() -> None:
    status = _evaluate(
        _checkpoints(24 * HOUR, 1),
        spec=_spec(hardLimit="50%", warningThreshold="25%"),  # of each VM's 64 MiB of disks
        journal_bytes={"db": 32 * MiB},
    )
    assert status.phase == "HistoryNotMeetingSLA"
    full = status.condition("JournalHardLimitReached")
    assert (full.status, full.reason) == ("True", "HardLimitReached")
    assert full.message == (
        "journal of VM 'db' holds 32.0 MiB, at its hard limit 32.0 MiB: "
        "the oldest history is promoted early"
    )
    history = status.condition("HistoryMeetingSLA")
    assert (history.status, history.reason) == ("False", "JournalHardLimitReached")
    assert "the journal of VM 'db' reached its hard limit" in history.message
    assert status.condition("JournalNearLimit").status == "True"


def test_unlimited_journal_has_no_limits() -> None:
    status = _evaluate(_checkpoints(24 * HOUR, 1), journal_bytes={"web": 1 << 50})
    assert status.journals["web"].hard_limit is None
    assert status.condition("JournalHardLimitReached").status == "False"
    assert status.phase == "MeetingSLA"


@pytest.mark.parametrize(
    ("journal", "message"),
    [
        (
            {"hardLimit": "10Gi", "warningThreshold": "10Gi"},
            "journal.warningThreshold (10Gi, 10737418240 bytes for VM 'web') must be below "
            "journal.hardLimit (10Gi, 10737418240 bytes)",
        ),
        (
            {"hardLimit": "50%", "warningThreshold": "80%"},
            "journal.warningThreshold (80%, 53687091 bytes for VM 'web') must be below "
            "journal.hardLimit (50%, 33554432 bytes)",
        ),
        ({"hardLimit": "150%"}, "'150%': a percentage must be a whole number from 1% to 100%"),
        ({"hardLimit": "lots"}, "spec.journal.hardLimit: 'lots' is not a journal limit"),
        ({"warningThreshold": "Unlimited"}, "warningThreshold cannot be 'Unlimited'"),
    ],
)
def test_bad_limits_are_refused_clearly(journal: dict[str, object], message: str) -> None:
    with pytest.raises(ebbtide.SpecError) as error:
        _spec(**journal)
    assert message in str(error.value)


async def test_runtime_status_carries_the_sla_by_its_clock() -> None:
    now = [NOW]
    store = ebbtide.MemoryStore()
    spec = model.spec("slart", targetRpo="10s")
    options = model.options(clock=lambda: now[0])
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        assert runtime.status().sla is not None
        assert runtime.sla().phase == "Initializing"
        runtime.set_syncing(True)
        assert runtime.sla().phase == "Syncing"
        runtime.set_syncing(False)
        await runtime.write("web", "root", 0, b"x" * 100)
        await runtime.checkpoint()
        assert runtime.sla().phase == "MeetingSLA"
        now[0] += 11
        sla = runtime.sla()
        assert sla.phase == "RPONotMeetingSLA"
        assert sla.condition("RPOMeetingSLA").message.startswith(
            "actual RPO 11 s exceeds the target 10 s"
        )
        assert sla.journals["web"].bytes > 0
