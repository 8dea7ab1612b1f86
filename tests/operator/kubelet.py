"""A stand-in kubelet for the emulator: runs each Job's container command for real.

There is no kubelet (and no container runtime) here, so this watches Jobs
through the API like a controller would, and for each new one:

- checks that every ``persistentVolumeClaim`` volume names a PVC that exists
  (else the Job fails, as the pod would stay Pending);
- maps each volume to a host directory: a PVC to ``<root>/pvcs/<claim>`` (kept,
  so tests can read what the Job wrote), an emptyDir to a scratch directory;
- rewrites the command's mount paths to those directories, resolves ``env``
  (``value`` or ``valueFrom.secretKeyRef`` read from the Secret through the
  API, base64-decoded) and starts the command in a subprocess with only that
  environment (no AWS_* of the test process: the credentials must come from
  the Secret); the ``ebbtide`` executable is the venv's;
- patches the Job's status: ``succeeded: 1`` and a ``Complete`` condition, or
  ``failed: 1`` and a ``Failed`` condition carrying the end of stderr.

One run per Job and no retries: ``backoffLimit`` is not emulated.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import pathlib
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.k8s import apiserver as emulation

EXECUTABLES = {"ebbtide": str(pathlib.Path(sys.executable).with_name("ebbtide"))}


@dataclasses.dataclass
class Run:
    job: str
    command: list[str]
    env: dict[str, str]
    returncode: int
    stdout: str
    stderr: str


class Kubelet:
    """Watches Jobs in ``namespace`` and runs them (see the module docstring)."""

    def __init__(self, server: emulation.RunningApiServer, root: pathlib.Path) -> None:
        self.server = server
        self.root = root
        self.runs: list[Run] = []
        self._seen: set[str] = set()
        self._session: aiohttp.ClientSession | None = None

    @staticmethod
    def executable(name: str) -> str:
        return EXECUTABLES.get(name, name)

    def claim_dir(self, claim: str) -> pathlib.Path:
        return self.root / "pvcs" / claim

    async def _request(self, method: str, path: str, body: Any = None) -> Any:
        assert self._session is not None
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self._session.request(
            method, self.server.url + path, json=body, headers=headers
        ) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def _loop(self, namespace: str) -> None:
        while True:
            jobs = await self._request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs")
            for job in (jobs or {}).get("items", []):
                uid = job["metadata"].get("uid") or job["metadata"]["name"]
                if uid not in self._seen and not job.get("status", {}).get("succeeded"):
                    self._seen.add(uid)
                    await self._run(namespace, job)
            await asyncio.sleep(0.1)

    async def _run(self, namespace: str, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        pod = job["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        paths: dict[str, pathlib.Path] = {}
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                found = await self._request(
                    "GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}"
                )
                if found is None:
                    await self._finish(namespace, name, ok=False, why=f"PVC {claim!r} not found")
                    return
                paths[volume["name"]] = self.claim_dir(claim)
            else:
                paths[volume["name"]] = self.root / "emptydirs" / name / volume["name"]
        mounts = {m["mountPath"]: paths[m["name"]] for m in container.get("volumeMounts", [])}
        for path in mounts.values():
            path.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "LC_ALL": "C",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for item in container.get("env", []):
            value = await self._env_value(namespace, item)
            if value is None:  # a real kubelet: CreateContainerConfigError, then the Job fails
                why = f"secret {item['valueFrom']['secretKeyRef']['name']!r} not found"
                await self._finish(namespace, name, ok=False, why=why)
                return
            env[item["name"]] = value
        command = [
            _rewrite(arg, mounts) for arg in container["command"] + container.get("args", [])
        ]
        command[0] = EXECUTABLES.get(command[0], command[0])
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(120):
            stdout, stderr = await process.communicate()
        assert process.returncode is not None
        self.runs.append(
            Run(name, command, env, process.returncode, stdout.decode(), stderr.decode())
        )
        ok = process.returncode == 0
        tail = (stderr.decode() or stdout.decode()).strip().splitlines()[-1:] if not ok else []
        await self._finish(namespace, name, ok=ok, why=" ".join(tail) or "exit status 0")

    async def _env_value(self, namespace: str, item: dict[str, Any]) -> str | None:
        if "value" in item:
            return str(item["value"])
        ref = item["valueFrom"]["secretKeyRef"]
        secret = await self._request("GET", f"/api/v1/namespaces/{namespace}/secrets/{ref['name']}")
        if secret is None:
            return None
        return base64.b64decode(secret["data"][ref["key"]]).decode()

    async def _finish(self, namespace: str, name: str, *, ok: bool, why: str) -> None:
        condition = (
            {"type": "Complete", "status": "True"}
            if ok
            else {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": why,
            }
        )
        status = {"succeeded": 1} if ok else {"failed": 1}
        await self._request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
            {"status": {**status, "conditions": [condition]}},
        )

    @contextlib.asynccontextmanager
    async def running(self, namespace: str = "default") -> AsyncIterator[Kubelet]:
        async with aiohttp.ClientSession() as session:
            self._session = session
            task = asyncio.create_task(self._loop(namespace))
            try:
                yield self
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                self._session = None


def _rewrite(arg: str, mounts: dict[str, pathlib.Path]) -> str:
    """Replace a mount path (as a whole path prefix) inside ``arg`` by its host directory."""
    for mount in sorted(mounts, key=len, reverse=True):
        for sep in ("=", ""):
            head, found, tail = arg.partition(sep + mount) if sep else ("", "", "")
            if found and (not tail or tail.startswith("/")):
                return f"{head}{sep}{mounts[mount]}{tail}"
        if arg == mount or arg.startswith(mount + "/"):
            return str(mounts[mount]) + arg[len(mount) :]
    return arg
