"""What the client reports besides gRPC's own errors."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A problem the caller can fix (an unreadable input or certificate file, a bad setting): the
    `summarizer` command reports it as one line and exits 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CallError(grpc.RpcError):
    """A failed call as the blocking client reports it when the work ran on its private event
    loop (`SummarizerClient.summarize_many`): a plain `grpc.RpcError` with the call's status,
    never grpc's asyncio error type, which blocking code has no reason to know."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 trailing_metadata: tuple[tuple[str, str | bytes], ...] = (),
                 debug_error_string: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self._code = code
        self._details = details
        self._trailing_metadata = trailing_metadata
        self._debug_error_string = debug_error_string

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> CallError:
        return cls(error.code(), error.details() or "", tuple(error.trailing_metadata() or ()),
                   error.debug_error_string() or "")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    # The stubs name their private _Metadatum type here; ours is the same pairs, spelled out.
    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:  # type: ignore[override]
        return self._trailing_metadata

    def debug_error_string(self) -> str:
        return self._debug_error_string


def code_name(number: int) -> str:
    """A numeric gRPC status code's name, e.g. 13 -> "INTERNAL"."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return str(number)
