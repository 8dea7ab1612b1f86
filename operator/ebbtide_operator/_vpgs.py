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
import pathlib
import re
import time
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _endpoints, _state, _vpgstatus

logger = logging.getLogger("ebbtide.operator")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # what the engine accepts


class VpgHandlers:
    """VirtualProtectionGroup handlers over the shared :class:`_state.State`."""

    def __init__(self, state: _state.State) -> None:
        self.state = state
        #: A changed StorageAccount that could not be reached, and when to check it again.
        self._rejected: dict[_state.Key, tuple[_accounts.ResolvedAccount, float]] = {}

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
            self.state.reopen.pop(key, None)
            try:
                protection = await self._open_protection(
                    namespace, name, vpg_spec, store, account, generation
                )
            except (ebbtide_engine.StorageError, ebbtide_engine.FencedError) as exc:
                kind = (
                    "Ready" if isinstance(exc, ebbtide_engine.FencedError) else "StorageReachable"
                )
                self._retry_later(body, patch, status, generation, kind, exc)
            self._publish(protection, status, patch, force=True)
            self._announce(protection, body, status)

    async def _open_protection(
        self,
        namespace: str,
        name: str,
        vpg_spec: ebbtide_engine.VpgSpec,
        store: ebbtide_engine.ObjectStore,
        account: _accounts.ResolvedAccount,
        generation: int | None,
    ) -> _state.Protection:
        """Open the runtime on ``store`` (closed on failure), register it, attach the endpoint."""
        try:
            runtime = await self._open_runtime(namespace, vpg_spec, store)
        except BaseException:
            await store.close()
            raise
        protection = _state.Protection(
            namespace=namespace,
            name=name,
            spec=vpg_spec,
            store=store,
            runtime=runtime,
            generation=generation,
            publisher=_vpgstatus.Publisher(self.state.config.status_refresh_seconds),
            checkpoints=len(runtime.list_checkpoints()),
            account=account,
        )
        runtime.add_durable_listener(lambda _checkpoint: _count(protection))
        self.state.vpgs[(namespace, name)] = protection
        await self._attach(protection)
        return protection

    async def _attach(self, protection: _state.Protection) -> bool:
        """Start the VPG's NBD endpoint; a problem is kept for status and retried later."""
        hook = self.state.config.endpoint
        if hook is None:
            return False
        try:
            await hook.attach(protection.namespace, protection.name, protection.runtime)
        except _endpoints.EndpointProblem as exc:
            if protection.endpoint_problem != (exc.reason, exc.message):
                logger.warning(
                    "VPG %s/%s: endpoint not served: %s", protection.namespace, protection.name, exc
                )
            protection.endpoint_problem = (exc.reason, exc.message)
            protection.endpoint_retry_at = time.monotonic() + self.state.retry_delay
            return False
        protection.endpoint_problem = None
        return True

    def _announce(
        self, protection: _state.Protection, body: kopf.Body, status: Mapping[str, Any]
    ) -> None:
        """The Protecting event (epoch, void writes, endpoint), or the endpoint's Warning."""
        runtime_status = protection.runtime.status()
        previous = runtime_status.previous_writer
        detail = ""
        if previous is not None and not previous.clean_shutdown:
            detail = (
                f"; the previous writer (epoch {previous.previous_epoch}) did not stop "
                f"cleanly: writes after checkpoint {previous.last_checkpoint} are void"
            )
        hook = self.state.config.endpoint
        served = hook.status(protection.namespace, protection.name) if hook else None
        if served is not None:
            disks = ", ".join(f"{d.export} {d.state}" for d in served.disks)
            detail += f"; NBD endpoint serving {disks}"
        kopf.info(
            body,
            reason="Protecting",
            message=f"runtime open in {protection.store.description} with epoch "
            f"{runtime_status.epoch}{detail}",
        )
        if protection.endpoint_problem is not None:
            reason, message = protection.endpoint_problem
            _state.warn_once(body, status, "EndpointReady", reason, message)

    async def _open_runtime(
        self, namespace: str, spec: ebbtide_engine.VpgSpec, store: ebbtide_engine.ObjectStore
    ) -> ebbtide_engine.VpgRuntime:
        writer = _state.writer_id(self.state.config.pod_name, namespace, spec.name)
        takeover = await _takeover_mode(store, spec.name, writer)
        config = self.state.config
        # Spill beside the endpoint's maps (".spill": no VM name starts with a dot); without
        # an endpoint the state directory is not in use, and writers wait instead.
        spill = (
            pathlib.Path(config.state_dir) / namespace / spec.name / ".spill"
            if config.endpoint is not None
            else None
        )
        options = ebbtide_engine.RuntimeOptions(
            writer_id=writer,
            takeover=takeover,
            lease_seconds=config.lease_seconds,
            spill_dir=spill,
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
        **kwargs: Any,
    ) -> None:
        """Timer: write the runtime's status when it changed enough (see ``_vpgstatus``).

        It also reopens the runtime when its StorageAccount (URL, credentials)
        changed, and retries an endpoint that could not be served.
        """
        assert namespace is not None  # every Ebbtide kind is namespaced
        key = (namespace, name)
        if key in self.state.reopen and key not in self.state.vpgs:
            await self._reopen(key, body, patch, status, kwargs)
            return
        protection = self.state.vpgs.get(key)
        if protection is None:
            return
        if protection.account is not None and await self._follow_account(
            protection, body, patch, status, kwargs
        ):
            return
        if protection.endpoint_problem is not None and (
            time.monotonic() >= protection.endpoint_retry_at
        ):
            async with self.state.lock(key):
                current = self.state.vpgs.get(key) is protection
                served = current and await self._attach(protection)
            if served:
                self._announce(protection, body, status)
            elif current and protection.endpoint_problem is not None:
                reason, message = protection.endpoint_problem
                _state.warn_once(body, status, "EndpointReady", reason, message)
        before = status.get("phase")
        if self._publish(protection, status, patch) and patch.status.get("phase") != before:
            new = patch.status.get("phase")
            message = str(patch.status.get("message", ""))
            if new in ("MeetingSLA", "Initializing", "Syncing"):
                kopf.info(body, reason=str(new), message=message)
            else:
                kopf.warn(body, reason=str(new), message=message)

    async def _follow_account(
        self,
        protection: _state.Protection,
        body: kopf.Body,
        patch: kopf.Patch,
        status: kopf.Status,
        indexes: Mapping[str, Any],
    ) -> bool:
        """Reopen on a changed StorageAccount (URL, bucket, Secret); True if it reopened.

        The new account is checked first: while it cannot be reached the
        runtime goes on with the old one (the StorageAccount's own status says
        why). Then the runtime closes cleanly (every journal byte shipped, a
        final checkpoint) and opens on the new account.
        """
        assert protection.account is not None
        try:
            account = _accounts.resolve(
                protection.namespace,
                protection.account.name,
                accounts=indexes["storage_accounts"],
                secrets=indexes["secrets"],
            )
        except _accounts.AccountProblem:
            return False
        key = (protection.namespace, protection.name)
        if account == protection.account:
            return False
        rejected, until = self._rejected.get(key, (None, 0.0))
        if account == rejected and time.monotonic() < until:
            return False
        self._rejected.pop(key, None)
        try:
            await account.check()
        except (_accounts.AccountProblem, ebbtide_engine.StorageError) as exc:
            _reason, message = _state.problem(exc)
            logger.warning(
                "VPG %s/%s: StorageAccount %s changed but is unusable (%s); keeping the old one",
                *key,
                account.name,
                message,
            )
            # Checked again after the retry delay, not on every tick.
            self._rejected[key] = (account, time.monotonic() + self.state.retry_delay)
            return False
        async with self.state.lock(key):
            if self.state.vpgs.get(key) is not protection:
                return False
            kopf.info(
                body,
                reason="StorageAccountChanged",
                message=f"StorageAccount {account.name!r} changed: closing the runtime in "
                f"{protection.store.description} cleanly and reopening it",
            )
            self.state.vpgs.pop(key)
            await self.stop(protection)
            self.state.reopen[key] = (protection.spec, protection.generation)
            await self._reopen(key, body, patch, status, indexes, locked=True)
        return True

    async def _reopen(
        self,
        key: _state.Key,
        body: kopf.Body,
        patch: kopf.Patch,
        status: kopf.Status,
        indexes: Mapping[str, Any],
        *,
        locked: bool = False,
    ) -> None:
        """Open a runtime closed for an account change (retried by the timer until it opens)."""
        if not locked:
            async with self.state.lock(key):
                if key in self.state.reopen and key not in self.state.vpgs:
                    await self._reopen(key, body, patch, status, indexes, locked=True)
            return
        namespace, name = key
        vpg_spec, generation = self.state.reopen[key]
        account_name = str(body.get("spec", {}).get("storageAccountRef", {}).get("name", ""))
        try:
            account = _accounts.resolve(
                namespace,
                account_name,
                accounts=indexes["storage_accounts"],
                secrets=indexes["secrets"],
            )
            store = account.open()
            protection = await self._open_protection(
                namespace, name, vpg_spec, store, account, generation
            )
        except (
            _accounts.AccountProblem,
            ebbtide_engine.StorageError,
            ebbtide_engine.FencedError,
        ) as exc:
            reason, message = _state.problem(exc)
            fenced = isinstance(exc, ebbtide_engine.FencedError)
            condition = "Ready" if fenced else "StorageReachable"
            _state.write_status(
                patch,
                status,
                generation,
                phase="Error",
                message=f"reopening after a StorageAccount change: {message}; will retry",
                conditions=[_conditions.Condition(condition, "False", reason, message)],
            )
            _state.warn_once(body, status, condition, reason, message)
            return
        del self.state.reopen[key]
        self._publish(protection, status, patch, force=True)
        self._announce(protection, body, status)

    def _publish(
        self,
        protection: _state.Protection,
        status: Mapping[str, Any],
        patch: kopf.Patch,
        *,
        force: bool = False,
    ) -> bool:
        hook = self.state.config.endpoint
        fields, conditions = _vpgstatus.project(
            protection.runtime.status(),
            protection.spec,
            checkpoints=protection.checkpoints,
            endpoint=hook.status(protection.namespace, protection.name) if hook else None,
            endpoint_enabled=hook is not None,
            endpoint_problem=protection.endpoint_problem,
            operation=protection.operation,
            operation_message=protection.operation_message,
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
            self.state.reopen.pop(key, None)
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
        """Detach the endpoint (its checkpoint covers every write served), close the runtime."""
        hook = self.state.config.endpoint
        if hook is not None:
            try:
                await hook.detach(protection.namespace, protection.name)
            except ebbtide_engine.EbbtideError as exc:
                logger.warning(
                    "VPG %s/%s: endpoint did not stop cleanly (%s); aborting it",
                    protection.namespace,
                    protection.name,
                    exc,
                )
                await hook.abort(protection.namespace, protection.name)
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
