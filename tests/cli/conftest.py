"""Running the real ``ebbtide`` console script, as a person would, in a subprocess.

Every run has a timeout. Output goes to files (no pipe to fill up), and rich
gets a wide terminal so that assertions on a line are not broken by wrapping.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
from collections.abc import Mapping

import pytest

EBBTIDE = pathlib.Path(sys.executable).parent / "ebbtide"
REPO = pathlib.Path(__file__).resolve().parents[2]
#: A demo of this many seconds; the suite's budget assumes it.
DEMO_SECONDS = 4


@dataclasses.dataclass(frozen=True)
class Run:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (
            f"ebbtide {' '.join(self.args)} -> exit {self.returncode}\n"
            f"--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"
        )


def environment(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(extra or {})}
    env.pop("FORCE_COLOR", None)
    return env


def run_cli(
    *args: str,
    timeout: float = 30,
    cwd: pathlib.Path | None = None,
    env: Mapping[str, str] | None = None,
) -> Run:
    """Run ``ebbtide ARGS`` to completion (or fail the test after ``timeout`` s)."""
    completed = subprocess.run(
        [str(EBBTIDE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or REPO,
        env=environment(env),
        check=False,
    )
    return Run(list(args), completed.returncode, completed.stdout, completed.stderr)


@pytest.fixture(scope="module")
def demo_storage(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Run]:
    """A storage account that one short ``ebbtide demo`` run filled, and that run."""
    root = tmp_path_factory.mktemp("demo-storage")
    url = root.as_uri()
    run = run_cli("demo", "--seconds", str(DEMO_SECONDS), "--storage", url, timeout=60)
    return url, run
