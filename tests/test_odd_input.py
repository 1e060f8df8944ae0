"""Odd input gets an answer a caller can act on: emoji-only articles, bytes that are not a
request. A raw HTTP/2 client (tests/rawh2.py) sends what a gRPC client would not."""

from __future__ import annotations

import grpc
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .processes import SUMMARIZE, Serve, request_of
from .rawh2 import RawConnection, grpc_frame

INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])


def test_an_emoji_only_article_is_refused_in_words_a_caller_understands(serve: Serve) -> None:
    server = serve("--workers", "0")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.Summarize(request_of(["\U0001f600\U0001f389 \U0001f44d\n\u2728"]), timeout=30)
        # Beside words it is text like any other.
        reply = stub.Summarize(request_of(["\U0001f389 The council approved the budget. "
                                           "\U0001f389"]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = refused.value.details()
    assert "only emoji, symbols or punctuation" in details and "furniture" not in details
    assert reply.results[0].summary_tokens > 0


def _raw_call(port: int, body: bytes) -> dict[str, str]:
    connection = RawConnection("127.0.0.1", port)
    try:
        stream = connection.open(SUMMARIZE)
        connection.send(stream, grpc_frame(body), end_stream=True)
        return connection.wait_closed(stream, timeout_s=30).headers
    finally:
        connection.close()


def test_bytes_that_are_not_protobuf_are_told_so_not_blamed_on_utf8(serve: Serve) -> None:
    server = serve("--workers", "0")
    garbage = _raw_call(server.port, b"\xff\xfe\xfd this is not protobuf \x00\x01")
    bad_text = pb.SummarizeRequest(articles=[pb.Article(id="1", text="ok")]).SerializeToString()
    bad_text = bad_text.replace(b"ok", b"\xff\xfe")  # the text field's bytes, not UTF-8
    not_utf8 = _raw_call(server.port, bad_text)
    assert garbage["grpc-status"] == INVALID_ARGUMENT, garbage
    assert "not protobuf" in garbage["grpc-message"] and "UTF-8" not in garbage["grpc-message"]
    assert not_utf8["grpc-status"] == INVALID_ARGUMENT, not_utf8
    assert "not UTF-8" in not_utf8["grpc-message"]
