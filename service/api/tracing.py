"""OpenTelemetry tracing (the `otel` extra): the server span of every call, and the serving spans.

Imported only when tracing is configured (service/config.py `trace_exporters`) or a test passes a
`Tracing` in; without the extra installed the server says so once and serves untraced.

- The server span: the maintained gRPC instrumentation's asyncio server interceptor
  (opentelemetry-instrumentation-grpc). It continues the caller's W3C trace context (`traceparent`
  metadata, through the propagators `OTEL_PROPAGATORS` names), names the span after the method
  and sets the gRPC semantic-convention attributes (rpc.system, rpc.service, rpc.method,
  rpc.grpc.status_code, the peer). Health checks and reflection are not traced (probes every few
  seconds would drown the traces of work).
- `Tracing` is the serving layer's `Tracer` (service/serving/tracing.py): prepare, article, map,
  reduce, headline and backpressure spans, named `summarizer.<name>`, attributes
  `summarizer.<name>`.
- `observe_batch` is an `on_batch` hook (beside the metrics): after every engine call it records
  the batch span (`summarizer.batch`) and, for a batch as the queue cut it, each job's
  `summarizer.queue_wait` span, both after the fact from the times the executor measured. With
  continuous batching, one `summarizer.decode` span per article (admission to done) instead of
  the batch span.

The provider is this server's own (never the global one), so several servers in one process (the
tests) keep their spans apart; exporter, sampler, resource and batching come from the `OTEL_*`
variables, read by the SDK.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Status, StatusCode

from .. import __version__
from ..domain import Priority
from ..engines.protocol import Engine
from ..errors import ConfigError
from ..serving.batcher import BatchReport
from ..serving.tracing import AttributeValue

log = logging.getLogger(__name__)

PREFIX = "summarizer."
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                     "grpc.reflection.v1.ServerReflection")
EXPORTER_GROUP = "opentelemetry_traces_exporter"


def _attributes(attributes: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
    return {PREFIX + name: value for name, value in attributes.items()}


class OtelSpan:
    """A serving `Span` backed by an OpenTelemetry span; what `Job.trace` holds."""

    __slots__ = ("span", "_ended")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._ended = False

    def set(self, **attributes: AttributeValue) -> None:
        if self.span.is_recording():
            self.span.set_attributes(_attributes(attributes))

    def fail(self, error: BaseException) -> None:
        kind = type(error).__name__  # never the message: it could quote the article
        self.span.set_attribute("error.type", kind)
        self.span.set_status(Status(StatusCode.ERROR, kind))

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.span.end()


class Tracing:
    """OpenTelemetry for one server: the gRPC interceptor, the serving `Tracer` and the batch
    hook. `owns_provider`: `shutdown` flushes and shuts the provider down (a provider a test
    passes in stays the test's)."""

    def __init__(self, provider: TracerProvider, *, owns_provider: bool = False) -> None:
        self.provider = provider
        self.owns_provider = owns_provider
        self.tracer = provider.get_tracer("summarizer", __version__)
        self.engine_attributes: dict[str, AttributeValue] = {}

    @classmethod
    def from_exporters(cls, names: Sequence[str]) -> Tracing:
        """A provider exporting through the named exporters (entry points of the SDK's
        `opentelemetry_traces_exporter` group), each behind a batch span processor; the SDK
        reads their settings (endpoint, headers, timeouts) and the sampler from `OTEL_*`."""
        found = {e.name: e for e in entry_points(group=EXPORTER_GROUP)}
        missing = [name for name in names if name not in found]
        if missing:
            raise ConfigError(
                f"tracing: no span exporter named {', '.join(missing)} is installed (installed: "
                f"{', '.join(sorted(found)) or 'none'}); check OTEL_TRACES_EXPORTER and "
                "OTEL_EXPORTER_OTLP_PROTOCOL, or install the exporter's package")
        resource = Resource.create()
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            # Our name unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES give one.
            resource = resource.merge(Resource({SERVICE_NAME: "summarizer"}))
        resource = resource.merge(Resource({SERVICE_VERSION: __version__}))
        provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER(_ARG)
        for name in names:
            provider.add_span_processor(BatchSpanProcessor(found[name].load()()))
        log.info("tracing on: spans of service %s exported with %s",
                 resource.attributes.get(SERVICE_NAME), ", ".join(names))
        return cls(provider, owns_provider=True)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        untraced = filters.any_of(*(filters.service_name(s) for s in UNTRACED_SERVICES))
        return aio_server_interceptor(tracer_provider=self.provider,
                                      filter_=filters.negate(untraced))

    def engine_loaded(self, engine: Engine) -> None:
        """What every batch span says about the engine."""
        def joined(values: Iterable[str]) -> str:
            return ",".join(dict.fromkeys(values))

        self.engine_attributes = _attributes({
            "engine": engine.name,
            "compute_type": joined(m.dtype for m in engine.models),
            "device": joined(m.device for m in engine.models)})

    def shutdown(self) -> None:
        if self.owns_provider:
            self.provider.shutdown()  # exports what is still buffered

    # ----- the serving layer's Tracer -----
    def start(self, name: str, parent: Any = None, **attributes: AttributeValue) -> OtelSpan:
        context = trace.set_span_in_context(parent.span) if isinstance(parent, OtelSpan) else None
        return OtelSpan(self.tracer.start_span(PREFIX + name, context=context,
                                               attributes=_attributes(attributes)))

    def current(self, span: Any) -> contextlib.AbstractContextManager[Any]:
        if not isinstance(span, OtelSpan):
            return contextlib.nullcontext()
        return trace.use_span(span.span, end_on_exit=False, record_exception=False,
                              set_status_on_exception=False)

    # ----- the batch hook -----
    def observe_batch(self, report: BatchReport) -> None:
        """The engine batch span, a child of the first sampled job's span and linked to (and
        from) every job's span it served; and, the first time the jobs run, their queue waits.
        Times come from the executor's monotonic clock, moved onto the wall clock.

        Continuous batching reports each article on its own (`report.decoding`): its span is
        `summarizer.decode`, from its admission to the engine until it finished; the steps it
        shared with other articles are not traced."""
        owners = list(dict.fromkeys(t for t in report.traces if isinstance(t, OtelSpan)))
        sampled = [o for o in owners if o.span.get_span_context().trace_flags.sampled]
        if not sampled:
            return
        offset_ns = time.time_ns() - time.monotonic_ns()
        started_ns = int(report.started_s * 1e9) + offset_ns
        ended_ns = started_ns + int(report.duration_s * 1e9)
        size = len(report.costs)
        longest = max(report.costs, default=0)
        attributes: dict[str, AttributeValue] = {
            "batch_size": size, "input_tokens": sum(report.costs),
            "padded_tokens": size * longest, "padding_ratio": round(report.padding_ratio, 4),
            "isolation_depth": report.isolation_depth}
        if report.priorities:  # the batch's classes, most urgent first
            attributes["priority"] = ",".join(
                Priority(p).name.lower() for p in sorted(set(report.priorities)))
        for name in ("num_beams", "summary_max_tokens", "headline_max_tokens"):
            value = getattr(report.key, name, None)
            if isinstance(value, int):
                attributes[name] = value
        outputs = getattr(report.key, "outputs", None)
        if outputs is not None:
            attributes["outputs"] = str(getattr(outputs, "value", outputs))
        if report.decoding:
            attributes = {k: v for k, v in attributes.items()
                          if k not in ("batch_size", "padded_tokens", "padding_ratio",
                                       "isolation_depth")}
        batch = self.tracer.start_span(
            PREFIX + ("decode" if report.decoding else "batch"),
            context=trace.set_span_in_context(sampled[0].span),
            attributes={**_attributes(attributes), **self.engine_attributes},
            links=[Link(o.span.get_span_context()) for o in sampled], start_time=started_ns)
        if report.failed:
            batch.set_attribute("error.type", report.error_type)
            batch.set_status(Status(StatusCode.ERROR, report.error_type))
        batch.end(end_time=ended_ns)
        served = batch.get_span_context()
        for owner in sampled:
            if owner.span.is_recording():  # not ended (its caller may have gone meanwhile)
                owner.span.add_link(served)
        if report.isolation_depth:
            return  # the jobs' queue wait ended at their first try
        classes = report.priorities or (None,) * len(report.costs)
        for traced, waited_s, cost, priority in zip(report.traces, report.waited_s, report.costs,
                                                   classes):
            if isinstance(traced, OtelSpan) and traced.span.is_recording():
                wait_attributes: dict[str, AttributeValue] = {PREFIX + "input_tokens": cost}
                if priority is not None:
                    wait_attributes[PREFIX + "priority"] = Priority(priority).name.lower()
                self.tracer.start_span(
                    PREFIX + "queue_wait", context=trace.set_span_in_context(traced.span),
                    attributes=wait_attributes,
                    start_time=started_ns - int(waited_s * 1e9)).end(end_time=started_ns)
