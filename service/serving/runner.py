"""What both executors share (`executor.Executor`, static batches; `continuous.ContinuousExecutor`,
decoding steps): one loop task that pulls work from a source, one worker thread for the blocking
engine calls (never the event loop), and a shutdown that lets the work in hand finish within a
grace period before its callers get UNAVAILABLE."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..errors import Unavailable

log = logging.getLogger(__name__)

T = TypeVar("T")


class Runner:
    """Subclasses provide `_loop()` (the pulling loop), `_has_work()` (something to finish on
    stop), `_late_message()` (what stop logs when the grace ran out), `_fail_remaining(error)`
    (resolve what is still held) and `_check()` (their invariants)."""

    _task_name = "executor"

    def __init__(self, on_exit: Callable[[], None] | None) -> None:
        self._on_exit = on_exit
        self._source: Any = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_engine = False
        self._stopping = False

    # ----- lifecycle -----
    async def start(self, source: Any) -> None:
        """Pull work from `source` and run it until stopped (or the source runs dry)."""
        if self._task is not None:
            raise RuntimeError("executor already started")
        self._source = source
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-model")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self._task_name)
        if self._on_exit is not None:
            on_exit = self._on_exit
            self._task.add_done_callback(lambda _t: on_exit())

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop pulling; let the work in hand finish (for at most `timeout_s`; its callers get
        UNAVAILABLE after that)."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            if not self._has_work():
                task.cancel()  # waiting for work: nothing to finish
            # Returns once the work in hand (if any) has been delivered.
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if not done:
                log.warning(self._late_message())
                task.cancel()
                await asyncio.wait({task})
        self._fail_remaining(Unavailable("server is shutting down"))
        self._check()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        died = None if task is None or task.cancelled() else task.exception()
        if died is not None:
            raise died  # the loop died (an InvariantViolation): say so

    @property
    def alive(self) -> bool:
        """Started, and still pulling work."""
        return self._task is not None and not self._task.done()

    @property
    def worker_busy(self) -> bool:
        """True while the worker thread is inside an engine call (even after stop gave up)."""
        return self._in_engine

    async def _in_worker(self, call: Callable[..., T], *args: Any) -> T:
        """Run a blocking engine call in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._tracked, call, *args)

    def _tracked(self, call: Callable[..., T], *args: Any) -> T:
        # Runs in the worker thread.
        self._in_engine = True
        try:
            return call(*args)
        finally:
            self._in_engine = False

    # ----- for subclasses -----
    async def _loop(self) -> None:
        raise NotImplementedError

    def _has_work(self) -> bool:
        raise NotImplementedError

    def _late_message(self) -> str:
        raise NotImplementedError

    def _fail_remaining(self, error: BaseException) -> None:
        raise NotImplementedError

    def _check(self) -> None:
        raise NotImplementedError
