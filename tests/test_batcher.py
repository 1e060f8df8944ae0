"""Unit tests for service/serving/batcher.py and its parts (queue.py, executor.py), with a fake
blocking `run_batch` (no torch, no gRPC).

The fake records every call (key, payloads, thread) and can hold chosen calls on a
`threading.Event`, so a test decides exactly when the worker is busy and when it is free.
Nothing here sleeps and hopes: waits are for a condition, bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import gc
import queue as queue_module
import threading
import weakref
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from service.serving.batcher import Batcher, BatcherStats, BatchReport, DropReason, Job
from service.serving.executor import Executor
from service.serving.jobs import Entry, JobState
from service.serving.queue import BatchQueue
from service.errors import DeadlineExceeded, GenerationFailed, QueueFull, Unavailable

from .conftest import until

pytestmark = pytest.mark.timeout(10)

WAIT_S = 1.0
"""Upper bound for any positive wait in these tests (each one normally takes milliseconds)."""

LONG_WAIT_MS = 10_000
"""A max_wait_ms no test ever reaches: a batch cut under it was cut for another reason."""


# ----------------------------------------------------------------------------------------------
# Helpers


@dataclass
class Call:
    index: int
    key: Hashable
    payloads: list[Any]
    thread: int
    at: float


class FakeRunBatch:
    """A blocking `run_batch(key, payloads)`; `behaviour(index, key, payloads)` makes results."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.calls: list[Call] = []
        self.finished: list[int] = []
        self.gates: dict[int, threading.Event] = {}
        self.behaviour: Callable[[int, Hashable, list[Any]], Sequence[Any]] = (
            lambda _i, _k, payloads: [p * 10 for p in payloads])
        self._changed = asyncio.Event()

    # -- the function the batcher calls, in its worker thread --
    def __call__(self, key: Hashable, payloads: list[Any]) -> Sequence[Any]:
        index = len(self.calls)
        self.calls.append(Call(index, key, list(payloads), threading.get_ident(), time.monotonic()))
        self.loop.call_soon_threadsafe(self._changed.set)
        gate = self.gates.get(index)
        try:
            if gate is not None and not gate.wait(timeout=5):
                raise RuntimeError(f"test never released call {index}")
            return self.behaviour(index, key, list(payloads))
        finally:
            self.finished.append(index)

    # -- control from the test (event loop thread) --
    def hold(self, *indices: int) -> None:
        """Make the calls with these indices block until `release`d."""
        for index in indices:
            self.gates[index] = threading.Event()

    def release(self, *indices: int) -> None:
        for index in indices or tuple(self.gates):
            self.gates[index].set()

    async def wait_calls(self, n: int, timeout_s: float = WAIT_S) -> None:
        """Return once run_batch has been entered at least `n` times."""
        async def reached() -> None:
            while len(self.calls) < n:
                self._changed.clear()
                if len(self.calls) >= n:
                    break
                await self._changed.wait()
        await asyncio.wait_for(reached(), timeout_s)

    # -- views --
    @property
    def batches(self) -> list[list[Any]]:
        return [c.payloads for c in self.calls]

    def all_payloads(self) -> list[Any]:
        return [p for c in self.calls for p in c.payloads]


async def settle(turns: int = 20) -> None:
    """Let every ready callback and task on the loop run a few times over."""
    for _ in range(turns):
        await asyncio.sleep(0)


def jobs(*payloads: int, key: Hashable = "k", cost: int | None = None,
         deadline: float | None = None) -> list[Job]:
    """One Job per payload; cost defaults to the payload, so shorter means smaller."""
    return [Job(p, key=key, cost=p if cost is None else cost, deadline=deadline) for p in payloads]


@pytest.fixture
async def make():
    """Factory for started batchers around a fresh fake; all are released and stopped after."""
    made: list[tuple[Batcher, FakeRunBatch]] = []

    async def factory(**options: Any) -> tuple[Batcher, FakeRunBatch]:
        fake = FakeRunBatch()
        options.setdefault("max_batch_size", 8)
        options.setdefault("max_wait_ms", 0)
        options.setdefault("max_queue", 1000)
        options.setdefault("check_invariants", True)
        batcher = Batcher(fake, **options)
        await batcher.start()
        made.append((batcher, fake))
        return batcher, fake

    yield factory
    for batcher, fake in made:
        fake.release()  # never leave the worker thread blocked: stop() waits for it
        await batcher.stop()


async def busy(batcher: Batcher, fake: FakeRunBatch, payload: int = -1) -> asyncio.Future:
    """Occupy the worker with a one-job batch held on gate 0; returns the blocker's future.

    Needs a batcher whose lone job is cut at once (max_wait_ms=0 or max_batch_size=1).
    """
    fake.hold(0)
    [future] = batcher.submit(jobs(payload, key="blocker", cost=1))
    await fake.wait_calls(1)
    assert batcher.queue_depth == 0
    return future


# ----------------------------------------------------------------------------------------------
# 1. grouping


async def test_jobs_queued_while_worker_busy_are_batched_up_to_max_batch_size(make):
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    blocker = await busy(batcher, fake)

    futures = [batcher.submit(jobs(i))[0] for i in range(1, 11)]  # ten callers, one job each
    assert batcher.queue_depth == 10
    await settle()
    assert len(fake.calls) == 1, "nothing may start while the worker is busy"

    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(*futures), WAIT_S) == [i * 10 for i in
                                                                        range(1, 11)]
    assert await blocker == -10
    assert [len(b) for b in fake.batches] == [1, 4, 4, 2]
    assert sorted(fake.all_payloads()[1:]) == list(range(1, 11))
    assert batcher.queue_depth == 0
    assert batcher.stats.batches == 4
    assert batcher.stats.jobs == 11
    assert batcher.stats.mean_batch_size == pytest.approx(11 / 4)


async def test_full_batch_is_cut_at_once_even_with_a_long_max_wait(make):
    batcher, fake = await make(max_batch_size=3, max_wait_ms=LONG_WAIT_MS)
    futures = batcher.submit(jobs(1, 2, 3, 4))  # one batch's worth and one left over
    await fake.wait_calls(1)
    assert fake.batches == [[1, 2, 3]]
    assert await asyncio.wait_for(asyncio.gather(*futures[:3]), WAIT_S) == [10, 20, 30]
    await settle()
    assert not futures[3].done(), "a lone leftover waits for company under a long max_wait"
    assert batcher.queue_depth == 1


# ----------------------------------------------------------------------------------------------
# 2. keys


async def test_only_jobs_with_equal_keys_share_a_batch(make):
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    await busy(batcher, fake)

    key_of: dict[int, str] = {}
    futures: dict[int, asyncio.Future] = {}
    payload = 0
    for round_ in range(6):  # interleave keys within and across submit groups
        group = []
        for key in ("a", "b", "c")[: 1 + round_ % 3]:
            payload += 1
            key_of[payload] = key
            group.append(Job(payload, key=key, cost=1))
        futures.update(zip((j.payload for j in group), batcher.submit(group)))
    fake.release(0)
    results = await asyncio.wait_for(asyncio.gather(*futures.values()), WAIT_S)

    assert results == [p * 10 for p in futures]
    for call in fake.calls[1:]:
        assert {key_of[p] for p in call.payloads} == {call.key}, call
        assert len(call.payloads) <= 4
    assert sorted(fake.all_payloads()[1:]) == sorted(key_of)


