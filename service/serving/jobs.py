"""The unit of work and its life cycle, shared by the queue policy (`queue.py`) and execution
(`executor.py`): neither owns these types, so neither has to import the other.

A job lives in one `Entry` from submit to its end. Its state moves one way only:
QUEUED (the queue holds it) -> RUNNING (the queue handed it to an executor in a batch) -> DONE,
or QUEUED -> DONE when the queue drops it. The queue changes QUEUED entries only, the executor
RUNNING ones only, and `Entry.resolve` is the one place where an entry becomes DONE and its caller's
future is resolved.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..domain import Priority

P = TypeVar("P")


@dataclass(frozen=True)
class Job(Generic[P]):
    """One unit of work as the caller describes it."""

    payload: P
    key: Hashable
    cost: int = 1
    """Input size in tokens: orders jobs and counts against `max_batch_tokens`."""
    deadline: float | None = None
    """Absolute `time.monotonic()` after which the result is useless."""
    trace: object = None
    """The span the job's work belongs to (service/serving/tracing.py), or None. The batcher
    does not look inside: it hands it to the `on_batch` hook in `BatchReport.traces`."""
    priority: Priority = Priority.DEFAULT
    """Its class: the scheduling policy (policy.py) serves more urgent classes first."""


class JobState(enum.Enum):
    QUEUED = "queued"
    """Held by the queue and counted in its depth."""
    RUNNING = "running"
    """Cut into a batch: an executor has it (in the engine, or waiting for a retry)."""
    DONE = "done"
    """Delivered, failed, or dropped. Final."""


class DropReason(enum.Enum):
    """Why a job left the batcher without a result from the model (one count per job)."""

    CANCELLED = "cancelled"
    """Its caller went away (cancelled the call, or its result task) while it queued."""
    DEADLINE_PASSED = "deadline_passed"
    DEADLINE_UNMEETABLE = "deadline_unmeetable"
    """Its deadline was closer than the fastest recent batch of its key took."""
    SHUTDOWN = "shutdown"
    DISPLACED = "displaced"
    """Queued less urgent work pushed out of a full queue by more urgent work (its caller gets
    RESOURCE_EXHAUSTED at once)."""


@dataclass(frozen=True)
class Drop:
    """The queue policy's verdict that a job is not worth running: why, and what its caller gets."""

    reason: DropReason
    error: BaseException


class InvariantViolation(AssertionError):
    """The batcher's bookkeeping disagrees with itself (raised only with check_invariants)."""


@dataclass(eq=False)
class Entry(Generic[P]):
    """A submitted job, its caller's future and where it stands."""

    job: Job[P]
    future: asyncio.Future
    enqueued_at: float
    state: JobState = JobState.QUEUED

    def resolve(self, *, result: object = None, error: BaseException | None = None,
                strict: bool = False) -> None:
        """-> DONE, resolving the future unless its caller already went (a caller may cancel at
        any moment, including while its job runs). Resolving twice is a no-op, or with `strict`
        an InvariantViolation."""
        if self.state is JobState.DONE:
            if strict:
                raise InvariantViolation("a job was finished twice")
            return
        self.state = JobState.DONE
        if not self.future.done():
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)


@dataclass
class BatcherStats:
    """Counters of the queue and the executor together: the queue counts the jobs it drops, the
    executor the batches it runs, their failures and the jobs it drops between retries. A job ends
    once, so it is counted once."""

    batches: int = 0
    jobs: int = 0
    failed_batches: int = 0
    """Engine calls that raised (a batch that is split and retried counts once per failed try)."""
    failed_jobs: int = 0
    """Jobs that failed on their own, after isolation."""
    dropped_by_reason: collections.Counter[DropReason] = field(
        default_factory=collections.Counter)
    """Jobs that never got a result from the model, each counted once, under one reason."""

    admitted_by_priority: collections.Counter[Priority] = field(
        default_factory=collections.Counter)
    """Jobs queued, by class."""
    refused_by_priority: collections.Counter[Priority] = field(
        default_factory=collections.Counter)
    """Jobs refused at admission (a full queue: RESOURCE_EXHAUSTED), by class."""
    displaced_by_priority: collections.Counter[Priority] = field(
        default_factory=collections.Counter)
    """Queued jobs pushed out by more urgent work (also counted under DropReason.DISPLACED)."""
    paused_steps_by_priority: collections.Counter[Priority] = field(
        default_factory=collections.Counter)
    """Continuous batching: article-steps sat out (StepIn.pause) so more urgent work decoded
    alone, by the paused article's class."""

    @property
    def dropped(self) -> int:
        return sum(self.dropped_by_reason.values())

    @property
    def hopeless(self) -> int:
        """Jobs dropped because their deadline was closer than a batch takes."""
        return self.dropped_by_reason[DropReason.DEADLINE_UNMEETABLE]

    @property
    def mean_batch_size(self) -> float:
        return self.jobs / self.batches if self.batches else 0.0
