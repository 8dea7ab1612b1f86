"""`python -m ebbtide_operator`: protects, serves metrics and liveness, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import pathlib
import signal
import sys

import aiohttp

from tests import s3server
from tests.k8s.waiting import wait_for

from .conftest import Cluster, account, needs_kubectl, vpg


@needs_kubectl
async def test_the_entry_point_protects_serves_metrics_and_stops_cleanly(
    cluster: Cluster, kubeconfig: pathlib.Path, account_dir: pathlib.Path
) -> None:
    metrics_port, liveness_port = s3server.free_port(), s3server.free_port()
    nbd_port = s3server.free_port()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "POD_NAME": "entry-0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ebbtide_operator",
        "--namespace",
        "default",
        "--metrics-port",
        str(metrics_port),
        "--liveness",
        f"http://127.0.0.1:{liveness_port}/healthz",
        "--state-dir",
        str(account_dir.parent / "state"),
        "--endpoint-ports",
        f"{nbd_port}-{nbd_port + 3}",
        "--endpoint-advertise",
        "ebbtide.example",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await cluster.apply(account("local", account_dir.as_uri()), vpg("shop", "local"))
        # Its Mirror disks wait for a first full pass: Syncing, with URLs to write them.
        status = await cluster.wait_status(
            "VirtualProtectionGroup",
            "shop",
            lambda s: s.get("phase") == "Syncing" and "lastCheckpoint" in s,
            timeout=30,
        )
        url = status["vms"][0]["disks"][0]["url"]
        assert url.startswith("nbd://ebbtide.example:"), url
        assert nbd_port <= int(url.split(":")[2].split("/")[0]) <= nbd_port + 3
        ready = await cluster.condition("VirtualProtectionGroup", "shop", "Ready")
        assert "writer operator/entry-0/default/shop" in ready["message"]

        async def fetch(url: str) -> tuple[int, str]:
            try:
                async with aiohttp.ClientSession() as http, http.get(url) as response:
                    return response.status, await response.text()
            except aiohttp.ClientError:
                return 0, ""

        metrics = await wait_for(
            lambda: fetch(f"http://127.0.0.1:{metrics_port}/metrics"), what="metrics"
        )
        assert 'ebbtide_vpg_rpo_seconds{namespace="default",vpg="shop"}' in metrics[1]
        health = await fetch(f"http://127.0.0.1:{liveness_port}/healthz")
        assert health[0] == 200
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err.decode()[-2000:]
    manifest = (account_dir / "vpgs" / "shop" / "manifest.json").read_text()
    assert '"writer": null' in manifest  # closed cleanly: the lease was released