# ----------------------------------------------------------------------------------------------
# 3. every caller gets its own results, in its own order


async def test_each_caller_gets_exactly_its_own_results_in_submit_order(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    await busy(batcher, fake)

    callers = 25
    submitted = 0

    async def caller(n: int) -> tuple[list[int], list[int]]:
        nonlocal submitted
        # Distinct payloads; costs descending so the batcher reorders them inside the group.
        payloads = [n * 1000 + i for i in range(1 + n % 5)]
        group = [Job(p, key="k", cost=100 - i) for i, p in enumerate(payloads)]
        futures = batcher.submit(group)
        submitted += 1
        return payloads, list(await asyncio.gather(*futures))

    tasks = [asyncio.create_task(caller(n)) for n in range(callers)]
    await until(lambda: submitted == callers)
    total = batcher.queue_depth
    assert total == sum(1 + n % 5 for n in range(callers))
    fake.release(0)

    for payloads, results in await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S):
        assert results == [p * 10 for p in payloads]
    run = fake.all_payloads()[1:]
    assert len(run) == total and len(set(run)) == total, "each job runs exactly once"
    assert all(len(b) <= 8 for b in fake.batches)


async def test_results_follow_submit_order_when_the_fake_returns_distinct_values(make):
    # A results mix-up could go unseen if results were computable from nothing but order:
    # here the result names the batch and the position in it, and must match the payload.
    batcher, fake = await make(max_batch_size=3, max_wait_ms=0)
    fake.behaviour = lambda i, _k, payloads: [(i, p) for p in payloads]
    await busy(batcher, fake)
    futures = batcher.submit(jobs(9, 3, 7, 1, 5))
    fake.release(0)
    results = await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    assert [p for _batch, p in results] == [9, 3, 7, 1, 5]
    assert fake.batches[1:] == [[1, 3, 5], [7, 9]]
    assert [batch for batch, _p in results] == [2, 1, 2, 1, 1]


# ----------------------------------------------------------------------------------------------
# 4. max wait


async def test_lone_job_waits_under_long_max_wait_until_the_batch_is_full(make):
    # The queue reads the clock when it decides whether to cut a batch or wait (and cuts in the
    # same step): once it has read the clock after the submit, it has decided.
    reads = [0]

    def clock() -> float:
        reads[0] += 1
        return time.monotonic()

    async def decided() -> None:
        submitted = reads[0]
        await until(lambda: reads[0] > submitted)

    batcher, fake = await make(max_batch_size=3, max_wait_ms=LONG_WAIT_MS, clock=clock)
    [first] = batcher.submit(jobs(1))
    await decided()
    assert batcher.queue_depth == 1, "cut a batch of one before it was full or its wait ended"
    assert not first.done()

    [second] = batcher.submit(jobs(2))
    await decided()
    assert batcher.queue_depth == 2, "two of three is still not full"
    [third] = batcher.submit(jobs(3))  # now full: cut at once, long before 10 s
    assert await asyncio.wait_for(asyncio.gather(first, second, third), WAIT_S) == [10, 20, 30]
    assert fake.batches == [[1, 2, 3]]


async def test_lone_job_is_dispatched_after_max_wait_not_before(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=150)
    submitted_at = time.monotonic()
    [future] = batcher.submit(jobs(1))
    assert await asyncio.wait_for(future, WAIT_S) == 10
    waited = fake.calls[0].at - submitted_at
    assert waited >= 0.149  # (float rounding of enqueued_at + max_wait)
    assert waited < WAIT_S
    assert fake.batches == [[1]]


async def test_zero_max_wait_dispatches_a_lone_job_immediately(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    submitted_at = time.monotonic()
    [future] = batcher.submit(jobs(1))
    assert await asyncio.wait_for(future, WAIT_S) == 10
    assert fake.batches == [[1]]
    assert fake.calls[0].at - submitted_at < 0.5


async def test_full_batch_of_another_key_is_not_held_behind_a_lone_older_job(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=LONG_WAIT_MS)
    [lone] = batcher.submit(jobs(1, key="a"))
    full = batcher.submit(jobs(2, 3, key="b"))  # a whole batch of key "b", worker idle
    try:
        try:
            await fake.wait_calls(1, timeout_s=0.5)
        except TimeoutError:
            pass
        assert fake.batches == [[2, 3]]
        assert not lone.done()
        assert await asyncio.wait_for(asyncio.gather(*full), WAIT_S) == [20, 30]
    finally:
        for future in (lone, *full):
            future.cancel()  # nothing left for stop() to fail unobserved


# ----------------------------------------------------------------------------------------------
# 5. queue limit


async def test_submit_beyond_max_queue_is_refused_all_or_nothing(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0, max_queue=3)
    await busy(batcher, fake)  # the running batch does not count against the queue

    with pytest.raises(QueueFull):
        batcher.submit(jobs(1, 2, 3, 4))  # more than the whole queue
    assert batcher.queue_depth == 0

    two = batcher.submit(jobs(1, 2))
    assert batcher.queue_depth == 2
    with pytest.raises(QueueFull):
        batcher.submit(jobs(3, 4))  # only one would fit: none is taken
    assert batcher.queue_depth == 2
    [three] = batcher.submit(jobs(3))
    assert batcher.queue_depth == 3
    with pytest.raises(QueueFull):
        batcher.submit(jobs(4))
    assert batcher.queue_depth == 3

    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(*two, three), WAIT_S) == [10, 20, 30]
    assert batcher.queue_depth == 0
    again = batcher.submit(jobs(4, 5, 6))  # space freed once the worker took the work
    assert await asyncio.wait_for(asyncio.gather(*again), WAIT_S) == [40, 50, 60]
    # Groups [1, 2] and [3] are taken round-robin; the refused jobs never ran.
    assert fake.batches == [[-1], [1, 3, 2], [4, 5, 6]]


async def test_queue_space_frees_as_soon_as_a_batch_is_taken(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0, max_queue=2)
    fake.hold(0, 1)
    first = batcher.submit(jobs(1, 2))
    await fake.wait_calls(1)  # taken by the worker (and held)
    assert batcher.queue_depth == 0
    second = batcher.submit(jobs(3, 4))  # fits: the running batch left the queue
    with pytest.raises(QueueFull):
        batcher.submit(jobs(5))
    fake.release(0)
    await fake.wait_calls(2)
    assert batcher.queue_depth == 0
    third = batcher.submit(jobs(5, 6))
    fake.release(1)
    results = await asyncio.wait_for(asyncio.gather(*first, *second, *third), WAIT_S)
    assert results == [10, 20, 30, 40, 50, 60]


# ----------------------------------------------------------------------------------------------
# 6. cancellation


