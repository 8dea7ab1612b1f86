"""The VPG spec: what a VirtualProtectionGroup asks for, validated into clear errors.

The engine reads the same ``spec`` that the Kubernetes custom resource
carries (camelCase field names, Kubernetes quantities such as ``64Mi`` and
durations such as ``5s``), so an example file works for ``kubectl apply``
and for the embedded ``ebbtide demo`` alike. Validation errors become one
:class:`SpecError` that lists every bad field by its path
(``spec.vms[1].disks[0].size``) with what is allowed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import pydantic
import pydantic.alias_generators

from ebbtide_engine import _errors, _keys

_QUANTITY = re.compile(r"^([0-9]+)(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
_FACTORS = {
    None: 1,
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "Pi": 1 << 50,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
}
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_quantity(value: object) -> int:
    """Bytes from an int or a Kubernetes quantity string ("64Mi", "1G", "4096")."""
    if isinstance(value, bool):
        raise ValueError("expected a byte count or a quantity like '64Mi'")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        match = _QUANTITY.match(value.strip())
        if match:
            return int(match.group(1)) * _FACTORS[match.group(2)]
    raise ValueError(f"{value!r} is not a byte count or a quantity like '64Mi' or '10Gi'")


def parse_duration(value: object) -> float:
    """Seconds from a number or a duration string ("500ms", "5s", "15m", "24h", "30d")."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '5s'")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match.group(1)) * _SECONDS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration like '5s', '15m', '24h' or '30d'")


Bytes = Annotated[int, pydantic.BeforeValidator(parse_quantity)]
Seconds = Annotated[float, pydantic.BeforeValidator(parse_duration)]


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        extra="forbid",
        frozen=True,
        populate_by_name=True,
        alias_generator=pydantic.alias_generators.to_camel,
    )


class DiskSource(_Model):
    """Where a Proxy-mode disk lives on the endpoint's node."""

    path: str


class DiskSpec(_Model):
    name: str
    size: Annotated[Bytes, pydantic.Field(gt=0, le=1 << 50)]
    mode: Literal["Mirror", "Proxy"] = "Mirror"
    source: DiskSource | None = None

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name("disk", value)

    @pydantic.field_validator("size")
    @classmethod
    def _size(cls, value: int) -> int:
        if value % 512:
            raise ValueError(f"size {value} is not a multiple of 512 bytes")
        return value

    @pydantic.model_validator(mode="after")
    def _source(self) -> DiskSpec:
        if self.mode == "Proxy" and self.source is None:
            raise ValueError("a Proxy disk needs source.path (the file or block device it serves)")
        return self


class VmSpec(_Model):
    name: str
    disks: Annotated[list[DiskSpec], pydantic.Field(min_length=1, max_length=64)]

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name("VM", value)

    @pydantic.model_validator(mode="after")
    def _unique(self) -> VmSpec:
        _require_unique("disk", [disk.name for disk in self.disks])
        return self


