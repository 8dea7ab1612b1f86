"""Fixtures: a running Kubernetes API server emulator, and a kubeconfig for it.

- ``apiserver`` (async, function-scoped): an :class:`apiserver.RunningApiServer`
  serving our CRDs from crds/*.yaml on ``http://127.0.0.1:<free port>``;
  ``apiserver.url`` for clients, ``apiserver.emulator`` for assertions
  (``apiserver.emulator.objects[...]``, ``.requests``) and kmock reactions.
- ``kubeconfig``: a ``pathlib.Path`` to a kubeconfig file pointing at it
  (context "emulator", namespace "default", no TLS, a dummy token).
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest
import yaml

from . import apiserver as emulation


@pytest.fixture
async def apiserver() -> AsyncIterator[emulation.RunningApiServer]:
    async with emulation.serve() as running:
        yield running


@pytest.fixture
def kubeconfig(apiserver: emulation.RunningApiServer, tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(apiserver.kubeconfig()))
    return path
