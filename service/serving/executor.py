"""Execution: run the batches a queue hands out, isolate failing inputs, deliver every result.

The executor knows nothing of models, callers, groups or fairness. It pulls work when it has room
(`source.next_batch()`, see `BatchSource`), and runs each batch through `run_batch(key, payloads)
-> results`, a blocking function it calls in one dedicated worker thread, never on the event loop,
so the loop stays free to accept, validate, cancel and answer health checks while the model works.

The seam: `run_batch` is all an engine has to be. It gets a key (e.g. generation options) and
payloads, and returns one result per payload, in order, or raises. An engine in another process
plugs in behind that callable (send the batch, block for the reply) without the queue policy or
this module changing; a worker that wants to pull differently (several batches in flight, or
continuous batching) replaces this executor with another one that pulls from the same
`BatchSource` and resolves each entry it is handed exactly once.

- Failure isolation: when `run_batch` raises, the batch is retried in halves, down to single jobs,
  so only the input that makes the engine fail gets the error; its batch-mates get their results.
  The loop itself survives anything.
- Between tries, jobs whose caller went, or which the source says are no longer worth running
  (`should_drop`: a deadline passed or cannot be met), are not run.
- Each job has its own future, so a caller only ever receives its own results.
- After each successful call the source hears how long it took (`record_duration`), and the
  `on_batch` hook gets a `BatchReport` after every call (metrics, tracing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from ..errors import GenerationFailed, SummarizerError, Unavailable
from .jobs import P, BatcherStats, Drop, Entry, InvariantViolation, Job, JobState
from .runner import Runner

log = logging.getLogger(__name__)

R = TypeVar("R")
RunBatch = Callable[[Any, list[P]], Sequence[R]]
"""`run_batch(key, payloads) -> results`. The key is the queue's (Hashable) grouping key, typed
Any here so that a run_batch may name its concrete key type (generation.py: GenerationParams)."""


class BatchSource(Protocol):
    """What an executor needs from a queue policy."""

    async def next_batch(self) -> tuple[Hashable, list[Entry]] | None:
        """The next batch, when there is one (entries in state RUNNING); None: no more work."""

    def should_drop(self, job: Job, now: float) -> Drop | None:
        """Whether a job handed out is no longer worth running (checked before every try)."""

    def record_duration(self, key: Hashable, seconds: float) -> None:
        """How long a successful engine call with `key` took."""


@dataclass(frozen=True)
class BatchReport:
    """What one engine call did, for metrics and tracing: handed to the `on_batch` hook after
    every call."""

    key: Hashable
    costs: tuple[int, ...]
    """Each job's cost (input tokens), in batch order."""
    waited_s: tuple[float, ...]
    """How long each job queued, from submit to the start of this call."""
    duration_s: float
    failed: bool
    started_s: float = 0.0
    """When the call started, on the executor's clock (`time.monotonic()` unless a test gives
    another)."""
    traces: tuple[object, ...] = ()
    """Each job's `Job.trace`, in batch order."""
    isolation_depth: int = 0
    """0: the batch as the queue cut it; n: a part of it after n halvings, retried to isolate the
    input that made the engine fail (its jobs' queue wait ended at the first try)."""
    error_type: str = ""
    """The failed call's exception type (never its message: it could quote the input)."""
    priorities: tuple[int, ...] = ()
    """Each job's class (`domain.Priority`), in batch order."""
    decoding: bool = False
    """Continuous batching (continuous.py): not an engine call but one article, from its
    admission to the engine (`started_s`) until it finished (`duration_s`), beside others that
    joined and left between steps."""

    @property
    def padding_ratio(self) -> float:
        """Share of a padded batch (size x longest input) that is padding."""
        if not self.costs or max(self.costs) == 0:
            return 0.0
        return 1.0 - sum(self.costs) / (len(self.costs) * max(self.costs))


