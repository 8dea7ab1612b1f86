"""A Recovery to PersistentVolumeClaims: one PVC per disk, filled by a restore Job.

The operator creates, through the Kubernetes API (Kopf's authenticated
client, so the same login as the handlers):

- one PVC per recovered disk, ``<recovery>-<vm>-<disk>``, ``volumeMode:
  Filesystem``, holding the raw image as ``disk.img`` at its root (the layout
  KubeVirt and CDI use for a filesystem PVC); it requests the disk's size
  plus 6 % and 64 MiB for the filesystem's own overhead;
- one Job, ``<recovery>-restore``, running ``ebbtide recover ... --disk-file
  VM/DISK=/volumes/<n>/disk.img`` with the image of ``--job-image``. It
  recovers into an ``emptyDir`` first (sized to the disks), then moves each
  image onto its volume; the storage account's credentials come only through
  ``env.valueFrom.secretKeyRef`` of the account's own Secret.

Both carry an ownerReference to the Recovery, so deleting it lets the
garbage collector remove them; a Restore that succeeded or a committed
Failover/Move drops the reference from the PVCs, which then outlive the
Recovery. Nothing here holds state: a restarted operator finds the PVCs and the
Job by name (409 on create) and watches the Job again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
from kopf._cogs.clients import api as kube  # Kopf's authenticated client (pinned Kopf)
from kopf._cogs.clients import errors as kube_errors

import ebbtide_engine

MOUNT_ROOT = "/volumes"
STAGING = "/staging"
IMAGE = "disk.img"
LABEL = "ebbtide.io/recovery"
_SETTINGS = kopf.OperatorSettings()


@dataclasses.dataclass(frozen=True, slots=True)
class Disk:
    vm: str
    disk: str
    size: int
    claim: str

    @property
    def mount(self) -> str:
        return f"{MOUNT_ROOT}/{self.vm}-{self.disk}"


def claim_name(recovery: str, vm: str, disk: str) -> str:
    """``<recovery>-<vm>-<disk>``, shortened with a hash suffix past 253 characters."""
    name = f"{recovery}-{vm}-{disk}"
    if len(name) <= 253:
        return name
    return f"{name[:240]}-{abs(hash(name)) % 10**8:08d}"


def job_name(recovery: str) -> str:
    base = re.sub(r"[^a-z0-9-]", "-", recovery)[:54].rstrip("-")
    return f"{base}-restore"


def disks_of(recovery: str, vpg_spec: Mapping[str, Any], vms: Sequence[str]) -> list[Disk]:
    """The disks to recover, sizes from the VPG spec; raises InvalidRequest for unknown VMs."""
    by_vm = {str(vm.get("name")): vm for vm in vpg_spec.get("vms") or ()}
    unknown = [vm for vm in vms if vm not in by_vm]
    if unknown:
        raise ebbtide_engine.InvalidRequest(
            f"the VPG has no VM {', '.join(map(repr, unknown))}; it has: {', '.join(sorted(by_vm))}"
        )
    chosen = list(vms) or sorted(by_vm)
    return [
        Disk(
            vm,
            str(disk["name"]),
            int(ebbtide_engine.parse_quantity(disk["size"])),
            claim_name(recovery, vm, str(disk["name"])),
        )
        for vm in chosen
        for disk in by_vm[vm].get("disks") or ()
    ]


def request_bytes(size: int) -> int:
    """What a filesystem PVC asks for to hold a raw image of ``size`` bytes (MiB-rounded)."""
    mib = 1 << 20
    return math.ceil((size * 1.06 + 64 * mib) / mib) * mib


def owner(body: Mapping[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {
        "apiVersion": body.get("apiVersion", "ebbtide.io/v1alpha1"),
        "kind": "Recovery",
        "name": meta["name"],
        "uid": meta.get("uid", ""),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def claim_manifest(
    disk: Disk, recovery_body: Mapping[str, Any], storage_class: str | None
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": str(request_bytes(disk.size))}},
    }
    if storage_class:
        spec["storageClassName"] = storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": disk.claim,
            "labels": {LABEL: recovery_body["metadata"]["name"]},
            "annotations": {"ebbtide.io/disk": f"{disk.vm}/{disk.disk}", "ebbtide.io/image": IMAGE},
            "ownerReferences": [owner(recovery_body)],
        },
        "spec": spec,
    }


def job_manifest(
    *,
    recovery_body: Mapping[str, Any],
    image: str,
    storage_url: str,
    credentials: Mapping[str, Any] | None,
    vpg: str,
    checkpoint_id: int,
    disks: Sequence[Disk],
) -> dict[str, Any]:
    """The restore Job: ``ebbtide recover`` into an emptyDir, then each image onto its PVC."""
    name = recovery_body["metadata"]["name"]
    command = [
        "ebbtide",
        "recover",
        "--storage",
        storage_url,
        "--vpg",
        vpg,
        "--checkpoint",
        f"id:{checkpoint_id}",
        "--out",
        STAGING,
    ]
    for vm in sorted({d.vm for d in disks}):
        command += ["--vm", vm]
    for disk in disks:
        command += ["--disk-file", f"{disk.vm}/{disk.disk}={disk.mount}/{IMAGE}"]
    env: list[dict[str, Any]] = []
    if credentials is not None:
        secret = str(credentials.get("name", ""))
        for variable, key_field in (
            ("AWS_ACCESS_KEY_ID", "accessKeyIdKey"),
            ("AWS_SECRET_ACCESS_KEY", "secretAccessKeyKey"),
        ):
            key = str(credentials.get(key_field) or variable)
            env.append(
                {"name": variable, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
            )
    mounts = [{"name": "staging", "mountPath": STAGING}, {"name": "tmp", "mountPath": "/tmp"}]
    volumes: list[dict[str, Any]] = [
        {"name": "staging", "emptyDir": {"sizeLimit": str(sum(d.size for d in disks) + (1 << 20))}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
    ]
    for index, disk in enumerate(disks):
        mounts.append({"name": f"disk-{index}", "mountPath": disk.mount})
        volumes.append(
            {"name": f"disk-{index}", "persistentVolumeClaim": {"claimName": disk.claim}}
        )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(name),
            "labels": {LABEL: name},
            "ownerReferences": [owner(recovery_body)],
        },
        "spec": {
            "backoffLimit": 2,
            "template": {
                "metadata": {"labels": {LABEL: name}},
                "spec": {
                    "restartPolicy": "Never",
                    # The image's user (the Dockerfile's 10001); fsGroup makes fresh PVCs writable.
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "fsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "recover",
                            "image": image,
                            "command": command,
                            "env": env,
                            "volumeMounts": mounts,
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                        }
                    ],
                    "volumes": volumes,
                },
            },
        },
    }


class Api:
    """The few API calls of a restore, through Kopf's client (inside Kopf's tasks only)."""

    def __init__(self, namespace: str, logger: logging.Logger | logging.LoggerAdapter[Any]):
        self.namespace = namespace
        self.logger = logger

    def _url(self, plural: str, name: str | None = None) -> str:
        group = "/apis/batch/v1" if plural == "jobs" else "/api/v1"
        url = f"{group}/namespaces/{self.namespace}/{plural}"
        return f"{url}/{name}" if name else url

    async def create(self, plural: str, body: Mapping[str, Any]) -> bool:
        """Create; False if it already exists (a restarted operator finds its own)."""
        try:
            await kube.post(self._url(plural), payload=body, settings=_SETTINGS, logger=self.logger)
        except kube_errors.APIConflictError:
            return False
        return True

    async def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            found = await kube.get(self._url(plural, name), settings=_SETTINGS, logger=self.logger)
        except kube_errors.APINotFoundError:
            return None
        return dict(found)

    async def delete(self, plural: str, name: str) -> bool:
        try:
            await kube.delete(
                self._url(plural, name),
                payload={"propagationPolicy": "Background"},
                settings=_SETTINGS,
                logger=self.logger,
            )
        except kube_errors.APINotFoundError:
            return False
        return True

    async def disown(self, name: str) -> None:
        """Let a PVC outlive its Recovery (a Restore that succeeded, a commit)."""
        with contextlib.suppress(kube_errors.APINotFoundError):
            await kube.patch(
                self._url("persistentvolumeclaims", name),
                payload={"metadata": {"ownerReferences": None}},
                headers={"Content-Type": "application/merge-patch+json"},
                settings=_SETTINGS,
                logger=self.logger,
            )


class JobFailed(Exception):
    """The restore Job gave up (its pods failed ``backoffLimit + 1`` times)."""


async def wait_for_job(api: Api, name: str, *, tick: float) -> float:
    """Poll the Job until it succeeds (returns the seconds waited) or fails (JobFailed)."""
    started = time.monotonic()
    while True:
        job = await api.get("jobs", name)
        if job is None:
            raise JobFailed(f"Job {name!r} was deleted before it finished")
        status = job.get("status") or {}
        for condition in status.get("conditions") or ():
            if condition.get("type") == "Failed" and condition.get("status") == "True":
                why = condition.get("message") or condition.get("reason") or "failed"
                raise JobFailed(
                    f"restore Job {name!r} failed: {why}; see `kubectl logs job/{name}`"
                )
        if int(status.get("succeeded") or 0) >= 1:
            return time.monotonic() - started
        await asyncio.sleep(tick)
