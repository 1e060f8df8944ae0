"""Unit tests for continuous batching on the serving side (service/serving/continuous.py and the
queue's share_keys/take_ready), with the deterministic FakeSteppingEngine (no torch, no gRPC).

A test that needs the engine busy holds its steps on `engine.hold` and waits for `engine.started`;
nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest

from service.domain import Generated, GenerationParams, Outputs, PreparedArticle
from service.engines.protocol import StepIn, StepOut
from service.errors import (DeadlineExceeded, GenerationFailed, OutOfMemory, QueueFull,
                            Unavailable)
from service.serving.batcher import Batcher, BatchReport, DropReason, Job, StepReport
from service.serving.jobs import JobState
from service.serving.queue import BatchQueue

from .conftest import until
from .fakes import FakeSteppingEngine, fake_cost

pytestmark = pytest.mark.timeout(20)
WAIT_S = 5.0


def params(max_tokens: int, beams: int = 1, outputs: Outputs = Outputs.BOTH) -> GenerationParams:
    return GenerationParams(summary_max_tokens=max_tokens, summary_min_tokens=1,
                            headline_max_tokens=max_tokens, headline_min_tokens=1,
                            num_beams=beams, outputs=outputs, max_input_tokens=64)


class Recorder:
    """Wraps a session's advance: every StepIn and StepOut, and the thread it ran in."""

    def __init__(self, advance: Callable[[StepIn], StepOut]) -> None:
        self.advance = advance
        self.calls: list[tuple[StepIn, StepOut]] = []
        self.threads: set[int] = set()
        self.before: Callable[[StepIn], None] | None = None

    def __call__(self, step: StepIn) -> StepOut:
        self.threads.add(threading.get_ident())
        if self.before is not None:
            self.before(step)
        out = self.advance(step)
        self.calls.append((step, out))
        return out


class Rig:
    """A started continuous Batcher over one FakeSession, and ways to feed it."""

    def __init__(self, engine: FakeSteppingEngine, batcher: Batcher, recorder: Recorder,
                 reports: list[BatchReport], steps: list[StepReport]) -> None:
        self.engine, self.batcher, self.recorder = engine, batcher, recorder
        self.reports, self.step_reports = reports, steps

    def job(self, text: str, p: GenerationParams, deadline: float | None = None) -> Job:
        article: PreparedArticle = self.engine.prepare([text], p)[0]
        return Job(article, key=p, cost=article.cost, deadline=deadline)

    def submit(self, *items: tuple[str, GenerationParams], deadline: float | None = None
               ) -> list[asyncio.Future]:
        return self.batcher.submit([self.job(t, p, deadline) for t, p in items])

    def ticket(self, text: str) -> int:
        return next(t for t, x in self.engine.texts.items() if x == text)


@pytest.fixture
async def rig():
    made: list[Batcher] = []

    async def make(engine: FakeSteppingEngine | None = None, *, max_batch_size: int = 8,
                   max_queue: int = 64, clock: Callable[[], float] | None = None,
                   advance: Callable[[StepIn], StepOut] | None = None) -> Rig:
        engine = engine or FakeSteppingEngine()
        recorder = Recorder(advance or engine.open_session().advance)
        reports: list[BatchReport] = []
        steps: list[StepReport] = []
        options: dict[str, Any] = {"clock": clock} if clock else {}
        batcher = Batcher(advancers=[recorder], max_batch_size=max_batch_size,
                          max_wait_ms=10_000, max_queue=max_queue, max_batch_tokens=1,
                          on_batch=reports.append, on_step=steps.append, check_invariants=True,
                          **options)
        await batcher.start()
        made.append(batcher)
        return Rig(engine, batcher, recorder, reports, steps)

    yield make
    for batcher in made:
        await batcher.stop(timeout_s=WAIT_S)


async def started(engine: FakeSteppingEngine) -> None:
    """Wait until a step has begun (the engine is then held inside it, if `hold` is clear)."""
    await asyncio.wait_for(asyncio.to_thread(engine.started.wait, WAIT_S), WAIT_S)
    assert engine.started.is_set()


def result_for(text: str, p: GenerationParams) -> Generated:
    return Generated(summary="S:" + text[:12], headline="H:" + text[:6],
                     summary_tokens=p.summary_max_tokens, headline_tokens=p.headline_max_tokens)


# ----- the queue in continuous mode -----
async def test_take_ready_takes_only_what_is_queued_now_across_keys_and_never_waits() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch_size=8, max_wait_ms=10_000, max_queue=16,
                                        share_keys=True, check_invariants=True)
    queue.open()
    assert queue.take_ready(4) == []
    futures = queue.submit([Job(1, key="a"), Job(2, key="b"), Job(3, key="c")])
    taken = queue.take_ready(2)
    assert len(taken) == 2 and {e.job.key for e in taken} <= {"a", "b", "c"}
    assert all(e.state is JobState.RUNNING for e in taken)
    assert queue.depth == 1
    queue.close()
    assert queue.take_ready(4) == []  # closed: nothing more is handed out
    for future in futures:
        future.cancel()


