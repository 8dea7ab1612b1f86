"""VirtualProtectionGroup handlers: one engine runtime per VPG, its status, its finalizer.

Create, resume and spec changes run :meth:`VpgHandlers.reconcile_vpg`: parse the
spec with the engine, resolve the StorageAccount, open the runtime (a spec
change closes the old one cleanly first; the engine records the new disk
layout). A timer projects ``runtime.status()`` into ``status`` through a
:class:`_vpgstatus.Publisher`, so that routine changes cost few API calls.
The delete handler (Kopf's finalizer) stops the runtime and keeps or deletes
the stored data as ``spec.onDelete`` says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _state, _vpgstatus

logger = logging.getLogger("ebbtide.operator")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # what the engine accepts


class VpgHandlers:
    """VirtualProtectionGroup handlers over the shared :class:`_state.State`."""

    def __init__(self, state: _state.State) -> None:
        self.state = state

    def register(self, registry: kopf.OperatorRegistry) -> None:
        on, vpgs = kopf.on, _state.VPGS
        on.create(*vpgs, registry=registry, id="vpg-create")(self.reconcile_vpg)
        on.resume(*vpgs, registry=registry, id="vpg-resume")(self.reconcile_vpg)
        on.update(*vpgs, field="spec", registry=registry, id="vpg-update")(self.reconcile_vpg)
        on.delete(*vpgs, registry=registry, id="vpg-delete")(self.delete_vpg)
        kopf.timer(
            *vpgs,
            interval=self.state.config.status_tick_seconds,
            registry=registry,
            id="vpg-status",
        )(self.refresh_vpg)

    async def reconcile_vpg(
        self,
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        namespace: str | None,
        name: str,
        patch: kopf.Patch,
        **kwargs: Any,
    ) -> None:
        """Open (or reopen, on a spec change) the VPG's runtime and write its first status."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        key = (namespace, name)
        generation = meta.get("generation")
        async with self.state.lock(key):
            try:
                vpg_spec = ebbtide_engine.VpgSpec.from_resource(body)
            except ebbtide_engine.SpecError as exc:
                message = str(exc)
                if key in self.state.vpgs:
                    message += " (protection goes on with the previous valid spec)"
                _state.write_status(
                    patch,
                    status,
                    generation,
                    phase="Error",
                    message=message,
                    conditions=[
                        _conditions.Condition("SpecValid", "False", "InvalidSpec", message)
                    ],
                )
                kopf.warn(body, reason="InvalidSpec", message=message)
                raise kopf.PermanentError(message) from None
            account_name = str(spec.get("storageAccountRef", {}).get("name", ""))
            try:
                account = _accounts.resolve(
                    namespace,
                    account_name,
                    accounts=kwargs["storage_accounts"],
                    secrets=kwargs["secrets"],
                )
                store = account.open()
            except _accounts.AccountProblem as exc:
                self._retry_later(body, patch, status, generation, "StorageReachable", exc)
            old = self.state.vpgs.pop(key, None)
            if old is not None:
                logger.info("VPG %s/%s: spec changed; reopening the runtime", namespace, name)
                await self.stop(old)
            try:
                runtime = await self._open_runtime(namespace, vpg_spec, store)
            except (ebbtide_engine.StorageError, ebbtide_engine.FencedError) as exc:
                await store.close()
                kind = (
                    "Ready" if isinstance(exc, ebbtide_engine.FencedError) else "StorageReachable"
                )
                self._retry_later(body, patch, status, generation, kind, exc)
            protection = _state.Protection(
                namespace=namespace,
                name=name,
                spec=vpg_spec,
                store=store,
                runtime=runtime,
                generation=generation,
                publisher=_vpgstatus.Publisher(self.state.config.status_refresh_seconds),
                checkpoints=len(runtime.list_checkpoints()),
            )
            runtime.add_durable_listener(lambda _checkpoint: _count(protection))
            self.state.vpgs[key] = protection
            if self.state.config.endpoint is not None:
                await self.state.config.endpoint.attach(namespace, name, runtime)
            self._publish(protection, status, patch, force=True)
            previous = runtime.status().previous_writer
            detail = ""
            if previous is not None and not previous.clean_shutdown:
                detail = (
                    f"; the previous writer (epoch {previous.previous_epoch}) did not stop "
                    f"cleanly: writes after checkpoint {previous.last_checkpoint} are void"
                )
            kopf.info(
                body,
                reason="Protecting",
                message=f"runtime open in {store.description} with epoch "
                f"{runtime.status().epoch}{detail}",
            )

    async def _open_runtime(
        self, namespace: str, spec: ebbtide_engine.VpgSpec, store: ebbtide_engine.ObjectStore
    ) -> ebbtide_engine.VpgRuntime:
        writer = _state.writer_id(self.state.config.pod_name, namespace, spec.name)
        takeover = await _takeover_mode(store, spec.name, writer)
        options = ebbtide_engine.RuntimeOptions(
            writer_id=writer, takeover=takeover, lease_seconds=self.state.config.lease_seconds
        )
        return await ebbtide_engine.VpgRuntime.open(spec, store, options=options)

    def _retry_later(
        self,
        body: kopf.Body,
        patch: kopf.Patch,
        status: kopf.Status,
        generation: int | None,
        condition: str,
        exc: Exception,
    ) -> NoReturn:
        reason, message = _state.problem(exc)
        _state.write_status(
            patch,
            status,
            generation,
            phase="Error",
            message=message,
            conditions=[
                _conditions.Condition("SpecValid", "True", "Valid", "the spec is valid"),
                _conditions.Condition(condition, "False", reason, message),
            ],
        )
        _state.warn_once(body, status, condition, reason, message)
        raise kopf.TemporaryError(message, delay=self.state.retry_delay) from None

    async def refresh_vpg(
        self,
        namespace: str | None,
        name: str,
        status: kopf.Status,
        patch: kopf.Patch,
        body: kopf.Body,
        **_: Any,
    ) -> None:
        """Timer: write the runtime's status when it changed enough (see ``_vpgstatus``)."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        protection = self.state.vpgs.get((namespace, name))
        if protection is None:
            return
        before = status.get("phase")
        if self._publish(protection, status, patch) and patch.status.get("phase") != before:
            new = patch.status.get("phase")
            message = str(patch.status.get("message", ""))
            if new in ("MeetingSLA", "Initializing", "Syncing"):
                kopf.info(body, reason=str(new), message=message)
            else:
                kopf.warn(body, reason=str(new), message=message)

    def _publish(
        self,
        protection: _state.Protection,
        status: Mapping[str, Any],
        patch: kopf.Patch,
        *,
        force: bool = False,
    ) -> bool:
        fields, conditions = _vpgstatus.project(
            protection.runtime.status(), protection.spec, checkpoints=protection.checkpoints
        )
        fields["observedGeneration"] = protection.generation
        view = {**fields, "conditions": [dataclasses.asdict(c) for c in conditions]}
        if force:
            protection.publisher.forget()
        if not protection.publisher.decide(view):
            return False
        patch.status.update(fields)
        patch.status["conditions"] = _conditions.merge(
            status.get("conditions"), conditions, generation=protection.generation
        )
        return True

    async def delete_vpg(
        self,
        body: kopf.Body,
        spec: kopf.Spec,
        namespace: str | None,
        name: str,
        patch: kopf.Patch,
        retry: int,
        **kwargs: Any,
    ) -> None:
        """Finalizer: stop protecting; keep or delete the stored data as ``spec.onDelete`` says."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        patch.status["phase"] = "Deleting"
        key = (namespace, name)
        async with self.state.lock(key):
            protection = self.state.vpgs.pop(key, None)
            if protection is not None:
                await self.stop(protection)
        if spec.get("onDelete", "Retain") != "Delete":
            kopf.info(body, reason="Retained", message="protection stopped; stored data kept")
            return
        if not _DNS_LABEL.match(name):
            kopf.info(body, reason="Deleted", message="an invalid VPG name never stored data")
            return
        account_name = str(spec.get("storageAccountRef", {}).get("name", ""))
        try:
            account = _accounts.resolve(
                namespace,
                account_name,
                accounts=kwargs["storage_accounts"],
                secrets=kwargs["secrets"],
            )
            store = account.open()
            try:
                deleted = await _delete_prefix(store, f"vpgs/{name}/")
            finally:
                await store.close()
        except (_accounts.AccountProblem, ebbtide_engine.StorageError) as exc:
            _reason, message = _state.problem(exc)
            if retry < 5:
                kopf.warn(body, reason="DeleteDataFailed", message=f"{message}; will retry")
                raise kopf.TemporaryError(message, delay=self.state.retry_delay) from None
            kopf.warn(
                body,
                reason="DeleteDataFailed",
                message=f"{message}; gave up: the data under vpgs/{name}/ is left in place",
            )
            return
        kopf.info(
            body,
            reason="Deleted",
            message=f"protection stopped; {deleted} objects under vpgs/{name}/ deleted",
        )

    async def stop(self, protection: _state.Protection) -> None:
        if self.state.config.endpoint is not None:
            await self.state.config.endpoint.detach(protection.namespace, protection.name)
        try:
            await protection.runtime.close()
        except ebbtide_engine.EbbtideError as exc:
            logger.warning(
                "VPG %s/%s: clean close failed (%s); aborting",
                protection.namespace,
                protection.name,
                exc,
            )
            await protection.runtime.abort()
        finally:
            await protection.store.close()


def _count(protection: _state.Protection) -> None:
    protection.checkpoints += 1


async def _takeover_mode(
    store: ebbtide_engine.ObjectStore, vpg: str, writer: str
) -> Literal["wait", "force"]:
    """``force`` when the lease holder is this very writer id (our previous life), else ``wait``."""
    key = f"vpgs/{vpg}/manifest.json"  # FORMAT.md; the engine has no public reader for it
    try:
        stored = await store.get(key)
    except ebbtide_engine.ObjectNotFound:
        return "wait"
    manifest = ebbtide_engine.Manifest.from_json(key, stored.data)
    return "force" if manifest.writer == writer else "wait"


async def _delete_prefix(store: ebbtide_engine.ObjectStore, prefix: str) -> int:
    keys = [info.key async for info in store.list(prefix)]
    for start in range(0, len(keys), 64):
        await asyncio.gather(*(store.delete(key) for key in keys[start : start + 64]))
    return len(keys)
