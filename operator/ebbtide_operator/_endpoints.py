"""The NBD endpoint of every protected VPG, served by the operator (the ``EndpointHook``).

:class:`Endpoints` attaches one ``ebbtide_engine.Endpoint`` to each VPG
runtime the operator opens (``Endpoint.attach``: the operator keeps owning
the runtime), each on its own TCP port taken from ``--endpoint-ports``, bound
to ``--endpoint-address``; the URLs in status name ``--endpoint-advertise``
instead, so that a pod bound to 0.0.0.0 publishes its Service or node name.

What it keeps in ``--state-dir``, per VPG (``<state-dir>/<namespace>/<vpg>/``):
the endpoint's own files (``.lock``, ``<vm>/<disk>.dirty`` maps, mirror
replicas; see ``ebbtide_engine.Endpoint``) and ``nbd-port``, the port last
served (decimal text), so a restarted operator serves each VPG on the port
its clients already know when that port is still free.

A VPG that cannot be served (no free port left in the range, a Proxy disk's
``source.path`` missing, a state directory that cannot be written) raises
:class:`EndpointProblem` with a reason and what to fix; the VPG handlers turn
it into the ``EndpointReady`` condition and an event, and retry later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import pathlib
import socket
import urllib.parse

import ebbtide_engine
from ebbtide_operator import _state

logger = logging.getLogger("ebbtide.operator")

Key = tuple[str, str]  # (namespace, name)

PORT_FILE = "nbd-port"


class EndpointProblem(Exception):
    """A VPG's endpoint cannot start: ``reason`` (CamelCase) and what to fix."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_port_range(text: str) -> tuple[int, int]:
    """``"10809-10872"`` (or one port, ``"10809"``) → ``(10809, 10872)``; ValueError if bad."""
    first, _, last = text.strip().partition("-")
    try:
        low, high = int(first), int(last or first)
    except ValueError:
        raise ValueError(f"{text!r} is not a port range like 10809-10872") from None
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port range within 1-65535 (low-high)")
    return low, high


@dataclasses.dataclass(slots=True)
class _Served:
    endpoint: ebbtide_engine.Endpoint
    port: int


