"""summarize_many's fault handling, through BOTH clients (one implementation serves both), against
a scripted server that needs nothing but grpcio."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterable, Iterator

import grpc
import pytest

from summarizer_client import (ArticleSummary, AsyncSummarizerClient, RetryPolicy,
                               SummarizerClient)

FAST_RETRY = RetryPolicy(attempts=5, initial_backoff_s=0.01, max_backoff_s=0.05)
CLIENTS = ["blocking", "asyncio"]


def articles(n: int) -> list[tuple[str, str]]:
    return [(f"a{i}", f"article number {i}") for i in range(n)]


def run_many(kind: str, target: str, source: Iterable[tuple[str, str]],
             got: list[object], **kwargs: object) -> None:
    """Collect summarize_many's results into `got` (kept when it raises)."""
    if kind == "blocking":
        with SummarizerClient(target, retry=FAST_RETRY) as client:
            for result in client.summarize_many(source, **kwargs):
                got.append(result)
        return

    async def collect() -> None:
        async with AsyncSummarizerClient(target, retry=FAST_RETRY) as client:
            async for result in client.summarize_many(source, **kwargs):
                got.append(result)

    asyncio.run(collect())


def loop_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "summarizer-client-loop"]


@pytest.mark.parametrize("kind", CLIENTS)
def test_grpcio_spurious_internal_is_retried_with_only_the_unanswered_articles(
        kind: str, scripted) -> None:
    target, script = scripted
    script.breaks = 1
    got: list[object] = []
    run_many(kind, target, articles(10), got, request_size=1, streams=1)
    assert sorted(r.id for r in got) == sorted(i for i, _ in articles(10))  # each once
    assert all(isinstance(r, ArticleSummary) for r in got)
    assert script.streams == 2
    assert not loop_threads()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_real_internal_is_not_retried(kind: str, scripted) -> None:
    target, script = scripted
    script.breaks, script.details = 1, "the model broke"
    with pytest.raises(grpc.RpcError) as caught:
        run_many(kind, target, articles(10), [], request_size=1)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert script.streams <= 4  # one per lane at most: none is opened again


@pytest.mark.parametrize("kind", CLIENTS)
def test_an_error_of_the_article_source_reaches_the_caller_as_itself(kind: str,
                                                                     scripted) -> None:
    """After the articles already sent are answered, so none of their work is lost."""
    target, _ = scripted

    def source() -> Iterator[tuple[str, str]]:
        yield from articles(3)
        raise LookupError("corpus line 4 is broken")

    got: list[object] = []
    with pytest.raises(LookupError, match="corpus line 4"):
        run_many(kind, target, source(), got)
    assert sorted(r.id for r in got) == ["a0", "a1", "a2"]
    assert not loop_threads()


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_duplicate_id_in_flight_is_a_value_error(kind: str, scripted) -> None:
    target, _ = scripted  # both go in one request: the second is taken before any answer
    with pytest.raises(ValueError, match="duplicate article id 'x'"):
        run_many(kind, target, [("x", "one"), ("x", "two")], [])


@pytest.mark.parametrize("kind", CLIENTS)
def test_articles_without_ids_are_refused(kind: str, scripted) -> None:
    target, _ = scripted
    with pytest.raises(ValueError, match="non-empty id"):
        run_many(kind, target, [("", "text")], [])


def test_blocking_iteration_left_early_cancels_the_stream_and_ends_its_thread(scripted) -> None:
    target, _ = scripted
    with SummarizerClient(target) as client:
        results = client.summarize_many(articles(100), max_in_flight=4, request_size=1)
        first = next(results)
        assert loop_threads()
        results.close()
    assert first.id.startswith("a")
    assert not loop_threads()


def test_blocking_ctrl_c_while_waiting_cancels_the_stream_and_ends_its_thread(scripted) -> None:
    target, script = scripted
    script.stall = True
    main = threading.main_thread().ident
    timer = threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGINT))
    with SummarizerClient(target) as client:
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            list(client.summarize_many(articles(3)))
    assert script.cancelled.wait(10)
    assert not loop_threads()


def test_the_source_is_read_lazily(scripted) -> None:
    target, _ = scripted
    taken: list[int] = []

    def source() -> Iterator[tuple[str, str]]:
        for n in range(10_000):
            taken.append(n)
            yield f"a{n}", "text"

    with SummarizerClient(target) as client:
        results = client.summarize_many(source(), max_in_flight=8, request_size=4)
        next(results)
        results.close()
    assert len(taken) < 100


# ----- many streams, many replicas -----

@pytest.mark.parametrize("kind", CLIENTS)
def test_each_lane_recovers_its_own_broken_stream_and_nothing_is_answered_twice(
        kind: str, scripted) -> None:
    target, script = scripted
    script.breaks, script.code = 3, grpc.StatusCode.UNAVAILABLE  # 3 of the 4 first streams
    got: list[object] = []
    # A breaking stream answers only once the client has written all it will (see Scripted):
    # room for every article in flight, so that the lanes finish writing.
    run_many(kind, target, articles(40), got, request_size=2, streams=4, max_in_flight=40)
    assert sorted(r.id for r in got) == sorted(i for i, _ in articles(40))  # each once
    assert script.streams >= 4 + 3


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_stream_is_replaced_after_articles_per_stream(kind: str, scripted) -> None:
    target, script = scripted
    got: list[object] = []
    run_many(kind, target, articles(10), got, request_size=2, streams=1,
             articles_per_stream=3)
    assert sorted(r.id for r in got) == sorted(i for i, _ in articles(10))
    assert script.streams == 4  # 3 + 3 + 3 + 1


def test_summarize_many_checks_its_arguments(scripted) -> None:
    target, _ = scripted
    with SummarizerClient(target) as client, pytest.raises(ValueError, match="streams"):
        next(iter(client.summarize_many(articles(1), streams=0)))


@pytest.mark.parametrize("kind", CLIENTS)
def test_a_target_uri_with_three_addresses_spreads_summarize_many_over_all(
        kind: str, scripted_trio) -> None:
    target, scripts = scripted_trio
    got: list[object] = []
    run_many(kind, target, articles(120), got, request_size=2, max_in_flight=8,
             articles_per_stream=6)
    assert sorted(r.id for r in got) == sorted(i for i, _ in articles(120))
    assert sum(s.articles for s in scripts) == 120
    assert all(s.articles > 0 for s in scripts), [s.articles for s in scripts]


def test_unary_calls_go_round_robin_over_the_addresses_of_the_target(scripted_trio) -> None:
    target, scripts = scripted_trio
    with SummarizerClient(target) as client:
        for n in range(30):
            client.summarize([(f"a{n}", "text")])
    counts = [s.unary_calls for s in scripts]
    assert sum(counts) == 30 and min(counts) >= 5, counts


def test_pick_first_keeps_to_one_address(scripted_trio) -> None:
    target, scripts = scripted_trio
    with SummarizerClient(target, load_balancing="pick_first") as client:
        for n in range(9):
            client.summarize([(f"a{n}", "text")])
    assert sorted(s.unary_calls for s in scripts) == [0, 0, 9]


def test_an_unknown_load_balancing_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="round_robin, pick_first"):
        SummarizerClient("localhost:1", load_balancing="random")
