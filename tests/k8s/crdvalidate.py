"""Admit objects against our CRDs the way the Kubernetes API server does.

The API server runs, for a custom resource: pruning of unknown fields,
defaulting from the schema, OpenAPI validation, ``x-kubernetes-list-type``
uniqueness, then the CEL rules in ``x-kubernetes-validations`` (skipped when
a field has the wrong type, as there). This module does the same with real
implementations, so that a test can say "the API server would reject this,
with this message" without a cluster:

- structure: ``openapi-schema-validator`` (OpenAPI 3.0 dialect of jsonschema),
  with formats checked (``date-time``), errors reworded as the API server
  words them (``spec.vms[0].name: Invalid value: "Web": ... should match``);
- CEL: ``cel-expr-python`` (Google's CEL C++ runtime, the same language
  definition as cel-go in the API server) with the strings extension that
  Kubernetes enables. Kubernetes' own quantity library is not in any CEL
  package on PyPI, so :class:`_QuantityLibrary` implements the part our rules
  use (``isQuantity``, ``quantity``, ``compareTo``, ``isLessThan``,
  ``isGreaterThan``, ``asInteger``, ``isInteger``, ``sign``).

Known differences from the API server, none of which our CRDs depend on:
strings with ``format: date-time`` stay strings in CEL (Kubernetes makes
them timestamps); a quantity is a canonical string here, so ``==`` between
quantities works but a type error such as ``quantity(x) < 1`` is not caught;
there is no CEL cost budget; ObjectMeta is checked only for the name.

Use::

    crd = crdvalidate.load_crds()["VirtualProtectionGroup"]
    obj = crdvalidate.validate(crd, yaml_doc)            # defaulted, or raises
    result = crdvalidate.admit(crd, doc, old=previous)   # errors as a list
"""

from __future__ import annotations

import copy
import dataclasses
import fractions
import json
import pathlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import openapi_schema_validator
import yaml

# cel-expr-python ships .pyi files but no py.typed marker.
from cel_expr_python import cel  # type: ignore[import-untyped]
from cel_expr_python.ext import ext_strings  # type: ignore[import-untyped]

CRDS_DIR = pathlib.Path(__file__).resolve().parents[2] / "crds"

UnknownFields = Literal["strict", "warn", "ignore"]


@dataclasses.dataclass(frozen=True)
class PrinterColumn:
    """One ``additionalPrinterColumns`` entry (``kubectl get`` columns)."""

    name: str
    type: str
    json_path: str
    priority: int = 0
    description: str = ""
    format: str = ""


@dataclasses.dataclass(frozen=True)
class Crd:
    """The parts of a CustomResourceDefinition (one served version) that matter here."""

    group: str
    version: str
    plural: str
    singular: str
    kind: str
    list_kind: str
    namespaced: bool
    short_names: tuple[str, ...]
    categories: tuple[str, ...]
    schema: Mapping[str, Any]
    subresources: frozenset[str]
    printer_columns: tuple[PrinterColumn, ...]
    manifest: Mapping[str, Any]

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    @property
    def name(self) -> str:
        return f"{self.plural}.{self.group}"

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Crd:
        spec = manifest["spec"]
        names = spec["names"]
        (version,) = [v for v in spec["versions"] if v.get("storage")]
        return cls(
            group=spec["group"],
            version=version["name"],
            plural=names["plural"],
            singular=names.get("singular", names["kind"].lower()),
            kind=names["kind"],
            list_kind=names.get("listKind", names["kind"] + "List"),
            namespaced=spec["scope"] == "Namespaced",
            short_names=tuple(names.get("shortNames", ())),
            categories=tuple(names.get("categories", ())),
            schema=version["schema"]["openAPIV3Schema"],
            subresources=frozenset(version.get("subresources", {})),
            printer_columns=tuple(
                PrinterColumn(
                    name=column["name"],
                    type=column["type"],
                    json_path=column["jsonPath"],
                    priority=column.get("priority", 0),
                    description=column.get("description", ""),
                    format=column.get("format", ""),
                )
                for column in version.get("additionalPrinterColumns", ())
            ),
            manifest=manifest,
        )


def load_crds(directory: pathlib.Path = CRDS_DIR) -> dict[str, Crd]:
    """Every CRD in ``directory`` (``*.yaml``), by kind."""
    crds: dict[str, Crd] = {}
    for path in sorted(directory.glob("*.yaml")):
        for manifest in yaml.safe_load_all(path.read_text()):
            if manifest and manifest.get("kind") == "CustomResourceDefinition":
                crd = Crd.from_manifest(manifest)
                crds[crd.kind] = crd
    return crds


