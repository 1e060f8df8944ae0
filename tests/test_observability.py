"""Metrics scraped from the real endpoint during real traffic, and the request log lines."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.api.logs import JsonFormatter

from .conftest import serving, until
from .fakes import FakeEngine
from .test_grpc import BASE, occupy_worker, request


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    text = await asyncio.to_thread(fetch)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_endpoint_moves_with_real_traffic() -> None:
    engine = FakeEngine()
    engine.fail_on = "poison"
    settings = BASE.replace(metrics_port=-1, max_batch_size=4, max_wait_ms=0)  # any free port
    async with serving(settings, lambda s: engine) as (server, channel):
        port = server.metrics_port
        assert port
        stub = pb_grpc.SummarizerStub(channel)
        before = await scrape(port)
        assert value(before, "summarizer_model_load_seconds") > 0
        assert value(before, "summarizer_model_info",
                     engine="fake", summary_headline_model="fake/model",
                     summary_headline_family="bart", summary_headline_dtype="float32",
                     summary_headline_device="cpu") == 1.0
        assert value(before, "summarizer_requests_total", method="Summarize", code="OK") == 0

        await stub.Summarize(request("first article", "second, longer article"), timeout=10)
        await stub.Summarize(request("x" * 100, max_input_tokens=16,
                                     long_input=pb.LONG_INPUT_POLICY_TRUNCATE), timeout=10)
        partial = await stub.Summarize(request("fine", "poison pill"), timeout=10)
        assert partial.results[1].error.code == grpc.StatusCode.INTERNAL.value[0]
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Summarize(request("   "), timeout=10)

        # The queue-depth gauge is read at scrape time.
        engine.hold = threading.Event()
        held = await occupy_worker(stub, engine, "hold the worker")
        queued = asyncio.ensure_future(stub.Summarize(request("q1", "q2", "q3"), timeout=10))
        await until(lambda: server.core.batcher.queue_depth == 3)
        during = await scrape(port)
        assert value(during, "summarizer_queue_depth") == 3
        assert value(during, "summarizer_requests_in_flight", method="Summarize") == 2
        engine.hold.set()
        await asyncio.gather(held, queued)
        after = await scrape(port)

    assert value(after, "summarizer_requests_total", method="Summarize", code="OK") == 5
    assert value(after, "summarizer_requests_total", method="Summarize",
                 code="INVALID_ARGUMENT") == 1
    assert value(after, "summarizer_request_duration_seconds_count", method="Summarize") == 6
    assert value(after, "summarizer_queue_depth") == 0
    assert value(after, "summarizer_requests_in_flight", method="Summarize") == 0
    # 2 + 1 + 1 + 1 + 3 articles with results, one in-band failure.
    assert value(after, "summarizer_articles_total", outcome="ok") == 8
    assert value(after, "summarizer_articles_total", outcome="INTERNAL") == 1
    assert value(after, "summarizer_articles_truncated_total") == 1
    assert value(after, "summarizer_article_chunks_count") == 8
    assert value(after, "summarizer_article_chunks_bucket", le="1.0") == 8
    expected_input = (len("first article") + len("second, longer article") + 16 + len("fine")
                      + len("hold the worker") + 3 * 2)
    assert value(after, "summarizer_input_tokens_total") == expected_input
    assert value(after, "summarizer_output_tokens_total", output="summary") == 8 * 20
    assert value(after, "summarizer_isolated_failures_total") == 1
    assert value(after, "summarizer_failed_engine_calls_total") == 2  # the pair, then alone
    batches = value(after, "summarizer_batch_size_count")
    assert batches == len(engine.batches) - 2, "failed tries are not counted as batches"
    assert value(after, "summarizer_batch_size_sum") == 8
    assert value(after, "summarizer_queue_wait_seconds_count") == 8
    assert value(after, "summarizer_batch_padding_ratio_count") == batches


async def test_one_info_line_per_call_with_its_figures_and_the_callers_request_id(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.api.servicer")
    async with serving(BASE, lambda s: FakeEngine(window=8)) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        call = stub.Summarize(request("secret article body", "another",
                                      long_input=pb.LONG_INPUT_POLICY_TRUNCATE), timeout=10,
                              metadata=(("x-request-id", "trace-42"),))
        await call
        assert dict(await call.trailing_metadata())["x-request-id"] == "trace-42"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request(""), timeout=10)
        generated_id = dict(caught.value.trailing_metadata())["x-request-id"]
    lines = [r for r in caplog.records
             if r.name == "service.api.servicer" and hasattr(r, "request")]
    assert len(lines) == 2
    ok, bad = (r.request for r in lines)
    assert ok["request_id"] == "trace-42" and ok["status"] == "OK"
    assert (ok["articles"], ok["failed"], ok["truncated"], ok["input_tokens"]) == (2, 0, 1, 15)
    assert ok["output_tokens"] == 2 * (20 + 8) and ok["latency_ms"] >= 0
    assert bad["status"] == "INVALID_ARGUMENT" and bad["request_id"] == generated_id
    assert len(generated_id) == 16
    assert "secret article body" not in caplog.text
    assert all(r.levelno == logging.INFO for r in lines)

    entry = json.loads(JsonFormatter().format(lines[0]))
    assert entry["level"] == "INFO" and entry["logger"] == "service.api.servicer"
    assert entry["request_id"] == "trace-42" and entry["status"] == "OK"
    assert entry["input_tokens"] == 15 and "time" in entry


def test_json_log_lines_carry_exceptions_as_a_field() -> None:
    try:
        raise ValueError("broken engine")
    except ValueError:
        record = logging.LogRecord("service.serving.batcher", logging.ERROR, __file__, 1,
                                   "input failed on its own (%s)", ("ValueError",),
                                   exc_info=sys.exc_info())
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "input failed on its own (ValueError)"
    assert "ValueError: broken engine" in entry["exception"]
