"""Server-loop batching: collect work from all concurrent calls into batches for one model worker.

This is the facade the request path uses; the work is done by two parts, each the one owner of its
state, wired together here:
- `queue.BatchQueue`, admission: a bounded queue (per class too; `submit` refuses at once what
  does not fit, `admit` waits for room, more urgent work displaces less urgent queued work),
  deadlines, and the adaptive-wait timing of the next batch;
- `policy.SchedulingPolicy`, the order: classes, fairness across callers, keys, token budget,
  shortest first, no starvation, and for continuous batching what to admit and pause each step;
- `executor.Executor`, execution: pulls a batch from the queue whenever its worker is free, runs it
  through the blocking `run_batch(key, payloads)` in one worker thread, isolates failing inputs by
  halving, delivers each result to its own future, and reports batch durations back to the queue.

Continuous batching: given `advancers` (one blocking `advance(StepIn) -> StepOut` per engine
instance) instead of `run_batch` callables, the batcher builds `continuous.ContinuousExecutor`s
and a queue whose keys do not separate batches (articles with different options decode side by
side); the job key stays the generation options, which the executor sends with each article.

The batcher knows nothing of models or torch; see the two modules for the rules and for the seam
where an engine in another process plugs in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Generic

from ..domain import Priority
from ..engines.protocol import StepOut
from .continuous import Advance, ContinuousExecutor, StepReport
from .executor import R, BatchReport, Executor, RunBatch
from .jobs import P, BatcherStats, DropReason, InvariantViolation, Job
from .policy import SchedulingPolicy
from .queue import BatchQueue

__all__ = ["Batcher", "BatcherStats", "BatchReport", "DropReason", "InvariantViolation", "Job",
           "StepReport"]


class Batcher(Generic[P, R]):
    """Every job submitted is resolved exactly once: with its result, its own error, or the
    reason it was dropped. Queued jobs belong to the queue, jobs cut into a batch to the executor;
    with `check_invariants`, each checks its own bookkeeping after every change (for tests)."""

    def __init__(self, run_batch: RunBatch[P, R] | Sequence[RunBatch[P, R]] | None = None, *,
                 max_batch_size: int, max_wait_ms: float,
                 max_queue: int, max_batch_tokens: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 check_invariants: bool = False,
                 advancers: Sequence[Advance] | None = None,
                 on_step: Callable[[StepReport], None] | None = None,
                 class_limits: Mapping[Priority, int] | None = None,
                 starvation_bound: int = 8, small_bulk_batch: int = 0,
                 interactive_headroom: int = 0, bulk_joins_per_step: int = 0,
                 paused_share: float = 0.1) -> None:
        """Either `run_batch` (static batching: one callable, or one per engine instance) or
        `advancers` (continuous batching: one per engine instance; `max_batch_size` is then the
        most articles each holds at once, and `max_wait_ms` and `max_batch_tokens` do not
        apply). `class_limits`, `starvation_bound`, `small_bulk_batch`,
        `interactive_headroom`, `bulk_joins_per_step` and `paused_share`: the priority classes'
        rules (queue.py, policy.py)."""
        if (run_batch is None) == (not advancers):
            raise ValueError("give either run_batch or advancers")
        self.stats = BatcherStats()
        self.continuous = bool(advancers)
        self.policy = SchedulingPolicy(
            max_batch_size=max_batch_size,
            max_batch_tokens=0 if self.continuous else max_batch_tokens,
            share_keys=self.continuous, starvation_bound=starvation_bound,
            small_bulk_batch=small_bulk_batch, interactive_headroom=interactive_headroom,
            bulk_joins_per_step=bulk_joins_per_step, paused_share=paused_share)
        self._queue: BatchQueue[P] = BatchQueue(
            max_batch_size=max_batch_size, max_wait_ms=0 if self.continuous else max_wait_ms,
            max_queue=max_queue, max_batch_tokens=0 if self.continuous else max_batch_tokens,
            clock=clock, stats=self.stats, check_invariants=check_invariants,
            share_keys=self.continuous, class_limits=class_limits, policy=self.policy)
        # One executor per engine instance (a worker process each), all pulling from the one
        # queue when they have room. If an executor's loop ever dies, refuse work.
        self._executors: list[Executor[P, R] | ContinuousExecutor[P, R]]
        if advancers:
            self._executors = [
                ContinuousExecutor(advance, max_active=max_batch_size, clock=clock,
                                   on_batch=on_batch, on_step=on_step, stats=self.stats,
                                   check_invariants=check_invariants, on_exit=self._queue.close,
                                   policy=self.policy)
                for advance in advancers]
        else:
            assert run_batch is not None
            run_batches = [run_batch] if callable(run_batch) else list(run_batch)
            self._executors = [
                Executor(run, clock=clock, on_batch=on_batch, stats=self.stats,
                         check_invariants=check_invariants, on_exit=self._queue.close)
                for run in run_batches]
        self._started = False

    # ----- limits -----
    @property
    def max_batch_size(self) -> int:
        return self._queue.max_batch_size

    @property
    def max_wait_s(self) -> float:
        return self._queue.max_wait_s

    @property
    def max_queue(self) -> int:
        return self._queue.max_queue

    @property
    def max_batch_tokens(self) -> int:
        return self._queue.max_batch_tokens

    @property
    def check_invariants(self) -> bool:
        return self._queue.check_invariants

    # ----- lifecycle -----
    async def start(self) -> None:
        if self._started:
            raise RuntimeError("batcher already started")
        self._started = True
        self._queue.open()
        for index, executor in enumerate(self._executors):
            if isinstance(executor, ContinuousExecutor):
                await executor.start(self._queue)
            else:
                # With two workers or more, the first is an urgent lane: its bulk batches stay
                # small, so it is soon free for interactive work (policy rule 5).
                await executor.start(self._queue.lane(
                    urgent=index == 0 and len(self._executors) > 1))

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking work, let the running batch finish (for at most `timeout_s`; its callers
        get UNAVAILABLE after that), fail what is still queued."""
        self._queue.close()
        try:
            await asyncio.gather(*(e.stop(timeout_s) for e in self._executors))
        finally:
            self._queue.drain()

    @property
    def worker_busy(self) -> bool:
        """True while the model thread is still inside `run_batch` (even after stop gave up)."""
        return any(e.worker_busy for e in self._executors)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not counting the running batch)."""
        return self._queue.depth

    def queue_depth_of(self, priority: Priority) -> int:
        """Jobs of one class waiting for the worker."""
        return self._queue.depth_of(priority)

    @property
    def class_limits(self) -> dict[Priority, int]:
        """Most jobs of each class queued at once."""
        return dict(self._queue.class_limits)

    @property
    def running(self) -> int:
        """Jobs cut into the current batch (or decoding) and not yet delivered."""
        return sum(e.running for e in self._executors)

    def last_steps(self) -> list[StepOut]:
        """Continuous batching: each engine instance's last step (active articles and rows,
        cache use); empty for static batching."""
        return [e.last_step for e in self._executors if isinstance(e, ContinuousExecutor)]

    # ----- submitting -----
    def submit(self, jobs: Sequence[Job[P]], *,
               group: Hashable | None = None) -> list[asyncio.Future[R]]:
        """Queue `jobs`, all or none; one future per job, in the order given. They join the queued
        jobs of an earlier call that named the same `group` (one caller: one round-robin turn),
        else they form a group of their own.

        Raises QueueFull when the jobs do not all fit now, Unavailable once stopped.
        """
        return self._queue.submit(jobs, group=group)

    async def admit(self, jobs: Sequence[Job[P]], *, group: Hashable | None = None,
                    deadline: float | None = None) -> list[asyncio.Future]:
        """Like `submit`, but when the jobs do not fit now, wait for room (woken as jobs leave
        the queue, first come first served) until `deadline` (absolute `time.monotonic()`).

        Raises QueueFull at once when the jobs could never fit, or when `deadline` passes while
        waiting; Unavailable once stopped (also while waiting).
        """
        return await self._queue.admit(jobs, group=group, deadline=deadline)