async def test_without_share_keys_take_ready_keeps_keys_apart() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch_size=8, max_wait_ms=0, max_queue=16)
    queue.open()
    queue.submit([Job(1, key="a"), Job(2, key="b")])
    assert len(queue.take_ready(8)) == 1


# ----- sharing steps -----
async def test_articles_with_different_options_share_steps(rig) -> None:
    r = await rig()
    short, beams = params(4), params(7, beams=3)
    futures = r.submit(("first article", short), ("second article", beams),
                       ("third, summary only", params(5, outputs=Outputs.SUMMARY)))
    results = await asyncio.gather(*futures)
    assert results[0] == result_for("first article", short)
    assert results[1] == result_for("second article", beams)
    assert results[2].summary == "S:third, summa" and results[2].headline == ""
    first, second, third = (r.ticket(t) for t in ("first article", "second article",
                                                  "third, summary only"))
    assert {first, second, third} <= set(r.engine.steps[0])  # all three in one step
    assert len(r.engine.steps) == 7  # the longest lived 7 steps; the others left on the way
    assert sum(first in s for s in r.engine.steps) == 4
    # The first step ran 1 + 3 + 1 sequences (beams are rows).
    assert r.recorder.calls[0][1].rows == 5


async def test_a_short_article_that_arrives_during_long_ones_joins_and_finishes_first(rig) -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine)
    finished: list[str] = []
    longs = r.submit(("long one", params(30)), ("long two", params(30, beams=2)))
    for name, future in zip(("long one", "long two"), longs):
        future.add_done_callback(lambda _f, n=name: finished.append(n))
    await started(engine)  # held inside the first step
    [short] = r.submit(("late and short", params(3)))
    short.add_done_callback(lambda _f: finished.append("late and short"))
    engine.hold.set()
    assert await short == result_for("late and short", params(3))
    assert not any(f.done() for f in longs), "the short article waited for the long ones"
    await asyncio.gather(*longs)
    assert finished == ["late and short", "long one", "long two"]
    late = r.ticket("late and short")
    joined = [s for s in engine.steps if late in s]
    assert len(joined) == 3 and all(r.ticket("long one") in s for s in joined)
    assert engine.steps.index(joined[0]) == 1  # it joined at the very next step


async def test_most_articles_decoding_at_once_is_max_batch_size(rig) -> None:
    r = await rig(max_batch_size=2)
    futures = r.submit(*((f"article {n}", params(3 + n)) for n in range(5)))
    await asyncio.gather(*futures)
    assert max(len(s) for s in r.engine.steps) == 2
    assert max(out.active + out.waiting for _, out in r.recorder.calls) == 2


async def test_nothing_more_is_pulled_while_articles_wait_for_cache_room(rig) -> None:
    p = params(4)
    # Room for two articles of this size at once.
    engine = FakeSteppingEngine(budget_bytes=2 * fake_cost(p, FakeSteppingEngine().prepare(
        ["article 00"], p)[0]))
    r = await rig(engine)
    futures = r.submit(*((f"article {n:02}", p) for n in range(6)))
    futures += r.submit(*((f"later {n:02}aa", p) for n in range(4)))
    results = await asyncio.gather(*futures)
    assert [x.summary for x in results[:6]] == [f"S:article {n:02}" for n in range(6)]
    waited = False
    for (_, out), (following, _) in zip(r.recorder.calls, r.recorder.calls[1:]):
        if out.waiting:
            waited = True
            assert not following.admit, "pulled from the queue while the session had a backlog"
    assert waited  # the budget did make articles wait
    assert max(len(s) for s in engine.steps) == 2


# ----- leaving between steps -----
async def test_a_caller_that_cancels_while_decoding_is_removed_at_the_next_step(rig) -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine)
    gone, stays = r.submit(("cancelled one", params(20)), ("stays here", params(20)))
    await started(engine)
    gone.cancel()
    engine.hold.set()
    assert await stays == result_for("stays here", params(20))
    ticket = r.ticket("cancelled one")
    assert engine.removed == [ticket]  # its cache memory was freed
    assert [ticket in s for s in engine.steps[:2]] == [True, False]  # gone from the second step
    removed_at = next(i for i, (step, _) in enumerate(r.recorder.calls) if ticket in step.remove)
    assert removed_at == 1
    assert r.batcher.stats.dropped_by_reason[DropReason.CANCELLED] == 1
    assert r.batcher.running == 0


