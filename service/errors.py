"""Domain errors, each carrying the gRPC status code it maps to.

This is the one place where failures meet status codes: the servicer turns any `SummarizerError`
into its `code` and message, and anything else into INTERNAL with a generic message (the traceback
goes to the log, never to the caller).
"""

from __future__ import annotations

from summarizer_client.results import StatusCode

__all__ = ["code_name"]  # re-exported: the client owns it


Code = StatusCode
"""gRPC's status codes, by their standard numbers, without importing grpc (the client's enum: one
definition for both): the serving layer names its errors' codes with these, and the API layer
hands them to grpc by name."""


def code_name(number: int) -> str:
    """A numeric status code's name, e.g. 13 -> "INTERNAL"."""
    try:
        return Code(number).name
    except ValueError:
        return str(number)


class SummarizerError(Exception):
    """Base of every error the service reports on purpose."""

    code: Code = Code.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(SummarizerError):
    """The caller sent something unusable; the message names the field and the article."""

    code = Code.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *, article_index: int | None = None,
                 article_id: str = "") -> None:
        where = ""
        if article_index is not None:
            named = f", id {article_id!r}" if article_id else ""
            where = f" (article {article_index}{named})"
        super().__init__(f"{field}{where}: {problem}")
        self.field = field
        self.article_index = article_index
        self.article_id = article_id


class Overloaded(SummarizerError):
    """Too much work already: retry later, with backoff."""

    code = Code.RESOURCE_EXHAUSTED


class QueueFull(Overloaded):
    pass


class OutOfMemory(Overloaded):
    """The model ran out of memory on an input even when it ran alone."""


class Unauthenticated(SummarizerError):
    """No valid bearer token: checked before any other work."""

    code = Code.UNAUTHENTICATED


class PermissionDenied(SummarizerError):
    """The caller's token does not allow what it asked for (e.g. a priority above its ceiling)."""

    code = Code.PERMISSION_DENIED


class DeadlineExceeded(SummarizerError):
    code = Code.DEADLINE_EXCEEDED


class Unavailable(SummarizerError):
    """The server is starting up or shutting down."""

    code = Code.UNAVAILABLE


class GenerationFailed(SummarizerError):
    """The engine misbehaved; the details go to the log, the caller sees a generic message."""

    code = Code.INTERNAL


class ConfigError(SummarizerError):
    """Bad settings: reported on the command line, never over gRPC."""

    code = Code.FAILED_PRECONDITION


class ModelLoadError(SummarizerError):
    """The model is missing, not a seq2seq checkpoint, or not loadable safely."""

    code = Code.FAILED_PRECONDITION


def first_line(error: BaseException) -> str:
    """An exception as one line, for errors reported on the command line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def is_out_of_memory(error: BaseException) -> bool:
    """True for out-of-memory errors of any engine, without importing one: Python's MemoryError,
    torch.OutOfMemoryError (CUDA) and engines' "out of memory" RuntimeErrors."""
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or (isinstance(error, RuntimeError) and "out of memory" in str(error).lower()))


def status_for(error: BaseException) -> tuple[Code, str]:
    """The status code and caller-facing message for any exception."""
    if isinstance(error, SummarizerError) and not isinstance(error, GenerationFailed):
        return error.code, error.message
    return Code.INTERNAL, "internal error while summarising; see the server log"
