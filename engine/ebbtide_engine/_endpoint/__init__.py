"""The replication endpoint: NBD exports wired to a VPG's journal (public surface).

``Endpoint`` serves every disk of a VPG as an NBD export ``<vpg>/<vm>/<disk>``
and journals each change through a ``VpgRuntime``; proxy disks are local
files it serves, mirror targets receive a hypervisor's ``blockdev-mirror``.
A persistent dirty-region map per disk limits what a restart must resend.
docs/endpoint.md describes it all.
"""

from ebbtide_engine._endpoint._dirtymap import MapImage
from ebbtide_engine._endpoint._dirtymap import read as read_dirty_map
from ebbtide_engine._endpoint._disk import SyncState
from ebbtide_engine._endpoint._service import (
    DiskStatus,
    Endpoint,
    EndpointOptions,
    EndpointStatus,
)

__all__ = [
    "DiskStatus",
    "Endpoint",
    "EndpointOptions",
    "EndpointStatus",
    "MapImage",
    "SyncState",
    "read_dirty_map",
]
