"""A Kubernetes API server for tests: kmock's emulator with the API server's rules.

kmock 0.8 (the Kopf author's mock server) parses Kubernetes URLs, serves
discovery, keeps objects in memory and streams watch events; it lacks what
Kopf and kubectl rely on beyond that (see docs/kubernetes.md). This module
keeps kmock's request parsing, DSL reactions, discovery and object store
(``emulator.objects[...]`` still works in assertions), and replaces its one
step that changes objects with the API server's rules:

- metadata: ``uid``, ``creationTimestamp``, ``generation`` (bumped when
  anything but metadata and status changes, and when deletion starts), and a
  cluster-wide monotonic ``resourceVersion`` (no bump for a no-op write);
- create with ``generateName``, the namespace taken from the URL, 409 on a
  duplicate; PUT; merge, JSON (a failed ``test`` answers 422) and, for
  built-in kinds only, strategic merge patches treated as merge patches;
  ``metadata.resourceVersion`` and delete preconditions checked (409);
- the status subresource isolated: writes to the object ignore ``status``,
  writes to ``/status`` change nothing else;
- our CRDs' schemas enforced with :mod:`crdvalidate` (pruning, defaults,
  OpenAPI and CEL rules; 422 Invalid with the API server's wording) and
  ``fieldValidation`` honoured (Strict refuses unknown fields);
- finalizers: delete sets ``deletionTimestamp``; removing the last finalizer
  deletes; no new finalizers while deleting;
- lists with ``kind``/``apiVersion``/``resourceVersion``; label selectors and
  ``metadata.name``/``metadata.namespace`` field selectors; watches that
  resume after a ``resourceVersion`` (410 Gone when too old) and honour
  ``timeoutSeconds``; ``kubectl get``'s Table format with the CRDs' printer
  columns; ``/api/v1/namespaces`` (namespaces are created on first use);
  Secrets (``stringData`` folded into ``data``), ConfigMaps, Events, and
  CRDs as objects (creating one registers its kind).

Start it with :func:`serve` (an async context manager) or through the
``apiserver`` fixture in conftest.py. It runs in a thread with its own event
loop, so that an in-process Kopf operator (which cancels every task started in
its loop after it) leaves it alone; see :class:`RunningApiServer`.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import copy
import dataclasses
import datetime
import json
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, TypeVar

import aiohttp.web
import attrs
import jsonpatch
import kmock
from kmock._internal import rendering  # Response: exported by kmock 0.8, but not in __all__

from . import crdvalidate

Resource = kmock.resource
T = TypeVar("T")

NAMESPACES = Resource("", "v1", "namespaces")
CRDS = Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions")
# kmock's URL parser cannot read /api/v1/namespaces[/NAME] (it takes "namespaces"
# for the namespace prefix of a namespaced URL), so such paths are renamed to this
# plural before parsing, and the request's resource is set back afterwards.
_NAMESPACES_ALIAS = "namespaces~cluster"
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(/[^/]+)?/?$")
_VERBS = ("create", "delete", "get", "list", "patch", "update", "watch")
_HISTORY = 10_000  # watch events kept for resuming; older resourceVersions get 410 Gone


@dataclasses.dataclass(frozen=True)
class Kind:
    """What the emulator knows about one served resource."""

    resource: kmock.resource
    kind: str
    namespaced: bool
    crd: crdvalidate.Crd | None = None
    short_names: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        group, version = self.resource.group, self.resource.version
        return f"{group}/{version}" if group else str(version)

    @property
    def status_subresource(self) -> bool:
        return self.crd is not None and "status" in self.crd.subresources

    @property
    def qualified(self) -> str:
        group = self.resource.group
        return f"{self.resource.plural}.{group}" if group else str(self.resource.plural)


BUILTIN_KINDS = (
    Kind(Resource("", "v1", "secrets"), "Secret", namespaced=True),
    Kind(Resource("", "v1", "configmaps"), "ConfigMap", namespaced=True, short_names=("cm",)),
    Kind(
        Resource("", "v1", "persistentvolumeclaims"),
        "PersistentVolumeClaim",
        namespaced=True,
        short_names=("pvc",),
    ),
    Kind(Resource("batch", "v1", "jobs"), "Job", namespaced=True),
    Kind(Resource("", "v1", "events"), "Event", namespaced=True, short_names=("ev",)),
    Kind(Resource("events.k8s.io", "v1", "events"), "Event", namespaced=True, short_names=("ev",)),
    Kind(NAMESPACES, "Namespace", namespaced=False, short_names=("ns",)),
    Kind(CRDS, "CustomResourceDefinition", namespaced=False, short_names=("crd", "crds")),
    # What the Helm chart installs (tests/helm applies it with kubectl).
    Kind(Resource("", "v1", "serviceaccounts"), "ServiceAccount", True, short_names=("sa",)),
    Kind(Resource("", "v1", "services"), "Service", namespaced=True, short_names=("svc",)),
    Kind(Resource("apps", "v1", "deployments"), "Deployment", True, short_names=("deploy",)),
    Kind(Resource("rbac.authorization.k8s.io", "v1", "clusterroles"), "ClusterRole", False),
    Kind(
        Resource("rbac.authorization.k8s.io", "v1", "clusterrolebindings"),
        "ClusterRoleBinding",
        False,
    ),
    Kind(Resource("rbac.authorization.k8s.io", "v1", "roles"), "Role", namespaced=True),
    Kind(Resource("rbac.authorization.k8s.io", "v1", "rolebindings"), "RoleBinding", True),
)


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details)


@attrs.define(kw_only=True)
class KubernetesEmulator(kmock.KubernetesEmulator):
    """kmock's emulator that changes objects the way the API server does."""

    validate: bool = True  # enforce registered CRDs' schemas and CEL rules

    _kinds: dict[kmock.resource, Kind] = attrs.field(factory=dict, init=False)
    _revision: int = attrs.field(default=0, init=False)
    _log: collections.deque[tuple[int, kmock.resource, dict[str, Any]]] = attrs.field(
        factory=lambda: collections.deque(maxlen=_HISTORY), init=False
    )
    _tick: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)  # set, then replaced
    _closing: bool = attrs.field(default=False, init=False)
    _replies: dict[int, rendering.Response] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.fallback[kmock.method.PUT] << self._serve_write
        for kind in BUILTIN_KINDS:
            self.register(kind)
        for name in ("default", "kube-system"):
            self._ensure_namespace(name)

    # ------------------------------------------------------------ registration

    def register(self, kind: Kind) -> None:
        """Serve ``kind``: discovery, storage, and (with a CRD) validation."""
        self._kinds[kind.resource] = kind
        crd = kind.crd
        self.resources[kind.resource] = kmock.ResourceInfo(
            kind=kind.kind,
            singular=crd.singular if crd else kind.kind.lower(),
            namespaced=kind.namespaced,
            verbs=set(_VERBS),
            shortnames=set(crd.short_names) if crd else set(kind.short_names),
            categories=set(crd.categories) if crd else set(),
            subresources=set(crd.subresources) if crd else set(),
        )

    def register_crd(self, crd: crdvalidate.Crd) -> None:
        """Serve a custom resource, and show its CRD as an object."""
        self.register(
            Kind(Resource(crd.group, crd.version, crd.plural), crd.kind, crd.namespaced, crd)
        )
        key = (CRDS, None, crd.name)
        if key not in self.objects or self.objects[key].deleted:
            self._store_new(self._kinds[CRDS], copy.deepcopy(dict(crd.manifest)), None)

    async def _serve_version(self, request: kmock.Request) -> kmock.Payload:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            if str(payload.get("groupVersion", "")).startswith("/"):
                payload["groupVersion"] = payload["groupVersion"][1:]  # kmock says "/v1"
            for entry in payload.get("resources", ()):
                if "/" in entry["name"]:  # a subresource: no short names or categories of its own
                    entry.update(shortNames=[], categories=[], verbs=["get", "patch", "update"])
                else:  # kmock keeps these in sets: give them in the CRD's order
                    entry["verbs"] = sorted(entry["verbs"])
                    group, _, version = payload["groupVersion"].rpartition("/")
                    kind = self._kinds.get(Resource(group, version, entry["name"]))
                    if kind is not None:
                        crd = kind.crd
                        entry["shortNames"] = list(crd.short_names if crd else kind.short_names)
                        entry["categories"] = list(crd.categories if crd else ())
        return payload

    # ------------------------------------------------------------ request entry

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        match = _NAMESPACES_PATH.match(raw_request.path)
        if match:
            path = f"/api/v1/{_NAMESPACES_ALIAS}{match.group(1) or ''}"
            url = raw_request.rel_url
            raw_request = raw_request.clone(rel_url=url.with_path(path).with_query(url.query))
        return await super().__call__(raw_request)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.resource.plural == _NAMESPACES_ALIAS:
            renamed = attrs.evolve(request, resource=NAMESPACES, namespace=None)
            # kmock's views find a request by identity in the recorded ones: swap it there.
            self._requests[:] = [renamed if r is request else r for r in self._requests]
            request = renamed
        if request.resource is not None and request.method in _WRITES:
            async with self._lock:
                self._replies[request.id] = self._write(request)
        # kmock's emulator would change objects its own way here; we did it above,
        # so skip to the plain handler: user reactions first, then our fallbacks.
        try:
            return await kmock.RawHandler._handle(self, request)
        finally:
            self._replies.pop(request.id, None)  # unused when a user reaction answered

    async def _serve_write(self, request: kmock.Request) -> rendering.Response:
        reply = self._replies.pop(request.id, None)
        if reply is None:
            raise _error(405, "MethodNotAllowed", f"{request.method} is not supported here")
        return reply

    _serve_create = _serve_write
    _serve_update = _serve_write
    _serve_delete = _serve_write

    # ------------------------------------------------------------ writes

    def _write(self, request: kmock.Request) -> rendering.Response:
        kind = self._kind(request)
        if request.subresource not in (None, "status") or (
            request.subresource == "status" and not kind.status_subresource
        ):
            raise _error(404, "NotFound", "the server could not find the requested resource")
        namespace = request.namespace if kind.namespaced else None
        if kind.namespaced and namespace is None and request.method != kmock.method.POST:
            raise _error(404, "NotFound", "a namespaced resource needs a namespace in the URL")
        dry_run = "dryRun" in request.params
        match request.method, request.name:
            case kmock.method.POST, None:
                return self._create(kind, request, namespace, dry_run=dry_run)
            case kmock.method.PUT | kmock.method.PATCH, str(name):
                return self._update(kind, request, namespace, name, dry_run=dry_run)
            case kmock.method.DELETE, str(name):
                return self._delete(kind, request, namespace, name, dry_run=dry_run)
        raise _error(405, "MethodNotAllowed", f"{request.method} is not supported on this URL")

    def _create(
        self, kind: Kind, request: kmock.Request, namespace: str | None, *, dry_run: bool
    ) -> rendering.Response:
        body = request.data
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the request body is not a JSON object")
        body = copy.deepcopy(body)
        body.setdefault("apiVersion", kind.api_version)
        body.setdefault("kind", kind.kind)
        if (body["apiVersion"], body["kind"]) != (kind.api_version, kind.kind):
            raise _error(
                400,
                "BadRequest",
                f"the API version in the data ({body['apiVersion']}) and kind ({body['kind']}) "
                f"do not match the URL ({kind.api_version}, {kind.kind})",
            )
        metadata = body.setdefault("metadata", {})
        if kind.namespaced:
            namespace = namespace or metadata.get("namespace") or "default"
            if metadata.get("namespace", namespace) != namespace:
                raise _error(
                    400,
                    "BadRequest",
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request",
                )
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        if not metadata.get("name") and metadata.get("generateName"):
            metadata["name"] = metadata["generateName"] + secrets.token_hex(3)[:5]
        name = metadata.get("name")
        if not name:
            problem = _field("metadata.name", "Required value", "name or generateName is required")
            raise self._invalid(kind, "", [problem])
        key = (kind.resource, namespace, name)
        if key in self.objects and not self.objects[key].deleted:
            raise _error(
                409,
                "AlreadyExists",
                f'{kind.qualified} "{name}" already exists',
                name=name,
                group=kind.resource.group,
                kind=kind.resource.plural,
            )
        if kind.status_subresource:
            body.pop("status", None)
        for field in (*_SYSTEM_FIELDS[2:], "managedFields"):
            metadata.pop(field, None)
        body = self._admit(kind, body, None, request)
        if dry_run:
            return rendering.Response(status=201, payload=body)
        if kind.namespaced and namespace is not None:
            self._ensure_namespace(namespace)
        stored = self._store_new(kind, body, namespace)
        if kind.resource == CRDS:
            self.register_crd(crdvalidate.Crd.from_manifest(stored))
        return rendering.Response(status=201, payload=stored)

    def _update(
        self,
        kind: Kind,
        request: kmock.Request,
        namespace: str | None,
        name: str,
        *,
        dry_run: bool,
    ) -> rendering.Response:
        key = (kind.resource, namespace, name)
        old = self._existing(kind, key)
        status_only = request.subresource == "status"
        if request.method == kmock.method.PUT:
            if not isinstance(request.data, dict):
                raise _error(400, "BadRequest", "the request body is not a JSON object")
            new = copy.deepcopy(request.data)
        else:
            new = self._patched(kind, old, request)
        new_meta = new.setdefault("metadata", {})
        if not isinstance(new_meta, dict):
            raise self._invalid(
                kind, name, [_field("metadata", "Invalid value", "must be an object")]
            )
        wanted = new_meta.get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            raise self._conflict(kind, name)

        if kind.status_subresource and status_only:
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            result["apiVersion"], result["kind"] = kind.api_version, kind.kind
            if kind.status_subresource:
                result.pop("status", None)
                if "status" in old:
                    result["status"] = copy.deepcopy(old["status"])
        meta = result["metadata"]
        for field in _SYSTEM_FIELDS:
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        if meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or ()) - set(old["metadata"].get("finalizers") or ())
            if added:
                detail = "no new finalizers can be added if the object is being deleted, " + (
                    f"found new finalizers {json.dumps(sorted(added))}"
                )
                raise self._invalid(
                    kind, name, [_field("metadata.finalizers", "Forbidden", detail)]
                )
        result = self._admit(kind, result, old, request)
        meta = result["metadata"]
        if _content(result) != _content(old):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if result == old or dry_run:
            return rendering.Response(status=200, payload=result)

        meta["resourceVersion"] = self._next_revision()
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.objects[key].history.append(result)
            self.objects[key].delete()
            self._publish(kind.resource, "DELETED", result)
        else:
            self.objects[key].history.append(result)
            self._publish(kind.resource, "MODIFIED", result)
            if kind.resource == CRDS:  # a changed schema, columns or names take effect
                self.register_crd(crdvalidate.Crd.from_manifest(result))
        return rendering.Response(status=200, payload=result)

    def _delete(
        self,
        kind: Kind,
        request: kmock.Request,
        namespace: str | None,
        name: str,
        *,
        dry_run: bool,
    ) -> rendering.Response:
        key = (kind.resource, namespace, name)
        old = self._existing(kind, key)
        options = request.data if isinstance(request.data, dict) else {}
        preconditions = options.get("preconditions") or {}
        for field in ("uid", "resourceVersion"):
            if preconditions.get(field) and preconditions[field] != old["metadata"].get(field):
                raise self._conflict(kind, name)
        if dry_run:
            return rendering.Response(status=200, payload=old)
        result = copy.deepcopy(old)
        meta = result["metadata"]
        if meta.get("finalizers"):
            if meta.get("deletionTimestamp"):
                return rendering.Response(status=200, payload=old)
            meta["deletionTimestamp"] = _now()
            meta["deletionGracePeriodSeconds"] = 0
            meta["generation"] = int(meta.get("generation", 1)) + 1
            meta["resourceVersion"] = self._next_revision()
            self.objects[key].history.append(result)
            self._publish(kind.resource, "MODIFIED", result)
        else:
            meta["resourceVersion"] = self._next_revision()
            self.objects[key].history.append(result)
            self.objects[key].delete()
            self._publish(kind.resource, "DELETED", result)
        return rendering.Response(status=200, payload=result)

    def _patched(self, kind: Kind, old: dict[str, Any], request: kmock.Request) -> dict[str, Any]:
        content_type = _header(request, "Content-Type").split(";")[0].strip().lower()
        patch = request.data
        if content_type == "application/json-patch+json":
            if not isinstance(patch, list):
                raise _error(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                result = jsonpatch.apply_patch(old, patch, in_place=False)
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                # A failed "test" is how Kopf detects a lost race on finalizers: 422, never 500.
                problem = _field("", "", f"the JSON patch cannot be applied: {exc}")
                raise self._invalid(kind, old["metadata"]["name"], [problem]) from None
            if not isinstance(result, dict):
                raise _error(422, "Invalid", "the JSON patch did not produce an object")
            return result
        if content_type == "application/strategic-merge-patch+json" and kind.crd is not None:
            raise _error(
                415,
                "UnsupportedMediaType",
                "strategic merge patch is not supported for custom resources; "
                "use a merge patch (kubectl patch --type=merge) or a JSON patch",
            )
        if content_type in (
            "application/merge-patch+json",
            "application/strategic-merge-patch+json",
        ):
            if not isinstance(patch, dict):
                raise _error(400, "BadRequest", "a merge patch must be a JSON object")
            merged = _merge_patch(old, patch)
            assert isinstance(merged, dict)
            return merged
        raise _error(
            415,
            "UnsupportedMediaType",
            f"the emulator does not support patches of type {content_type!r} "
            "(server-side apply included); use merge or JSON patches",
        )

    def _admit(
        self,
        kind: Kind,
        body: dict[str, Any],
        old: dict[str, Any] | None,
        request: kmock.Request,
    ) -> dict[str, Any]:
        if kind.resource.group == "" and kind.kind == "Secret" and "stringData" in body:
            data = body.setdefault("data", {})
            for key, value in (body.pop("stringData") or {}).items():
                data[key] = base64.b64encode(str(value).encode()).decode()
        if kind.crd is None or not self.validate:
            return body
        strictness = request.params.get("fieldValidation", "Warn").lower()
        mode: crdvalidate.UnknownFields = "strict" if strictness == "strict" else "warn"
        admission = crdvalidate.admit(kind.crd, body, old=old, unknown_fields=mode)
        if admission.errors:
            name = str(body.get("metadata", {}).get("name", ""))
            if (
                mode == "strict"
                and admission.unknown_fields
                and all(not error.path for error in admission.errors)
            ):
                raise _error(
                    400,
                    "BadRequest",
                    "strict decoding error: " + ", ".join(str(e) for e in admission.errors),
                )
            raise self._invalid(kind, name, admission.errors)
        return admission.object

    def _invalid(
        self, kind: Kind, name: str, errors: list[crdvalidate.FieldError]
    ) -> kmock.KubernetesError:
        group = kind.resource.group
        label = f"{kind.kind}.{group}" if group else kind.kind
        return _error(
            422,
            "Invalid",
            f'{label} "{name}" is invalid: [{", ".join(str(error) for error in errors)}]',
            name=name,
            group=group,
            kind=kind.kind,
            causes=[
                {
                    "reason": _CAUSES.get(error.type, "FieldValueInvalid"),
                    "message": error.message,
                    "field": error.path,
                }
                for error in errors
            ],
        )

    def _conflict(self, kind: Kind, name: str) -> kmock.KubernetesError:
        return _error(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {kind.qualified} "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again",
            name=name,
            group=kind.resource.group,
            kind=kind.resource.plural,
        )

    def _existing(self, kind: Kind, key: tuple[kmock.resource, str | None, str]) -> dict[str, Any]:
        if key not in self.objects or self.objects[key].deleted:
            raise _error(
                404,
                "NotFound",
                f'{kind.qualified} "{key[2]}" not found',
                name=key[2],
                group=kind.resource.group,
                kind=kind.resource.plural,
            )
        return copy.deepcopy(self.objects[key].raw)

    def _store_new(self, kind: Kind, body: dict[str, Any], namespace: str | None) -> dict[str, Any]:
        metadata = body.setdefault("metadata", {})
        metadata.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=_now(),
            generation=1,
            resourceVersion=self._next_revision(),
        )
        key = (kind.resource, namespace, metadata["name"])
        if key in self.objects:
            self.objects[key].create(body)
        else:
            self.objects[key] = body
        self._publish(kind.resource, "ADDED", body)
        return body

    def _ensure_namespace(self, name: str) -> None:
        key = (NAMESPACES, None, name)
        if key not in self.objects or self.objects[key].deleted:
            self._store_new(
                self._kinds[NAMESPACES],
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": name},
                    "status": {"phase": "Active"},
                },
                None,
            )

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _publish(self, resource: kmock.resource, type_: str, obj: Mapping[str, Any]) -> None:
        event = {"type": type_, "object": copy.deepcopy(dict(obj))}
        self._log.append((self._revision, resource, event))
        self._wake()

    def _wake(self) -> None:
        self._tick.set()
        self._tick = asyncio.Event()

    def _kind(self, request: kmock.Request) -> Kind:
        resource = request.resource
        for known, kind in self._kinds.items():
            if resource is not None and known == resource:
                return kind
        raise _error(404, "NotFound", "the server could not find the requested resource")

    # ------------------------------------------------------------ reads

    async def _serve_list(self, request: kmock.Request) -> kmock.Payload:
        kind = self._kind(request)
        async with self._lock:
            items = [copy.deepcopy(obj) for obj in self._matching(kind, request)]
            revision = str(self._revision)
        if _wants_table(request):
            return _table(kind, items, revision, request)
        return {
            "apiVersion": kind.api_version,
            "kind": kind.kind + "List",
            "metadata": {"resourceVersion": revision},
            "items": items,
        }

    async def _serve_fetch(self, request: kmock.Request) -> kmock.Payload:
        kind = self._kind(request)
        assert request.name is not None
        namespace = request.namespace if kind.namespaced else None
        async with self._lock:
            obj = self._existing(kind, (kind.resource, namespace, request.name))
        if _wants_table(request):
            return _table(kind, [obj], obj["metadata"]["resourceVersion"], request)
        return obj

    # kmock's is an async generator; ours returns a Response to set the Content-Type header.
    async def _serve_watch(self, request: kmock.Request) -> kmock.Payload:  # type: ignore[override]
        kind = self._kind(request)
        return rendering.Response(
            headers={"Content-Type": "application/json"},
            payload=self._watch(kind, request),
        )

    async def _watch(self, kind: Kind, request: kmock.Request) -> AsyncIterator[kmock.Payload]:
        yield b""  # send the headers now, as the API server does
        table = _wants_table(request)
        timeout = float(request.params.get("timeoutSeconds") or 0) or None
        deadline = None if timeout is None else time.monotonic() + timeout
        since = request.params.get("resourceVersion") or "0"
        async with self._lock:
            if since == "0":
                start = self._revision
                initial = [
                    {"type": "ADDED", "object": copy.deepcopy(obj)}
                    for obj in self._matching(kind, request)
                ]
            else:
                start = int(since)
                initial = []
                oldest = self._log[0][0] if self._log else self._revision + 1
                if len(self._log) == self._log.maxlen and start < oldest - 1:
                    initial = [_gone(start)]
        for event in initial:
            yield _as_table_event(kind, event, request) if table else event
            if event["type"] == "ERROR":
                return
        seen = start
        while not self._closing:
            tick = self._tick
            fresh = [
                event
                for revision, resource, event in list(self._log)
                if revision > seen
                and resource == kind.resource
                and self._selected(kind, request, event["object"])
            ]
            seen = max(seen, self._revision)
            for event in fresh:
                yield _as_table_event(kind, event, request) if table else event
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(tick.wait(), timeout=remaining)

    async def stop_watches(self) -> None:
        """End every open watch stream (before the HTTP server shuts down)."""
        self._closing = True
        self._wake()

    def _matching(self, kind: Kind, request: kmock.Request) -> list[dict[str, Any]]:
        return [
            obj.raw
            for (resource, _, _), obj in self.objects.items()
            if resource == kind.resource
            and not obj.deleted
            and self._selected(kind, request, obj.raw)
        ]

    def _selected(self, kind: Kind, request: kmock.Request, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata", {})
        namespace = request.namespace if kind.namespaced else None
        if namespace is not None and meta.get("namespace") != namespace:
            return False
        if request.name is not None and meta.get("name") != request.name:
            return False
        fields = {"metadata.name": meta.get("name"), "metadata.namespace": meta.get("namespace")}
        return _match_fields(request.params.get("fieldSelector", ""), fields) and _match_labels(
            request.params.get("labelSelector", ""), meta.get("labels") or {}
        )


_WRITES = (kmock.method.POST, kmock.method.PUT, kmock.method.PATCH, kmock.method.DELETE)
# Set by the server only: a write keeps the stored values whatever it sends.
_SYSTEM_FIELDS = (
    "name",
    "namespace",
    "uid",
    "creationTimestamp",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "resourceVersion",
)
_CAUSES = {
    "Required value": "FieldValueRequired",
    "Unsupported value": "FieldValueNotSupported",
    "Duplicate value": "FieldValueDuplicate",
    "Forbidden": "FieldValueForbidden",
    "Too many": "FieldValueTooMany",
    "Too long": "FieldValueTooLong",
}


def _field(path: str, type_: str, detail: str) -> crdvalidate.FieldError:
    return crdvalidate.FieldError(path, type_, detail)


# ---------------------------------------------------------------- serving


@dataclasses.dataclass
class RunningApiServer:
    """A started emulator: its URL (``http://127.0.0.1:PORT``), the emulator, and its loop.

    The emulator runs in a thread with its own event loop. Kopf, run in-process,
    treats every task created in its loop after it starts as its own and cancels
    it on exit (after waiting 5 s for it): the server's connection handlers must
    not live there. Read state over HTTP, or with :meth:`inspect`.
    """

    url: str
    emulator: KubernetesEmulator
    loop: asyncio.AbstractEventLoop

    async def inspect(self, fn: Callable[[KubernetesEmulator], T]) -> T:
        """Run ``fn(emulator)`` in the emulator's loop (safe against concurrent requests)."""

        async def call() -> T:
            return fn(self.emulator)

        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(call(), self.loop))

    def kubeconfig(self, *, namespace: str = "default") -> dict[str, Any]:
        """A kubeconfig document (as a dict) for this server."""
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "emulator", "user": {"token": "emulator"}}],
            "contexts": [
                {
                    "name": "emulator",
                    "context": {"cluster": "emulator", "user": "emulator", "namespace": namespace},
                }
            ],
            "current-context": "emulator",
        }


