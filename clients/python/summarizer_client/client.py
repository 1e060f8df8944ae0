"""Python clients for the Summarizer service: `SummarizerClient` (blocking) and
`AsyncSummarizerClient` (asyncio), with the same methods.

- Typed results: `ArticleSummary`, or `ArticleFailure` for an article that failed on its own.
- Retries with exponential backoff and jitter on UNAVAILABLE and RESOURCE_EXHAUSTED only (a
  server starting, draining or overloaded); never on INVALID_ARGUMENT, INTERNAL and the like.
  A call's `timeout_s` is its whole budget, retries included.
- TLS, mutual TLS and bearer tokens.
- INTERACTIVE calls go over connections of their own: a server allows a bounded number of calls
  open at once on one connection (`--max-streams-per-connection`) and the client's transport
  queues the rest, in order, where the server's priorities cannot reach them; so bulk calls
  filling a connection never hold an interactive call back.
- Many replicas behind one target: a gRPC target URI (`dns:///summarizer-headless:50051`,
  `ipv4:10.0.0.1:50051,10.0.0.2:50051`) is balanced `round_robin` over its addresses by
  default (`load_balancing="pick_first"` keeps to one), each call to the next ready replica.
- `summarize_many`: any number of articles through `SummarizeStream`s (`streams` at once, each
  closed and reopened after `articles_per_stream` articles, so the channel spreads them over the
  replicas), at most `max_in_flight` articles at a time, results as they finish; if a stream
  breaks with a retryable code (its replica died), its unanswered articles are sent again on a
  new stream, to a replica that is up (nothing lost, nothing twice). An article answered
  RESOURCE_EXHAUSTED on its own (the server's queue was full and more urgent work took its
  place) goes out again after the retry policy's backoff, up to its `attempts` in all, keeping its
  place among the articles in flight; only then does its failure reach the caller. It is
  written once, on asyncio; the blocking client runs it on a private event loop in a thread of
  its own for the length of the iteration.

    with SummarizerClient("localhost:50051") as client:
        for result in client.summarize_many(("id-%d" % n, text) for n, text in enumerate(texts)):
            print(result.id, result.summary if isinstance(result, ArticleSummary) else result)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import random
import threading
import time
from collections.abc import (AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable,
                             Coroutine, Iterable, Iterator, Sequence)
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from .balancing import (DEFAULT_ARTICLES_PER_STREAM, DEFAULT_LOAD_BALANCING, DEFAULT_STREAMS,
                        service_config)
from .errors import CallError, ClientError
from .gen.summarizer.v1 import summarizer_pb2 as pb
from .gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from .results import ArticleFailure, ArticleSummary, Result

__all__ = ["PRIORITIES", "ArticleFailure", "ArticleSummary", "AsyncSummarizerClient", "Result",
           "RetryPolicy", "SummarizerClient", "make_options"]

T = TypeVar("T")
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
AUTH_METADATA_KEY = "authorization"
"""The metadata key of the bearer token (`authorization: Bearer <token>`)."""


def result_from_pb(message: pb.ArticleResult) -> Result:
    """A result, or the in-band failure of that one article."""
    if message.HasField("error"):
        return ArticleFailure(id=message.id, code=message.error.code,
                              message=message.error.message)
    return ArticleSummary(id=message.id, summary=message.summary, headline=message.headline,
                          input_tokens=message.input_tokens, truncated=message.truncated,
                          summary_tokens=message.summary_tokens,
                          headline_tokens=message.headline_tokens, chunks=message.chunks)


_OUTPUTS = {"both": pb.OUTPUTS_BOTH, "summary": pb.OUTPUTS_SUMMARY,
            "headline": pb.OUTPUTS_HEADLINE}
_LONG_INPUT = {"": pb.LONG_INPUT_POLICY_UNSPECIFIED, "truncate": pb.LONG_INPUT_POLICY_TRUNCATE,
               "chunk": pb.LONG_INPUT_POLICY_CHUNK}
PRIORITIES = {"": pb.PRIORITY_UNSPECIFIED, "interactive": pb.PRIORITY_INTERACTIVE,
              "default": pb.PRIORITY_DEFAULT, "bulk": pb.PRIORITY_BULK}
"""A call's class by name: "interactive" (someone waits now), "default", "bulk" (back-fills);
"" leaves it to the server (or the token's default)."""


def priority_value(priority: str) -> pb.Priority:
    """The request field's value for a class name (ValueError for an unknown one)."""
    try:
        return PRIORITIES[priority.lower()]
    except KeyError:
        raise ValueError(f"priority must be one of {', '.join(p for p in PRIORITIES if p)} "
                         f"(or empty for the server's default), not {priority!r}") from None


def make_options(*, summary_max_tokens: int = 0, summary_min_tokens: int = 0,
                 headline_max_tokens: int = 0, headline_min_tokens: int = 0, num_beams: int = 0,
                 outputs: str = "both", max_input_tokens: int = 0,
                 length_penalty: float | None = None,
                 no_repeat_ngram_size: int | None = None,
                 long_input: str = "") -> pb.GenerationOptions:
    """Generation options; 0 (or None, or "" for `long_input`: "truncate" or "chunk") leaves a
    field to the server's default."""
    options = pb.GenerationOptions(
        summary_max_tokens=summary_max_tokens, summary_min_tokens=summary_min_tokens,
        headline_max_tokens=headline_max_tokens, headline_min_tokens=headline_min_tokens,
        num_beams=num_beams, outputs=_OUTPUTS[outputs], max_input_tokens=max_input_tokens,
        long_input=_LONG_INPUT[long_input])
    if length_penalty is not None:
        options.length_penalty = length_penalty
    if no_repeat_ngram_size is not None:
        options.no_repeat_ngram_size = no_repeat_ngram_size
    return options


@dataclass(frozen=True)
class RetryPolicy:
    """How calls are retried. `attempts` counts the first try; 1 turns retries off."""

    attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    """Each pause is randomised by +/- this fraction, so clients do not retry in lockstep."""
    codes: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE,
                                                   grpc.StatusCode.RESOURCE_EXHAUSTED})

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.initial_backoff_s < 0 or self.multiplier < 1:
            raise ValueError("attempts >= 1, initial_backoff_s >= 0 and multiplier >= 1")

    def pause_s(self, retry: int) -> float:
        """The pause before retry number `retry` (1 for the first retry)."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        return base * (1 + random.uniform(-self.jitter, self.jitter))

    def retryable(self, error: grpc.RpcError) -> bool:
        return isinstance(error, grpc.RpcError) and error.code() in self.codes


def open_channel(target: str, *, tls: bool = False, ca_cert: str = "", client_cert: str = "",
                 client_key: str = "", options: Sequence[tuple[str, object]] = ()
                 ) -> grpc.Channel:
    """A blocking channel to `target`: TLS when `tls` or any certificate is given (server verified
    against `ca_cert`, else the system roots; `client_cert`/`client_key` for mutual TLS)."""
    credentials = _credentials(tls, ca_cert, client_cert, client_key)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def open_aio_channel(target: str, *, tls: bool = False, ca_cert: str = "",
                     client_cert: str = "", client_key: str = "",
                     options: Sequence[tuple[str, object]] = ()) -> grpc.aio.Channel:
    """The asyncio twin of `open_channel`."""
    credentials = _credentials(tls, ca_cert, client_cert, client_key)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    return grpc.aio.secure_channel(target, credentials, options=list(options))


def _read_pem(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ClientError(f"cannot read the {what} {path!r}: {error.strerror}") from None
    if not data.strip():
        raise ClientError(f"the {what} {path!r} is empty")
    return data


def channel_credentials(*, ca_cert: str = "", client_cert: str = "",
                        client_key: str = "") -> grpc.ChannelCredentials:
    """TLS verified against `ca_cert` (system roots when empty), with a client certificate for
    mutual TLS when `client_cert` and `client_key` are given."""
    if bool(client_cert) != bool(client_key):
        raise ClientError("a client certificate and its key must be given together")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(ca_cert, "CA bundle") if ca_cert else None,
        private_key=_read_pem(client_key, "client key") if client_key else None,
        certificate_chain=_read_pem(client_cert, "client certificate") if client_cert else None)


def _credentials(tls: bool, ca_cert: str, client_cert: str,
                 client_key: str) -> grpc.ChannelCredentials | None:
    if tls or ca_cert or client_cert or client_key:
        return channel_credentials(ca_cert=ca_cert, client_cert=client_cert,
                                   client_key=client_key)
    return None


def auth_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying a bearer token (None when there is no token)."""
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),) if token else None


