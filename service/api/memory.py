"""Memory that requests hold, bounded and given back.

- `RequestBudget`: the bytes of request messages held by calls in progress, against
  `--request-memory-mb`. A call whose message would take the total past it is refused at once
  with RESOURCE_EXHAUSTED (retry later), before any preparation; a call alone is always let in,
  so the largest message gRPC accepts (`--max-message-bytes`) can always be served.
- `MemoryReleaser`: glibc keeps freed memory for reuse instead of returning it to the system,
  so after a 10 MB request (or many half-sent messages that gRPC buffered and dropped) the
  process stays at its peak. `malloc_trim(0)` hands the free pages back; it runs after a large
  call ends and, while the resident set is well above where it was when serving started, every
  few seconds (half-sent messages whose callers went away never reach a handler). Elsewhere than
  glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import Overloaded

log = logging.getLogger(__name__)

MIB = 1024 * 1024


class RequestBudget:
    """Bytes of request messages held by calls in progress, bounded (0: no bound)."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 0:
            raise ValueError("the request memory budget cannot be negative")
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    @contextlib.contextmanager
    def hold(self, size_bytes: int) -> Iterator[None]:
        """Hold `size_bytes` for the block; Overloaded when the budget cannot take them."""
        if (self.limit_bytes and self.held_bytes
                and self.held_bytes + size_bytes > self.limit_bytes):
            raise Overloaded(
                f"the server is holding {self.held_bytes / MIB:.1f} MiB of requests in "
                f"progress and this one ({size_bytes / MIB:.1f} MiB) would take it past its "
                f"budget of {self.limit_bytes / MIB:.0f} MiB (--request-memory-mb); retry "
                "later, or send smaller requests")
        self.held_bytes += size_bytes
        try:
            yield
        finally:
            self.held_bytes -= size_bytes


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def resident_bytes() -> int:
    """This process's resident set (Linux), else 0."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


class MemoryReleaser:
    """Gives freed memory back to the system (see the module docstring)."""

    LARGE_CALL_BYTES = 1 * MIB
    """A call with a message at least this large trims when it ends."""
    CHECK_EVERY_S = 2.0
    GROWTH_BYTES = 64 * MIB
    """Trim while the resident set is this much above the floor (what it was when serving
    started): at once when it moved since the last trim, else every RETRIM_S."""
    RETRIM_S = 5.0

    def __init__(self) -> None:
        self._trim = _malloc_trim()
        self.floor_bytes = 0
        self.trims = 0
        self._trimmed_at = 0
        self._trimmed_when = 0.0
        self._task: asyncio.Task[None] | None = None
        self._pending: asyncio.Future[None] | None = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def start(self) -> None:
        """Take the floor now (the model loaded) and start watching."""
        if self._trim is None or self._task is not None:
            return
        self.floor_bytes = resident_bytes()
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def call_ended(self, message_bytes: int) -> None:
        """A call ended; trims soon when its message was large."""
        if message_bytes >= self.LARGE_CALL_BYTES:
            self.release_soon()

    def release_soon(self) -> None:
        """Trim in a thread, unless a trim is already under way."""
        if self._trim is None or (self._pending is not None and not self._pending.done()):
            return
        with contextlib.suppress(RuntimeError):  # no running loop: shutting down
            self._pending = asyncio.get_running_loop().run_in_executor(None, self._release)

    def _release(self) -> None:
        assert self._trim is not None
        before = resident_bytes()
        started = time.perf_counter()
        self._trim(0)
        after = resident_bytes()
        self.trims += 1
        self._trimmed_at = after
        self._trimmed_when = time.monotonic()
        log.debug("malloc_trim: resident %.0f -> %.0f MiB in %.1f ms", before / MIB,
                  after / MIB, (time.perf_counter() - started) * 1000)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.CHECK_EVERY_S)
            resident = resident_bytes()
            if resident <= self.floor_bytes + self.GROWTH_BYTES:
                continue
            if (abs(resident - self._trimmed_at) > self.GROWTH_BYTES // 4
                    or time.monotonic() - self._trimmed_when >= self.RETRIM_S):
                self.release_soon()
