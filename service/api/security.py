"""Transport security and caller authentication, server side: TLS / mutual TLS credentials and a
bearer-token check that runs before any handler (so before any model work). The client side
(channel credentials, the token's metadata) is in `summarizer_client.client`.

Health checks are exempt from the token, so load balancers and Kubernetes probes need no secret;
reflection is not (it describes the API to whoever asks).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health
from summarizer_client.client import AUTH_METADATA_KEY

from ..config import Settings
from ..errors import ConfigError, Unauthenticated, status_for
from .credentials import ReloadingCertificates, TlsFiles, read_nonempty
from .priority import TokenClasses, parse_token_line

EXEMPT_SERVICES = frozenset({health.SERVICE_NAME})
TOKEN_SCHEME = "bearer"


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from the settings, or None for plaintext. They follow the files: a
    certificate renewed in place is served to new connections (see `credentials`)."""
    if not settings.tls_cert:
        return None
    return ReloadingCertificates(TlsFiles(
        cert=settings.tls_cert, key=settings.tls_key,
        client_ca=settings.tls_client_ca or None)).credentials()


def token_classes(settings: Settings) -> dict[str, TokenClasses]:
    """Every bearer token the server accepts, with the priority classes it may use (see
    api/priority.py: `TOKEN [default=CLASS] [ceiling=CLASS]` per line of the tokens file);
    empty means authentication is off."""
    tokens: dict[str, TokenClasses] = {}
    if settings.auth_token.strip():
        tokens[settings.auth_token.strip()] = TokenClasses()
    if settings.auth_tokens_file:
        text = read_nonempty(settings.auth_tokens_file, "tokens file (--auth-tokens-file)").decode(
            "utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                token, classes = parse_token_line(
                    line, f"tokens file (--auth-tokens-file) line {number}")
                tokens[token] = classes
    for token in tokens:
        if any(c.isspace() for c in token) or not token.isprintable():
            raise ConfigError("a bearer token must be one printable word without spaces")
    return tokens


def accepted_tokens(settings: Settings) -> tuple[str, ...]:
    """Every bearer token the server accepts; empty means authentication is off."""
    return tuple(token_classes(settings))


def _service_of(method: str) -> str:
    # "/package.Service/Method" -> "package.Service"
    return method.lstrip("/").split("/", 1)[0]


def _denying(handler: grpc.RpcMethodHandler, error: Unauthenticated) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `error`'s status before reading its message.

    gRPC reads a unary call's whole message before it runs the handler, so a refusal shaped
    like the method would first buffer whatever the caller sends (up to --max-message-bytes,
    per call). Declared as streaming requests, the handler runs on the headers alone; its status
    ends the call and gRPC drops the rest of the body. On the wire a client cannot tell the
    difference: it gets UNAUTHENTICATED and no message."""
    code, message = status_for(error)

    async def deny(_requests: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode[code.name], message)

    return grpc.stream_stream_rpc_method_handler(
        deny, request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without `authorization: Bearer <token>` for one of the accepted tokens."""

    def __init__(self, tokens: Iterable[str], exempt_services: frozenset[str] = EXEMPT_SERVICES):
        self._tokens = [t.encode() for t in tokens]
        if not self._tokens:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        self._exempt = exempt_services

    def _authorised(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        for key, value in metadata or ():
            if key.lower() != AUTH_METADATA_KEY or not isinstance(value, str):
                continue
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != TOKEN_SCHEME:
                continue
            presented = token.strip().encode()
            # Compare with every token, always, in constant time per token.
            matches = [hmac.compare_digest(presented, t) for t in self._tokens]
            if any(matches):
                return True
        return False

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails],
                                     Awaitable[grpc.RpcMethodHandler | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or _service_of(details.method) in self._exempt:
            return handler
        if self._authorised(details.invocation_metadata):
            return handler
        return _denying(handler, Unauthenticated(
            "missing or invalid bearer token; send metadata 'authorization: Bearer <token>'"))


def interceptors(settings: Settings) -> list[grpc.aio.ServerInterceptor]:
    tokens = accepted_tokens(settings)
    return [BearerTokenInterceptor(tokens)] if tokens else []