async def test_a_deadline_that_passes_while_decoding_fails_it_and_frees_it(rig) -> None:
    now = [100.0]
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine, clock=lambda: now[0])
    [late] = r.submit(("has a deadline", params(20)), deadline=110.0)
    [free] = r.submit(("has no deadline", params(20)))
    await started(engine)
    now[0] = 111.0
    engine.hold.set()
    with pytest.raises(DeadlineExceeded):
        await late
    assert await free == result_for("has no deadline", params(20))
    assert r.ticket("has a deadline") in engine.removed
    assert r.batcher.stats.dropped_by_reason[DropReason.DEADLINE_PASSED] == 1


async def test_the_queue_hears_each_articles_latency_and_drops_what_cannot_make_it(rig) -> None:
    now = [0.0]
    engine = FakeSteppingEngine()
    r = await rig(engine, clock=lambda: now[0])

    def tick(step: StepIn) -> None:
        now[0] += 1.0  # each step takes a "second"

    r.recorder.before = tick
    slow = params(5)
    await asyncio.gather(*r.submit(("warms the key", slow)))  # 5 s from admission to done
    [hopeless] = r.submit(("cannot make it", slow), deadline=now[0] + 2.0)
    with pytest.raises(DeadlineExceeded, match="at least"):
        await hopeless
    assert r.batcher.stats.dropped_by_reason[DropReason.DEADLINE_UNMEETABLE] == 1
    # Other options have no history: not dropped.
    [other] = r.submit(("other options", params(1)), deadline=now[0] + 2.0)
    assert (await other).summary == "S:other option"


# ----- failures -----
async def test_an_article_too_large_for_the_cache_is_resource_exhausted_alone(rig) -> None:
    engine = FakeSteppingEngine(budget_bytes=200)
    r = await rig(engine)
    huge, fine = r.submit(("needs a lot of cache", params(60, beams=4)), ("fits fine", params(5)))
    with pytest.raises(OutOfMemory, match="more cache than the whole budget") as caught:
        await huge
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    assert await fine == result_for("fits fine", params(5))


async def test_one_failing_article_does_not_fail_the_others(rig) -> None:
    engine = FakeSteppingEngine()
    engine.fail_on = "POISON"
    r = await rig(engine)
    futures = r.submit(("ok before", params(6)), ("POISON here", params(6)),
                       ("ok after", params(3)))
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert outcomes[0] == result_for("ok before", params(6))
    assert isinstance(outcomes[1], GenerationFailed)
    assert outcomes[2] == result_for("ok after", params(3))
    assert r.batcher.stats.failed_jobs == 1
    failed = [x for x in r.reports if x.failed]
    assert [x.error_type for x in failed] == ["GenerationFailed"]


async def test_a_full_queue_is_still_resource_exhausted(rig) -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine, max_batch_size=1, max_queue=2)
    decoding = r.submit(("decoding", params(5)))
    await started(engine)
    queued = r.submit(("queued one", params(5)), ("queued two", params(5)))
    with pytest.raises(QueueFull):
        r.submit(("one too many", params(5)))
    engine.hold.set()
    await asyncio.gather(*decoding, *queued)


async def test_an_engine_that_raises_fails_what_it_held_and_the_loop_goes_on(rig) -> None:
    engine = FakeSteppingEngine()
    session = engine.open_session()
    broken = [True]

    def advance(step: StepIn) -> StepOut:
        if broken[0] and step.admit:
            broken[0] = False
            session.advance(step)  # took the articles in, then broke
            raise RuntimeError("a bug in the engine")
        return session.advance(step)

    r = await rig(engine, advance=advance)
    with pytest.raises(GenerationFailed):
        await r.submit(("first victim", params(5)))[0]
    assert await r.submit(("next one", params(2)))[0] == result_for("next one", params(2))
    # The session was told to drop what it held from the broken step.
    assert r.ticket("first victim") in engine.removed


async def test_an_unavailable_engine_fails_what_it_held_with_unavailable(rig) -> None:
    def advance(step: StepIn) -> StepOut:
        raise Unavailable("the model workers are not running; retry later")

    r = await rig(advance=advance)
    with pytest.raises(Unavailable):
        await r.submit(("any", params(2)))[0]


async def test_a_session_that_loses_articles_fails_them_instead_of_hanging(rig) -> None:
    r = await rig(advance=lambda step: StepOut())
    with pytest.raises(GenerationFailed, match="lost track"):
        await r.submit(("lost", params(2)))[0]


# ----- threads, reports, shutdown -----
async def test_advance_runs_in_one_worker_thread_off_the_event_loop(rig) -> None:
    r = await rig()
    await asyncio.gather(*r.submit(("a", params(3))), *r.submit(("b", params(2))))
    assert len(r.recorder.threads) == 1
    assert threading.get_ident() not in r.recorder.threads


