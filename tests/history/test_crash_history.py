"""kill -9 during promotion, garbage collection and dilution: every listed checkpoint survives.

Each run starts ``crash_history_writer`` (a deterministic workload with a
fast clock and history passes running back to back), kills it with SIGKILL
at a random moment, then checks as a reader: every object verifies, no
listed checkpoint is below the promoted LSN, the recovery disks at the
promoted LSN exist, and every listed checkpoint of the run recovers byte
for byte to the replayed model; then a second writer takes over (resuming
what the first left half done) and is killed in turn, and the checks
repeat, including the first generation's last checkpoint if still listed
(promotion or dilution may have dropped it). Runs alternate between the
local-directory and the S3 (moto) backend. The loop is ``tests/crashkit.py``'s.
"""

from __future__ import annotations

import pathlib
import time

import pytest

from tests import crashkit
from tests.history import crash_history_writer as writer

RUNS = 20  # half local directory, half S3


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_kill_minus_nine_during_history_passes(
    run: int, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    crash = crashkit.CrashRun(
        url=crashkit.account_url(run, tmp_path, request),
        vpg=writer.VPG,
        spec=writer.spec(),
        module="tests.history.crash_history_writer",
        workload=writer.operations,
        kill_window=(0.3, 1.5),
        extra=(time.time(),),  # T0 of the writers' fast clock
        require_previous=False,
        require_promotion=True,
    )
    promoted_seen = await crashkit.crash_generations(crash, run, tmp_path)
    assert promoted_seen > 0  # the kills did land among history passes