async def test_cancelled_queued_job_leaves_the_queue_and_never_runs(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    await busy(batcher, fake)
    group = batcher.submit(jobs(1, 2, 3))
    [lone] = batcher.submit(jobs(4))
    assert batcher.queue_depth == 4

    assert group[1].cancel()
    assert lone.cancel()
    await until(lambda: batcher.queue_depth == 2)
    assert batcher.stats.dropped == 2

    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(group[0], group[2]), WAIT_S) == [10, 30]
    assert group[1].cancelled() and lone.cancelled()
    run = fake.all_payloads()
    assert 2 not in run and 4 not in run
    assert fake.batches[1:] == [[1, 3]]
    assert batcher.queue_depth == 0


async def test_cancelling_every_queued_job_empties_the_queue_without_a_batch(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    futures = batcher.submit(jobs(1, 2))
    await settle()
    for future in futures:
        future.cancel()
    await until(lambda: batcher.queue_depth == 0)
    # Later work is unaffected, and the cancelled payloads are never sent along with it.
    later = batcher.submit(jobs(*range(10, 18)))  # a full batch: cut at once
    assert await asyncio.wait_for(asyncio.gather(*later), WAIT_S) == list(range(100, 180, 10))
    assert fake.batches == [list(range(10, 18))]


async def test_cancelling_a_running_job_does_not_disturb_its_batch_mates(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    fake.hold(0)
    futures = batcher.submit(jobs(1, 2, 3))
    await fake.wait_calls(1)
    futures[1].cancel()
    await settle()
    assert batcher.queue_depth == 0, "a running job is not counted as queued, even cancelled"
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(futures[0], futures[2]), WAIT_S) == [10, 30]
    assert futures[1].cancelled()
    assert batcher.stats.dropped == 0


# ----------------------------------------------------------------------------------------------
# 7. deadlines


async def test_job_past_its_deadline_is_never_run(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    [expired] = batcher.submit(jobs(1, deadline=time.monotonic() - 1.0))
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(expired, WAIT_S)
    await until(lambda: batcher.queue_depth == 0)
    assert fake.calls == []
    assert batcher.stats.dropped == 1


async def test_only_the_expired_jobs_of_a_group_are_dropped(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    await busy(batcher, fake)
    past = time.monotonic() - 1.0
    future_ = time.monotonic() + 60.0
    futures = batcher.submit([Job(1, key="k", deadline=past), Job(2, key="k", deadline=future_),
                              Job(3, key="k", deadline=None)])
    fake.release(0)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(futures[0], WAIT_S)
    assert await asyncio.wait_for(asyncio.gather(futures[1], futures[2]), WAIT_S) == [20, 30]
    assert 1 not in fake.all_payloads()
    assert fake.batches[1:] == [[2, 3]]


async def test_deadline_that_passes_while_waiting_behind_a_busy_worker(make):
    now = [1000.0]  # an injected clock, so "time passes" without waiting for it
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0, clock=lambda: now[0])
    await busy(batcher, fake)
    [doomed] = batcher.submit(jobs(1, deadline=now[0] + 5.0))
    [fine] = batcher.submit(jobs(2, deadline=now[0] + 60.0))
    await settle()
    assert not doomed.done(), "not expired yet"
    now[0] += 10.0
    fake.release(0)
    with pytest.raises(DeadlineExceeded):
        await asyncio.wait_for(doomed, WAIT_S)
    assert await asyncio.wait_for(fine, WAIT_S) == 20
    assert fake.batches[1:] == [[2]]


# ----------------------------------------------------------------------------------------------
# 8. fairness


async def test_single_job_callers_are_not_stuck_behind_a_big_group(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    await busy(batcher, fake)
    big = batcher.submit(jobs(*range(100, 140), cost=1))  # 40 jobs, first in line
    singles = [batcher.submit(jobs(p, cost=1))[0] for p in (1, 2, 3)]
    fake.release(0)

    assert await asyncio.wait_for(asyncio.gather(*singles), WAIT_S) == [10, 20, 30]
    next_batch = fake.batches[1]
    assert len(next_batch) == 8
    assert {1, 2, 3} <= set(next_batch), next_batch
    await asyncio.wait_for(asyncio.gather(*big), WAIT_S)
    assert sorted(fake.all_payloads()[1:]) == [1, 2, 3, *range(100, 140)]


async def test_round_robin_reaches_every_group_across_batches(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0)
    await busy(batcher, fake)
    first = batcher.submit(jobs(*range(100, 110), cost=1))
    second = batcher.submit(jobs(*range(200, 210), cost=1))
    [single] = batcher.submit(jobs(1, cost=1))
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*first, *second, single), WAIT_S)
    # Round-robin: A,B then C,A ... the lone caller must get a slot within two batches.
    assert any(1 in batch for batch in fake.batches[1:3]), fake.batches


async def test_a_big_group_of_another_key_holds_single_callers_back_one_batch_at_most(make):
    # A long article's chunks (key "chunk") queued ahead of single articles (key "article"):
    # whose turn it is picks the key, so the singles do not wait for all 40 chunks.
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    await busy(batcher, fake)
    chunks = batcher.submit(jobs(*range(100, 140), key="chunk", cost=1))
    singles = [batcher.submit(jobs(p, key="article", cost=1))[0] for p in (1, 2, 3)]
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*singles, *chunks), WAIT_S)
    assert fake.batches[1] == [100, 101, 102, 103]
    assert fake.batches[2] == [1, 2, 3]


async def test_jobs_submitted_for_the_same_group_share_one_round_robin_turn(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0)
    await busy(batcher, fake)
    # One caller submitting three times, then a caller with one job: the second caller is
    # served in the first batch, beside the first caller's shortest job.
    many = [f for cost in (30, 10, 20)
            for f in batcher.submit(jobs(cost, cost=cost), group="caller")]
    [single] = batcher.submit(jobs(5, cost=5), group="other")
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*many, single), WAIT_S)
    assert fake.batches[1:] == [[10, 5], [20, 30]]


async def test_a_group_that_emptied_starts_again_at_the_back(make):
    batcher, fake = await make(max_batch_size=1, max_wait_ms=0)
    await busy(batcher, fake)
    [first] = batcher.submit(jobs(1), group="a")
    [second] = batcher.submit(jobs(2), group="b")
    fake.hold(1)
    fake.release(0)
    await fake.wait_calls(2)
    [again] = batcher.submit(jobs(3), group="a")  # "a" was served and is empty: a new turn
    fake.release(1)
    await asyncio.wait_for(asyncio.gather(first, second, again), WAIT_S)
    assert fake.batches[1:] == [[1], [2], [3]]


# ----------------------------------------------------------------------------------------------
# 9. padding: shortest first, token cap


async def test_a_groups_jobs_are_taken_shortest_first(make):
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    await busy(batcher, fake)
    costs = [13, 2, 16, 7, 1, 11, 4, 9, 15, 3, 6, 14, 8, 12, 5, 10]  # payload == cost
    futures = batcher.submit(jobs(*costs))
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(*futures), WAIT_S) == [c * 10 for c in costs]
    assert fake.batches[1:] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16]]


