"""Continuous batching end to end: a real server on a real socket, the fake stepping engine in
process (no torch). How `--batching` is decided: tests/test_batching_mode.py."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from service.api.server import SummarizerServer
from service.config import Settings
from service.errors import ConfigError
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .conftest import serving, until
from .fakes import FakeEngine, FakeSteppingEngine

BASE = Settings(model="fake/model", max_batch_tokens=0, batching="continuous")


def request(*texts: str, **options: float) -> pb.SummarizeRequest:
    return pb.SummarizeRequest(articles=[pb.Article(id=f"a{i}", text=t)
                                         for i, t in enumerate(texts)],
                               options=pb.GenerationOptions(**options))




async def test_concurrent_calls_with_different_options_share_steps_and_never_cross() -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    async with serving(BASE, lambda s: engine) as (server, channel):
        assert server.batching == "continuous"
        stub = pb_grpc.SummarizerStub(channel)
        long_call = asyncio.ensure_future(stub.Summarize(
            request("a long one, 30 tokens", summary_max_tokens=30, headline_max_tokens=30),
            timeout=20))
        await until(engine.started.is_set)  # the long call is decoding, held
        calls = [asyncio.ensure_future(stub.Summarize(
            request(f"caller {n} text", f"caller {n} more", summary_max_tokens=3 + n,
                    headline_max_tokens=2, num_beams=1 + n % 3), timeout=20)) for n in range(6)]
        await until(lambda: server.core.batcher.queue_depth == 12)
        engine.hold.set()
        replies = await asyncio.gather(*calls)
        assert not long_call.done(), "the short calls waited for the long one"
        long_reply = await long_call
        registry = server.metrics.registry
        steps = registry.get_sample_value("summarizer_decode_steps_total")
        waits = registry.get_sample_value("summarizer_queue_wait_seconds_count")
        ok = registry.get_sample_value("summarizer_articles_total", {"outcome": "ok"})
    for n, reply in enumerate(replies):
        assert [r.summary for r in reply.results] == [
            "S:" + f"caller {n} text"[:12], "S:" + f"caller {n} more"[:12]]
        assert [r.summary_tokens for r in reply.results] == [3 + n, 3 + n]
    assert long_reply.results[0].summary == "S:a long one, " and \
        long_reply.results[0].summary_tokens == 30
    # Articles with six different option sets decoded in the same steps as the long one.
    long_ticket = next(t for t, x in engine.texts.items() if x.startswith("a long one"))
    shared = max(len(s) for s in engine.steps if long_ticket in s)
    assert shared == 13
    assert steps == len(engine.steps) == 30
    assert waits == 13 and ok == 13


async def test_an_article_too_large_for_the_cache_is_resource_exhausted() -> None:
    engine = FakeSteppingEngine(budget_bytes=300)
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        # 4 x (40 + 5) bytes fit in 300; 4 x (40 + 60) do not, ever.
        reply = await stub.Summarize(request("short", "a much longer article than the budget "
                                             "allows with these beams", num_beams=4,
                                             summary_max_tokens=40, headline_max_tokens=4),
                                     timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request("a much longer article than the budget allows",
                                         num_beams=8, summary_max_tokens=40), timeout=10)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "more cache than the whole budget" in caught.value.details()
    small, large = reply.results
    assert small.summary == "S:short" and not small.HasField("error")
    assert large.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "more cache than the whole budget" in large.error.message


async def test_a_call_whose_client_gives_up_leaves_the_session_at_the_next_step() -> None:
    engine = FakeSteppingEngine()
    engine.step_delay_s = 0.01
    async with serving(BASE, lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request("gives up early", summary_max_tokens=400,
                                         headline_max_tokens=4), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await until(lambda: engine.removed)
        await until(lambda: server.core.batcher.running == 0)
        steps_then = len(engine.steps)
        reply = await stub.Summarize(request("after it"), timeout=10)
    assert reply.results[0].summary == "S:after it"
    assert len(engine.steps) < steps_then + 25  # the abandoned one did not decode on
    assert not engine.sessions[0].active


async def test_continuous_with_an_engine_that_cannot_step_is_refused_at_start() -> None:
    server = SummarizerServer(BASE.replace(host="127.0.0.1", port=0), lambda s: FakeEngine())
    try:
        with pytest.raises(ConfigError, match="fake engine cannot batch continuously for bart"):
            await server.start()
    finally:
        await server.stop(grace_s=0)
