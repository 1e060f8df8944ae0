"""Memory that hostile input can take is bounded and given back; a caller without a token is
refused before its message is read. Real server processes, raw HTTP/2 (tests/rawh2.py)."""

from __future__ import annotations

import contextlib
import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import h2.exceptions
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .conftest import wait_until
from .processes import MIB, SUMMARIZE, Serve, ServerProcess
from .rawh2 import RawConnection, grpc_frame

TOKEN = "hostile-test-token"

pytestmark = pytest.mark.slow  # real server processes


def test_an_unauthenticated_call_is_refused_before_its_body_arrives(serve: Serve) -> None:
    server = serve("--workers", "0", env={"SUMMARIZER_AUTH_TOKEN": TOKEN})
    connection = RawConnection("127.0.0.1", server.port)
    try:
        stream = connection.open(SUMMARIZE)
        # Announce 16 MB, send 1 MB, and never the rest.
        connection.send(stream, grpc_frame(b"\x0a" * MIB, announced=16 * MIB))
        state = connection.wait_closed(stream, timeout_s=10)
    finally:
        connection.close()
    assert state.headers.get("grpc-status") == str(grpc.StatusCode.UNAUTHENTICATED.value[0]), \
        state.headers


def settled_rss(server: ServerProcess) -> float:
    """The resident set of the server once it stops moving (1 MiB or less between readings)."""
    readings = [server.rss_mib()]

    def steady() -> bool:
        readings.append(server.rss_mib())
        return abs(readings[-1] - readings[-2]) <= 1

    wait_until(steady, timeout_s=30, interval_s=0.5, what="the server's memory to settle")
    return readings[-1]


@dataclass
class Stall:
    opened: int = 0
    """calls opened (the server's stream limit let them)"""
    held_back: int = 0
    """calls that could not open: h2 keeps to the stream limit in the server's SETTINGS"""
    cut_short: int = 0
    """calls the server ended before their message was sent"""


@contextlib.contextmanager
def stalled(server: ServerProcess, calls: int) -> Iterator[Stall]:
    """`calls` calls on one connection that each announce a 16 MB message, send 15 MB and
    stall; the connection is dropped on leaving."""
    connection = RawConnection("127.0.0.1", server.port, timeout_s=30)
    stall = Stall()
    try:
        connection.receive(timeout_s=5)  # the server's SETTINGS, its stream limit among them
        frame = grpc_frame(b"\x0a" * (15 * MIB), announced=16 * MIB)
        for _ in range(calls):
            try:
                stream = connection.open(SUMMARIZE)
            except h2.exceptions.TooManyStreamsError:
                stall.held_back += 1
                continue
            stall.opened += 1
            stall.cut_short += connection.send(stream, frame) < len(frame)
        yield stall
    finally:
        connection.close()


def test_stalled_half_sent_messages_are_bounded_by_default_and_given_back(serve: Serve) -> None:
    """Issue 24's target with the defaults: 40 calls that each announce 16 MB, send 15 MB and
    stall, on one connection: the server's stream limit (20) holds half of them back, so it
    holds under 400 MiB more while they stall, and under 150 MiB more 10 s after they go."""
    server = serve("--workers", "0")
    baseline = settled_rss(server)
    with stalled(server, 40) as stall:
        # The 20 messages are in the server's buffers (it takes them as fast as they come).
        wait_until(lambda: server.rss_mib() - baseline > 250, timeout_s=10,
                   what="the stalled messages to be held")
        held = server.rss_mib() - baseline
    peak = server.server_peak_mib() - baseline  # VmHWM: never read between two readings
    assert held < 400 and peak < 400, (baseline, held, peak, stall)
    assert (stall.opened, stall.held_back, stall.cut_short) == (20, 20, 0)
    wait_until(lambda: server.rss_mib() - baseline < 150, timeout_s=10,
               what="the memory of the dropped messages to be given back",
               details=lambda: f"baseline {baseline:.0f} MiB, now {server.rss_mib():.0f} MiB")


def test_over_several_connections_max_open_calls_bounds_them(serve: Serve) -> None:
    """Over two connections the per-connection limit allows 40 stalled calls (+600 MiB): what
    bounds them is --max-open-calls, which refuses calls past it before reading their message."""
    server = serve("--workers", "0", "--max-open-calls", "20")
    baseline = settled_rss(server)
    with stalled(server, 20) as first, stalled(server, 20):
        held = server.rss_mib() - baseline
        assert first.opened == 20
    peak = server.server_peak_mib() - baseline
    assert held < 400 and peak < 400, (baseline, held, peak)
    wait_until(lambda: server.rss_mib() - baseline < 150, timeout_s=10,
               what="the memory of the dropped messages to be given back",
               details=lambda: f"baseline {baseline:.0f} MiB, now {server.rss_mib():.0f} MiB")


def test_stalled_messages_without_a_token_cost_next_to_nothing(serve: Serve) -> None:
    """The same 40 stalled calls with bearer tokens on and no token sent: every call is refused
    on its headers and the rest of its message dropped as it comes, so nothing is held."""
    server = serve("--workers", "0", env={"SUMMARIZER_AUTH_TOKEN": TOKEN})
    baseline = settled_rss(server)
    with stalled(server, 40):
        held = server.rss_mib() - baseline
    peak = server.server_peak_mib() - baseline
    assert held < 150 and peak < 400, (baseline, held, peak)
    wait_until(lambda: server.rss_mib() - baseline < 150, timeout_s=10,
               what="the memory to be given back",
               details=lambda: f"baseline {baseline:.0f} MiB, now {server.rss_mib():.0f} MiB")


def test_past_the_request_memory_budget_a_call_gets_resource_exhausted(serve: Serve) -> None:
    """--request-memory-mb 1: a 0.8 MB call in progress leaves no room for a 0.54 MB one; a
    small call and a call alone larger than the budget still go through."""
    server = serve("--worker-engine", "tests.worker_engines:slow", "--workers", "1",
                   "--max-batch-size", "2", "--request-memory-mb", "1", "--metrics-port", "-1")
    metrics = server.wait_log(r"metrics on http://").split("metrics on ")[1].strip()
    options = pb.GenerationOptions(long_input=pb.LONG_INPUT_POLICY_TRUNCATE)

    def request(articles: int, chars: int) -> pb.SummarizeRequest:
        return pb.SummarizeRequest(articles=[pb.Article(id=str(i), text="word " * (chars // 5))
                                             for i in range(articles)], options=options)

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        big = stub.Summarize.future(request(20, 40_000), timeout=60)  # 10 batches of 0.3 s
        # The big call holds its text from the start; once its first batch is done it is in
        # progress for 9 more (about 2.7 s).
        wait_until(lambda: batches_done(metrics) >= 1, what="the big call's first batch")
        assert not big.done()
        with pytest.raises(grpc.RpcError) as refused:
            stub.Summarize(request(6, 90_000), timeout=60)
        small = stub.Summarize(request(1, 1000), timeout=60)
        assert len(big.result().results) == 20
        alone = stub.Summarize(request(30, 40_000), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--request-memory-mb" in refused.value.details()
    assert len(small.results) == 1 and len(alone.results) == 30


def batches_done(metrics_url: str) -> float:
    """How many batches the server has run (summarizer_batch_size_count from its /metrics)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as reply:
        text = reply.read().decode()
    match = re.search(r"^summarizer_batch_size_count ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0