async def test_max_batch_tokens_caps_batch_size_times_longest_cost(make):
    cap = 20
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0, max_batch_tokens=cap)
    await busy(batcher, fake)
    costs = [25, 1, 9, 3, 10, 1, 8, 2, 5]  # payload == cost
    futures = batcher.submit(jobs(*costs))
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(*futures), WAIT_S) == [c * 10 for c in costs]

    batches = fake.batches[1:]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(batch) <= cap, batch
    assert sorted(p for b in batches for p in b) == sorted(costs)
    # Greedy shortest first: 1,1,2,3 (4x3=12; adding 5 gives 25); 5,8 (16); 9,10 (20); 25 alone.
    assert batches == [[1, 1, 2, 3], [5, 8], [9, 10], [25]]


async def test_token_cap_applies_across_groups_too(make):
    cap = 12
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0, max_batch_tokens=cap)
    await busy(batcher, fake)
    groups = [batcher.submit(jobs(*g)) for g in ([2, 6], [3], [4, 5], [1])]
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*(f for g in groups for f in g)), WAIT_S)
    batches = fake.batches[1:]
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(batch) <= cap, batch
    assert sorted(p for b in batches for p in b) == [1, 2, 3, 4, 5, 6]


async def batches_of_single_job_callers(make, max_batch_size: int,
                                       costs: list[int]) -> list[list[int]]:
    """One caller per cost (payload == cost), all queued behind a busy worker; the batches run."""
    batcher, fake = await make(max_batch_size=max_batch_size, max_wait_ms=0)
    await busy(batcher, fake)
    futures = [batcher.submit(jobs(cost))[0] for cost in costs]
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    return fake.batches[1:]


async def test_when_not_all_callers_fit_the_batch_holds_lengths_like_the_first_callers(make):
    # In arrival order a batch of two would pair 10 with 300.
    batches = await batches_of_single_job_callers(make, 2, [10, 300, 12, 290])
    assert [sorted(b) for b in batches] == [[10, 12], [290, 300]]


async def test_the_first_caller_in_line_is_served_even_with_an_odd_length(make):
    batches = await batches_of_single_job_callers(make, 2, [500, 10, 11, 12])
    assert 500 in batches[0], batches


async def test_no_token_cap_by_default(make):
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    assert batcher.max_batch_tokens == 0
    await busy(batcher, fake)
    futures = batcher.submit(jobs(1000, 2000, 3000, 4000))
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    assert fake.batches[1:] == [[1000, 2000, 3000, 4000]]


# ----------------------------------------------------------------------------------------------
# 10. failures in run_batch


def fail_when(poison: int, error: BaseException) -> Callable[[int, Hashable, list[int]], list[int]]:
    """A behaviour that raises `error` for any batch holding `poison`."""
    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        if poison in payloads:
            raise error
        return [p * 10 for p in payloads]
    return behaviour


async def test_one_failing_input_fails_alone_and_its_batch_mates_get_their_results(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    boom = RuntimeError("boom")
    fake.behaviour = fail_when(4, boom)
    futures = batcher.submit(jobs(1, 2, 3, 4, 5, 6, 7, 8))
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT_S)
    assert outcomes == [10, 20, 30, boom, 50, 60, 70, 80]
    # Bisection: the batch, its halves, then down to the poison alone; never a batch of one
    # that does not hold the poison, and each healthy job generated exactly once.
    assert fake.batches == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4], [1, 2], [3, 4], [3], [4],
                            [5, 6, 7, 8]]
    assert sorted(p for c, out in zip(fake.calls, fake.batches) for p in out
                  if 4 not in c.payloads) == [1, 2, 3, 5, 6, 7, 8]
    assert batcher.stats.failed_jobs == 1
    assert batcher.stats.failed_batches == 4  # the batch, its first half, [3, 4] and [4]


async def test_two_poison_inputs_in_one_batch_both_fail_alone(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)

    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        if 2 in payloads or 7 in payloads:
            raise ValueError("bad input")
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    futures = batcher.submit(jobs(1, 2, 3, 4, 5, 6, 7, 8))
    outcomes = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT_S)
    assert [type(o) if isinstance(o, Exception) else o for o in outcomes] == [
        10, ValueError, 30, 40, 50, 60, ValueError, 80]
    assert batcher.stats.failed_jobs == 2


async def test_a_failure_that_goes_away_on_retry_fails_nobody(make):
    # e.g. running out of memory in a big batch: the halves fit.
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)

    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        if len(payloads) > 2:
            raise MemoryError("batch too big")
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    futures = batcher.submit(jobs(1, 2, 3, 4, 5, 6, 7, 8))
    assert await asyncio.wait_for(asyncio.gather(*futures), WAIT_S) == [
        10, 20, 30, 40, 50, 60, 70, 80]
    assert [len(b) for b in fake.batches] == [8, 4, 2, 2, 4, 2, 2]
    assert batcher.stats.failed_jobs == 0


async def test_failures_are_isolated_within_a_batch_not_across_batches(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0)
    boom = RuntimeError("boom")
    fake.behaviour = fail_when(1, boom)
    fake.hold(0)
    doomed = batcher.submit(jobs(1, 2))
    await fake.wait_calls(1)
    survivors = batcher.submit(jobs(3, 4))  # queued behind the batch that will fail
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(*doomed, return_exceptions=True),
                                  WAIT_S) == [boom, 20]
    assert await asyncio.wait_for(asyncio.gather(*survivors), WAIT_S) == [30, 40]
    assert fake.batches == [[1, 2], [1], [2], [3, 4]]
    # And the loop keeps serving later work too.
    assert await asyncio.wait_for(batcher.submit(jobs(5))[0], WAIT_S) == 50


