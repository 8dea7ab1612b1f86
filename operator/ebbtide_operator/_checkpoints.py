"""Checkpoint handlers: a tagged or application-consistent checkpoint of a protected VPG."""

from __future__ import annotations

from typing import Any

import kopf

import ebbtide_engine
from ebbtide_operator import _accounts, _conditions, _state


class CheckpointHandlers:
    """Checkpoint handlers over the shared :class:`_state.State`."""

    def __init__(self, state: _state.State) -> None:
        self.state = state

    def register(self, registry: kopf.OperatorRegistry) -> None:
        on = kopf.on
        on.create(*_state.CHECKPOINTS, registry=registry, id="checkpoint-create")(
            self.take_checkpoint
        )
        on.resume(*_state.CHECKPOINTS, registry=registry, id="checkpoint-resume")(
            self.take_checkpoint
        )

    async def take_checkpoint(
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
        """Cut a Tagged or ApplicationConsistent checkpoint and write its id and time."""
        assert namespace is not None  # every Ebbtide kind is namespaced
        if status.get("phase") in ("Committed", "Failed"):
            return
        generation = meta.get("generation")
        vpg = str(spec.get("vpgRef", {}).get("name", ""))
        tag = str(spec.get("tag") or name)
        protection = self.state.vpgs.get((namespace, vpg))
        if protection is None:
            exists = _accounts.first(kwargs["vpgs"], (namespace, vpg)) is not None
            if exists and retry < self.state.config.checkpoint_wait_retries:
                message = f"waiting for VPG {vpg!r} to start protecting"
                _state.write_status(
                    patch,
                    status,
                    generation,
                    phase="Pending",
                    message=message,
                    conditions=[
                        _conditions.Condition("Committed", "False", "VpgNotProtecting", message)
                    ],
                )
                raise kopf.TemporaryError(message, delay=self.state.config.checkpoint_wait_seconds)
            message = (
                f"VPG {vpg!r} is not protecting; see `kubectl describe vpg {vpg}`"
                if exists
                else f"VPG {vpg!r} does not exist in namespace {namespace!r}; fix spec.vpgRef"
            )
            reason = "VpgNotProtecting" if exists else "VpgNotFound"
            _state.fail(
                body,
                patch,
                status,
                generation,
                condition="Committed",
                reason=reason,
                message=message,
            )
            return
        kind = (
            ebbtide_engine.CheckpointKind.APPLICATION_CONSISTENT
            if spec.get("kind") == "ApplicationConsistent"
            else ebbtide_engine.CheckpointKind.TAGGED
        )
        created = _state.parse_time(meta.get("creationTimestamp"))
        # A restart between the commit and the status write must not cut a second one.
        checkpoint = next(
            (
                c
                for c in reversed(protection.runtime.list_checkpoints())
                if c.tag == tag and c.kind == kind and created is not None and c.time >= created
            ),
            None,
        )
        if checkpoint is None:
            try:
                checkpoint = await protection.runtime.checkpoint(kind, tag)
            except ebbtide_engine.EbbtideError as exc:
                _state.fail(
                    body,
                    patch,
                    status,
                    generation,
                    condition="Committed",
                    reason=type(exc).__name__,
                    message=f"VPG {vpg!r}: {exc}",
                )
                return
        message = f"checkpoint {checkpoint.id} of VPG {vpg!r} is durable"
        if kind == ebbtide_engine.CheckpointKind.APPLICATION_CONSISTENT:
            message += " (guest quiescing is not implemented yet: the cut is crash-consistent)"
        _state.write_status(
            patch,
            status,
            generation,
            phase="Committed",
            message=message,
            conditions=[_conditions.Condition("Committed", "True", "Durable", message)],
        )
        patch.status["checkpointId"] = checkpoint.id
        patch.status["time"] = _conditions.rfc3339(checkpoint.time)
        kopf.info(body, reason="Committed", message=message)
