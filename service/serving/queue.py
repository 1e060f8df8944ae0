"""The queue policy: which jobs are admitted, and which go next. It runs nothing.

Whoever runs batches PULLS them: when it has room it awaits `next_batch()`, and the queue cuts the
best batch it can give now. So the policy works the same for a worker thread in this process, a
worker in another process, or one that batches continuously and asks whenever a slot frees.

Admission:
- `max_queue` bounds the jobs queued (a running batch does not count). `submit` is all or none and
  refuses at once (QueueFull) what does not fit now; `admit` waits for room instead, woken when
  jobs leave the queue (taken into a batch, cancelled, expired), never by a timer, first come first
  served: a waiting call of many jobs is not overtaken by later small ones, nor by later `submit`s.
  A call that could never fit (more jobs than `max_queue`) is refused at once; one whose deadline
  passes while it waits is refused then.

Scheduling rules (`next_batch`):
- Only jobs with equal `key` (e.g. equal generation options) share a batch.
- Adaptive wait: when the executor asks, a batch is cut at once if enough work is queued, else the
  oldest job waits at most `max_wait_ms` (from its arrival) for others to join. While the executor
  is busy it does not ask, and jobs simply queue: load makes batches bigger without adding latency
  at low load.
- Fairness: each caller is a group (one `submit` call, or every call that names the same `group`); a
  batch takes jobs round-robin across groups, and the next batch's key is that of the group whose
  turn it is, so a caller with one article is in the next batch even behind a caller with hundreds
  of jobs, whatever their keys.
- Padding: a group's jobs are taken shortest first, so successive batches hold similar lengths;
  when more groups have work than a batch holds, the first group in round-robin order is always
  served and the others are chosen by how close their next job's length is to its job's; and
  `max_batch_tokens` caps a batch's padded size (batch size x longest input).
- Continuous batching (`share_keys=True`, for `continuous.ContinuousExecutor`): keys no longer
  separate batches (articles with different options decode side by side), and the executor takes
  what is queued between decoding steps with `take_ready(limit)`, which never waits. Fairness,
  shortest first, admission and deadlines work as above; the token cap and `max_wait_ms` do not
  apply (the engine's cache budget bounds the work, and an idle engine starts at once).
- Cancelled jobs and jobs past their deadline are dropped before a batch is cut. So are jobs whose
  deadline is closer than the fastest of the last few batches with their key took (the executor
  reports durations through `record_duration`): they could not finish in time, so they don't take
  a slot someone else can use. A cancelled job leaves the queue at once, so its payload is freed.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic

from ..domain import RECENT_BATCHES
from ..errors import DeadlineExceeded, QueueFull, Unavailable
from .jobs import P, BatcherStats, Drop, DropReason, Entry, InvariantViolation, Job, JobState


@dataclass(eq=False)
class _Group:
    """The queued jobs of one caller, shortest first."""

    entries: collections.deque[Entry] = field(default_factory=collections.deque)
    owner: Hashable | None = None


@dataclass(eq=False)
class _Waiter:
    """A call of `admit` waiting for room for `size` jobs."""

    size: int
    deadline: float | None
    ticket: asyncio.Future[None]
    """Resolved when room is reserved for it (or with the reason it never will be)."""


class BatchQueue(Generic[P]):
    """Owns every queued job: the groups, their count, the admission waiters and the room reserved
    for them. A queued entry changes only in `_take` (into a batch) and `_drop` (out without a
    result); with `check_invariants`, every change is checked against the count."""

    def __init__(self, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 max_batch_tokens: int = 0, clock: Callable[[], float] = time.monotonic,
                 stats: BatcherStats | None = None, check_invariants: bool = False,
                 share_keys: bool = False) -> None:
        """`share_keys`: jobs of any key share a batch (continuous batching: the executor that
        pulls sends each job's key to the engine with it)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if max_wait_ms < 0 or max_batch_tokens < 0:
            raise ValueError("max_wait_ms and max_batch_tokens must not be negative")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.max_batch_tokens = max_batch_tokens
        self.check_invariants = check_invariants
        self.share_keys = share_keys
        self.stats = stats if stats is not None else BatcherStats()
        self._clock = clock
        self._groups: collections.deque[_Group] = collections.deque()
        self._group_of: dict[Entry, _Group] = {}
        self._queued = 0
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._granted: set[_Waiter] = set()
        """Waiters given room that have not yet queued their jobs (their task resumes next)."""
        self._recent_s: dict[Hashable, collections.deque[float]] = {}
        self._wakeup = asyncio.Event()
        self._open = False
        self._closed = False

    # ----- state -----
    @property
    def depth(self) -> int:
        """Jobs queued (not counting those handed out in a batch)."""
        return self._queued

    @property
    def waiting(self) -> int:
        """Calls of `admit` still waiting for room."""
        return len(self._waiters)

    @property
    def reserved(self) -> int:
        """Room promised to admitted waiters whose jobs are not queued yet."""
        return sum(w.size for w in self._granted)

    def fits_ever(self, n: int) -> bool:
        """Whether `n` jobs could ever be queued together."""
        return n <= self.max_queue

    def _has_room(self, n: int) -> bool:
        return self._queued + self.reserved + n <= self.max_queue

    # ----- lifecycle -----
    def open(self) -> None:
        """Start accepting work (once)."""
        if self._closed:
            raise RuntimeError("a closed queue cannot be opened again")
        self._open = True

    def close(self) -> None:
        """Stop accepting work: waiters get Unavailable, `next_batch` returns None. Queued jobs
        stay until `drain` (the running batch finishes first)."""
        self._closed = True
        self._open = False
        self._wakeup.set()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.ticket.done():
                waiter.ticket.set_exception(Unavailable("server is not accepting work"))
        self._check()

    def drain(self) -> None:
        """Drop every queued job as SHUTDOWN: its caller gets Unavailable."""
        shutting_down = Unavailable("server is shutting down")
        for group in list(self._groups):
            for entry in list(group.entries):
                self._drop(entry, Drop(DropReason.SHUTDOWN, shutting_down))
        self._groups.clear()
        self._check()

    # ----- admission -----
    def submit(self, jobs: Sequence[Job[P]], *,
               group: Hashable | None = None) -> list[asyncio.Future]:
        """Queue `jobs`, all or none; one future per job, in the order given. They join the queued
        jobs of an earlier call that named the same `group` (one caller: one round-robin turn),
        else they form a group of their own.

        Raises QueueFull when the jobs do not all fit now (or `admit` calls wait for room ahead of
        them), Unavailable when the queue is not open.
        """
        self._refuse_unless_open()
        if self._waiters or not self._has_room(len(jobs)):
            ahead = f"; {len(self._waiters)} calls wait for room" if self._waiters else ""
            raise QueueFull(
                f"server queue is full ({self._queued} of {self.max_queue} articles waiting"
                f"{ahead}); retry later")
        return self._enqueue(jobs, group)

    async def admit(self, jobs: Sequence[Job[P]], *, group: Hashable | None = None,
                    deadline: float | None = None) -> list[asyncio.Future]:
        """Queue `jobs` like `submit`, but wait for room if they do not fit now, in line behind
        earlier waiters, until `deadline` (absolute `time.monotonic()`).

        Raises QueueFull at once if the jobs could never fit, or when `deadline` passes while
        waiting; Unavailable when the queue is not open or closes while waiting. A waiter that is
        cancelled leaves nothing behind.
        """
        self._refuse_unless_open()
        if not self.fits_ever(len(jobs)):
            raise QueueFull(f"{len(jobs)} articles can never fit in the server queue (at most "
                            f"{self.max_queue}); send fewer at a time")
        if not self._waiters and self._has_room(len(jobs)):
            return self._enqueue(jobs, group)
        if deadline is not None and deadline <= self._clock():
            raise QueueFull("deadline passed while waiting for room in the server queue")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(len(jobs), deadline, loop.create_future())
        self._waiters.append(waiter)
        timer = (None if deadline is None else
                 loop.call_later(max(0.0, deadline - self._clock()), self._expire, waiter))
        try:
            await waiter.ticket
        except BaseException:  # cancelled, expired or closed: no trace left
            self._withdraw(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        self._granted.discard(waiter)
        self._refuse_unless_open()  # closed after room was given, before this task resumed
        return self._enqueue(jobs, group)

    def _refuse_unless_open(self) -> None:
        if not self._open:
            raise Unavailable("server is not accepting work")

    def _expire(self, waiter: _Waiter) -> None:
        """The waiter's deadline passed before room was given."""
        if not waiter.ticket.done():
            waiter.ticket.set_exception(
                QueueFull("deadline passed while waiting for room in the server queue"))
        self._withdraw(waiter)

    def _withdraw(self, waiter: _Waiter) -> None:
        """Take a waiter out of line, and give back room reserved for it."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
        self._granted.discard(waiter)
        self._serve_waiters()  # the next in line may fit now

    def _serve_waiters(self) -> None:
        """Give room to waiters, first come first served, while the first one fits. Called
        wherever jobs leave the queue: this, not a timer, is what wakes a waiter."""
        now = self._clock()
        while self._waiters:
            head = self._waiters[0]
            if head.ticket.done():  # cancelled; its task withdraws it when it runs
                self._waiters.popleft()
            elif head.deadline is not None and head.deadline <= now:
                self._waiters.popleft()
                head.ticket.set_exception(
                    QueueFull("deadline passed while waiting for room in the server queue"))
            elif self._has_room(head.size):
                self._waiters.popleft()
                self._granted.add(head)
                head.ticket.set_result(None)
            else:
                break
        self._check()

    def _enqueue(self, jobs: Sequence[Job[P]], group: Hashable | None) -> list[asyncio.Future]:
        loop = asyncio.get_running_loop()
        now = self._clock()
        entries = [Entry(job, loop.create_future(), now) for job in jobs]
        if entries:
            joined = next((g for g in self._groups if group is not None and g.owner == group),
                          None)
            if joined is None:
                joined = _Group(owner=group)
                self._groups.append(joined)
            for entry in entries:
                self._group_of[entry] = joined
                entry.future.add_done_callback(  # mypy infers no type for a default argument
                    lambda _f, e=entry: self._on_done(e))  # type: ignore[misc]
            joined.entries = collections.deque(
                sorted([*joined.entries, *entries], key=lambda e: e.job.cost))
            self._queued += len(entries)
            self._wakeup.set()
            self._check()
        return [entry.future for entry in entries]

    def _on_done(self, entry: Entry) -> None:
        # A queued job's future finished early (its caller cancelled it): it leaves the queue
        # now, not at the next cut, so its payload is freed while the worker is busy.
        if entry.state is JobState.QUEUED:
            self._drop(entry, Drop(DropReason.CANCELLED, asyncio.CancelledError()))
            self._serve_waiters()

    # ----- the only places where a queued job changes state -----
    def _take(self, entry: Entry) -> None:
        """QUEUED -> RUNNING: out of its group, into the batch being cut."""
        assert entry.state is JobState.QUEUED
        self._group_of.pop(entry).entries.remove(entry)
        entry.state = JobState.RUNNING
        self._queued -= 1

    def _drop(self, entry: Entry, drop: Drop) -> None:
        """QUEUED -> DONE without a result from the model: counted once, under its reason; the
        caller gets its error (unless the future is already done)."""
        if entry.state is not JobState.QUEUED:
            return
        group = self._group_of.pop(entry, None)
        if group is not None:
            group.entries.remove(entry)
        self._queued -= 1
        self.stats.dropped_by_reason[drop.reason] += 1
        entry.resolve(error=drop.error)

    def _check(self) -> None:
        """With check_invariants: the queue count is the jobs queued, each queued job is in state
        QUEUED and in its group, the queue holds no more than max_queue, and no waiter is both in
        line and given room."""
        if not self.check_invariants:
            return
        queued = [e for g in self._groups for e in g.entries]
        problems = []
        if len(queued) != self._queued:
            problems.append(f"queue depth {self._queued} but {len(queued)} jobs queued")
        if len(set(map(id, queued))) != len(queued):
            problems.append("a job is queued twice")
        if any(e.state is not JobState.QUEUED for e in queued):
            problems.append("a job in the queue is not in state QUEUED")
        if len(self._group_of) != len(queued) or any(
                e not in self._group_of or e not in self._group_of[e].entries for e in queued):
            problems.append("a queued job does not know its group")
        if self._queued + self.reserved > self.max_queue:
            problems.append(f"{self._queued} queued and {self.reserved} reserved, over max_queue")
        if self._granted.intersection(self._waiters):
            problems.append("a waiter is both in line and given room")
        if problems:
            raise InvariantViolation("; ".join(problems))

    # ----- deadlines -----
    def record_duration(self, key: Hashable, seconds: float) -> None:
        """A batch of `key` ran in `seconds`: informs which deadlines cannot be met."""
        self._recent_s.setdefault(key, collections.deque(maxlen=RECENT_BATCHES)).append(seconds)

    def should_drop(self, job: Job, now: float) -> Drop | None:
        """Whether `job` is not worth running at `now`: its deadline passed, or is closer than the
        fastest recent batch of its key took."""
        deadline = job.deadline
        if deadline is None:
            return None
        if deadline <= now:
            return Drop(DropReason.DEADLINE_PASSED,
                        DeadlineExceeded("deadline passed while waiting for the model"))
        recent = self._recent_s.get(job.key)
        fastest = min(recent) if recent else 0.0
        if deadline < now + fastest:
            return Drop(DropReason.DEADLINE_UNMEETABLE, DeadlineExceeded(
                f"deadline is {deadline - now:.2f}s away, but a batch takes at least "
                f"{fastest:.2f}s; give the call a longer deadline"))
        return None

    # ----- cutting batches -----
    async def next_batch(self) -> tuple[Hashable, list[Entry]] | None:
        """The next batch, for an executor that has room for one: cut at once if a batch's worth
        is queued or the oldest job has waited `max_wait_ms`, else when either becomes true.
        Returns None once the queue is closed. The entries are RUNNING: the caller owns them."""
        while not self._closed:
            self._wakeup.clear()
            oldest = self._prune()
            if oldest is None:
                await self._wakeup.wait()
                continue
            now = self._clock()
            ready_by = oldest.enqueued_at + self.max_wait_s
            # Whose turn it is decides the key: served groups go to the back (see _cut).
            turn = self._batch_key(self._groups[0].entries[0])
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

    def take_ready(self, limit: int) -> list[Entry]:
        """Up to `limit` queued jobs, now, without waiting (none once closed): what a continuous
        executor admits between decoding steps. Chosen as `next_batch` chooses (round-robin,
        shortest first), whatever their keys when `share_keys`. The entries are RUNNING: the
        caller owns them."""
        if self._closed or limit < 1 or self._prune() is None:
            return []
        return self._cut(self._batch_key(self._groups[0].entries[0]), limit)

    def _batch_key(self, entry: Entry) -> Hashable:
        """What must be equal for two jobs to share a batch: their key, or nothing when
        `share_keys`."""
        return None if self.share_keys else entry.job.key

    def _prune(self) -> Entry | None:
        """Drop finished and expired jobs and empty groups; return the oldest live job, if
        any."""
        now = self._clock()
        oldest: Entry | None = None
        for group in list(self._groups):
            for entry in list(group.entries):
                drop = (Drop(DropReason.CANCELLED, asyncio.CancelledError())
                        if entry.future.done()  # cancelled; its done-callback has not run yet
                        else self.should_drop(entry.job, now))
                if drop is not None:
                    self._drop(entry, drop)
                elif oldest is None or entry.enqueued_at < oldest.enqueued_at:
                    oldest = entry
            if not group.entries:
                self._groups.remove(group)
        self._serve_waiters()
        return oldest

    def _full_key(self, preferred: Hashable) -> Hashable | None:
        """A key with a full batch queued (`preferred` first), or None."""
        counts: dict[Hashable, int] = collections.Counter(
            self._batch_key(e) for g in self._groups for e in g.entries)
        if counts.get(preferred, 0) >= self.max_batch_size:
            return preferred
        return next((k for k, n in counts.items() if n >= self.max_batch_size), None)

    def _cut(self, key: Hashable, limit: int | None = None) -> list[Entry]:
        """Take up to a batch (or `limit`) of `key` jobs, round-robin across groups, within the
        token cap."""
        size = self.max_batch_size if limit is None else min(limit, self.max_batch_size)
        batch: list[Entry] = []
        longest = 0
        full_groups: set[int] = set()
        served: set[int] = set()
        progress = True
        anchor: int | None = None
        while progress and len(batch) < size:
            progress = False
            offers = []  # each group's next job of `key`, in round-robin order
            for group in self._groups:
                entry = next((e for e in group.entries if self._batch_key(e) == key), None)
                if entry is not None and id(group) not in full_groups:
                    offers.append((group, entry))
            if anchor is None and offers:
                anchor = offers[0][1].job.cost  # the first group in line is always served
            # The rest by closeness of length to it: less padding when not all fit.
            offers.sort(key=lambda offer: abs(offer[1].job.cost - (anchor or 0)))
            for group, entry in offers:
                if len(batch) >= size:
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
        if self.check_invariants and len(batch) > self.max_batch_size:
            raise InvariantViolation(f"a batch of {len(batch)} cut, over max_batch_size")
        self._serve_waiters()
        return batch
