"""What the client reports besides gRPC's own errors."""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """A problem the caller can fix (an unreadable input or certificate file, a bad setting): the
    `summarizer` command reports it as one line and exits 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def code_name(number: int) -> str:
    """A numeric gRPC status code's name, e.g. 13 -> "INTERNAL"."""
    for code in grpc.StatusCode:
        if code.value[0] == number:
            return code.name
    return str(number)