def _request(articles: Sequence[tuple[str, str]], options: pb.GenerationOptions | None,
             priority: pb.Priority = pb.PRIORITY_UNSPECIFIED) -> pb.SummarizeRequest:
    return pb.SummarizeRequest(articles=[pb.Article(id=i, text=t) for i, t in articles],
                               options=options, priority=priority)


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _channel_options(max_message_bytes: int, load_balancing: str = DEFAULT_LOAD_BALANCING,
                     own_connections: bool = False) -> list[tuple[str, object]]:
    """`own_connections`: the channel's connections are its own (gRPC otherwise shares one
    connection among channels to the same address with the same options)."""
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", service_config(load_balancing)),
            *([("grpc.use_local_subchannel_pool", 1)] if own_connections else [])]


class _Pending:
    """Articles sent on one stream and not answered yet; on a broken stream they are sent again.
    `in_flight` holds the ids unanswered on every stream of the run, to refuse a duplicate."""

    def __init__(self, in_flight: set[str]) -> None:
        self._texts: dict[str, str] = {}
        self._in_flight = in_flight

    def add(self, article_id: str, text: str) -> None:
        if article_id in self._in_flight:
            raise ValueError(f"duplicate article id {article_id!r} in flight")
        self._in_flight.add(article_id)
        self._texts[article_id] = text

    def answered(self, article_id: str) -> str | None:
        """The article's text, once it is answered (None: not in flight here). Its id stays
        taken until `release`: an article sent again keeps it."""
        return self._texts.pop(article_id, None)

    def release(self, article_id: str) -> None:
        self._in_flight.discard(article_id)

    def add_again(self, article_id: str, text: str) -> None:
        """An article answered RESOURCE_EXHAUSTED on its own, sent again (its id still taken)."""
        self._texts[article_id] = text

    def snapshot(self) -> list[tuple[str, str]]:
        return list(self._texts.items())

    def __len__(self) -> int:
        return len(self._texts)


