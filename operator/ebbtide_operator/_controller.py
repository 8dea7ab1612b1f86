"""The operator's Kopf handlers, wired to one :class:`Controller` per process.

Handlers are thin adapters from custom resources to the engine's public API:
they read the spec, call ``ebbtide_engine``, and write ``status`` themselves
through Kopf's ``patch`` — phase, conditions, ``observedGeneration`` — and
post events. Kopf's own progress and diff base live in ``ebbtide.io/``
annotations (:func:`settings`), never in ``status``. Per kind:
``_vpgs`` (VirtualProtectionGroup), ``_checkpoints``, ``_recoveries``; the
StorageAccount check is here. StorageAccounts, Secrets and VPGs are also
indexed by Kopf, so resolving a reference needs no API call.
"""

from __future__ import annotations

import asyncio
from typing import Any

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _checkpoints, _conditions, _recoveries, _state, _vpgs


def settings() -> kopf.OperatorSettings:
    """Kopf settings: progress and diff base in ``ebbtide.io/`` annotations, never in status."""
    result = kopf.OperatorSettings()
    result.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=_state.GROUP)
    result.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=_state.GROUP, key="last-handled-configuration"
    )
    result.persistence.finalizer = _state.FINALIZER
    return result


class Controller:
    """The operator's in-memory state and its Kopf handlers (see :meth:`register`)."""

    def __init__(self, config: _state.OperatorConfig | None = None) -> None:
        self.state = _state.State(config or _state.OperatorConfig())
        self._vpgs = _vpgs.VpgHandlers(self.state)
        self._recoveries = _recoveries.RecoveryHandlers(self.state)
        self._parts = (
            self._vpgs,
            _checkpoints.CheckpointHandlers(self.state),
            self._recoveries,
        )

    @property
    def config(self) -> _state.OperatorConfig:
        return self.state.config

    # ------------------------------------------------------------ public views

    def runtime(self, namespace: str, name: str) -> ebbtide_engine.VpgRuntime | None:
        """The open runtime of VPG ``namespace/name`` (for the NBD endpoint and tests)."""
        protection = self.state.vpgs.get((namespace, name))
        return protection.runtime if protection else None

    def endpoint_status(self, namespace: str, name: str) -> ebbtide_engine.EndpointStatus | None:
        """The NBD endpoint of VPG ``namespace/name`` now (None: no endpoint, or not serving)."""
        hook = self.config.endpoint
        return hook.status(namespace, name) if hook is not None else None

    def protections(self) -> list[_state.Protection]:
        return list(self.state.vpgs.values())

    def recoveries(self) -> list[_state.RecoveryJob]:
        return list(self.state.jobs.values())

    def status_patches(self) -> int:
        """VPG status writes decided by the timers so far (for the benchmark)."""
        return sum(p.publisher.patches for p in self.state.vpgs.values())

    # ------------------------------------------------------------ registration

    def register(self, registry: kopf.OperatorRegistry) -> None:
        """Add every handler to ``registry`` (login handlers are the caller's)."""
        kopf.on.cleanup(registry=registry, id="stop-runtimes")(self.stop_all)
        kopf.index(*_state.ACCOUNTS, registry=registry, id="storage_accounts")(_index_spec)
        kopf.index(*_state.SECRETS, registry=registry, id="secrets")(_index_secret_data)
        kopf.index(*_state.VPGS, registry=registry, id="vpgs")(_index_spec)
        accounts = _state.ACCOUNTS
        kopf.on.create(*accounts, registry=registry, id="account-create")(self.check_account)
        kopf.on.resume(*accounts, registry=registry, id="account-resume")(self.check_account)
        kopf.on.update(*accounts, field="spec", registry=registry, id="account-update")(
            self.check_account
        )
        for part in self._parts:
            part.register(registry)

    # ------------------------------------------------------------ StorageAccount

    async def check_account(
        self,
        body: kopf.Body,
        namespace: str | None,
        name: str,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        **kwargs: Any,
    ) -> None:
        """Reach the bucket with the credentials given: phase Ready, or Error saying what to fix."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        generation = meta.get("generation")
        try:
            account = _accounts.resolve(
                namespace, name, accounts=kwargs["storage_accounts"], secrets=kwargs["secrets"]
            )
            await account.check()
        except (_accounts.AccountProblem, ebbtide_engine.StorageError) as exc:
            reason, message = _state.problem(exc)
            _state.write_status(
                patch,
                status,
                generation,
                phase="Error",
                message=message,
                conditions=[_conditions.Condition("Reachable", "False", reason, message)],
            )
            _state.warn_once(body, status, "Reachable", reason, message)
            raise kopf.TemporaryError(message, delay=self.state.retry_delay) from None
        message = f"{account.url} is reachable"
        _state.write_status(
            patch,
            status,
            generation,
            phase="Ready",
            message=message,
            conditions=[_conditions.Condition("Reachable", "True", "Reachable", message)],
        )
        kopf.info(body, reason="Ready", message=message)

    # ------------------------------------------------------------ lifecycle

    async def stop_all(self, **_: Any) -> None:
        """Operator shutdown: close every runtime cleanly, cancel running recoveries."""
        await self._recoveries.stop_all()
        jobs = list(self.state.jobs.values())
        for job in jobs:
            job.task.cancel()
        await asyncio.gather(*(job.task for job in jobs), return_exceptions=True)
        protections = list(self.state.vpgs.values())
        self.state.vpgs.clear()
        await asyncio.gather(*(self._vpgs.stop(p) for p in protections), return_exceptions=True)

    async def crash_all(self) -> None:
        """Drop every runtime without closing it, as a killed process would (tests only)."""
        protections = list(self.state.vpgs.values())
        self.state.vpgs.clear()
        hook = self.config.endpoint
        for protection in protections:
            if hook is not None:
                await hook.abort(protection.namespace, protection.name)
            await protection.runtime.abort()
            await protection.store.close()


def _index_spec(
    namespace: str | None, name: str, spec: kopf.Spec, **_: Any
) -> dict[_state.Key, Any]:
    return {(namespace or "", name): dict(spec)}


def _index_secret_data(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[_state.Key, Any]:
    return {(namespace or "", name): dict(body.get("data") or {})}
