"""Preparation (cleaning, tokenising, chunking) shared fairly between callers.

Tokenising runs in one thread (see planning.py). Each piece of preparation work is small (one
article, or one counting step of chunking); callers take turns, round-robin: a caller with one
article waits for at most one piece of every other caller's work, however much those callers
sent. A piece whose caller has gone (its awaiting task cancelled) is dropped before it runs; the
piece running when the caller goes runs to its end (a thread cannot be interrupted), which is
one article's worth at most.

Who the caller is comes from `CALLER`, a context variable: `caller_scope()` gives the current
task (and the tasks it starts afterwards) an identity of its own, once per call.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

CALLER: contextvars.ContextVar[object] = contextvars.ContextVar("summarizer_prep_caller")
"""The identity preparation work is queued under: one per call."""


def caller_scope() -> object:
    """The current call's identity, made (and set for this task and those it starts) on first
    use."""
    caller = CALLER.get(None)
    if caller is None:
        caller = object()
        CALLER.set(caller)
    return caller


_Piece = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class FairPrep:
    """One preparation thread, its work taken round-robin across callers."""

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-prep")
        self._waiting: OrderedDict[object, deque[_Piece]] = OrderedDict()
        self._running = False
        self._last: object | None = None
        self.pieces_run = 0
        """Pieces of work run so far (for tests and metrics)."""

    def shutdown(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)
        for queue in self._waiting.values():
            for _, future in queue:
                future.cancel()
        self._waiting.clear()

    @property
    def waiting(self) -> int:
        """Pieces queued, not yet running."""
        return sum(len(queue) for queue in self._waiting.values())

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) in the preparation thread, in the current caller's turn."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        caller = CALLER.get(None)
        if caller is None:
            caller = object()  # work outside any call: a turn of its own
        self._waiting.setdefault(caller, deque()).append(
            (functools.partial(function, *args), future))
        self._next()
        return await future

    def _take(self) -> _Piece | None:
        """The next piece: the first live one of the caller whose turn it is (the caller that
        ran last goes behind every other caller waiting, newcomers included)."""
        while self._waiting:
            caller = next(iter(self._waiting))
            if caller is self._last and len(self._waiting) > 1:
                self._waiting.move_to_end(caller)
                caller = next(iter(self._waiting))
            queue = self._waiting[caller]
            while queue and queue[0][1].done():  # its caller has gone
                queue.popleft()
            if not queue:
                del self._waiting[caller]
                continue
            piece = queue.popleft()
            if not queue:
                del self._waiting[caller]
            self._last = caller
            return piece
        return None

    def _next(self) -> None:
        if self._running:
            return
        piece = self._take()
        if piece is None:
            return
        function, future = piece
        self._running = True
        loop = asyncio.get_running_loop()
        try:
            done = self._thread.submit(function)
        except RuntimeError as error:  # shut down
            self._running = False
            if not future.done():
                future.set_exception(error)
            return
        done.add_done_callback(
            lambda ran: loop.call_soon_threadsafe(self._finished, ran, future))

    def _finished(self, ran: Future[Any], future: asyncio.Future[Any]) -> None:
        self._running = False
        self.pieces_run += 1
        if not future.done():
            if ran.cancelled():
                future.cancel()
            elif (error := ran.exception()) is not None:
                future.set_exception(error)
            else:
                future.set_result(ran.result())
        self._next()