class _Source:
    """The caller's articles, read lazily by whichever stream is feeding (one at a time); kept
    across streams."""

    def __init__(self, articles: AsyncIterator[tuple[str, str]]) -> None:
        self._articles = articles
        self._lock = asyncio.Lock()
        self.exhausted = False
        """The caller's articles are all read (or reading them failed)."""
        self._again: collections.deque[tuple[str, str]] = collections.deque()
        self._backing_off: set[asyncio.Future[None]] = set()
        self._changed = asyncio.Event()
        self.sent_again: collections.Counter[str] = collections.Counter()
        """Per article answered RESOURCE_EXHAUSTED on its own, how often it went out again."""
        self.error: BaseException | None = None
        """What reading the articles raised: the run ends with it once the articles already
        sent are answered (re-raised as it is, never as a gRPC status)."""

    async def take(self) -> tuple[str, str] | None:
        """The next article, or None once there are no more (or reading them failed)."""
        async with self._lock:
            if self.exhausted:
                return None
            try:
                article = await anext(self._articles, None)
            except Exception as error:  # noqa: BLE001 - re-raised to the caller at the end
                self.fail(error)
                return None
            if article is None:
                self.exhausted = True
            return article

    def fail(self, error: BaseException) -> None:
        self.error, self.exhausted = error, True

    def more(self) -> bool:
        """Whether any article may still go out: the caller's, or one to send again (waiting out
        its backoff, or due now)."""
        return not self.exhausted or bool(self._again) or bool(self._backing_off)

    def send_again(self, article: tuple[str, str], pause_s: float) -> None:
        """Send `article` again after `pause_s`, before new articles (it takes a slot among those
        in flight again then)."""
        self.sent_again[article[0]] += 1

        async def due() -> None:
            await asyncio.sleep(pause_s)
            self._again.append(article)

        task = asyncio.ensure_future(due())
        self._backing_off.add(task)
        task.add_done_callback(self._due)

    def _due(self, task: asyncio.Future[None]) -> None:
        self._backing_off.discard(task)
        self._changed.set()

    def due(self) -> bool:
        return bool(self._again)

    def take_again(self) -> tuple[str, str] | None:
        return self._again.popleft() if self._again else None

    async def changed(self) -> None:
        """Until an article's backoff ends."""
        await self._changed.wait()
        self._changed.clear()

    def cancel(self) -> None:
        for task in list(self._backing_off):
            task.cancel()


