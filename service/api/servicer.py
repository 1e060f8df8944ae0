"""The gRPC servicer: protobuf in, domain calls, protobuf out, errors to status codes.

Protobuf types never pass this module; the core never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import empty_pb2
from google.protobuf.message import DecodeError, Message
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .. import __version__
from .memory import RequestBudget
from .metrics import Metrics
from .priority import CallerClasses, PriorityRules
from ..serving.core import ArticleIn, SummarizerCore
from ..domain import (ArticleFailure, ArticleSummary, GenerationParams, LongInput, Outputs,
                      Priority, RequestedOptions)
from ..errors import InvalidArgument, Overloaded, SummarizerError, Unavailable, status_for

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
REQUEST_ID_KEY = "x-request-id"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Summarizer"].full_name


class MalformedRequest:
    """A request that did not parse. gRPC would answer UNKNOWN before the handler runs; parsing
    leniently lets us say INVALID_ARGUMENT, in words that fit what was wrong."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _problem_of(raw: bytes, message_type: type[Message]) -> str:
    """What is wrong with bytes that do not parse as `message_type`. Parsed as an empty message
    every field is an unknown field, checked only for the wire format: if that parses, the
    bytes are protobuf and a field is wrong (a string field's invalid UTF-8, or a field of the
    wrong type); if not, they are not protobuf at all."""
    name = message_type.DESCRIPTOR.name
    try:
        empty_pb2.Empty.FromString(raw)
    except DecodeError:
        return (f"cannot be parsed as a {name}: its {len(raw)} bytes are not protobuf (corrupt, "
                "truncated, or compressed without a grpc-encoding header?); send the message "
                "the method takes, serialized with protobuf")
    return (f"cannot be parsed as a {name}: a text field holds bytes that are not UTF-8, or a "
            "field has the wrong type; send article ids and texts as UTF-8 text")


def _lenient(message_type: type[M]) -> Callable[[bytes], M | MalformedRequest]:
    def parse(raw: bytes) -> M | MalformedRequest:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return MalformedRequest(_problem_of(raw, message_type))

    return parse


def _parsed(request: M | MalformedRequest) -> M:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument("request", request.problem)
    return request


def add_to_server(servicer: SummarizerServicer, server: grpc.aio.Server) -> None:
    """Register like the generated `add_SummarizerServicer_to_server`, with lenient parsing."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        # Served as one request, a stream of one answer: the same on the wire as unary.
        "Summarize": grpc.unary_stream_rpc_method_handler(
            servicer.summarize_answered, request_deserializer=_lenient(pb.SummarizeRequest),
            response_serializer=pb.SummarizeResponse.SerializeToString),
        "SummarizeStream": grpc.stream_stream_rpc_method_handler(
            servicer.SummarizeStream, request_deserializer=_lenient(pb.SummarizeRequest),
            response_serializer=pb.ArticleResult.SerializeToString),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelInfo, request_deserializer=_lenient(pb.GetModelInfoRequest),
            response_serializer=pb.ModelInfo.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)

_OUTPUTS_FROM_PB = {
    pb.OUTPUTS_UNSPECIFIED: Outputs.BOTH,
    pb.OUTPUTS_BOTH: Outputs.BOTH,
    pb.OUTPUTS_SUMMARY: Outputs.SUMMARY,
    pb.OUTPUTS_HEADLINE: Outputs.HEADLINE,
}
_OUTPUTS_TO_PB = {Outputs.BOTH: pb.OUTPUTS_BOTH, Outputs.SUMMARY: pb.OUTPUTS_SUMMARY,
                  Outputs.HEADLINE: pb.OUTPUTS_HEADLINE}
_LONG_INPUT_FROM_PB = {pb.LONG_INPUT_POLICY_TRUNCATE: LongInput.TRUNCATE,
                       pb.LONG_INPUT_POLICY_CHUNK: LongInput.CHUNK}
LONG_INPUT_TO_PB = {policy: value for value, policy in _LONG_INPUT_FROM_PB.items()}
_PRIORITY_FROM_PB = {pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
                     pb.PRIORITY_DEFAULT: Priority.DEFAULT, pb.PRIORITY_BULK: Priority.BULK}
PRIORITY_TO_PB = {priority: value for value, priority in _PRIORITY_FROM_PB.items()}


def priority_from_pb(value: int) -> Priority | None:
    """The class a request asks for; None: unspecified, or a value this server does not know
    (a newer client), which both mean the caller's default."""
    return _PRIORITY_FROM_PB.get(value)  # type: ignore[call-overload]


