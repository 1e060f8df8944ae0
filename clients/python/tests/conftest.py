"""Fixtures of the client's tests: the address of a real server, and a scripted one.

The real server is SUMMARIZER_TEST_SERVER (HOST:PORT of a running `summarizer serve`, as CI
gives it). Unset, the tests start one themselves with a tiny random-weight model when the server
package is importable (the repository's `python -m pytest`), and fail otherwise: these tests
never skip silently. The scripted server (`scripted`) needs only grpcio: it injects the faults
summarize_many must survive.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from summarizer_client.cli import Connection, _health_check
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

SERVER_VARIABLE = "SUMMARIZER_TEST_SERVER"
LOST_STATUS = "Internal error from Core"
"""What grpcio's asyncio client says when a write races the end of a stream (grpc/grpc#36066)."""


def wait_serving(target: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            insecure = Connection(tls=False, ca_cert="", client_cert="", client_key="", token="")
            if _health_check(target, insecure, 2.0) == 1:  # SERVING
                return
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no SERVING server at {target} after {timeout_s}s")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """HOST:PORT of a real server."""
    if os.environ.get(SERVER_VARIABLE):
        target = os.environ[SERVER_VARIABLE]
        wait_serving(target, 60)
        yield target
        return
    try:
        from service.engines.tiny import build_tiny_checkpoint
    except ModuleNotFoundError as error:
        pytest.fail(f"set {SERVER_VARIABLE}=HOST:PORT to a running server (`summarizer serve`), "
                    f"or install the server so that the tests can start one ({error})")
    model = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-bart"), "bart")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SUMMARIZER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=environ | {"HF_HUB_OFFLINE": "1"})
    try:
        target = _listening_address(process)
        wait_serving(target, 180)
        yield target
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _listening_address(process: subprocess.Popen) -> str:
    """HOST:PORT from the server's "listening on" log line; the rest of its log is drained in the
    background (a full pipe would stall the server)."""
    seen = []
    for line in process.stderr:
        seen.append(line)
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
        if match:
            threading.Thread(target=process.stderr.read, daemon=True).start()
            return match.group(1)
    raise AssertionError("the server exited before listening:\n" + "".join(seen))


class Scripted(pb_grpc.SummarizerServicer):
    """Answers each article with its id; the first `breaks` streams end with `code` and
    `details` after `answer_before_break` answers; with `stall`, answers nothing."""

    def __init__(self) -> None:
        self.breaks = 0
        self.answer_before_break = 2
        self.code = grpc.StatusCode.INTERNAL
        self.details = LOST_STATUS
        self.stall = False
        self.streams = 0
        self.articles = 0
        self.unary_calls = 0
        self.cancelled = threading.Event()

    async def Summarize(self, request, context):  # noqa: N802 - gRPC's name
        self.unary_calls += 1
        return pb.SummarizeResponse(results=[self._answer(a) for a in request.articles])

    async def SummarizeStream(self, request_iterator, context):  # noqa: N802 - gRPC's name
        self.streams += 1
        broken = self.streams <= self.breaks
        try:
            if broken:
                # Read everything first: a break while the client still writes could come back
                # to it as grpcio's own lost-status INTERNAL instead of this status.
                requests = [request async for request in request_iterator]
                answers = [a for r in requests for a in r.articles][:self.answer_before_break]
                for article in answers:
                    yield self._answer(article)
                await context.abort(self.code, self.details)
            async for request in request_iterator:
                for article in request.articles:
                    if self.stall:
                        await asyncio.sleep(3600)
                    yield self._answer(article)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    def _answer(self, article: pb.Article) -> pb.ArticleResult:
        self.articles += 1
        return pb.ArticleResult(id=article.id, summary=f"S:{article.id}",
                                input_tokens=len(article.text.split()))


@contextlib.contextmanager
def scripted_servers(count: int) -> Iterator[list[tuple[int, Scripted]]]:
    """`count` scripted servers on one event loop in a thread: [(port, script)]."""
    loop = asyncio.new_event_loop()
    started: list[tuple[grpc.aio.Server, int, Scripted]] = []

    async def start() -> None:
        script = Scripted()
        server = grpc.aio.server()
        pb_grpc.add_SummarizerServicer_to_server(script, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        started.append((server, port, script))

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        for _ in range(count):
            asyncio.run_coroutine_threadsafe(start(), loop).result(30)
        yield [(port, script) for _, port, script in started]
    finally:
        for server, _, _ in started:
            asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        with contextlib.suppress(Exception):
            loop.close()


@pytest.fixture
def scripted() -> Iterator[tuple[str, Scripted]]:
    """A scripted server on its own event loop in a thread: (target, script)."""
    with scripted_servers(1) as [(port, script)]:
        yield f"127.0.0.1:{port}", script


@pytest.fixture
def scripted_trio() -> Iterator[tuple[str, list[Scripted]]]:
    """Three scripted servers behind one target URI that lists their addresses."""
    with scripted_servers(3) as servers:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port, _ in servers)
        yield target, [script for _, script in servers]