def _check_id(article: tuple[str, str]) -> tuple[str, str]:
    article_id, text = article
    if not article_id:
        raise ValueError("summarize_many needs a non-empty id for every article")
    return article_id, text


class _ClientBase:
    """What both clients share: the time budget, the retry decisions, the token."""

    def __init__(self, timeout_s: float | None, retry: RetryPolicy, token: str) -> None:
        self.timeout_s = timeout_s
        self.retry = retry
        self._metadata = auth_metadata(token)

    def _deadline(self, timeout_s: float | None) -> float | None:
        budget = self.timeout_s if timeout_s is None else timeout_s
        return None if budget is None else time.monotonic() + budget

    def _pause(self, attempt: int, error: grpc.RpcError, deadline: float | None
               ) -> float | None:
        """How long to wait before trying again, or None to give up and raise `error`."""
        if attempt >= self.retry.attempts or not self.retry.retryable(error):
            return None
        pause = self.retry.pause_s(attempt)
        if deadline is not None and time.monotonic() + pause >= deadline:
            return None
        return pause


class SummarizerClient(_ClientBase):
    """Blocking client. `timeout_s` is each call's budget, retries included (None: no limit)."""

    def __init__(self, target: str, *, timeout_s: float | None = 300.0,
                 retry: RetryPolicy = RetryPolicy(), tls: bool = False, ca_cert: str = "",
                 client_cert: str = "", client_key: str = "", token: str = "",
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 load_balancing: str = DEFAULT_LOAD_BALANCING) -> None:
        super().__init__(timeout_s, retry, token)
        self._settings: dict[str, Any] = dict(
            target=target, timeout_s=timeout_s, retry=retry, tls=tls, ca_cert=ca_cert,
            client_cert=client_cert, client_key=client_key, token=token,
            max_message_bytes=max_message_bytes, load_balancing=load_balancing)
        self._channel, self._interactive_channel = (
            open_channel(target, tls=tls, ca_cert=ca_cert, client_cert=client_cert,
                         client_key=client_key,
                         options=_channel_options(max_message_bytes, load_balancing, own))
            for own in (False, True))  # a channel connects on its first call, not before
        self._stub = pb_grpc.SummarizerStub(self._channel)
        self._interactive_stub = pb_grpc.SummarizerStub(self._interactive_channel)

    def __enter__(self) -> SummarizerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()
        self._interactive_channel.close()

    def _with_retries(self, call: Callable[[float | None], T],
                      timeout_s: float | None) -> T:
        deadline = self._deadline(timeout_s)
        for attempt in itertools.count(1):
            try:
                return call(_remaining(deadline))
            except grpc.RpcError as error:
                pause = self._pause(attempt, error, deadline)
                if pause is None:
                    raise
                time.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    def summarize(self, articles: Sequence[tuple[str, str]],
                  options: pb.GenerationOptions | None = None, *,
                  timeout_s: float | None = None, priority: str = "") -> list[Result]:
        """Summarise (id, text) pairs in one call; results in the same order. An article that
        failed on its own (while others succeeded) comes back as an ArticleFailure.
        `priority`: "interactive", "default" or "bulk" ("": the server's default for the
        token); see PRIORITIES."""
        request = _request(articles, options, priority_value(priority))
        stub = self._interactive_stub if request.priority == pb.PRIORITY_INTERACTIVE else self._stub
        response = self._with_retries(
            lambda remaining: stub.Summarize(request, timeout=remaining,
                                             metadata=self._metadata), timeout_s)
        return [result_from_pb(r) for r in response.results]

    def summarize_batches(self, articles: Iterable[tuple[str, str]], batch_size: int,
                          options: pb.GenerationOptions | None = None, *,
                          priority: str = "") -> Iterator[Result]:
        """Summarise any number of articles, `batch_size` per call, yielding results in order."""
        batch: list[tuple[str, str]] = []
        for article in articles:
            batch.append(article)
            if len(batch) >= batch_size:
                yield from self.summarize(batch, options, priority=priority)
                batch = []
        if batch:
            yield from self.summarize(batch, options, priority=priority)

    def summarize_many(self, articles: Iterable[tuple[str, str]],
                       options: pb.GenerationOptions | None = None, *, max_in_flight: int = 64,
                       request_size: int = 16, streams: int = DEFAULT_STREAMS,
                       articles_per_stream: int = DEFAULT_ARTICLES_PER_STREAM,
                       priority: str = "") -> Iterator[Result]:
        """Summarise an iterable of (id, text) of any size through SummarizeStream (`streams` of
        them at once, each carrying up to `articles_per_stream` articles before another takes its
        place), with at most `max_in_flight` articles sent and unanswered in all; results in
        completion order. Ids must be
        unique among the articles in flight. The iterable is read lazily (on the client's own
        thread, see below); an exception it raises ends the run, after the articles already sent
        are answered, and reaches the caller as it is.

        `AsyncSummarizerClient.summarize_many` does the work, on a private event loop in a thread
        that lives as long as the iteration: closing the generator (or leaving a `for` loop
        early, or Ctrl-C) cancels the streams and ends the thread."""
        _check_many(max_in_flight, request_size, streams, articles_per_stream)
        priority_value(priority)  # an unknown class fails here, not on the loop thread
        with _LoopThread() as loop:
            client = loop.run(self._async_twin())
            results = client.summarize_many(articles, options, max_in_flight=max_in_flight,
                                            request_size=request_size, streams=streams,
                                            articles_per_stream=articles_per_stream,
                                            priority=priority)
            try:
                while not isinstance(result := _blocking(loop.next, results), _Done):
                    yield result
            finally:
                loop.finish(results, client)

    async def _async_twin(self) -> AsyncSummarizerClient:
        """An asyncio client with this one's settings, made on the running loop."""
        return AsyncSummarizerClient(**self._settings)

    def model_info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        return self._with_retries(
            lambda remaining: self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                      timeout=remaining,
                                                      metadata=self._metadata), timeout_s)


