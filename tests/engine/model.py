"""A plain in-memory model of a VPG's disks, the oracle recovery is compared with.

It knows nothing of journals or segments: a write replaces bytes, a trim or
a zero-write makes them zeros, and a checkpoint is a frozen copy of every
disk. If the engine recovers a checkpoint to exactly the model's copy, it
kept write order and the cut.
"""

from __future__ import annotations

import pathlib

import ebbtide_engine as ebbtide


class DisksModel:
    def __init__(self, spec: ebbtide.VpgSpec) -> None:
        self.disks = {
            (vm.name, disk.name): bytearray(disk.size) for vm in spec.vms for disk in vm.disks
        }
        self.checkpoints: dict[int, dict[tuple[str, str], bytes]] = {}

    def write(self, vm: str, disk: str, offset: int, data: bytes) -> None:
        self.disks[(vm, disk)][offset : offset + len(data)] = data

    def zero(self, vm: str, disk: str, offset: int, length: int) -> None:
        self.disks[(vm, disk)][offset : offset + length] = bytes(length)

    def checkpoint(self, checkpoint_id: int) -> None:
        self.checkpoints[checkpoint_id] = {key: bytes(data) for key, data in self.disks.items()}

    def revert_to(self, checkpoint_id: int | None) -> None:
        """After a crash, what survives is the last durable checkpoint."""
        for key, data in self.disks.items():
            data[:] = (
                bytes(len(data)) if checkpoint_id is None else self.checkpoints[checkpoint_id][key]
            )

    def assert_recovered(self, checkpoint_id: int, out_dir: pathlib.Path) -> None:
        expected = self.checkpoints[checkpoint_id]
        for (vm, disk), data in expected.items():
            got = (out_dir / vm / f"{disk}.raw").read_bytes()
            if got != data:
                first = next(i for i, (a, b) in enumerate(zip(got, data, strict=True)) if a != b)
                raise AssertionError(
                    f"checkpoint {checkpoint_id}: {vm}/{disk} differs from the model "
                    f"first at byte {first} (got {got[first]:#x}, want {data[first]:#x})"
                )


def spec(name: str = "vpg", **overrides: object) -> ebbtide.VpgSpec:
    """A small two-VM VPG (three disks of odd sizes) for tests."""
    body: dict[str, object] = {
        "vms": [
            {
                "name": "web",
                "disks": [{"name": "root", "size": 64 * 1024}, {"name": "data", "size": 24 * 1024}],
            },
            {"name": "db", "disks": [{"name": "log", "size": 40 * 1024}]},
        ],
        "journal": {"segmentMaxBytes": "64Ki", "maxUnshippedBytes": "1Mi", "uploadConcurrency": 4},
    }
    body.update(overrides)
    return ebbtide.VpgSpec.parse(name, body)


def options(**overrides: object) -> ebbtide.RuntimeOptions:
    """Runtime options for tests: manual checkpoints, fast retries, a short lease."""
    values: dict[str, object] = {
        "auto_checkpoints": False,
        "retry_initial_seconds": 0.01,
        "retry_max_seconds": 0.05,
        "lease_seconds": 1.0,
    }
    values.update(overrides)
    return ebbtide.RuntimeOptions(**values)  # type: ignore[arg-type]