class Executor(Runner, Generic[P, R]):
    """Runs one batch at a time in one worker thread. Owns the entries it was handed (`running`)
    until each is resolved, in `_finish` only (or `_drop`, which counts and finishes)."""

    _source: BatchSource | None

    def __init__(self, run_batch: RunBatch, *, clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 stats: BatcherStats | None = None, check_invariants: bool = False,
                 on_exit: Callable[[], None] | None = None) -> None:
        super().__init__(on_exit)
        self._task_name = "batch-executor"
        self._run_batch = run_batch
        self._clock = clock
        self._on_batch = on_batch
        self.stats = stats if stats is not None else BatcherStats()
        self.check_invariants = check_invariants
        self._running: set[Entry] = set()
        self._in_batch = False

    # ----- for Runner -----
    def _has_work(self) -> bool:
        return self._in_batch

    def _late_message(self) -> str:
        return "the running batch did not finish in time; its callers get UNAVAILABLE"

    def _fail_remaining(self, error: BaseException) -> None:
        for entry in list(self._running):
            self._finish(entry, error=error)

    @property
    def running(self) -> int:
        """Jobs handed to this executor and not yet resolved."""
        return len(self._running)

    # ----- the loop -----
    async def _loop(self) -> None:
        assert self._source is not None
        while not self._stopping:
            try:
                batch = await self._source.next_batch()
                if batch is None:
                    return
                await self.execute(*batch)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the loop must survive anything
                log.exception("batch executor error; continuing")
                if isinstance(error, InvariantViolation):
                    raise
            finally:
                self._in_batch = False
                # Whatever happened, no job cut into a batch is left waiting: the batch is over.
                for entry in list(self._running):
                    self._finish(entry, error=GenerationFailed(
                        "the batch scheduler failed while this article was in a batch"))
                self._check()

    async def execute(self, key: Hashable, entries: list[Entry]) -> None:
        """Run a batch; if the engine raises, retry it in halves down to single jobs, so only the
        inputs that fail on their own get the error. Every entry is resolved when this returns
        normally (see `_loop` for the other ways out)."""
        self._in_batch = True
        self._running.update(entries)
        self._check()
        parts: list[tuple[list[Entry], int]] = [(entries, 0)]  # (jobs, halvings)
        try:
            while parts:
                part, depth = parts.pop()
                part = self._still_wanted(part)
                if not part:
                    continue
                error = await self._run(key, part, depth)
                if error is None:
                    continue
                self.stats.failed_batches += 1
                if isinstance(error, Unavailable):
                    # Not the input's fault (the engine is gone: shutdown, or workers in a crash
                    # loop): splitting would fail every half the same way. Callers may retry.
                    log.warning("batch of %d not run: %s", len(part), error.message)
                    for entry in part:
                        self._finish(entry, error=error)
                elif len(part) == 1:
                    self.stats.failed_jobs += 1
                    # Our own errors say what they are; anything else gets its traceback.
                    log.error("input failed on its own (%s)", type(error).__name__,
                              exc_info=None if isinstance(error, SummarizerError) else error)
                    self._finish(part[0], error=error)
                else:
                    # The type only: an engine's message could quote the input.
                    log.warning("batch of %d failed (%s); retrying it in halves to isolate the "
                                "failing input", len(part), type(error).__name__)
                    middle = len(part) // 2
                    # The first half runs first.
                    parts += [(part[middle:], depth + 1), (part[:middle], depth + 1)]
        except asyncio.CancelledError:
            for entry in (e for part, _ in parts for e in part):
                self._finish(entry, error=Unavailable("server is shutting down"))
            raise
        finally:
            self._in_batch = False

    def _still_wanted(self, part: list[Entry]) -> list[Entry]:
        """A caller may have gone, or a deadline passed, since the cut (or the last try): don't
        spend the model on it."""
        assert self._source is not None
        now = self._clock()
        wanted = []
        for entry in part:
            if entry.future.done():
                self._finish(entry)  # its caller went while it waited for this try
                continue
            drop = self._source.should_drop(entry.job, now)
            if drop is None:
                wanted.append(entry)
            else:
                self.stats.dropped_by_reason[drop.reason] += 1
                self._finish(entry, error=drop.error)
        return wanted

    async def _run(self, key: Hashable, entries: list[Entry],
                   depth: int = 0) -> BaseException | None:
        """One engine call; delivers the results, or returns what went wrong."""
        assert self._source is not None
        payloads = [e.job.payload for e in entries]
        started = self._clock()
        try:
            results = await self._in_worker(self._run_batch, key, payloads)
            if len(results) != len(entries):
                raise GenerationFailed(
                    f"engine returned {len(results)} results for {len(entries)} inputs")
        except asyncio.CancelledError:
            for entry in entries:
                self._finish(entry, error=Unavailable("server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - isolated and reported by the caller
            self._report(key, entries, started, depth, error)
            return error
        except BaseException as error:  # noqa: BLE001 - e.g. SystemExit raised inside the engine
            self._report(key, entries, started, depth, error)
            return GenerationFailed(f"engine raised {type(error).__name__}: {error}")
        elapsed = self._report(key, entries, started, depth)
        self._source.record_duration(key, elapsed)
        self.stats.batches += 1
        self.stats.jobs += len(entries)
        log.debug("batch of %d done in %.3fs", len(entries), elapsed)
        for entry, result in zip(entries, results):
            self._finish(entry, result=result)
        return None

    def _report(self, key: Hashable, entries: list[Entry], started: float, depth: int,
                error: BaseException | None = None) -> float:
        elapsed = self._clock() - started
        if self._on_batch is not None:
            try:
                self._on_batch(BatchReport(
                    key=key, costs=tuple(e.job.cost for e in entries),
                    waited_s=tuple(max(0.0, started - e.enqueued_at) for e in entries),
                    duration_s=elapsed, failed=error is not None, started_s=started,
                    traces=tuple(e.job.trace for e in entries), isolation_depth=depth,
                    priorities=tuple(int(e.job.priority) for e in entries),
                    error_type="" if error is None else type(error).__name__))
            except Exception:  # noqa: BLE001 - metrics and tracing must never break serving
                log.exception("on_batch hook failed")
        return elapsed

    # ----- the only place where a running job changes state -----
    def _finish(self, entry: Entry, *, result: object = None,
                error: BaseException | None = None) -> None:
        """RUNNING -> DONE: delivered, failed, or (the future already done) let go."""
        if entry.state is JobState.QUEUED:  # the queue ends queued jobs, never the executor
            raise InvariantViolation("a queued job finished without leaving the queue")
        self._running.discard(entry)
        entry.resolve(result=result, error=error, strict=self.check_invariants)

    def _check(self) -> None:
        """With check_invariants: everything held is RUNNING, and nothing is held between
        batches."""
        if not self.check_invariants:
            return
        problems = []
        if any(e.state is not JobState.RUNNING for e in self._running):
            problems.append("a job in the running set is not in state RUNNING")
        if self._running and not self._in_batch:
            problems.append(f"{len(self._running)} jobs held between batches")
        if problems:
            raise InvariantViolation("; ".join(problems))
