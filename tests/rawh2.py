"""A raw HTTP/2 gRPC client (the `h2` library over a plain socket), for what no well-behaved
gRPC client does: announce a message and never finish it, reset a stream mid-call, send a
malformed `grpc-timeout`. Used by tests/test_hostile_input.py and benchmarks/hostile.py."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


def grpc_frame(payload: bytes, announced: int | None = None) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, 4-byte length, payload. `announced`
    overrides the length in the prefix (to announce more than is sent)."""
    return b"\x00" + struct.pack(">I", len(payload) if announced is None else announced) + payload


@dataclass
class StreamState:
    headers: dict[str, str] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: bool = False


class RawConnection:
    """One HTTP/2 connection to a gRPC server; calls are streams on it."""

    def __init__(self, host: str, port: int, timeout_s: float = 10.0,
                 receive_window: int | None = None) -> None:
        """`receive_window`: the client's initial stream window (0: the server can send
        headers but no message until the client says so, i.e. never)."""
        self.authority = f"{host}:{port}"
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        if receive_window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True,
                initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: receive_window})
        self.conn.initiate_connection()
        self.streams: dict[int, StreamState] = {}
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def open(self, path: str, metadata: list[tuple[str, str]] | None = None) -> int:
        """Start a call (headers only); its stream id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, [
            (":method", "POST"), (":scheme", "http"), (":path", path),
            (":authority", self.authority), ("content-type", "application/grpc"),
            ("te", "trailers"), *(metadata or [])])
        self.streams[stream_id] = StreamState()
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, end_stream: bool = False) -> int:
        """Send `data` as the server's flow control allows; bytes sent (less than all when the
        server closed or reset the stream meanwhile)."""
        sent = 0
        view = memoryview(data)
        while sent < len(data):
            state = self.streams[stream_id]
            if state.ended or state.reset or self.closed:
                return sent
            try:
                window = min(self.conn.local_flow_control_window(stream_id),
                             self.conn.max_outbound_frame_size)
            except h2.exceptions.StreamClosedError:
                return sent
            if window <= 0:
                self.receive()
                continue
            chunk = bytes(view[sent:sent + window])
            try:
                self.conn.send_data(stream_id, chunk)
            except h2.exceptions.StreamClosedError:
                return sent
            self._flush()
            sent += len(chunk)
        if end_stream:
            self.conn.end_stream(stream_id)
            self._flush()
        return sent

    def reset(self, stream_id: int) -> None:
        """RST_STREAM (CANCEL): the client goes away mid-call."""
        self.conn.reset_stream(stream_id, error_code=8)
        self._flush()

    def receive(self, timeout_s: float | None = None) -> None:
        """Read once from the socket and apply what came (blocks up to `timeout_s`)."""
        if timeout_s is not None:
            self.sock.settimeout(timeout_s)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            stream_id = getattr(event, "stream_id", None)
            state = self.streams.get(stream_id) if stream_id else None
            if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                if state is not None:
                    state.headers.update(dict(event.headers))
            elif isinstance(event, h2.events.DataReceived):
                if state is not None:
                    state.data += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded) and state is not None:
                state.ended = True
            elif isinstance(event, h2.events.StreamReset) and state is not None:
                state.reset = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.closed = True
        self._flush()

    def wait_closed(self, stream_id: int, timeout_s: float) -> StreamState:
        """Read until the stream ended or was reset (or `timeout_s` passed)."""
        import time

        deadline = time.monotonic() + timeout_s
        state = self.streams[stream_id]
        while not (state.ended or state.reset or self.closed) and time.monotonic() < deadline:
            self.receive(timeout_s=max(0.01, deadline - time.monotonic()))
        return state

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._flush()
        except OSError:
            pass
        self.sock.close()
