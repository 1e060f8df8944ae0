"""Articles longer than the window over gRPC: TRUNCATE and CHUNK, the caps, scheduling of chunks
beside other callers' work, deadlines, cancellation; a tiny checkpoint end to end."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from pathlib import Path

import grpc
import pytest

from service.config import Settings
from service.engines.torch_engine import TorchEngine
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import training_text

from .conftest import serving, until
from .fakes import FakeEngine
from .test_grpc import BASE, occupy_worker, request

CHUNK = pb.LONG_INPUT_POLICY_CHUNK
TRUNCATE = pb.LONG_INPUT_POLICY_TRUNCATE


def long_article(sentences: int, tag: str = "L") -> str:
    """Sentences of about 40 characters: with the fake engine's 64-character window, each chunk
    holds exactly one of them."""
    return " ".join(f"{tag} sentence {i:02d} says something here." for i in range(sentences))


def generated(engine: FakeEngine) -> list[str]:
    return [text for batch in engine.batches for text in batch]


async def test_chunk_reads_every_sentence_of_a_long_article() -> None:
    engine = FakeEngine()
    text = long_article(12)
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(text, long_input=CHUNK), timeout=10)
    [result] = reply.results
    assert (result.chunks, result.truncated) == (12, False)
    # The map pass read every sentence, each chunk within the window.
    chunks = [t for t in generated(engine) if t.startswith("L sentence")]
    assert chunks == [f"L sentence {i:02d} says something here." for i in range(12)]
    assert result.input_tokens == sum(map(len, chunks))
    # The final summary summarises the chunk summaries ("S:" + 12 characters each), joined.
    assert result.summary.startswith("S:S:")
    assert all(len(t) <= 64 for t in generated(engine))


async def test_chunk_and_truncate_agree_on_an_article_that_fits() -> None:
    engine = FakeEngine()
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        chunked = await stub.Summarize(request("Fits the window.", long_input=CHUNK))
        truncated = await stub.Summarize(request("Fits the window.", long_input=TRUNCATE))
    assert chunked == truncated
    assert chunked.results[0].chunks == 1 and not chunked.results[0].truncated


async def test_the_server_default_policy_applies_when_a_request_leaves_it_unset() -> None:
    engine = FakeEngine()
    text = long_article(5)
    async with serving(BASE.replace(long_input="truncate"), lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        default = await stub.Summarize(request(text), timeout=10)
        chunked = await stub.Summarize(request(text, long_input=CHUNK), timeout=10)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (default.results[0].chunks, default.results[0].truncated) == (1, True)
    assert (chunked.results[0].chunks, chunked.results[0].truncated) == (5, False)
    assert info.default_options.long_input == TRUNCATE
    assert (info.limits.max_chunks_per_article, info.limits.max_chunk_depth) == (64, 3)


@pytest.mark.parametrize(("source", "headline"), [
    ("summary", "H:S:S:L "),         # the final summary
    ("opening+summary", "H:L sent"),  # the article's opening sentences, then the summary
])
async def test_headline_of_a_chunked_article_follows_the_manifest(source: str,
                                                                  headline: str) -> None:
    engine = FakeEngine()
    engine.models = [dataclasses.replace(engine.models[0], chunked_headline=source)]
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(long_article(4), long_input=CHUNK), timeout=10)
    assert reply.results[0].headline == headline


async def test_outputs_apply_to_chunked_articles() -> None:
    engine = FakeEngine()
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        summary = await stub.Summarize(request(long_article(4), long_input=CHUNK,
                                               outputs=pb.OUTPUTS_SUMMARY), timeout=10)
        headline = await stub.Summarize(request(long_article(4), long_input=CHUNK,
                                                outputs=pb.OUTPUTS_HEADLINE), timeout=10)
    assert summary.results[0].summary and not summary.results[0].headline
    assert headline.results[0].headline and not headline.results[0].summary
    assert headline.results[0].summary_tokens == 0


class BlankSummaries(FakeEngine):
    """Writes empty summaries, as a model may: the reduce pass then has nothing to chunk."""

    def generate(self, params, batch):
        return [dataclasses.replace(g, summary="") for g in super().generate(params, batch)]


async def test_a_chunked_article_whose_chunk_summaries_are_blank_still_finishes() -> None:
    engine = BlankSummaries()
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(long_article(5), long_input=CHUNK), timeout=10)
    assert (reply.results[0].chunks, reply.results[0].summary) == (5, "")


async def test_summaries_that_do_not_converge_are_cut_and_flagged() -> None:
    # A 20-character window: two 14-character chunk summaries never fit one window.
    engine = FakeEngine(window=20)
    async with serving(BASE, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request("a much longer article text", long_input=CHUNK))
    assert (reply.results[0].chunks, reply.results[0].truncated) == (2, True)


@pytest.mark.parametrize(("depth", "truncated"), [(0, True), (3, False)])
async def test_the_depth_cap_limits_reduce_passes(depth: int, truncated: bool) -> None:
    engine = FakeEngine()
    async with serving(BASE.replace(max_chunk_depth=depth), lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        reply = await stub.Summarize(request(long_article(40), long_input=CHUNK), timeout=20)
    assert (reply.results[0].chunks, reply.results[0].truncated) == (40, truncated)


async def test_a_megabyte_article_is_refused_with_a_clear_error_before_any_work() -> None:
    engine = FakeEngine()
    text = long_article(28_000)
    assert len(text) > 1_000_000
    settings = BASE.replace(max_article_chars=2_000_000, max_message_bytes=4 * 1024 * 1024)
    async with serving(settings, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request(text, long_input=CHUNK), timeout=20)
        truncated = await stub.Summarize(request(text, long_input=TRUNCATE), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details().startswith(
        "articles.text (article 0, id 'a0'): too long to summarise in chunks: it needs more than "
        "64 chunks of the model's 64-token window (--max-chunks-per-article)")
    assert "LONG_INPUT_POLICY_TRUNCATE" in caught.value.details()
    assert truncated.results[0].truncated
    assert len(engine.batches) == 1  # only the truncated call reached the model


async def test_a_megabyte_article_is_refused_by_the_default_size_limit() -> None:
    engine = FakeEngine()
    async with serving(BASE.replace(max_article_chars=100_000), lambda s: engine) as (
            _, channel):
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request("x" * 1_000_000, long_input=CHUNK), timeout=20)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert "1000000 characters, over the server's limit of 100000 (its --max-article-chars)" in (
        details)
    # What to do about it, and that asking for truncation is not the way out.
    assert "split the article into parts of at most 100000 characters" in details
    assert "LONG_INPUT_POLICY_TRUNCATE does not help" in details


async def test_a_request_whose_chunks_overflow_the_queue_is_refused() -> None:
    engine = FakeEngine()
    settings = BASE.replace(max_queue=20, max_articles_per_request=20)
    async with serving(settings, lambda s: engine) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as too_many:
            await stub.Summarize(request(long_article(15), long_article(15), long_input=CHUNK))
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await stub.Summarize(request(long_article(21), long_input=CHUNK))
    assert "make 30 model inputs, more than the server's queue holds (20)" in (
        too_many.value.details())
    assert "needs more than 20 chunks" in too_long.value.details()
    assert engine.batches == []


async def test_a_40_chunk_article_holds_single_article_callers_back_one_batch_at_most() -> None:
    engine = FakeEngine()
    engine.hold = threading.Event()
    settings = BASE.replace(max_batch_size=4, max_wait_ms=0)
    async with serving(settings, lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        running = await occupy_worker(stub, engine, "running")
        long_call = asyncio.ensure_future(
            stub.Summarize(request(long_article(40), long_input=CHUNK), timeout=30))
        await until(lambda: server.core.batcher.queue_depth == 40)
        singles = [asyncio.ensure_future(stub.Summarize(request(f"single {n}"), timeout=30))
                   for n in range(3)]
        await until(lambda: server.core.batcher.queue_depth == 43)
        engine.hold.set()
        replies = await asyncio.gather(*singles)
        long_reply = await long_call
        await running
    assert [r.results[0].summary for r in replies] == [f"S:single {n}" for n in range(3)]
    assert long_reply.results[0].chunks == 40
    batches = engine.batches[1:]  # after the one that was running
    first = next(i for i, b in enumerate(batches) if any(t.startswith("single") for t in b))
    assert first <= 1, batches[:first]
    assert sorted(batches[first]) == ["single 0", "single 1", "single 2"]
    # The chunks themselves were batched (with each other) to the full batch size.
    assert max(len(b) for b in batches if b[0].startswith("L sentence")) == 4


@pytest.mark.parametrize("gone", ["deadline", "cancelled"])
async def test_a_caller_gone_drops_every_chunk_of_its_article(gone: str) -> None:
    engine = FakeEngine()
    engine.hold = threading.Event()
    async with serving(BASE.replace(max_batch_size=2), lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        running = await occupy_worker(stub, engine, "running")
        if gone == "deadline":
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Summarize(request(long_article(10), long_input=CHUNK), timeout=0.5)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The server sees the deadline pass a moment after the caller does.
            await until(lambda: server.core.batcher.queue_depth == 0)
        else:
            call = stub.Summarize(request(long_article(10), long_input=CHUNK), timeout=10)
            await until(lambda: server.core.batcher.queue_depth == 10)
            call.cancel()
            await until(lambda: server.core.batcher.queue_depth == 0)
        engine.hold.set()
        await running
        after = await stub.Summarize(request("after"), timeout=10)
        await until(lambda: server.core.batcher.queue_depth == 0)
    assert after.results[0].summary == "S:after"
    assert generated(engine) == ["running", "after"]


async def test_a_failing_chunk_fails_its_article_and_stops_its_other_chunks() -> None:
    engine = FakeEngine()
    engine.fail_on = "sentence 01"
    async with serving(BASE.replace(max_batch_size=2), lambda s: engine) as (server, channel):
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Summarize(request(long_article(12), long_input=CHUNK), timeout=10)
        await until(lambda: server.core.batcher.queue_depth == 0)
        after = await stub.Summarize(request("after"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert after.results[0].summary == "S:after"
    # The failing pair (and its halves, retried to isolate the failure), and at most the pair
    # cut before the failure was seen; never the rest of the article.
    chunks = {t[:13] for t in generated(engine) if t.startswith("L sentence")}
    assert chunks <= {f"L sentence {i:02d}" for i in range(4)}, chunks


async def test_stream_chunks_long_articles_and_reports_a_refused_one_in_band() -> None:
    engine = FakeEngine()
    async with serving(BASE.replace(max_chunks_per_article=10), lambda s: engine) as (
            _, channel):
        stub = pb_grpc.SummarizerStub(channel)

        async def requests():
            yield request(long_article(6), "short", ids=["long", "short"], long_input=CHUNK)
            yield request(long_article(11), ids=["too long"], long_input=CHUNK)
            yield request(long_article(3), ids=["cut"], long_input=TRUNCATE)

        results = {r.id: r async for r in stub.SummarizeStream(requests(), timeout=20)}
    assert (results["long"].chunks, results["long"].truncated) == (6, False)
    assert (results["short"].chunks, results["cut"].chunks, results["cut"].truncated) == (
        1, 1, True)
    assert results["too long"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "needs more than 10 chunks" in results["too long"].error.message


# ----- a tiny checkpoint, end to end -----

@pytest.fixture(scope="module")
def tiny_settings(tiny_bart: Path) -> Settings:
    return Settings(model=str(tiny_bart), threads=1, max_wait_ms=5, num_beams=1,
                    summary_max_tokens=8, summary_min_tokens=4, headline_max_tokens=4,
                    headline_min_tokens=2, warmup=False)


async def test_tiny_checkpoint_both_policies_end_to_end(tiny_settings: Settings) -> None:
    text = " ".join(training_text(60, seed=5))  # several windows of the tiny model's 256 tokens
    async with serving(tiny_settings, lambda s: TorchEngine(s).load()) as (_, channel):
        stub = pb_grpc.SummarizerStub(channel)
        truncated = await stub.Summarize(request(text, long_input=TRUNCATE), timeout=120)
        chunked = await stub.Summarize(request(text, "A short one.", long_input=CHUNK),
                                       timeout=120)
        again = await stub.Summarize(request(text, "A short one.", long_input=CHUNK),
                                     timeout=120)

        async def requests():
            yield request(text, ids=["streamed"], long_input=CHUNK)

        streamed = [r async for r in stub.SummarizeStream(requests(), timeout=120)]
    cut = truncated.results[0]
    assert (cut.chunks, cut.truncated, cut.input_tokens) == (1, True, 256)
    whole, short = chunked.results
    assert whole.chunks >= 3 and not whole.truncated
    assert whole.input_tokens > 2 * 256
    assert whole.summary and whole.headline and 4 <= whole.summary_tokens <= 8
    assert (short.chunks, short.truncated) == (1, False)
    assert chunked == again  # deterministic
    assert streamed[0].summary == whole.summary and streamed[0].chunks == whole.chunks
