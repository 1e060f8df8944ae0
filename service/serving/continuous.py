"""Continuous batching, the serving side: feed a stepping engine from the queue, one step at a time.

`ContinuousExecutor` takes the place of `executor.Executor` when the engine decodes step by step
(`engines.protocol.DecodingSession`). It pulls from the same queue (`queue.BatchQueue`, built with
`share_keys=True`), so admission, fairness, bounds and RESOURCE_EXHAUSTED on a full queue stay in
one place, and it resolves each entry it is handed exactly once. Its loop:

1. Nothing held (nothing decoding or waiting in the session): block on `next_batch()` until work
   is queued; the first article starts at once (no `max_wait_ms`) with whatever is queued beside
   it, whatever its options.
2. Otherwise, between two steps: take what is queued NOW (`take_ready`, never waits), as much as
   the policy gives room for (`SchedulingPolicy.room`: fewer than `max_active`
   (`--max-batch-size`) articles held and none waiting in the session for cache room; interactive
   ones also beyond that, by `interactive_headroom`). Each new article gets a ticket and goes
   into the next step's `StepIn.admit` with its own options (the job's key) and its class
   (`Admit.priority`: the session admits its waiting articles most urgent first).
   The policy also names the held articles that sit the next step out (`StepIn.pause`: less
   urgent ones while interactive ones decode, until the steps they sat out took long enough
   beside their last step, `SchedulingPolicy.paused_share`), and while they sit out, only
   interactive articles are admitted.
3. Also between steps: held articles whose caller went (future done) or whose deadline passed
   (`source.should_drop` says DEADLINE_PASSED) are resolved now and go into `StepIn.remove`, so
   the session frees their cache memory at the next step. A job already decoding is not dropped
   for a deadline that merely "cannot be met": it is past the point where dropping it saves work
   for anyone else.
4. One blocking `advance(StepIn) -> StepOut` in one worker thread (never on the event loop):
   the session admits what fits, decodes one step for every active sequence and returns what
   finished. Done tickets get their `Generated`; failures map to the service's errors
   ("too_large" and "out_of_memory": `OutOfMemory`, RESOURCE_EXHAUSTED with the session's
   message; "error": `GenerationFailed`, INTERNAL). One article's failure never touches another's.
5. `advance` raising: `Unavailable` (the engine is gone: shutdown, or workers in a crash loop)
   fails every held article with it, `OutOfMemory` (the step as a whole) too; anything else is a
   bug in the engine: every held article fails with `GenerationFailed` and is removed from the
   session at the next step. The loop survives both. (A worker process that dies is handled
   below `advance`, in `workers.pool.WorkerPool.advancers`: its articles are admitted again
   once on the new worker, from the step's `StepIn.in_flight`.)

The executor is the one owner of the articles in flight (`_held`): every `StepIn` carries them
all (`in_flight`, each with the `Admit` it was sent), so nothing below keeps a list of its own
to reconcile (docs/development.md, "who owns what").

The queue's "deadline cannot be met" check hears, per key (generation options), how long an
article took from its admission to the engine until it was done (`record_duration`): its
latency under the current load, the continuous counterpart of a batch's duration.

Reporting: `on_step` gets a `StepReport` after every `advance` (steps, active articles and rows,
cache use: metrics), and `on_batch` a `BatchReport` with `decoding=True` for each article when it
finishes (its queue wait, and its time from admission to done as `duration_s`): per-article
metrics stay truthful and tracing gets one span per article from admission to done. The engine's
steps themselves are not traced (a span per step would flood a trace).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar, cast

from ..domain import GenerationParams, Priority
from ..engines.protocol import Admit, StepFailure, StepIn, StepOut
from ..errors import GenerationFailed, OutOfMemory, Unavailable
from .executor import BatchReport
from .jobs import P, BatcherStats, Drop, DropReason, Entry, InvariantViolation, Job, JobState
from .policy import SchedulingPolicy
from .runner import Runner

log = logging.getLogger(__name__)

R = TypeVar("R")
Advance = Callable[[StepIn], StepOut]
RESOURCE_KINDS = frozenset({"too_large", "out_of_memory"})
"""StepFailure kinds that are RESOURCE_EXHAUSTED (retry later, or ask for less); others INTERNAL."""


class ContinuousSource(Protocol):
    """What a continuous executor needs from a queue policy (`BatchQueue` with share_keys)."""

    async def next_batch(self) -> tuple[Hashable, list[Entry]] | None:
        """Wait for work; the entries are RUNNING. None: no more work."""

    def take_ready(self, limit: int, interactive_limit: int = 0) -> list[Entry]:
        """At most `limit` queued entries, then interactive ones up to `interactive_limit` in
        all, now, without waiting (RUNNING)."""

    def should_drop(self, job: Job, now: float) -> Drop | None:
        """Whether a job is no longer worth running."""

    def record_duration(self, key: Hashable, seconds: float) -> None:
        """How long a job of `key` took from admission to done."""


@dataclass(frozen=True)
class StepReport:
    """What one `advance` call did, for metrics: handed to the `on_step` hook."""

    admitted: int
    removed: int
    done: int
    failed: int
    active: int
    waiting: int
    rows: int
    """Sequences (beams included) in the step; 0: no step ran."""
    duration_s: float
    """The whole call as the executor saw it (a worker's pipe included)."""
    used_bytes: int
    budget_bytes: int
    paused: int = 0
    """Held articles that sat the step out (StepIn.pause)."""


@dataclass(eq=False)
class _Held:
    entry: Entry
    admitted_at: float
    admit: Admit
    """What the session was sent for it (sent again in `StepIn.in_flight`)."""


def failure_error(failure: StepFailure) -> Exception:
    """The service's error for an article the session gave up on."""
    if failure.kind in RESOURCE_KINDS:
        return OutOfMemory(failure.message)
    return GenerationFailed(failure.message or "the engine failed on this article")


class ContinuousExecutor(Runner, Generic[P, R]):
    """Runs a decoding session one step at a time in one worker thread. Owns the entries it was
    handed (`_held`, by ticket) until each is resolved, in `_finish` only: the one owner of the
    articles in flight. The session below keeps its own engine state for them (checked against
    `_held` with check_invariants) and a worker's crash replay reads them from each step's
    `StepIn.in_flight`; neither keeps a list of its own to reconcile."""

    _source: ContinuousSource | None

    def __init__(self, advance: Advance, *, max_active: int,
                 clock: Callable[[], float] = time.monotonic,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 on_step: Callable[[StepReport], None] | None = None,
                 stats: BatcherStats | None = None, check_invariants: bool = False,
                 on_exit: Callable[[], None] | None = None,
                 policy: SchedulingPolicy | None = None) -> None:
        """`policy`: what to admit and pause (default: policy.py's rules, no headroom)."""
        if max_active < 1:
            raise ValueError("max_active must be at least 1")
        super().__init__(on_exit)
        self._task_name = "continuous-executor"
        self.policy = policy if policy is not None else SchedulingPolicy(
            max_batch_size=max_active, share_keys=True)
        self._sat_out_s = 0.0
        """Time of the steps less urgent articles sat out since they last decoded."""
        self._turn_s = 0.0
        """Time of the last step in which nobody sat out."""
        self._advance = advance
        self.max_active = max_active
        self._clock = clock
        self._on_batch = on_batch
        self._on_step = on_step
        self.stats = stats if stats is not None else BatcherStats()
        self.check_invariants = check_invariants
        self._held: dict[int, _Held] = {}
        self._tickets = itertools.count()
        self._to_remove: list[int] = []
        """Tickets resolved outside a step that the session may still hold."""
        self._last = StepOut()
        self.steps = 0
        """`advance` calls that decoded a step (rows > 0)."""

    # ----- for Runner -----
    def _has_work(self) -> bool:
        return bool(self._held) or self._in_engine

    def _late_message(self) -> str:
        return (f"{len(self._held)} articles did not finish decoding in time; their callers get "
                "UNAVAILABLE")

    def _fail_remaining(self, error: BaseException) -> None:
        self._fail_all(error)

    @property
    def running(self) -> int:
        """Articles handed to this executor and not yet resolved (decoding or waiting in the
        session)."""
        return len(self._held)

    @property
    def last_step(self) -> StepOut:
        """The session's last answer (active articles and rows, cache use)."""
        return self._last

    # ----- the loop -----
    async def _loop(self) -> None:
        while True:
            try:
                if not await self._turn():
                    return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the loop must survive anything
                log.exception("continuous batching loop error; continuing")
                if isinstance(error, InvariantViolation):
                    raise
                self._fail_all(GenerationFailed(
                    "the batch scheduler failed while this article was decoding"), remove=True)
            self._check()

    async def _turn(self) -> bool:
        """Admit, remove, advance one step, deliver. False: no more work, ever."""
        assert self._source is not None
        remove = self._leavers()
        admit: list[Entry] = []
        if not self._held and not remove:
            if self._stopping:
                return False
            batch = await self._source.next_batch()  # idle: wait for work
            if batch is None:
                return False
            admit = batch[1][:self.max_active]
            for extra in batch[1][self.max_active:]:  # never: the queue cuts at most that many
                self._finish(extra, error=GenerationFailed("too many articles handed over"))
        elif not self._stopping:
            classes = self._classes()
            room = self.policy.room(list(classes.values()), self.max_active, self._last.waiting,
                                    pausing=self.policy.sits_out(classes, self._sat_out_s,
                                                                 self._turn_s))
            if room.any > 0 or room.interactive > 0:
                admit = self._source.take_ready(room.any, room.interactive)
        admits = self._hold(admit)
        if not (admits or remove or self._held):
            return True
        pause = self._pauses()
        sitting = self.policy.sits_out(self._classes(), self._sat_out_s, self._turn_s)
        step = StepIn(admit=admits, remove=remove, pause=pause,
                      in_flight=tuple(held.admit for held in self._held.values()))
        started = self._clock()
        try:
            out = await self._in_worker(self._advance, step)
        except asyncio.CancelledError:
            raise  # stop() gave up on the step: it fails what is held
        except Unavailable as error:
            # The engine is gone (shutting down, or workers in a crash loop); callers may retry.
            log.warning("%d decoding articles failed: %s", len(self._held), error.message)
            self.stats.failed_batches += 1
            self._fail_all(error)
        except OutOfMemory as error:  # the whole step ran out: every article it held
            log.warning("a decoding step of %d articles ran out of memory", len(self._held))
            self.stats.failed_batches += 1
            self._fail_all(error, remove=True)
        except BaseException as error:  # noqa: BLE001 - a bug in the engine: isolated here
            log.error("the decoding session raised %s; failing its %d articles",
                      type(error).__name__, len(self._held), exc_info=error)
            self.stats.failed_batches += 1
            self._fail_all(GenerationFailed(f"the engine raised {type(error).__name__}"),
                           remove=True)
            if not isinstance(error, Exception):
                raise
        else:
            self._stepped(self._clock() - started, sitting)
            self._deliver(out, started, len(admits), len(remove), len(pause))
        return True

    def _classes(self) -> dict[int, Priority]:
        return {ticket: held.entry.job.priority for ticket, held in self._held.items()}

    def _pauses(self) -> tuple[int, ...]:
        """The held articles the policy has sit the next step out (counted per class)."""
        classes = self._classes()
        pause = self.policy.pauses(classes, self._sat_out_s, self._turn_s)
        for ticket in pause:
            self.stats.paused_steps_by_priority[classes[ticket]] += 1
        return pause

    def _stepped(self, duration_s: float, sat_out: bool) -> None:
        """What the pause rule needs to know of a step: how long it took, and whether less
        urgent work sat it out (paused, or not admitted)."""
        if sat_out:
            self._sat_out_s += duration_s
        else:
            self._sat_out_s, self._turn_s = 0.0, duration_s

    def _leavers(self) -> tuple[int, ...]:
        """Resolve held articles whose caller went or whose deadline passed; their tickets (and
        those of articles failed outside a step) are removed from the session."""
        assert self._source is not None
        now = self._clock()
        remove, self._to_remove = self._to_remove, []
        for ticket, held in list(self._held.items()):
            entry = held.entry
            if entry.future.done():
                drop: Drop | None = Drop(DropReason.CANCELLED, asyncio.CancelledError())
            else:
                drop = self._source.should_drop(entry.job, now)
                if drop is not None and drop.reason is not DropReason.DEADLINE_PASSED:
                    drop = None  # already decoding: it runs until its deadline does pass
            if drop is not None:
                self.stats.dropped_by_reason[drop.reason] += 1
                del self._held[ticket]
                self._finish(entry, error=drop.error)
                remove.append(ticket)
        return tuple(remove)

    def _hold(self, entries: list[Entry]) -> tuple[Admit, ...]:
        now = self._clock()
        admits = []
        for entry in entries:
            ticket = next(self._tickets)
            # The queue's key is the article's generation options (core.py keys jobs by them).
            admit = Admit(ticket, cast(GenerationParams, entry.job.key), entry.job.payload,
                          priority=int(entry.job.priority))
            self._held[ticket] = _Held(entry, now, admit)
            admits.append(admit)
        self._check()
        return tuple(admits)

    def _deliver(self, out: StepOut, started: float, admitted: int, removed: int,
                 paused: int = 0) -> None:
        now = self._clock()
        self._last = out
        if out.rows:
            self.steps += 1
        for ticket, result in out.done:
            held = self._held.pop(ticket, None)
            if held is None:
                continue  # removed before this step (its caller went): nobody waits for it
            self._source_duration(held, now)
            self.stats.jobs += 1
            self._report(held, now)
            self._finish(held.entry, result=result)
        for failure in out.failed:
            held = self._held.pop(failure.ticket, None)
            if held is None:
                continue
            error = failure_error(failure)
            self.stats.failed_jobs += 1
            log.warning("an article failed in the engine (%s%s)", failure.kind,
                        f", {failure.error_type}" if failure.error_type else "")
            self._report(held, now, error)
            self._finish(held.entry, error=error)
        if self._held and out.active + out.waiting == 0:
            # The session says it holds nothing, yet these were never answered: it lost them.
            log.error("the decoding session lost %d articles; failing them", len(self._held))
            self._fail_all(GenerationFailed("the engine lost track of this article"),
                           remove=True)
        elif self.check_invariants and out.active + out.waiting != len(self._held):
            raise InvariantViolation(
                f"the session holds {out.active} active and {out.waiting} waiting articles, "
                f"the executor {len(self._held)}")
        if self._on_step is not None:
            try:
                self._on_step(StepReport(
                    admitted=admitted, removed=removed, done=len(out.done),
                    failed=len(out.failed), active=out.active, waiting=out.waiting,
                    rows=out.rows, duration_s=now - started, used_bytes=out.used_bytes,
                    budget_bytes=out.budget_bytes, paused=paused))
            except Exception:  # noqa: BLE001 - metrics must never break serving
                log.exception("on_step hook failed")

    def _source_duration(self, held: _Held, now: float) -> None:
        assert self._source is not None
        self._source.record_duration(held.entry.job.key, now - held.admitted_at)

    def _report(self, held: _Held, now: float, error: BaseException | None = None) -> None:
        """One article from admission to done, for per-article metrics and its tracing span."""
        if self._on_batch is None:
            return
        job = held.entry.job
        try:
            self._on_batch(BatchReport(
                key=job.key, costs=(job.cost,),
                waited_s=(max(0.0, held.admitted_at - held.entry.enqueued_at),),
                duration_s=now - held.admitted_at, failed=error is not None,
                started_s=held.admitted_at, traces=(job.trace,),
                priorities=(int(job.priority),),
                error_type="" if error is None else type(error).__name__, decoding=True))
        except Exception:  # noqa: BLE001 - metrics and tracing must never break serving
            log.exception("on_batch hook failed")

    def _fail_all(self, error: BaseException, *, remove: bool = False) -> None:
        """Resolve every held article with `error`; with `remove`, also take them out of the
        session at the next step (it may still hold them)."""
        held, self._held = self._held, {}
        if remove:
            self._to_remove.extend(held)
        for item in held.values():
            self._finish(item.entry, error=error)

    # ----- the only place where a held job changes state -----
    def _finish(self, entry: Entry, *, result: object = None,
                error: BaseException | None = None) -> None:
        """RUNNING -> DONE: delivered, failed, or (the future already done) let go. The caller
        has taken it out of `_held`."""
        if entry.state is JobState.QUEUED:  # the queue ends queued jobs, never the executor
            raise InvariantViolation("a queued job finished without leaving the queue")
        entry.resolve(result=result, error=error, strict=self.check_invariants)

    def _check(self) -> None:
        """With check_invariants: everything held is RUNNING and held once."""
        if not self.check_invariants:
            return
        entries = [h.entry for h in self._held.values()]
        problems = []
        if any(e.state is not JobState.RUNNING for e in entries):
            problems.append("a held job is not in state RUNNING")
        if len(set(map(id, entries))) != len(entries):
            problems.append("a job is held under two tickets")
        if problems:
            raise InvariantViolation("; ".join(problems))
