"""Heavy input costs its sender, not everyone else (issue 24): TRUNCATE reads what the window
holds, and preparation takes callers in turn. Real server processes on a tiny random-weight
BART (tests/processes.py)."""

from __future__ import annotations

import time

import grpc
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from service.config import Settings
from service.engines.torch_engine import TorchEngine
from .processes import MIB, Serve, article, request_of


# ----- 1. TRUNCATE reads what the window holds, with today's result -----

@pytest.mark.parametrize("family", ["tiny_bart", "tiny_t5", "tiny_pegasus"])
def test_truncate_tokenises_only_what_the_window_holds_with_the_same_ids(
        family: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(family)
    engine = TorchEngine(Settings(model=str(path), device="cpu")).load(weights=False)
    tokenizer = engine.summary.tokenizer
    seen: list[int] = []
    encode_batch = tokenizer.encode_batch

    def recording(texts: list[str]) -> list[tuple[list[int], list[int]]]:
        seen.extend(len(t) for t in texts)
        return encode_batch(texts)

    tokenizer.encode_batch = recording  # type: ignore[method-assign]
    words = article(100_000, seed=3)
    texts = [words, words.replace(" ", ""), article(400, seed=4), "x" * 100_000,
             "\u4e2d\u6587" * 30_000]
    params = engine.defaults
    window = params.max_input_tokens
    prepared = engine.prepare(texts, params)
    assert max(seen) < 100_000 // 4, "a 100,000-character article was tokenised whole"
    # Today's result: the whole text tokenised, then cut to the window keeping the special
    # tokens at both ends.
    for text, got in zip(texts, prepared):
        ids, mask = encode_batch([engine.summary.summary_prefix + text])[0]
        truncated = len(ids) > window
        if truncated:
            lead = next(i for i, m in enumerate(mask) if not m)
            trail = next(i for i, m in enumerate(reversed(mask)) if not m)
            ids = ids[:window - trail] + ids[len(ids) - trail:]
            assert lead < window
        assert got.summary_ids == tuple(ids)
        assert got.truncated == truncated
        assert got.input_tokens == len(ids)


def test_truncated_results_over_grpc_match_the_whole_text_tokenised(serve: Serve) -> None:
    """Same summaries, token counts and truncated flags as with the text cut to the window by
    the caller (what today's server reads of it), over a real server."""
    server = serve("--workers", "0", "--batching", "static")
    texts = [article(100_000, seed) for seed in range(3)] + [article(300, 9)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        long_reply = stub.Summarize(request_of(texts), timeout=120)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        window = info.default_options.max_input_tokens
        # The window's worth of text, cut by the caller well past what the window reads.
        cut_reply = stub.Summarize(request_of([t[:window * 16] for t in texts]), timeout=120)
    for long, cut in zip(long_reply.results, cut_reply.results):
        assert long.summary == cut.summary and long.headline == cut.headline
        assert long.input_tokens == cut.input_tokens
        assert long.truncated == cut.truncated
    assert [r.truncated for r in long_reply.results] == [True, True, True, False]


# ----- 2. Preparation is fair and proportional -----

def test_a_one_article_call_answers_within_a_second_during_a_10mb_truncate_request(
        serve: Serve) -> None:
    server = serve("--workers", "1")
    texts = [article(100_000, seed % 7) for seed in range(100)]
    big = request_of(texts)
    assert big.ByteSize() > 9.5 * MIB
    small = request_of([article(2000, 1)])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        stub.Summarize(small, timeout=60)  # warm
        started = time.perf_counter()
        pending = stub.Summarize.future(big, timeout=300)
        time.sleep(1.0)  # the big call is in the server (sent; being prepared or generated)
        began = time.perf_counter()
        stub.Summarize(small, timeout=60)
        small_s = time.perf_counter() - began
        big_done = pending.result()
        big_s = time.perf_counter() - started
        # What the same articles cost cut to the window beforehand.
        began = time.perf_counter()
        stub.Summarize(request_of([t[:4000] for t in texts]), timeout=300)
        cut_s = time.perf_counter() - began
    assert len(big_done.results) == 100
    assert small_s < 1.0, f"the one-article call waited {small_s:.1f}s (big call {big_s:.1f}s)"
    assert big_s < 2 * cut_s + 2.0, f"10 MB call {big_s:.1f}s vs {cut_s:.1f}s cut beforehand"