async def test_wrong_number_of_results_is_generation_failed_for_each_job(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    fake.behaviour = lambda _i, _k, payloads: [p * 10 for p in payloads][:-1]
    futures = batcher.submit(jobs(1, 2, 3))
    for future in futures:
        with pytest.raises(GenerationFailed):
            await asyncio.wait_for(future, WAIT_S)
    assert batcher.stats.failed_jobs == 3
    assert batcher.stats.batches == 0
    fake.behaviour = lambda _i, _k, payloads: [p * 10 for p in payloads]
    assert await asyncio.wait_for(batcher.submit(jobs(4))[0], WAIT_S) == 40


async def test_too_many_results_is_also_generation_failed(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    fake.behaviour = lambda _i, _k, payloads: [p * 10 for p in payloads] + [0]
    [future] = batcher.submit(jobs(1))
    with pytest.raises(GenerationFailed):
        await asyncio.wait_for(future, WAIT_S)
    assert batcher.stats.failed_jobs == 1


@pytest.mark.parametrize("raised", [SystemExit(3), KeyboardInterrupt()])
async def test_the_loop_survives_an_engine_raising_base_exceptions(make, raised):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)

    def behaviour(index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        if index == 0:
            raise raised
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    [future] = batcher.submit(jobs(1))
    with pytest.raises(GenerationFailed):
        await asyncio.wait_for(future, WAIT_S)
    assert await asyncio.wait_for(batcher.submit(jobs(2))[0], WAIT_S) == 20


async def test_a_job_cancelled_while_its_batch_is_retried_is_not_retried(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    fake.behaviour = fail_when(1, RuntimeError("boom"))
    fake.hold(0)
    futures = batcher.submit(jobs(1, 2, 3, 4, 5, 6, 7, 8))
    await fake.wait_calls(1)
    futures[1].cancel()  # payload 2, in the failing half
    fake.release(0)
    await asyncio.wait_for(asyncio.gather(*futures[2:]), WAIT_S)
    assert 2 not in fake.all_payloads()[8:]
    assert futures[1].cancelled()


async def test_a_job_whose_deadline_cannot_be_met_is_dropped_before_generation(make):
    now = [1000.0]
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0, clock=lambda: now[0])

    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        now[0] += 5.0  # every batch takes five (fake) seconds
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    assert await asyncio.wait_for(batcher.submit(jobs(1))[0], WAIT_S) == 10
    # Same deadline, but no batch of this key has been timed yet: it is given its chance.
    [other_key] = batcher.submit(jobs(4, key="never-measured", deadline=now[0] + 2.0))
    assert await asyncio.wait_for(other_key, WAIT_S) == 40
    [hopeless] = batcher.submit(jobs(2, deadline=now[0] + 2.0))
    [fine] = batcher.submit(jobs(3, deadline=now[0] + 60.0))
    with pytest.raises(DeadlineExceeded, match="longer deadline"):
        await asyncio.wait_for(hopeless, WAIT_S)
    assert await asyncio.wait_for(fine, WAIT_S) == 30
    assert 2 not in fake.all_payloads()
    assert batcher.stats.hopeless == 1


async def test_cancelling_a_queued_job_frees_its_payload_while_the_worker_is_busy(make):
    class Payload:
        pass

    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    await busy(batcher, fake)
    payload = Payload()
    ref = weakref.ref(payload)
    [future] = batcher.submit([Job(payload, key="k")])
    del payload
    future.cancel()
    await settle()
    gc.collect()
    assert ref() is None, "a cancelled job's payload must not stay queued"
    assert batcher.queue_depth == 0
    fake.release(0)


# ----------------------------------------------------------------------------------------------
# 11. lifecycle: start, stop


async def test_stop_fails_queued_jobs_with_unavailable_and_refuses_new_work(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    futures = batcher.submit(jobs(1, 2))
    [other] = batcher.submit(jobs(3, key="other"))
    await settle()
    assert batcher.queue_depth == 3
    await asyncio.wait_for(batcher.stop(), WAIT_S)
    for future in (*futures, other):
        with pytest.raises(Unavailable):
            future.result()
    with pytest.raises(Unavailable):
        batcher.submit(jobs(4))
    assert fake.calls == []


async def test_stop_while_a_batch_runs_still_fails_the_queued_jobs(make):
    batcher, fake = await make(max_batch_size=1, max_wait_ms=0)
    running = await busy(batcher, fake)
    queued = batcher.submit(jobs(1, 2))
    fake.release(0)  # let the worker thread end, so stop() does not wait on it
    await asyncio.wait_for(batcher.stop(), WAIT_S)
    assert running.done()
    # stop() lets the running batch finish and delivers its result.
    assert running.exception() is None
    for future in queued:
        with pytest.raises(Unavailable):
            future.result()
    assert 1 not in fake.all_payloads() and 2 not in fake.all_payloads()
    with pytest.raises(Unavailable):
        batcher.submit(jobs(3))


async def test_queue_depth_is_zero_after_stop(make):
    batcher, _fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS)
    futures = batcher.submit(jobs(1, 2))
    await batcher.stop()
    await settle()
    assert all(isinstance(f.exception(), Unavailable) for f in futures)
    assert batcher.queue_depth == 0


async def test_submit_before_start_is_refused():
    fake = FakeRunBatch()
    batcher = Batcher(fake, max_batch_size=4, max_wait_ms=0, max_queue=4)
    with pytest.raises(Unavailable):
        batcher.submit(jobs(1))
    assert batcher.queue_depth == 0
    await batcher.stop()  # stopping a batcher that never started is harmless


async def test_start_twice_is_an_error(make):
    batcher, _fake = await make()
    with pytest.raises(RuntimeError):
        await batcher.start()


async def test_empty_submit_returns_no_futures_and_queues_nothing(make):
    batcher, fake = await make(max_wait_ms=0)
    assert batcher.submit([]) == []
    await settle()
    assert batcher.queue_depth == 0
    assert fake.calls == []


# ----------------------------------------------------------------------------------------------
# 12. threads


async def test_run_batch_runs_in_one_worker_thread_off_the_event_loop(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0)
    loop_thread = threading.get_ident()
    futures = [f for i in range(3) for f in batcher.submit(jobs(2 * i, 2 * i + 1))]
    await asyncio.wait_for(asyncio.gather(*futures), WAIT_S)
    threads = {call.thread for call in fake.calls}
    assert len(fake.calls) >= 3
    assert loop_thread not in threads
    assert len(threads) == 1, "one dedicated worker thread"


async def test_event_loop_stays_responsive_while_the_worker_is_busy(make):
    batcher, fake = await make(max_batch_size=8, max_wait_ms=0)
    running = await busy(batcher, fake)
    # The loop still accepts, refuses and cancels work while run_batch blocks.
    queued = batcher.submit(jobs(1, 2))
    queued[0].cancel()
    await until(lambda: batcher.queue_depth == 1)
    assert not running.done()
    fake.release(0)
    assert await asyncio.wait_for(queued[1], WAIT_S) == 20


# ----------------------------------------------------------------------------------------------
# 13. validation and plain data


@pytest.mark.parametrize("options", [
    {"max_batch_size": 0},
    {"max_batch_size": -1},
    {"max_queue": 0},
    {"max_wait_ms": -1},
    {"max_batch_tokens": -1},
])
def test_constructor_rejects_bad_limits(options):
    settings = {"max_batch_size": 4, "max_wait_ms": 5, "max_queue": 10, **options}
    with pytest.raises(ValueError):
        Batcher(lambda _k, p: p, **settings)


def test_constructor_exposes_its_limits():
    batcher = Batcher(lambda _k, p: p, max_batch_size=4, max_wait_ms=250, max_queue=10,
                      max_batch_tokens=4096)
    assert batcher.max_batch_size == 4
    assert batcher.max_wait_s == pytest.approx(0.25)
    assert batcher.max_queue == 10
    assert batcher.max_batch_tokens == 4096
    assert batcher.queue_depth == 0
    assert batcher.stats == BatcherStats()


def test_stats_mean_batch_size():
    assert BatcherStats().mean_batch_size == 0.0
    assert BatcherStats(batches=4, jobs=10).mean_batch_size == pytest.approx(2.5)


def test_job_defaults_and_immutability():
    job = Job("x", key=("opts", 1))
    assert job.cost == 1 and job.deadline is None
    with pytest.raises(AttributeError):
        job.cost = 5  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# 12. the on_batch hook (metrics)


async def test_on_batch_reports_every_engine_call_with_costs_waits_and_failures(make):
    reports: list[BatchReport] = []
    now = [50.0]
    batcher, fake = await make(max_batch_size=8, max_wait_ms=LONG_WAIT_MS,
                               clock=lambda: now[0], on_batch=reports.append)

    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        now[0] += 2.0
        if 7 in payloads:
            raise RuntimeError("boom")
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    futures = batcher.submit(jobs(1, 2, 3, 4, 5, 6, 7, 8))
    await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), WAIT_S)
    assert [(r.costs, r.failed) for r in reports] == [
        ((1, 2, 3, 4, 5, 6, 7, 8), True), ((1, 2, 3, 4), False), ((5, 6, 7, 8), True),
        ((5, 6), False), ((7, 8), True), ((7,), True), ((8,), False)]
    assert all(r.duration_s == 2.0 for r in reports)
    assert reports[0].waited_s == (0.0,) * 8 and reports[1].waited_s == (2.0,) * 4
    assert reports[0].padding_ratio == pytest.approx(1 - 36 / 64)


