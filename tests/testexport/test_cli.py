"""``ebbtide test-export``: the real console script serving a checkpoint, stopped by SIGTERM."""

from __future__ import annotations

import asyncio
import os
import pathlib
import re
import signal
import sys

import ebbtide_engine as ebbtide
from tests.cli.conftest import environment
from tests.nbd._support import need, run
from tests.testexport.conftest import VPG, Protected

EBBTIDE = pathlib.Path(sys.executable).parent / "ebbtide"


async def _wait_for(path: pathlib.Path, pattern: str, process: asyncio.subprocess.Process) -> str:
    """Poll the output file until ``pattern`` matches a line; fail if the process exits first."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        text = await asyncio.to_thread(path.read_text)
        found = re.search(pattern, text, re.MULTILINE)
        if found is not None:
            return found.group(0)
        if process.returncode is not None or asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"no line matching {pattern!r} in the output:\n{text}")
        await asyncio.sleep(0.05)


async def test_cli_serves_until_sigterm_then_cleans_up(
    protected: Protected, s3_url: str, tmp_path: pathlib.Path
) -> None:
    need("nbdcopy")
    scratch = tmp_path / "scratch"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            str(EBBTIDE),
            *("test-export", "--storage", s3_url, "--vpg", VPG, "--checkpoint", "tag:test"),
            *("--scratch", str(scratch), "--port", "0", "--vm", "web"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=environment(),
        )
    try:
        url = await _wait_for(out, r"nbd://127\.0\.0\.1:\d+/failover/web/root$", process)
        assert re.search(rf"at checkpoint {protected.test.id} .*tag 'test'", out.read_text())
        copy = tmp_path / "root.raw"
        await run("nbdcopy", url, str(copy))
        expected = protected.model.checkpoints[protected.test.id][("web", "root")]
        assert await asyncio.to_thread(copy.read_bytes) == expected
        await run("qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", url)
        assert len(list(scratch.iterdir())) == 1  # the export's private directory
        holds = await ebbtide.list_holds(protected.store, VPG)
        assert [hold.owner for hold in holds] == [f"cli/{os.uname().nodename}/{process.pid}"]
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(30):
            assert await process.wait() == 0, err.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert "Stopped:" in out.read_text()
    assert "1 writes" in out.read_text()
    assert list(scratch.iterdir()) == []
    assert await ebbtide.list_holds(protected.store, VPG) == []


async def test_cli_reports_a_missing_checkpoint_on_one_line(
    protected: Protected, s3_url: str, tmp_path: pathlib.Path
) -> None:
    process = await asyncio.create_subprocess_exec(
        str(EBBTIDE),
        *("test-export", "--storage", s3_url, "--vpg", VPG, "--checkpoint", "tag:nope"),
        *("--scratch", str(tmp_path / "scratch"), "--port", "0"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environment(),
    )
    async with asyncio.timeout(60):
        _stdout, stderr = await process.communicate()
    assert process.returncode == 2
    assert f"VPG {VPG!r} has no checkpoint tagged 'nope'" in stderr.decode()
    assert await ebbtide.list_holds(protected.store, VPG) == []