def options_from_pb(options: pb.GenerationOptions) -> RequestedOptions:
    return RequestedOptions(
        summary_max_tokens=options.summary_max_tokens,
        summary_min_tokens=options.summary_min_tokens,
        headline_max_tokens=options.headline_max_tokens,
        headline_min_tokens=options.headline_min_tokens,
        num_beams=options.num_beams,
        # An enum value this server does not know (a newer client) means "both".
        outputs=_OUTPUTS_FROM_PB.get(options.outputs, Outputs.BOTH),
        max_input_tokens=options.max_input_tokens,
        length_penalty=(options.length_penalty if options.HasField("length_penalty") else None),
        no_repeat_ngram_size=(options.no_repeat_ngram_size
                              if options.HasField("no_repeat_ngram_size") else None),
        # Unspecified, or a value this server does not know (a newer client): the default.
        long_input=_LONG_INPUT_FROM_PB.get(options.long_input),
    )


def options_to_pb(params: GenerationParams) -> pb.GenerationOptions:
    message = pb.GenerationOptions(
        summary_max_tokens=params.summary_max_tokens,
        summary_min_tokens=params.summary_min_tokens,
        headline_max_tokens=params.headline_max_tokens,
        headline_min_tokens=params.headline_min_tokens,
        num_beams=params.num_beams,
        outputs=_OUTPUTS_TO_PB[params.outputs],
        max_input_tokens=params.max_input_tokens,
    )
    if params.length_penalty is not None:
        message.length_penalty = params.length_penalty
    if params.no_repeat_ngram_size is not None:
        message.no_repeat_ngram_size = params.no_repeat_ngram_size
    return message


def articles_from_pb(request: pb.SummarizeRequest) -> list[ArticleIn]:
    return [ArticleIn(id=a.id, text=a.text) for a in request.articles]


def text_bytes(articles: list[ArticleIn]) -> int:
    """Memory the articles' texts take as Python strings (what a request holds longest)."""
    return sum(sys.getsizeof(a.text) for a in articles)


def result_to_pb(result: ArticleSummary | ArticleFailure) -> pb.ArticleResult:
    if isinstance(result, ArticleFailure):
        return pb.ArticleResult(id=result.id,
                                error=pb.ArticleError(code=result.code, message=result.message))
    return pb.ArticleResult(
        id=result.id, summary=result.summary, headline=result.headline,
        input_tokens=result.input_tokens, truncated=result.truncated,
        summary_tokens=result.summary_tokens, headline_tokens=result.headline_tokens,
        chunks=result.chunks)


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def abort(context: grpc.aio.ServicerContext, error: Exception,
                call: CallRecord | None = None) -> NoReturn:
    """End the call with the status `error` maps to; unexpected errors are logged in full."""
    code, message = status_for(error)
    if not isinstance(error, SummarizerError):
        log.error("unexpected error in a call", exc_info=error)
    if call is not None:
        call.code = code.name
    await context.abort(grpc.StatusCode[code.name], message)
    raise AssertionError("unreachable")  # pragma: no cover - context.abort always raises


