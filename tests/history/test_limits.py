"""Journal size limits: a journal at its hard limit is promoted early and the SLA says so."""

from __future__ import annotations

import pathlib
import random

import ebbtide_engine as ebbtide
from tests.engine import model


async def test_a_journal_at_its_hard_limit_is_promoted_early(tmp_path: pathlib.Path) -> None:
    now = [1_800_000_000.0]
    store = ebbtide.MemoryStore()
    spec = model.spec(
        "limits",
        journalHistory="24h",
        journal={
            "segmentMaxBytes": "64Ki",
            "maxUnshippedBytes": "1Mi",
            "hardLimit": "200Ki",
            "warningThreshold": "100Ki",
        },
    )
    disks = model.DisksModel(spec)
    rng = random.Random(3)
    options = model.options(clock=lambda: now[0], maintenance_seconds=None, mirror_chunk_size=4096)
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        for _ in range(30):  # 30 x 8 KiB of random data into web/root: about 240 KiB
            data = rng.randbytes(8192)
            offset = rng.randrange(0, 64 * 1024 - 8192)
            await runtime.write("web", "root", offset, data)
            disks.write("web", "root", offset, data)
            checkpoint = await runtime.checkpoint()
            disks.checkpoint(checkpoint.id)
            now[0] += 60
        first = runtime.list_checkpoints()[0]
        sla = runtime.sla()
        assert sla.journals["web"].bytes >= 200 * 1024
        assert sla.phase == "HistoryNotMeetingSLA"
        full = sla.condition("JournalHardLimitReached")
        assert full.status == "True"
        assert full.message.startswith("journal of VM 'web' holds ")
        assert full.message.endswith(
            ", at its hard limit 200.0 KiB: the oldest history is promoted early"
        )
        assert sla.condition("JournalNearLimit").status == "True"
        assert sla.condition("HistoryMeetingSLA").reason == "JournalHardLimitReached"
        result = await runtime.maintain()  # nothing is older than 24 h: only the limit promotes
        assert result.promoted_early
        # The journal shrank under the warning threshold; the history is still cut short.
        assert runtime.list_checkpoints()[0].id > first.id
        sla = runtime.sla()
        assert sla.journals["web"].bytes <= 100 * 1024
        assert sla.condition("JournalHardLimitReached").status == "False"
        assert sla.condition("JournalNearLimit").status == "False"
        assert sla.phase == "HistoryNotMeetingSLA"
        assert sla.journals["db"].bytes == 0
        history = sla.condition("HistoryMeetingSLA")
        assert history.message.startswith("history ")
        assert "the journal of VM" in history.message
        assert "reached its hard limit, so older writes are promoted early" in history.message
        assert "the journal of VM 'web' reached" in history.message
    disks.checkpoint(runtime.list_checkpoints()[-1].id)
    # A restart keeps it: the promotion record says the hard limit of 'web' moved it.
    async with await ebbtide.VpgRuntime.open(spec, store, options=options) as runtime:
        again = runtime.sla()
        assert again.phase == "HistoryNotMeetingSLA"
        assert again.condition("HistoryMeetingSLA").reason == "JournalHardLimitReached"
        assert again.condition("HistoryMeetingSLA").message == history.message
        # The history grows back: once the window is full again, the SLA is met.
        now[0] += 25 * 3600
        disks.checkpoint((await runtime.checkpoint()).id)
        await runtime.maintain()
        assert runtime.sla().condition("HistoryMeetingSLA").reason != "JournalHardLimitReached"
    disks.checkpoint(runtime.list_checkpoints()[-1].id)
    for checkpoint in await ebbtide.list_checkpoints(store, "limits"):
        out = tmp_path / str(checkpoint.id)
        selector = ebbtide.CheckpointSelector(id=checkpoint.id)
        await ebbtide.recover_to_files(store, "limits", selector, out)
        disks.assert_recovered(checkpoint.id, out)


async def test_early_promotion_search_matches_the_plain_definition() -> None:
    """The bisection finds what the O(checkpoints x segments) definition finds."""
    now = [1_800_000_000.0]
    spec = model.spec(
        "search", journalHistory="1h", journal={"hardLimit": "100Ki", "warningThreshold": "50Ki"}
    )
    options = model.options(clock=lambda: now[0], maintenance_seconds=None)
    rng = random.Random(9)
    async with await ebbtide.VpgRuntime.open(spec, ebbtide.MemoryStore(), options=options) as rt:
        for _ in range(40):
            await rt.write("web", "root", 0, b"x")
            await rt.checkpoint()
            now[0] += 300
        checkpoints = rt.list_checkpoints()
        now_ns = int(now[0] * 1e9)
        window_start = now_ns - 3600 * 10**9
        for _ in range(200):
            sizes = {
                vm: sorted(
                    (rng.randint(1, checkpoints[-1].id + 5), rng.randint(1, 30 * 1024))
                    for _ in range(rng.randint(0, 12))
                )
                for vm in ("web", "db")
            }
            inside = [c for c in checkpoints if c.time_ns >= window_start]
            want = inside[0].id if inside else checkpoints[-1].id
            early = []
            for vm, segments in sorted(sizes.items()):
                total = sum(size for _, size in segments)
                if total < 100 * 1024 or want == checkpoints[-1].id:
                    continue
                for checkpoint in checkpoints:
                    if checkpoint.id <= want:
                        continue
                    want = checkpoint.id
                    if sum(size for last, size in segments if last > checkpoint.id) <= 50 * 1024:
                        break
                early.append(vm)
            assert rt._promotion_target(now_ns, sizes) == (want, early)
