"""Recovery handlers: Restore, FailoverTest, Failover and Move, after Zerto's operations.

One :class:`Operation` per active Recovery lives in memory; everything it
needs to resume or undo after an operator restart is also in the Recovery's
``status`` (phase, checkpointId, exports, commitPolicyAtStart, commitDeadline).

- The create/resume handler checks the spec, refuses a second operation on the
  same VPG (reason ``Conflict``) and starts the operation: a copy in a task
  (Restore, Failover, Move), or an NBD export (FailoverTest).
- One timer per active Recovery is the only writer afterwards; it is a small
  state machine: copy progress → ``Succeeded`` (Restore) or ``Ready``
  (Failover/Move wait for the commit policy; FailoverTest serves) →
  ``Committing``/``RollingBack`` → ``Succeeded``/``Stopped``. It reads the
  latest ``spec`` each tick, so ``spec.stop`` and a changed
  ``spec.commitPolicy`` take effect within a tick.
- The delete handler (a finalizer) stops a FailoverTest (recording it) and
  rolls back an undecided Failover or Move.

docs/operator.md ("Recovery") gives the exact semantics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _restorejobs, _state, _targets

logger = logging.getLogger("ebbtide.operator")

TERMINAL = ("Succeeded", "Failed", "Stopped")
DECIDING = {"Commit": "Committing", "Rollback": "RollingBack"}


def now() -> datetime.datetime:
    """The wall clock (a function, so tests can move time past a commitTimeout)."""
    return datetime.datetime.now(tz=datetime.UTC)


class Refused(Exception):
    """A Recovery that cannot run: ``reason`` (CamelCase) and what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclasses.dataclass(slots=True)
class Operation:
    """One active Recovery in this process."""

    namespace: str
    name: str
    vpg: str
    type: str
    target: dict[str, Any]
    phase: str
    job: _state.RecoveryJob | None = None
    exports: list[_targets.Export] = dataclasses.field(default_factory=list)
    checkpoint_id: int | None = None
    start_policy: str = "None"
    timeout_seconds: float = 3600.0
    deadline: datetime.datetime | None = None
    vms: list[str] = dataclasses.field(default_factory=list)
    job_name: str | None = None  # the restore Job of a PersistentVolumeClaims target
    logger: Any = None  # Kopf's logger of the Recovery (for API calls of later ticks)
    export: Any = None  # the ebbtide_engine.RecoveryExport of a FailoverTest
    store: ebbtide_engine.ObjectStore | None = None  # the export reads through it
    published: dict[str, int] = dataclasses.field(default_factory=dict)  # status.testExport
    published_at: float = 0.0
    quiesced: bool = False
    quiesced_on: object = None  # the Protection whose endpoint a Move detached
    created_ns: int = 0  # the Recovery's creationTimestamp: its test checkpoint is newer

    @property
    def key(self) -> _state.Key:
        return (self.namespace, self.name)

    @property
    def vpg_key(self) -> _state.Key:
        return (self.namespace, self.vpg)


@dataclasses.dataclass(frozen=True, slots=True)
class Copied:
    """What a copy produced, whatever the target."""

    checkpoint_id: int
    disks: int
    bytes_read: int
    detail: str
    exports: list[_targets.Export]

    @classmethod
    def of(cls, result: ebbtide_engine.RecoveryResult, exports: list[_targets.Export]) -> Copied:
        return cls(
            result.checkpoint.id,
            len(result.disks),
            result.bytes_read,
            f"{result.bytes_read} bytes read in {result.seconds:.1f} s",
            exports,
        )


