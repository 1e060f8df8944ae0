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
decoding session holds the articles between steps, so the slot remembers what it admitted there
(each ticket's `Admit`, until it is done, failed or removed). When the worker dies (during a step,
or between steps), its session is lost: the articles it held are admitted again, from scratch and
under the same tickets, on the new worker; an article that was in the worker during two crashes
fails alone with `WorkerCrashed` (INTERNAL), whatever it shared its steps with (there is no
bisecting: the articles beside it get their one retry each). The executor above never sees the
crash, only the failures, so nothing is lost and no result reaches the wrong caller.

Worker processes are started from the event loop's thread (PR_SET_PDEATHSIG follows the thread
that forks), and waited for in the slot's thread.
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

from ..config import Settings, available_cpus, worker_devices
from ..domain import RECENT_BATCHES, Generated, GenerationParams, PreparedArticle
from ..engines.protocol import Admit, StepFailure, StepIn, StepOut
from ..errors import GenerationFailed, ModelLoadError, OutOfMemory, Unavailable
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
    restarts: collections.Counter[str] = field(default_factory=collections.Counter)
    """Worker replacements by cause: exit, signal, watchdog."""
    retried_after_crash: int = 0
    """Batches sent again after their worker died."""


def _cause(process: multiprocessing.process.BaseProcess) -> str:
    process.join(5)
    code = process.exitcode
    return "signal" if code is not None and code < 0 else "exit"


