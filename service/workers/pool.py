"""Supervised engine workers, seen from the server: one `Slot` per worker process.

Each slot gives the batch executor a blocking `run_batch(params, articles)` (the executor's seam:
it pulls a batch when its worker is free, and calls this in its own thread):

- the batch goes down the slot's pipe as token ids; results come back as strings;
- a worker that dies during a batch (exit, signal, out-of-memory kill) is replaced with the same
  settings and the batch is tried once more; a batch that takes a worker down twice raises
  `WorkerCrashed`, and the executor splits it like any failing batch, so the input that kills the
  engine fails alone (INTERNAL, generic message) and its batch-mates get their results;
- the watchdog: a batch that runs past its bound (`--batch-timeout-s`, else 10x the slowest
  recent batch with a floor) gets its worker killed, and counts as a crash;
- restarts are rate-limited: more than `--max-worker-restarts` in 5 minutes, or 3 failed starts
  in a row, is a crash loop: the pool fails (health NOT_SERVING, one clear log line, and the
  server exits non-zero so that an orchestrator restarts it).

Continuous batching: each slot gives a continuous executor a blocking `advance(StepIn) ->
StepOut` instead, with the same watchdog (per step), crash detection and restarts. The worker's
decoding session holds the articles between steps; what it should hold is the executor's (its
`_held`, the one owner of the articles in flight), and each step carries it (`StepIn.in_flight`),
so the slot keeps no copy of its own. When the worker dies (during a step, or between steps), its
session is lost: the articles in flight are admitted again, from scratch and under the same
tickets, on the new worker; an article that was in the worker during two crashes
fails alone with `WorkerCrashed` (INTERNAL), whatever it shared its steps with (there is no
bisecting: the articles beside it get their one retry each). The executor above never sees the
crash, only the failures, so nothing is lost and no result reaches the wrong caller.

Structure: calls go one way, down. `WorkerPool` supervises (restarts, the crash-loop breaker,
the idle watch) and hands out one runner per slot: `_BatchRunner.run` (static batching) or
`_SessionRunner.advance` (continuous, with its `SessionReplay`, the crash replay's state). A
runner drives the pool (claim a ready worker, report a death) and its `Slot`; a `Slot` is one
worker process and its pipe (start, one request/reply exchange under the watchdog, stop) and
calls nothing above it.

Threads: worker processes are started from the event loop's thread (PR_SET_PDEATHSIG follows the
thread that forks); a runner runs in its executor's worker thread, one per slot; each worker has
an idle-watch thread; replacements are waited for in the runner's thread or a restart thread
(`Slot.starting` lets one at a time). Each class says which thread owns which field.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.context import SpawnContext

from ..config import Settings, available_cpus, worker_devices
from ..domain import RECENT_BATCHES, Generated, GenerationParams, PreparedArticle
from ..engines.protocol import StepFailure, StepIn, StepOut
from ..errors import GenerationFailed, ModelLoadError, OutOfMemory, Unavailable
from ..serving.executor import RunBatch
from . import child
from .messages import (Advanced, DecodeStep, Failed, Generate, LoadFailed, Ready, Results,
                       Stop)

log = logging.getLogger(__name__)

RESTART_WINDOW_S = 300.0
FAILED_STARTS_IN_A_ROW = 3
WATCHDOG_FACTOR = 10
WATCHDOG_FLOOR_S = 120.0
WATCHDOG_UNTIMED_S = 300.0


class WorkerCrashed(GenerationFailed):
    """A batch took its worker down twice: the executor splits it to find the input."""


class EngineError(GenerationFailed):
    """The engine raised inside the worker (its type only: the message could quote the input)."""


class CrashLoop(ModelLoadError):
    """Workers keep dying: the server should exit, and be restarted from scratch."""


class _Died(Exception):
    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


@dataclass
class PoolStats:
    """Written under the pool's lock; read (for metrics) from the event loop."""

    restarts: collections.Counter[str] = field(default_factory=collections.Counter)
    """Worker replacements by cause: exit, signal, watchdog."""
    retried_after_crash: int = 0
    """Batches (or held sessions) sent again after their worker died."""


