"""A small synchronous client for the Summarizer service (used by `summarizer summarize`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import grpc

from .domain import ArticleFailure, ArticleSummary
from .security import channel_credentials
from .gen.summarizer.v1 import summarizer_pb2 as pb
from .gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc


def result_from_pb(message: pb.ArticleResult) -> ArticleSummary | ArticleFailure:
    """A result, or the in-band failure of that one article."""
    if message.HasField("error"):
        return ArticleFailure(id=message.id, code=message.error.code,
                              message=message.error.message)
    return ArticleSummary(id=message.id, summary=message.summary, headline=message.headline,
                          input_tokens=message.input_tokens, truncated=message.truncated,
                          summary_tokens=message.summary_tokens,
                          headline_tokens=message.headline_tokens)


_OUTPUTS = {"both": pb.OUTPUTS_BOTH, "summary": pb.OUTPUTS_SUMMARY,
            "headline": pb.OUTPUTS_HEADLINE}


def make_options(*, summary_max_tokens: int = 0, summary_min_tokens: int = 0,
                 headline_max_tokens: int = 0, headline_min_tokens: int = 0, num_beams: int = 0,
                 outputs: str = "both", max_input_tokens: int = 0) -> pb.GenerationOptions:
    """Generation options; 0 leaves a field to the server's default."""
    return pb.GenerationOptions(
        summary_max_tokens=summary_max_tokens, summary_min_tokens=summary_min_tokens,
        headline_max_tokens=headline_max_tokens, headline_min_tokens=headline_min_tokens,
        num_beams=num_beams, outputs=_OUTPUTS[outputs], max_input_tokens=max_input_tokens)


def open_channel(target: str, *, tls: bool = False, ca_cert: str = "", client_cert: str = "",
                 client_key: str = "", options: Sequence[tuple[str, object]] = ()
                 ) -> grpc.Channel:
    """A channel to `target`: TLS when `tls` or any certificate is given (server verified against
    `ca_cert`, else the system roots; `client_cert`/`client_key` for mutual TLS), else plaintext."""
    if tls or ca_cert or client_cert or client_key:
        credentials = channel_credentials(ca_cert=ca_cert, client_cert=client_cert,
                                          client_key=client_key)
        return grpc.secure_channel(target, credentials, options=list(options))
    return grpc.insecure_channel(target, options=list(options))


def auth_metadata(token: str) -> tuple[tuple[str, str], ...] | None:
    """Call metadata carrying a bearer token (None when there is no token)."""
    return (("authorization", f"Bearer {token}"),) if token else None


class SummarizerClient:
    def __init__(self, target: str, *, timeout_s: float | None = 300.0,
                 max_message_bytes: int = 64 * 1024 * 1024, tls: bool = False,
                 ca_cert: str = "", client_cert: str = "", client_key: str = "",
                 token: str = "") -> None:
        self.timeout_s = timeout_s
        self._channel = open_channel(
            target, tls=tls, ca_cert=ca_cert, client_cert=client_cert, client_key=client_key,
            options=[("grpc.max_receive_message_length", max_message_bytes),
                     ("grpc.max_send_message_length", max_message_bytes)])
        self._metadata = auth_metadata(token)
        self._stub = pb_grpc.SummarizerStub(self._channel)

    def __enter__(self) -> SummarizerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def summarize(self, articles: Sequence[tuple[str, str]],
                  options: pb.GenerationOptions | None = None
                  ) -> list[ArticleSummary | ArticleFailure]:
        """Summarise (id, text) pairs in one call; results in the same order. An article that
        failed on its own (while others succeeded) comes back as an ArticleFailure."""
        request = pb.SummarizeRequest(
            articles=[pb.Article(id=article_id, text=text) for article_id, text in articles],
            options=options)
        response = self._stub.Summarize(request, timeout=self.timeout_s,
                                        metadata=self._metadata)
        return [result_from_pb(r) for r in response.results]

    def summarize_batches(self, articles: Iterable[tuple[str, str]], batch_size: int,
                          options: pb.GenerationOptions | None = None
                          ) -> Iterator[ArticleSummary | ArticleFailure]:
        """Summarise any number of articles, `batch_size` per call, yielding results in order."""
        batch: list[tuple[str, str]] = []
        for article in articles:
            batch.append(article)
            if len(batch) >= batch_size:
                yield from self.summarize(batch, options)
                batch = []
        if batch:
            yield from self.summarize(batch, options)

    def model_info(self) -> pb.ModelInfo:
        return self._stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout_s,
                                       metadata=self._metadata)
