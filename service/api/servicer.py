"""The gRPC servicer: protobuf in, domain calls, protobuf out, errors to status codes.

Protobuf types never pass this module; the core never sees them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .. import __version__
from .metrics import Metrics
from .priority import CallerClasses, PriorityRules
from ..serving.core import ArticleIn, SummarizerCore
from ..domain import (ArticleFailure, ArticleSummary, GenerationParams, LongInput, Outputs,
                      Priority, RequestedOptions)
from ..errors import InvalidArgument, Overloaded, SummarizerError, Unavailable, status_for

log = logging.getLogger(__name__)
REQUEST_ID_KEY = "x-request-id"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Summarizer"].full_name


class MalformedRequest:
    """A request that did not parse, e.g. a string field holding invalid UTF-8. gRPC would
    answer UNKNOWN before the handler runs; parsing leniently lets us say INVALID_ARGUMENT."""

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _lenient(message_type: type[Message]):  # -> Callable[[bytes], Message | MalformedRequest]
    def parse(raw: bytes) -> Message | MalformedRequest:
        try:
            return message_type.FromString(raw)
        except DecodeError as error:
            return MalformedRequest(str(error))

    return parse


def _parsed(request: Message | MalformedRequest) -> Message:
    if isinstance(request, MalformedRequest):
        raise InvalidArgument("request", f"cannot be parsed ({request.problem}); string fields "
                                         "must be valid UTF-8")
    return request


def add_to_server(servicer: SummarizerServicer, server: grpc.aio.Server) -> None:
    """Register like the generated `add_SummarizerServicer_to_server`, with lenient parsing."""
    handlers = {
        "Summarize": grpc.unary_unary_rpc_method_handler(
            servicer.Summarize, request_deserializer=_lenient(pb.SummarizeRequest),
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
    failed: int = 0
    truncated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    priority: Priority | None = None
    """The call's class, once resolved (none for GetModelInfo)."""

    def add(self, result: ArticleSummary | ArticleFailure) -> None:
        if isinstance(result, ArticleFailure):
            self.failed += 1
            return
        self.truncated += result.truncated
        self.input_tokens += result.input_tokens
        self.output_tokens += result.summary_tokens + result.headline_tokens

    def fields(self) -> dict[str, object]:
        return {"method": self.method, "request_id": self.request_id, "status": self.code,
                "articles": self.articles, "failed": self.failed, "truncated": self.truncated,
                "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
                "latency_ms": round((time.perf_counter() - self.started) * 1000, 1),
                "priority": self.priority_label, "peer": self.peer}

    @property
    def priority_label(self) -> str:
        return "" if self.priority is None else self.priority.name.lower()


def _request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's `x-request-id` (printable, at most 64 characters), else a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and value.isprintable():
            return value[:64]
    return uuid.uuid4().hex[:16]


class SummarizerServicer(pb_grpc.SummarizerServicer):
    """Answers UNAVAILABLE until the core is attached (model loaded and warmed up)."""

    def __init__(self, max_concurrent_calls: int = 0, metrics: Metrics | None = None,
                 priorities: PriorityRules | None = None) -> None:
        """`priorities`: how a call's class is resolved (default: any caller may ask for any
        class; unspecified is DEFAULT)."""
        self.core: SummarizerCore | None = None
        self.max_concurrent_calls = max_concurrent_calls
        self.active_calls = 0
        self.metrics = metrics
        self.priorities = priorities if priorities is not None else PriorityRules(
            Priority.DEFAULT)

    @contextlib.contextmanager
    def _recorded(self, method: str, context: grpc.aio.ServicerContext) -> Iterator[CallRecord]:
        """One log line and the call metrics for every call, however it ends."""
        call = CallRecord(method, _request_id(context), context.peer() or "")
        context.set_trailing_metadata(((REQUEST_ID_KEY, call.request_id),))
        if self.metrics is not None:
            self.metrics.in_flight.labels(method).inc()
        try:
            yield call
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the caller cancels and when the call's deadline
            # passes; log what the caller saw.
            remaining = context.time_remaining()
            call.code = ("DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0
                         else "CANCELLED")
            raise
        finally:
            fields = call.fields()
            if self.metrics is not None:
                self.metrics.in_flight.labels(method).dec()
                self.metrics.observe_call(method, call.code, time.perf_counter() - call.started,
                                          call.priority_label)
            log.info(" ".join(f"{k}={v}" for k, v in fields.items()),
                     extra={"request": fields})

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
        with self._recorded("Summarize", context) as call:
            try:
                with self._admitted():
                    request = _parsed(request)
                    call.articles = len(request.articles)
                    priority = self._priority(request.priority, context, call)
                    core = self._ready_core()
                    results = await core.summarize(articles_from_pb(request),
                                                   options_from_pb(request.options),
                                                   deadline_of(context), priority)
            except Exception as error:  # noqa: BLE001 - mapped to a status code
                await abort(context, error, call)
            for result in results:
                self._observe(call, result)
            return pb.SummarizeResponse(results=[result_to_pb(r) for r in results])

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
                    yield articles_from_pb(request), options_from_pb(request.options)
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
                        self._observe(call, result)
                        yield result_to_pb(result)
            except Exception as error:  # noqa: BLE001 - mapped to a status code
                await abort(context, error, call)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        with self._recorded("GetModelInfo", context) as call:
            try:
                core = self._ready_core()
            except Unavailable as error:
                await abort(context, error, call)
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
