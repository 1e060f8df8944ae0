"""Shared fixtures: tiny random-weight checkpoints (built once per session) and a live server."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.config import Settings
from service.api.server import SummarizerServer
from service.engines.tiny import build_tiny_checkpoint

pytest_plugins = ("tests.processes",)  # the `serve` fixture: real server processes


# ----- waiting on conditions: the one polling helper (no test sleeps, then asserts) -----

async def until(condition: Callable[[], object | Awaitable[object]], timeout_s: float = 20.0,
                what: str = "", interval_s: float = 0.002) -> None:
    """Wait on the event loop until `condition()` (a plain or an async callable) is true; fail
    naming `what` when it is not within `timeout_s`. For what nothing signals: metrics, the
    batcher's counters, a server's state."""
    deadline = time.monotonic() + timeout_s
    while True:
        reached = condition()
        if inspect.isawaitable(reached):
            reached = await reached
        if reached:
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s}s waiting for {what or 'a condition'}")
        await asyncio.sleep(interval_s)


def wait_until(condition: Callable[[], object], timeout_s: float = 20.0, what: str = "",
               interval_s: float = 0.02, details: Callable[[], str] = str) -> None:
    """`until` for a test's own thread (no event loop): processes, threads. `details()` is added
    to the failure (e.g. a server's log)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for "
                                 f"{what or 'a condition'}\n{details()}".rstrip())
        time.sleep(interval_s)


@pytest.fixture(scope="session")
def tiny_bart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bart"), "bart")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-t5"), "t5")


@pytest.fixture(scope="session")
def tiny_pegasus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-pegasus"), "pegasus")


@contextlib.asynccontextmanager
async def serving(settings: Settings, engine_factory: Callable, **server_options: Any
                  ) -> AsyncIterator[tuple[SummarizerServer, grpc.aio.Channel]]:
    """A real server on a free loopback port with a real channel to it; the batch queue checks
    its bookkeeping after every change. `server_options`: more SummarizerServer arguments (e.g.
    `tracing`)."""
    server = SummarizerServer(settings.replace(host="127.0.0.1", port=0, check_invariants=True),
                              engine_factory, **server_options)
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield server, channel
    finally:
        await channel.close()
        await server.stop(grace_s=1.0)


@contextlib.contextmanager
def server_in_thread(settings: Settings, engine_factory: Callable) -> Iterator[int]:
    """A real server on its own event loop in a thread, for synchronous (hypothesis) tests."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    servers: list[SummarizerServer] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        server = SummarizerServer(
            settings.replace(host="127.0.0.1", port=0, check_invariants=True), engine_factory)
        servers.append(server)
        port.append(loop.run_until_complete(server.start()))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30), "server did not start"
    try:
        yield port[0]
    finally:
        asyncio.run_coroutine_threadsafe(servers[0].stop(grace_s=1.0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