async def test_reports_each_step_and_each_article_once(rig) -> None:
    r = await rig()
    await asyncio.gather(*r.submit(("one", params(3)), ("two", params(5, beams=2))))
    assert [s.rows for s in r.step_reports] == [3, 3, 3, 2, 2]
    assert [s.active for s in r.step_reports] == [2, 2, 1, 1, 0]
    assert all(s.budget_bytes == r.engine.budget_bytes for s in r.step_reports)
    assert len(r.reports) == 2 and all(x.decoding and not x.failed for x in r.reports)
    assert [len(x.costs) for x in r.reports] == [1, 1]


async def test_stop_lets_decoding_articles_finish_and_fails_what_is_queued(rig) -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine, max_batch_size=1)
    [decoding] = r.submit(("decoding", params(4)))
    await started(engine)
    [queued] = r.submit(("queued", params(4)))
    stopping = asyncio.ensure_future(r.batcher.stop(timeout_s=WAIT_S))
    await asyncio.sleep(0)
    engine.hold.set()
    await stopping
    assert await decoding == result_for("decoding", params(4))
    with pytest.raises(Unavailable):
        await queued
    with pytest.raises(Unavailable):
        r.submit(("after stop", params(4)))


async def test_stop_gives_up_after_the_grace_and_fails_the_rest_with_unavailable(rig) -> None:
    engine = FakeSteppingEngine()
    engine.hold = threading.Event()
    r = await rig(engine)
    [stuck] = r.submit(("never ends in time", params(4)))
    await started(engine)
    await r.batcher.stop(timeout_s=0.05)
    with pytest.raises(Unavailable):
        await stuck
    engine.hold.set()  # let the model thread go


# ----- everything at once -----
@pytest.mark.parametrize("seed", range(6))
async def test_stress_every_future_resolved_once_with_its_own_outcome(rig, seed: int) -> None:
    rng = random.Random(seed)
    engine = FakeSteppingEngine(budget_bytes=400)
    engine.fail_on = "POISON"
    r = await rig(engine, max_batch_size=rng.choice([1, 3, 8]), max_queue=40)
    loop = asyncio.get_running_loop()
    expected: dict[asyncio.Future, tuple[str, GenerationParams, str]] = {}
    for wave in range(12):
        items = []
        for n in range(rng.randint(1, 6)):
            kind = rng.choices(["ok", "poison", "huge", "cancel", "deadline"],
                               [6, 1, 1, 2, 1])[0]
            text = f"{'POISON' if kind == 'poison' else 'w'}{wave}n{n}"
            p = params(60, beams=8) if kind == "huge" else params(rng.randint(1, 12),
                                                                  beams=rng.randint(1, 3))
            items.append((text, p, kind))
        deadline = loop.time() + 0.005 if any(k == "deadline" for *_, k in items) else None
        try:
            futures = r.batcher.submit([r.job(t, p, deadline) for t, p, _ in items])
        except QueueFull:
            continue
        for future, item in zip(futures, items):
            expected[future] = item
            if item[2] == "cancel" and rng.random() < 0.5:
                loop.call_later(rng.random() * 0.01, future.cancel)
        await asyncio.sleep(rng.random() * 0.005)
    outcomes = await asyncio.gather(*expected, return_exceptions=True)
    for outcome, (text, p, kind) in zip(outcomes, expected.values()):
        if isinstance(outcome, Generated):
            assert kind not in ("poison", "huge"), (text, outcome)
            assert outcome == result_for(text, p), text
        elif isinstance(outcome, asyncio.CancelledError):
            assert kind == "cancel"
        elif isinstance(outcome, DeadlineExceeded):
            pass
        elif isinstance(outcome, OutOfMemory):
            assert kind == "huge", text
        else:
            assert isinstance(outcome, GenerationFailed) and kind == "poison", (text, outcome)
    # The batcher lets an article go (cancelled, past its deadline) before the step that
    # removes it from the session has run: wait for that step too. A session that never lets
    # go of an article fails here (after 10 s).
    session = engine.sessions[0]
    await until(lambda: r.batcher.running == 0 and r.batcher.queue_depth == 0
                and not session.active and not session.waiting, 10,
                "the batcher and the session to hold nothing")
    # Nothing removed was answered afterwards.
    removed: set[int] = set()
    for step, out in r.recorder.calls:
        removed.update(step.remove)
        answered = {t for t, _ in out.done} | {f.ticket for f in out.failed}
        assert not answered & removed
    # Each step says what the session holds once it applies: what the previous one said, less
    # what that step answered and what this one removes, plus what this one admits.
    flight: list[int] = []
    answered = set()
    for step, out in r.recorder.calls:
        gone = answered | set(step.remove)
        flight = [t for t in flight if t not in gone] + [a.ticket for a in step.admit]
        assert [a.ticket for a in step.in_flight] == flight
        answered = {t for t, _ in out.done} | {f.ticket for f in out.failed}
