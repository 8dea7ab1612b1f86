"""A hypothesis state machine: random writes, checkpoints, restarts, crashes and failing uploads.

After every step the listed checkpoints are exactly the committed ones, and
``verify`` (a rule, and at teardown) recovers every listed checkpoint and
compares it byte for byte with a plain model of the disks at that cut.
Against the in-memory backend with many examples, against moto with fewer.
"""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import ebbtide_engine as ebbtide
from ebbtide_engine import storage
from tests import crashkit
from tests.engine import model
from tests.engine.conftest import FaultyStore

T = TypeVar("T")
DISKS = [("web", "root"), ("web", "data"), ("db", "log")]


class JournalMachine(RuleBasedStateMachine):
    """The engine machine; ``tests/history/test_history_machine.py`` extends it."""

    make_store: Callable[[], storage.ObjectStore]

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.spec = self.make_spec()
        self.sizes = {(vm.name, d.name): d.size for vm in self.spec.vms for d in vm.disks}
        self.store = FaultyStore(self.make_store())
        self.disks = model.DisksModel(self.spec)
        self.committed: list[int] = []
        self.runtime: ebbtide.VpgRuntime | None = self._open("wait")

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def make_spec(self) -> ebbtide.VpgSpec:
        return model.spec(f"sm-{uuid.uuid4().hex[:10]}")

    def runtime_options(self, takeover: str) -> ebbtide.RuntimeOptions:
        return model.options(takeover=takeover)

    def _open(self, takeover: str) -> ebbtide.VpgRuntime:
        options = self.runtime_options(takeover)
        return self._run(ebbtide.VpgRuntime.open(self.spec, self.store, options=options))

    @property
    def live(self) -> ebbtide.VpgRuntime:
        assert self.runtime is not None
        return self.runtime

    @rule(data=st.data(), disk=st.sampled_from(DISKS))
    def write(self, data: st.DataObject, disk: tuple[str, str], max_length: int = 6000) -> None:
        """A write to the runtime and to the model (other rules draw theirs through it too)."""
        size = self.sizes[disk]
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, min(max_length, size - offset)), label="length")
        payload = data.draw(st.binary(min_size=length, max_size=length), label="payload")
        self._run(self.live.write(*disk, offset, payload))
        self.disks.write(*disk, offset, payload)

    @rule(data=st.data(), disk=st.sampled_from(DISKS), zero=st.booleans())
    def discard(self, data: st.DataObject, disk: tuple[str, str], zero: bool) -> None:
        size = self.sizes[disk]
        offset = data.draw(st.integers(0, size - 1), label="offset")
        length = data.draw(st.integers(1, size - offset), label="length")
        operation = self.live.write_zeroes if zero else self.live.trim
        self._run(operation(*disk, offset, length))
        self.disks.zero(*disk, offset, length)

    @rule(tag=st.none() | st.sampled_from(["a", "b"]))
    def checkpoint(self, tag: str | None) -> None:
        checkpoint = self._run(self.live.checkpoint(tag=tag))
        self.disks.checkpoint(checkpoint.id)
        self.committed.append(checkpoint.id)

    @rule(failures=st.integers(1, 3), after_landing=st.booleans())
    def uploads_fail(self, failures: int, after_landing: bool) -> None:
        self.store.fail_puts, self.store.after_landing = failures, after_landing

    @rule()
    def restart_cleanly(self) -> None:
        self._run(self.live.close())
        final = self.live.list_checkpoints()[-1]
        self.disks.checkpoint(final.id)
        self.committed.append(final.id)
        self.runtime = self._open("wait")
        previous = self.live.status().previous_writer
        assert previous is not None
        assert previous.clean_shutdown

    @rule()
    def crash_and_restart(self) -> None:
        self._run(self.live.abort())
        self.disks.revert_to(self.committed[-1] if self.committed else None)
        self.runtime = self._open("force")

    @invariant()
    def listed_checkpoints_are_the_committed_ones(self) -> None:
        assert [c.id for c in self.live.list_checkpoints()] == self.committed

    @precondition(lambda self: self.committed)
    @rule()
    def verify(self) -> None:
        self.store.fail_puts = 0
        listed = self._run(ebbtide.list_checkpoints(self.store.inner, self.spec.name))
        assert [c.id for c in listed] == self.committed
        with tempfile.TemporaryDirectory() as directory:
            self._run(
                crashkit.recover_and_compare(
                    self.store.inner,
                    self.spec.name,
                    self.committed,
                    self.disks,
                    pathlib.Path(directory),
                )
            )

    def teardown(self) -> None:
        try:
            if self.committed:
                self.verify()
            if self.runtime is not None:
                self._run(self.runtime.close())
        finally:
            self._run(self.store.inner.close())
            self.loop.close()


def test_journal_state_machine_in_memory() -> None:
    crashkit.run_machine(JournalMachine, storage.MemoryStore, examples=40, steps=30)


@pytest.mark.slow
def test_journal_state_machine_on_s3(s3_url: str) -> None:
    crashkit.run_machine(JournalMachine, lambda: storage.open_store(s3_url), examples=6, steps=20)
