"""The tracing hook of the request path: what serving needs from a tracer, and the no-op default.

Serving imports no tracing library (OpenTelemetry is an optional extra). It opens spans through
this small interface, and the API layer passes in an implementation (service/api/tracing.py) when
tracing is configured. With the default, `NO_TRACER`, every call returns the one `NO_SPAN`:
no allocation per article beyond the keyword arguments.

A span started here is a child of the current span (the gRPC server span, or a span made current
with `Tracer.current`). A `Span` is also what a `Job` carries (`Job.trace`) so that the batch hook
can put the job's queue wait under it and link it to the engine batch that served it; serving
passes it through without looking inside.

No article text goes into a span: attributes are counts, sizes, ids and error types.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

AttributeValue = str | bool | int | float


class Span(Protocol):
    def set(self, **attributes: AttributeValue) -> None:
        """Add attributes (names are prefixed `summarizer.` by the implementation)."""

    def fail(self, error: BaseException) -> None:
        """Mark the span failed, with the error's type only (a message could quote input)."""

    def end(self) -> None:
        """End the span; ending it again is a no-op."""


class Tracer(Protocol):
    def start(self, name: str, parent: Span | None = None, **attributes: AttributeValue) -> Span:
        """Start a span, a child of `parent` (default: the current span); not made current."""

    def current(self, span: Span) -> contextlib.AbstractContextManager[None]:
        """Make `span` the current span for the block (spans started inside are its
        children); does not end it."""


class _NoSpan:
    __slots__ = ()

    def set(self, **attributes: AttributeValue) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass

    def end(self) -> None:
        pass


class _NoTracer:
    __slots__ = ()

    def start(self, name: str, parent: Span | None = None, **attributes: AttributeValue) -> Span:
        return NO_SPAN

    def current(self, span: Span) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


NO_SPAN: Span = _NoSpan()
NO_TRACER: Tracer = _NoTracer()


@contextlib.contextmanager
def span(tracer: Tracer, name: str, parent: Span | None = None,
         **attributes: AttributeValue) -> Iterator[Span]:
    """A span for the block, current inside it, failed when the block raises, then ended."""
    opened = tracer.start(name, parent, **attributes)
    try:
        with tracer.current(opened):
            yield opened
    except BaseException as error:
        opened.fail(error)
        raise
    finally:
        opened.end()