@contextlib.asynccontextmanager
async def serve(
    crds: Iterable[crdvalidate.Crd] | None = None, *, validate: bool = True
) -> AsyncIterator[RunningApiServer]:
    """Run an emulator on 127.0.0.1 (a free port) serving ``crds`` (default: crds/*.yaml)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=_run_loop, args=(loop,), name="k8s-emulator", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()

    def in_loop(coro: Coroutine[Any, Any, T]) -> Awaitable[T]:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    async def start() -> RunningApiServer:
        emulator = KubernetesEmulator(validate=validate)
        for crd in crdvalidate.load_crds().values() if crds is None else crds:
            emulator.register_crd(crd)
        await stack.enter_async_context(emulator)
        server = await stack.enter_async_context(kmock.Server(emulator, host="127.0.0.1"))
        stack.push_async_callback(emulator.stop_watches)  # before the server waits for them
        return RunningApiServer(url=str(server.url).rstrip("/"), emulator=emulator, loop=loop)

    try:
        yield await in_loop(start())
    finally:
        try:
            await in_loop(stack.aclose())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


# ---------------------------------------------------------------- pure helpers


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: Mapping[str, Any]) -> dict[str, Any]:
    """What generation counts: everything but metadata and status."""
    return {key: value for key, value in obj.items() if key not in ("metadata", "status")}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _header(request: kmock.Request, name: str) -> str:
    for key, value in request.headers.items():
        if key.lower() == name.lower():
            return value
    return ""


def _gone(revision: int) -> dict[str, Any]:
    return {
        "type": "ERROR",
        "object": {
            "apiVersion": "v1",
            "kind": "Status",
            "metadata": {},
            "status": "Failure",
            "reason": "Expired",
            "code": 410,
            "message": f"too old resource version: {revision}",
        },
    }


_SELECTOR_TERM = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)|\s+(?P<setop>in|notin)\s*\((?P<set>[^)]*)\))?\s*$"
)


def _split_selector(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    terms, depth, current = [], 0, ""
    for char in selector:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += char
    return [term for term in [*terms, current] if term.strip()]


def _match_labels(selector: str, labels: Mapping[str, str]) -> bool:
    for term in _split_selector(selector):
        match = _SELECTOR_TERM.match(term)
        if not match:
            raise _error(400, "BadRequest", f"unable to parse requirement: {term!r}")
        key, op, value = match["key"], match["op"], match["value"]
        if match["setop"]:
            values = {v.strip() for v in match["set"].split(",")}
            if (labels.get(key) in values) != (match["setop"] == "in"):
                return False
        elif op in ("=", "=="):
            if labels.get(key) != value:
                return False
        elif op == "!=":
            if labels.get(key) == value:
                return False
        elif (key in labels) == bool(match["neg"]):
            return False
    return True


def _match_fields(selector: str, fields: Mapping[str, Any]) -> bool:
    for term in _split_selector(selector):
        match = re.match(r"^\s*([A-Za-z.]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
        if not match or match[1] not in fields:
            raise _error(400, "BadRequest", f"field label not supported: {term!r}")
        if (fields[match[1]] == match[3]) != (match[2] != "!="):
            return False
    return True


# ---------------------------------------------------------------- kubectl's Table


def _wants_table(request: kmock.Request) -> bool:
    return "as=Table" in _header(request, "Accept")


def _columns(kind: Kind) -> list[crdvalidate.PrinterColumn]:
    name = crdvalidate.PrinterColumn("Name", "string", ".metadata.name", format="name")
    if kind.crd is not None and kind.crd.printer_columns:
        return [name, *kind.crd.printer_columns]
    return [name, crdvalidate.PrinterColumn("Age", "date", ".metadata.creationTimestamp")]


def _table(
    kind: Kind, objects: list[dict[str, Any]], revision: str, request: kmock.Request
) -> dict[str, Any]:
    columns = _columns(kind)
    full = request.params.get("includeObject") == "Object"
    return {
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": {"resourceVersion": revision},
        "columnDefinitions": [
            {
                "name": column.name,
                "type": column.type,
                "format": column.format,
                "description": column.description,
                "priority": column.priority,
            }
            for column in columns
        ],
        "rows": [
            {
                "cells": [_cell(column, obj) for column in columns],
                "object": obj
                if full
                else {
                    "apiVersion": "meta.k8s.io/v1",
                    "kind": "PartialObjectMetadata",
                    "metadata": obj.get("metadata", {}),
                },
            }
            for obj in objects
        ],
    }


def _as_table_event(kind: Kind, event: dict[str, Any], request: kmock.Request) -> dict[str, Any]:
    if event["type"] == "ERROR":
        return event
    obj = event["object"]
    return {
        "type": event["type"],
        "object": _table(kind, [obj], obj["metadata"].get("resourceVersion", ""), request),
    }


def _cell(column: crdvalidate.PrinterColumn, obj: Mapping[str, Any]) -> Any:
    value: Any = obj
    for part in column.json_path.strip(".").split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if value is None:
        return None
    if column.type == "date":
        try:
            then = datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
        except ValueError:
            return str(value)
        return _human_duration(datetime.datetime.now(tz=datetime.UTC) - then)
    return value


def _human_duration(delta: datetime.timedelta) -> str:
    """Like Kubernetes' duration.HumanDuration ("5s", "3m20s", "4h", "2d3h")."""
    seconds = max(int(delta.total_seconds()), 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d" if days < 730 else f"{days // 365}y"