class RecoveryHandlers:
    """Recovery handlers over the shared :class:`_state.State`."""

    def __init__(self, state: _state.State) -> None:
        self.state = state
        self.ops: dict[_state.Key, Operation] = {}

    def register(self, registry: kopf.OperatorRegistry) -> None:
        on, recoveries = kopf.on, _state.RECOVERIES
        on.create(*recoveries, registry=registry, id="recovery-create")(self.start_recovery)
        on.resume(*recoveries, registry=registry, id="recovery-resume")(self.start_recovery)
        on.delete(*recoveries, registry=registry, id="recovery-delete")(self.delete_recovery)
        kopf.timer(
            *recoveries,
            interval=min(self.state.config.status_tick_seconds, 1.0),
            registry=registry,
            id="recovery-status",
            when=_active,
        )(self.refresh_recovery)

    # ------------------------------------------------------------ start

    async def start_recovery(
        self,
        body: kopf.Body,
        spec: kopf.Spec,
        meta: kopf.Meta,
        status: kopf.Status,
        namespace: str | None,
        name: str,
        patch: kopf.Patch,
        retry: int,
        **kwargs: Any,
    ) -> None:
        """Check the spec and start the operation (or pick it up again after a restart)."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        phase = status.get("phase")
        key = (namespace, name)
        if phase in TERMINAL or key in self.ops:
            return
        generation = meta.get("generation")
        vpg = str(spec.get("vpgRef", {}).get("name", ""))
        op = Operation(
            namespace=namespace,
            name=name,
            vpg=vpg,
            type=str(spec.get("type", "")),
            target=dict(spec.get("target") or {}),
            phase=str(phase or "Pending"),
            vms=list(spec.get("vms") or []),
            logger=kwargs.get("logger"),
            created_ns=_created_ns(meta),
        )
        try:
            _check_spec(spec, name)
            busy = next((o for o in self.ops.values() if o.vpg_key == op.vpg_key), None)
            if busy is not None:
                raise Refused(
                    "Conflict",
                    f"Recovery {busy.name!r} ({busy.type}) is already running for VPG {vpg!r}; "
                    "only one Recovery per VPG runs at a time: wait for it to end (or stop, "
                    "commit or roll it back) and create this Recovery again",
                )
            if _accounts.first(kwargs["vpgs"], op.vpg_key) is None:
                raise Refused(
                    "VpgNotFound",
                    f"VPG {vpg!r} does not exist in namespace {namespace!r}; fix "
                    "spec.vpgRef (a deleted VPG's retained data needs a VPG of the "
                    "same name to recover)",
                )
            selector = _selector(spec.get("checkpoint") or {"latest": True})
            store = self._vpg_store(op, kwargs)
        except Refused as exc:
            self._fail(body, patch, status, generation, exc.reason, exc.message)
            return
        except ebbtide_engine.InvalidRequest as exc:
            self._fail(body, patch, status, generation, "InvalidCheckpoint", str(exc))
            return
        except _accounts.AccountProblem as exc:
            self._pending(body, patch, status, generation, exc.reason, exc.message, phase=op.phase)
            raise kopf.TemporaryError(exc.message, delay=self.state.retry_delay) from None
        try:
            if op.type == "FailoverTest":
                await self._start_test(op, store, selector, retry, body, patch, status, generation)
            elif phase in ("Ready", "Committing", "RollingBack"):
                await store.close()
                self._pick_up(op, spec, status)
                self.ops[key] = op
                await self._mark(op)
                message = f"picked up after an operator restart: {status.get('message', '')}"
                kopf.info(body, reason="Resumed", message=message)
            else:
                await self._start_copy(op, body, spec, store, selector, retry, kwargs)
                self._started(op, body, patch, status, generation, restarted=phase == "Running")
        except Refused as exc:
            await _close_quietly(store)
            self._fail(body, patch, status, generation, exc.reason, exc.message)
        except ebbtide_engine.EbbtideError as exc:  # e.g. a Move's final checkpoint failed
            await _close_quietly(store)
            await self._release(op)
            reason, message = _state.problem(exc)
            if op.quiesced:
                message += "; protection of the VPG resumed"
            self._fail(body, patch, status, generation, reason, message)
        except _Wait as exc:  # a phase from before a restart stays, so the retry resumes it
            await _close_quietly(store)
            self._pending(body, patch, status, generation, exc.reason, exc.message, phase=op.phase)
            raise kopf.TemporaryError(exc.message, delay=exc.delay) from None

    def _vpg_store(self, op: Operation, kwargs: Mapping[str, Any]) -> ebbtide_engine.ObjectStore:
        vpg_spec = _accounts.first(kwargs["vpgs"], op.vpg_key) or {}
        account = _accounts.resolve(
            op.namespace,
            str(vpg_spec.get("storageAccountRef", {}).get("name", "")),
            accounts=kwargs["storage_accounts"],
            secrets=kwargs["secrets"],
        )
        return account.open()

    def _target_account(
        self, op: Operation, kwargs: Mapping[str, Any]
    ) -> _accounts.ResolvedAccount | None:
        ref = op.target.get("storageAccountRef")
        if op.target.get("type") != "Images" or not ref:
            return None
        return _accounts.resolve(
            op.namespace,
            str(ref.get("name", "")),
            accounts=kwargs["storage_accounts"],
            secrets=kwargs["secrets"],
        )

    async def _start_copy(
        self,
        op: Operation,
        body: kopf.Body,
        spec: Mapping[str, Any],
        store: ebbtide_engine.ObjectStore,
        selector: ebbtide_engine.CheckpointSelector,
        retry: int,
        kwargs: Mapping[str, Any],
    ) -> None:
        """Restore, Failover, Move: (quiesce and cut a final checkpoint,) then copy in a task."""
        op.start_policy = str(spec.get("commitPolicy") or "None")
        op.timeout_seconds = ebbtide_engine.parse_duration(str(spec.get("commitTimeout") or "1h"))
        try:
            account = self._target_account(op, kwargs)
        except _accounts.AccountProblem as exc:
            raise _Wait(exc.reason, exc.message, self.state.retry_delay) from None
        if op.type == "Move":
            protection = self.state.vpgs.get(op.vpg_key)
            if protection is None:
                message = (
                    f"VPG {op.vpg!r} is not protecting; a Move needs it to take its final "
                    "checkpoint"
                )
                if retry < self.state.config.checkpoint_wait_retries:
                    raise _Wait(
                        "VpgNotProtecting",
                        f"waiting for VPG {op.vpg!r} to start protecting (a Move takes a final "
                        "checkpoint first)",
                        self.state.config.checkpoint_wait_seconds,
                    )
                raise Refused("VpgNotProtecting", f"{message}; see `kubectl describe vpg {op.vpg}`")
            await self._quiesce(op)
            checkpoint = await _final_checkpoint(protection, f"move/{op.name}", body["metadata"])
            op.checkpoint_id = checkpoint.id
            selector = ebbtide_engine.CheckpointSelector(id=checkpoint.id)
        vms = spec.get("vms")
        job: _state.RecoveryJob
        scratch = self._scratch()

        def progress(done: int, total: int) -> None:
            job.bytes_done, job.bytes_total = done, total

        owner = _hold_owner(self.state.config.pod_name, op.namespace, op.name)

        async def copy() -> Copied:
            try:
                if op.target.get("type") == "PersistentVolumeClaims":
                    return await self._copy_to_claims(op, body, store, selector, kwargs)
                if account is not None:
                    copied = await _targets.copy_to_account(
                        store,
                        op.vpg,
                        selector,
                        account,
                        op.name,
                        scratch,
                        vms=vms,
                        progress=progress,
                        owner=owner,
                    )
                    return Copied.of(*copied)
                copied = await _targets.copy_to_path(
                    store,
                    op.vpg,
                    selector,
                    pathlib.Path(str(op.target["path"])),
                    vms=vms,
                    progress=progress,
                    owner=owner,
                )
                return Copied.of(*copied)
            finally:
                await store.close()

        job = _state.RecoveryJob(op.namespace, op.name, op.vpg, asyncio.create_task(copy()))
        op.job = job
        op.phase = "Running"
        self.state.jobs[op.key] = job
        self.ops[op.key] = op
        await self._mark(op)

    async def _copy_to_claims(
        self,
        op: Operation,
        body: kopf.Body,
        store: ebbtide_engine.ObjectStore,
        selector: ebbtide_engine.CheckpointSelector,
        kwargs: Mapping[str, Any],
    ) -> Copied:
        """PVCs and a restore Job (``_restorejobs``); returns once the Job succeeded."""
        vpg_spec = _accounts.first(kwargs["vpgs"], op.vpg_key) or {}
        disks = _restorejobs.disks_of(op.name, vpg_spec, op.vms)
        checkpoint_id = op.checkpoint_id
        if checkpoint_id is None:
            checkpoint_id = _choose(
                await ebbtide_engine.list_checkpoints(store, op.vpg), op.vpg, selector
            )
            op.checkpoint_id = checkpoint_id
        account_name = str(vpg_spec.get("storageAccountRef", {}).get("name", ""))
        account_spec = (
            _accounts.first(kwargs["storage_accounts"], (op.namespace, account_name)) or {}
        )
        api = _restorejobs.Api(op.namespace, kwargs["logger"])
        for disk in disks:
            await api.create(
                "persistentvolumeclaims",
                _restorejobs.claim_manifest(disk, body, op.target.get("storageClassName")),
            )
        manifest = _restorejobs.job_manifest(
            recovery_body=body,
            image=self.state.config.job_image,
            storage_url=str(account_spec.get("url", "")),
            credentials=account_spec.get("credentialsSecretRef"),
            vpg=op.vpg,
            checkpoint_id=checkpoint_id,
            disks=disks,
        )
        name = manifest["metadata"]["name"]
        await api.create("jobs", manifest)
        op.job_name = name
        seconds = await _restorejobs.wait_for_job(
            api, name, tick=min(self.state.config.status_tick_seconds, 1.0)
        )
        total = sum(d.size for d in disks)
        exports = [
            (d.vm, d.disk, f"pvc://{op.namespace}/{d.claim}/{_restorejobs.IMAGE}") for d in disks
        ]
        return Copied(
            checkpoint_id, len(disks), total, f"restore Job {name!r}, {seconds:.1f} s", exports
        )

    def _started(
        self,
        op: Operation,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        *,
        restarted: bool,
    ) -> None:
        verb = {"Restore": "restoring", "Failover": "failing over", "Move": "moving"}[op.type]
        if op.target.get("type") == "PersistentVolumeClaims":
            where = f"PersistentVolumeClaims through Job {_restorejobs.job_name(op.name)!r}"
        else:
            where = (
                op.target.get("path")
                or f"StorageAccount {op.target.get('storageAccountRef', {}).get('name')!r}"
            )
        message = f"{verb} VPG {op.vpg!r} to {where}"
        if op.type == "Move":
            message += f" at its final checkpoint {op.checkpoint_id} (tag move/{op.name})"
        if restarted and op.target.get("type") == "PersistentVolumeClaims":
            message += " (the operator restarted: watching its restore Job again)"
        elif restarted:
            message += " (restarted from the beginning: the operator restarted during the copy)"
        _state.write_status(
            patch,
            status,
            generation,
            phase="Running",
            message=message,
            conditions=[
                _conditions.Condition(
                    "Running", "True", "Restarted" if restarted else "Started", message
                )
            ],
        )
        if not restarted or "startTime" not in status:
            patch.status["startTime"] = _conditions.now()
        patch.status["progress"] = {"bytesDone": 0, "bytesTotal": 0, "percent": 0}
        if op.type in ("Failover", "Move"):
            patch.status["commitPolicyAtStart"] = op.start_policy
        if op.target.get("type") == "PersistentVolumeClaims":
            patch.status["job"] = _restorejobs.job_name(op.name)
        if op.checkpoint_id is not None:
            patch.status["checkpointId"] = op.checkpoint_id
        kopf.info(body, reason="Started", message=message)

    def _pick_up(self, op: Operation, spec: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """A Failover or Move that was Ready (or deciding) when the operator stopped."""
        op.checkpoint_id = status.get("checkpointId")
        op.exports = [(e["vm"], e["disk"], e["url"]) for e in status.get("exports") or ()]
        op.start_policy = str(
            status.get("commitPolicyAtStart") or spec.get("commitPolicy") or "None"
        )
        deadline = status.get("commitDeadline")
        op.deadline = _state.parse_time(deadline) if deadline else None
        op.quiesced = op.type == "Move"  # _mark detaches the reopened VPG's endpoint

    # ------------------------------------------------------------ FailoverTest

    async def _start_test(
        self,
        op: Operation,
        store: ebbtide_engine.ObjectStore,
        selector: ebbtide_engine.CheckpointSelector,
        retry: int,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
    ) -> None:
        """Serve the disks at the checkpoint over NBD at once; after a restart, end the test."""
        if op.phase == "Ready":  # the export and its overlay died with the previous process
            op.checkpoint_id = status.get("checkpointId")
            waits = self.state.config.checkpoint_wait_retries
            if op.vpg_key not in self.state.vpgs and retry < waits:
                raise _Wait(
                    "VpgNotProtecting",
                    f"the operator restarted during the test; waiting for VPG {op.vpg!r} to "
                    "protect again to record the test as a checkpoint",
                    self.state.config.checkpoint_wait_seconds,
                )
            await store.close()
            checkpoint = await self._record_test(op)
            message = (
                "the operator restarted while the test ran: its NBD exports and their scratch "
                "overlays are gone (the test's writes are discarded); "
                + _recorded(op, checkpoint)
                + "; create a new Recovery to test again"
            )
            self._fail(body, patch, status, generation, "OperatorRestarted", message)
            return
        config = self.state.config
        options = ebbtide_engine.RecoveryExportOptions(
            host=config.endpoint_address, port=0, advertise_host=config.endpoint_advertise
        )
        vms = op.vms or None
        try:
            export = await ebbtide_engine.RecoveryExport.open(
                store,
                op.vpg,
                selector,
                self._scratch() / op.namespace / op.name,
                vms=vms,
                options=options,
                owner=_hold_owner(self.state.config.pod_name, op.namespace, op.name),
            )
        except ebbtide_engine.EbbtideError as exc:  # the caller closes the store
            reason, message = _state.problem(exc)
            raise Refused(reason, message) from None
        op.export, op.store = export, store
        op.checkpoint_id = export.checkpoint.id
        urls = export.urls()
        op.exports = [(vm, disk, url) for (vm, disk), url in sorted(urls.items())]
        op.phase = "Ready"
        self.ops[op.key] = op
        await self._mark(op)
        message = (
            f"serving {len(urls)} disks of VPG {op.vpg!r} at checkpoint {op.checkpoint_id} over "
            "NBD (status.exports; writes go to a scratch overlay); protection goes on; set "
            "spec.stop: true or delete this Recovery to end the test"
        )
        self._write(patch, status, generation, "Ready", message, "Running", "True", "Serving")
        patch.status["startTime"] = _conditions.now()
        patch.status["checkpointId"] = op.checkpoint_id
        patch.status["exports"] = [{"vm": vm, "disk": d, "url": u} for vm, d, u in op.exports]
        kopf.info(body, reason="Ready", message=message)

    def _publish_test(self, op: Operation, patch: kopf.Patch) -> None:
        """``status.testExport`` (clients, bytes fetched, overlay): when it changed, at most
        every ``status_refresh_seconds`` (the first change at once)."""
        if op.export is None:
            return
        current = op.export.status()
        view = {
            "connections": current.connections,
            "bytesFetched": current.bytes_fetched,
            "overlayBytes": current.overlay_bytes,
            "reads": current.reads,
            "writes": current.writes,
        }
        moment = time.monotonic()
        if view == op.published or (
            op.published and moment - op.published_at < self.state.config.status_refresh_seconds
        ):
            return
        op.published, op.published_at = view, moment
        patch.status["testExport"] = view

    async def _close_test(self, op: Operation) -> ebbtide_engine.Checkpoint | None:
        """Close the export (its overlay is discarded) and record the test as a checkpoint."""
        if op.export is not None:
            export, op.export = op.export, None
            try:
                await export.close()
            finally:
                if op.store is not None:
                    await op.store.close()
        return await self._record_test(op)

    async def _record_test(self, op: Operation) -> ebbtide_engine.Checkpoint | None:
        """Record the test once: a stop or delete handled twice finds the first record."""
        protection = self.state.vpgs.get(op.vpg_key)
        if protection is None:
            return None
        tag = f"failover-test/{op.name}"
        for checkpoint in reversed(protection.runtime.list_checkpoints()):
            if checkpoint.time_ns < op.created_ns:
                break
            if checkpoint.kind == ebbtide_engine.CheckpointKind.FAILOVER_TEST and (
                checkpoint.tag == tag
            ):
                return checkpoint
        return await protection.runtime.checkpoint(ebbtide_engine.CheckpointKind.FAILOVER_TEST, tag)

    async def _stop_test(
        self,
        op: Operation,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
    ) -> None:
        try:
            checkpoint = await self._close_test(op)
        except ebbtide_engine.EbbtideError as exc:
            checkpoint = None
            logger.warning("Recovery %s/%s: recording the test failed: %s", *op.key, exc)
        await self._release(op)
        message = f"test stopped; {_recorded(op, checkpoint)}"
        self._write(patch, status, generation, "Stopped", message, "Running", "False", "Stopped")
        patch.status["completionTime"] = _conditions.now()
        patch.status["exports"] = []
        if checkpoint is not None:
            patch.status["testCheckpointId"] = checkpoint.id
        kopf.info(body, reason="Stopped", message=message)

    # ------------------------------------------------------------ timer

    async def refresh_recovery(
        self,
        body: kopf.Body,
        spec: kopf.Spec,
        namespace: str | None,
        name: str,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        **kwargs: Any,
    ) -> None:
        """Timer: progress, the end of a copy, a stopped test, a commit decision."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        op = self.ops.get((namespace, name))
        if op is None:
            return
        generation = meta.get("generation")
        await self._mark(op)
        if op.job is not None:
            await self._follow_copy(op, body, patch, status, generation)
        elif op.type == "FailoverTest":
            if spec.get("stop"):
                await self._stop_test(op, body, patch, status, generation)
            else:
                self._publish_test(op, patch)
        elif op.phase == "Ready":
            self._maybe_decide(op, spec, body, patch, status, generation)
        elif op.phase in ("Committing", "RollingBack"):
            await self._apply_decision(op, body, patch, status, generation, kwargs)

    async def _follow_copy(
        self,
        op: Operation,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
    ) -> None:
        job = op.job
        assert job is not None
        if not job.task.done():
            percent = int(job.ratio * 100)
            if percent != job.published_percent:
                job.published_percent = percent
                patch.status["progress"] = {
                    "bytesDone": job.bytes_done,
                    "bytesTotal": job.bytes_total,
                    "percent": percent,
                }
            return
        op.job = None
        self.state.jobs.pop(op.key, None)
        if job.task.cancelled():
            await self._end_failed(
                op, body, patch, status, generation, "Cancelled", "the copy was cancelled"
            )
            return
        exc = job.task.exception()
        if exc is not None:
            reason = type(exc).__name__
            message = str(exc)
            if op.type == "Move":
                message += "; protection of the VPG resumed"
            await self._end_failed(op, body, patch, status, generation, reason, message)
            return
        result: Copied = job.task.result()
        exports = result.exports
        op.exports = exports
        op.checkpoint_id = result.checkpoint_id
        total = max(job.bytes_total, result.bytes_read)
        patch.status["progress"] = {"bytesDone": total, "bytesTotal": total, "percent": 100}
        patch.status["checkpointId"] = result.checkpoint_id
        patch.status["exports"] = [
            {"vm": vm, "disk": disk, "url": url} for vm, disk, url in exports
        ]
        copied = (
            f"{result.disks} disks of VPG {op.vpg!r} at checkpoint {result.checkpoint_id} "
            f"({result.detail})"
        )
        if op.type == "Restore":
            await self._keep_claims(op)
            self.ops.pop(op.key, None)
            message = f"restored {copied}"
            self._write(
                patch, status, generation, "Succeeded", message, "Running", "False", "Succeeded"
            )
            patch.status["completionTime"] = _conditions.now()
            kopf.info(body, reason="Succeeded", message=message)
            return
        op.phase = "Ready"
        if op.start_policy != "None":
            op.deadline = now() + datetime.timedelta(seconds=op.timeout_seconds)
            patch.status["commitDeadline"] = _conditions.rfc3339(op.deadline)
            then = (
                f"{op.start_policy} at {_conditions.rfc3339(op.deadline)} unless "
                "spec.commitPolicy changes"
            )
        else:
            then = "waiting for a person to set spec.commitPolicy to Commit or Rollback"
        verb = "failed over" if op.type == "Failover" else "moved"
        message = f"{verb} {copied}; {then}"
        self._write(
            patch, status, generation, "Ready", message, "Running", "True", "AwaitingCommit"
        )
        kopf.info(body, reason="Ready", message=message)

    def _maybe_decide(
        self,
        op: Operation,
        spec: Mapping[str, Any],
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
    ) -> None:
        """A changed commitPolicy decides now; the policy at start decides at the deadline."""
        policy = str(spec.get("commitPolicy") or "None")
        if policy == "None":
            return
        if policy != op.start_policy:
            by = "spec.commitPolicy was set"
        elif op.deadline is not None and now() >= op.deadline:
            by = "commitTimeout passed"
        else:
            return
        op.phase = DECIDING[policy]
        message = f"{policy} of {op.type} ({by})"
        self._write(patch, status, generation, op.phase, message, "Running", "True", policy)
        patch.status["decision"] = policy
        kopf.info(body, reason=op.phase, message=message)

    async def _apply_decision(
        self,
        op: Operation,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        kwargs: Mapping[str, Any],
    ) -> None:
        try:
            if op.phase == "RollingBack":
                removed = await self._remove_created(op, kwargs)
        except (_accounts.AccountProblem, ebbtide_engine.EbbtideError, OSError) as exc:
            reason, message = _state.problem(exc)
            message = f"rollback could not remove what {op.type} wrote: {message}; will retry"
            _state.warn_once(body, status, "Running", reason, message)
            self._write(patch, status, generation, op.phase, message, "Running", "True", reason)
            return
        if op.phase == "Committing":
            await self._keep_claims(op)
        await self._release(op)
        patch.status["completionTime"] = _conditions.now()
        if op.phase == "Committing":
            message = (
                f"committed: the recovered disks ({len(op.exports)}, status.exports) are kept "
                f"at checkpoint {op.checkpoint_id}; VPG {op.vpg!r} protects its source as before"
            )
            self._write(
                patch, status, generation, "Succeeded", message, "Running", "False", "Committed"
            )
            kopf.info(body, reason="Committed", message=message)
        else:
            message = (
                f"rolled back: removed {removed} recovered images; VPG {op.vpg!r} protects its "
                "source as before"
            )
            self._write(
                patch, status, generation, "Stopped", message, "Running", "False", "RolledBack"
            )
            kopf.info(body, reason="RolledBack", message=message)

    async def _keep_claims(self, op: Operation) -> None:
        """PVCs of a Restore that succeeded or a commit outlive the Recovery (no owner)."""
        if op.target.get("type") != "PersistentVolumeClaims" or op.logger is None:
            return
        api = _restorejobs.Api(op.namespace, op.logger)
        for vm, disk, _url in op.exports:
            await api.disown(_restorejobs.claim_name(op.name, vm, disk))

    async def _remove_created(self, op: Operation, kwargs: Mapping[str, Any]) -> int:
        disks = [(vm, disk) for vm, disk, _url in op.exports]
        if op.target.get("type") == "PersistentVolumeClaims":
            api = _restorejobs.Api(op.namespace, kwargs["logger"])
            await api.delete("jobs", _restorejobs.job_name(op.name))
            removed = 0
            for vm, disk in disks:
                claim = _restorejobs.claim_name(op.name, vm, disk)
                removed += await api.delete("persistentvolumeclaims", claim)
            return removed
        account = self._target_account(op, kwargs)
        if account is not None:
            return await _targets.remove_objects(account, op.name, disks)
        if op.target.get("path"):
            return await asyncio.to_thread(
                _targets.remove_files, pathlib.Path(str(op.target["path"])), disks
            )
        return 0

    # ------------------------------------------------------------ delete, shutdown

    async def delete_recovery(
        self,
        body: kopf.Body,
        namespace: str | None,
        name: str,
        spec: kopf.Spec,
        status: kopf.Status,
        **kwargs: Any,
    ) -> None:
        """Finalizer: cancel a copy, end a FailoverTest, roll back an undecided Failover/Move."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        op = self.ops.pop((namespace, name), None)
        phase = status.get("phase")
        if op is None:  # not running in this process: deleted before the resume handler ran
            kind = spec.get("type")
            undecided = kind in ("Failover", "Move") and phase in (
                "Running",
                "Ready",
                "RollingBack",
            )
            if not undecided and not (kind == "FailoverTest" and phase == "Ready"):
                return
            op = Operation(
                namespace,
                name,
                str(spec.get("vpgRef", {}).get("name", "")),
                str(spec["type"]),
                dict(spec.get("target") or {}),
                str(phase),
                created_ns=_created_ns(body.get("metadata", {})),
            )
            self._pick_up(op, spec, status)
        if op.job is not None:
            self.state.jobs.pop(op.key, None)
            op.job.task.cancel()
            with contextlib.suppress(BaseException):
                await op.job.task
        if op.type == "FailoverTest":
            checkpoint = await self._close_test(op)
            kopf.info(body, reason="Stopped", message=f"deleted: {_recorded(op, checkpoint)}")
        elif op.type in ("Failover", "Move") and op.phase != "Committing" and op.exports:
            removed = await self._remove_created(op, kwargs)
            kopf.info(
                body,
                reason="RolledBack",
                message=f"deleted before a commit: removed {removed} recovered images",
            )
        await self._release(op)

    async def stop_all(self) -> None:
        """Operator shutdown: cancel copies, close exports; status stays for the next start."""
        for op in list(self.ops.values()):
            if op.job is not None:
                op.job.task.cancel()
                with contextlib.suppress(BaseException):
                    await op.job.task
            if op.export is not None:
                with contextlib.suppress(Exception):
                    await op.export.close()
                if op.store is not None:
                    await op.store.close()
        self.ops.clear()

    # ------------------------------------------------------------ helpers

    def _scratch(self) -> pathlib.Path:
        return pathlib.Path(self.state.config.state_dir) / "scratch"

    async def _mark(self, op: Operation) -> None:
        """Show the operation on the VPG (phase FailingOver/Moving, condition OperationRunning).

        Called every tick: a VPG whose runtime reopened (a restart, a spec change)
        gets it back, and a Move detaches the reopened runtime's endpoint again.
        """
        protection = self.state.vpgs.get(op.vpg_key)
        if protection is None:
            return
        protection.operation = op.type
        protection.operation_message = f"Recovery {op.name!r} ({op.type}) is {op.phase}"
        if op.quiesced and op.quiesced_on is not protection:
            await self._quiesce(op)

    async def _quiesce(self, op: Operation) -> None:
        """Move: the VPG's endpoint stops accepting writes (without one, nothing to stop)."""
        endpoint = self.state.config.endpoint
        protection = self.state.vpgs.get(op.vpg_key)
        if endpoint is not None and protection is not None:
            await endpoint.detach(op.namespace, op.vpg)
        op.quiesced, op.quiesced_on = True, protection

    async def _release(self, op: Operation) -> None:
        """Operation over: the VPG's phase is protection's again; a quiesced endpoint reattaches."""
        self.ops.pop(op.key, None)
        protection = self.state.vpgs.get(op.vpg_key)
        if protection is None:
            return
        if protection.operation == op.type:
            protection.operation = None
            protection.operation_message = ""
        endpoint = self.state.config.endpoint
        if op.quiesced and endpoint is not None:
            await endpoint.attach(op.namespace, op.vpg, protection.runtime)

    async def _end_failed(
        self,
        op: Operation,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        reason: str,
        message: str,
    ) -> None:
        await self._release(op)
        self._fail(body, patch, status, generation, reason, message)

    @staticmethod
    def _write(
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        phase: str,
        message: str,
        condition: str,
        value: _conditions.Status,
        reason: str,
    ) -> None:
        _state.write_status(
            patch,
            status,
            generation,
            phase=phase,
            message=message,
            conditions=[_conditions.Condition(condition, value, reason, message)],
        )

    @staticmethod
    def _fail(
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        reason: str,
        message: str,
    ) -> None:
        _state.fail(
            body, patch, status, generation, condition="Running", reason=reason, message=message
        )
        patch.status["completionTime"] = _conditions.now()

    def _pending(
        self,
        body: kopf.Body,
        patch: kopf.Patch,
        status: Mapping[str, Any],
        generation: int | None,
        reason: str,
        message: str,
        *,
        phase: str = "Pending",
    ) -> None:
        self._write(patch, status, generation, phase, message, "Running", "False", reason)
        _state.warn_once(body, status, "Running", reason, message)


