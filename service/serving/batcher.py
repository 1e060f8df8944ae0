"""Server-loop batching: collect work from all concurrent calls into batches for one model worker.

This is the facade the request path uses; the work is done by two parts, each the one owner of its
state, wired together here:
- `queue.BatchQueue`, the policy: admission (a bounded queue; `submit` refuses at once what does
  not fit, `admit` waits for room), fairness across callers, keys, token budget, shortest first,
  deadlines, and the adaptive-wait cut of the next batch.
- `executor.Executor`, execution: pulls a batch from the queue whenever its worker is free, runs it
  through the blocking `run_batch(key, payloads)` in one worker thread, isolates failing inputs by
  halving, delivers each result to its own future, and reports batch durations back to the queue.

The batcher knows nothing of models or torch; see the two modules for the rules and for the seam
where an engine in another process plugs in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Generic

from .executor import R, BatchReport, Executor, RunBatch
from .jobs import P, BatcherStats, DropReason, InvariantViolation, Job
from .queue import BatchQueue

__all__ = ["Batcher", "BatcherStats", "BatchReport", "DropReason", "InvariantViolation", "Job"]


class Batcher(Generic[P, R]):
    """Every job submitted is resolved exactly once: with its result, its own error, or the
    reason it was dropped. Queued jobs belong to the queue, jobs cut into a batch to the executor;
    with `check_invariants`, each checks its own bookkeeping after every change (for tests)."""

    def __init__(self, run_batch: RunBatch | Sequence[RunBatch], *, max_batch_size: int,
                 max_wait_ms: float,
                 max_queue: int, max_batch_tokens: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 check_invariants: bool = False) -> None:
        self.stats = BatcherStats()
        self._queue: BatchQueue[P] = BatchQueue(
            max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
            max_batch_tokens=max_batch_tokens, clock=clock, stats=self.stats,
            check_invariants=check_invariants)
        # One executor per engine instance (a worker process each), all pulling from the one
        # queue when they have room. If an executor's loop ever dies, refuse work.
        run_batches = [run_batch] if callable(run_batch) else list(run_batch)
        self._executors: list[Executor[P, R]] = [
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
        for executor in self._executors:
            await executor.start(self._queue)

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

    @property
    def running(self) -> int:
        """Jobs cut into the current batch and not yet delivered."""
        return sum(e.running for e in self._executors)

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