async def test_a_failing_on_batch_hook_never_breaks_serving(make):
    def broken(_report: BatchReport) -> None:
        raise ValueError("metrics bug")

    batcher, _fake = await make(max_batch_size=8, max_wait_ms=0, on_batch=broken)
    assert await asyncio.wait_for(batcher.submit(jobs(3))[0], WAIT_S) == 30


# ----------------------------------------------------------------------------------------------
# 12. the isolation path under stress: every future resolved, once, with its own outcome


async def test_a_caller_gone_during_its_solo_retry_does_not_strand_its_batch_mates(make):
    """The stall of issue 11: the poison's caller cancels while its solo retry runs. Delivering
    the poison's error to the cancelled future raised InvalidStateError out of the retry loop,
    and the batch's other halves, already cut, were never resolved (callers waited for their
    deadline)."""
    batcher, fake = await make(max_batch_size=4, max_wait_ms=0)
    fake.hold(2)  # [0, 1, 2, 3] fails, [0, 1] fails, then [0] alone: held

    def behaviour(_index: int, _key: Hashable, payloads: list[int]) -> list[int]:
        if 0 in payloads:
            raise RuntimeError("poison")
        return [p * 10 for p in payloads]

    fake.behaviour = behaviour
    futures = batcher.submit(jobs(0, 1, 2, 3))
    await fake.wait_calls(3)
    assert fake.batches == [[0, 1, 2, 3], [0, 1], [0]]
    futures[0].cancel()  # the poison's caller goes while its solo retry runs
    fake.release(2)
    assert await asyncio.wait_for(asyncio.gather(*futures[1:]), WAIT_S) == [10, 20, 30]
    assert batcher.queue_depth == 0 and batcher.running == 0
    assert batcher.stats.failed_jobs == 1


@pytest.mark.parametrize("seed", range(4))
async def test_isolation_stress_every_future_resolved_once_with_its_own_outcome(seed):
    """Hundreds of batches from a fake engine: poison payloads at random positions, callers that
    cancel while queued and while their batch (or its retry) runs, deadlines that pass while
    queued and between retries. Every future ends, with its own result or its own error, the
    bookkeeping is checked after every change (check_invariants), and the counters end at
    zero with each drop counted once."""
    import random

    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    now = [0.0]
    futures: dict[int, asyncio.Future] = {}
    poison: set[int] = set()
    deadlines: dict[int, float] = {}
    cancel_during: dict[int, list[int]] = {}  # engine call index -> payloads cancelled then
    calls: list[list[int]] = []
    cancelled_by_test: set[int] = set()

    def cancel_now(payloads: list[int], done: threading.Event) -> None:
        for p in payloads:
            if futures[p].cancel():
                cancelled_by_test.add(p)
        done.set()

    def run_batch(_key: Hashable, payloads: list[int]) -> list[int]:
        index = len(calls)
        calls.append(list(payloads))
        now[0] += 1.0  # every engine call takes one (fake) second
        victims = [p for p in payloads if rng.random() < 0.06]
        if victims:  # callers that go away while their job is in the engine
            done = threading.Event()
            loop.call_soon_threadsafe(cancel_now, victims, done)
            assert done.wait(5)
        cancel_during[index] = victims
        if poison.intersection(payloads):
            raise RuntimeError("injected failure")
        return [p * 10 for p in payloads]

    batcher = Batcher(run_batch, max_batch_size=8, max_wait_ms=0, max_queue=10_000,
                      clock=lambda: now[0], check_invariants=True)
    await batcher.start()
    next_payload = 0
    try:
        for _round in range(120):
            for _caller in range(rng.randint(1, 4)):
                payloads = list(range(next_payload, next_payload + rng.randint(1, 12)))
                next_payload += len(payloads)
                for p in payloads:
                    if rng.random() < 0.08:
                        poison.add(p)
                    if rng.random() < 0.1:
                        deadlines[p] = now[0] + rng.choice([0.0, 0.5, 1.5, 3.0, 20.0])
                submitted = batcher.submit(
                    [Job(p, key=rng.choice("ab"), cost=rng.randint(1, 50),
                         deadline=deadlines.get(p)) for p in payloads])
                futures.update(zip(payloads, submitted))
            for p in rng.sample(sorted(futures), k=min(3, len(futures))):
                if futures[p].cancel():  # callers gone while queued (or already finished)
                    cancelled_by_test.add(p)
            await asyncio.sleep(0)  # let a few batches run between rounds
        pending = [f for f in futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=10)
        stranded = sorted(p for p, f in futures.items() if not f.done())
        assert not stranded, f"{len(stranded)} futures never resolved: {stranded[:10]}"
    finally:
        await batcher.stop()

    assert len(calls) > 200, "the run exercised hundreds of engine calls"
    unmeetable = expired = 0
    for p, future in futures.items():
        if future.cancelled():
            assert p in cancelled_by_test, f"job {p} was cancelled, but not by its caller"
            continue
        error = future.exception()
        if error is None:
            assert future.result() == p * 10, f"job {p} got another job's result"
            assert p not in poison, f"poisoned job {p} got a result"
        elif isinstance(error, DeadlineExceeded):
            assert p in deadlines, f"job {p} had no deadline, yet got {error!r}"
            if "longer deadline" in str(error):
                unmeetable += 1
            else:
                expired += 1
        else:
            assert isinstance(error, RuntimeError) and str(error) == "injected failure", error
            assert p in poison, f"healthy job {p} got the poison's error"
            assert [p] in calls, f"job {p} failed without a solo try"
    assert batcher.queue_depth == 0 and batcher.running == 0
    stats = batcher.stats
    assert stats.dropped_by_reason[DropReason.DEADLINE_UNMEETABLE] == unmeetable
    assert stats.dropped_by_reason[DropReason.DEADLINE_PASSED] == expired
    assert stats.dropped_by_reason[DropReason.CANCELLED] <= len(cancelled_by_test)
    assert stats.dropped == stats.hopeless + expired + stats.dropped_by_reason[
        DropReason.CANCELLED], "each dropped job is counted once, under one reason"
    assert any(v for v in cancel_during.values()), "some callers went while their job ran"
    assert stats.failed_jobs > 0 and unmeetable + expired > 0


# ----------------------------------------------------------------------------------------------
# 13. admission: waiting for room (admit), without polling