class AsyncSummarizerClient(_ClientBase):
    """The asyncio client: the same methods as SummarizerClient, awaitable."""

    def __init__(self, target: str, *, timeout_s: float | None = 300.0,
                 retry: RetryPolicy = RetryPolicy(), tls: bool = False, ca_cert: str = "",
                 client_cert: str = "", client_key: str = "", token: str = "",
                 max_message_bytes: int = MAX_MESSAGE_BYTES,
                 load_balancing: str = DEFAULT_LOAD_BALANCING) -> None:
        super().__init__(timeout_s, retry, token)
        self._channel, self._interactive_channel = (
            open_aio_channel(target, tls=tls, ca_cert=ca_cert, client_cert=client_cert,
                             client_key=client_key,
                             options=_channel_options(max_message_bytes, load_balancing, own))
            for own in (False, True))  # see SummarizerClient
        self._stub = pb_grpc.SummarizerStub(self._channel)
        self._interactive_stub = pb_grpc.SummarizerStub(self._interactive_channel)

    async def __aenter__(self) -> AsyncSummarizerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()
        await self._interactive_channel.close()

    async def _with_retries(self, call: Callable[[float | None], Awaitable[T]],
                            timeout_s: float | None) -> T:
        deadline = self._deadline(timeout_s)
        for attempt in itertools.count(1):
            try:
                return await call(_remaining(deadline))
            except grpc.RpcError as error:
                pause = self._pause(attempt, error, deadline)
                if pause is None:
                    raise
                await asyncio.sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover

    async def summarize(self, articles: Sequence[tuple[str, str]],
                        options: pb.GenerationOptions | None = None, *,
                        timeout_s: float | None = None, priority: str = "") -> list[Result]:
        request = _request(articles, options, priority_value(priority))
        stub = self._interactive_stub if request.priority == pb.PRIORITY_INTERACTIVE else self._stub
        response = await self._with_retries(
            lambda remaining: stub.Summarize(request, timeout=remaining,
                                             metadata=self._metadata), timeout_s)
        return [result_from_pb(r) for r in response.results]

    async def summarize_many(self, articles: Iterable[tuple[str, str]] | AsyncIterable[
            tuple[str, str]], options: pb.GenerationOptions | None = None, *,
            max_in_flight: int = 64, request_size: int = 16, streams: int = DEFAULT_STREAMS,
            articles_per_stream: int = DEFAULT_ARTICLES_PER_STREAM,
            priority: str = "") -> AsyncGenerator[Result, None]:
        """See SummarizerClient.summarize_many; `articles` may also be an async iterable. A
        plain iterable is read on the event loop, so it should not block. `priority`: the
        streams' class (every request of them carries it)."""
        _check_many(max_in_flight, request_size, streams, articles_per_stream)
        value = priority_value(priority)
        source = _Source(_aiter(articles))
        slots = asyncio.Semaphore(max_in_flight)
        in_flight: set[str] = set()
        results: asyncio.Queue[Result | _LaneEnd] = asyncio.Queue()
        lanes = [asyncio.ensure_future(self._lane(source, slots, _Pending(in_flight), options,
                                                  request_size, articles_per_stream, results,
                                                  value))
                 for _ in range(streams)]
        running = len(lanes)
        try:
            while running:
                item = await results.get()
                if isinstance(item, _LaneEnd):
                    running -= 1
                    if item.error is not None:
                        raise item.error
                    continue
                slots.release()  # when the caller takes it: results never pile up unread
                yield item
            if source.error is not None:
                raise source.error
        finally:
            source.cancel()
            for lane in lanes:
                lane.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)

    async def _lane(self, source: _Source, slots: asyncio.Semaphore, pending: _Pending,
                    options: pb.GenerationOptions | None, request_size: int,
                    articles_per_stream: int, results: asyncio.Queue[Result | _LaneEnd],
                    priority: pb.Priority = pb.PRIORITY_UNSPECIFIED) -> None:
        """One of summarize_many's streams, opened again and again: after `articles_per_stream`
        articles (so a balancing channel spreads the work over its backends, new ones included)
        and after a retryable break (the unanswered articles go out again on the new stream,
        which the channel sends to a backend that is up)."""
        retries = 0
        try:
            while True:
                stub = (self._interactive_stub if priority == pb.PRIORITY_INTERACTIVE
                        else self._stub)
                call = stub.SummarizeStream(metadata=self._metadata)
                feeder = asyncio.ensure_future(_feed(call, pending, source, slots, options,
                                                     request_size, articles_per_stream,
                                                     priority))
                try:
                    while (message := await call.read()) is not grpc.aio.EOF:
                        text = pending.answered(message.id)
                        if text is None:
                            continue
                        retries = 0  # progress: a later break gets the full retry budget
                        if (message.error.code == _RESOURCE_EXHAUSTED
                                and source.sent_again[message.id] + 1 < self.retry.attempts):
                            # Its place in the queue went to more urgent work: again, later.
                            source.send_again((message.id, text), self.retry.pause_s(
                                source.sent_again[message.id] + 1))
                            slots.release()
                            continue
                        pending.release(message.id)
                        source.sent_again.pop(message.id, None)
                        results.put_nowait(result_from_pb(message))  # its slot: see below
                    await feeder  # a bug in the feeding itself surfaces here
                    if len(pending):
                        raise RuntimeError("the stream ended with articles unanswered")
                    if not source.more():
                        break
                except grpc.RpcError as error:
                    if source.error is not None:
                        break  # the caller's source failed; summarize_many raises its error
                    retries += 1
                    retryable = self.retry.retryable(error) or _lost_status(error)
                    if retries >= self.retry.attempts or not retryable:
                        raise
                    await asyncio.sleep(self.retry.pause_s(retries))
                finally:
                    feeder.cancel()
                    call.cancel()
        except Exception as error:  # noqa: BLE001 - handed to summarize_many, which raises it
            results.put_nowait(_LaneEnd(error))
        else:
            results.put_nowait(_LaneEnd(None))

    async def model_info(self, *, timeout_s: float | None = None) -> pb.ModelInfo:
        return await self._with_retries(
            lambda remaining: self._stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                      timeout=remaining,
                                                      metadata=self._metadata), timeout_s)


_RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]


def _lost_status(error: grpc.RpcError) -> bool:
    """grpcio's asyncio client reports a write that races the server ending the stream as this
    local INTERNAL, hiding the server's status (grpc/grpc#36066). The stream is broken either way;
    summarize_many treats it like UNAVAILABLE and sends the unanswered articles again."""
    return (error.code() == grpc.StatusCode.INTERNAL
            and error.details() == "Internal error from Core")


async def _feed(call: grpc.aio.StreamStreamCall, pending: _Pending, source: _Source,
                slots: asyncio.Semaphore, options: pb.GenerationOptions | None,
                request_size: int, articles_per_stream: int,
                priority: pb.Priority = pb.PRIORITY_UNSPECIFIED) -> None:
    """Write the unanswered articles again (after a broken stream), then new ones from the
    source while a slot is free, up to `articles_per_stream` on this stream. A write to a stream
    that has failed ends the feeding: the reader sees the stream's real status."""
    with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
        resend = pending.snapshot()
        for start in range(0, len(resend), request_size):
            await call.write(_request(resend[start:start + request_size], options, priority))
        sent = len(resend)
        while source.more() and sent < articles_per_stream:
            batch: list[tuple[str, str]] = []
            while len(batch) < min(request_size, articles_per_stream - sent):
                if batch and slots.locked():
                    break  # send what we have rather than wait for a slot
                if source.exhausted and not source.due():
                    if batch or not source.more():
                        break
                    await source.changed()  # an article to send again, after its backoff
                    continue
                await slots.acquire()
                again = source.take_again()  # before new ones
                if again is not None:
                    pending.add_again(*again)
                    batch.append(again)
                    continue
                article = await source.take()
                if article is None:
                    slots.release()
                    break
                try:
                    article_id, text = _check_id(article)
                    pending.add(article_id, text)
                except ValueError as error:
                    slots.release()
                    source.fail(error)
                    break
                batch.append((article_id, text))
            if batch:
                await call.write(_request(batch, options, priority))
                sent += len(batch)
        await call.done_writing()


