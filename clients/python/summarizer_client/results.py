"""Typed results, shared with the server (its `service.domain` re-exports them): plain data,
free of protobuf and grpc."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class StatusCode(IntEnum):
    """gRPC's status codes by number, without importing grpc: equal to the numbers (`code ==
    3`), printed as names (`INVALID_ARGUMENT`), so a logged failure says what it is."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        if spec and spec[-1] in "bdoxXn":  # a numeric format asks for the number
            return int.__format__(self, spec)
        return format(self.name, spec)


def status_code(number: int) -> int:
    """`number` as a StatusCode where it is one (a newer server's unknown code stays an int)."""
    try:
        return StatusCode(number)
    except ValueError:
        return number


@dataclass(frozen=True)
class ArticleSummary:
    id: str
    summary: str
    headline: str
    input_tokens: int
    truncated: bool
    summary_tokens: int
    headline_tokens: int
    chunks: int = 1
    """How many pieces the model read the article in; 1 when it fit the window (or was cut)."""


@dataclass(frozen=True)
class ArticleFailure:
    """One article that failed on its own, reported in-band (streams, and partial unary results).

    `code` is the gRPC status code: a StatusCode, equal to its number (13) and printed as its
    name (INTERNAL)."""

    id: str
    code: int
    message: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", status_code(self.code))


Result = ArticleSummary | ArticleFailure
