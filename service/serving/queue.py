"""Admission: which jobs are queued, and when. What runs next is the policy's (`policy.py`).

Whoever runs batches PULLS them: when it has room it awaits `next_batch()`, and the queue cuts the
best batch it can give now, as its `SchedulingPolicy` chooses (class, then round-robin across
callers, then shortest first; see policy.py). So the rules work the same for a worker thread in
this process, a worker in another process, or one that batches continuously and asks whenever a
slot frees.

Admission:
- `max_queue` bounds the jobs queued (a running batch does not count), and `class_limits` the
  jobs of each class (`domain.Priority`). `submit` is all or none and refuses at once (QueueFull)
  what does not fit now; `admit` waits for room instead, woken when jobs leave the queue (taken
  into a batch, cancelled, expired, displaced), never by a timer: the most urgent class first,
  then first come first served, so a waiting call of many jobs is not overtaken by later small
  ones of its class, nor by later `submit`s of its class or a less urgent one.
  A call that could never fit (more jobs than its class's limit) is refused at once; one whose
  deadline passes while it waits is refused then.
- Overload sheds the least urgent work first: when the queue as a whole is full, jobs of a more
  urgent class displace queued (never running) jobs of less urgent classes (the policy names
  them, `SchedulingPolicy.victims`); their callers get QueueFull (RESOURCE_EXHAUSTED) at once.

Timing (`next_batch`):
- Only jobs with equal `key` (e.g. equal generation options) share a batch.
- Adaptive wait: when the executor asks, a batch is cut at once if enough work is queued, else the
  oldest job waits at most `max_wait_ms` (from its arrival) for others to join. While the executor
  is busy it does not ask, and jobs simply queue: load makes batches bigger without adding latency
  at low load.
- Continuous batching (`share_keys=True`, for `continuous.ContinuousExecutor`): keys no longer
  separate batches (articles with different options decode side by side), and the executor takes
  what is queued between decoding steps with `take_ready(limit)`, which never waits. The policy's
  order, admission and deadlines work as above; the token cap and `max_wait_ms` do not apply (the
  engine's cache budget bounds the work, and an idle engine starts at once).
- Cancelled jobs and jobs past their deadline are dropped before a batch is cut. So are jobs whose
  deadline is closer than the fastest of the last few batches with their key took (the executor
  reports durations through `record_duration`): they could not finish in time, so they don't take
  a slot someone else can use. A cancelled job leaves the queue at once, so its payload is freed.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic

from ..domain import RECENT_BATCHES, Priority
from ..errors import DeadlineExceeded, QueueFull, Unavailable
from .jobs import P, BatcherStats, Drop, DropReason, Entry, InvariantViolation, Job, JobState
from .policy import CLASSES, SchedulingPolicy


@dataclass(eq=False)
class _Waiter:
    """A call of `admit` waiting for room for `size` jobs of one class."""

    size: int
    priority: Priority
    deadline: float | None
    ticket: asyncio.Future[None]
    """Resolved when room is reserved for it (or with the reason it never will be)."""
    arrival: int = 0


def _class_of(jobs: Sequence[Job]) -> Priority:
    """The most urgent class among `jobs` (a call's jobs share one): what admission weighs."""
    return min((job.priority for job in jobs), default=Priority.DEFAULT)


class BatchQueue(Generic[P]):
    """Owns every queued job: its state, the counts, the admission waiters and the room reserved
    for them; the policy holds the order. A queued entry changes only in `_take` (into a batch)
    and `_drop` (out without a result); with `check_invariants`, every change is checked."""

    def __init__(self, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 max_batch_tokens: int = 0, clock: Callable[[], float] = time.monotonic,
                 stats: BatcherStats | None = None, check_invariants: bool = False,
                 share_keys: bool = False, class_limits: Mapping[Priority, int] | None = None,
                 policy: SchedulingPolicy | None = None) -> None:
        """`share_keys`: jobs of any key share a batch (continuous batching: the executor that
        pulls sends each job's key to the engine with it). `class_limits`: most jobs of a class
        queued at once (default, and at most: `max_queue`). `policy`: the order (default: the
        rules of policy.py with these limits)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if max_wait_ms < 0 or max_batch_tokens < 0:
            raise ValueError("max_wait_ms and max_batch_tokens must not be negative")
        limits = dict(class_limits or {})
        if any(n < 1 for n in limits.values()):
            raise ValueError("class limits must be at least 1")
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.class_limits = {p: min(limits.get(p, max_queue), max_queue) for p in CLASSES}
        self.max_batch_tokens = max_batch_tokens
        self.check_invariants = check_invariants
        self.share_keys = share_keys
        self.policy = policy if policy is not None else SchedulingPolicy(
            max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
            share_keys=share_keys)
        self.stats = stats if stats is not None else BatcherStats()
        self._clock = clock
        self._queued = 0
        self._queued_by_class: collections.Counter[Priority] = collections.Counter()
        self._waiters: list[_Waiter] = []
        self._arrivals = itertools.count()
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

    def depth_of(self, priority: Priority) -> int:
        """Jobs of one class queued."""
        return self._queued_by_class[priority]

    @property
    def waiting(self) -> int:
        """Calls of `admit` still waiting for room."""
        return len(self._waiters)

    @property
    def reserved(self) -> int:
        """Room promised to admitted waiters whose jobs are not queued yet."""
        return sum(w.size for w in self._granted)

    def _reserved_for(self, priority: Priority) -> int:
        return sum(w.size for w in self._granted if w.priority is priority)

    def fits_ever(self, n: int, priority: Priority = Priority.DEFAULT) -> bool:
        """Whether `n` jobs of `priority` could ever be queued together."""
        return n <= self.class_limits[priority]

    def _has_room(self, n: int, priority: Priority) -> bool:
        return (self._queued + self.reserved + n <= self.max_queue
                and self._queued_by_class[priority] + self._reserved_for(priority) + n
                <= self.class_limits[priority])

    def _make_room(self, n: int, priority: Priority) -> bool:
        """Whether `n` jobs of `priority` fit now, displacing queued less urgent work (the
        policy chooses which) when the queue as a whole is what is full."""
        if self._has_room(n, priority):
            return True
        if (self._queued_by_class[priority] + self._reserved_for(priority) + n
                > self.class_limits[priority]):
            return False  # the class's own limit: others' work is not in the way
        victims = self.policy.victims(priority, self._queued + self.reserved + n - self.max_queue)
        if not victims:
            return False
        for victim in victims:
            self.stats.displaced_by_priority[victim.job.priority] += 1
            self._drop(victim, Drop(DropReason.DISPLACED, QueueFull(
                f"the server queue is full and more urgent work took this "
                f"{victim.job.priority.name} article's place; retry later, with backoff")))
        return True

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
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.ticket.done():
                waiter.ticket.set_exception(Unavailable("server is not accepting work"))
        self._check()

    def drain(self) -> None:
        """Drop every queued job as SHUTDOWN: its caller gets Unavailable."""
        shutting_down = Unavailable("server is shutting down")
        for entry in list(self.policy.queued()):
            self._drop(entry, Drop(DropReason.SHUTDOWN, shutting_down))
        self._check()

    # ----- admission -----
    def _refuse(self, jobs: Sequence[Job], message: str) -> QueueFull:
        for job in jobs:
            self.stats.refused_by_priority[job.priority] += 1
        return QueueFull(message)

    def _ahead(self, priority: Priority) -> list[_Waiter]:
        """Waiters that go before a new call of `priority`: those of its class or more urgent."""
        return [w for w in self._waiters if w.priority <= priority]

    def submit(self, jobs: Sequence[Job[P]], *,
               group: Hashable | None = None) -> list[asyncio.Future]:
        """Queue `jobs`, all or none; one future per job, in the order given. They join the queued
        jobs of an earlier call that named the same `group` (one caller: one round-robin turn),
        else they form a group of their own.

        Raises QueueFull when the jobs do not all fit now (or `admit` calls of their class or a
        more urgent one wait for room ahead of them), Unavailable when the queue is not open.
        """
        self._refuse_unless_open()
        priority = _class_of(jobs)
        ahead = self._ahead(priority)
        if ahead or not self._make_room(len(jobs), priority):
            waiting = f"; {len(ahead)} calls wait for room" if ahead else ""
            raise self._refuse(jobs, (
                f"server queue is full ({self._queued} of {self.max_queue} articles waiting, "
                f"{self._queued_by_class[priority]} of {self.class_limits[priority]} "
                f"{priority.name}{waiting}); retry later"))
        return self._enqueue(jobs, group)

    async def admit(self, jobs: Sequence[Job[P]], *, group: Hashable | None = None,
                    deadline: float | None = None) -> list[asyncio.Future]:
        """Queue `jobs` like `submit`, but wait for room if they do not fit now, in line behind
        earlier waiters of their class or a more urgent one, until `deadline` (absolute
        `time.monotonic()`).

        Raises QueueFull at once if the jobs could never fit, or when `deadline` passes while
        waiting; Unavailable when the queue is not open or closes while waiting. A waiter that is
        cancelled leaves nothing behind.
        """
        self._refuse_unless_open()
        priority = _class_of(jobs)
        if not self.fits_ever(len(jobs), priority):
            raise self._refuse(jobs, (
                f"{len(jobs)} articles can never fit in the server queue (at most "
                f"{self.class_limits[priority]} {priority.name}); send fewer at a time"))
        if not self._ahead(priority) and self._make_room(len(jobs), priority):
            return self._enqueue(jobs, group)
        if deadline is not None and deadline <= self._clock():
            raise self._refuse(jobs, "deadline passed while waiting for room in the server "
                                     "queue")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(len(jobs), priority, deadline, loop.create_future(),
                         next(self._arrivals))
        self._waiters.append(waiter)
        timer = (None if deadline is None else
                 loop.call_later(max(0.0, deadline - self._clock()), self._expire, waiter))
        try:
            await waiter.ticket
        except BaseException as error:  # cancelled, expired or closed: no trace left
            self._withdraw(waiter)
            if isinstance(error, QueueFull):
                for job in jobs:
                    self.stats.refused_by_priority[job.priority] += 1
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
        """Give room to waiters, most urgent class first and first come first served within
        it, while the first one fits. Called wherever jobs leave the queue: this, not a timer,
        is what wakes a waiter."""
        now = self._clock()
        while self._waiters:
            head = min(self._waiters, key=lambda w: (w.priority, w.arrival))
            if head.ticket.done():  # cancelled; its task withdraws it when it runs
                self._waiters.remove(head)
            elif head.deadline is not None and head.deadline <= now:
                self._waiters.remove(head)
                head.ticket.set_exception(
                    QueueFull("deadline passed while waiting for room in the server queue"))
            elif self._has_room(head.size, head.priority):
                self._waiters.remove(head)
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
            self.policy.add(entries, group, now)
            for entry in entries:
                entry.future.add_done_callback(  # mypy infers no type for a default argument
                    lambda _f, e=entry: self._on_done(e))  # type: ignore[misc]
                self._queued_by_class[entry.job.priority] += 1
                self.stats.admitted_by_priority[entry.job.priority] += 1
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
        """QUEUED -> RUNNING: the policy handed it out in the batch being cut."""
        assert entry.state is JobState.QUEUED
        entry.state = JobState.RUNNING
        self._queued -= 1
        self._queued_by_class[entry.job.priority] -= 1

    def _drop(self, entry: Entry, drop: Drop) -> None:
        """QUEUED -> DONE without a result from the model: counted once, under its reason; the
        caller gets its error (unless the future is already done)."""
        if entry.state is not JobState.QUEUED:
            return
        self.policy.discard(entry)
        self._queued -= 1
        self._queued_by_class[entry.job.priority] -= 1
        self.stats.dropped_by_reason[drop.reason] += 1
        entry.resolve(error=drop.error)

    def _check(self) -> None:
        """With check_invariants: the queue counts are the jobs queued, each queued job is in
        state QUEUED and in the policy's lines once, the queue holds no more than max_queue (nor
        a class more than its limit), and no waiter is both in line and given room."""
        if not self.check_invariants:
            return
        queued = list(self.policy.queued())
        problems = self.policy.problems(queued)
        if len(queued) != self._queued:
            problems.append(f"queue depth {self._queued} but {len(queued)} jobs queued")
        if len(set(map(id, queued))) != len(queued):
            problems.append("a job is queued twice")
        if any(e.state is not JobState.QUEUED for e in queued):
            problems.append("a job in the queue is not in state QUEUED")
        by_class = collections.Counter(e.job.priority for e in queued)
        for priority in CLASSES:
            if by_class[priority] != self._queued_by_class[priority]:
                problems.append(f"{priority.name} depth {self._queued_by_class[priority]} but "
                                f"{by_class[priority]} queued")
            if by_class[priority] + self._reserved_for(priority) > self.class_limits[priority]:
                problems.append(f"{priority.name} over its class limit")
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
    def lane(self, *, urgent: bool) -> QueueLane:
        """A view of this queue for one executor: on an urgent lane, batches that start with
        bulk work stay small (policy rule 5), so that worker is soon free for urgent work."""
        return QueueLane(self, urgent)

    async def next_batch(self, urgent_lane: bool = False
                         ) -> tuple[Hashable, list[Entry]] | None:
        """The next batch, for an executor that has room for one: cut at once if a batch's worth
        is queued or the oldest job has waited `max_wait_ms`, else when either becomes true.
        Returns None once the queue is closed. The entries are RUNNING: the caller owns them."""
        while not self._closed:
            self._wakeup.clear()
            oldest = self._prune()
            turn = self.policy.turn()
            if oldest is None or turn is None:
                await self._wakeup.wait()
                continue
            now = self._clock()
            ready_by = oldest.enqueued_at + self.max_wait_s
            key = self.policy.batch_key(turn)
            if now >= ready_by:
                return key, self._cut(key, urgent_lane=urgent_lane)
            full = self.policy.full_key(turn)
            if full is not None:
                return full, self._cut(full, urgent_lane=urgent_lane)
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=ready_by - now)
            except TimeoutError:
                pass
        return None

    def take_ready(self, limit: int, interactive_limit: int = 0) -> list[Entry]:
        """Up to `limit` queued jobs, now, without waiting (none once closed): what a continuous
        executor admits between decoding steps, chosen by the policy (class, round-robin,
        shortest first), whatever their keys when `share_keys`; then INTERACTIVE ones while
        fewer than `interactive_limit` were taken in all (room kept for them beyond `limit`).
        The entries are RUNNING: the caller owns them."""
        if self._closed or max(limit, interactive_limit) < 1 or self._prune() is None:
            return []
        taken: list[Entry] = []
        turn = self.policy.turn()
        if limit > 0 and turn is not None:
            taken = self._cut(self.policy.batch_key(turn), limit)
        extra = interactive_limit - len(taken)
        if extra > 0 and self._queued_by_class[Priority.INTERACTIVE]:
            turn = self.policy.turn()
            key = None if turn is None else self.policy.batch_key(turn)
            taken += self._cut(key, extra, classes=(Priority.INTERACTIVE,))
        return taken

    def _prune(self) -> Entry | None:
        """Drop finished and expired jobs; return the oldest live job, if any."""
        now = self._clock()
        oldest: Entry | None = None
        for entry in list(self.policy.queued()):
            drop = (Drop(DropReason.CANCELLED, asyncio.CancelledError())
                    if entry.future.done()  # cancelled; its done-callback has not run yet
                    else self.should_drop(entry.job, now))
            if drop is not None:
                self._drop(entry, drop)
            elif oldest is None or entry.enqueued_at < oldest.enqueued_at:
                oldest = entry
        self._serve_waiters()
        return oldest

    def _cut(self, key: Hashable, limit: int | None = None, *, urgent_lane: bool = False,
             classes: Sequence[Priority] = CLASSES) -> list[Entry]:
        """Take the batch the policy chooses."""
        now = self._clock()
        batch = self.policy.cut(key, limit, classes=classes, take=self._take, now=now,
                                small_bulk=self.policy.small_bulk(now, urgent_lane))
        if self.check_invariants and len(batch) > self.max_batch_size:
            raise InvariantViolation(f"a batch of {len(batch)} cut, over max_batch_size")
        self._serve_waiters()
        return batch


class QueueLane:
    """One executor's view of a `BatchQueue` (a `BatchSource`): the queue's batches, cut for
    an urgent lane or not."""

    def __init__(self, queue: BatchQueue, urgent: bool) -> None:
        self.queue = queue
        self.urgent = urgent

    async def next_batch(self) -> tuple[Hashable, list[Entry]] | None:
        return await self.queue.next_batch(urgent_lane=self.urgent)

    def should_drop(self, job: Job, now: float) -> Drop | None:
        return self.queue.should_drop(job, now)

    def record_duration(self, key: Hashable, seconds: float) -> None:
        self.queue.record_duration(key, seconds)