class _Wait(Exception):
    """Not yet: retry after ``delay`` seconds (phase Pending says why)."""

    def __init__(self, reason: str, message: str, delay: float) -> None:
        super().__init__(message)
        self.reason, self.message, self.delay = reason, message, delay


async def _final_checkpoint(
    protection: _state.Protection, tag: str, meta: Mapping[str, Any]
) -> ebbtide_engine.Checkpoint:
    """The Move's final checkpoint: found again after a restart, else cut now."""
    created = _state.parse_time(meta.get("creationTimestamp"))
    for checkpoint in reversed(protection.runtime.list_checkpoints()):
        if checkpoint.tag == tag and created is not None and checkpoint.time >= created:
            return checkpoint
    return await protection.runtime.checkpoint(ebbtide_engine.CheckpointKind.TAGGED, tag)


async def _close_quietly(store: ebbtide_engine.ObjectStore) -> None:
    """Close a store that may already be closed (an error path after a handover)."""
    with contextlib.suppress(Exception):
        await store.close()


def _choose(
    checkpoints: list[ebbtide_engine.Checkpoint],
    vpg: str,
    selector: ebbtide_engine.CheckpointSelector,
) -> int:
    """The id ``selector`` names (the restore Job then recovers exactly that one)."""
    found: ebbtide_engine.Checkpoint | None = None
    if selector.latest:
        found = checkpoints[-1] if checkpoints else None
    elif selector.id is not None:
        found = next((c for c in checkpoints if c.id == selector.id), None)
    elif selector.tag is not None:
        found = next((c for c in reversed(checkpoints) if c.tag == selector.tag), None)
    elif selector.before is not None:
        found = next((c for c in reversed(checkpoints) if c.time < selector.before), None)
    if found is None:
        raise ebbtide_engine.CheckpointNotFound(
            f"VPG {vpg!r} has no {selector.describe()} ({len(checkpoints)} checkpoints)"
        )
    return found.id