@dataclasses.dataclass(frozen=True)
class FieldError:
    """One problem, worded as the API server words it: ``{path}: {type}: {detail}``."""

    path: str
    type: str  # "Invalid value", "Required value", "Unsupported value", "Duplicate value", ...
    detail: str
    blocking: bool = False  # a wrong type: CEL rules are not run (as in the API server)

    @property
    def message(self) -> str:
        """The error without its path (a Status cause's ``message``)."""
        if not self.type:
            return self.detail
        return f"{self.type}: {self.detail}" if self.detail else self.type

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class InvalidObject(Exception):
    """The API server's 422 Invalid: every error, in one message."""

    def __init__(self, kind: str, group: str, name: str, errors: Sequence[FieldError]) -> None:
        self.kind = kind
        self.group = group
        self.name = name
        self.errors = list(errors)
        joined = ", ".join(str(error) for error in self.errors)
        super().__init__(f'{kind}.{group} "{name}" is invalid: [{joined}]')


@dataclasses.dataclass
class Admission:
    """What the API server would store (``object``), or why it refuses."""

    object: dict[str, Any]
    errors: list[FieldError]
    unknown_fields: list[str]  # paths of pruned fields, like "spec.foo"

    @property
    def ok(self) -> bool:
        return not self.errors


def admit(
    crd: Crd,
    obj: Mapping[str, Any],
    *,
    old: Mapping[str, Any] | None = None,
    unknown_fields: UnknownFields = "strict",
) -> Admission:
    """Prune, default and validate ``obj`` (an update of ``old`` if given).

    ``unknown_fields`` is the API server's ``fieldValidation``: "strict"
    (kubectl's default) refuses unknown fields, "warn" and "ignore" drop them.
    """
    unknown: list[str] = []
    body = copy.deepcopy(dict(obj))
    for key in list(body):
        if key in ("apiVersion", "kind", "metadata"):
            continue
        if key not in crd.schema.get("properties", {}):
            unknown.append(key)
            del body[key]
        else:
            body[key] = _prune(crd.schema["properties"][key], body[key], key, unknown)
    body = _default(crd.schema, body)

    errors: list[FieldError] = []
    if unknown_fields == "strict":
        errors += [FieldError("", "", f'unknown field "{path}"') for path in unknown]
    errors += _check_header(crd, body)
    errors += _check_structure(crd.schema, body)
    errors += _check_list_types(crd.schema, body, "")
    if any(error.blocking for error in errors):
        errors.append(
            FieldError(
                "",
                "",
                "some validation rules were not checked because the object was invalid; "
                "correct the existing errors to complete validation",
            )
        )
    else:
        errors += _check_rules(crd.schema, body, old, "", has_old=old is not None)
    return Admission(object=body, errors=errors, unknown_fields=unknown)


def validate(
    crd: Crd,
    obj: Mapping[str, Any],
    *,
    old: Mapping[str, Any] | None = None,
    unknown_fields: UnknownFields = "strict",
) -> dict[str, Any]:
    """The object as stored (pruned and defaulted); raises :class:`InvalidObject`."""
    result = admit(crd, obj, old=old, unknown_fields=unknown_fields)
    if result.errors:
        name = str((obj.get("metadata") or {}).get("name", ""))
        raise InvalidObject(crd.kind, crd.group, name, result.errors)
    return result.object


# ---------------------------------------------------------------- pruning & defaults


def _prune(schema: Mapping[str, Any], value: Any, path: str, unknown: list[str]) -> Any:
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return value
    if isinstance(value, dict):
        properties = schema.get("properties")
        additional = schema.get("additionalProperties")
        result: dict[str, Any] = {}
        for key, item in value.items():
            sub = f"{path}.{key}"
            if properties is not None and key in properties:
                child = properties[key]
            elif isinstance(additional, Mapping):
                child = additional
            elif additional is True:
                result[key] = item
                continue
            else:
                unknown.append(sub)
                continue
            if item is None and not child.get("nullable"):
                continue  # the API server drops nulls of non-nullable fields before defaulting
            result[key] = _prune(child, item, sub, unknown)
        return result
    if isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [
            _prune(schema["items"], item, f"{path}[{i}]", unknown) for i, item in enumerate(value)
        ]
    return value