class Resumptions:
    """Wraps a coroutine and counts how often the event loop resumes it: a waiter that polls
    (sleeps and retries) is resumed again and again, one woken by an event exactly once."""

    def __init__(self, coro: Any) -> None:
        self._coro = coro
        self.count = 0

    def __await__(self) -> Resumptions:
        return self

    def __iter__(self) -> Resumptions:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        self.count += 1
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        self.count += 1
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()


@pytest.fixture
def timers(monkeypatch):
    """Records every timer scheduled on the running loop from the moment `timers.watch()` is
    called (asyncio.sleep, wait_for and call_later all go through `loop.call_at`)."""
    class Timers(list):
        def watch(self) -> None:
            loop = asyncio.get_running_loop()
            call_at = loop.call_at

            def recording(when: float, *args: Any, **kwargs: Any) -> Any:
                self.append(args[0])
                return call_at(when, *args, **kwargs)

            monkeypatch.setattr(loop, "call_at", recording)

    return Timers()


async def full_queue(make, max_queue: int, **options: Any
                     ) -> tuple[Batcher, FakeRunBatch, list[asyncio.Future]]:
    """A started batcher whose worker is busy (gate 0) and whose queue is full of key "k"."""
    batcher, fake = await make(max_queue=max_queue, max_wait_ms=0, **options)
    await busy(batcher, fake)
    queued = batcher.submit(jobs(*range(1, max_queue + 1)))
    assert batcher.queue_depth == max_queue
    return batcher, fake, queued


async def test_admit_waits_without_polling_and_is_woken_when_a_queued_job_is_cancelled(
        make, timers):
    batcher, fake, queued = await full_queue(make, max_queue=2)
    timers.watch()
    waiting = Resumptions(batcher.admit(jobs(7), group="stream"))
    task = asyncio.ensure_future(waiting)
    await settle(50)
    assert not task.done()
    assert waiting.count == 1, "the waiter ran once, then slept until woken"
    assert timers == [], "no timer runs while a waiter without a deadline waits"

    queued[0].cancel()  # room for one: the waiter is woken by that, not by a timer
    [admitted] = await asyncio.wait_for(task, WAIT_S)
    assert waiting.count == 2
    assert batcher.queue_depth == 2
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(queued[1], admitted), WAIT_S) == [20, 70]


async def test_admit_is_woken_when_a_batch_is_cut(make):
    batcher, fake = await make(max_batch_size=2, max_wait_ms=0, max_queue=2)
    fake.hold(0)
    first = batcher.submit(jobs(1, 2))
    await fake.wait_calls(1)  # in the engine (held): the queue is empty again
    second = batcher.submit(jobs(3, 4))  # the queue is full
    waiting = Resumptions(batcher.admit(jobs(5, 6)))
    task = asyncio.ensure_future(waiting)
    await settle()
    assert not task.done() and waiting.count == 1
    fake.release(0)  # the worker is free, pulls [3, 4]: room for the waiter
    third = await asyncio.wait_for(task, WAIT_S)
    assert waiting.count == 2
    results = await asyncio.wait_for(asyncio.gather(*first, *second, *third), WAIT_S)
    assert results == [10, 20, 30, 40, 50, 60]
    assert fake.batches == [[1, 2], [3, 4], [5, 6]]


async def test_admit_takes_room_at_once_when_there_is_some(make):
    batcher, _fake = await make(max_wait_ms=LONG_WAIT_MS, max_queue=4)
    futures = await batcher.admit(jobs(1, 2), group="g")
    assert len(futures) == 2 and batcher.queue_depth == 2
    assert await batcher.admit([]) == []
    for future in futures:
        future.cancel()


async def test_admit_waiters_are_served_first_come_first_served(make):
    batcher, fake, queued = await full_queue(make, max_queue=3)
    big = asyncio.ensure_future(batcher.admit(jobs(10, 11, 12), group="big"))
    await settle()
    small = asyncio.ensure_future(batcher.admit(jobs(20), group="small"))
    await settle()
    with pytest.raises(QueueFull):
        batcher.submit(jobs(30))  # the waiters are in line first

    queued[0].cancel()  # room for one: the small waiter fits, but the big one is first
    await until(lambda: batcher.queue_depth == 2)
    await settle()
    assert not big.done() and not small.done(), "a small waiter does not overtake a big one"

    queued[1].cancel()
    queued[2].cancel()  # room for three: the big waiter goes, the small one still waits
    big_futures = await asyncio.wait_for(big, WAIT_S)
    await settle()
    assert not small.done() and batcher.queue_depth == 3

    fake.release(0)  # batches are cut: room for the small waiter too
    small_futures = await asyncio.wait_for(small, WAIT_S)
    assert await asyncio.wait_for(asyncio.gather(*big_futures, *small_futures), WAIT_S) == [
        100, 110, 120, 200]
    assert 30 not in fake.all_payloads()


async def test_admit_raises_queue_full_when_its_deadline_passes_while_waiting(make):
    batcher, fake, queued = await full_queue(make, max_queue=2)
    deadline = time.monotonic() + 0.05
    with pytest.raises(QueueFull, match="deadline"):
        await asyncio.wait_for(batcher.admit(jobs(7), deadline=deadline), WAIT_S)
    assert time.monotonic() >= deadline
    queued[0].cancel()  # room appears later: the expired waiter left nothing that takes it
    await until(lambda: batcher.queue_depth == 1)
    assert batcher.submit(jobs(8))
    assert batcher.queue_depth == 2 and batcher.stats.dropped == 1
    fake.release(0)


async def test_a_waiter_whose_deadline_passed_is_not_admitted_when_room_appears(make):
    now = [1000.0]
    batcher, fake, queued = await full_queue(make, max_queue=2, clock=lambda: now[0])
    task = asyncio.ensure_future(batcher.admit(jobs(7), deadline=now[0] + 5.0))
    await settle()
    now[0] += 10.0  # (fake) time passes; the waiter's real-time timer is far away
    queued[0].cancel()
    with pytest.raises(QueueFull, match="deadline"):
        await asyncio.wait_for(task, WAIT_S)
    assert batcher.queue_depth == 1
    fake.release(0)


async def test_admit_refuses_at_once_what_could_never_fit(make, timers):
    batcher, fake = await make(max_queue=3, max_wait_ms=LONG_WAIT_MS)
    timers.watch()
    waiting = Resumptions(batcher.admit(jobs(1, 2, 3, 4)))
    with pytest.raises(QueueFull, match="can never fit"):
        await asyncio.wait_for(asyncio.ensure_future(waiting), WAIT_S)
    assert waiting.count == 1, "refused on its first step, without waiting"
    assert batcher.queue_depth == 0 and fake.calls == []


async def test_admit_with_a_deadline_already_passed_is_refused_at_once(make):
    batcher, fake, _queued = await full_queue(make, max_queue=1)
    with pytest.raises(QueueFull, match="deadline"):
        await batcher.admit(jobs(7), deadline=time.monotonic() - 1.0)
    fake.release(0)


