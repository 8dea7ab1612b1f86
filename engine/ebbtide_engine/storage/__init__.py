"""Storage accounts: the object-store interface and its backends (public surface)."""

from ebbtide_engine.storage._account import S3Credentials, StorageAccount, open_store
from ebbtide_engine.storage._base import ObjectInfo, ObjectStore, StoredObject
from ebbtide_engine.storage._local import LocalStore
from ebbtide_engine.storage._memory import MemoryStore
from ebbtide_engine.storage._s3 import S3Store

__all__ = [
    "LocalStore",
    "MemoryStore",
    "ObjectInfo",
    "ObjectStore",
    "S3Credentials",
    "S3Store",
    "StorageAccount",
    "StoredObject",
    "open_store",
]
