"""TLS, mutual TLS and bearer tokens, over real sockets; and the security settings' errors."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc

from service import cli
from service.config import Settings, markdown_table
from service.errors import ConfigError
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.api.server import SummarizerServer

from .conftest import server_in_thread, serving
from .fakes import FakeEngine
from .pki import Pki, make_pki
from .test_grpc import BASE, request

TOKEN = "s3cret-token-for-tests"
ROTATED = "next-token-after-rotation"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_channel(port: int, pki: Pki, *, client: tuple[Path, Path] | None = None
                ) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=client[1].read_bytes() if client else None,
        certificate_chain=client[0].read_bytes() if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def summarize_via(channel: grpc.aio.Channel, **call: object) -> str:
    stub = pb_grpc.SummarizerStub(channel)
    reply = await stub.Summarize(request("over a secure channel"), timeout=10, **call)
    return reply.results[0].summary


# ----------------------------------------------------------------------------------------------
# TLS


async def test_tls_server_serves_tls_clients_and_refuses_plaintext(pki: Pki) -> None:
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    async with serving(settings, lambda s: FakeEngine()) as (server, plaintext):
        async with tls_channel(server.port, pki) as secure:
            assert await summarize_via(secure) == "S:over a secur"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await summarize_via(plaintext)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_admits_only_clients_with_a_certificate_from_the_ca(pki: Pki) -> None:
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                            tls_client_ca=str(pki.ca_cert))
    engine = FakeEngine()
    async with serving(settings, lambda s: engine) as (server, _):
        async with tls_channel(server.port, pki,
                               client=(pki.client_cert, pki.client_key)) as trusted:
            assert await summarize_via(trusted) == "S:over a secur"
        for client in (None, (pki.rogue_client_cert, pki.rogue_client_key)):
            async with tls_channel(server.port, pki, client=client) as refused:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await summarize_via(refused)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(engine.batches) == 1, "refused clients never reached the model"


async def test_health_alone_in_plaintext_for_probes_beside_a_tls_server(pki: Pki) -> None:
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                            health_port=-1)  # any free port
    async with serving(settings, lambda s: FakeEngine()) as (server, _):
        health_port = server.health_port
        assert health_port and health_port != server.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as probe:
            reply = await health_pb2_grpc.HealthStub(probe).Check(
                health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await summarize_via(probe)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


# ----------------------------------------------------------------------------------------------
# bearer tokens


async def test_bearer_token_guards_summarizer_and_reflection_but_not_health(
        tmp_path: Path) -> None:
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(f"# rotated monthly\n{ROTATED}\n\n")
    engine = FakeEngine()
    settings = BASE.replace(auth_token=TOKEN, auth_tokens_file=str(tokens_file))
    async with serving(settings, lambda s: engine) as (_, channel):
        for metadata in (None, (("authorization", "Bearer wrong-token"),),
                         (("authorization", f"Basic {TOKEN}"),),
                         (("authorization", f"Bearer {TOKEN}x"),),
                         (("x-api-key", TOKEN),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await summarize_via(channel, metadata=metadata)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in caught.value.details()
        # Read before writing: a write racing the refusal can surface as a local INTERNAL in
        # grpcio's asyncio client (grpc/grpc#36066).
        stream = pb_grpc.SummarizerStub(channel).SummarizeStream()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert engine.batches == [], "refused before any model work"

        for token in (TOKEN, ROTATED):
            assert await summarize_via(
                channel, metadata=(("authorization", f"Bearer {token}"),)) == "S:over a secur"
        assert await summarize_via(
            channel, metadata=(("authorization", f"bearer  {TOKEN} "),)) == "S:over a secur"

        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await reflect.read()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_tls_and_token_together(pki: Pki) -> None:
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                            auth_token=TOKEN)
    async with serving(settings, lambda s: FakeEngine()) as (server, _):
        async with tls_channel(server.port, pki) as secure:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await summarize_via(secure)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await summarize_via(
                secure, metadata=(("authorization", f"Bearer {TOKEN}"),)) == "S:over a secur"


# ----------------------------------------------------------------------------------------------
# the CLI as a client of a secured server


def test_cli_summarize_and_health_speak_tls_and_send_the_token(
        pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    article = tmp_path / "story.txt"
    article.write_text("A story sent over TLS with a token.")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = BASE.replace(tls_cert=str(pki.server_cert), tls_key=str(pki.server_key),
                            tls_client_ca=str(pki.ca_cert), auth_token=TOKEN)
    monkeypatch.delenv("SUMMARIZER_AUTH_TOKEN", raising=False)
    with server_in_thread(settings, lambda s: FakeEngine()) as port:
        secure = ["--server", f"127.0.0.1:{port}", "--tls-ca", str(pki.ca_cert),
                  "--tls-client-cert", str(pki.client_cert),
                  "--tls-client-key", str(pki.client_key)]
        assert cli.main(["summarize", *secure, "--auth-token-file", str(token_file),
                         str(article)]) == 0
        record = json.loads(capsys.readouterr().out)
        assert record["id"] == "story" and record["summary"] == "S:A story sent"

        assert cli.main(["summarize", *secure, str(article)]) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err

        monkeypatch.setenv("SUMMARIZER_AUTH_TOKEN", TOKEN)
        assert cli.main(["summarize", *secure, str(article)]) == 0
        capsys.readouterr()

        assert cli.main(["health", *secure]) == 0, "health needs TLS but no token"
        assert capsys.readouterr().out.strip() == "SERVING"


# ----------------------------------------------------------------------------------------------
# settings


@pytest.mark.parametrize(("changes", "needle"), [
    ({"tls_cert": "server.pem"}, "tls_cert and tls_key must be given together"),
    ({"tls_key": "server.key"}, "tls_cert and tls_key must be given together"),
    ({"tls_client_ca": "ca.pem"}, "tls_client_ca (mutual TLS) needs tls_cert"),
])
def test_incomplete_tls_settings_are_refused(changes: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Settings(**changes)


async def test_unreadable_security_files_are_one_clear_error(tmp_path: Path, pki: Pki) -> None:
    missing = str(tmp_path / "nope.pem")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    spaced = tmp_path / "spaced"
    spaced.write_text("two words\n")
    for changes, needle in [
        ({"tls_cert": missing, "tls_key": str(pki.server_key)}, "TLS certificate (--tls-cert)"),
        ({"tls_cert": str(pki.server_cert), "tls_key": str(empty)}, "is empty"),
        ({"auth_tokens_file": missing}, "tokens file (--auth-tokens-file)"),
        ({"auth_tokens_file": str(spaced)}, "one printable word"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
            SummarizerServer(BASE.replace(**changes), lambda s: FakeEngine())


def test_the_token_never_shows_in_settings_repr_or_the_readme_table() -> None:
    settings = Settings(auth_token=TOKEN)
    assert TOKEN not in repr(settings)
    assert Settings.load(environ={"SUMMARIZER_AUTH_TOKEN": TOKEN}).auth_token == TOKEN
    assert "| `--auth-token` | `SUMMARIZER_AUTH_TOKEN` | (unset) |" in markdown_table()
