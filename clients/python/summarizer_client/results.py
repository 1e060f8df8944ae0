"""Typed results, shared with the server (its `service.domain` re-exports them): plain data,
free of protobuf and grpc."""

from __future__ import annotations

from dataclasses import dataclass


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

    `code` is the numeric gRPC status code (e.g. 13 for INTERNAL)."""

    id: str
    code: int
    message: str


Result = ArticleSummary | ArticleFailure
