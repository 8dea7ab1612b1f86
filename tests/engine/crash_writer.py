"""A writer process for the kill -9 tests: a deterministic workload on one VPG.

``python -m tests.engine.crash_writer URL SEED`` opens the VPG ``crash``
(forcing a takeover: the previous process was killed), prints ``ready``
and then performs ``operations(seed)`` forever: writes, trims, zero-writes
and, every few operations, a checkpoint that it does *not* wait for, so
that uploads and commits are in flight whenever it is killed. The test
replays the same operations to know what every checkpoint must contain
(``tests/crashkit.py`` holds the workload, the loop and the replay).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import ebbtide_engine as ebbtide
from tests import crashkit
from tests.engine import model

VPG = "crash"


def spec() -> ebbtide.VpgSpec:
    return model.spec(VPG, journal={"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi"})


def operations(seed: int) -> Iterator[crashkit.Operation]:
    return crashkit.operations(spec(), seed, checkpoint_probability=0.012, max_length=20_000)


def options() -> ebbtide.RuntimeOptions:
    return ebbtide.RuntimeOptions(
        auto_checkpoints=False, takeover="force", retry_initial_seconds=0.01
    )


if __name__ == "__main__":
    url, seed = sys.argv[1], int(sys.argv[2])
    asyncio.run(crashkit.serve(url, spec(), options(), operations(seed)))
