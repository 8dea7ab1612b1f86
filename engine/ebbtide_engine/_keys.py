"""Every object key Ebbtide writes, built in one place (FORMAT.md is the spec).

Keys are relative to the storage account's prefix. Numbers are zero-padded
to 20 digits (the width of a uint64) so that a LIST, which S3 returns in
byte order, returns journal segments and index entries in LSN / sequence
order. ``tests/engine/test_keys.py`` pins the exact strings: changing one
is a format change.

::

    vpgs/<vpg>/manifest.json
    vpgs/<vpg>/index/log/<seq:020>.arrow
    vpgs/<vpg>/index/snapshot/<seq:020>.arrow
    vpgs/<vpg>/journal/<vm>/<first-lsn:020>-<last-lsn:020>-e<epoch:010>-<crc32c:08x>.arrow
    vpgs/<vpg>/mirror/<vm>/<disk>/map/<lsn:020>.arrow
    vpgs/<vpg>/mirror/<vm>/<disk>/chunk/<sha256:064x>
    vpgs/<vpg>/holds/<hold-id>.json
"""

from __future__ import annotations

import dataclasses
import re

from ebbtide_engine import _errors

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SEGMENT = re.compile(r"^(\d{20})-(\d{20})-e(\d{10})-([0-9a-f]{8})\.arrow$")
_SEQ = re.compile(r"^(\d{20})\.arrow$")
_CHUNK = re.compile(r"^[0-9a-f]{64}$")


def check_name(kind: str, name: str) -> str:
    """Return ``name`` if it is a DNS-1123 label (safe in a key), else raise SpecError."""
    if not _NAME.match(name):
        raise _errors.SpecError(
            f"{kind} name {name!r} is not a DNS-1123 label "
            "(lowercase letters, digits and '-', 1-63 characters, alphanumeric at both ends)"
        )
    return name


@dataclasses.dataclass(frozen=True, slots=True)
class SegmentName:
    """What a journal segment's key says about it, without reading it."""

    vm: str
    first_lsn: int
    last_lsn: int
    epoch: int
    crc32c: int  # of the whole object: verified before anything in it is read


@dataclasses.dataclass(frozen=True, slots=True)
class VpgLayout:
    """The keys of one VPG inside a storage account."""

    vpg: str

    def __post_init__(self) -> None:
        check_name("VPG", self.vpg)

    @property
    def root(self) -> str:
        return f"vpgs/{self.vpg}/"

    @property
    def manifest(self) -> str:
        return f"{self.root}manifest.json"

    @property
    def index_log_prefix(self) -> str:
        return f"{self.root}index/log/"

    @property
    def index_snapshot_prefix(self) -> str:
        return f"{self.root}index/snapshot/"

    def index_log_entry(self, seq: int) -> str:
        return f"{self.index_log_prefix}{seq:020d}.arrow"

    def index_snapshot(self, seq: int) -> str:
        return f"{self.index_snapshot_prefix}{seq:020d}.arrow"

    def parse_index_seq(self, key: str) -> int:
        """The sequence number in a log or snapshot key."""
        match = _SEQ.match(key.rsplit("/", 1)[-1])
        if match is None:
            raise _errors.CorruptObjectError(key, "not an index object name (<seq:020>.arrow)")
        return int(match.group(1))

    @property
    def journals_prefix(self) -> str:
        return f"{self.root}journal/"

    def journal_prefix(self, vm: str) -> str:
        return f"{self.journals_prefix}{vm}/"

    def segment(self, vm: str, first_lsn: int, last_lsn: int, epoch: int, crc32c: int) -> str:
        return (
            f"{self.journal_prefix(vm)}{first_lsn:020d}-{last_lsn:020d}"
            f"-e{epoch:010d}-{crc32c:08x}.arrow"
        )

    def parse_segment(self, key: str) -> SegmentName:
        """Parse a journal segment key; raises CorruptObjectError for a stray object."""
        if not key.startswith(self.journals_prefix):
            raise _errors.CorruptObjectError(key, "not under this VPG's journal prefix")
        vm, _, name = key[len(self.journals_prefix) :].partition("/")
        match = _SEGMENT.match(name)
        if match is None:
            raise _errors.CorruptObjectError(
                key, "not a journal segment name (<first>-<last>-e<epoch>-<crc32c>.arrow)"
            )
        first, last, epoch = (int(group) for group in match.groups()[:3])
        return SegmentName(
            vm=vm, first_lsn=first, last_lsn=last, epoch=epoch, crc32c=int(match.group(4), 16)
        )

    # --- holds (readers keeping promotion's deletions off) ---

    @property
    def holds_prefix(self) -> str:
        return f"{self.root}holds/"

    def hold(self, hold_id: str) -> str:
        return f"{self.holds_prefix}{hold_id}.json"

    # --- recovery disks (promotion) ---

    @property
    def mirrors_prefix(self) -> str:
        return f"{self.root}mirror/"

    def mirror_prefix(self, vm: str, disk: str) -> str:
        return f"{self.mirrors_prefix}{vm}/{disk}/"

    def mirror_map_prefix(self, vm: str, disk: str) -> str:
        return f"{self.mirror_prefix(vm, disk)}map/"

    def mirror_map(self, vm: str, disk: str, lsn: int) -> str:
        return f"{self.mirror_map_prefix(vm, disk)}{lsn:020d}.arrow"

    def mirror_chunk_prefix(self, vm: str, disk: str) -> str:
        return f"{self.mirror_prefix(vm, disk)}chunk/"

    def mirror_chunk(self, vm: str, disk: str, sha256: bytes) -> str:
        return f"{self.mirror_chunk_prefix(vm, disk)}{sha256.hex()}"

    def parse_mirror_map_lsn(self, key: str) -> int:
        """The LSN in a chunk-map key."""
        match = _SEQ.match(key.rsplit("/", 1)[-1])
        if match is None:
            raise _errors.CorruptObjectError(key, "not a chunk map name (<lsn:020>.arrow)")
        return int(match.group(1))

    def parse_mirror_chunk(self, key: str) -> bytes:
        """The SHA-256 a chunk key names."""
        name = key.rsplit("/", 1)[-1]
        if not _CHUNK.match(name):
            raise _errors.CorruptObjectError(key, "not a chunk name (<sha256:064x>)")
        return bytes.fromhex(name)