def _default(schema: Mapping[str, Any], value: Any) -> Any:
    if isinstance(value, dict):
        for key, child in schema.get("properties", {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                value[key] = _default(child, value[key])
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key in value:
                value[key] = _default(additional, value[key])
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [_default(schema["items"], item) for item in value]
    return value


# ---------------------------------------------------------------- structure

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_header(crd: Crd, body: Mapping[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    if body.get("apiVersion") != crd.api_version:
        errors.append(
            FieldError(
                "apiVersion",
                "Invalid value",
                f"{_show(body.get('apiVersion'))}: must be {crd.api_version}",
            )
        )
    if body.get("kind") != crd.kind:
        errors.append(
            FieldError("kind", "Invalid value", f"{_show(body.get('kind'))}: must be {crd.kind}")
        )
    metadata = body.get("metadata") or {}
    name = metadata.get("name")
    if not name and not metadata.get("generateName"):
        errors.append(
            FieldError("metadata.name", "Required value", "name or generateName is required")
        )
    elif name and (len(name) > 253 or not _DNS_SUBDOMAIN.match(name)):
        errors.append(
            FieldError(
                "metadata.name",
                "Invalid value",
                f"{_show(name)}: a lowercase RFC 1123 subdomain must consist of lower case "
                "alphanumeric characters, '-' or '.', and must start and end with an "
                "alphanumeric character",
            )
        )
    return errors


def _check_structure(schema: Mapping[str, Any], body: Mapping[str, Any]) -> list[FieldError]:
    validator = openapi_schema_validator.OAS30Validator(
        schema, format_checker=openapi_schema_validator.oas30_format_checker
    )
    errors = sorted(validator.iter_errors(body), key=lambda e: [str(p) for p in e.absolute_path])
    return [_reword(error) for error in errors]


def _reword(error: Any) -> FieldError:  # a jsonschema ValidationError
    path = _path(error.absolute_path)
    value = error.instance
    want = error.validator_value
    match error.validator:
        case "required":
            missing = re.match(r"'(.*)' is a required property", error.message)
            field = missing.group(1) if missing else "?"
            return FieldError(_join(path, field), "Required value", "")
        case "enum":
            supported = ", ".join(_show(item) for item in want)
            return FieldError(
                path, "Unsupported value", f"{_show(value)}: supported values: {supported}"
            )
        case "pattern":
            return FieldError(
                path, "Invalid value", f"{_show(value)}: {path} in body should match '{want}'"
            )
        case "type" | "anyOf":
            wanted = (
                want
                if error.validator == "type"
                else ",".join(str(branch.get("type")) for branch in want)
            )
            return FieldError(
                path,
                "Invalid value",
                f'"{_json_type(value)}": {path} in body must be of type {wanted}: '
                f'"{_json_type(value)}"',
                blocking=True,
            )
        case "format":
            return FieldError(
                path,
                "Invalid value",
                f"{_show(value)}: {path} in body must be of type {want}: {_show(value)}",
            )
        case "minimum":
            return FieldError(
                path,
                "Invalid value",
                f"{_show(value)}: {path} in body should be greater than or equal to {want}",
            )
        case "maximum":
            return FieldError(
                path,
                "Invalid value",
                f"{_show(value)}: {path} in body should be less than or equal to {want}",
            )
        case "minItems":
            return FieldError(
                path,
                "Invalid value",
                f"{len(value)}: {path} in body should have at least {want} items",
            )
        case "maxItems":
            return FieldError(path, "Too many", f"{len(value)}: must have at most {want} items")
        case "minLength":
            return FieldError(
                path,
                "Invalid value",
                f"{_show(value)}: {path} in body should be at least {want} chars long",
            )
        case "maxLength":
            return FieldError(path, "Too long", f"may not be more than {want} bytes")
        case _:
            return FieldError(path, "Invalid value", f"{_show(value)}: {error.message}")


def _check_list_types(schema: Mapping[str, Any], value: Any, path: str) -> list[FieldError]:
    errors: list[FieldError] = []
    if isinstance(value, dict):
        for key, child in schema.get("properties", {}).items():
            if key in value:
                errors += _check_list_types(child, value[key], _join(path, key))
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        seen: set[str] = set()
        for i, item in enumerate(value):
            if list_type == "map" and isinstance(item, dict):
                keys = {key: item.get(key) for key in schema.get("x-kubernetes-list-map-keys", ())}
                identity = json.dumps(keys, sort_keys=True, separators=(",", ":"))
            elif list_type == "set":
                identity = json.dumps(item, sort_keys=True, separators=(",", ":"))
            else:
                identity = ""
            if identity:
                if identity in seen:
                    errors.append(FieldError(f"{path}[{i}]", "Duplicate value", identity))
                seen.add(identity)
            if isinstance(schema.get("items"), Mapping):
                errors += _check_list_types(schema["items"], item, f"{path}[{i}]")
    return errors


# ---------------------------------------------------------------- CEL rules

_REASONS = {
    "FieldValueInvalid": "Invalid value",
    "FieldValueRequired": "Required value",
    "FieldValueForbidden": "Forbidden",
    "FieldValueDuplicate": "Duplicate value",
}


def _check_rules(
    schema: Mapping[str, Any], value: Any, old: Any, path: str, *, has_old: bool
) -> list[FieldError]:
    errors: list[FieldError] = []
    for rule in schema.get("x-kubernetes-validations", ()):
        errors += _run_rule(rule, value, old, path, has_old=has_old)
    if isinstance(value, dict):
        old_map = old if has_old and isinstance(old, dict) else {}
        for key, child in schema.get("properties", {}).items():
            if key in value:
                errors += _check_rules(
                    child, value[key], old_map.get(key), _join(path, key), has_old=key in old_map
                )
        additional = schema.get("additionalProperties")
        if isinstance(additional, Mapping):
            for key, item in value.items():
                errors += _check_rules(
                    additional, item, old_map.get(key), _join(path, key), has_old=key in old_map
                )
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        items = schema["items"]
        # Like the API server: old items are correlated only in listType=map lists.
        keys = schema.get("x-kubernetes-list-map-keys", ())
        old_items: dict[str, Any] = {}
        if has_old and isinstance(old, list) and schema.get("x-kubernetes-list-type") == "map":
            old_items = {_map_key(item, keys): item for item in old if isinstance(item, dict)}
        for i, item in enumerate(value):
            key = _map_key(item, keys) if isinstance(item, dict) else ""
            errors += _check_rules(
                items, item, old_items.get(key), f"{path}[{i}]", has_old=key in old_items
            )
    return errors


def _map_key(item: Mapping[str, Any], keys: Sequence[str]) -> str:
    return json.dumps([item.get(key) for key in keys])


def _run_rule(
    rule: Mapping[str, Any], value: Any, old: Any, path: str, *, has_old: bool
) -> list[FieldError]:
    text: str = rule["rule"]
    if "oldSelf" in text and not has_old:
        return []  # a transition rule: only on updates where the field existed before
    where = path + rule.get("fieldPath", "") if rule.get("fieldPath") else path
    where = where.lstrip(".")
    data = {"self": value, "oldSelf": old if has_old else None}
    try:
        result = _evaluate(text, data)
    except _CelError as exc:
        return [FieldError(where, "Invalid value", f'"{_json_type(value)}": {exc}')]
    if result is True:
        return []
    message = rule.get("message") or f"failed rule: {text}"
    if rule.get("messageExpression"):
        try:
            rendered = _evaluate(rule["messageExpression"], data)
            if isinstance(rendered, str) and rendered.strip():
                message = rendered
        except _CelError:
            pass  # as in the API server: fall back to message
    kind = _REASONS.get(rule.get("reason", "FieldValueInvalid"), "Invalid value")
    detail = f'"{_json_type(value)}": {message}' if kind == "Invalid value" else message
    return [FieldError(where, kind, detail)]


class _CelError(Exception):
    pass


_programs: dict[str, Any] = {}
_environment: Any = None


def compile_rule(text: str) -> None:
    """Compile (and type-check) a CEL rule or message expression; raises ValueError."""
    try:
        _compiled(text)
    except _CelError as exc:
        raise ValueError(f"{text!r}: {exc}") from None


def _compiled(text: str) -> Any:
    global _environment
    if _environment is None:
        _environment = cel.NewEnv(
            variables={"self": cel.Type.DYN, "oldSelf": cel.Type.DYN},
            extensions=[ext_strings.ExtStrings(), _QuantityLibrary.extension()],
        )
    program = _programs.get(text)
    if program is None:
        try:
            program = _programs[text] = _environment.compile(text)
        except Exception as exc:
            raise _CelError(f"compilation failed: {exc}") from None
    return program


def _evaluate(text: str, data: Mapping[str, Any]) -> Any:
    result = _compiled(text).eval(data=dict(data))
    if result.type().name() == "ERROR":
        raise _CelError(f"rule evaluation error: {result.value()}")
    return result.value()


class _QuantityLibrary:
    """Kubernetes' CEL quantity library, on canonical strings "q:<num>/<den>"."""

    _SUFFIXES: ClassVar[dict[str, fractions.Fraction]] = {
        "n": fractions.Fraction(1, 10**9),
        "u": fractions.Fraction(1, 10**6),
        "m": fractions.Fraction(1, 1000),
        "": fractions.Fraction(1),
        **{suffix: fractions.Fraction(10 ** (3 * i)) for i, suffix in enumerate("kMGTPE", 1)},
        **{suffix + "i": fractions.Fraction(2 ** (10 * i)) for i, suffix in enumerate("KMGTPE", 1)},
    }
    _GRAMMAR = re.compile(
        r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
    )

    @classmethod
    def parse(cls, text: str) -> fractions.Fraction:
        match = cls._GRAMMAR.match(text)
        if not match:
            raise ValueError(f"quantities must match the regular expression: {text!r}")
        number, suffix = fractions.Fraction(match.group(1)), match.group(2) or ""
        if suffix[:1] in ("e", "E"):
            return number * fractions.Fraction(10) ** int(suffix[1:])
        return number * cls._SUFFIXES[suffix]

    @staticmethod
    def _wrap(value: fractions.Fraction) -> str:
        return f"q:{value.numerator}/{value.denominator}"

    @staticmethod
    def _unwrap(text: str) -> fractions.Fraction:
        if not text.startswith("q:"):
            raise TypeError(f"no matching overload: {text!r} is not a quantity")
        return fractions.Fraction(text[2:])

    @classmethod
    def _is_quantity(cls, text: str) -> bool:
        return bool(cls._GRAMMAR.match(text))

    @classmethod
    def _quantity(cls, text: str) -> str:
        return cls._wrap(cls.parse(text))

    @classmethod
    def _compare(cls, a: str, b: str) -> int:
        x, y = cls._unwrap(a), cls._unwrap(b)
        return (x > y) - (x < y)

    @classmethod
    def _as_integer(cls, a: str) -> int:
        value = cls._unwrap(a)
        if value.denominator != 1 or not -(2**63) <= value.numerator < 2**63:
            raise ValueError("cannot convert value to integer")
        return value.numerator

    @classmethod
    def extension(cls) -> Any:
        string, integer, boolean = cel.Type.STRING, cel.Type.INT, cel.Type.BOOL

        def member(name: str, result: Any, impl: Callable[..., Any]) -> Any:
            return cel.FunctionDecl(
                name,
                [
                    cel.Overload(
                        f"quantity_{name}", result, [string, string], is_member=True, impl=impl
                    )
                ],
            )

        def unary(name: str, result: Any, impl: Callable[..., Any], *, is_member: bool) -> Any:
            return cel.FunctionDecl(
                name,
                [
                    cel.Overload(
                        f"quantity_{name}", result, [string], is_member=is_member, impl=impl
                    )
                ],
            )

        return cel.CelExtension(
            "kubernetes.quantity",
            [
                unary("isQuantity", boolean, cls._is_quantity, is_member=False),
                unary("quantity", string, cls._quantity, is_member=False),
                member("compareTo", integer, cls._compare),
                member("isLessThan", boolean, lambda a, b: cls._compare(a, b) < 0),
                member("isGreaterThan", boolean, lambda a, b: cls._compare(a, b) > 0),
                unary("asInteger", integer, cls._as_integer, is_member=True),
                unary(
                    "isInteger",
                    boolean,
                    lambda a: cls._unwrap(a).denominator == 1,
                    is_member=True,
                ),
                unary(
                    "sign",
                    integer,
                    lambda a: (cls._unwrap(a) > 0) - (cls._unwrap(a) < 0),
                    is_member=True,
                ),
            ],
        )


# ---------------------------------------------------------------- small helpers


def _path(parts: Iterator[Any] | Sequence[Any]) -> str:
    path = ""
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _join(path, str(part))
    return path


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    return (
        json.dumps(value)
        if isinstance(value, str | int | float | bool) or value is None
        else (json.dumps(value, separators=(",", ":")))
    )


def _json_type(value: Any) -> str:
    match value:
        case bool():
            return "boolean"
        case int():
            return "integer"
        case float():
            return "number"
        case str():
            return "string"
        case list():
            return "array"
        case dict():
            return "object"
        case _:
            return "null"
