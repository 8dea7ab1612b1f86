"""Placeholder: the S3 backend on aiobotocore (being written)."""

from __future__ import annotations

from ebbtide_engine.storage import _memory


class S3Store(_memory.MemoryStore):
    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        region: str | None,
        credentials: tuple[str, str, str | None] | None,
        addressing_style: str,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
        description: str,
    ) -> None:
        super().__init__(bucket)
