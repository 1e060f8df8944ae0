"""From checked articles to model work, and from model results back to articles.

- Planning: each article cleaned and tokenised and, when it is longer than the window under the
  CHUNK policy, split into chunks (`Plan`). Tokenising runs in one thread of its own (the prep
  thread): a request of long articles takes long enough to stall the event loop otherwise.
- The first round of work: the jobs a plan queues (the article whole, or its chunks).
- Assembly: an article's result from its model outputs, or, for a chunked article, from the
  map-reduce passes (service/serving/mapreduce.py), which queue their later passes through the
  caller's `CallWork`.
- Tracing: each accepted article has a span from its first job to its result (`ArticleTrace`),
  and a chunked article's map pass one of its own; its jobs carry the span their work belongs to.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ..domain import (ArticleSummary, Generated, GenerationParams, LongInput, Outputs,
                      PreparedArticle)
from ..engines.protocol import Engine
from ..errors import InvalidArgument
from ..text import model_text
from .batcher import Job
from .calls import CallWork, jobs_for
from .fairprep import FairPrep, caller_scope
from .mapreduce import ChunkedArticle, MapReduce, with_outputs
from .tracing import NO_SPAN, NO_TRACER, Span, Tracer
from .validation import ArticleIn, Validator

T = TypeVar("T")

PIECE_CHARS = 100_000
"""Preparation is handed to the thread in pieces of consecutive articles of about this many
characters (at least one article): small enough that another caller's turn comes soon, large
enough that a request of many short articles is tokenised in a few batches."""


def pieces(articles: Sequence[ArticleIn]) -> list[tuple[int, int]]:
    """(start, end) of consecutive runs of articles of about PIECE_CHARS characters each."""
    bounds: list[tuple[int, int]] = []
    start = chars = 0
    for index, article in enumerate(articles):
        chars += len(article.text)
        if chars >= PIECE_CHARS:
            bounds.append((start, index + 1))
            start, chars = index + 1, 0
    if start < len(articles):
        bounds.append((start, len(articles)))
    return bounds


@dataclass(frozen=True)
class Plan:
    """An accepted article and its first round of model work: the article whole (it fits the
    window, or is to be truncated), or its chunks."""

    article: ArticleIn
    whole: PreparedArticle | None = None
    chunked: ChunkedArticle | None = None

    @property
    def model_inputs(self) -> int:
        return len(self.chunked.prepared) if self.chunked else 1

    def first_jobs(self, params: GenerationParams, deadline: float | None,
                   trace: ArticleTrace | None = None) -> list[Job]:
        trace = UNTRACED if trace is None else trace
        if self.chunked is None:
            assert self.whole is not None  # a plan holds the article whole or its chunks
            return jobs_for([self.whole], params, deadline, trace.article)
        return jobs_for(self.chunked.prepared, with_outputs(params, Outputs.SUMMARY), deadline,
                        trace.map)


@dataclass(frozen=True)
class ArticleTrace:
    """An article's spans: its own, and its map pass's when it is chunked (else NO_SPAN)."""

    article: Span
    map: Span = NO_SPAN

    def end(self) -> None:
        self.map.end()
        self.article.end()


UNTRACED = ArticleTrace(NO_SPAN)


class Planner:
    def __init__(self, engine: Engine, validator: Validator, *, max_chunks: int,
                 max_depth: int, tracer: Tracer = NO_TRACER) -> None:
        self.engine = engine
        self.validator = validator
        self.tracer = tracer
        # Tokenising (prepare, count_tokens) runs in one thread, one piece at a time, callers
        # in turn; decoding output ids runs inside generate, in the model's thread. The
        # tokenizers allow that (see service/engines/tokenizer.py).
        self.prep = FairPrep()
        self.mapreduce = MapReduce(engine, self.in_prep, max_chunks=max_chunks,
                                   max_depth=max_depth, tracer=tracer)

    def shutdown(self) -> None:
        self.prep.shutdown()

    async def in_prep(self, function: Callable[..., T], *args: Any) -> T:
        return await self.prep.run(function, *args)

    # ----- planning -----
    async def plan_all(self, articles: Sequence[ArticleIn], params: GenerationParams,
                       policy: LongInput) -> list[Plan | InvalidArgument]:
        """Each article's plan, or what is wrong with it, in request order. The work goes to
        the preparation thread a few articles at a time (see PIECE_CHARS), in the caller's turn
        (fairprep.py): other callers' work runs between the pieces."""
        caller_scope()
        plans: list[Plan | InvalidArgument] = []
        for start, end in pieces(articles):
            plans += await self.in_prep(self._plan_piece, articles, start, end, params, policy)
        return plans

    def _plan_piece(self, articles: Sequence[ArticleIn], start: int, end: int,
                    params: GenerationParams, policy: LongInput) -> list[Plan | InvalidArgument]:
        """Plans of articles[start:end] (in the preparation thread)."""
        cleaned: list[str | InvalidArgument] = []
        for index in range(start, end):
            try:
                cleaned.append(self.validator.clean(index, articles[index]))
            except InvalidArgument as error:
                cleaned.append(error)
        texts = [t for t in cleaned if isinstance(t, str)]
        prepared = iter(self.engine.prepare([model_text(t) for t in texts], params)
                        if texts else [])
        return [text if isinstance(text, InvalidArgument)
                else self._plan(index, articles[index], text, next(prepared), params, policy)
                for index, text in zip(range(start, end), cleaned)]

    def _plan(self, index: int, article: ArticleIn, text: str, whole: PreparedArticle,
              params: GenerationParams, policy: LongInput) -> Plan | InvalidArgument:
        if not whole.truncated or policy is LongInput.TRUNCATE:
            return Plan(article, whole=whole)
        chunked = self.mapreduce.split(text, params)
        if chunked is None:
            return InvalidArgument(
                "articles.text", f"too long to summarise in chunks: it needs more than "
                f"{self.mapreduce.max_chunks} chunks of the model's "
                f"{params.max_input_tokens}-token window (--max-chunks-per-article); send a "
                "shorter text, or set options.long_input to LONG_INPUT_POLICY_TRUNCATE to "
                "summarise its beginning", article_index=index, article_id=article.id)
        return Plan(article, chunked=chunked)

    # ----- tracing -----
    def trace(self, plan: Plan, index: int) -> ArticleTrace:
        """Start the article's spans (children of the current span: the call's), before its
        first jobs are queued. `assemble` ends them; so must whoever never calls it."""
        if self.tracer is NO_TRACER:
            return UNTRACED  # nothing to build per article
        attributes: dict[str, Any] = {"article_index": index, "chunks": plan.model_inputs}
        if plan.article.id:
            attributes["article_id"] = plan.article.id
        if plan.chunked is None:
            assert plan.whole is not None
            return ArticleTrace(self.tracer.start(
                "article", input_tokens=plan.whole.input_tokens,
                truncated=plan.whole.truncated, **attributes))
        article = self.tracer.start("article", input_tokens=plan.chunked.input_tokens,
                                    **attributes)
        return ArticleTrace(article, self.tracer.start("map", article,
                                                       chunks=plan.model_inputs))

    # ----- assembly -----
    async def assemble(self, plan: Plan, first: Sequence[asyncio.Future[Generated]],
                       params: GenerationParams, call: CallWork,
                       trace: ArticleTrace = UNTRACED) -> ArticleSummary:
        """The article's result, once its first round (`first`, queued) and any later passes are
        done. Ends the article's spans."""
        try:
            with self.tracer.current(trace.article):
                if plan.chunked is not None:
                    result = await self.mapreduce.finish(plan.article.id, plan.chunked, first,
                                                         params, call.queue, trace.map)
                else:
                    out = await first[0]
                    whole = plan.whole
                    assert whole is not None
                    result = ArticleSummary(
                        id=plan.article.id, summary=out.summary, headline=out.headline,
                        input_tokens=whole.input_tokens, truncated=whole.truncated,
                        summary_tokens=out.summary_tokens, headline_tokens=out.headline_tokens)
            trace.article.set(summary_tokens=result.summary_tokens,
                              headline_tokens=result.headline_tokens, truncated=result.truncated)
            return result
        except BaseException as error:
            trace.article.fail(error)
            raise
        finally:
            trace.end()
