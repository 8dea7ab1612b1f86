"""StorageAccount resolution: a reference in a VPG or Recovery → an open object store.

The operator knows StorageAccounts and Secrets from Kopf indexes (in-memory
copies of what it watches), so resolving needs no API call. A Secret's
``data`` values are base64, as the API serves them; the decoded keys go to
``ebbtide_engine.S3Credentials`` and nowhere else: :class:`AccountProblem`
messages name the Secret and the key, never a value.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Mapping
from typing import Any

import ebbtide_engine

Key = tuple[str, str]  # (namespace, name)
Index = Mapping[Key, Any]  # a kopf.Index: key -> a store of values


class AccountProblem(Exception):
    """A StorageAccount that cannot be used: ``reason`` (CamelCase) and what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(frozen=True, slots=True)
class ResolvedAccount:
    name: str
    url: str
    credentials: ebbtide_engine.S3Credentials | None = dataclasses.field(repr=False)

    def open(self) -> ebbtide_engine.ObjectStore:
        """Open the store (no I/O yet); raises AccountProblem for a URL the engine refuses."""
        try:
            return ebbtide_engine.open_store(self.url, credentials=self.credentials)
        except ebbtide_engine.SpecError as exc:
            raise AccountProblem(
                "InvalidStorageAccount", f"StorageAccount {self.name!r}: {exc}"
            ) from None

    async def check(self) -> None:
        """Open the store, reach the bucket, close: raises AccountProblem or StorageError."""
        store = self.open()
        try:
            await store.check()
        finally:
            await store.close()


def first(index: Index, key: Key) -> Any:
    """The value a Kopf index holds for ``key``, or None."""
    values = index.get(key)
    return next(iter(values), None) if values is not None else None


def resolve(namespace: str, name: str, *, accounts: Index, secrets: Index) -> ResolvedAccount:
    """Find StorageAccount ``namespace/name`` and its credentials, or raise AccountProblem."""
    spec = first(accounts, (namespace, name))
    if spec is None:
        raise AccountProblem(
            "StorageAccountNotFound",
            f"StorageAccount {name!r} does not exist in namespace {namespace!r}; create it or "
            "fix spec.storageAccountRef.name",
        )
    url = str(spec.get("url") or "")
    ref = spec.get("credentialsSecretRef")
    if not ref:
        return ResolvedAccount(name, url, None)
    secret_name = str(ref.get("name"))
    data = first(secrets, (namespace, secret_name))
    if data is None:
        raise AccountProblem(
            "SecretNotFound",
            f"StorageAccount {name!r}: Secret {secret_name!r} does not exist in namespace "
            f"{namespace!r}; create it or fix spec.credentialsSecretRef.name",
        )
    values = []
    for field, default in (
        ("accessKeyIdKey", "AWS_ACCESS_KEY_ID"),
        ("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY"),
    ):
        key = str(ref.get(field) or default)
        encoded = data.get(key)
        if encoded is None:
            raise AccountProblem(
                "SecretKeyMissing",
                f"StorageAccount {name!r}: Secret {secret_name!r} has no key {key!r}; add it "
                f"or set spec.credentialsSecretRef.{field}",
            )
        try:
            values.append(base64.b64decode(encoded, validate=True).decode())
        except (binascii.Error, UnicodeDecodeError):
            raise AccountProblem(
                "SecretKeyInvalid",
                f"StorageAccount {name!r}: Secret {secret_name!r} key {key!r} is not base64 "
                "of UTF-8 text",
            ) from None
    return ResolvedAccount(name, url, ebbtide_engine.S3Credentials(values[0], values[1]))
