"""Server-loop batching: collect work from all concurrent calls into batches for one model worker.

The batcher knows nothing of models or torch. It is given `run_batch(key, payloads) -> results`, a
blocking function that it calls in one dedicated worker thread, never on the event loop, so the loop
stays free to accept, validate, cancel and answer health checks while the model works.

Scheduling rules:
- Only jobs with equal `key` (e.g. equal generation options) share a batch.
- Adaptive wait: while the worker is busy, jobs simply queue; when it is free, a batch is cut at once
  if enough work is queued, else the oldest job waits at most `max_wait_ms` (from its arrival) for
  others to join. Load makes batches bigger without adding latency at low load.
- Fairness: each caller is a group (one `submit` call, or every call that names the same `group`); a
  batch takes jobs round-robin across groups, and the next batch's key is that of the group whose
  turn it is, so a caller with one article is in the next batch even behind a caller with hundreds
  of jobs, whatever their keys.
- Padding: a group's jobs are taken shortest first, so successive batches hold similar lengths;
  when more groups have work than a batch holds, the first group in round-robin order is always
  served and the others are chosen by how close their next job's length is to its job's; and
  `max_batch_tokens` caps a batch's padded size (batch size x longest input).
- Cancelled jobs and jobs past their deadline are dropped before a batch is cut; they never reach
  the worker. So are jobs whose deadline is closer than the fastest of the last few batches with
  their key took: they could not finish in time, so they don't take a slot someone else can use.
  A cancelled job leaves the queue at once, so its payload (token ids) is freed at once.
- Failure isolation: when `run_batch` raises, the batch is retried in halves, down to single jobs,
  so only the input that makes the engine fail gets the error; its batch-mates get their results.
  The scheduler loop itself survives anything.
- Each job has its own future, so a caller only ever receives its own results.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ..errors import DeadlineExceeded, GenerationFailed, QueueFull, Unavailable

log = logging.getLogger(__name__)

P = TypeVar("P")
R = TypeVar("R")
RunBatch = Callable[[Hashable, list[P]], Sequence[R]]

RECENT_BATCHES = 8
"""How many recent batch durations per key inform the "deadline cannot be met" check."""


@dataclass(frozen=True)
class Job(Generic[P]):
    """One unit of work as the caller describes it."""

    payload: P
    key: Hashable
    cost: int = 1
    """Input size in tokens: orders jobs and counts against `max_batch_tokens`."""
    deadline: float | None = None
    """Absolute `time.monotonic()` after which the result is useless."""


@dataclass(frozen=True)
class BatchReport:
    """What one engine call did, for metrics: handed to the `on_batch` hook after every call."""

    key: Hashable
    costs: tuple[int, ...]
    """Each job's cost (input tokens), in batch order."""
    waited_s: tuple[float, ...]
    """How long each job queued, from submit to the start of this call."""
    duration_s: float
    failed: bool

    @property
    def padding_ratio(self) -> float:
        """Share of a padded batch (size x longest input) that is padding."""
        if not self.costs or max(self.costs) == 0:
            return 0.0
        return 1.0 - sum(self.costs) / (len(self.costs) * max(self.costs))


class _State(enum.Enum):
    QUEUED = "queued"
    """In its group's deque and counted in `queue_depth`."""
    RUNNING = "running"
    """Cut into a batch (in `_running`): the engine has it, or it waits for a retry."""
    DONE = "done"
    """Out of the batcher: delivered, failed, or dropped. Final."""


class DropReason(enum.Enum):
    """Why a job left the batcher without a result from the model (one count per job)."""

    CANCELLED = "cancelled"
    """Its caller went away (cancelled the call, or its result task) while it queued."""
    DEADLINE_PASSED = "deadline_passed"
    DEADLINE_UNMEETABLE = "deadline_unmeetable"
    """Its deadline was closer than the fastest recent batch of its key took."""
    SHUTDOWN = "shutdown"


@dataclass(eq=False)
class _Entry:
    job: Job
    future: asyncio.Future
    enqueued_at: float
    state: _State = _State.QUEUED
    group: _Group | None = None


@dataclass(eq=False)
class _Group:
    """The queued jobs of one caller, shortest first."""

    entries: collections.deque[_Entry] = field(default_factory=collections.deque)
    owner: Hashable | None = None


@dataclass
class BatcherStats:
    batches: int = 0
    jobs: int = 0
    failed_batches: int = 0
    """Engine calls that raised (a batch that is split and retried counts once per failed try)."""
    failed_jobs: int = 0
    """Jobs that failed on their own, after isolation."""
    dropped_by_reason: collections.Counter[DropReason] = field(
        default_factory=collections.Counter)
    """Jobs that never got a result from the model, each counted once, under one reason."""

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


