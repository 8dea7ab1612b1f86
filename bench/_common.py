"""Helpers shared by the benchmarks in ``bench/``: the S3 server, child phases, reporting.

Every benchmark runs each measured phase in a child process (the same
script with ``--phase``), so that each phase's peak RSS is its own and one
phase's garbage does not slow the next. The parent starts one moto S3
server (``tests/s3server.py``), runs the children against it, and gathers
what each child writes to its result file (JSON).

Units: MB/s is 10**6 bytes per second; sizes are in binary units (KiB, MiB, GiB).
"""

from __future__ import annotations

import contextlib
import cProfile
import json
import os
import pathlib
import platform
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: The dummy credentials moto accepts while authentication is off.
ACCESS_KEY = "testing"
SECRET_KEY = "testing"  # a well-known dummy, not a secret
REGION = "us-east-1"


def ensure_repo_on_path() -> None:
    """Make ``tests.s3server`` (and the engine, if not installed) importable."""
    for path in (REPO, REPO / "engine"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


# --- the machine ---------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pyarrow": _version("pyarrow"),
        "moto": _version("moto"),
        "aiobotocore": _version("aiobotocore"),
        "botocore": _version("botocore"),
        "ebbtide": _version("ebbtide"),
    }


# --- measuring inside a child -----------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss() -> int:
    """This process's peak resident set size (VmHWM), in bytes."""
    return _status_kib("VmHWM") * KiB


def current_rss() -> int:
    """This process's resident set size now (VmRSS), in bytes."""
    return _status_kib("VmRSS") * KiB


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks  # utime, stime


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs of the machine have spent busy since boot (from /proc/stat)."""
    fields = pathlib.Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class Stopwatch:
    """Wall time, and the CPU time of this process, of the S3 server and of the rest.

    ``other_cpu_seconds`` is what every other process on the machine used
    meanwhile: anything well above zero means the figures were disturbed.
    """

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.seconds = 0.0
        self.cpu_seconds = 0.0
        self.server_cpu_seconds = 0.0
        self.other_cpu_seconds = 0.0

    def __enter__(self) -> Stopwatch:
        self._busy0 = machine_busy_seconds()
        self._server0 = process_cpu_seconds(self.server_pid)
        self._cpu0 = time.process_time()
        self._wall0 = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._wall0
        self.cpu_seconds = time.process_time() - self._cpu0
        self.server_cpu_seconds = process_cpu_seconds(self.server_pid) - self._server0
        busy = machine_busy_seconds() - self._busy0
        self.other_cpu_seconds = max(0.0, busy - self.cpu_seconds - self.server_cpu_seconds)

    def as_dict(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "server_cpu_seconds": self.server_cpu_seconds,
            "other_cpu_seconds": self.other_cpu_seconds,
        }


class RandomData:
    """Incompressible bytes, reproducible: chunk ``i`` of a run is always the same.

    Chunks are slices of one random pool at offsets that do not repeat with
    the disk layout, so a write landing at the wrong place changes the image
    hash; the pool is generated once (outside any timed span).
    """

    def __init__(self, size: int, pool_bytes: int = 64 * MiB, seed: int = 0) -> None:
        self.size = size
        self.pool = random.Random(seed).randbytes(pool_bytes + size)
        self._span = pool_bytes

    def chunk(self, i: int) -> bytes:
        start = (i * 1_000_003) % self._span
        return self.pool[start : start + self.size]


@contextlib.contextmanager
def maybe_profile(path: pathlib.Path | None) -> Iterator[None]:
    """Run the block under cProfile (this thread only) and save it to ``path`` (+ ``.txt``)."""
    if path is None:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        path.parent.mkdir(parents=True, exist_ok=True)
        profile.dump_stats(path)
        with path.with_suffix(".txt").open("w") as text:
            stats = pstats.Stats(profile, stream=text)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(30)


# --- running children ----------------------------------------------------------------


class BenchError(Exception):
    """Something is off: the message says what, and the run fails."""


def run_phase(script: pathlib.Path, phase: str, args: Sequence[str]) -> dict[str, Any]:
    """Run ``script --phase PHASE ARGS...`` in a child; return the JSON it wrote."""
    fd, name = tempfile.mkstemp(prefix=f"bench-{phase}-", suffix=".json")
    os.close(fd)
    result = pathlib.Path(name)
    try:
        command = [sys.executable, str(script), "--phase", phase, "--result", str(result), *args]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            tail = "\n".join((completed.stderr or completed.stdout).splitlines()[-40:])
            raise BenchError(
                f"phase {phase!r} failed (exit {completed.returncode}):\n"
                f"  {' '.join(command)}\n{tail}"
            )
        data: dict[str, Any] = json.loads(result.read_text())
        if completed.stderr.strip():
            data.setdefault("stderr", completed.stderr.strip()[-2000:])
        return data
    finally:
        result.unlink(missing_ok=True)


def write_result(path: pathlib.Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --- figures -------------------------------------------------------------------------


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def size_label(nbytes: int) -> str:
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= factor and nbytes % factor == 0:
            return f"{nbytes // factor} {unit}"
    return f"{nbytes} B"


def mib(nbytes: float) -> float:
    return nbytes / MiB
