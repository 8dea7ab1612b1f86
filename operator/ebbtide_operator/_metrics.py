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
- ``ebbtide_recovery_progress_ratio`` — 0..1 per running Recovery

VPG series carry ``namespace`` and ``vpg`` labels; recovery series
``namespace``, ``recovery`` and ``vpg``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable

import prometheus_client
import prometheus_client.core
import prometheus_client.registry
from aiohttp import web

from ebbtide_operator import _controller


class Collector(prometheus_client.registry.Collector):
    def __init__(self, controller: _controller.Controller) -> None:
        self._controller = controller

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
        for protection in self._controller.protections():
            status = protection.runtime.status()
            values = [protection.namespace, protection.name]
            if status.rpo_seconds is not None:
                rpo.add_metric(values, status.rpo_seconds)
                age.add_metric(values, status.rpo_seconds)
            journal.add_metric(values, sum(status.journal_bytes.values()))
            unshipped.add_metric(values, status.unshipped_bytes)
            retries.add_metric(values, status.upload_retries)
        progress = family(
            "ebbtide_recovery_progress_ratio",
            "Share of a Recovery's bytes done",
            labels=["namespace", "recovery", "vpg"],
        )
        for job in self._controller.recoveries():
            progress.add_metric([job.namespace, job.name, job.vpg], job.ratio)
        return [rpo, age, journal, unshipped, retries, progress]


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
