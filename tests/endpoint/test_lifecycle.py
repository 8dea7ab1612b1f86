"""Who owns what: an endpoint attached to a runtime it did not open, and the state-dir lock."""

from __future__ import annotations

import pathlib

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _endpoint

from ._support import EndpointEnv, MiB, mirror_disk, run, runtime_options, vpg_spec


async def test_attached_endpoint_leaves_the_runtime_open(env: EndpointEnv) -> None:
    spec = vpg_spec("owned", {"vm": [mirror_disk("root", MiB)]})
    runtime = await ebbtide.VpgRuntime.open(spec, env.store, options=runtime_options())
    try:
        endpoint = await _endpoint.Endpoint.attach(runtime, env.state_dir)
        await run("qemu-io", "-f", "raw", "-c", "write -P 5 0 4k", endpoint.url("vm", "root"))
        await endpoint.close()
        # The close took a checkpoint covering what was served, and cleared the map.
        image = _endpoint.read_dirty_map(env.state_dir / "owned" / "vm" / "root.dirty")
        assert image is not None
        assert not image.bits.any()
        assert image.full  # no mirror pass has covered the disk yet: that is still owed
        assert runtime.status().state == "protecting"
        await runtime.write("vm", "root", 4096, b"\x06" * 512)  # still the owner's to use
        checkpoint = await runtime.checkpoint()
    finally:
        await runtime.close()
    disk = (await env.recover("owned", checkpoint.id))[("vm", "root")]
    assert disk[:4096] == b"\x05" * 4096
    assert disk[4096:4608] == b"\x06" * 512


async def test_two_endpoints_cannot_share_a_state_directory(
    env: EndpointEnv, tmp_path: pathlib.Path
) -> None:
    spec = vpg_spec("shared", {"vm": [mirror_disk("root", MiB)]})
    await env.open(spec)
    other = EndpointEnv(tmp_path / "other", (tmp_path / "other-account").as_uri())
    (tmp_path / "other-account").mkdir()
    other.state_dir = env.state_dir
    try:
        with pytest.raises(ebbtide.FencedError, match="is in use by another endpoint"):
            await other.open(spec)
    finally:
        await other.aclose()