class Endpoints:
    """One NBD server per VPG on a port of a fixed range (implements ``EndpointHook``)."""

    def __init__(
        self,
        *,
        address: str,
        ports: tuple[int, int],
        state_dir: str | os.PathLike[str],
        advertise: str | None = None,
        options: ebbtide_engine.EndpointOptions | None = None,
    ) -> None:
        self.address = address
        self.advertise = advertise or address
        self.ports = ports
        self.state_dir = pathlib.Path(state_dir)
        self._options = options or ebbtide_engine.EndpointOptions()
        self._served: dict[Key, _Served] = {}

    @classmethod
    def from_config(cls, config: _state.OperatorConfig) -> Endpoints:
        """Endpoints on ``endpoint_address``/``endpoint_ports``, state in ``state_dir``."""
        return cls(
            address=config.endpoint_address,
            advertise=config.endpoint_advertise,
            ports=config.endpoint_ports,
            state_dir=config.state_dir,
        )

    # --- EndpointHook -------------------------------------------------------------------

    async def attach(self, namespace: str, name: str, runtime: ebbtide_engine.VpgRuntime) -> None:
        """Serve the VPG's disks; raises :class:`EndpointProblem` if that cannot be done now."""
        key = (namespace, name)
        if key in self._served:
            await self.detach(namespace, name)
        _check_sources(runtime.spec)  # a spec problem is reported before a port problem
        directory = self.state_dir / namespace
        port = self._choose_port(directory / name / PORT_FILE)
        options = dataclasses.replace(self._options, host=self.address, port=port)
        try:
            endpoint = await ebbtide_engine.Endpoint.attach(runtime, directory, options=options)
        except ebbtide_engine.SpecError as exc:
            reason = "ProxySourceMissing" if "does not exist" in str(exc) else "ProxySourceUnusable"
            raise EndpointProblem(reason, str(exc)) from None
        except ebbtide_engine.FencedError as exc:
            raise EndpointProblem("StateDirInUse", str(exc)) from None
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise EndpointProblem(
                    "PortInUse",
                    f"port {port} of --endpoint-ports became busy while starting; will retry",
                ) from None
            raise EndpointProblem(
                "StateDirUnusable",
                f"cannot use the state directory {directory} ({exc.strerror or exc}); make it "
                "writable by the operator (--state-dir, a volume in the pod)",
            ) from None
        self._served[key] = _Served(endpoint, endpoint.port)
        with contextlib.suppress(OSError):
            (directory / name / PORT_FILE).write_text(f"{endpoint.port}\n")
        logger.info("VPG %s/%s: NBD endpoint on %s:%d", namespace, name, self.address, port)

    async def detach(self, namespace: str, name: str) -> None:
        """Stop serving (a checkpoint covers every write served; the maps are written)."""
        served = self._served.pop((namespace, name), None)
        if served is not None:
            await served.endpoint.close()

    async def abort(self, namespace: str, name: str) -> None:
        """Stop at once as a crash would: maps left as they are (tests of restarts)."""
        served = self._served.pop((namespace, name), None)
        if served is not None:
            await served.endpoint.abort()

    def status(self, namespace: str, name: str) -> ebbtide_engine.EndpointStatus | None:
        """The endpoint's status, its URLs naming ``advertise``; None while not served."""
        served = self._served.get((namespace, name))
        if served is None:
            return None
        current = served.endpoint.status()
        disks = [
            dataclasses.replace(disk, url=self.url(disk.export, served.port))
            for disk in current.disks
        ]
        return dataclasses.replace(current, disks=disks)

    def url(self, export: str, port: int) -> str:
        """The NBD URL clients use for ``export`` (``<vpg>/<vm>/<disk>``) on ``port``."""
        host = f"[{self.advertise}]" if ":" in self.advertise else self.advertise
        return f"nbd://{host}:{port}/{urllib.parse.quote(export, safe='/')}"

    def port(self, namespace: str, name: str) -> int | None:
        served = self._served.get((namespace, name))
        return served.port if served is not None else None

    def endpoint(self, namespace: str, name: str) -> ebbtide_engine.Endpoint | None:
        """The running endpoint of a VPG (for tests and the recovery handlers)."""
        served = self._served.get((namespace, name))
        return served.endpoint if served is not None else None

    # --- ports --------------------------------------------------------------------------

    def _choose_port(self, remembered: pathlib.Path) -> int:
        """The port this VPG had last time if still free, else the lowest free one."""
        low, high = self.ports
        taken = {served.port for served in self._served.values()}
        candidates = list(range(low, high + 1))
        with contextlib.suppress(OSError, ValueError):
            previous = int(remembered.read_text().strip())
            if low <= previous <= high:
                candidates.remove(previous)
                candidates.insert(0, previous)
        for port in candidates:
            if port not in taken and self._bindable(port):
                return port
        raise EndpointProblem(
            "PortRangeExhausted",
            f"no free port left in --endpoint-ports {low}-{high} ({len(taken)} VPGs served by "
            "this operator, the rest busy); widen the range (and the Service's ports) or move "
            "VPGs to another operator",
        )

    def _bindable(self, port: int) -> bool:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.address, port))
            except OSError:
                return False
        return True


def _check_sources(spec: ebbtide_engine.VpgSpec) -> None:
    for vm in spec.vms:
        for disk in vm.disks:
            source = disk.source.path if disk.mode == "Proxy" and disk.source else None
            if source is not None and not os.path.exists(source):
                raise EndpointProblem(
                    "ProxySourceMissing",
                    f"disk {vm.name}/{disk.name}: source.path {source} does not "
                    "exist; create it (a file or block device of at least the disk's size) "
                    "or fix the VPG spec",
                )
