"""A caller going away mid-call is a normal outcome: one CANCELLED line saying what was really
delivered, no traceback, no ERROR. A raw HTTP/2 client resets the stream (tests/rawh2.py); a
normal client closes its channel."""

from __future__ import annotations

import re
import time

import grpc
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .processes import STREAM, SUMMARIZE, Serve, ServerProcess, request_of
from .rawh2 import RawConnection, grpc_frame

pytestmark = pytest.mark.slow  # real server processes


def _call_lines(server: ServerProcess, request_id: str) -> list[str]:
    return [line for line in server.log().splitlines() if f"request_id={request_id}" in line]


def _assert_one_cancelled_line(server: ServerProcess, request_id: str) -> str:
    server.wait_log(f"request_id={request_id} ")
    time.sleep(0.5)  # anything gRPC would log about the call comes right after it ends
    lines = _call_lines(server, request_id)
    assert len(lines) == 1, lines
    assert "status=CANCELLED" in lines[0], lines[0]
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
    return lines[0]


@pytest.mark.parametrize("path", [SUMMARIZE, STREAM])
def test_a_stream_reset_while_its_answer_waits_to_be_sent_is_one_cancelled_line(
        serve: Serve, path: str) -> None:
    """The caller's receive window is 0: the server sends the answer's headers, then waits to
    send its message; the caller resets the stream then. Nothing was delivered."""
    server = serve("--workers", "0")
    request_id = f"rst-{path.rsplit('/', 1)[1]}"
    connection = RawConnection("127.0.0.1", server.port, receive_window=0)
    try:
        stream = connection.open(path, [("x-request-id", request_id)])
        connection.send(stream, grpc_frame(request_of(["A short article. " * 8]
                                                      ).SerializeToString()),
                        end_stream=True)
        state = connection.streams[stream]
        deadline = time.monotonic() + 60
        while not state.headers and time.monotonic() < deadline:
            connection.receive(timeout_s=0.5)
        assert state.headers.get(":status") == "200", state.headers
        assert not state.data
        connection.reset(stream)
    finally:
        connection.close()
    line = _assert_one_cancelled_line(server, request_id)
    assert " delivered=0 " in line, line


def test_a_stream_reset_mid_call_is_one_cancelled_line(serve: Serve) -> None:
    """Reset while the server is still working (12 articles, two a batch, 0.3 s a batch)."""
    server = serve("--worker-engine", "tests.worker_engines:slow", "--workers", "1",
                   "--max-batch-size", "2")
    connection = RawConnection("127.0.0.1", server.port)
    try:
        stream = connection.open(STREAM, [("x-request-id", "rst-mid-call")])
        connection.send(stream, grpc_frame(request_of(
            [f"article number {i}. " * 5 for i in range(12)]).SerializeToString()))
        state = connection.streams[stream]
        # Two results: the server counts a result once gRPC reports its write done, and only
        # then writes the next one, so after two the first is counted. (After one, a reset can
        # beat the write's completion to the server: the caller has it, the log says 0.)
        deadline = time.monotonic() + 30
        while _messages(state.data) < 2 and time.monotonic() < deadline:
            connection.receive(timeout_s=0.2)
        assert _messages(state.data) >= 2, "fewer than two results came"
        connection.reset(stream)
    finally:
        connection.close()
    line = _assert_one_cancelled_line(server, "rst-mid-call")
    delivered = int(re.search(r" delivered=(\d+) ", line).group(1))
    assert 1 <= delivered < 12, line


def _messages(data: bytes | bytearray) -> int:
    """Whole gRPC messages in `data` (each a 5-byte prefix, its length in bytes 1-4)."""
    count = offset = 0
    while offset + 5 <= len(data):
        offset += 5 + int.from_bytes(data[offset + 1:offset + 5], "big")
        count += offset <= len(data)
    return count


def test_a_client_closing_its_channel_mid_call_is_one_cancelled_line(serve: Serve) -> None:
    server = serve("--worker-engine", "tests.worker_engines:slow", "--workers", "1",
                   "--max-batch-size", "2")
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.SummarizerStub(channel)
    replies = stub.SummarizeStream(
        iter([pb.SummarizeRequest(articles=[pb.Article(id=str(i), text=f"article {i}. " * 5)
                                            for i in range(12)])]),
        metadata=[("x-request-id", "closed-channel")], timeout=60)
    first = next(replies)
    assert first.id
    channel.close()
    _assert_one_cancelled_line(server, "closed-channel")
