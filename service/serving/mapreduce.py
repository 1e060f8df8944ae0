"""Summaries of articles longer than the model's window: map-reduce over their chunks.

Every chunk is summarised (map); the chunk summaries, joined, are summarised again (reduce). Where
the joined summaries do not fit one window they are chunked and summarised once more, at most
`max_depth` times and only while that makes them shorter; past that the final pass reads them cut
to the window and the result says `truncated`. The headline is written last, from the final
summary or from the article's opening sentences followed by it, as the headline model's manifest
says (`chunked_headline`).

Every model call goes through `Submit`, which the core gives: the same batcher as everyone else's
work, the caller's round-robin turn, deadline and cancellation. Tokenising goes through `Prep`
(the core's one tokenising thread). Chunk and reduce passes write summaries only (no headline), so
they batch with each other and with summary-only requests.

Each pass has a span (map, each reduce, the final reduce, the headline), under the article's, and
its jobs carry it, so each input's queue wait and engine batch show under the pass that queued it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .chunking import Chunk, chunks
from ..domain import (MIN_WINDOW_TOKENS, ArticleSummary, Generated, GenerationParams, Outputs,
                     PreparedArticle)
from ..engines.protocol import Engine
from ..text import model_text
from .tracing import NO_SPAN, NO_TRACER, Span, Tracer, span

log = logging.getLogger(__name__)

T = TypeVar("T")
Prep = Callable[..., Awaitable[Any]]
"""`await prep(function, *args)` runs function(*args) in the tokenising thread."""
Submit = Callable[[Sequence[PreparedArticle], GenerationParams, Span],
                  Awaitable[list[asyncio.Future[Generated]]]]
"""Queue inputs for the model (waiting for room), one result future per input; the span is the
pass's, which the jobs carry."""


@dataclass(frozen=True)
class ChunkedArticle:
    """An article too long for the window, in chunks, tokenised: the input of the map pass."""

    text: str
    """The cleaned article (paragraphs on lines)."""
    chunks: list[Chunk]
    prepared: list[PreparedArticle]

    @property
    def input_tokens(self) -> int:
        """Tokens the model reads for all chunks, the task prefix counted for each."""
        return sum(p.input_tokens for p in self.prepared)


def with_outputs(params: GenerationParams, outputs: Outputs) -> GenerationParams:
    return dataclasses.replace(params, outputs=outputs)


async def _all(futures: Sequence[asyncio.Future[T]]) -> list[T]:
    """All results; when one fails (or the wait is cancelled), nothing of the rest stays queued."""
    try:
        return list(await asyncio.gather(*futures))
    finally:
        for future in futures:
            future.cancel()


class MapReduce:
    def __init__(self, engine: Engine, prep: Prep, *, max_chunks: int, max_depth: int,
                 tracer: Tracer = NO_TRACER) -> None:
        self.engine = engine
        self.tracer = tracer
        self.prep = prep
        self.max_chunks = max_chunks
        self.max_depth = max_depth
        self.headline_from = next(
            (m.chunked_headline for m in engine.models if "headline" in m.role), "summary")

    # ----- in the tokenising thread -----
    def split(self, text: str, params: GenerationParams) -> ChunkedArticle | None:
        """The article's chunks, tokenised for summaries; None when it needs more than
        `max_chunks` (found without chunking or tokenising all of it)."""
        summary = with_outputs(params, Outputs.SUMMARY)
        pieces = list(itertools.islice(self._chunks(text, summary), self.max_chunks + 1))
        if len(pieces) > self.max_chunks:
            return None
        return ChunkedArticle(text, pieces,
                              self.engine.prepare([c.text for c in pieces], summary))

    def _chunks(self, text: str, params: GenerationParams, window: int = 0) -> Iterator[Chunk]:
        return chunks(text, lambda texts: self.engine.count_tokens(texts, params),
                      window or params.max_input_tokens)

    def _reduce_inputs(self, joined: str, summary: GenerationParams) -> list[PreparedArticle]:
        return self.engine.prepare([c.text for c in self._chunks(joined, summary)], summary)

    def _with_opening(self, text: str, summary_text: str, headline: GenerationParams) -> str:
        """The article's opening sentences, as many as fit beside the summary, then the
        summary."""
        count = self.engine.count_tokens([summary_text, ""], headline)
        room = headline.max_input_tokens - (count[0] - count[1]) - 1  # 1: the joining space
        if room - count[1] < MIN_WINDOW_TOKENS:
            return summary_text
        opening = next(self._chunks(text, headline, room), None)
        return summary_text if opening is None else f"{opening.text} {summary_text}"

    # ----- on the event loop -----
    async def finish(self, article_id: str, article: ChunkedArticle,
                     mapped: Sequence[asyncio.Future[Generated]], params: GenerationParams,
                     submit: Submit, map_span: Span = NO_SPAN) -> ArticleSummary:
        """Wait for the map pass (`mapped`, already queued, under `map_span`, which this ends),
        then reduce and write the headline."""
        summary = with_outputs(params, Outputs.SUMMARY)
        try:
            summaries = await _all(mapped)
        except BaseException as error:
            map_span.fail(error)
            raise
        finally:
            map_span.end()
        pieces = len(mapped)
        for depth in itertools.count():
            joined = "\n".join(s.summary for s in summaries)
            inputs = await self.prep(self._reduce_inputs, joined, summary)
            # Stop when one window holds them, at the depth cap, or when a pass would not
            # shorten them (summaries as long as their inputs never converge).
            if len(inputs) <= 1 or depth >= self.max_depth or len(inputs) >= pieces:
                break
            with span(self.tracer, "reduce", depth=depth + 1, inputs=len(inputs)) as pass_span:
                summaries = await _all(await submit(inputs, summary, pass_span))
            pieces = len(inputs)
        final_input = (await self.prep(self.engine.prepare, [model_text(joined)], summary))[0]
        if final_input.truncated:
            log.warning("article %r: after %d reduce passes its chunk summaries still exceed "
                        "the window; the final pass reads them cut to the window",
                        article_id, depth)
        with span(self.tracer, "reduce", depth=depth + 1, inputs=1, final=True,
                  input_tokens=final_input.input_tokens,
                  truncated=final_input.truncated) as pass_span:
            final = (await _all(await submit([final_input], summary, pass_span)))[0]

        headline, headline_tokens = "", 0
        if params.outputs.headline:
            headline_params = with_outputs(params, Outputs.HEADLINE)
            with span(self.tracer, "headline", source=self.headline_from) as pass_span:
                source = final.summary
                if self.headline_from == "opening+summary":
                    source = await self.prep(self._with_opening, article.text, final.summary,
                                             headline_params)
                prepared = await self.prep(self.engine.prepare, [source], headline_params)
                written = (await _all(await submit(prepared, headline_params, pass_span)))[0]
            headline, headline_tokens = written.headline, written.headline_tokens
        return ArticleSummary(
            id=article_id, summary=final.summary if params.outputs.summary else "",
            headline=headline, input_tokens=article.input_tokens,
            truncated=final_input.truncated,
            summary_tokens=final.summary_tokens if params.outputs.summary else 0,
            headline_tokens=headline_tokens, chunks=len(article.chunks))
