"""Memory that hostile input can take is bounded and given back; a caller without a token is
refused before its message is read. Real server processes, raw HTTP/2 (tests/rawh2.py)."""

from __future__ import annotations

import time

import grpc
import h2.exceptions
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .processes import MIB, SUMMARIZE, Serve
from .rawh2 import RawConnection, grpc_frame

TOKEN = "hostile-test-token"


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


def test_stalled_half_sent_messages_are_bounded_and_given_back(serve: Serve) -> None:
    """40 streams that each announce 16 MB, send 15 and stall, on one connection: a stream
    limit of 16 holds the rest back, and the memory comes back after."""
    server = serve("--workers", "0", "--max-streams-per-connection", "16")
    time.sleep(1)
    baseline = server.rss_mib()
    connection = RawConnection("127.0.0.1", server.port, timeout_s=30)
    accepted = held_back = 0
    try:
        frame = grpc_frame(b"\x0a" * (15 * MIB), announced=16 * MIB)
        for _ in range(40):
            try:
                stream = connection.open(SUMMARIZE)
            except h2.exceptions.TooManyStreamsError:  # the server's SETTINGS say so
                held_back += 1
                continue
            accepted += connection.send(stream, frame) == len(frame)
        stalled = server.rss_mib()
    finally:
        connection.close()
    assert (accepted, held_back) == (16, 24)
    assert stalled - baseline < 400, (baseline, stalled)
    deadline = time.monotonic() + 15
    while server.rss_mib() - baseline >= 150 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.rss_mib() - baseline < 150, (baseline, stalled, server.rss_mib())


def test_past_the_request_memory_budget_a_call_gets_resource_exhausted(serve: Serve) -> None:
    """--request-memory-mb 1: a 0.8 MB call in progress leaves no room for a 0.54 MB one; a
    small call and a call alone larger than the budget still go through."""
    server = serve("--worker-engine", "tests.worker_engines:slow", "--workers", "1",
                   "--max-batch-size", "2", "--request-memory-mb", "1")
    options = pb.GenerationOptions(long_input=pb.LONG_INPUT_POLICY_TRUNCATE)

    def request(articles: int, chars: int) -> pb.SummarizeRequest:
        return pb.SummarizeRequest(articles=[pb.Article(id=str(i), text="word " * (chars // 5))
                                             for i in range(articles)], options=options)

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        big = stub.Summarize.future(request(20, 40_000), timeout=60)  # 10 batches of 0.3 s
        time.sleep(0.5)  # the big call is in progress (it takes 3 s)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Summarize(request(6, 90_000), timeout=60)
        small = stub.Summarize(request(1, 1000), timeout=60)
        assert len(big.result().results) == 20
        alone = stub.Summarize(request(30, 40_000), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--request-memory-mb" in refused.value.details()
    assert len(small.results) == 1 and len(alone.results) == 30
