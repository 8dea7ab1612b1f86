"""Failover-test exports: a VPG's disks at a checkpoint over NBD, at once (public surface).

``RecoveryExport`` serves every chosen disk as NBD export ``<vpg>/<vm>/<disk>``
without materialising it: reads are resolved from the scratch overlay, the
journal above the promoted LSN and the recovery disks' chunks, fetched on
demand; writes from test VMs go to a local scratch overlay only.
docs/testexport.md describes it.
"""

from ebbtide_engine._testexport._export import (
    RecoveryExport,
    RecoveryExportOptions,
    RecoveryExportStatus,
)

__all__ = ["RecoveryExport", "RecoveryExportOptions", "RecoveryExportStatus"]