class Slot:
    """One worker process and the pipe to it; `run_batch` runs in the slot's executor thread."""

    def __init__(self, pool: WorkerPool, index: int, settings: Settings) -> None:
        self.pool = pool
        self.index = index
        self.settings = settings
        self.process: multiprocessing.process.BaseProcess | None = None
        self.conn: Connection | None = None
        self.ready = False
        self._batches = itertools.count()
        self._recent_s: collections.deque[float] = collections.deque(maxlen=RECENT_BATCHES)
        self.started_at = 0.0
        self.starting = threading.Lock()
        """Held while a replacement starts: the slot's thread and the eager restart share it."""
        self.busy = False
        """A batch is in the worker: its death is the batch's to handle, not the idle watch's."""
        self._state = threading.Lock()
        """Guards `ready` and `busy` between the executor's thread and the idle watch."""
        self._admitted: dict[int, Admit] = {}
        """Continuous batching: the tickets the worker's session holds, in admission order."""
        self._session_of: multiprocessing.process.BaseProcess | None = None
        """The process whose session holds `_admitted` (another one: they were lost with it)."""
        self._crashes: collections.Counter[int] = collections.Counter()
        """Continuous batching: per held ticket, the workers that died while holding it."""

    # ----- starting (the process from the loop thread, the wait from any thread) -----
    def spawn(self) -> None:
        parent, child_end = self.pool.context.Pipe()
        process = self.pool.context.Process(
            target=child.main, args=(child_end, self.settings, os.getpid()),
            name=f"summarizer-worker-{self.index}", daemon=True)
        process.start()
        child_end.close()  # the parent's copy: the child's death must show as EOF here
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
        self.ready = True
        log.info("worker %d (pid %d) ready: loaded in %.1fs, warmed up in %.1fs", self.index,
                 message.pid, message.load_s, message.warmup_s)
        threading.Thread(target=self._watch_idle, args=(self.process,), daemon=True,
                         name=f"summarizer-watch-{self.index}").start()
        return message

    def _watch_idle(self, process: multiprocessing.process.BaseProcess) -> None:
        """A worker that dies between batches (killed, OOM) is replaced now: no batch would
        notice until the next one, and health would say SERVING without a live worker."""
        multiprocessing.connection.wait([process.sentinel])
        with self._state:
            if (self.process is not process or self.busy or not self.ready
                    or self.pool._stopping or self.pool.failed is not None):
                return  # replaced already, a batch's death (run_batch's), or shutting down
            self.ready = False
        cause = _cause(process)
        log.warning("worker %d (pid %s) died between batches (%s); replacing it", self.index,
                    process.pid, cause)
        self.pool.replaced(self, cause)

    # ----- running a batch (the executor's thread) -----
    def run_batch(self, params: GenerationParams,
                  articles: list[PreparedArticle]) -> list[Generated]:
        for attempt in (1, 2):
            self._claim()
            try:
                return self._generate(params, articles)
            except _Died as death:
                with self._state:
                    self.ready = False
                    self.busy = False
                self.pool.replaced(self, death.cause)
                if attempt == 2:
                    raise WorkerCrashed(f"a batch of {len(articles)} took its worker down twice "
                                        f"({death.cause})") from None
                self.pool.stats.retried_after_crash += 1
                log.warning("worker %d died during a batch of %d (%s); replacing it and trying "
                            "the batch again", self.index, len(articles), death.cause)
            finally:
                self.busy = False
        raise AssertionError("unreachable")  # pragma: no cover

    # ----- continuous batching (the executor's thread) -----
    def advance(self, step: StepIn) -> StepOut:
        """One step of the worker's decoding session. Articles lost with a worker that died are
        admitted again on its replacement (once each); see the module docstring."""
        for ticket in step.remove:
            self._admitted.pop(ticket, None)
            self._crashes.pop(ticket, None)
        new = [a for a in step.admit if a.ticket not in step.remove]
        lost: list[StepFailure] = []
        try:
            while True:
                self._claim()
                try:
                    if self._admitted and self._session_of is not self.process:
                        lost += self._readmit()
                        message = StepIn(admit=(*self._admitted.values(), *new),
                                         pause=step.pause)
                    else:
                        message = StepIn(admit=tuple(new), remove=step.remove,
                                         pause=step.pause)
                    # From here the worker holds them: a death now is theirs too.
                    self._session_of = self.process
                    self._admitted.update((a.ticket, a) for a in new)
                    new = []
                    out = self._step(message)
                except _Died as death:
                    with self._state:
                        self.ready = False
                        self.busy = False
                    log.warning("worker %d died during a decoding step holding %d articles (%s); "
                                "replacing it", self.index, len(self._admitted), death.cause)
                    self.pool.replaced(self, death.cause)
                    continue
                finally:
                    self.busy = False
                break
        except BaseException:
            # Unavailable (stopping, crash loop) or a failed step: the executor fails every
            # article it holds, so nothing here is held any more.
            self._admitted.clear()
            self._crashes.clear()
            raise
        for ticket in [t for t, _ in out.done] + [f.ticket for f in out.failed]:
            self._admitted.pop(ticket, None)
            self._crashes.pop(ticket, None)
        if lost:
            out = replace(out, failed=(*lost, *out.failed))
        return out

    def _readmit(self) -> list[StepFailure]:
        """The worker holding `_admitted` died: fail the articles it was the second death of,
        keep the others to admit again (returns the failures)."""
        failures = []
        for ticket in list(self._admitted):
            self._crashes[ticket] += 1
            if self._crashes[ticket] >= 2:
                del self._admitted[ticket]
                del self._crashes[ticket]
                failures.append(StepFailure(
                    ticket, "error", "the article took its worker down twice", "WorkerCrashed"))
        if failures:
            log.error("worker %d: %d articles were decoding in two workers that died; failing "
                      "them", self.index, len(failures))
        if self._admitted:
            self.pool.stats.retried_after_crash += 1
            log.warning("worker %d: admitting %d articles again after their worker died",
                        self.index, len(self._admitted))
        return failures

    def _step(self, step: StepIn) -> StepOut:
        reply = self._exchange(DecodeStep(step), "a decoding step",
                               "the engine's decoding step")
        assert isinstance(reply, Advanced), reply
        return reply.out

    def _claim(self) -> None:
        """Wait for a ready worker and mark it busy (its death is then this batch's)."""
        while True:
            self.pool.ensure_running(self)
            with self._state:
                if self.ready:  # not lost to the idle watch since
                    self.busy = True
                    return

    def _generate(self, params: GenerationParams,
                  articles: list[PreparedArticle]) -> list[Generated]:
        batch = next(self._batches)
        reply = self._exchange(Generate(batch, params, articles),
                               f"a batch of {len(articles)}", "the engine")
        assert isinstance(reply, Results) and reply.batch == batch, reply
        return reply.results

    def _exchange(self, message: Generate | DecodeStep, work: str, raiser: str
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
        return reply

    def watchdog_s(self) -> float:
        if self.settings.batch_timeout_s:
            return self.settings.batch_timeout_s
        if not self._recent_s:
            return WATCHDOG_UNTIMED_S
        return max(WATCHDOG_FLOOR_S, WATCHDOG_FACTOR * max(self._recent_s))

    # ----- stopping (the loop thread, or a thread of the loop's) -----
    def stop(self, timeout_s: float) -> None:
        """Ask the worker to exit after its batch; kill it after `timeout_s`."""
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
        self.ready = False


class WorkerPool:
    """The worker processes, their restarts and the crash-loop breaker."""

    def __init__(self, settings: Settings,
                 on_change: Callable[[], None] | None = None) -> None:
        devices = worker_devices(settings)
        if not devices:
            raise ValueError("a worker pool needs at least one worker")
        threads = settings.threads or available_cpus()
        per_worker = max(1, threads // len(devices))
        self.context = multiprocessing.get_context("spawn")
        self.slots = [Slot(self, i, replace(settings, device=device, threads=per_worker,
                                            workers=0, devices=""))
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

    def run_batches(self) -> list[Callable[[GenerationParams, list[PreparedArticle]],
                                           list[Generated]]]:
        """One `run_batch` per worker: each feeds one executor, which pulls by capacity."""
        return [slot.run_batch for slot in self.slots]

    def advancers(self) -> list[Callable[[StepIn], StepOut]]:
        """Continuous batching: one `advance` per worker, each feeding one continuous
        executor."""
        return [slot.advance for slot in self.slots]

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
        self._changed()

    async def stop(self, timeout_s: float) -> None:
        self._stopping = True
        await asyncio.gather(*(asyncio.to_thread(slot.stop, timeout_s) for slot in self.slots))
        self._changed()

    # ----- supervision (called from slot threads) -----
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
        # Replace it now, not at its next batch: health counts ready workers.
        threading.Thread(target=self._restart_quietly, args=(slot,), daemon=True,
                         name=f"summarizer-restart-{slot.index}").start()

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
                    failed_starts = self._failed_starts
                self.stats.restarts["exit"] += 1
                if failed_starts >= FAILED_STARTS_IN_A_ROW:
                    self._fail(f"{failed_starts} worker starts failed in a row: {error}")
                continue
            with self._lock:
                self._failed_starts = 0
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