@dataclass
class CallRecord:
    """What one call did, for its log line and metrics. Never holds article text."""

    method: str
    request_id: str
    peer: str
    started: float = field(default_factory=time.perf_counter)
    code: str = "OK"
    articles: int = 0
    """Articles received."""
    delivered: int = 0
    """Results written to the caller (a caller that went away got only these)."""
    failed: int = 0
    truncated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    priority: Priority | None = None
    """The call's class, once resolved (none for GetModelInfo)."""
    message_bytes: int = 0
    """Article text the call's requests held (for the memory budget and release)."""
    logged: bool = False
    sent: bool = False
    """The whole answer was written (set by the handler once gRPC took its last message)."""

    def peer_went_away(self) -> None:
        """The caller left before its whole answer was written: the call is CANCELLED, and
        the counts stay those of the results it did get."""
        if self.code == "OK":
            self.code = "CANCELLED"

    def add(self, result: ArticleSummary | ArticleFailure) -> None:
        """Count a result the caller was sent."""
        self.delivered += 1
        if isinstance(result, ArticleFailure):
            self.failed += 1
            return
        self.truncated += result.truncated
        self.input_tokens += result.input_tokens
        self.output_tokens += result.summary_tokens + result.headline_tokens

    def fields(self) -> dict[str, object]:
        return {"method": self.method, "request_id": self.request_id, "status": self.code,
                "articles": self.articles, "delivered": self.delivered, "failed": self.failed,
                "truncated": self.truncated,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "latency_ms": round((time.perf_counter() - self.started) * 1000, 1),
                "priority": self.priority_label, "peer": self.peer}

    @property
    def priority_label(self) -> str:
        return "" if self.priority is None else self.priority.name.lower()


CURRENT_CALL: contextvars.ContextVar[CallRecord] = contextvars.ContextVar("summarizer_call")
"""The call being handled in this task: gRPC's own log lines about it find it here."""


class PeerGoneFilter(logging.Filter):
    """gRPC logs "ExecuteBatchError raised in core ..." at ERROR, with a traceback, when the
    answer of a call cannot be sent because its caller reset the stream or closed the
    connection first (unless it noticed the caller leave before trying). That is a normal
    outcome: the record is dropped and the call's own line says CANCELLED."""

    MARKER = "ExecuteBatchError raised in core by servicer method"

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.MARKER):
            return True
        call = CURRENT_CALL.get(None)
        if call is None:
            return True  # not one of ours: leave it to gRPC
        call.peer_went_away()
        return False