class JournalSpec(_Model):
    """How the journal buffers and ships writes (tuning; defaults suit most VPGs)."""

    segment_max_bytes: Annotated[Bytes, pydantic.Field(ge=64 << 10, le=1 << 30)] = 16 << 20
    max_unshipped_bytes: Annotated[Bytes, pydantic.Field(ge=1 << 20)] = 256 << 20
    #: past max_unshipped_bytes in memory, encoded segments spill to local disk up to this
    #: (the endpoint's state directory); 0: no spill, writers wait at the memory bound
    max_spill_bytes: Annotated[Bytes, pydantic.Field(ge=0, le=1 << 50)] = 4 << 30
    upload_concurrency: Annotated[int, pydantic.Field(ge=1, le=64)] = 8
    #: while a write burst outruns the bucket (segments are spilling), uploads may wait up
    #: to this long so the guest's writes are acknowledged at local-disk speed; 0: never wait
    burst_ship_delay: Annotated[Seconds, pydantic.Field(ge=0, le=300)] = 10.0
    #: per VM: bytes, a quantity, a percentage of the VM's disks ("50%") or "Unlimited"
    hard_limit: str | int = "Unlimited"
    #: per VM, below the hard limit: raises the JournalNearLimit condition
    warning_threshold: str | int | None = None

    @pydantic.field_validator("hard_limit", "warning_threshold")
    @classmethod
    def _limit(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            parse_journal_limit(value)
        return value

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> JournalSpec:
        if self.max_unshipped_bytes < 2 * self.segment_max_bytes:
            raise ValueError(
                f"maxUnshippedBytes ({self.max_unshipped_bytes}) must be at least twice "
                f"segmentMaxBytes ({self.segment_max_bytes}) so one segment can upload "
                "while the next fills"
            )
        if self.warning_threshold is not None and parse_journal_limit(self.warning_threshold) == (
            "unlimited",
            0,
        ):
            raise ValueError("warningThreshold cannot be 'Unlimited'; leave it out instead")
        return self

    def limits(self, vm_bytes: int) -> tuple[int | None, int | None]:
        """(hard limit, warning threshold) in bytes for a VM whose disks total ``vm_bytes``.

        None: no limit (``Unlimited``) / no warning.
        """
        return (
            _limit_bytes(self.hard_limit, vm_bytes),
            None
            if self.warning_threshold is None
            else _limit_bytes(self.warning_threshold, vm_bytes),
        )


def parse_journal_limit(value: object) -> tuple[str, int]:
    """A journal size limit: ("bytes", n), ("percent", p) or ("unlimited", 0)."""
    if isinstance(value, str):
        text = value.strip()
        if text == "Unlimited":
            return ("unlimited", 0)
        if text.endswith("%"):
            number = text[:-1]
            if number.isdigit() and 1 <= int(number) <= 100:
                return ("percent", int(number))
            raise ValueError(f"{value!r}: a percentage must be a whole number from 1% to 100%")
    try:
        amount = parse_quantity(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is not a journal limit: give bytes, a quantity like '500Gi', "
            "a percentage of the VM's disks like '50%', or 'Unlimited'"
        ) from None
    if amount <= 0:
        raise ValueError(f"{value!r}: a journal limit must be more than 0 bytes")
    return ("bytes", amount)


def _limit_bytes(value: str | int, vm_bytes: int) -> int | None:
    kind, amount = parse_journal_limit(value)
    if kind == "unlimited":
        return None
    if kind == "percent":
        return vm_bytes * amount // 100
    return amount


class DilutionTier(_Model):
    """Checkpoints older than ``olderThan``: keep at most ``keep`` per ``per`` of time."""

    older_than: Annotated[Seconds, pydantic.Field(gt=0)]
    keep: Annotated[int, pydantic.Field(ge=1, le=10000)]
    per: Annotated[Seconds, pydantic.Field(ge=1, le=86400)] = 900.0


class DilutionSpec(_Model):
    """Thinning of old automatic checkpoints (Zerto's rules are the defaults).

    Nothing is thinned while the VPG has at most ``threshold`` automatic
    checkpoints. Tagged, application-consistent and failover-test
    checkpoints are never thinned.
    """

    threshold: Annotated[int, pydantic.Field(ge=0)] = 1000
    tiers: Annotated[list[DilutionTier], pydantic.Field(max_length=16)] = [
        DilutionTier(older_than=2 * 3600.0, keep=3, per=900.0),
        DilutionTier(older_than=4.5 * 3600.0, keep=1, per=900.0),
    ]

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> DilutionSpec:
        ages = [tier.older_than for tier in self.tiers]
        if any(b <= a for a, b in itertools.pairwise(ages)):
            raise ValueError("tiers must be ordered by olderThan, each older than the one before")
        return self


class StorageAccountRef(_Model):
    name: str


class VpgSpec(_Model):
    """A VirtualProtectionGroup's spec plus its name (from metadata)."""

    name: str
    storage_account_ref: StorageAccountRef | None = None
    checkpoint_interval: Annotated[Seconds, pydantic.Field(ge=1, le=3600)] = 5.0
    journal_history: Annotated[Seconds, pydantic.Field(ge=3600, le=30 * 86400)] = 86400.0
    target_rpo: Annotated[Seconds, pydantic.Field(gt=0)] = 300.0
    vms: Annotated[list[VmSpec], pydantic.Field(min_length=1, max_length=256)]
    journal: JournalSpec = JournalSpec()
    dilution: DilutionSpec = DilutionSpec()
    on_delete: Literal["Retain", "Delete"] = "Retain"

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name("VPG", value)

    @pydantic.model_validator(mode="after")
    def _unique(self) -> VpgSpec:
        _require_unique("VM", [vm.name for vm in self.vms])
        return self

    @pydantic.model_validator(mode="after")
    def _journal_limits(self) -> VpgSpec:
        for vm in self.vms:
            hard, warning = self.journal_limits(vm.name)
            if hard is not None and warning is not None and warning >= hard:
                raise ValueError(
                    f"journal.warningThreshold ({self.journal.warning_threshold}, {warning} bytes "
                    f"for VM {vm.name!r}) must be below journal.hardLimit "
                    f"({self.journal.hard_limit}, {hard} bytes); lower the warning or raise "
                    "the limit"
                )
        return self

    def journal_limits(self, vm: str) -> tuple[int | None, int | None]:
        """(hard limit, warning threshold) in bytes for VM ``vm``'s journal; None: none."""
        return self.journal.limits(sum(disk.size for disk in self.vm(vm).disks))

    def vm(self, name: str) -> VmSpec:
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def disk_sizes(self) -> dict[str, dict[str, int]]:
        """``{vm: {disk: size}}``, the layout recorded in the checkpoint index."""
        return {vm.name: {disk.name: disk.size for disk in vm.disks} for vm in self.vms}

    @classmethod
    def parse(cls, name: str, spec: Mapping[str, Any]) -> VpgSpec:
        """Validate a spec mapping; raises SpecError listing every problem by field path."""
        try:
            return cls.model_validate({**spec, "name": name})
        except pydantic.ValidationError as exc:
            raise _errors.SpecError(_describe(f"VPG {name!r}", exc)) from None

    @classmethod
    def from_resource(cls, resource: Mapping[str, Any]) -> VpgSpec:
        """Validate a whole VirtualProtectionGroup resource (apiVersion, kind, metadata, spec)."""
        kind = resource.get("kind")
        if kind != "VirtualProtectionGroup":
            raise _errors.SpecError(f"expected kind VirtualProtectionGroup, found {kind!r}")
        name = (resource.get("metadata") or {}).get("name")
        if not isinstance(name, str):
            raise _errors.SpecError("VirtualProtectionGroup has no metadata.name")
        spec = resource.get("spec")
        if not isinstance(spec, Mapping):
            raise _errors.SpecError(f"VirtualProtectionGroup {name!r} has no spec")
        return cls.parse(name, spec)


def _checked_name(kind: str, value: str) -> str:
    try:
        return _keys.check_name(kind, value)
    except _errors.SpecError as exc:
        raise ValueError(str(exc)) from None


def _require_unique(kind: str, names: list[str]) -> None:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{kind} names must be unique; repeated: {', '.join(duplicates)}")


def _describe(what: str, exc: pydantic.ValidationError) -> str:
    lines = [f"{what} has an invalid spec:"]
    for error in exc.errors(include_url=False):
        path = "spec"
        for part in error["loc"]:
            if part == "name" and path == "spec":
                path = "metadata"
            path += f"[{part}]" if isinstance(part, int) else f".{part}"
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"  {path}: {message}")
    return "\n".join(lines)
