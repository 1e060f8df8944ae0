"""One caller's work in the queue, and the one place where it is cancelled.

A `CallWork` is made per call (a unary call, or a whole stream): its jobs share one class
(`domain.Priority`), one round-robin group in the queue (one caller, one turn, however many
articles and chunk passes it queues) and one deadline, and it remembers every future it queued
and every task it started for the caller.
When the call ends, however it ends (answered, failed, cancelled, past its deadline), `close()`
cancels what is left: nothing of a caller who has gone stays queued.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from ..domain import Generated, GenerationParams, PreparedArticle, Priority
from .batcher import Batcher, Job
from .tracing import Span

T = TypeVar("T")


def jobs_for(prepared: Sequence[PreparedArticle], params: GenerationParams,
             deadline: float | None, trace: Span | None = None) -> list[Job]:
    """One job per model input; its cost (input tokens) orders it and counts against the
    batch's token budget, and its options are its key (only equal options share a batch).
    `trace`: the span the work belongs to (the article's, or a map or reduce pass's)."""
    return [Job(p, key=params, cost=p.cost, deadline=deadline, trace=trace) for p in prepared]


class CallWork:
    def __init__(self, batcher: Batcher, deadline: float | None,
                 priority: Priority = Priority.DEFAULT) -> None:
        self.batcher = batcher
        self.deadline = deadline
        self.priority = priority
        """The call's class: every job it queues carries it (one class per call)."""
        self.group = object()
        self._pending: set[asyncio.Future] = set()

    def _track(self, futures: Sequence[asyncio.Future[T]]) -> list[asyncio.Future[T]]:
        for future in futures:
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
        return list(futures)

    def _classed(self, jobs: Sequence[Job]) -> list[Job]:
        return [job if job.priority is self.priority
                else dataclasses.replace(job, priority=self.priority) for job in jobs]

    def submit_now(self, jobs: Sequence[Job]) -> list[asyncio.Future[Generated]]:
        """Queue `jobs` at once, all or none (QueueFull when they do not fit now)."""
        return self._track(self.batcher.submit(self._classed(jobs), group=self.group))

    async def admit(self, jobs: Sequence[Job]) -> list[asyncio.Future[Generated]]:
        """Queue `jobs`, waiting for room within the call's deadline: accepted work (stream
        articles, later passes over a long article's chunks) pushes back instead of failing."""
        return self._track(await self.batcher.admit(self._classed(jobs), group=self.group,
                                                    deadline=self.deadline))

    async def queue(self, prepared: Sequence[PreparedArticle], params: GenerationParams,
                    trace: Span | None = None) -> list[asyncio.Future[Generated]]:
        """`admit` for model inputs with one set of options (what map-reduce passes use)."""
        return await self.admit(jobs_for(prepared, params, self.deadline, trace))

    def start(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """A task for the caller (e.g. an article's assembly), cancelled with the call."""
        task = asyncio.ensure_future(work)
        self._track([task])
        return task

    def close(self) -> None:
        """Cancel everything still pending for the caller: queued jobs leave the queue, tasks
        stop."""
        for future in list(self._pending):
            future.cancel()
