"""The upload path's request signing: which PUTs carry a signed payload SHA-256, and which not.

Signing the payload costs a SHA-256 of every uploaded byte (~0.9 s of CPU per
GiB). Over plain HTTP to this machine (the moto server here) no network
attacker can alter a body, and our CRC-32C goes with each PUT, so the
payload is sent unsigned, as botocore already does over HTTPS; plain HTTP to
another host keeps it signed.
"""

from __future__ import annotations

from typing import Any

import pytest

from ebbtide_engine import storage
from ebbtide_engine.storage import _s3


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("http://127.0.0.1:9000", True),
        ("http://127.1.2.3", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("https://127.0.0.1:9000", False),  # TLS: botocore's own choice applies
        ("http://10.0.0.7:9000", False),
        ("http://minio.example:9000", False),
        (None, False),  # AWS itself: HTTPS
    ],
)
def test_only_plain_http_to_this_machine_is_loopback(url: str | None, loopback: bool) -> None:
    assert _s3._loopback(url) is loopback


async def test_puts_to_a_loopback_server_do_not_hash_the_payload(s3_url: str) -> None:
    store = storage.open_store(s3_url)
    assert isinstance(store, _s3.S3Store)
    seen: list[str] = []

    def capture(request: Any, **_: Any) -> None:
        seen.append(request.headers.get("X-Amz-Content-SHA256", b"").decode())

    try:
        client = await store._get_client()
        client.meta.events.register("before-send.s3.PutObject", capture)
        await store.put_new("a/segment", b"x" * 100_000)
        assert (await store.get("a/segment")).data == b"x" * 100_000
    finally:
        await store.close()
    assert seen == ["UNSIGNED-PAYLOAD"]
