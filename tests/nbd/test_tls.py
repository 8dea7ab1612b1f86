"""TLS (NBD_OPT_STARTTLS): qemu and libnbd clients with x509, plain clients refused."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import ssl

import pytest

from ebbtide_engine import _nbd

pytest.importorskip("cryptography", reason="the TLS tests make certificates with cryptography")

from . import _certs, _raw  # _certs needs cryptography
from ._support import MiB, NbdEnv, RecordingBackend, run

NAME = "vpg/vm/disk"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return _certs.make_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def client_pki(pki: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """What a client gets: the CA certificate only."""
    directory = tmp_path_factory.mktemp("client-pki")
    shutil.copy(pki / "ca-cert.pem", directory / "ca-cert.pem")
    return directory


@pytest.fixture
def disk(env: NbdEnv) -> RecordingBackend:
    return env.disk(8 * MiB)


@pytest.fixture
async def server(env: NbdEnv, pki: pathlib.Path, disk: RecordingBackend) -> _nbd.NbdServer:
    return await env.serve({NAME: disk}, tls=_certs.server_context(pki), tls_required=True)


def qemu_tls_args(server: _nbd.NbdServer, client_pki: pathlib.Path) -> list[str]:
    """qemu's TLS form: a tls-creds-x509 object plus --image-opts naming it."""
    return [
        "--object",
        f"tls-creds-x509,id=tls0,endpoint=client,dir={client_pki}",
        "--image-opts",
        f"driver=nbd,host=127.0.0.1,port={server.port},export={NAME},tls-creds=tls0",
    ]


async def test_qemu_io_over_tls(
    server: _nbd.NbdServer, client_pki: pathlib.Path, disk: RecordingBackend
) -> None:
    await run(
        "qemu-io",
        "-c",
        "write -P 0x61 4096 64k",
        "-c",
        "read -P 0x61 4096 64k",
        *qemu_tls_args(server, client_pki),
    )
    assert disk.path.read_bytes()[4096 : 4096 + 65536] == b"a" * 65536
    assert disk.disconnects == 1


async def test_qemu_img_convert_over_tls(
    server: _nbd.NbdServer, client_pki: pathlib.Path, disk: RecordingBackend, tmp_path: pathlib.Path
) -> None:
    """Megabytes through the TLS layer: flow control on the upgraded stream works."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(8 * MiB))
    tls = qemu_tls_args(server, client_pki)
    await run(
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        str(source),
        *tls[:2],
        "--target-image-opts",
        tls[3],
    )
    assert disk.path.read_bytes() == source.read_bytes()


async def test_nbdinfo_over_tls(server: _nbd.NbdServer, client_pki: pathlib.Path) -> None:
    url = f"{server.url(NAME, tls=True)}?tls-certificates={client_pki}"
    info = json.loads((await run("nbdinfo", "--json", url)).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 8 * MiB


async def test_plain_clients_are_refused_when_tls_is_required(
    server: _nbd.NbdServer, disk: RecordingBackend
) -> None:
    refused = await run("nbdinfo", server.url(NAME), check=False)
    # libnbd 1.14 reports NBD_REP_ERR_TLS_REQD as "Operation not supported".
    assert refused.returncode != 0
    assert "opt_go" in refused.stderr, refused.describe()
    refused = await run("qemu-io", "-f", "raw", "-c", "read 0 4k", server.url(NAME), check=False)
    assert refused.returncode != 0
    assert "TLS" in refused.stderr, refused.describe()
    assert disk.calls == []


async def test_raw_forced_tls(server: _nbd.NbdServer, pki: pathlib.Path) -> None:
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    for opt, data in [
        (_raw.OPT_LIST, b""),
        (_raw.OPT_STRUCTURED_REPLY, b""),
        (_raw.OPT_GO, _raw.export_request(NAME)),
        (_raw.OPT_INFO, _raw.export_request("no/such/disk")),
        (0xABCD, b"unknown"),
    ]:
        assert [kind for kind, _ in await client.option(opt, data)] == [_raw.REP_ERR_TLS_REQD]
    await client.starttls(_certs.client_context(pki))
    assert [kind for kind, _ in await client.option(_raw.OPT_STARTTLS)] == [_raw.REP_ERR_INVALID]
    export = await client.go(NAME)
    assert export.size == 8 * MiB
    assert await client.write(0, b"secret") == 0
    assert await client.read(0, 6) == b"secret"
    await client.disconnect()


async def test_export_name_before_tls_closes(server: _nbd.NbdServer) -> None:
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    await client.send(_raw.option(_raw.OPT_EXPORT_NAME, NAME.encode()))
    assert await client.wait_closed_by_server() == b""
    await client.close()


async def test_plaintext_after_starttls_is_not_accepted(
    server: _nbd.NbdServer, pki: pathlib.Path
) -> None:
    """Bytes sent with STARTTLS (before the ACK) must never be read as if under TLS."""
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    await client.send(_raw.option(_raw.OPT_STARTTLS) + _raw.option(_raw.OPT_LIST))
    assert await client.wait_closed_by_server() == b""
    await client.close()
    # A failed TLS handshake (garbage instead of a ClientHello) only ends that connection.
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    assert (await client.option(_raw.OPT_STARTTLS))[-1][0] == _raw.REP_ACK
    await client.send(b"this is not a TLS record" * 10)
    await client.wait_closed_by_server()
    await client.close()
    # ...and the server is fine.
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    await client.starttls(_certs.client_context(pki))
    assert (await client.go(NAME)).size == 8 * MiB
    await client.disconnect()


async def test_optional_tls_serves_both(
    env: NbdEnv, pki: pathlib.Path, client_pki: pathlib.Path
) -> None:
    server = await env.serve({NAME: env.disk(MiB)}, tls=_certs.server_context(pki))
    plain = json.loads((await run("nbdinfo", "--json", server.url(NAME))).stdout)
    assert plain["TLS"] is False
    url = f"{server.url(NAME, tls=True)}?tls-certificates={client_pki}"
    secure = json.loads((await run("nbdinfo", "--json", url)).stdout)
    assert secure["TLS"] is True


async def test_tls_client_rejects_an_unknown_ca(
    server: _nbd.NbdServer, tmp_path: pathlib.Path
) -> None:
    other = _certs.make_certificates(tmp_path / "other")
    client = await _raw.RawClient.connect(server.port)
    await client.client_flags()
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.starttls(_certs.client_context(other))
    client.writer.transport.abort()