async def test_stop_while_admit_waits_raises_unavailable(make):
    batcher, fake, queued = await full_queue(make, max_queue=2)
    task = asyncio.ensure_future(batcher.admit(jobs(7)))
    await settle()
    fake.release(0)
    await asyncio.wait_for(batcher.stop(), WAIT_S)
    with pytest.raises(Unavailable):
        await asyncio.wait_for(task, WAIT_S)
    with pytest.raises(Unavailable):
        await batcher.admit(jobs(8))
    assert 7 not in fake.all_payloads()
    assert batcher.queue_depth == 0


async def test_admit_before_start_is_refused():
    batcher = Batcher(lambda _k, p: p, max_batch_size=4, max_wait_ms=0, max_queue=4)
    with pytest.raises(Unavailable):
        await batcher.admit(jobs(1))


async def test_a_cancelled_waiter_leaves_no_trace_and_the_next_in_line_moves_up(make):
    batcher, fake, queued = await full_queue(make, max_queue=2)
    first = asyncio.ensure_future(batcher.admit(jobs(7, 8)))
    await settle()
    second = asyncio.ensure_future(batcher.admit(jobs(9)))
    await settle()
    queued[0].cancel()  # room for one: not enough for the first waiter
    await until(lambda: batcher.queue_depth == 1)
    await settle()
    assert not second.done()
    first.cancel()  # the first waiter goes: the second one fits now
    [admitted] = await asyncio.wait_for(second, WAIT_S)
    assert first.cancelled()
    assert batcher.queue_depth == 2
    assert batcher.stats.dropped == 1  # queued[0], cancelled by its caller: nothing else
    fake.release(0)
    assert await asyncio.wait_for(asyncio.gather(queued[1], admitted), WAIT_S) == [20, 90]
    assert batcher.queue_depth == 0 and batcher.running == 0
    assert batcher.stats.dropped == 1


async def test_a_waiter_cancelled_after_room_was_given_gives_the_room_back():
    """Room is reserved for a waiter the moment it is woken; if its caller goes before its task
    runs, the reservation goes with it and the next waiter gets the room."""
    queue = BatchQueue(max_batch_size=4, max_wait_ms=0, max_queue=1, check_invariants=True)
    queue.open()
    [queued] = queue.submit(jobs(1))
    first = asyncio.ensure_future(queue.admit(jobs(2)))
    second = asyncio.ensure_future(queue.admit(jobs(3)))
    await settle()
    assert queue.waiting == 2
    queued.cancel()
    await asyncio.sleep(0)  # the cancelled job's callback ran: room given to the first waiter
    assert queue.reserved == 1 and queue.waiting == 1 and not first.done()
    first.cancel()  # before the first waiter's task resumed
    [admitted] = await asyncio.wait_for(second, WAIT_S)
    assert first.cancelled()
    assert queue.depth == 1 and queue.reserved == 0 and queue.waiting == 0
    assert queue.stats.dropped == 1  # the job its caller cancelled; the waiter left no count
    queue.close()
    queue.drain()
    with pytest.raises(Unavailable):
        admitted.result()


def test_the_queue_is_the_one_place_that_knows_the_limits():
    queue = BatchQueue(max_batch_size=4, max_wait_ms=0, max_queue=3)
    assert queue.fits_ever(3) and not queue.fits_ever(4)
    assert (queue.max_batch_size, queue.max_queue, queue.depth) == (4, 3, 0)


# ----------------------------------------------------------------------------------------------
# 14. the seam: an executor pulls from a queue and calls a plain run_batch


class RemoteWorker:
    """Stands in for an engine in another process: a thread that receives (key, payloads) on a
    message queue and sends results back. It knows nothing of jobs, groups or futures."""

    def __init__(self) -> None:
        self.inbox: queue_module.Queue = queue_module.Queue()
        self.seen: list[tuple[Hashable, list[Any]]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (message := self.inbox.get()) is not None:
            key, payloads, reply = message
            self.seen.append((key, list(payloads)))
            reply.put([f"{key}:{p}" for p in payloads] if -1 not in payloads
                      else RuntimeError("bad input"))

    def run_batch(self, key: Hashable, payloads: list[Any]) -> list[Any]:
        """The callable the executor gets: send the batch, block for the reply."""
        reply: queue_module.Queue = queue_module.Queue()
        self.inbox.put((key, payloads, reply))
        answer = reply.get(timeout=5)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.inbox.put(None)
        self._thread.join(timeout=5)


async def test_an_executor_and_a_queue_wired_by_hand_around_a_worker_in_another_thread():
    remote = RemoteWorker()
    queue = BatchQueue(max_batch_size=2, max_wait_ms=0, max_queue=10, check_invariants=True)
    executor = Executor(remote.run_batch, stats=queue.stats, check_invariants=True)
    queue.open()
    big = queue.submit(jobs(1, 2, 3, -1, key="a", cost=1), group="big")
    [small] = queue.submit(jobs(9, key="b", cost=1), group="small")
    try:
        await executor.start(queue)
        outcomes = await asyncio.wait_for(
            asyncio.gather(*big, small, return_exceptions=True), WAIT_S)
    finally:
        queue.close()
        await executor.stop()
        queue.drain()
        remote.close()
    assert outcomes[:3] + outcomes[4:] == ["a:1", "a:2", "a:3", "b:9"]
    assert isinstance(outcomes[3], RuntimeError), "the bad input failed alone"
    # The policy still decides: the first batch is "big"'s shortest two (its turn), then the
    # small caller's own key before "big" goes on.
    assert remote.seen[:2] == [("a", [1, 2]), ("b", [9])]
    assert queue.stats.failed_jobs == 1 and queue.depth == 0 and executor.running == 0


async def test_an_executor_runs_any_batch_source_and_knows_no_groups():
    class HandFed:
        """A source with no policy at all: batches are put in by hand."""

        def __init__(self) -> None:
            self.batches: asyncio.Queue = asyncio.Queue()
            self.durations: list[Hashable] = []

        async def next_batch(self) -> tuple[Hashable, list[Entry]] | None:
            return await self.batches.get()

        def should_drop(self, _job: Job, _now: float) -> None:
            return None

        def record_duration(self, key: Hashable, _seconds: float) -> None:
            self.durations.append(key)

    loop = asyncio.get_running_loop()
    source = HandFed()
    reports: list[BatchReport] = []
    executor = Executor(lambda key, payloads: [(key, p) for p in payloads],
                        on_batch=reports.append, check_invariants=True)
    await executor.start(source)
    entries = [Entry(Job(p, key="x"), loop.create_future(), 0.0, state=JobState.RUNNING)
               for p in (1, 2)]
    source.batches.put_nowait(("x", entries))
    try:
        results = await asyncio.wait_for(asyncio.gather(*(e.future for e in entries)), WAIT_S)
        assert results == [("x", 1), ("x", 2)]
        assert source.durations == ["x"] and [r.costs for r in reports] == [(1, 1)]
        assert all(e.state is JobState.DONE for e in entries)
        source.batches.put_nowait(None)  # the source runs dry: the executor stops pulling
        await until(lambda: not executor.alive)
    finally:
        await executor.stop()
    assert executor.stats.batches == 1 and executor.running == 0
