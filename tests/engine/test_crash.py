"""kill -9 of a writer at random moments: every listed checkpoint still recovers exactly.

Each run starts ``crash_writer`` (a separate process doing a deterministic
workload with checkpoints it does not wait for), kills it with SIGKILL at a
random moment while it writes and uploads, and then checks, as a reader:
every object under the VPG decodes and verifies (no partial object is ever
visible), every listed checkpoint recovers byte for byte to the replayed
model, and a new writer can take over, write and checkpoint on top (it is
killed in turn, and the first writer's last checkpoint must still recover).
Runs alternate between the local-directory and the S3 (moto) backend. The
loop itself is ``tests/crashkit.py``'s, shared with the history crash test.
"""

from __future__ import annotations

import pathlib

import pytest

from tests import crashkit
from tests.engine import crash_writer

RUNS = 20  # half local directory, half S3


@pytest.mark.slow
@pytest.mark.parametrize("run", range(RUNS))
async def test_kill_minus_nine_at_a_random_moment(
    run: int, tmp_path: pathlib.Path, request: pytest.FixtureRequest
) -> None:
    crash = crashkit.CrashRun(
        url=crashkit.account_url(run, tmp_path, request),
        vpg=crash_writer.VPG,
        spec=crash_writer.spec(),
        module="tests.engine.crash_writer",
        workload=crash_writer.operations,
        kill_window=(0.05, 1.2),
    )
    await crashkit.crash_generations(crash, run, tmp_path)
