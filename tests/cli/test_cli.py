"""The ``ebbtide`` command end to end: demo, checkpoints, recover, status, and its errors.

The main flows run the installed console script in a subprocess, as a person
would. Error messages and small cases call ``main()`` in-process (the same
code, without a second of interpreter start-up each).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
import re
import signal
import subprocess
import time
from collections.abc import Callable

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _cli, _demo
from tests.cli.conftest import DEMO_SECONDS, EBBTIDE, Run, environment, run_cli

MIB = 1 << 20
DEMO_DISKS = {("web", "root"): 64 * MIB, ("web", "data"): 32 * MIB, ("db", "log"): 64 * MIB}

DemoStorage = tuple[str, Run]
Cli = Callable[..., Run]


def assert_clean_exit(run: Run) -> None:
    assert run.returncode == 0, run
    assert run.stderr == "", run


def assert_error(run: Run, *fragments: str) -> None:
    """Exit 2 with one readable error on stderr that says each of ``fragments``."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    assert run.stderr.startswith("error: "), run
    message = " ".join(run.stderr.split())  # undo rich's line wrapping
    for fragment in fragments:
        assert fragment in message, run


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``cli(*args)``: run ``main(args)`` in this process and capture what it prints."""
    monkeypatch.setenv("COLUMNS", "200")

    def run(*args: str) -> Run:
        try:
            code = _cli.main(list(args))
        except SystemExit as exc:  # argparse: --version, bad usage
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        return Run(list(args), code, out, err)

    return run


# --- the demo, and reading what it left ------------------------------------------


def test_demo_verifies_recovery(demo_storage: DemoStorage) -> None:
    _url, run = demo_storage
    assert_clean_exit(run)
    assert "verified: 6 disks, 335,544,320 bytes identical" in run.stdout, run
    assert "Closed cleanly" in run.stdout
    assert "demo-1" in run.stdout  # the checkpoint table


def test_checkpoints_json(demo_storage: DemoStorage) -> None:
    url, _ = demo_storage
    run = run_cli("checkpoints", "--storage", url, "--vpg", "demo", "--json")
    assert_clean_exit(run)
    checkpoints = json.loads(run.stdout)
    ids = [c["id"] for c in checkpoints]
    assert ids == sorted(set(ids))
    tags = [c["tag"] for c in checkpoints if c["kind"] == "Tagged"]
    assert tags[:2] == ["demo-1", "demo-2"]
    assert {c["kind"] for c in checkpoints} == {"Automatic", "Tagged"}


def test_checkpoints_table(demo_storage: DemoStorage, cli: Cli) -> None:
    url, _ = demo_storage
    run = cli("checkpoints", "--storage", url, "--vpg", "demo")
    assert_clean_exit(run)
    assert "durable checkpoints of VPG 'demo'" in run.stdout
    assert "demo-1" in run.stdout
    assert "Automatic" in run.stdout


def test_recover_by_tag_writes_every_disk(
    demo_storage: DemoStorage, tmp_path: pathlib.Path
) -> None:
    url, _ = demo_storage
    out = tmp_path / "out"
    run = run_cli(
        *("recover", "--storage", url, "--vpg", "demo"),
        *("--checkpoint", "tag:demo-1", "--out", str(out)),
    )
    assert_clean_exit(run)
    assert "tag 'demo-1'" in run.stdout, run
    for (vm, disk), size in DEMO_DISKS.items():
        path = out / vm / f"{disk}.raw"
        assert path.stat().st_size == size
        assert str(path) in run.stdout
    assert not list(out.rglob("*.partial"))


def test_recover_one_vm_at_latest(
    demo_storage: DemoStorage, cli: Cli, tmp_path: pathlib.Path
) -> None:
    url, _ = demo_storage
    out = tmp_path / "out"
    run = cli(
        *("recover", "--storage", url, "--vpg", "demo", "--checkpoint", "latest"),
        *("--out", str(out), "--vm", "db"),
    )
    assert_clean_exit(run)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.raw")) == ["db/log.raw"]
    assert (out / "db" / "log.raw").stat().st_size == 64 * MIB


def test_recover_missing_tag_names_what_exists(
    demo_storage: DemoStorage, tmp_path: pathlib.Path
) -> None:
    url, _ = demo_storage
    run = run_cli(
        *("recover", "--storage", url, "--vpg", "demo"),
        *("--checkpoint", "tag:missing", "--out", str(tmp_path / "out")),
    )
    assert_error(run, "'missing'", "Available:", "tags: demo-1, demo-2")
    assert not list((tmp_path / "out").rglob("*.raw"))


def test_recover_bad_selector(demo_storage: DemoStorage, cli: Cli, tmp_path: pathlib.Path) -> None:
    url, _ = demo_storage
    run = cli(
        *("recover", "--storage", url, "--vpg", "demo"),
        *("--checkpoint", "yesterday", "--out", str(tmp_path)),
    )
    assert_error(run, "'yesterday'", "tag:NAME")


def test_status(demo_storage: DemoStorage, cli: Cli) -> None:
    url, _ = demo_storage
    run = run_cli("status", "--storage", url, "--vpg", "demo", "--json")
    assert_clean_exit(run)
    status = json.loads(run.stdout)
    assert status["manifest"]["epoch"] == 1
    assert status["manifest"]["writer"] is None  # the demo released its lease
    assert status["lastCheckpoint"]["kind"] == "Automatic"  # the final one, at close
    assert status["checkpoints"] >= 4
    assert set(status["journals"]) == {"web", "db"}
    assert all(j["bytes"] > 0 and j["segments"] > 0 for j in status["journals"].values())

    run = cli("status", "--storage", url, "--vpg", "demo")
    assert_clean_exit(run)
    assert "released cleanly" in run.stdout
    assert "web" in run.stdout
    assert "db" in run.stdout


def test_status_of_unknown_vpg(demo_storage: DemoStorage, cli: Cli) -> None:
    url, _ = demo_storage
    run = cli("status", "--storage", url, "--vpg", "nope")
    assert_error(run, "no VPG named 'nope'")


def test_demo_on_s3(s3_url: str, cli: Cli) -> None:
    # s3_url put dummy AWS credentials in os.environ; the subprocess inherits them.
    run = run_cli("demo", "--seconds", str(DEMO_SECONDS), "--storage", s3_url, timeout=60)
    assert_clean_exit(run)
    assert "verified: 6 disks" in run.stdout, run

    run = cli("checkpoints", "--storage", s3_url, "--vpg", "demo", "--json")
    assert_clean_exit(run)
    assert any(c["tag"] == "demo-1" for c in json.loads(run.stdout))


def test_ctrl_c_stops_the_workload_and_still_verifies(tmp_path: pathlib.Path) -> None:
    """From an empty directory with no --storage, the demo finds its example and uses
    ./.ebbtide/demo; Ctrl-C ends a long run early, and it still closes and verifies."""
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    started = time.monotonic()
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [str(EBBTIDE), "demo", "--seconds", "120"],
            stdout=out,
            stderr=err,
            cwd=tmp_path,
            env=environment(),
        )
    try:
        url = (tmp_path / ".ebbtide" / "demo").as_uri()
        asyncio.run(wait_for_checkpoint(url, "demo", within=30))
        process.send_signal(signal.SIGINT)
        returncode = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    run = Run(["demo"], returncode, stdout.read_text(), stderr.read_text())
    assert_clean_exit(run)
    assert "Interrupted" in run.stdout
    assert "Closed cleanly" in run.stdout
    # The tagged cut taken on stopping is verified, and the first periodic one if it came.
    assert re.search(r"verified: [36] disks", run.stdout), run
    assert time.monotonic() - started < 60


async def wait_for_checkpoint(url: str, vpg: str, *, within: float) -> None:
    """Poll the storage account until ``vpg`` has a durable checkpoint."""
    deadline = time.monotonic() + within
    async with ebbtide.open_store(url) as store:
        while True:
            with contextlib.suppress(ebbtide.CheckpointNotFound, ebbtide.BucketNotFound):
                if await ebbtide.list_checkpoints(store, vpg):
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no durable checkpoint of {vpg!r} within {within} s")
            await asyncio.sleep(0.1)


# --- usage and errors ----------------------------------------------------------------


def test_version(cli: Cli) -> None:
    run = cli("--version")
    assert_clean_exit(run)
    assert run.stdout.strip() == f"ebbtide {ebbtide.__version__}"


def test_bad_usage_exits_2_with_argparse_message(cli: Cli) -> None:
    run = cli("recover", "--vpg", "demo")
    assert run.returncode == 2, run
    assert "the following arguments are required" in run.stderr
    assert "--storage" in run.stderr


def test_bad_storage_url_exits_2_with_the_reason() -> None:
    run = run_cli("checkpoints", "--storage", "s3://Bad_Bucket/x", "--vpg", "demo")
    assert_error(run, "'Bad_Bucket' is not a valid S3 bucket name")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file://relative/dir", "needs an absolute path"),
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("file:///nonexistent-ebbtide-dir", "the directory does not exist"),
    ],
)
def test_unusable_storage_says_why(url: str, reason: str, cli: Cli) -> None:
    assert_error(cli("checkpoints", "--storage", url, "--vpg", "demo"), reason)


def test_demo_refuses_bad_storage_url(cli: Cli) -> None:
    run = cli("demo", "--seconds", "1", "--storage", "s3://Bad_Bucket")
    assert_error(run, "not a valid S3 bucket name")


def test_demo_without_its_example(cli: Cli, tmp_path: pathlib.Path) -> None:
    run = cli("demo", "--seconds", "1", "--examples", str(tmp_path))
    assert_error(run, "demo.yaml does not exist", "--examples")


def test_demo_fails_when_recovery_differs_from_the_model(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    # In-process: a model that remembers the first byte of every write wrongly.
    remember = _demo.DiskModel.write

    def misremember(self: _demo.DiskModel, offset: int, data: bytes) -> None:
        remember(self, offset, bytes([data[0] ^ 0xFF]) + data[1:])

    monkeypatch.setattr(_demo.DiskModel, "write", misremember)
    run = cli("demo", "--seconds", "1", "--storage", tmp_path.as_uri())
    assert run.returncode == 1, run
    message = " ".join(run.stdout.split())
    assert "verification failed" in message, run
    assert "differs from the model first at byte" in message, run
    assert "verified:" not in message
