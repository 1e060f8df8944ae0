"""Certificate rotation over real sockets and real TLS: the server takes renewed files without a
restart and without a failed call, and keeps serving its current certificate when new files are
unusable, saying so once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from service.api import credentials
from service.api.credentials import ReloadingCertificates, TlsFiles, load_material
from service.errors import ConfigError
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .conftest import serving, until
from .fakes import FakeEngine
from .pki import Pki, issue_server_cert, make_pki
from .test_grpc import BASE, request

WAIT_S = 20.0
LOGGER = credentials.__name__


@pytest.fixture(autouse=True)
def check_on_every_handshake(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every new connection makes the server look at the files: tests then wait on connections,
    not on the clock, and 'logged once' means once over many checks."""
    monkeypatch.setattr(credentials, "DEFAULT_CHECK_INTERVAL_S", 0.0)


class SecretMount:
    """A directory laid out as the kubelet mounts a Secret: `tls.crt` -> `..data/tls.crt`, and
    `..data` -> a versioned directory; an update writes a new version and swaps `..data` in one
    rename, so readers see the old set or the new one, never half of each."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root = root
        root.mkdir()
        self._version = 0
        self.update(files)
        for name in files:
            (root / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        self._version += 1
        version = self.root / f"..v{self._version}"
        version.mkdir()
        for name, data in files.items():
            (version / name).write_bytes(data)
        staged = self.root / "..data_tmp"
        staged.symlink_to(version.name)
        os.replace(staged, self.root / "..data")

    def path(self, name: str) -> str:
        return str(self.root / name)


def fingerprint_of(pem: Path) -> str:
    return credentials.certificate_fingerprint(pem.read_bytes())


def served_fingerprint(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> str:
    """The SHA-256 fingerprint of the certificate the server shows a NEW connection."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if client:
        context.load_cert_chain(str(client[0]), str(client[1]))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(der).digest())


def tls_channel(port: int, ca: Path, client: tuple[Path, Path] | None = None
                ) -> grpc.aio.Channel:
    """A channel with a connection of its own (no subchannel shared with other channels)."""
    credentials_ = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials_,
                                   options=[("grpc.use_local_subchannel_pool", 1)])


@dataclass
class Load:
    """Clients calling in a loop: one on a long-lived channel, one on a new channel (a new
    TLS handshake) for every call. Every failure is kept."""

    ok_fresh: int = 0
    ok_kept: int = 0
    failures: list[str] = field(default_factory=list)

    async def fresh_loop(self, port: int, ca: Path, stop: asyncio.Event) -> None:
        while not stop.is_set():
            async with tls_channel(port, ca) as channel:
                await self._call(channel, fresh=True)

    async def kept_loop(self, port: int, ca: Path, stop: asyncio.Event) -> None:
        async with tls_channel(port, ca) as channel:
            while not stop.is_set():
                await self._call(channel, fresh=False)

    async def _call(self, channel: grpc.aio.Channel, *, fresh: bool) -> None:
        try:
            reply = await pb_grpc.SummarizerStub(channel).Summarize(
                request("rotating certificates"), timeout=10)
            assert reply.results[0].summary == "S:rotating cer"
        except Exception as error:  # noqa: BLE001 - every failure is the test's business
            self.failures.append(repr(error))
            return
        if fresh:
            self.ok_fresh += 1
        else:
            self.ok_kept += 1

    async def more_calls(self, count: int = 5) -> None:
        """Wait until both clients have made `count` more successful calls."""
        fresh, kept = self.ok_fresh + count, self.ok_kept + count

        async def done() -> bool:
            return self.ok_fresh >= fresh and self.ok_kept >= kept
        await until(done, WAIT_S, f"{count} more successful calls", interval_s=0.02)


@contextlib.asynccontextmanager
async def under_load(port: int, ca: Path) -> AsyncIterator[Load]:
    load, stop = Load(), asyncio.Event()
    tasks = [asyncio.create_task(load.fresh_loop(port, ca, stop)),
             asyncio.create_task(load.kept_loop(port, ca, stop))]
    try:
        await load.more_calls()
        yield load
    finally:
        stop.set()
        await asyncio.gather(*tasks)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.ERROR]


