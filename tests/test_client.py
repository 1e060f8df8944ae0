"""The Python client library against real servers: typed results, retries, streaming bulk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from summarizer_client.client import (ArticleFailure, ArticleSummary, AsyncSummarizerClient,
                                      RetryPolicy, SummarizerClient, make_options)
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.api.server import SummarizerServer

from .conftest import server_in_thread, until
from .fakes import FakeEngine
from .test_grpc import BASE

FAST_RETRY = RetryPolicy(attempts=20, initial_backoff_s=0.05, max_backoff_s=0.2)


def articles(n: int, prefix: str = "art") -> list[tuple[str, str]]:
    return [(f"{prefix}-{i}", f"Article number {i} about something.") for i in range(n)]


def test_sync_client_returns_typed_results_and_in_band_failures() -> None:
    engine = FakeEngine()
    engine.fail_on = "poison"
    with server_in_thread(BASE, lambda s: engine) as port:
        with SummarizerClient(f"127.0.0.1:{port}") as client:
            results = client.summarize([("a", "a fine article"), ("b", "a poison pill")],
                                       make_options(outputs="summary", num_beams=1))
            info = client.model_info()
    fine, failed = results
    assert isinstance(fine, ArticleSummary) and fine.summary == "S:a fine artic"
    assert fine.headline == ""
    assert isinstance(failed, ArticleFailure) and failed.id == "b"
    assert failed.code == grpc.StatusCode.INTERNAL.value[0]
    assert info.engine == "fake"


def test_invalid_argument_is_never_retried() -> None:
    engine = FakeEngine()
    with server_in_thread(BASE, lambda s: engine) as port:
        with SummarizerClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            with pytest.raises(grpc.RpcError) as caught:
                client.summarize([("a", "   ")])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def unavailable_answers(server: SummarizerServer) -> float:
    return server.metrics.requests.labels("Summarize", "UNAVAILABLE")._value.get()


async def test_unavailable_is_retried_until_the_model_is_ready() -> None:
    server = SummarizerServer(BASE.replace(host="127.0.0.1", port=0), lambda s: FakeEngine())
    port = await server.listen()  # listening, model not loaded: UNAVAILABLE
    try:
        async with AsyncSummarizerClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            call = asyncio.ensure_future(client.summarize([("a", "patience pays")]))
            await until(lambda: unavailable_answers(server) >= 2)  # refused, then retried
            assert not call.done()
            await server.load()
            [result] = await asyncio.wait_for(call, 10)
        assert result.summary == "S:patience pay"
    finally:
        await server.stop(grace_s=1)


async def test_retries_stop_at_the_calls_time_budget() -> None:
    server = SummarizerServer(BASE.replace(host="127.0.0.1", port=0), lambda s: FakeEngine())
    port = await server.listen()  # never loads
    try:
        async with AsyncSummarizerClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await client.summarize([("a", "never")], timeout_s=0.8)
            assert time.monotonic() - started < 5
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(grace_s=1)


def test_retry_policy_backs_off_exponentially_with_bounded_jitter() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, multiplier=2, max_backoff_s=1.0, jitter=0.2)
    for retry, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        for _ in range(20):
            assert base * 0.8 <= policy.pause_s(retry) <= base * 1.2
    with pytest.raises(ValueError):
        RetryPolicy(attempts=0)


def test_summarize_many_streams_any_number_with_bounded_articles_in_flight() -> None:
    engine = FakeEngine()
    pulled = 0

    def source():
        nonlocal pulled
        for article in articles(300):
            pulled += 1
            yield article

    received: list[str] = []
    most_in_flight = 0
    with server_in_thread(BASE.replace(max_batch_size=4), lambda s: engine) as port:
        with SummarizerClient(f"127.0.0.1:{port}") as client:
            for result in client.summarize_many(source(), max_in_flight=10, request_size=4):
                assert isinstance(result, ArticleSummary)
                most_in_flight = max(most_in_flight, pulled - len(received))
                received.append(result.id)
    assert sorted(received) == sorted(i for i, _ in articles(300))
    assert len(set(received)) == 300
    assert most_in_flight <= 11, most_in_flight  # 10, +1 pulled between release and yield


class FlakyStreamServicer(pb_grpc.SummarizerServicer):
    """Breaks the first stream with UNAVAILABLE after a few results; serves the next fully."""

    def __init__(self, break_after: int) -> None:
        self.break_after = break_after
        self.streams: list[list[str]] = []

    async def SummarizeStream(self, request_iterator, context) -> AsyncIterator[pb.ArticleResult]:
        seen: list[str] = []
        self.streams.append(seen)
        first = len(self.streams) == 1
        sent = 0
        async for request in request_iterator:
            for article in request.articles:
                seen.append(article.id)
                if first and sent == self.break_after:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")
                sent += 1
                yield pb.ArticleResult(id=article.id, summary="S:" + article.text[:5],
                                       input_tokens=len(article.text))


async def test_a_broken_stream_is_resumed_with_only_the_unanswered_articles() -> None:
    servicer = FlakyStreamServicer(break_after=7)
    server = grpc.aio.server()
    pb_grpc.add_SummarizerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    received_first: set[str] = set()  # results the client had before the second stream
    ids: list[str] = []
    try:
        async with AsyncSummarizerClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            async for result in client.summarize_many(articles(40), max_in_flight=8, streams=1,
                                                      articles_per_stream=100,
                                                      request_size=3):
                if len(servicer.streams) == 1:
                    received_first.add(result.id)
                ids.append(result.id)
    finally:
        await server.stop(None)
    assert sorted(ids) == sorted(i for i, _ in articles(40)) and len(set(ids)) == 40
    assert len(servicer.streams) == 2
    assert received_first, "some results came back before the break"
    assert received_first.isdisjoint(servicer.streams[1]), "answered articles are not resent"
    assert set(servicer.streams[0]) - received_first <= set(servicer.streams[1])


async def test_async_summarize_many_takes_an_async_iterable() -> None:
    async def source() -> AsyncIterator[tuple[str, str]]:
        for article in articles(25, "async"):
            await asyncio.sleep(0)
            yield article

    with server_in_thread(BASE, lambda s: FakeEngine()) as port:
        async with AsyncSummarizerClient(f"127.0.0.1:{port}") as client:
            results = [r async for r in client.summarize_many(source(), max_in_flight=5)]
    assert sorted(r.id for r in results) == sorted(i for i, _ in articles(25, "async"))


def test_summarize_many_refuses_articles_without_ids() -> None:
    with server_in_thread(BASE, lambda s: FakeEngine()) as port:
        with SummarizerClient(f"127.0.0.1:{port}", retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises((ValueError, grpc.RpcError)):
                list(client.summarize_many([("", "no id")]))


class SyncFlakyStreamServicer(pb_grpc.SummarizerServicer):
    """The blocking twin of FlakyStreamServicer, for the blocking client."""

    def __init__(self, break_after: int) -> None:
        self.break_after = break_after
        self.streams: list[list[str]] = []

    def SummarizeStream(self, request_iterator, context):
        seen: list[str] = []
        self.streams.append(seen)
        first = len(self.streams) == 1
        sent = 0
        for request in request_iterator:
            for article in request.articles:
                seen.append(article.id)
                if first and sent == self.break_after:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "server restarting")
                sent += 1
                yield pb.ArticleResult(id=article.id, summary="S:" + article.text[:5],
                                       input_tokens=len(article.text))


def test_the_blocking_client_also_resumes_a_broken_stream() -> None:
    servicer = SyncFlakyStreamServicer(break_after=5)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SummarizerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    received_first: set[str] = set()
    ids: list[str] = []
    try:
        with SummarizerClient(f"127.0.0.1:{port}", retry=FAST_RETRY) as client:
            for result in client.summarize_many(articles(30), max_in_flight=6, request_size=2,
                                                streams=1, articles_per_stream=100):
                if len(servicer.streams) == 1:
                    received_first.add(result.id)
                ids.append(result.id)
    finally:
        server.stop(None)
    assert sorted(ids) == sorted(i for i, _ in articles(30)) and len(set(ids)) == 30
    assert len(servicer.streams) == 2
    assert received_first and received_first.isdisjoint(servicer.streams[1])


async def test_async_summarize_many_reports_a_duplicate_id_instead_of_hanging() -> None:
    with server_in_thread(BASE, lambda s: FakeEngine()) as port:
        async with AsyncSummarizerClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(ValueError, match="duplicate article id"):
                async for _ in client.summarize_many([("x", "one"), ("x", "two")],
                                                     max_in_flight=4, request_size=4):
                    pass


def test_blocking_summarize_many_reports_a_bad_source_instead_of_unknown() -> None:
    def source():
        yield "fine", "a fine article"
        raise ValueError("corpus line 2 is broken")

    with server_in_thread(BASE, lambda s: FakeEngine()) as port:
        with SummarizerClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(ValueError, match="corpus line 2 is broken"):
                list(client.summarize_many(source(), max_in_flight=4, request_size=1))
            with pytest.raises(ValueError, match="duplicate article id"):
                list(client.summarize_many([("x", "one"), ("x", "two")], request_size=4))


def test_a_failed_articles_code_prints_as_its_name() -> None:
    """Logged as `log.warning("%s: %s", id, code)`, a failure says INVALID_ARGUMENT, not 3; the
    code still equals the number, and a code this client does not know stays a number."""
    engine = FakeEngine()
    with server_in_thread(BASE, lambda s: engine) as port:
        with SummarizerClient(f"127.0.0.1:{port}") as client:
            [failure] = [r for r in client.summarize_many([("ok", "a fine article"),
                                                           ("empty", "   ")])
                         if isinstance(r, ArticleFailure)]
    assert failure.id == "empty" and failure.code == 3
    assert failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "%s %s" % (failure.id, failure.code) == "empty INVALID_ARGUMENT"  # noqa: UP031 - logging's style
    assert f"{failure.code}" == str(failure.code) == "INVALID_ARGUMENT"
    assert f"{failure.code:d}" == "3"
    assert str(ArticleFailure("x", 99, "from a newer server").code) == "99"


def test_the_blocking_client_raises_a_blocking_error_when_no_server_answers() -> None:
    """No asyncio type reaches blocking code: summarize_many runs on a private event loop, and
    its failure is raised as a plain grpc.RpcError with the call's status."""
    import socket

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
        with SummarizerClient(target, timeout_s=5, retry=RetryPolicy(attempts=1)) as client:
            with pytest.raises(grpc.RpcError) as streamed:
                list(client.summarize_many(articles(2)))
            with pytest.raises(grpc.RpcError) as unary:
                client.summarize(articles(1))
    for caught in (streamed, unary):
        assert not isinstance(caught.value, grpc.aio.AioRpcError)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    from summarizer_client import CallError

    assert isinstance(streamed.value, CallError) and streamed.value.details()
