"""Priority classes end to end, over real gRPC (server on a free port, fake engine): the request
field, the server default, per-token defaults and ceilings, GetModelInfo, the clients and CLI,
overload shedding bulk first, and the class in metrics and the access log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service import cli
from service.api.server import SummarizerServer, default_engine_factory
from service.config import Settings
from service.domain import Priority
from service.errors import ConfigError
from service.api.priority import PriorityRules, TokenClasses, parse_token_line
from summarizer_client.client import (ArticleFailure, ArticleSummary, AsyncSummarizerClient,
                                      RetryPolicy, SummarizerClient)
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .conftest import serving, until
from .fakes import FakeEngine
from .test_grpc import BASE, request

pytestmark = pytest.mark.timeout(30)
INT, DEF, BLK = Priority.INTERACTIVE, Priority.DEFAULT, Priority.BULK
BULK_TOKEN, NEWS_TOKEN, PLAIN_TOKEN = "backfill-token", "newsroom-token", "plain-token"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def admitted(server: SummarizerServer, priority: Priority) -> int:
    return server.core.batcher.stats.admitted_by_priority[priority]


def sample(server: SummarizerServer, name: str, **labels: str) -> float | None:
    return server.metrics.registry.get_sample_value(name, labels)


# ----- the request field and the server's default -----

async def test_a_request_runs_in_the_class_it_asks_for_else_the_servers_default() -> None:
    async with serving(BASE.replace(default_priority="bulk"), lambda s: FakeEngine()) as (
            server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        await stub.Summarize(request("unspecified"), timeout=10)
        assert admitted(server, BLK) == 1
        asked = request("interactive")
        asked.priority = pb.PRIORITY_INTERACTIVE
        await stub.Summarize(asked, timeout=10)
        assert admitted(server, INT) == 1
        unknown = request("from a newer client")
        unknown.priority = 99  # an enum value this server does not know: the default
        await stub.Summarize(unknown, timeout=10)
        assert admitted(server, BLK) == 2
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        assert info.scheduling.default_priority == pb.PRIORITY_BULK
        assert info.scheduling.max_priority == pb.PRIORITY_INTERACTIVE


async def test_get_model_info_reports_the_classes_settings() -> None:
    settings = BASE.replace(max_queue=300, max_queue_bulk=200, max_queue_default=250,
                            starvation_bound=6, small_bulk_batch=3)
    async with serving(settings, lambda s: FakeEngine()) as (_, channel):
        info = await pb_grpc.SummarizerStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                  timeout=10)
    scheduling = info.scheduling
    assert [(c.priority, c.max_queue) for c in scheduling.classes] == [
        (pb.PRIORITY_INTERACTIVE, 300), (pb.PRIORITY_DEFAULT, 250), (pb.PRIORITY_BULK, 200)]
    assert scheduling.default_priority == pb.PRIORITY_DEFAULT
    assert (scheduling.starvation_bound, scheduling.small_bulk_batch,
            scheduling.interactive_headroom) == (6, 3, 0)  # static batching: no headroom


# ----- per-token defaults and ceilings -----

@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# classes per token\n{BULK_TOKEN} default=bulk ceiling=bulk\n"
                    f"{NEWS_TOKEN}  default=interactive\n{PLAIN_TOKEN}\n")
    return path


async def test_a_token_cannot_ask_above_its_ceiling_and_has_its_own_default(
        tokens_file: Path) -> None:
    engine = FakeEngine()
    settings = BASE.replace(auth_tokens_file=str(tokens_file))
    async with serving(settings, lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        urgent = request("a back-fill that wants to jump the queue")
        urgent.priority = pb.PRIORITY_INTERACTIVE
        for priority in (pb.PRIORITY_INTERACTIVE, pb.PRIORITY_DEFAULT):
            urgent.priority = priority
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Summarize(urgent, timeout=10, metadata=bearer(BULK_TOKEN))
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "BULK at most" in caught.value.details()
        stream = stub.SummarizeStream(metadata=bearer(BULK_TOKEN))
        await stream.write(urgent)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stream.read()
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert engine.batches == [], "refused before any model work"

        await stub.Summarize(request("back-fill"), timeout=10, metadata=bearer(BULK_TOKEN))
        await stub.Summarize(request("newsroom"), timeout=10, metadata=bearer(NEWS_TOKEN))
        await stub.Summarize(request("plain"), timeout=10, metadata=bearer(PLAIN_TOKEN))
        assert [admitted(server, p) for p in (INT, DEF, BLK)] == [1, 1, 1]

        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10,
                                       metadata=bearer(BULK_TOKEN))
        assert (info.scheduling.default_priority, info.scheduling.max_priority) == (
            pb.PRIORITY_BULK, pb.PRIORITY_BULK)
        assert sample(server, "summarizer_priority_requests_total", method="Summarize",
                      priority="bulk", code="OK") == 1


def test_token_lines_are_checked_when_the_server_starts() -> None:
    assert parse_token_line("t default=bulk", "line 1") == ("t", TokenClasses(BLK, INT))
    assert parse_token_line("t ceiling=default", "line 1") == ("t", TokenClasses(None, DEF))
    for line, message in (("t default=urgent", "not a class"),
                          ("t default=interactive ceiling=bulk", "more urgent than"),
                          ("t owner=me", "one printable word"),
                          ("t default=bulk default=bulk", "one printable word")):
        with pytest.raises(ConfigError, match=message):
            parse_token_line(line, "line 1")


def test_a_tokens_default_is_never_above_its_ceiling() -> None:
    rules = PriorityRules(INT, {"capped": TokenClasses(None, DEF)})
    assert rules.caller(bearer("capped")).default is DEF  # the server's INTERACTIVE, capped
    assert rules.caller(bearer("unknown")).default is INT
    assert rules.resolve(BLK, bearer("capped")) is BLK


# ----- streams -----

async def test_a_streams_class_is_set_by_its_first_request() -> None:
    async with serving(BASE, lambda s: FakeEngine()) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        first = request("one", ids=["s1"])
        first.priority = pb.PRIORITY_INTERACTIVE
        second = request("two", ids=["s2"])  # unspecified: the stream's class
        stream = stub.SummarizeStream(iter([first, second]), timeout=10)
        assert sorted([r.id async for r in stream]) == ["s1", "s2"]
        assert admitted(server, INT) == 2
        other = request("three", ids=["s3"])
        other.priority = pb.PRIORITY_BULK
        stream = stub.SummarizeStream(iter([first, other]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stream:
                pass
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "one class" in caught.value.details()


# ----- clients and CLI -----

@contextlib.contextmanager
def server_thread(settings: Settings, engine: FakeEngine) -> Iterator[tuple[int, SummarizerServer]]:
    """A real server on its own event loop in a thread (for the blocking client and the CLI),
    and the server object, to read its counters."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    made: list[tuple[int, SummarizerServer]] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = SummarizerServer(
            settings.replace(host="127.0.0.1", port=0, check_invariants=True), lambda s: engine)
        made.append((loop.run_until_complete(server.start()), server))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    port, server = made[0]
    try:
        yield port, server
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(grace_s=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_the_clients_and_the_cli_send_the_class(tmp_path: Path) -> None:
    corpus, output = tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    corpus.write_text(json.dumps({"id": "c1", "text": "corpus text"}) + "\n")
    text_file = tmp_path / "one.txt"
    text_file.write_text("a file, sent interactive")
    with server_thread(BASE, FakeEngine()) as (port, server):
        target = f"127.0.0.1:{port}"
        with SummarizerClient(target, timeout_s=10) as client:
            client.summarize([("a", "interactive text")], priority="interactive")
            list(client.summarize_many([("m1", "bulk text")], priority="bulk"))
            with pytest.raises(ValueError, match="priority must be one of"):
                client.summarize([("a", "x")], priority="urgent")

        async def asynchronous() -> None:
            async with AsyncSummarizerClient(target, timeout_s=10) as client:
                await client.summarize([("b", "default text")], priority="default")

        asyncio.run(asynchronous())
        assert cli.main(["summarize", "--server", target, "--input", str(corpus),
                         "--output", str(output)]) == 0
        assert cli.main(["summarize", "--server", target, "--priority", "interactive",
                         str(text_file)]) == 0
        assert cli.main(["summarize", "--server", target, str(text_file)]) == 0
        counts = [admitted(server, p) for p in (INT, DEF, BLK)]
    # 2 interactive (client, CLI), 2 default (async client, CLI unasked), 2 bulk (client, and
    # the bulk runner's own default).
    assert counts == [2, 2, 2]


# ----- overload -----

async def test_overload_sheds_bulk_first_and_every_interactive_call_succeeds() -> None:
    """--max-queue 24: 64 concurrent BULK calls and 12 INTERACTIVE ones. Every interactive call
    succeeds; a bulk call gets OK or RESOURCE_EXHAUSTED, nothing else.

    The bulk calls come over 4 connections of 16 calls and the interactive ones over a fifth,
    as from several clients (or the Python client, which keeps INTERACTIVE calls on a
    connection of their own): the server allows --max-streams-per-connection (20) calls open
    on one connection, and a client queues the rest inside its transport, where no priority
    reaches them (tests/test_client.py checks the client)."""
    engine = FakeEngine()
    engine.hold = threading.Event()
    settings = BASE.replace(max_queue=24, max_articles_per_request=8, max_batch_size=4)
    async with serving(settings, lambda s: engine) as (server, channel):
        target = f"127.0.0.1:{server.port}"
        channels = [grpc.aio.insecure_channel(target, options=[
            ("grpc.use_local_subchannel_pool", 1)]) for _ in range(5)]  # 5 connections
        stubs = [pb_grpc.SummarizerStub(c) for c in channels]

        async def call(text: str, priority: int) -> grpc.StatusCode:
            message = request(text)
            message.priority = priority
            stub = stubs[4] if priority == pb.PRIORITY_INTERACTIVE else stubs[int(text[-2:]) % 4]
            try:
                await stub.Summarize(message, timeout=20)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        bulk = [asyncio.ensure_future(call(f"bulk {n:02d}", pb.PRIORITY_BULK))
                for n in range(64)]
        batcher = server.core.batcher
        # The worker holds its first batch (1 to 4 articles, as they arrived); the queue fills
        # with bulk work, the rest is refused.
        await until(lambda: batcher.queue_depth == 24 and batcher.running > 0
                     and sum(f.done() for f in bulk) == 64 - 24 - batcher.running)
        held = batcher.running
        urgent = [asyncio.ensure_future(call(f"urgent {n:02d}", pb.PRIORITY_INTERACTIVE))
                  for n in range(12)]
        await until(lambda: batcher.queue_depth_of(INT) == 12)
        engine.hold.set()
        urgent_codes = await asyncio.wait_for(asyncio.gather(*urgent), 20)
        bulk_codes = await asyncio.wait_for(asyncio.gather(*bulk), 20)
        assert urgent_codes == [grpc.StatusCode.OK] * 12
        assert set(bulk_codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        # The held batch ran, 12 stayed queued; the rest were refused, and 12 displaced.
        assert bulk_codes.count(grpc.StatusCode.OK) == held + 12
        stats = batcher.stats
        assert stats.refused_by_priority[BLK] == 64 - 24 - held
        assert stats.displaced_by_priority[BLK] == 12
        assert stats.refused_by_priority[INT] == 0
        assert sample(server, "summarizer_priority_articles_displaced_total",
                      priority="bulk") == 12
        assert sample(server, "summarizer_priority_requests_total", method="Summarize",
                      priority="bulk", code="RESOURCE_EXHAUSTED") == 64 - held - 12
        for each in channels:
            await each.close()
    # The interactive articles ran before the bulk work still queued.
    texts = [t for batch in engine.batches[1:] for t in batch]
    last_urgent = max(i for i, t in enumerate(texts) if t.startswith("urgent"))
    first_bulk = min(i for i, t in enumerate(texts) if t.startswith("bulk"))
    assert last_urgent < first_bulk


async def test_the_client_sends_interactive_calls_past_bulk_calls_waiting_for_a_stream() -> None:
    """--max-streams-per-connection 2: four bulk calls fill the client's connection (two open,
    held by the engine, two waiting inside the client's transport for a stream); an interactive
    call from the same client still reaches the server's queue at once, over its own
    connection."""
    engine = FakeEngine()
    engine.hold = threading.Event()
    settings = BASE.replace(max_streams_per_connection=2, max_batch_size=1)
    async with serving(settings, lambda s: engine) as (server, _):
        batcher = server.core.batcher
        async with AsyncSummarizerClient(f"127.0.0.1:{server.port}", timeout_s=20) as client:
            bulk = [asyncio.ensure_future(client.summarize([(f"b{n}", f"bulk {n}")],
                                                           priority="bulk"))
                    for n in range(4)]
            await until(lambda: batcher.running + batcher.queue_depth == 2,
                        what="two bulk calls at the server")
            urgent = asyncio.ensure_future(client.summarize([("u", "urgent")],
                                                            priority="interactive"))
            await until(lambda: batcher.queue_depth_of(INT) == 1, timeout_s=10,
                        what="the interactive call at the server, the bulk ones still waiting")
            assert batcher.running + batcher.queue_depth == 3  # 2 bulk still in the client
            engine.hold.set()
            assert [r.id for r in await asyncio.wait_for(urgent, 20)] == ["u"]
            assert len(await asyncio.wait_for(asyncio.gather(*bulk), 20)) == 4



@pytest.mark.parametrize("attempts", [3, 1])
async def test_summarize_many_sends_displaced_articles_again(attempts: int) -> None:
    """--max-queue 8: a BULK summarize_many of 12 articles (two streams) fills the queue behind
    the batch the engine holds, 2 more waiting for room; an INTERACTIVE call of 4 displaces 4 of
    them, which the stream answers RESOURCE_EXHAUSTED. The client sends those again after its
    backoff and every article comes back summarised; with retries off (attempts 1) the 4
    failures reach the caller."""
    engine = FakeEngine()
    engine.hold = threading.Event()
    settings = BASE.replace(max_queue=8, max_articles_per_request=8, max_batch_size=2)
    async with serving(settings, lambda s: engine) as (server, _):
        batcher = server.core.batcher
        retry = RetryPolicy(attempts=attempts, initial_backoff_s=0.05)
        async with AsyncSummarizerClient(f"127.0.0.1:{server.port}", timeout_s=20,
                                         retry=retry) as client:
            ids = [f"b{n:02d}" for n in range(12)]
            run = client.summarize_many([(i, f"bulk {i}") for i in ids], priority="bulk",
                                        streams=2, max_in_flight=12, request_size=4)
            results: list[ArticleSummary | ArticleFailure] = []

            async def collect() -> None:
                async for result in run:
                    results.append(result)

            collecting = asyncio.ensure_future(collect())
            await until(lambda: batcher.running == 2 and batcher.queue_depth == 8,
                        what="the held batch running and the queue full of bulk work")
            urgent = asyncio.ensure_future(client.summarize(
                [(f"u{n}", f"urgent {n}") for n in range(4)], priority="interactive"))
            await until(lambda: batcher.queue_depth_of(INT) == 4,
                        what="the interactive articles queued, displacing bulk ones")
            engine.hold.set()
            assert len(await asyncio.wait_for(urgent, 20)) == 4
            await asyncio.wait_for(collecting, 20)
    assert batcher.stats.displaced_by_priority[BLK] == 4
    assert sorted(r.id for r in results) == ids  # each once
    failed = [r for r in results if isinstance(r, ArticleFailure)]
    if attempts > 1:
        assert failed == []
        assert sum(t.startswith("bulk") for b in engine.batches for t in b) == 12
    else:
        assert len(failed) == 4
        assert {r.code for r in failed} == {8}  # RESOURCE_EXHAUSTED


# ----- seen from outside -----

async def test_the_class_is_in_the_access_log_line_and_the_metrics(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.api.servicer")
    async with serving(BASE, lambda s: FakeEngine()) as (server, channel):
        message = request("logged")
        message.priority = pb.PRIORITY_INTERACTIVE
        await pb_grpc.SummarizerStub(channel).Summarize(message, timeout=10)
        assert sample(server, "summarizer_priority_queue_wait_seconds_count",
                      priority="interactive") == 1
        assert sample(server, "summarizer_priority_request_duration_seconds_count",
                      method="Summarize", priority="interactive") == 1
        assert sample(server, "summarizer_priority_articles_admitted_total",
                      priority="interactive") == 1
        assert sample(server, "summarizer_priority_queue_depth", priority="bulk") == 0
        # The totals keep their names and labels.
        assert sample(server, "summarizer_queue_wait_seconds_count") == 1
        assert sample(server, "summarizer_requests_total", method="Summarize", code="OK") == 1
    lines = [r for r in caplog.records if getattr(r, "request", {}).get("method") == "Summarize"]
    assert len(lines) == 1
    assert "priority=interactive" in lines[0].getMessage()
    assert lines[0].request["priority"] == "interactive"


# ----- continuous batching through an engine worker process -----

async def test_bulk_articles_sit_steps_out_in_the_worker_while_interactive_ones_decode() -> None:
    """The default deployment (a worker process per engine): the policy's pauses cross the
    worker's pipe, the bulk article still finishes, and the interactive one never pauses."""
    settings = BASE.replace(model="fake/model", workers=1, batching="continuous",
                            worker_engine="tests.priority_engines:pausing", starvation_bound=3)
    async with serving(settings, default_engine_factory) as (server, channel):
        assert server.batching == "continuous" and server.workers is not None
        stub = pb_grpc.SummarizerStub(channel)
        long_options = dict(summary_max_tokens=60, headline_max_tokens=4)
        bulk = request("a long back-fill article", **long_options)
        bulk.priority = pb.PRIORITY_BULK
        bulk_call = asyncio.ensure_future(stub.Summarize(bulk, timeout=30))
        await until(lambda: any(s.active for s in server.core.batcher.last_steps()))
        urgent = request("an editor waits", summary_max_tokens=8, headline_max_tokens=4)
        urgent.priority = pb.PRIORITY_INTERACTIVE
        urgent_reply = await stub.Summarize(urgent, timeout=30)
        bulk_reply = await bulk_call
        paused_steps = sample(server, "summarizer_priority_paused_steps_total", priority="bulk")
    assert urgent_reply.results[0].summary.endswith("|paused=0")
    bulk_paused = int(bulk_reply.results[0].summary.rsplit("|paused=", 1)[1])
    # The interactive article decoded 8 steps; the bulk one sat out (most of) them.
    assert bulk_paused >= 4 and paused_steps == bulk_paused


async def test_the_class_is_on_the_trace_spans() -> None:
    from .test_tracing import Traced

    traced = Traced()
    async with serving(BASE, lambda s: FakeEngine(), tracing=traced.tracing) as (_, channel):
        message = request("traced")
        message.priority = pb.PRIORITY_BULK
        await pb_grpc.SummarizerStub(channel).Summarize(message, timeout=10)
    for name in ("summarizer.prepare", "summarizer.queue_wait", "summarizer.batch"):
        [span] = traced.named(name)
        assert span.attributes["summarizer.priority"] == "bulk", name


async def test_bulk_completes_while_interactive_calls_arrive_back_to_back() -> None:
    """Three callers send interactive calls back to back, so interactive work is always queued
    when the worker asks for more; a bulk call still completes, within the starvation bound."""
    engine = FakeEngine()
    engine.batch_delay_s = 0.01
    settings = BASE.replace(max_batch_size=1, starvation_bound=4)
    async with serving(settings, lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        stop = asyncio.Event()
        answered = [0]

        async def editor(name: str) -> None:
            message = request(f"urgent {name}")
            message.priority = pb.PRIORITY_INTERACTIVE
            while not stop.is_set():
                await stub.Summarize(message, timeout=10)
                answered[0] += 1

        editors = [asyncio.ensure_future(editor(str(n))) for n in range(3)]
        await until(lambda: answered[0] >= 6)
        bulk = request("the back-fill", "goes on", ids=["b1", "b2"])
        bulk.priority = pb.PRIORITY_BULK
        reply = await asyncio.wait_for(stub.Summarize(bulk, timeout=10), 10)
        at_bulk_done = answered[0]
        await until(lambda: answered[0] >= at_bulk_done + 3)  # the editors were still busy
        stop.set()
        await asyncio.gather(*editors)
    assert [r.summary for r in reply.results] == ["S:the back-fil", "S:goes on"]
    texts = [batch[0] for batch in engine.batches]
    # The two bulk articles ran at most 4 batches apart (starvation_bound), however much
    # interactive work was queued.
    assert abs(texts.index("goes on") - texts.index("the back-fill")) <= 4
