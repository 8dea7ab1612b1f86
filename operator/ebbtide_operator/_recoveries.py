"""Recovery handlers: a Restore to image files runs as a task; a timer reports its progress.

Only ``type: Restore`` to ``target.type: Images`` with a ``path`` runs; the
rest is refused with "not supported yet". One Recovery per VPG at a time. A
Recovery found ``Running`` at start (the operator died during it) runs again
from the beginning: the engine writes ``*.partial`` files and renames them
only when complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import Mapping
from typing import Any

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _state

TERMINAL = ("Succeeded", "Failed", "Stopped")


class RecoveryHandlers:
    """Recovery handlers over the shared :class:`_state.State`."""

    def __init__(self, state: _state.State) -> None:
        self.state = state

    def register(self, registry: kopf.OperatorRegistry) -> None:
        on, recoveries = kopf.on, _state.RECOVERIES
        on.create(*recoveries, registry=registry, id="recovery-create")(self.start_recovery)
        on.resume(*recoveries, registry=registry, id="recovery-resume")(self.start_recovery)
        on.delete(*recoveries, registry=registry, id="recovery-delete", optional=True)(
            self.cancel_recovery
        )
        kopf.timer(
            *recoveries,
            interval=min(self.state.config.status_tick_seconds, 1.0),
            registry=registry,
            id="recovery-status",
            when=_active,
        )(self.refresh_recovery)

    async def start_recovery(
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
        """Start a Restore to image files in a background task; refuse what is not supported."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        phase = status.get("phase")
        key = (namespace, name)
        if phase in TERMINAL or key in self.state.jobs:
            return
        generation = meta.get("generation")
        vpg = str(spec.get("vpgRef", {}).get("name", ""))
        target = spec.get("target", {})
        unsupported = _unsupported(spec)
        if unsupported:
            self._fail_recovery(
                body, patch, status, generation, "NotSupported", f"not supported yet: {unsupported}"
            )
            return
        busy = [
            j.name for j in self.state.jobs.values() if (j.namespace, j.vpg) == (namespace, vpg)
        ]
        if busy:
            self._fail_recovery(
                body,
                patch,
                status,
                generation,
                "Conflict",
                f"Recovery {busy[0]!r} is already running for VPG {vpg!r}; wait for it to end "
                "and create this Recovery again",
            )
            return
        vpg_spec = _accounts.first(kwargs["vpgs"], (namespace, vpg))
        if vpg_spec is None:
            self._fail_recovery(
                body,
                patch,
                status,
                generation,
                "VpgNotFound",
                f"VPG {vpg!r} does not exist in namespace {namespace!r}; fix "
                "spec.vpgRef (a deleted VPG's retained data needs a VPG of the "
                "same name to recover)",
            )
            return
        try:
            selector = _selector(spec.get("checkpoint") or {"latest": True})
            account = _accounts.resolve(
                namespace,
                str(vpg_spec.get("storageAccountRef", {}).get("name", "")),
                accounts=kwargs["storage_accounts"],
                secrets=kwargs["secrets"],
            )
            store = account.open()
        except ebbtide_engine.InvalidRequest as exc:
            self._fail_recovery(body, patch, status, generation, "InvalidCheckpoint", str(exc))
            return
        except _accounts.AccountProblem as exc:
            _state.write_status(
                patch,
                status,
                generation,
                phase="Pending",
                message=exc.message,
                conditions=[_conditions.Condition("Running", "False", exc.reason, exc.message)],
            )
            _state.warn_once(body, status, "Running", exc.reason, exc.message)
            raise kopf.TemporaryError(exc.message, delay=self.state.retry_delay) from None
        vms = spec.get("vms")
        job: _state.RecoveryJob

        def progress(done: int, total: int) -> None:
            job.bytes_done, job.bytes_total = done, total

        async def restore() -> ebbtide_engine.RecoveryResult:
            try:
                return await ebbtide_engine.recover_to_files(
                    store,
                    vpg,
                    selector,
                    pathlib.Path(str(target["path"])),
                    vms=list(vms) if vms else None,
                    progress=progress,
                )
            finally:
                await store.close()

        job = _state.RecoveryJob(namespace, name, vpg, asyncio.create_task(restore()))
        self.state.jobs[key] = job
        message = f"restoring VPG {vpg!r} to {target['path']}"
        if phase == "Running":
            message += " (restarted from the beginning: the operator restarted during the restore)"
        _state.write_status(
            patch,
            status,
            generation,
            phase="Running",
            message=message,
            conditions=[
                _conditions.Condition(
                    "Running", "True", "Restarted" if phase == "Running" else "Started", message
                )
            ],
        )
        patch.status["startTime"] = _conditions.now()
        patch.status["progress"] = {"bytesDone": 0, "bytesTotal": 0, "percent": 0}
        kopf.info(body, reason="Started", message=message)

    async def refresh_recovery(
        self,
        body: kopf.Body,
        namespace: str | None,
        name: str,
        meta: kopf.Meta,
        status: kopf.Status,
        patch: kopf.Patch,
        **_: Any,
    ) -> None:
        """Timer: copy a running Restore's progress to status, and its outcome when it ends."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        job = self.state.jobs.get((namespace, name))
        if job is None:
            return
        generation = meta.get("generation")
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
        del self.state.jobs[(namespace, name)]
        if job.task.cancelled():
            self._fail_recovery(
                body, patch, status, generation, "Cancelled", "the restore was cancelled"
            )
            return
        exc = job.task.exception()
        if exc is not None:
            self._fail_recovery(body, patch, status, generation, type(exc).__name__, str(exc))
            return
        result = job.task.result()
        message = (
            f"restored {len(result.disks)} disks of VPG {job.vpg!r} at checkpoint "
            f"{result.checkpoint.id} ({result.bytes_read} bytes read in {result.seconds:.1f} s)"
        )
        _state.write_status(
            patch,
            status,
            generation,
            phase="Succeeded",
            message=message,
            conditions=[_conditions.Condition("Running", "False", "Succeeded", message)],
        )
        patch.status["checkpointId"] = result.checkpoint.id
        patch.status["completionTime"] = _conditions.now()
        total = max(job.bytes_total, result.bytes_read)
        patch.status["progress"] = {"bytesDone": total, "bytesTotal": total, "percent": 100}
        kopf.info(body, reason="Succeeded", message=message)

    async def cancel_recovery(self, namespace: str | None, name: str, **_: Any) -> None:
        assert namespace is not None  # every Ebbtide kind is namespaced
        job = self.state.jobs.pop((namespace, name), None)
        if job is not None:
            job.task.cancel()
            with contextlib.suppress(BaseException):
                await job.task

    @staticmethod
    def _fail_recovery(
        body: kopf.Body,
        patch: kopf.Patch,
        status: kopf.Status,
        generation: int | None,
        reason: str,
        message: str,
    ) -> None:
        _state.write_status(
            patch,
            status,
            generation,
            phase="Failed",
            message=message,
            conditions=[_conditions.Condition("Running", "False", reason, message)],
        )
        patch.status["completionTime"] = _conditions.now()
        kopf.warn(body, reason=reason, message=message)


def _active(status: kopf.Status, **_: Any) -> bool:
    return status.get("phase") not in TERMINAL


def _unsupported(spec: Mapping[str, Any]) -> str:
    kind = spec.get("type")
    target = spec.get("target", {})
    if kind != "Restore":
        return f"Recovery type {kind} (only Restore to Images works in this version)"
    if target.get("type") != "Images":
        return f"a Restore to {target.get('type')} (only target.type Images works in this version)"
    if not target.get("path"):
        return "an Images target in a storage account (give target.path, a directory)"
    return ""


def _selector(checkpoint: Mapping[str, Any]) -> ebbtide_engine.CheckpointSelector:
    before = checkpoint.get("before")
    return ebbtide_engine.CheckpointSelector(
        latest=bool(checkpoint.get("latest", False)),
        id=checkpoint.get("id"),
        tag=checkpoint.get("tag"),
        before=_state.parse_time(before) if before else None,
    )