_EXIT_CODE_WAIT_S = 1.0
"""How long `_cause` waits for the exit code that another thread is storing (see there)."""


def _cause(process: multiprocessing.process.BaseProcess) -> str:
    """How a dead worker went: "signal" (killed: SIGKILL, a segfault) or "exit". Two threads may
    reap it at once (the runner's request and the idle watch): multiprocessing's `poll` then
    answers None to the one whose `waitpid` found the child already reaped, until the other has
    stored the code; read it again for a moment instead of calling a kill an exit."""
    process.join(5)
    deadline = time.monotonic() + _EXIT_CODE_WAIT_S
    code = process.exitcode
    while code is None and time.monotonic() < deadline:
        time.sleep(0.005)
        code = process.exitcode
    return "signal" if code is not None and code < 0 else "exit"


class Slot:
    """One worker process and the pipe to it. Calls nothing above it.

    Fields by owner:
    - `index`, `settings`, `starting`: set at construction, never rebound.
    - `process`, `conn`, `started_at`: rebound only by `spawn` (the event loop's thread), while
      `starting` is held or before any other thread uses the slot; read by the runner's thread
      between `claim` and `release`, and by the idle watch (which compares, never writes).
    - `ready`, `busy`: written only under `_state` (`claim`, `release`, `lost`, `lost_idle`,
      `spawn`, `wait_ready`, `stop`); read anywhere (a bool read is atomic; decisions that
      depend on both take `_state`).
    - `_recent_s`: the runner's thread only (`exchange`, `watchdog_s`).
    """

    def __init__(self, index: int, settings: Settings, context: SpawnContext) -> None:
        self.index = index
        self.settings = settings
        self._context = context
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.started_at = 0.0
        self.ready = False
        self.busy = False
        """A request is in the worker: its death is the runner's to handle, not the idle
        watch's."""
        self._state = threading.Lock()
        """Guards `ready` and `busy` between the runner's thread and the idle watch."""
        self.starting = threading.Lock()
        """Held while a replacement starts: the runner's thread and the eager restart share it."""
        self._recent_s: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)

    # ----- starting (the process from the loop thread, the wait from any thread) -----
    def spawn(self) -> None:
        parent, child_end = self._context.Pipe()
        process = self._context.Process(
            target=child.main, args=(child_end, self.settings, os.getpid()),
            name=f"summarizer-worker-{self.index}", daemon=True)
        process.start()
        child_end.close()  # the parent's copy: the child's death must show as EOF here
        with self._state:
            self.process, self.conn, self.ready = process, parent, False
        self.started_at = time.monotonic()

    def wait_ready(self) -> Ready:
        """Block until the worker has loaded its model; ModelLoadError if it could not."""
        assert self.conn is not None and self.process is not None
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise ModelLoadError(f"worker {self.index} died while loading the model "
                                 f"({_cause(self.process)} {self.process.exitcode})") from None
        if isinstance(message, LoadFailed):
            self.process.join(5)
            raise ModelLoadError(message.message)
        assert isinstance(message, Ready), message
        with self._state:
            self.ready = True
        log.info("worker %d (pid %d) ready: loaded in %.1fs, warmed up in %.1fs", self.index,
                 message.pid, message.load_s, message.warmup_s)
        return message

    # ----- the runner's side of `ready` and `busy` -----
    def claim(self) -> bool:
        """Mark a ready worker busy (its death is then the runner's); False: not ready."""
        with self._state:
            if self.ready:
                self.busy = True
            return self.ready

    def release(self) -> bool:
        """The runner's request is over. True when the worker died meanwhile unnoticed (after
        its reply: the idle watch left that death to the request): the runner has it replaced.
        Decided under `_state` with `lost_idle`, so one of the two replaces it, never both."""
        with self._state:
            self.busy = False
            if self.ready and self.process is not None and not self.process.is_alive():
                self.ready = False
                return True
            return False

    def lost(self) -> None:
        """The runner saw the worker die during its request."""
        with self._state:
            self.ready = self.busy = False

    def lost_idle(self, process: multiprocessing.process.BaseProcess) -> bool:
        """`process` died with no request in it: True when it is this slot's ready worker (the
        idle watch then has it replaced); False when it was replaced already, or a runner's
        request was in it (the runner handles that death)."""
        with self._state:
            if self.process is not process or self.busy or not self.ready:
                return False
            self.ready = False
            return True

    # ----- one request (the runner's thread, between claim and release) -----
    def exchange(self, message: Generate | DecodeStep, work: str, raiser: str
                 ) -> Results | Advanced:
        """Send one request and wait for its reply under the watchdog (a worker past it is
        killed); a dead worker raises _Died, a reported failure OutOfMemory or EngineError.
        `work` and `raiser` name the request in the log and the error."""
        assert self.conn is not None and self.process is not None
        started = time.monotonic()
        try:
            self.conn.send(message)
            limit = self.watchdog_s()
            if not self.conn.poll(limit):
                log.error("worker %d: %s ran past the watchdog's %.0fs; killing the worker",
                          self.index, work, limit)
                self.process.kill()
                self.process.join(5)
                raise _Died("watchdog")
            reply = self.conn.recv()
        except (EOFError, OSError):
            raise _Died(_cause(self.process)) from None
        if isinstance(reply, Failed):
            if reply.out_of_memory:
                raise OutOfMemory(reply.message)
            raise EngineError(f"{raiser} raised {reply.error_type}")
        self._recent_s.append(time.monotonic() - started)
        assert isinstance(reply, (Results, Advanced)), reply
        return reply

    def watchdog_s(self) -> float:
        if self.settings.batch_timeout_s:
            return self.settings.batch_timeout_s
        if not self._recent_s:
            return WATCHDOG_UNTIMED_S
        return max(WATCHDOG_FLOOR_S, WATCHDOG_FACTOR * max(self._recent_s))

    # ----- stopping (the loop thread, or a thread of the loop's) -----
    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit after its request; kill it after `timeout_s`."""
        process, conn = self.process, self.conn
        if process is None:
            return
        if conn is not None:
            try:
                conn.send(Stop())
            except OSError:
                pass
        process.join(timeout_s)
        if process.is_alive():
            process.kill()
            process.join(5)
        if conn is not None:
            conn.close()
        with self._state:
            self.ready = False


class SessionReplay:
    """Continuous batching: what it takes to rebuild one worker's decoding session when the
    worker dies (see the module docstring). What the session holds is not copied here: each step
    says it (`StepIn.in_flight`, from the executor, the one owner of the articles in flight).
    This keeps which process holds the session and, per article, how many workers died holding
    it. Used by one runner's thread only."""

    def __init__(self, index: int) -> None:
        self.index = index
        """The slot's, for the log."""
        self.session_of: multiprocessing.process.BaseProcess | None = None
        """The process whose session holds what was sent (another one: it was lost with it)."""
        self.crashes: collections.Counter[int] = collections.Counter()
        """Per article in flight, the workers that died while holding it."""

    def next_step(self, step: StepIn, sent: bool, gone: set[int],
                  process: multiprocessing.process.BaseProcess | None
                  ) -> tuple[StepIn, list[StepFailure], bool]:
        """The message for `process`'s session: `step` as asked when it holds what was sent,
        else (a new worker) everything in flight admitted again, with `step`'s pauses. `sent`:
        whether `step`'s own admits were sent already (to a worker that died since); `gone`:
        tickets failed earlier in this step, never sent again (grows here). Returns the message,
        the articles failed for a second death, and whether any were admitted again."""
        new = {a.ticket for a in step.admit} if not sent else set()
        held = [a for a in step.in_flight if a.ticket not in gone]
        failures: list[StepFailure] = []
        replayed = False
        if self.session_of is not process and any(a.ticket not in new for a in held):
            failures = self._second_deaths([a.ticket for a in held if a.ticket not in new])
            gone.update(f.ticket for f in failures)
            held = [a for a in held if a.ticket not in gone]
            replayed = any(a.ticket not in new for a in held)
            message = StepIn(admit=tuple(held), pause=step.pause)
        else:  # (`step`'s own admits are sent once: a retry with nothing to replay has none)
            fresh = () if sent else tuple(a for a in step.admit if a.ticket not in step.remove)
            message = StepIn(admit=fresh, remove=step.remove, pause=step.pause)
        # From here the worker holds them: a death now is theirs too.
        self.session_of = process
        return message, failures, replayed

    def _second_deaths(self, lost: list[int]) -> list[StepFailure]:
        """The worker holding `lost` died: fail the articles it was the second death of; the
        others are admitted again."""
        failures = []
        for ticket in lost:
            self.crashes[ticket] += 1
            if self.crashes[ticket] >= 2:
                del self.crashes[ticket]
                failures.append(StepFailure(
                    ticket, "error", "the article took its worker down twice", "WorkerCrashed"))
        if failures:
            log.error("worker %d: %d articles were decoding in two workers that died; failing "
                      "them", self.index, len(failures))
        if len(lost) > len(failures):
            log.warning("worker %d: admitting %d articles again after their worker died",
                        self.index, len(lost) - len(failures))
        return failures

    def settle(self, step: StepIn) -> None:
        """Forget the crash counts of articles no longer in flight (the executor drops what a
        step finished or failed from the next step's `in_flight`)."""
        if self.crashes:
            flight = {a.ticket for a in step.in_flight}
            for ticket in [t for t in self.crashes if t not in flight]:
                del self.crashes[ticket]