async def test_a_renewed_certificate_is_served_to_new_connections_without_a_failed_call(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    pki = make_pki(tmp_path)
    cert_b, key_b = issue_server_cert(pki, tmp_path, "server-b")
    mount = SecretMount(tmp_path / "secret", {"tls.crt": pki.server_cert.read_bytes(),
                                              "tls.key": pki.server_key.read_bytes()})
    settings = BASE.replace(tls_cert=mount.path("tls.crt"), tls_key=mount.path("tls.key"))
    a, b = fingerprint_of(pki.server_cert), fingerprint_of(cert_b)
    async with serving(settings, lambda s: FakeEngine()) as (server, _):
        port = server.port
        assert await asyncio.to_thread(served_fingerprint, port, pki.ca_cert) == a
        async with under_load(port, pki.ca_cert) as load:
            mount.update({"tls.crt": cert_b.read_bytes(), "tls.key": key_b.read_bytes()})

            async def serves_b() -> bool:
                return await asyncio.to_thread(served_fingerprint, port, pki.ca_cert) == b
            await until(serves_b, WAIT_S, "the renewed certificate to be served", interval_s=0.02)
            await load.more_calls()
            assert any(r.levelno == logging.INFO and b in r.getMessage()
                       for r in caplog.records if r.name == LOGGER)

            # A broken renewal: garbage where the certificate should be.
            mount.update({"tls.crt": b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n",
                          "tls.key": key_b.read_bytes()})

            async def refused() -> bool:
                return bool(errors_logged(caplog))
            await until(refused, WAIT_S, "the broken certificate to be reported", interval_s=0.02)
            for _ in range(5):  # each a new connection, so each a new look at the files
                assert await asyncio.to_thread(served_fingerprint, port, pki.ca_cert) == b
            await load.more_calls()
        assert load.failures == []
    [error] = errors_logged(caplog)
    assert "tls.crt" in error and "not PEM certificates" in error and b in error


def replace_file(path: Path, data: bytes) -> None:
    """Rewrite `path` in one step (a new file renamed over it), as editors and tools do: a
    handshake never reads it half written."""
    staging = path.with_name(path.name + ".new")
    staging.write_bytes(data)
    os.replace(staging, path)


async def test_a_key_that_does_not_match_keeps_the_old_pair_and_is_reported_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Files replaced one after the other: the certificate first (it does not match the old key:
    refused, reported once), then its key (taken)."""
    pki = make_pki(tmp_path)
    cert_b, key_b = issue_server_cert(pki, tmp_path, "server-b")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(pki.server_cert.read_bytes())
    live_key.write_bytes(pki.server_key.read_bytes())
    settings = BASE.replace(tls_cert=str(live_cert), tls_key=str(live_key))
    a, b = fingerprint_of(pki.server_cert), fingerprint_of(cert_b)
    async with serving(settings, lambda s: FakeEngine()) as (server, _):
        port = server.port
        async with under_load(port, pki.ca_cert) as load:
            replace_file(live_cert, cert_b.read_bytes())

            async def refused() -> bool:
                return bool(errors_logged(caplog))
            await until(refused, WAIT_S, "the mismatched pair to be reported", interval_s=0.02)
            for _ in range(5):
                assert await asyncio.to_thread(served_fingerprint, port, pki.ca_cert) == a
            await load.more_calls()
            [error] = errors_logged(caplog)
            assert "does not match" in error and str(live_key) in error

            replace_file(live_key, key_b.read_bytes())

            async def serves_b() -> bool:
                return await asyncio.to_thread(served_fingerprint, port, pki.ca_cert) == b
            await until(serves_b, WAIT_S, "the completed pair to be served", interval_s=0.02)
            await load.more_calls()
        assert load.failures == []
    assert len(errors_logged(caplog)) == 1


async def test_a_rotated_client_ca_is_honoured_for_mutual_tls(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    pki = make_pki(tmp_path / "one")
    # A second CA: its client certificate is not trusted yet.
    other = make_pki(tmp_path / "two", "next CA")
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(pki.ca_cert.read_bytes())
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                            tls_client_ca=str(client_ca))
    trusted = (pki.client_cert, pki.client_key)
    newcomer = (other.client_cert, other.client_key)

    async def summarize(client: tuple[Path, Path]) -> grpc.StatusCode:
        async with tls_channel(server.port, pki.ca_cert, client) as channel:
            try:
                await pb_grpc.SummarizerStub(channel).Summarize(request("mutual"), timeout=10)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

    async with serving(settings, lambda s: FakeEngine()) as (server, _):
        assert await summarize(trusted) == grpc.StatusCode.OK
        assert await summarize(newcomer) == grpc.StatusCode.UNAVAILABLE
        # The bundle during a CA rotation: the old CA and the new one.
        client_ca.write_bytes(pki.ca_cert.read_bytes() + other.ca_cert.read_bytes())

        async def newcomer_admitted() -> bool:
            return await summarize(newcomer) == grpc.StatusCode.OK
        await until(newcomer_admitted, WAIT_S, "the new client CA to be honoured", interval_s=0.02)
        assert await summarize(trusted) == grpc.StatusCode.OK
        # The old CA retired.
        client_ca.write_bytes(other.ca_cert.read_bytes())

        async def old_refused() -> bool:
            return await summarize(trusted) == grpc.StatusCode.UNAVAILABLE
        await until(old_refused, WAIT_S, "the retired client CA to be refused", interval_s=0.02)
        assert await summarize(newcomer) == grpc.StatusCode.OK


def test_handshakes_look_at_the_files_at_most_once_per_interval(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    cert_b, key_b = issue_server_cert(pki, tmp_path, "server-b")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    live_cert.write_bytes(pki.server_cert.read_bytes())
    live_key.write_bytes(pki.server_key.read_bytes())
    now = [100.0]
    certificates = ReloadingCertificates(TlsFiles(str(live_cert), str(live_key)),
                                         check_interval_s=1.0, clock=lambda: now[0])
    live_cert.write_bytes(cert_b.read_bytes())
    live_key.write_bytes(key_b.read_bytes())
    assert certificates.fetch() is None, "checked too soon after the start"
    now[0] += 1.0
    assert certificates.fetch() is not None
    assert certificates.current.fingerprint == fingerprint_of(cert_b)
    assert certificates.fetch() is None, "nothing new"
    now[0] += 1.0
    assert certificates.fetch() is None, "still nothing new"


@pytest.mark.parametrize(("broken", "needle"), [
    ("cert", "not PEM certificates"),
    ("key", "does not match"),
    ("client_ca", "client CA bundle (--tls-client-ca)"),
])
def test_unusable_files_at_start_are_one_clear_error(tmp_path: Path, broken: str,
                                                     needle: str) -> None:
    pki: Pki = make_pki(tmp_path)
    files = {"cert": str(pki.server_cert), "key": str(pki.server_key),
             "client_ca": str(pki.ca_cert)}
    if broken == "key":
        files["key"] = str(pki.client_key)  # a real key, but not the certificate's
    else:
        garbage = tmp_path / "garbage.pem"
        garbage.write_bytes(b"\x00\xffnot a certificate\n")
        files[broken] = str(garbage)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_material(TlsFiles(**files))
