"""Fixtures: an endpoint environment on a local-directory storage account per test."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator

import pytest

from ._support import EndpointEnv


@pytest.fixture
def account_url(tmp_path: pathlib.Path) -> str:
    """A fresh local-directory storage account (``file://``)."""
    root = tmp_path / "account"
    root.mkdir()
    return root.as_uri()


@pytest.fixture
async def env(tmp_path: pathlib.Path, account_url: str) -> AsyncIterator[EndpointEnv]:
    endpoint_env = EndpointEnv(tmp_path, account_url)
    try:
        yield endpoint_env
    finally:
        await endpoint_env.aclose()


@pytest.fixture
async def s3_env(tmp_path: pathlib.Path, s3_url: str) -> AsyncIterator[EndpointEnv]:
    """The same on a bucket of the moto S3 server."""
    endpoint_env = EndpointEnv(tmp_path, s3_url)
    try:
        yield endpoint_env
    finally:
        await endpoint_env.aclose()
