"""The errors every layer of the engine raises, in one place.

Every error says what was wrong, where (the object key, the field, the
storage account) and what to do about it: the message is what a person
reads in `kubectl describe`, in the CLI, or in a log line.
"""

from __future__ import annotations


class EbbtideError(Exception):
    """Base of every error the engine raises on purpose."""


class SpecError(EbbtideError):
    """A VPG or storage-account spec is invalid; the message names each field."""


class StorageError(EbbtideError):
    """The storage account failed an operation (base of the storage errors)."""


class ObjectNotFound(StorageError):
    """The object does not exist."""


class ObjectExists(StorageError):
    """A create-only put found the key already taken."""


class PreconditionFailed(StorageError):
    """A conditional put found another version than the one it expected."""


class BucketNotFound(StorageError):
    """The bucket (or the local directory) of a storage account does not exist."""


class AccessDenied(StorageError):
    """The credentials were refused, or lack a permission."""


class StorageUnavailable(StorageError):
    """The endpoint could not be reached, or kept failing after retries."""


class CorruptObjectError(EbbtideError):
    """A stored object failed its integrity check; ``key`` names it."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(
            f"corrupt object {key!r}: {problem}. The object is not used; "
            "recover to a checkpoint that does not need it, or restore it from a backup."
        )


class FencedError(EbbtideError):
    """Another writer holds, or took over, this VPG's journal."""


class CheckpointNotFound(EbbtideError):
    """No durable checkpoint matches what was asked for."""


class InvalidRequest(EbbtideError):
    """A write, trim or checkpoint request is malformed (unknown disk, out of range...)."""


class RuntimeClosed(EbbtideError):
    """The VPG runtime was closed (or failed) and takes no more requests."""
