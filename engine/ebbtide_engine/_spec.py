"""The VPG spec: what a VirtualProtectionGroup asks for, validated into clear errors.

The engine reads the same ``spec`` that the Kubernetes custom resource
carries (camelCase field names, Kubernetes quantities such as ``64Mi`` and
durations such as ``5s``), so an example file works for ``kubectl apply``
and for the embedded ``ebbtide demo`` alike. Validation errors become one
:class:`SpecError` that lists every bad field by its path
(``spec.vms[1].disks[0].size``) with what is allowed.
"""

from __future__ import annotations

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
    upload_concurrency: Annotated[int, pydantic.Field(ge=1, le=64)] = 8
    hard_limit: str = "Unlimited"
    warning_threshold: str | None = None

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> JournalSpec:
        if self.max_unshipped_bytes < 2 * self.segment_max_bytes:
            raise ValueError(
                f"maxUnshippedBytes ({self.max_unshipped_bytes}) must be at least twice "
                f"segmentMaxBytes ({self.segment_max_bytes}) so one segment can upload "
                "while the next fills"
            )
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
    on_delete: Literal["Retain", "Delete"] = "Retain"

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name("VPG", value)

    @pydantic.model_validator(mode="after")
    def _unique(self) -> VpgSpec:
        _require_unique("VM", [vm.name for vm in self.vms])
        return self

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
