"""The engine state machine with time passing, promotion, dilution and restarts.

Extends ``tests/engine/test_state_machine.py``'s machine (random writes,
checkpoints, failing uploads, clean and unclean restarts) with an injected
clock that jumps forward and history passes (promotion to the recovery
disks, dilution, index rewrites). After every step:

- every listed checkpoint recovers byte for byte (``verify``, and at teardown);
- right after a pass, the listed automatic checkpoints obey the dilution tiers,
  and none is older than the history window;
- a checkpoint disappears from the listing only if it was older than the
  window, or was an automatic one diluted: never a tagged one inside it.
"""

from __future__ import annotations

import uuid

import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import rule

import ebbtide_engine as ebbtide
from ebbtide_engine import storage
from tests import crashkit
from tests.engine import model
from tests.engine.test_state_machine import DISKS, JournalMachine
from tests.history.test_dilution import tier_violations

HISTORY = 3600.0
DILUTION = {
    "threshold": 4,
    "tiers": [
        {"olderThan": "10m", "keep": 2, "per": "5m"},
        {"olderThan": "30m", "keep": 1, "per": "10m"},
    ],
}


class HistoryMachine(JournalMachine):
    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.kinds: dict[int, ebbtide.CheckpointKind] = {}
        self.times: dict[int, int] = {}
        super().__init__()

    def make_spec(self) -> ebbtide.VpgSpec:
        return model.spec(f"hm-{uuid.uuid4().hex[:10]}", journalHistory="1h", dilution=DILUTION)

    def runtime_options(self, takeover: str) -> ebbtide.RuntimeOptions:
        return model.options(
            takeover=takeover,
            lease_seconds=0.3,  # after a crash, the forced takeover's first promotion waits 0.15 s
            clock=lambda: self.now,
            maintenance_seconds=None,
            mirror_chunk_size=4096,
            compact_every=8,
        )

    def _note(self, checkpoint: ebbtide.Checkpoint) -> None:
        self.kinds[checkpoint.id] = checkpoint.kind
        self.times[checkpoint.id] = checkpoint.time_ns

    @rule(tag=st.none() | st.sampled_from(["a", "b"]))
    def checkpoint(self, tag: str | None) -> None:
        super().checkpoint(tag)
        self._note(self.live.list_checkpoints()[-1])

    @rule()
    def auto_checkpoint(self) -> None:
        checkpoint = self._run(self.live.checkpoint(ebbtide.CheckpointKind.AUTOMATIC))
        self.disks.checkpoint(checkpoint.id)
        self.committed.append(checkpoint.id)
        self._note(checkpoint)

    @rule()
    def restart_cleanly(self) -> None:
        super().restart_cleanly()
        for checkpoint in self.live.list_checkpoints():
            self._note(checkpoint)

    @rule(minutes=st.integers(1, 90))
    def time_passes(self, minutes: int) -> None:
        self.now += minutes * 60

    @rule(
        count=st.integers(2, 12),
        spacing=st.integers(30, 900),
        data=st.data(),
    )
    def a_while_passes(self, count: int, spacing: int, data: st.DataObject) -> None:
        """A stretch of automatic checkpoints ``spacing`` seconds apart, a write before each."""
        for _ in range(count):
            self.write(data, data.draw(st.sampled_from(DISKS), label="disk"), max_length=512)
            self.auto_checkpoint()
            self.now += spacing
        if data.draw(st.booleans(), label="then a history pass"):
            self.history_pass()

    @rule()
    def history_pass(self) -> None:
        before = list(self.committed)
        try:
            result = self._run(self.live.maintain())
            completed = True
            event(f"diluted: {bool(result.diluted)}")
            promotion = result.promotion
            event(f"promoted: {bool(promotion and promotion.segments_applied)}")
        except ebbtide.StorageError:
            completed = False  # a failing bucket: the next pass finishes it
        listed = self.live.list_checkpoints()
        after = [c.id for c in listed]
        assert set(after) <= set(before)
        window_start = int((self.now - HISTORY) * 1e9)
        for gone in set(before) - set(after):
            inside = self.times[gone] >= window_start
            assert not inside or self.kinds[gone] == ebbtide.CheckpointKind.AUTOMATIC, (
                f"checkpoint {gone} ({self.kinds[gone].name}) inside the window disappeared"
            )
        if completed:
            assert tier_violations(listed, int(self.now * 1e9), self.spec.dilution) == []
            if any(self.times[i] >= window_start for i in after):
                assert self.times[after[0]] >= window_start
        self.committed = after


def test_history_state_machine_in_memory() -> None:
    crashkit.run_machine(HistoryMachine, storage.MemoryStore, examples=40, steps=40)


@pytest.mark.slow
def test_history_state_machine_on_s3(s3_url: str) -> None:
    crashkit.run_machine(HistoryMachine, lambda: storage.open_store(s3_url), examples=5, steps=25)