def _recorded(op: Operation, checkpoint: ebbtide_engine.Checkpoint | None) -> str:
    if checkpoint is None:
        return (
            f"not recorded as a checkpoint: VPG {op.vpg!r} was not protecting "
            f"(the test served checkpoint {op.checkpoint_id})"
        )
    return (
        f"recorded as checkpoint {checkpoint.id} (kind FailoverTest, tag "
        f"{checkpoint.tag}, never diluted)"
    )


def _active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


def _check_spec(spec: Mapping[str, Any], name: str) -> None:
    """Refuse the combinations that cannot run, saying what to change."""
    kind = spec.get("type")
    target = spec.get("target") or {}
    target_type = target.get("type")
    if kind not in ("Restore", "FailoverTest", "Failover", "Move"):
        raise Refused("InvalidSpec", f"unknown Recovery type {kind!r}")
    if kind == "FailoverTest":
        if target_type != "NbdExport":
            raise Refused(
                "InvalidTarget",
                "a FailoverTest serves the disks over NBD: set target.type NbdExport "
                f"(not {target_type})",
            )
        return
    if target_type == "NbdExport":
        what = "type FailoverTest" if kind == "Restore" else "Images or PersistentVolumeClaims"
        raise Refused(
            "InvalidTarget",
            f"a {kind} cannot target NbdExport: the exports' writes would live only in a "
            f"scratch overlay that ends with the Recovery; use {what}",
        )
    if target.get("path") and target.get("storageAccountRef"):
        raise Refused(
            "InvalidTarget",
            "give either target.path (a directory) or target.storageAccountRef (a recovery "
            "bucket), not both",
        )
    checkpoint = spec.get("checkpoint") or {"latest": True}
    if kind == "Move" and not checkpoint.get("latest"):
        raise Refused(
            "InvalidCheckpoint",
            f"a Move recovers at its own final checkpoint (tag move/{name}), taken after writes "
            "stop; leave spec.checkpoint out (or {latest: true}) — use a Failover for an "
            "earlier checkpoint",
        )


def _selector(checkpoint: Mapping[str, Any]) -> ebbtide_engine.CheckpointSelector:
    before = checkpoint.get("before")
    return ebbtide_engine.CheckpointSelector(
        latest=bool(checkpoint.get("latest", False)),
        id=checkpoint.get("id"),
        tag=checkpoint.get("tag"),
        before=_state.parse_time(before) if before else None,
    )


def _hold_owner(pod_name: str, namespace: str, recovery: str) -> str:
    """Who holds the journal while a Recovery reads it (shown in the bucket's hold object)."""
    return f"operator/{pod_name}/{namespace}/recovery/{recovery}"


def _created_ns(meta: Mapping[str, Any]) -> int:
    """A resource's creationTimestamp in Unix nanoseconds (0 if it has none)."""
    created = _state.parse_time(meta.get("creationTimestamp"))
    return int(created.timestamp() * 1e9) if created else 0
