"""OpenTelemetry tracing: the span tree and attributes of real calls over real sockets (an
in-memory exporter), the OTLP/HTTP wire format (a receiver started here), and the switch."""

from __future__ import annotations

import http.server
import logging
import sys
import threading
from collections.abc import Iterator, Sequence

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.api.server import tracing_from_environment
from service.api.tracing import Tracing
from service.config import trace_exporters
from service.errors import ConfigError
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .conftest import serving
from .fakes import FakeEngine
from .test_grpc import BASE, request
from .test_long_input import CHUNK, long_article

CALLER_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7
TRACEPARENT = (("traceparent", f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"),)


class Traced:
    """A `Tracing` on its own provider whose spans land in memory, as they end."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracing = Tracing(self.provider)

    def spans(self) -> list[ReadableSpan]:
        assert self.provider.force_flush()
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.name == name]

    def children(self, parent: ReadableSpan, name: str | None = None) -> list[ReadableSpan]:
        return [s for s in self.spans() if s.parent is not None
                and s.parent.span_id == parent.context.span_id
                and (name is None or s.name == name)]


def texts_in(spans: Sequence[ReadableSpan]) -> Iterator[str]:
    """Every string a span carries: names, attribute values, status, events, links."""
    for s in spans:
        yield s.name
        yield s.status.description or ""
        for value in s.attributes.values():
            yield str(value)
        for event in s.events:
            yield event.name
            yield from (str(v) for v in event.attributes.values())
        for link in s.links:
            yield from (str(v) for v in (link.attributes or {}).values())


def assert_no_article_text(spans: Sequence[ReadableSpan], *texts: str) -> None:
    carried = list(texts_in(spans))
    for text in texts:
        for fragment in (text, text[:12]):  # the fake summary quotes 12 characters
            assert not any(fragment in value for value in carried), fragment


def linked(span: ReadableSpan, target: ReadableSpan) -> bool:
    return any(link.context.span_id == target.context.span_id for link in span.links)


async def test_a_unary_call_continues_the_callers_trace_down_to_its_engine_batch() -> None:
    traced = Traced()
    texts = ("The first article reads well.", "A second article, a little longer.")
    async with serving(BASE.replace(max_wait_ms=50), lambda s: FakeEngine(),
                       tracing=traced.tracing) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(*texts, num_beams=3), metadata=TRACEPARENT,
                                     timeout=10)
    assert [r.summary for r in reply.results] == ["S:" + t[:12] for t in texts]

    [call] = traced.named("/summarizer.v1.Summarizer/Summarize")
    assert call.kind is SpanKind.SERVER
    assert call.context.trace_id == CALLER_TRACE_ID
    assert call.parent.span_id == CALLER_SPAN_ID and call.parent.is_remote
    assert call.attributes["rpc.system"] == "grpc"
    assert call.attributes["rpc.service"] == "summarizer.v1.Summarizer"
    assert call.attributes["rpc.method"] == "Summarize"
    assert call.attributes["rpc.grpc.status_code"] == 0
    assert all(s.context.trace_id == CALLER_TRACE_ID for s in traced.spans())

    [prepare] = traced.children(call, "summarizer.prepare")
    assert prepare.attributes["summarizer.articles"] == 2
    assert prepare.attributes["summarizer.model_inputs"] == 2
    articles = sorted(traced.children(call, "summarizer.article"),
                      key=lambda s: s.attributes["summarizer.article_index"])
    assert [a.attributes["summarizer.article_id"] for a in articles] == ["a0", "a1"]
    assert [a.attributes["summarizer.input_tokens"] for a in articles] == [len(t) for t in texts]
    assert all(a.status.status_code is StatusCode.UNSET for a in articles)
    assert prepare.end_time <= min(a.start_time for a in articles)

    # Both articles were served by one engine batch: a child of one of them, linked with both.
    [batch] = traced.named("summarizer.batch")
    assert batch.parent.span_id in {a.context.span_id for a in articles}
    assert batch.attributes["summarizer.batch_size"] == 2
    assert batch.attributes["summarizer.input_tokens"] == sum(map(len, texts))
    assert batch.attributes["summarizer.padded_tokens"] == 2 * max(map(len, texts))
    assert batch.attributes["summarizer.num_beams"] == 3
    assert batch.attributes["summarizer.engine"] == "fake"
    assert batch.attributes["summarizer.compute_type"] == "float32"
    assert batch.attributes["summarizer.isolation_depth"] == 0
    for article in articles:
        assert linked(article, batch) and linked(batch, article)
        [wait] = traced.children(article, "summarizer.queue_wait")
        # The wait ends where the batch starts, inside the article's span.
        assert wait.end_time == batch.start_time
        assert article.start_time <= wait.start_time <= wait.end_time
        assert batch.end_time <= article.end_time <= call.end_time
    assert_no_article_text(traced.spans(), *texts)


async def test_a_stream_has_one_server_span_a_prepare_span_per_request_and_one_per_article():
    traced = Traced()
    async with serving(BASE, lambda s: FakeEngine(), tracing=traced.tracing) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)

        async def requests():
            yield request("stream one", ids=["s1"])
            yield request("stream two", "stream three", ids=["s2", "s3"])

        results = [r async for r in stub.SummarizeStream(requests(), metadata=TRACEPARENT,
                                                           timeout=10)]
    assert sorted(r.id for r in results) == ["s1", "s2", "s3"]
    [call] = traced.named("/summarizer.v1.Summarizer/SummarizeStream")
    assert call.kind is SpanKind.SERVER and call.parent.span_id == CALLER_SPAN_ID
    assert call.attributes["rpc.method"] == "SummarizeStream"
    prepares = traced.children(call, "summarizer.prepare")
    assert sorted(p.attributes["summarizer.articles"] for p in prepares) == [1, 2]
    articles = traced.children(call, "summarizer.article")
    assert sorted(a.attributes["summarizer.article_id"] for a in articles) == ["s1", "s2", "s3"]
    batches = traced.named("summarizer.batch")
    for article in articles:
        assert len(traced.children(article, "summarizer.queue_wait")) == 1
        assert any(linked(article, b) for b in batches)
    assert sum(b.attributes["summarizer.batch_size"] for b in batches) == 3
    assert_no_article_text(traced.spans(), "stream one", "stream two", "stream three")


async def test_a_chunked_article_has_its_map_reduce_and_headline_passes() -> None:
    traced = Traced()
    text = long_article(5)
    async with serving(BASE, lambda s: FakeEngine(), tracing=traced.tracing) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(text, long_input=CHUNK), metadata=TRACEPARENT,
                                     timeout=10)
    assert reply.results[0].chunks == 5

    [call] = traced.named("/summarizer.v1.Summarizer/Summarize")
    [article] = traced.children(call, "summarizer.article")
    assert article.attributes["summarizer.chunks"] == 5
    [mapped] = traced.children(article, "summarizer.map")
    assert mapped.attributes["summarizer.chunks"] == 5
    assert len(traced.children(mapped, "summarizer.queue_wait")) == 5
    reduces = traced.children(article, "summarizer.reduce")
    [final] = [r for r in reduces if r.attributes.get("summarizer.final")]
    [headline] = traced.children(article, "summarizer.headline")
    # The passes run one after another, each waiting in the queue once per input.
    assert mapped.end_time <= final.start_time <= final.end_time <= headline.start_time
    for passed in (final, headline):
        assert len(traced.children(passed, "summarizer.queue_wait")) == 1
    # Every engine batch is linked from the pass that queued its inputs.
    batches = traced.named("summarizer.batch")
    for passed in (mapped, *reduces, headline):
        assert any(linked(passed, b) for b in batches), passed.name
    assert sum(b.attributes["summarizer.batch_size"] for b in batches
               if linked(mapped, b)) == 5
    assert {b.attributes["summarizer.outputs"] for b in batches} == {"summary", "headline"}
    sentences = [f"L sentence {i:02d} says something here." for i in range(5)]
    assert_no_article_text(traced.spans(), *sentences)


async def test_an_isolated_failure_shows_each_retry_and_fails_only_its_article() -> None:
    traced = Traced()
    engine = FakeEngine()
    engine.fail_on = "poison"
    texts = ("first fine", "a poison pill", "third fine")
    async with serving(BASE.replace(max_batch_size=8), lambda s: engine,
                       tracing=traced.tracing) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(*texts), metadata=TRACEPARENT, timeout=10)
    assert reply.results[1].HasField("error") and not reply.results[0].HasField("error")

    batches = traced.named("summarizer.batch")
    assert len(batches) == len(engine.batches)  # one span per engine call, each try
    [whole] = [b for b in batches if b.attributes["summarizer.isolation_depth"] == 0]
    assert whole.attributes["summarizer.batch_size"] == 3
    assert whole.status.status_code is StatusCode.ERROR
    assert whole.attributes["error.type"] == "RuntimeError"
    retries = [b for b in batches if b.attributes["summarizer.isolation_depth"] > 0]
    failed_alone = [b for b in retries if b.status.status_code is StatusCode.ERROR
                    and b.attributes["summarizer.batch_size"] == 1]
    assert len(failed_alone) == 1
    articles = {a.attributes["summarizer.article_id"]: a
                for a in traced.named("summarizer.article")}
    assert articles["a1"].status.status_code is StatusCode.ERROR
    assert articles["a1"].attributes["error.type"] == "RuntimeError"
    assert linked(articles["a1"], failed_alone[0])
    for article_id in ("a0", "a2"):
        assert articles[article_id].status.status_code is StatusCode.UNSET
        assert any(linked(articles[article_id], b) for b in retries
                   if b.status.status_code is StatusCode.UNSET)
    # Each article waited in the queue once: a retry is not a queue wait.
    for article in articles.values():
        assert len(traced.children(article, "summarizer.queue_wait")) == 1
        assert linked(article, whole)
    assert_no_article_text(traced.spans(), *texts)


class _Receiver(http.server.BaseHTTPRequestHandler):
    bodies: list[tuple[str, str, bytes]]

    def do_POST(self) -> None:  # noqa: N802 - the http.server interface
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.bodies.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, str, bytes]]]]:
    """A tiny OTLP/HTTP receiver on a free port: (its URL, the requests it received)."""
    bodies: list[tuple[str, str, bytes]] = []
    handler = type("Receiver", (_Receiver,), {"bodies": bodies})
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{receiver.server_address[1]}", bodies
    finally:
        receiver.shutdown()
        receiver.server_close()
        thread.join(10)


async def test_spans_reach_an_otlp_http_receiver_as_the_environment_configures_it(
        otlp_receiver, monkeypatch) -> None:
    url, bodies = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", url)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "summarizer-under-test")
    text = "An article that must never reach the collector."
    # No tracing argument: the server takes it from the environment, as in production.
    async with serving(BASE, lambda s: FakeEngine()) as (server, channel):
        assert server.tracing is not None
        stub = pb_grpc.SummarizerStub(channel)
        await stub.Summarize(request(text), metadata=TRACEPARENT, timeout=10)
    # Stopping the server shut its provider down, which exported what was buffered.
    assert bodies, "no spans arrived"
    spans, services = [], set()
    for path, content_type, body in bodies:
        assert (path, content_type) == ("/v1/traces", "application/x-protobuf")
        assert text.encode() not in body and text[:12].encode() not in body
        exported = ExportTraceServiceRequest.FromString(body)
        for resource_spans in exported.resource_spans:
            services.update(a.value.string_value for a in resource_spans.resource.attributes
                            if a.key == "service.name")
            spans += [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert services == {"summarizer-under-test"}
    names = {s.name for s in spans}
    assert {"/summarizer.v1.Summarizer/Summarize", "summarizer.prepare", "summarizer.article",
            "summarizer.queue_wait", "summarizer.batch"} <= names
    [call] = [s for s in spans if s.name == "/summarizer.v1.Summarizer/Summarize"]
    assert call.trace_id == CALLER_TRACE_ID.to_bytes(16, "big")
    assert call.parent_span_id == CALLER_SPAN_ID.to_bytes(8, "big")
    [batch] = [s for s in spans if s.name == "summarizer.batch"]
    [article] = [s for s in spans if s.name == "summarizer.article"]
    assert any(link.span_id == batch.span_id for link in article.links)


@pytest.mark.parametrize(("environ", "exporters"), [
    ({}, ()),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ("otlp_proto_http",)),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp_proto_http",)),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp_proto_http",)),
    ({"OTEL_TRACES_EXPORTER": "console,otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     ("console", "otlp_proto_grpc")),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
    ({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"}, ()),
])
def test_tracing_is_off_unless_the_standard_variables_configure_it(environ, exporters) -> None:
    assert trace_exporters(environ) == exporters


def test_configured_without_the_extra_the_server_says_so_once_and_serves_untraced(
        monkeypatch, caplog) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setitem(sys.modules, "service.api.tracing", None)  # as if not installed
    with caplog.at_level(logging.WARNING):
        assert tracing_from_environment() is None
    [line] = [r.getMessage() for r in caplog.records]
    assert "summarizer[otel]" in line


def test_an_unknown_exporter_is_a_configuration_error(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin_json_nonexistent")
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        tracing_from_environment()


async def test_without_tracing_a_call_runs_through_the_no_op_tracer() -> None:
    engine = FakeEngine()
    async with serving(BASE, lambda s: engine) as (server, channel):
        assert server.tracing is None
        reply = await pb_grpc.SummarizerStub(channel).Summarize(
            request("plain"), metadata=TRACEPARENT, timeout=10)
    assert reply.results[0].summary == "S:plain"