def install_peer_gone_filter() -> None:
    """Once per process (idempotent): see PeerGoneFilter."""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, PeerGoneFilter) for f in grpc_log.filters):
        grpc_log.addFilter(PeerGoneFilter())


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` (printable, at most 64 characters), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value.isprintable():
            return value[:64]
    return uuid.uuid4().hex[:16]


class SummarizerServicer(pb_grpc.SummarizerServicer):
    """Answers UNAVAILABLE until the core is attached (model loaded and warmed up)."""

    def __init__(self, max_concurrent_calls: int = 0, metrics: Metrics | None = None,
                 priorities: PriorityRules | None = None,
                 budget: RequestBudget | None = None,
                 on_call_end: Callable[[int], None] | None = None) -> None:
        """`priorities`: how a call's class is resolved (default: any caller may ask for any
        class; unspecified is DEFAULT). `budget`: request memory held by calls in progress
        (none: unbounded); `on_call_end` hears the text bytes of every call that ends (to give
        memory back)."""
        self.core: SummarizerCore | None = None
        self.max_concurrent_calls = max_concurrent_calls
        self.active_calls = 0
        self.metrics = metrics
        self.priorities = priorities if priorities is not None else PriorityRules(
            Priority.DEFAULT)
        self.budget = budget if budget is not None else RequestBudget(0)
        self.on_call_end = on_call_end

    @contextlib.contextmanager
    def _recorded(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[CallRecord]:
        """One log line and the call metrics for every call, however it ends, written once its
        outcome is known: the answer written (the handler sets `sent`), an error status sent,
        the handler cancelled; or, for an answer that could not be written because the caller
        went away, when gRPC finishes the call (then CANCELLED; see PeerGoneFilter)."""
        call = CallRecord(method, _request_id(context), context.peer() or "")
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        CURRENT_CALL.set(call)
        if self.metrics is not None:
            self.metrics.in_flight.labels(method).inc()
        context.add_done_callback(  # grpc's stub types the callback for a sync context
            lambda _context: self._finish(call))  # type: ignore[arg-type]
        try:
            yield call
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller cancels and when the call's deadline
            # passes; log what the caller saw.
            remaining = context.time_remaining()
            call.code = ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                         else "CANCELLED")
            self._finish(call)
            raise
        except GeneratorExit:
            # A streaming answer whose write failed: gRPC closes the generator (the caller
            # reset the stream or closed the connection).
            call.peer_went_away()
            self._finish(call)
            raise
        except BaseException:
            self._finish(call)  # an error status, already sent (abort awaits it)
            raise
        if call.sent:
            self._finish(call)

    def _finish(self, call: CallRecord) -> None:
        if call.logged:
            return
        call.logged = True
        if not call.sent:
            call.peer_went_away()  # an OK call whose answer was not all written
        fields = call.fields()
        if self.metrics is not None:
            self.metrics.in_flight.labels(call.method).dec()
            self.metrics.observe_call(call.method, call.code,
                                      time.perf_counter() - call.started, call.priority_label)
        log.info(" ".join(f"{k}={v}" for k, v in fields.items()), extra={"request": fields})
        if self.on_call_end is not None:
            self.on_call_end(call.message_bytes)

    def _observe(self, call: CallRecord, result: ArticleSummary | ArticleFailure) -> None:
        call.add(result)
        if self.metrics is not None:
            self.metrics.observe_result(result)

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a summarising call against --max-concurrent-rpcs (health checks never count)."""
        if self.max_concurrent_calls and self.active_calls >= self.max_concurrent_calls:
            raise Overloaded(f"more than {self.max_concurrent_calls} calls in progress; retry "
                             "later")
        self.active_calls += 1
        try:
            yield
        finally:
            self.active_calls -= 1

    def _ready_core(self) -> SummarizerCore:
        if self.core is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.core

    def _priority(self, requested: int, context: grpc.aio.ServicerContext,
                  call: CallRecord) -> Priority:
        """The call's class (PermissionDenied above the caller token's ceiling)."""
        call.priority = self.priorities.resolve(priority_from_pb(requested),
                                                context.invocation_metadata())
        return call.priority

    async def Summarize(self, request: pb.SummarizeRequest,
                        context: grpc.aio.ServicerContext) -> pb.SummarizeResponse:
        """The answer, for callers in this process; gRPC calls `summarize_answered`."""
        with self._recorded("Summarize", context) as call:
            results = await self._summarize(request, context, call)
            self._delivered(call, results)  # handed back: the caller has it
            return pb.SummarizeResponse(results=[result_to_pb(r) for r in results])

    async def summarize_answered(self, request: pb.SummarizeRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> AsyncIterator[pb.SummarizeResponse]:
        """Summarize as gRPC serves it: a stream of one message, which on the wire is exactly
        a unary answer (headers, one message, trailers), so that this handler learns whether
        the answer was written before the caller went away (see `add_to_server`)."""
        with self._recorded("Summarize", context) as call:
            results = await self._summarize(request, context, call)
            yield pb.SummarizeResponse(results=[result_to_pb(r) for r in results])
            self._delivered(call, results)  # resumed only once gRPC has written the answer

    def _delivered(self, call: CallRecord, results: list[ArticleSummary | ArticleFailure]
                   ) -> None:
        for result in results:
            self._observe(call, result)
        call.sent = True

    async def _summarize(self, request: pb.SummarizeRequest, context: grpc.aio.ServicerContext,
                         call: CallRecord) -> list[ArticleSummary | ArticleFailure]:
        try:
            with self._admitted():
                request = _parsed(request)
                call.articles = len(request.articles)
                priority = self._priority(request.priority, context, call)
                core = self._ready_core()
                articles = articles_from_pb(request)
                call.message_bytes = text_bytes(articles)
                with self.budget.hold(call.message_bytes):
                    return await core.summarize(articles, options_from_pb(request.options),
                                                deadline_of(context), priority)
        except Exception as error:  # noqa: BLE001 - mapped to a status code
            await abort(context, error, call)

    async def SummarizeStream(self, request_iterator: AsyncIterator[pb.SummarizeRequest],
                              context: grpc.aio.ServicerContext
                              ) -> AsyncIterator[pb.ArticleResult]:
        with self._recorded("SummarizeStream", context) as call:
            incoming = aiter(request_iterator)

            async def requests(first: pb.SummarizeRequest | None
                               ) -> AsyncIterator[tuple[list[ArticleIn], RequestedOptions]]:
                asked = pb.PRIORITY_UNSPECIFIED if first is None else first.priority
                request = first
                while request is not None:
                    if request.priority not in (pb.PRIORITY_UNSPECIFIED, asked):
                        raise InvalidArgument(
                            "priority", "a stream has one class, set by its first request; "
                            "leave it unspecified in later requests, or repeat it")
                    call.articles += len(request.articles)
                    articles = articles_from_pb(request)
                    size = text_bytes(articles)
                    call.message_bytes += size
                    with self.budget.hold(size):  # while the message's articles are planned
                        yield articles, options_from_pb(request.options)
                    del articles
                    raw = await anext(incoming, None)
                    request = None if raw is None else _parsed(raw)

            try:
                with self._admitted():
                    core = self._ready_core()
                    # The first request sets the stream's class.
                    raw_first = await anext(incoming, None)
                    first = None if raw_first is None else _parsed(raw_first)
                    priority = self._priority(
                        pb.PRIORITY_UNSPECIFIED if first is None else first.priority, context,
                        call)
                    async for result in core.summarize_stream(requests(first),
                                                              deadline_of(context), priority):
                        yield result_to_pb(result)
                        # Counted once written: a caller gone before then did not get it.
                        self._observe(call, result)
                call.sent = True
            except Exception as error:  # noqa: BLE001 - mapped to a status code
                await abort(context, error, call)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        with self._recorded("GetModelInfo", context) as call:
            try:
                core = self._ready_core()
            except Unavailable as error:
                await abort(context, error, call)
            call.sent = True
            return self._model_info(core, self.priorities.caller(context.invocation_metadata()))

    @staticmethod
    def _model_info(core: SummarizerCore, caller: CallerClasses) -> pb.ModelInfo:
        info = core.describe()
        scheduling = info.scheduling
        defaults = options_to_pb(info.defaults)
        defaults.long_input = LONG_INPUT_TO_PB[info.long_input]
        return pb.ModelInfo(
            models=[pb.ModelDescription(
                role=m.role, model_id=m.model_id, family=m.family, model_type=m.model_type,
                max_input_tokens=m.max_input_tokens, summary_prefix=m.summary_prefix,
                headline_prefix=m.headline_prefix, dtype=m.dtype, device=m.device)
                for m in info.models],
            engine=info.engine,
            default_options=defaults,
            limits=pb.ServerLimits(
                max_articles_per_request=info.max_articles_per_request,
                max_article_chars=info.max_article_chars,
                max_batch_size=info.max_batch_size, max_queue=info.max_queue,
                max_num_beams=info.limits.max_num_beams,
                max_new_tokens=info.limits.max_new_tokens,
                max_chunks_per_article=info.max_chunks_per_article,
                max_chunk_depth=info.max_chunk_depth),
            server_version=__version__,
            scheduling=pb.Scheduling(
                default_priority=PRIORITY_TO_PB[caller.default],
                max_priority=PRIORITY_TO_PB[caller.ceiling],
                classes=[pb.PriorityClass(priority=PRIORITY_TO_PB[p], max_queue=limit)
                         for p, limit in sorted(scheduling.queue_limits.items())],
                starvation_bound=scheduling.starvation_bound,
                interactive_headroom=scheduling.interactive_headroom,
                small_bulk_batch=scheduling.small_bulk_batch),
        )