class _BatchRunner:
    """Static batching on one slot: `run` is the executor's `run_batch` (its worker thread)."""

    def __init__(self, pool: WorkerPool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot
        self._batches = itertools.count()

    def run(self, params: GenerationParams, articles: list[PreparedArticle]) -> list[Generated]:
        slot = self.slot
        for attempt in (1, 2):
            self.pool.claim(slot)
            try:
                batch = next(self._batches)
                reply = slot.exchange(Generate(batch, params, articles),
                                      f"a batch of {len(articles)}", "the engine")
                assert isinstance(reply, Results) and reply.batch == batch, reply
                return reply.results
            except _Died as death:
                slot.lost()
                self.pool.replaced(slot, death.cause)
                if attempt == 2:
                    raise WorkerCrashed(f"a batch of {len(articles)} took its worker down twice "
                                        f"({death.cause})") from None
                self.pool.count_retry()
                log.warning("worker %d died during a batch of %d (%s); replacing it and trying "
                            "the batch again", slot.index, len(articles), death.cause)
            finally:
                self.pool.released(slot)
        raise AssertionError("unreachable")  # pragma: no cover


class _SessionRunner:
    """Continuous batching on one slot: `advance` is the continuous executor's (its worker
    thread). Articles lost with a worker that died are admitted again on its replacement (once
    each), from the step's `in_flight`; `replay` holds the rest of what that takes."""

    def __init__(self, pool: WorkerPool, slot: Slot) -> None:
        self.pool = pool
        self.slot = slot
        self.replay = SessionReplay(slot.index)

    def advance(self, step: StepIn) -> StepOut:
        self.replay.settle(step)
        out, lost = self._step_on_a_live_worker(step)
        if lost:
            out = replace(out, failed=(*lost, *out.failed))
        return out

    def _step_on_a_live_worker(self, step: StepIn) -> tuple[StepOut, list[StepFailure]]:
        """One step; a worker that dies under it is replaced and the step sent again, with
        what the lost session held. Returns the step's result and the articles failed for
        dying with a second worker."""
        slot, replay = self.slot, self.replay
        lost: list[StepFailure] = []
        gone: set[int] = set()
        sent = False
        while True:
            self.pool.claim(slot)
            try:
                message, failures, replayed = replay.next_step(step, sent, gone, slot.process)
                lost += failures
                if replayed:
                    self.pool.count_retry()
                sent = True
                reply = slot.exchange(DecodeStep(message), "a decoding step",
                                      "the engine's decoding step")
                assert isinstance(reply, Advanced), reply
                return reply.out, lost
            except _Died as death:
                slot.lost()
                log.warning("worker %d died during a decoding step holding %d articles (%s); "
                            "replacing it", slot.index, len(step.in_flight) - len(gone),
                            death.cause)
                self.pool.replaced(slot, death.cause)
            finally:
                self.pool.released(slot)


class WorkerPool:
    """The worker processes, their restarts and the crash-loop breaker.

    Fields by owner:
    - `slots`, `settings`, `context`, `on_change`, `crash_loop`: set at construction.
    - `_loop`: set by `start` on the event loop's thread, before any other thread of the pool
      exists; read anywhere after.
    - `_stopping`: set once by `stop` (the loop's thread); read anywhere (a bool).
    - `failed`, `stats`, `_restarts`, `_failed_starts`: written under `_lock` (from runner,
      restart and idle-watch threads); read anywhere (`failed` is rebound once, from None).
    """

    def __init__(self, settings: Settings,
                 on_change: Callable[[], None] | None = None) -> None:
        devices = worker_devices(settings)
        if not devices:
            raise ValueError("a worker pool needs at least one worker")
        threads = settings.threads or available_cpus()
        per_worker = max(1, threads // len(devices))
        self.context = multiprocessing.get_context("spawn")
        self.slots = [Slot(i, replace(settings, device=device, threads=per_worker, workers=0,
                                      devices=""), self.context)
                      for i, device in enumerate(devices)]
        self.settings = settings
        self.stats = PoolStats()
        self.failed: str | None = None
        """Why the pool gave up (a crash loop), or None."""
        self.on_change = on_change
        self._restarts: collections.deque[float] = collections.deque()
        self._failed_starts = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self.crash_loop = asyncio.Event()

    @property
    def ready(self) -> int:
        return sum(1 for slot in self.slots if slot.ready)

    def run_batches(self) -> list[RunBatch[PreparedArticle, Generated]]:
        """One `run_batch` per worker: each feeds one executor, which pulls by capacity."""
        return [_BatchRunner(self, slot).run for slot in self.slots]

    def advancers(self) -> list[Callable[[StepIn], StepOut]]:
        """Continuous batching: one `advance` per worker, each feeding one continuous
        executor."""
        return [_SessionRunner(self, slot).advance for slot in self.slots]

    async def start(self) -> None:
        """Start every worker and wait until all have loaded; ModelLoadError if one cannot."""
        self._loop = asyncio.get_running_loop()
        for slot in self.slots:
            slot.spawn()
        try:
            await asyncio.gather(*(asyncio.to_thread(slot.wait_ready) for slot in self.slots))
        except BaseException:
            await self.stop(0)
            raise
        for slot in self.slots:
            self._watch_idle(slot)
        self._changed()

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        await asyncio.gather(*(asyncio.to_thread(slot.stop, timeout_s) for slot in self.slots))
        self._changed()

    # ----- for the runners (their threads) -----
    def claim(self, slot: Slot) -> None:
        """Wait for `slot` to have a ready worker and mark it busy; Unavailable when stopping
        or in a crash loop."""
        while True:
            self.ensure_running(slot)
            if slot.claim():  # not lost to the idle watch since
                return

    def released(self, slot: Slot) -> None:
        """A runner's request on `slot` is over; a worker that died after replying is replaced
        now (the idle watch left it to the request)."""
        if slot.release() and not self._stopping and self.failed is None:
            assert slot.process is not None
            cause = _cause(slot.process)
            log.warning("worker %d (pid %s) died after its reply (%s); replacing it",
                        slot.index, slot.process.pid, cause)
            self.replaced(slot, cause)

    def count_retry(self) -> None:
        with self._lock:
            self.stats.retried_after_crash += 1

    # ----- supervision (called from runner, restart and idle-watch threads) -----
    def replaced(self, slot: Slot, cause: str) -> None:
        """`slot`'s worker died (`cause`): count it; a crash loop fails the pool."""
        with self._lock:
            now = time.monotonic()
            self.stats.restarts[cause] += 1
            self._restarts.append(now)
            while self._restarts and self._restarts[0] < now - RESTART_WINDOW_S:
                self._restarts.popleft()
            if len(self._restarts) > self.settings.max_worker_restarts:
                self._fail(f"{len(self._restarts)} worker restarts within "
                           f"{RESTART_WINDOW_S:.0f}s (--max-worker-restarts "
                           f"{self.settings.max_worker_restarts})")
        self._changed()
        # Replace it now, not at its next request: health counts ready workers.
        threading.Thread(target=self._restart_quietly, args=(slot,), daemon=True,
                         name=f"summarizer-restart-{slot.index}").start()

    def _watch_idle(self, slot: Slot) -> None:
        """Watch `slot`'s new worker from a thread of its own: one that dies between requests
        (killed, OOM) is replaced now; no request would notice until the next one, and health
        would say SERVING without a live worker."""
        process = slot.process
        assert process is not None

        def watch() -> None:
            multiprocessing.connection.wait([process.sentinel])
            if self._stopping or self.failed is not None or not slot.lost_idle(process):
                return  # shutting down, replaced already, or a request's death (the runner's)
            cause = _cause(process)
            log.warning("worker %d (pid %s) died between batches (%s); replacing it",
                        slot.index, process.pid, cause)
            self.replaced(slot, cause)

        threading.Thread(target=watch, daemon=True,
                         name=f"summarizer-watch-{slot.index}").start()

    def _restart_quietly(self, slot: Slot) -> None:
        try:
            self.ensure_running(slot)
        except Unavailable:
            pass  # stopping, or a crash loop (already logged)

    def ensure_running(self, slot: Slot) -> None:
        """Make sure `slot` has a ready worker, replacing a dead one (same settings)."""
        with slot.starting:
            self._start_until_ready(slot)

    def _start_until_ready(self, slot: Slot) -> None:
        while not slot.ready:
            if self.failed is not None or self._stopping:
                raise Unavailable("the model workers are not running; retry later")
            self._spawn_from_loop(slot)
            try:
                slot.wait_ready()
            except ModelLoadError as error:
                with self._lock:
                    self._failed_starts += 1
                    self.stats.restarts["exit"] += 1
                    if self._failed_starts >= FAILED_STARTS_IN_A_ROW:
                        self._fail(f"{self._failed_starts} worker starts failed in a row: "
                                   f"{error}")
                continue
            with self._lock:
                self._failed_starts = 0
            self._watch_idle(slot)
            log.info("worker %d replaced in %.1fs", slot.index,
                     time.monotonic() - slot.started_at)
            self._changed()

    def _spawn_from_loop(self, slot: Slot) -> None:
        loop = self._loop
        if loop is None or threading.current_thread() is threading.main_thread():
            slot.spawn()
            return
        done = threading.Event()
        errors: list[BaseException] = []

        def spawn() -> None:
            try:
                slot.spawn()
            except BaseException as error:  # noqa: BLE001 - handed to the waiting thread
                errors.append(error)
            finally:
                done.set()

        loop.call_soon_threadsafe(spawn)
        done.wait()
        if errors:
            raise errors[0]

    def _fail(self, reason: str) -> None:
        """Give up (a crash loop). Called with `_lock` held."""
        if self.failed is not None:
            return
        self.failed = reason
        log.critical("the model workers are in a crash loop: %s; the server stops serving and "
                     "exits", reason)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.crash_loop.set)

    def _changed(self) -> None:
        if self.on_change is None:
            return
        if self._loop is not None and threading.current_thread() is not threading.main_thread():
            self._loop.call_soon_threadsafe(self.on_change)
        else:
            self.on_change()
