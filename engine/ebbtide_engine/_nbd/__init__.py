"""Ebbtide's NBD server: the protocol layer of the replication endpoint (public surface).

``NbdServer`` serves named exports (``<vpg>/<vm>/<disk>``) over fixed-newstyle
NBD; each export is an ``ExportBackend``. ``FileBackend`` serves a local file
or block device. What is advertised and why: docs/nbd.md.
"""

from ebbtide_engine._nbd._backend import ExportBackend, NbdError
from ebbtide_engine._nbd._file import FileBackend
from ebbtide_engine._nbd._protocol import Errno
from ebbtide_engine._nbd._server import NbdServer, validate_export_name

__all__ = [
    "Errno",
    "ExportBackend",
    "FileBackend",
    "NbdError",
    "NbdServer",
    "validate_export_name",
]
