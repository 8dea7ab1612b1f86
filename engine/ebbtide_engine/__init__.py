"""Ebbtide's data plane: journals, checkpoints and recovery (the engine's public API).

The operator and the CLI use only the names exported here::

    spec = VpgSpec.parse("demo", {...})           # or VpgSpec.from_resource(yaml_doc)
    store = open_store("s3://bucket/prefix?endpoint=http://127.0.0.1:9000")
    async with await VpgRuntime.open(spec, store) as runtime:
        await runtime.write("web", "root", 0, b"...")
        checkpoint = await runtime.checkpoint(tag="before-upgrade")
    await recover_to_files(store, "demo", CheckpointSelector(tag="before-upgrade"), out_dir)
"""

from ebbtide_engine._endpoint import (
    DiskStatus,
    Endpoint,
    EndpointOptions,
    EndpointStatus,
    SyncState,
)
from ebbtide_engine._errors import (
    AccessDenied,
    BucketNotFound,
    CheckpointNotFound,
    CorruptObjectError,
    EbbtideError,
    FencedError,
    InvalidRequest,
    ObjectExists,
    ObjectNotFound,
    PreconditionFailed,
    RuntimeClosed,
    SpecError,
    StorageError,
    StorageUnavailable,
)
from ebbtide_engine._holds import Hold, HoldLease, PromotedDuringRead, list_holds, place_hold
from ebbtide_engine._index import Checkpoint, CheckpointKind
from ebbtide_engine._lease import Manifest
from ebbtide_engine._promotion import Promotion
from ebbtide_engine._recovery import (
    BucketStatus,
    CheckpointSelector,
    JournalUsage,
    RecoveredDisk,
    RecoveryResult,
    list_checkpoints,
    read_bucket_status,
    recover_to_files,
)
from ebbtide_engine._runtime import (
    Maintenance,
    RuntimeOptions,
    RuntimeStatus,
    VoidWrites,
    VpgRuntime,
)
from ebbtide_engine._sla import Condition, SlaStatus, VmJournal
from ebbtide_engine._sla import evaluate as evaluate_sla
from ebbtide_engine._spec import (
    DilutionSpec,
    DilutionTier,
    DiskSpec,
    JournalSpec,
    VmSpec,
    VpgSpec,
    parse_duration,
    parse_quantity,
)
from ebbtide_engine._testexport import (
    RecoveryExport,
    RecoveryExportOptions,
    RecoveryExportStatus,
)
from ebbtide_engine.storage import (
    LocalStore,
    MemoryStore,
    ObjectStore,
    S3Credentials,
    StorageAccount,
    open_store,
)

__version__ = "0.1.0"

__all__ = [
    "AccessDenied",
    "BucketNotFound",
    "BucketStatus",
    "Checkpoint",
    "CheckpointKind",
    "CheckpointNotFound",
    "CheckpointSelector",
    "Condition",
    "CorruptObjectError",
    "DilutionSpec",
    "DilutionTier",
    "DiskSpec",
    "DiskStatus",
    "EbbtideError",
    "Endpoint",
    "EndpointOptions",
    "EndpointStatus",
    "FencedError",
    "Hold",
    "HoldLease",
    "InvalidRequest",
    "JournalSpec",
    "JournalUsage",
    "LocalStore",
    "Maintenance",
    "Manifest",
    "MemoryStore",
    "ObjectExists",
    "ObjectNotFound",
    "ObjectStore",
    "PreconditionFailed",
    "PromotedDuringRead",
    "Promotion",
    "RecoveredDisk",
    "RecoveryExport",
    "RecoveryExportOptions",
    "RecoveryExportStatus",
    "RecoveryResult",
    "RuntimeClosed",
    "RuntimeOptions",
    "RuntimeStatus",
    "S3Credentials",
    "SlaStatus",
    "SpecError",
    "StorageAccount",
    "StorageError",
    "StorageUnavailable",
    "SyncState",
    "VmJournal",
    "VmSpec",
    "VoidWrites",
    "VpgRuntime",
    "VpgSpec",
    "evaluate_sla",
    "list_checkpoints",
    "list_holds",
    "open_store",
    "parse_duration",
    "parse_quantity",
    "place_hold",
    "read_bucket_status",
    "recover_to_files",
]
