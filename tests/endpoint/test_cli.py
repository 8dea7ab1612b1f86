"""``ebbtide endpoint``'s refusals: what a person sees for a bad spec file or a missing disk.

(The command's normal life, from start to SIGTERM and after a kill -9, is
in test_crash.py, where it runs as a separate process.)
"""

from __future__ import annotations

import pathlib

import pytest

from ebbtide_engine import _cli

VPG = """\
apiVersion: ebbtide.io/v1alpha1
kind: VirtualProtectionGroup
metadata:
  name: {name}
spec:
  vms:
    - name: vm
      disks:
        - name: root
          size: 1Mi
          mode: Proxy
          source:
            path: {path}
"""


def _endpoint(tmp_path: pathlib.Path, spec: str) -> int:
    path = tmp_path / "vpg.yaml"
    path.write_text(spec)
    account = (tmp_path / "account").as_uri()
    state = str(tmp_path / "state")
    return _cli.main(
        ["endpoint", "--storage", account, "--state-dir", state, "--port", "0", str(path)]
    )


def test_a_file_with_two_vpgs_is_refused(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = VPG.format(name="one", path=tmp_path) + "---\n" + VPG.format(name="two", path=tmp_path)
    assert _endpoint(tmp_path, spec) == _cli.EXIT_ERROR
    error = " ".join(capsys.readouterr().err.split())
    assert "holds 2 VirtualProtectionGroup resources (one, two)" in error


def test_a_missing_proxy_source_is_refused_before_the_lease_is_taken(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-disk.raw"
    assert _endpoint(tmp_path, VPG.format(name="lost", path=missing)) == _cli.EXIT_ERROR
    error = " ".join(capsys.readouterr().err.split())
    assert f"disk vm/root: source.path {missing} does not exist" in error
    assert not (tmp_path / "account" / "vpgs").exists()  # nothing was written to storage
