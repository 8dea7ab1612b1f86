"""A writer process for the history kill -9 tests: writes, checkpoints, promotion, dilution.

``python -m tests.history.crash_history_writer URL SEED T0`` opens the VPG
``crash-history`` (forcing a takeover) with a clock that runs 7,200 times
faster than the wall clock from ``T0`` (one real second is two hours, so
the 1-hour history window and the dilution tiers are crossed within a
second), prints ``ready <first lsn>``, then performs ``operations(seed)``
forever without waiting for its (automatic) checkpoints, while history
passes (promotion, GC, dilution, index rewrites) run back to back in the
background. The test kills it at a random moment and replays the same
operations to know what every checkpoint must contain (``tests/crashkit.py``).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator

import ebbtide_engine as ebbtide
from tests import crashkit
from tests.engine import model

VPG = "crash-history"
SPEED = 7200.0
DILUTION = {
    "threshold": 5,
    "tiers": [
        {"olderThan": "10m", "keep": 2, "per": "5m"},
        {"olderThan": "30m", "keep": 1, "per": "10m"},
    ],
}


def spec() -> ebbtide.VpgSpec:
    return model.spec(
        VPG,
        journalHistory="1h",
        dilution=DILUTION,
        journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"},
    )


def clock(t0: float) -> float:
    return 1_800_000_000.0 + (time.time() - t0) * SPEED


def operations(seed: int) -> Iterator[crashkit.Operation]:
    return crashkit.operations(spec(), seed, checkpoint_probability=0.08, max_length=8_000)


def options(t0: float) -> ebbtide.RuntimeOptions:
    return ebbtide.RuntimeOptions(
        auto_checkpoints=False,
        takeover="force",
        retry_initial_seconds=0.01,
        lease_seconds=1.0,  # the next writer's first promotion waits half of it (forced takeover)
        clock=lambda: clock(t0),
        maintenance_seconds=0.02,
        mirror_chunk_size=4096,
        compact_every=16,
    )


if __name__ == "__main__":
    url, seed, t0 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    workload = operations(seed)
    kind = ebbtide.CheckpointKind.AUTOMATIC  # dilution thins only automatic ones
    asyncio.run(crashkit.serve(url, spec(), options(t0), workload, kind=kind))