class _LaneEnd:
    """A lane of summarize_many has ended: normally (error None) or with an exception."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error


def _check_many(max_in_flight: int, request_size: int, streams: int,
                articles_per_stream: int) -> None:
    if min(max_in_flight, request_size, streams, articles_per_stream) < 1:
        raise ValueError("max_in_flight, request_size, streams and articles_per_stream must "
                         "be at least 1")


def _blocking(step: Callable[[AsyncIterator[T]], T | _Done], results: AsyncIterator[T]
              ) -> T | _Done:
    """One step of an asyncio iteration for the blocking client: a failed call is raised as a
    CallError, a plain grpc.RpcError, not as grpc's asyncio type."""
    try:
        return step(results)
    except grpc.aio.AioRpcError as error:
        raise CallError.of(error) from error


class _Done:
    """The end of an iteration driven by `_LoopThread.next`."""


_DONE = _Done()


class _LoopThread:
    """A private event loop in a thread of its own, for the blocking client to drive the asyncio
    implementation; the thread ends when the `with` block does."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="summarizer-client-loop", daemon=True)
        self._step: asyncio.Task | None = None

    def __enter__(self) -> _LoopThread:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def next(self, iterator: AsyncIterator[T]) -> T | _Done:
        """The next item, or _DONE. Interrupted (Ctrl-C), the step goes on until `finish`."""

        async def step() -> T | _Done:
            self._step = asyncio.current_task()
            return await anext(iterator, _DONE)

        return self.run(step())

    def finish(self, iterator: AsyncGenerator[Any, None], client: AsyncSummarizerClient) -> None:
        """Cancel a step still running (the caller was interrupted), close the iterator (which
        cancels its stream) and the client's channel."""

        async def finish() -> None:
            if self._step is not None and not self._step.done():
                self._step.cancel()
                with contextlib.suppress(BaseException):
                    await self._step
            try:
                await iterator.aclose()
            finally:
                await client.close()
                await self._loop.shutdown_asyncgens()
                # What the cancelled calls left behind (grpc's own status tasks of each stream)
                # finishes here, before the loop closes: no "Task was destroyed" at exit.
                others = [task for task in asyncio.all_tasks()
                          if task is not asyncio.current_task()]
                for task in others:
                    task.cancel()
                await asyncio.gather(*others, return_exceptions=True)

        self.run(finish())


async def _aiter(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item
