"""Server-loop batching: collect work from all concurrent calls into batches for one model worker.

The batcher knows nothing of models or torch. It is given `run_batch(key, payloads) -> results`, a
blocking function that it calls in one dedicated worker thread, never on the event loop, so the loop
stays free to accept, validate, cancel and answer health checks while the model works.

Scheduling rules:
- Only jobs with equal `key` (e.g. equal generation options) share a batch.
- Adaptive wait: while the worker is busy, jobs simply queue; when it is free, a batch is cut at once
  if enough work is queued, else the oldest job waits at most `max_wait_ms` (from its arrival) for
  others to join. Load makes batches bigger without adding latency at low load.
- Fairness: each `submit` call is a group; a batch takes jobs round-robin across groups, so a caller
  with one article is in the next batch even behind a caller with hundreds.
- Padding: a group's jobs are taken shortest first, so successive batches hold similar lengths, and
  `max_batch_tokens` caps a batch's padded size (batch size x longest input).
- Cancelled jobs and jobs past their deadline are dropped before a batch is cut; they never reach
  the worker. Each job has its own future, so a caller only ever receives its own results.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .errors import DeadlineExceeded, GenerationFailed, QueueFull, Unavailable

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
RunBatch = Callable[[Hashable, list[P]], Sequence[R]]


@dataclass(frozen=True)
class Job(Generic[P]):
    """One unit of work as the caller describes it."""

    payload: P
    key: Hashable
    cost: int = 1
    """Input size in tokens: orders jobs and counts against `max_batch_tokens`."""
    deadline: float | None = None
    """Absolute `time.monotonic()` after which the result is useless."""


class _State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"


@dataclass(eq=False)
class _Entry:
    job: Job
    future: asyncio.Future
    enqueued_at: float
    state: _State = _State.QUEUED


@dataclass(eq=False)
class _Group:
    """The jobs of one `submit` call, shortest first."""

    entries: collections.deque[_Entry] = field(default_factory=collections.deque)


@dataclass
class BatcherStats:
    batches: int = 0
    jobs: int = 0
    dropped: int = 0
    failed_batches: int = 0

    @property
    def mean_batch_size(self) -> float:
        return self.jobs / self.batches if self.batches else 0.0


class Batcher(Generic[P, R]):
    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, max_batch_tokens: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if max_wait_ms < 0 or max_batch_tokens < 0:
            raise ValueError("max_wait_ms and max_batch_tokens must not be negative")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self._clock = clock
        self._groups: collections.deque[_Group] = collections.deque()
        self._queued = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self.stats = BatcherStats()

    # ----- lifecycle -----
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self) -> None:
        """Stop taking work, let the running batch finish, fail what is still queued."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            await self._task  # returns once the running batch (if any) has been delivered
            self._task = None
        for group in self._groups:
            for entry in group.entries:
                if entry.state is _State.QUEUED and not entry.future.done():
                    entry.state = _State.DROPPED
                    entry.future.set_exception(Unavailable("server is shutting down"))
        self._groups.clear()
        self._queued = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not counting the running batch)."""
        return self._queued

    # ----- submitting -----
    def submit(self, jobs: Sequence[Job[P]]) -> list[asyncio.Future[R]]:
        """Queue `jobs` as one group, all or none; one future per job, in the order given.

        Raises QueueFull when the jobs do not all fit, Unavailable once stopped.
        """
        if self._closed or self._task is None:
            raise Unavailable("server is not accepting work")
        if self._queued + len(jobs) > self.max_queue:
            raise QueueFull(
                f"server queue is full ({self._queued} of {self.max_queue} articles waiting); "
                "retry later")
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [_Entry(job, loop.create_future(), now) for job in jobs]
        for entry in entries:
            entry.future.add_done_callback(lambda _f, e=entry: self._on_done(e))
        if entries:
            ordered = sorted(entries, key=lambda e: e.job.cost)
            self._groups.append(_Group(collections.deque(ordered)))
            self._queued += len(entries)
            self._wakeup.set()
        return [entry.future for entry in entries]

    def _on_done(self, entry: _Entry) -> None:
        # A queued job's future finished early (cancelled by its caller, or expired).
        if entry.state is _State.QUEUED:
            entry.state = _State.DROPPED
            self._queued -= 1
            self.stats.dropped += 1

    # ----- scheduling -----
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                batch = await self._next_batch()
                if batch is not None:
                    await self._execute(loop, *batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # the loop must survive anything
                log.exception("batch scheduler error; continuing")

    async def _next_batch(self) -> tuple[Hashable, list[_Entry]] | None:
        while not self._closed:
            self._wakeup.clear()
            oldest = self._prune()
            if oldest is None:
                await self._wakeup.wait()
                continue
            now = self._clock()
            ready_by = oldest.enqueued_at + self.max_wait_s
            if now >= ready_by:
                return oldest.job.key, self._cut(oldest.job.key)
            full = self._full_key(oldest.job.key)
            if full is not None:
                return full, self._cut(full)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=ready_by - now)
            except TimeoutError:
                pass
        return None

    def _prune(self) -> _Entry | None:
        """Drop finished and expired jobs; return the oldest live job, if any."""
        now = self._clock()
        oldest: _Entry | None = None
        for group in list(self._groups):
            live = collections.deque()
            for entry in group.entries:
                if entry.future.done():
                    continue
                if entry.job.deadline is not None and entry.job.deadline <= now:
                    entry.future.set_exception(
                        DeadlineExceeded("deadline passed while waiting for the model"))
                    continue
                live.append(entry)
                if oldest is None or entry.enqueued_at < oldest.enqueued_at:
                    oldest = entry
            group.entries = live
            if not live:
                self._groups.remove(group)
        return oldest

    def _full_key(self, preferred: Hashable) -> Hashable | None:
        """A key with a full batch queued (the oldest job's key first), or None."""
        counts: dict[Hashable, int] = collections.Counter(
            e.job.key for g in self._groups for e in g.entries)
        if counts.get(preferred, 0) >= self.max_batch_size:
            return preferred
        return next((k for k, n in counts.items() if n >= self.max_batch_size), None)

    def _cut(self, key: Hashable) -> list[_Entry]:
        """Take up to a batch of `key` jobs, round-robin across groups, within the token cap."""
        batch: list[_Entry] = []
        longest = 0
        full_groups: set[int] = set()
        served: set[int] = set()
        progress = True
        while progress and len(batch) < self.max_batch_size:
            progress = False
            for group in self._groups:
                if len(batch) >= self.max_batch_size:
                    break
                if id(group) in full_groups:
                    continue
                entry = next((e for e in group.entries if e.job.key == key), None)
                if entry is None:
                    continue
                new_longest = max(longest, entry.job.cost)
                if (batch and self.max_batch_tokens
                        and new_longest * (len(batch) + 1) > self.max_batch_tokens):
                    full_groups.add(id(group))
                    continue
                group.entries.remove(entry)
                entry.state = _State.RUNNING
                self._queued -= 1
                batch.append(entry)
                served.add(id(group))
                longest = new_longest
                progress = True
        # Groups served in this batch go to the back, so the next batch starts with the others:
        # round-robin carries over from batch to batch.
        self._groups = collections.deque(
            [g for g in self._groups if g.entries and id(g) not in served]
            + [g for g in self._groups if g.entries and id(g) in served])
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, key: Hashable,
                       entries: list[_Entry]) -> None:
        # A caller may have gone between the cut and now; don't spend the model on it.
        entries = [e for e in entries if not e.future.done()]
        if not entries:
            return
        payloads = [e.job.payload for e in entries]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, key, payloads)
            if len(results) != len(entries):
                raise GenerationFailed(
                    f"engine returned {len(results)} results for {len(entries)} inputs")
        except asyncio.CancelledError:
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(Unavailable("server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - reported to each caller of the batch
            log.exception("batch of %d failed", len(entries))
            self.stats.failed_batches += 1
            for entry in entries:
                if not entry.future.done():
                    entry.future.set_exception(error)
            return
        self.stats.batches += 1
        self.stats.jobs += len(entries)
        log.debug("batch of %d done in %.3fs", len(entries), time.perf_counter() - started)
        for entry, result in zip(entries, results):
            if not entry.future.done():
                entry.future.set_result(result)
