"""Prometheus metrics of the VPGs and recoveries this operator runs, and their HTTP server.

A collector reads the controller's runtimes at scrape time (no gauges to
keep in step); it registers in a :class:`prometheus_client.CollectorRegistry`
the caller makes, never in the global one, so tests stay isolated. Names:

- ``ebbtide_vpg_rpo_seconds`` — now minus the newest durable checkpoint's time
- ``ebbtide_vpg_last_checkpoint_age_seconds`` — the same age, kept apart from
  the RPO so that an SLA-based RPO can replace the first without renaming
- ``ebbtide_vpg_journal_bytes`` — journal segment bytes in the bucket
- ``ebbtide_vpg_unshipped_bytes`` — written, not yet uploaded
- ``ebbtide_vpg_upload_retries_total`` — storage retries (uploads, index appends)
- ``ebbtide_vpg_shipping_lag_bytes`` — accepted by the NBD endpoint, not yet in
  the bucket (unshipped, including what spilled to local disk)
- ``ebbtide_vpg_written_bytes_total`` — bytes clients wrote through the endpoint
  (restarts at 0 when the endpoint reattaches; Prometheus' ``rate()`` copes)
- ``ebbtide_vpg_write_rate_bytes_per_second`` — the same, as a rate over the
  time since the previous scrape (0 on the first)
- ``ebbtide_vpg_endpoint_connections`` — NBD clients connected
- ``ebbtide_disk_sync_ratio`` — 0..1 per disk (labels ``vm``, ``disk``,
  ``state``): progress of an initial sync or resync, 1 when Protecting
- ``ebbtide_recovery_progress_ratio`` — 0..1 per running Recovery

VPG series carry ``namespace`` and ``vpg`` labels; recovery series
``namespace``, ``recovery`` and ``vpg``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Iterable

import prometheus_client
import prometheus_client.core
import prometheus_client.registry
from aiohttp import web

from ebbtide_operator import _controller


class Collector(prometheus_client.registry.Collector):
    def __init__(self, controller: _controller.Controller) -> None:
        self._controller = controller
        #: Per VPG: (monotonic time, bytes written) at the previous scrape, for the write rate.
        self._written: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()  # scrapes may come from several threads

    def collect(self) -> Iterable[prometheus_client.core.Metric]:
        labels = ["namespace", "vpg"]
        family = prometheus_client.core.GaugeMetricFamily
        rpo = family(
            "ebbtide_vpg_rpo_seconds", "Seconds of writes a disaster now would lose", labels=labels
        )
        age = family(
            "ebbtide_vpg_last_checkpoint_age_seconds",
            "Age of the newest durable checkpoint",
            labels=labels,
        )
        journal = family("ebbtide_vpg_journal_bytes", "Journal bytes in the bucket", labels=labels)
        unshipped = family(
            "ebbtide_vpg_unshipped_bytes", "Written bytes not yet uploaded", labels=labels
        )
        retries = prometheus_client.core.CounterMetricFamily(
            "ebbtide_vpg_upload_retries", "Storage operations retried", labels=labels
        )
        lag = family(
            "ebbtide_vpg_shipping_lag_bytes",
            "Bytes the endpoint accepted that are not in the bucket yet",
            labels=labels,
        )
        written = prometheus_client.core.CounterMetricFamily(
            "ebbtide_vpg_written_bytes", "Bytes written through the NBD endpoint", labels=labels
        )
        rate = family(
            "ebbtide_vpg_write_rate_bytes_per_second",
            "Bytes written through the NBD endpoint per second since the previous scrape",
            labels=labels,
        )
        connections = family(
            "ebbtide_vpg_endpoint_connections", "NBD clients connected", labels=labels
        )
        sync = family(
            "ebbtide_disk_sync_ratio",
            "Share of an initial sync or resync done (1 when Protecting)",
            labels=[*labels, "vm", "disk", "state"],
        )
        now = time.monotonic()
        for protection in self._controller.protections():
            status = protection.runtime.status()
            values = [protection.namespace, protection.name]
            if status.rpo_seconds is not None:
                rpo.add_metric(values, status.rpo_seconds)
                age.add_metric(values, status.rpo_seconds)
            journal.add_metric(values, sum(status.journal_bytes.values()))
            unshipped.add_metric(values, status.unshipped_bytes)
            retries.add_metric(values, status.upload_retries)
            served = self._controller.endpoint_status(protection.namespace, protection.name)
            if served is None:
                continue
            lag.add_metric(values, served.unshipped_bytes)
            total = sum(d.bytes_written for d in served.disks)
            written.add_metric(values, total)
            rate.add_metric(values, self._rate((protection.namespace, protection.name), now, total))
            connections.add_metric(values, served.connections)
            for disk in served.disks:
                ratio = disk.done_bytes / disk.total_bytes if disk.total_bytes else 1.0
                sync.add_metric([*values, disk.vm, disk.disk, str(disk.state)], ratio)
        progress = family(
            "ebbtide_recovery_progress_ratio",
            "Share of a Recovery's bytes done",
            labels=["namespace", "recovery", "vpg"],
        )
        for job in self._controller.recoveries():
            progress.add_metric([job.namespace, job.name, job.vpg], job.ratio)
        return [
            rpo,
            age,
            journal,
            unshipped,
            retries,
            lag,
            written,
            rate,
            connections,
            sync,
            progress,
        ]

    def _rate(self, key: tuple[str, str], now: float, total: int) -> float:
        with self._lock:
            previous = self._written.get(key)
            self._written[key] = (now, total)
        if previous is None or total < previous[1] or now <= previous[0]:
            return 0.0  # first scrape, or the endpoint reattached (its counter restarted)
        return (total - previous[1]) / (now - previous[0])


def registry_for(controller: _controller.Controller) -> prometheus_client.CollectorRegistry:
    """A new registry holding the controller's collector (and nothing global)."""
    registry = prometheus_client.CollectorRegistry()
    registry.register(Collector(controller))
    return registry


@contextlib.asynccontextmanager
async def serve(
    registry: prometheus_client.CollectorRegistry, *, host: str = "0.0.0.0", port: int = 9090
) -> AsyncIterator[str]:
    """Serve ``/metrics`` on ``host:port`` (port 0: a free one); yields the URL."""

    async def metrics(_request: web.Request) -> web.Response:
        body = prometheus_client.generate_latest(registry)
        return web.Response(
            body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST}
        )

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    try:
        bound = runner.addresses[0][1] if runner.addresses else port
        yield f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{bound}/metrics"
    finally:
        await runner.cleanup()