class InvariantViolation(AssertionError):
    """The batcher's bookkeeping disagrees with itself (raised only with check_invariants)."""


class Batcher(Generic[P, R]):
    """Every job submitted is resolved exactly once: with its result, its own error, or the
    reason it was dropped. Two structures hold live jobs, each changed only through `_take`,
    `_drop` and `_finish`: the groups (queued jobs, counted by `queue_depth`) and `_running`
    (jobs cut into a batch, until delivered). With `check_invariants`, every change is checked
    against the other (for tests)."""

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, max_batch_tokens: int = 0,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 check_invariants: bool = False) -> None:
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
        self.check_invariants = check_invariants
        self._clock = clock
        self._on_batch = on_batch
        self._groups: collections.deque[_Group] = collections.deque()
        self._queued = 0
        self._running: set[_Entry] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._recent_s: dict[Hashable, collections.deque[float]] = {}
        self._in_engine = False
        self.stats = BatcherStats()

    # ----- lifecycle -----
    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("batcher already started")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop taking work, let the running batch finish (for at most `timeout_s`; its callers
        get UNAVAILABLE after that), fail what is still queued."""
        self._closed = True
        self._wakeup.set()
        if self._task is not None:
            try:
                # Returns once the running batch (if any) has been delivered.
                await asyncio.wait_for(asyncio.shield(self._task), timeout_s)
            except TimeoutError:
                log.warning("the running batch did not finish in time; its callers get "
                            "UNAVAILABLE")
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            self._task = None
        shutting_down = Unavailable("server is shutting down")
        for entry in list(self._running):
            self._finish(entry, error=shutting_down)
        for group in list(self._groups):
            for entry in list(group.entries):
                self._drop(entry, DropReason.SHUTDOWN, shutting_down)
        self._groups.clear()
        self._check()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None

    @property
    def worker_busy(self) -> bool:
        """True while the model thread is still inside `run_batch` (even after stop gave up)."""
        return self._in_engine

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for the worker (not counting the running batch)."""
        return self._queued

    @property
    def running(self) -> int:
        """Jobs cut into the current batch and not yet delivered."""
        return len(self._running)

    # ----- submitting -----
    def submit(self, jobs: Sequence[Job[P]], *,
               group: Hashable | None = None) -> list[asyncio.Future[R]]:
        """Queue `jobs`, all or none; one future per job, in the order given. They join the queued
        jobs of an earlier call that named the same `group` (one caller: one round-robin turn),
        else they form a group of their own.

        Raises QueueFull when the jobs do not all fit, Unavailable once stopped.
        """
        if self._closed or self._task is None or self._task.done():
            raise Unavailable("server is not accepting work")
        if self._queued + len(jobs) > self.max_queue:
            raise QueueFull(
                f"server queue is full ({self._queued} of {self.max_queue} articles waiting); "
                "retry later")
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [_Entry(job, loop.create_future(), now) for job in jobs]
        if entries:
            joined = next((g for g in self._groups if group is not None and g.owner == group),
                          None)
            if joined is None:
                joined = _Group(owner=group)
                self._groups.append(joined)
            for entry in entries:
                entry.group = joined
                entry.future.add_done_callback(lambda _f, e=entry: self._on_done(e))
            joined.entries = collections.deque(
                sorted([*joined.entries, *entries], key=lambda e: e.job.cost))
            self._queued += len(entries)
            self._wakeup.set()
            self._check()
        return [entry.future for entry in entries]

    async def admit(self, jobs: Sequence[Job[P]], *, group: Hashable | None = None,
                    deadline: float | None = None) -> list[asyncio.Future[R]]:
        """`submit`, waiting for room until `deadline` (QueueFull after it)."""
        while True:
            try:
                return self.submit(jobs, group=group)
            except QueueFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    def _on_done(self, entry: _Entry) -> None:
        # A queued job's future finished early (its caller cancelled it): it leaves the queue
        # now, not at the next cut, so its payload is freed while the worker is busy.
        if entry.state is _State.QUEUED:
            self._drop(entry, DropReason.CANCELLED, None)

    # ----- the only places where a job changes state -----
    def _take(self, entry: _Entry) -> None:
        """QUEUED -> RUNNING: out of its group, into the batch being cut."""
        assert entry.state is _State.QUEUED and entry.group is not None
        entry.group.entries.remove(entry)
        entry.group = None
        entry.state = _State.RUNNING
        self._queued -= 1
        self._running.add(entry)

    def _drop(self, entry: _Entry, reason: DropReason, error: BaseException | None) -> None:
        """QUEUED or RUNNING -> DONE without a result from the model: counted once, under
        `reason`; the caller gets `error` (None: the future is already done)."""
        if entry.state is _State.DONE:
            return
        if entry.state is _State.QUEUED:
            if entry.group is not None:
                entry.group.entries.remove(entry)
                entry.group = None
            self._queued -= 1
            entry.state = _State.RUNNING  # out of the queue; _finish takes it from here
        self.stats.dropped_by_reason[reason] += 1
        self._finish(entry, error=error)

    def _finish(self, entry: _Entry, *, result: object = None,
                error: BaseException | None = None) -> None:
        """Any state -> DONE, resolving the future unless its caller already went (a caller may
        cancel at any moment, including while its job runs)."""
        if entry.state is _State.DONE:
            if self.check_invariants:
                raise InvariantViolation("a job was finished twice")
            return
        if entry.state is _State.QUEUED:  # only _drop and stop() end queued jobs
            raise InvariantViolation("a queued job finished without leaving the queue")
        entry.state = _State.DONE
        self._running.discard(entry)
        if not entry.future.done():
            if error is not None:
                entry.future.set_exception(error)
            else:
                entry.future.set_result(result)

    def _check(self) -> None:
        """With check_invariants: the queue count is the jobs queued, no job is both queued and
        running, and nothing finished is still held."""
        if not self.check_invariants:
            return
        queued = [e for g in self._groups for e in g.entries]
        problems = []
        if len(queued) != self._queued:
            problems.append(f"queue_depth {self._queued} but {len(queued)} jobs queued")
        if len(set(map(id, queued))) != len(queued):
            problems.append("a job is queued twice")
        if any(e.state is not _State.QUEUED for e in queued):
            problems.append("a job in the queue is not in state QUEUED")
        if any(e.group is None or e not in e.group.entries for e in queued):
            problems.append("a queued job does not know its group")
        if any(e.state is not _State.RUNNING for e in self._running):
            problems.append("a job in the running set is not in state RUNNING")
        if {id(e) for e in queued} & {id(e) for e in self._running}:
            problems.append("a job is both queued and running")
        if len(self._running) > self.max_batch_size:
            problems.append(f"{len(self._running)} jobs running, over max_batch_size")
        if problems:
            raise InvariantViolation("; ".join(problems))

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
            except Exception as error:  # the loop must survive anything
                log.exception("batch scheduler error; continuing")
                if isinstance(error, InvariantViolation):
                    raise
            finally:
                # Whatever happened, no job cut into a batch is left waiting: the batch is over.
                for entry in list(self._running):
                    self._finish(entry, error=GenerationFailed(
                        "the batch scheduler failed while this article was in a batch"))
                self._check()

    async def _next_batch(self) -> tuple[Hashable, list[_Entry]] | None:
        while not self._closed:
            self._wakeup.clear()
            oldest = self._prune()
            if oldest is None:
                await self._wakeup.wait()
                continue
            now = self._clock()
            ready_by = oldest.enqueued_at + self.max_wait_s
            # Whose turn it is decides the key: served groups go to the back (see _cut).
            turn = self._groups[0].entries[0].job.key
            if now >= ready_by:
                return turn, self._cut(turn)
            full = self._full_key(turn)
            if full is not None:
                return full, self._cut(full)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=ready_by - now)
            except TimeoutError:
                pass
        return None

    def _prune(self) -> _Entry | None:
        """Drop finished and expired jobs and empty groups; return the oldest live job, if
        any."""
        now = self._clock()
        oldest: _Entry | None = None
        for group in list(self._groups):
            for entry in list(group.entries):
                if entry.future.done():  # cancelled; its done-callback has not run yet
                    self._drop(entry, DropReason.CANCELLED, None)
                elif not self._expire(entry, now) and (
                        oldest is None or entry.enqueued_at < oldest.enqueued_at):
                    oldest = entry
            if not group.entries:
                self._groups.remove(group)
        self._check()
        return oldest

    def _expire(self, entry: _Entry, now: float) -> bool:
        """Drop `entry` if its deadline has passed or is closer than a batch of its key takes."""
        deadline = entry.job.deadline
        if deadline is None:
            return False
        if deadline <= now:
            self._drop(entry, DropReason.DEADLINE_PASSED,
                       DeadlineExceeded("deadline passed while waiting for the model"))
            return True
        recent = self._recent_s.get(entry.job.key)
        fastest = min(recent) if recent else 0.0
        if deadline < now + fastest:
            self._drop(entry, DropReason.DEADLINE_UNMEETABLE, DeadlineExceeded(
                f"deadline is {deadline - now:.2f}s away, but a batch takes at least "
                f"{fastest:.2f}s; give the call a longer deadline"))
            return True
        return False

    def _full_key(self, preferred: Hashable) -> Hashable | None:
        """A key with a full batch queued (`preferred` first), or None."""
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
        anchor: int | None = None
        while progress and len(batch) < self.max_batch_size:
            progress = False
            offers = []  # each group's next job of `key`, in round-robin order
            for group in self._groups:
                entry = next((e for e in group.entries if e.job.key == key), None)
                if entry is not None and id(group) not in full_groups:
                    offers.append((group, entry))
            if anchor is None and offers:
                anchor = offers[0][1].job.cost  # the first group in line is always served
            # The rest by closeness of length to it: less padding when not all fit.
            offers.sort(key=lambda offer: abs(offer[1].job.cost - (anchor or 0)))
            for group, entry in offers:
                if len(batch) >= self.max_batch_size:
                    break
                new_longest = max(longest, entry.job.cost)
                if (batch and self.max_batch_tokens
                        and new_longest * (len(batch) + 1) > self.max_batch_tokens):
                    full_groups.add(id(group))
                    continue
                self._take(entry)
                batch.append(entry)
                served.add(id(group))
                longest = new_longest
                progress = True
        # Groups served in this batch go to the back, so the next batch starts with the others:
        # round-robin carries over from batch to batch.
        self._groups = collections.deque(
            [g for g in self._groups if g.entries and id(g) not in served]
            + [g for g in self._groups if g.entries and id(g) in served])
        self._check()
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, key: Hashable,
                       entries: list[_Entry]) -> None:
        """Run a batch; if the engine raises, retry the batch in halves down to single jobs, so
        only the inputs that fail on their own get the error. Every entry is finished when this
        returns, however it returns (see `_loop`)."""
        parts: list[list[_Entry]] = [entries]
        try:
            while parts:
                # A caller may have gone, or a deadline passed, since the cut (or the last try):
                # don't spend the model on it.
                now = self._clock()
                part = []
                for entry in parts.pop():
                    if entry.future.done():
                        self._finish(entry)  # its caller went while it waited for this try
                    elif not self._expire(entry, now):
                        part.append(entry)
                if not part:
                    continue
                error = await self._run(loop, key, part)
                if error is None:
                    continue
                self.stats.failed_batches += 1
                if len(part) == 1:
                    self.stats.failed_jobs += 1
                    log.error("input failed on its own (%s)", type(error).__name__,
                              exc_info=error)
                    self._finish(part[0], error=error)
                else:
                    # The type only: an engine's message could quote the input.
                    log.warning("batch of %d failed (%s); retrying it in halves to isolate the "
                                "failing input", len(part), type(error).__name__)
                    middle = len(part) // 2
                    parts += [part[middle:], part[:middle]]  # the first half runs first
        except asyncio.CancelledError:
            for entry in (e for part in parts for e in part):
                self._finish(entry, error=Unavailable("server is shutting down"))
            raise

    async def _run(self, loop: asyncio.AbstractEventLoop, key: Hashable,
                   entries: list[_Entry]) -> BaseException | None:
        """One engine call; delivers the results, or returns what went wrong."""
        payloads = [e.job.payload for e in entries]
        started = self._clock()
        try:
            results = await loop.run_in_executor(self._executor, self._tracked, key, payloads)
            if len(results) != len(entries):
                raise GenerationFailed(
                    f"engine returned {len(results)} results for {len(entries)} inputs")
        except asyncio.CancelledError:
            for entry in entries:
                self._finish(entry, error=Unavailable("server is shutting down"))
            raise
        except Exception as error:  # noqa: BLE001 - isolated and reported by the caller
            self._report(key, entries, started, failed=True)
            return error
        except BaseException as error:  # noqa: BLE001 - e.g. SystemExit raised inside the engine
            self._report(key, entries, started, failed=True)
            return GenerationFailed(f"engine raised {type(error).__name__}: {error}")
        elapsed = self._report(key, entries, started, failed=False)
        self._recent_s.setdefault(key, collections.deque(maxlen=RECENT_BATCHES)).append(elapsed)
        self.stats.batches += 1
        self.stats.jobs += len(entries)
        log.debug("batch of %d done in %.3fs", len(entries), elapsed)
        for entry, result in zip(entries, results):
            self._finish(entry, result=result)
        return None

    def _report(self, key: Hashable, entries: list[_Entry], started: float, *,
                failed: bool) -> float:
        elapsed = self._clock() - started
        if self._on_batch is not None:
            try:
                self._on_batch(BatchReport(
                    key=key, costs=tuple(e.job.cost for e in entries),
                    waited_s=tuple(max(0.0, started - e.enqueued_at) for e in entries),
                    duration_s=elapsed, failed=failed))
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_batch hook failed")
        return elapsed

    def _tracked(self, key: Hashable, payloads: list[P]) -> Sequence[R]:
        # Runs in the worker thread.
        self._in_engine = True
        try:
            return self._run_batch(key, payloads)
        finally:
            self._in_engine = False
