"""Fixtures: file-backed exports in tmp_path and servers in the test's event loop."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from ._support import NbdEnv


@pytest.fixture
async def env(tmp_path: pathlib.Path) -> AsyncIterator[NbdEnv]:
    nbd_env = NbdEnv(tmp_path)
    try:
        yield nbd_env
    finally:
        await nbd_env.aclose()
