"""The application core: checks articles, tokenises them, batches them, assembles results.

Speaks only domain types (no protobuf): the gRPC servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from .batcher import Batcher, BatchReport, Job
from ..config import Settings
from ..domain import (ArticleFailure, ArticleSummary, Generated, GenerationParams, Limits,
                     LongInput, Outputs, PreparedArticle, RequestedOptions, resolve_options)
from ..engines.protocol import Engine
from ..errors import (GenerationFailed, InvalidArgument, OutOfMemory, QueueFull, SummarizerError,
                     is_out_of_memory, status_for)
from .mapreduce import ChunkedArticle, MapReduce, with_outputs
from ..text import clean_article, has_nul, model_text

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256
QUEUE_FULL_RETRY_S = 0.05
T = TypeVar("T")


@dataclass(frozen=True)
class ArticleIn:
    id: str
    text: str


def _failure(article_id: str, error: BaseException) -> ArticleFailure:
    code, message = status_for(error)
    return ArticleFailure(article_id, int(code), message)


@dataclass(frozen=True)
class _Planned:
    """An accepted article and its first round of model work: the article whole (it fits the
    window, or is to be truncated), or its chunks."""

    article: ArticleIn
    whole: PreparedArticle | None = None
    chunked: ChunkedArticle | None = None

    @property
    def model_inputs(self) -> int:
        return len(self.chunked.prepared) if self.chunked else 1


class SummarizerCore:
    def __init__(self, engine: Engine, settings: Settings,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.limits = Limits(max_num_beams=settings.max_num_beams,
                             max_new_tokens=min(settings.max_new_tokens,
                                                engine.max_new_tokens or settings.max_new_tokens))
        self.batcher: Batcher[PreparedArticle, Generated] = Batcher(
            self._run_batch, max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
            max_batch_tokens=settings.max_batch_tokens, on_batch=on_batch,
            check_invariants=settings.check_invariants)
        # Tokenisers are not safe to call from several threads at once: one thread does it all.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-prep")
        self.long_input = LongInput(settings.long_input)
        # An article's chunks are queued all at once, so a queue must hold them.
        self.mapreduce = MapReduce(
            engine, self._in_prep,
            max_chunks=min(settings.max_chunks_per_article, settings.max_queue),
            max_depth=settings.max_chunk_depth)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, timeout_s: float | None = None) -> None:
        await self.batcher.stop(timeout_s)
        self._prep.shutdown(wait=False, cancel_futures=True)

    def _run_batch(self, params: GenerationParams,
                   batch: list[PreparedArticle]) -> list[Generated]:
        try:
            return self.engine.generate(params, batch)
        except Exception as error:
            if is_out_of_memory(error):
                # The batcher retries smaller groups; alone, the article gets RESOURCE_EXHAUSTED.
                raise OutOfMemory(
                    f"the model ran out of memory on a batch of {len(batch)}; retry later, or "
                    "send a shorter article or ask for fewer beams") from error
            raise

    # ----- checks -----
    def resolve(self, options: RequestedOptions) -> GenerationParams:
        return resolve_options(options, self.engine.defaults, self.limits)

    def check_count(self, articles: Sequence[ArticleIn]) -> None:
        if not articles:
            raise InvalidArgument("articles", "the request has no articles")
        limit = self.settings.max_articles_per_request
        if len(articles) > limit:
            raise InvalidArgument(
                "articles", f"{len(articles)} articles, over the limit of {limit} per request; "
                            "split the request or use SummarizeStream")

    def check_ids(self, articles: Sequence[ArticleIn], *, required: bool,
                  taken: set[str] | frozenset[str] = frozenset()) -> None:
        seen: set[str] = set()
        for index, article in enumerate(articles):
            if required and not article.id:
                raise InvalidArgument("articles.id", "is empty; SummarizeStream matches results "
                                      "by id, so every article needs one", article_index=index)
            if len(article.id) > MAX_ID_CHARS:
                raise InvalidArgument("articles.id", f"is {len(article.id)} characters long, "
                                      f"over the limit of {MAX_ID_CHARS}", article_index=index)
            if article.id and (article.id in seen or article.id in taken):
                raise InvalidArgument("articles.id", f"duplicate id {article.id!r}; ids must be "
                                      "unique" + (" among the stream's articles in flight"
                                                  if taken else " within a request"),
                                      article_index=index, article_id=article.id)
            seen.add(article.id)

    def clean(self, index: int, article: ArticleIn) -> str:
        """The article's cleaned text (paragraphs on lines), or InvalidArgument saying what is
        wrong."""
        def bad(problem: str) -> InvalidArgument:
            return InvalidArgument("articles.text", problem, article_index=index,
                                   article_id=article.id)

        limit = self.settings.max_article_chars
        if len(article.text) > limit:
            raise bad(f"{len(article.text)} characters, over the limit of {limit}")
        if has_nul(article.text):
            raise bad("contains NUL characters; send the article as UTF-8 text (UTF-16 or "
                      "binary data was sent?)")
        cleaned = clean_article(article.text)
        if not cleaned:
            raise bad("is empty (nothing left after removing whitespace and page furniture)")
        return cleaned

    # ----- work -----
    async def _in_prep(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._prep, function, *args)

    async def _plan_all(self, articles: Sequence[ArticleIn], params: GenerationParams,
                        policy: LongInput) -> list[_Planned | InvalidArgument]:
        """Each article cleaned, tokenised and, if too long for the window under CHUNK, split;
        or what is wrong with it. Runs in the prep thread: cleaning and tokenising a request of
        long articles takes long enough to stall the event loop."""
        def work() -> list[_Planned | InvalidArgument]:
            cleaned: list[str | InvalidArgument] = []
            for index, article in enumerate(articles):
                try:
                    cleaned.append(self.clean(index, article))
                except InvalidArgument as error:
                    cleaned.append(error)
            texts = [t for t in cleaned if isinstance(t, str)]
            prepared = iter(self.engine.prepare([model_text(t) for t in texts], params)
                            if texts else [])
            return [text if isinstance(text, InvalidArgument)
                    else self._plan(index, article, text, next(prepared), params, policy)
                    for index, (article, text) in enumerate(zip(articles, cleaned))]

        return await self._in_prep(work)

    def _plan(self, index: int, article: ArticleIn, text: str, whole: PreparedArticle,
              params: GenerationParams, policy: LongInput) -> _Planned | InvalidArgument:
        if not whole.truncated or policy is LongInput.TRUNCATE:
            return _Planned(article, whole=whole)
        chunked = self.mapreduce.split(text, params)
        if chunked is None:
            return InvalidArgument(
                "articles.text", f"too long to summarise in chunks: it needs more than "
                f"{self.mapreduce.max_chunks} chunks of the model's "
                f"{params.max_input_tokens}-token window (--max-chunks-per-article); send a "
                "shorter text, or set options.long_input to LONG_INPUT_POLICY_TRUNCATE to "
                "summarise its beginning", article_index=index, article_id=article.id)
        return _Planned(article, chunked=chunked)

    def _enqueue(self, plans: Sequence[_Planned], params: GenerationParams,
                 deadline: float | None, group: object) -> list[asyncio.Future[ArticleSummary]]:
        """Queue the first round of work of `plans` as the caller `group`, all or none."""
        chunk_params = with_outputs(params, Outputs.SUMMARY)
        jobs = []
        for plan in plans:
            if plan.chunked is None:
                jobs.append(Job(plan.whole, key=params, cost=plan.whole.cost, deadline=deadline))
            else:
                jobs.extend(Job(p, key=chunk_params, cost=p.cost, deadline=deadline)
                            for p in plan.chunked.prepared)
        futures = iter(self.batcher.submit(jobs, group=group))
        results = []
        for plan in plans:
            if plan.chunked is None:
                results.append(self._assemble(plan.article, plan.whole, next(futures)))
            else:
                mapped = [next(futures) for _ in plan.chunked.prepared]
                results.append(self._finish_chunked(plan, mapped, params, deadline, group))
        return results

    @staticmethod
    def _assemble(article: ArticleIn, prepared: PreparedArticle,
                  generated: asyncio.Future[Generated]) -> asyncio.Future[ArticleSummary]:
        async def result() -> ArticleSummary:
            out = await generated
            return ArticleSummary(id=article.id, summary=out.summary, headline=out.headline,
                                  input_tokens=prepared.input_tokens, truncated=prepared.truncated,
                                  summary_tokens=out.summary_tokens,
                                  headline_tokens=out.headline_tokens)

        task = asyncio.ensure_future(result())
        # Cancelling the result (caller gone) cancels the queued job too.
        task.add_done_callback(lambda t: generated.cancel() if t.cancelled() else None)
        return task

    def _finish_chunked(self, plan: _Planned, mapped: list[asyncio.Future[Generated]],
                        params: GenerationParams, deadline: float | None,
                        group: object) -> asyncio.Future[ArticleSummary]:
        async def submit(prepared: Sequence[PreparedArticle], step: GenerationParams
                         ) -> list[asyncio.Future[Generated]]:
            jobs = [Job(p, key=step, cost=p.cost, deadline=deadline) for p in prepared]
            return await self._when_room(lambda: self.batcher.submit(jobs, group=group),
                                         deadline)

        def drop_chunks(_task: asyncio.Future) -> None:
            # However the article ends (done, failed, caller gone), none of its chunks stays
            # queued.
            for future in mapped:
                future.cancel()

        task = asyncio.ensure_future(
            self.mapreduce.finish(plan.article.id, plan.chunked, mapped, params, submit))
        task.add_done_callback(drop_chunks)
        return task

    async def _when_room(self, submit: Callable[[], T], deadline: float | None) -> T:
        """Call `submit` until the queue has room: accepted work (stream articles, the later
        passes over a long article's chunks) pushes back and waits, never fails."""
        while True:
            try:
                return submit()
            except QueueFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(QUEUE_FULL_RETRY_S)

    async def summarize(self, articles: Sequence[ArticleIn], options: RequestedOptions,
                        deadline: float | None = None
                        ) -> list[ArticleSummary | ArticleFailure]:
        """All results in request order. Any invalid article fails the call before any work
        starts. An article that fails in the model (after its batch was split to isolate it)
        comes back as an ArticleFailure beside its neighbours' results; when every article
        failed, the call fails with the first failure."""
        self.check_count(articles)
        self.check_ids(articles, required=False)
        params = self.resolve(options)
        plans = await self._plan_all(articles, params, options.long_input or self.long_input)
        accepted = []
        for plan in plans:
            if isinstance(plan, InvalidArgument):
                raise plan
            accepted.append(plan)
        needed = sum(plan.model_inputs for plan in accepted)
        if needed > self.settings.max_queue:
            raise InvalidArgument(
                "articles", f"split into chunks, the request's long articles make {needed} "
                f"model inputs, more than the server's queue holds ({self.settings.max_queue}); "
                "send fewer long articles per call, or use SummarizeStream")
        futures = self._enqueue(accepted, params, deadline, group=object())
        try:
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        finally:
            for future in futures:
                future.cancel()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == len(outcomes):
            if isinstance(errors[0], SummarizerError):
                raise errors[0]
            # Already logged with its traceback where it happened (the batcher).
            raise GenerationFailed("every article of the call failed") from errors[0]
        return [_failure(a.id, o) if isinstance(o, BaseException) else o
                for a, o in zip(articles, outcomes)]

    async def summarize_stream(
        self, requests: AsyncIterator[tuple[Sequence[ArticleIn], RequestedOptions]],
        deadline: float | None = None,
    ) -> AsyncIterator[ArticleSummary | ArticleFailure]:
        """Results as they finish. Article-level problems come back as ArticleFailure; a malformed
        request raises InvalidArgument and ends the stream.

        Backpressure both ways: every article holds one of `max_articles_per_request` slots from
        the moment it is read until its result has been handed on (written to the caller). A
        sender that outpaces the model, or a caller that stops reading, stops the reading of new
        requests, and HTTP/2 flow control pushes back on the sender."""
        outbox: asyncio.Queue[ArticleSummary | ArticleFailure | BaseException | None] = (
            asyncio.Queue())
        slots = asyncio.Semaphore(self.settings.max_articles_per_request)
        in_flight: set[str] = set()
        waiters: set[asyncio.Future] = set()
        group = object()  # one caller: one round-robin turn, however many requests it sends

        async def deliver(article: ArticleIn, future: asyncio.Future[ArticleSummary]) -> None:
            try:
                outbox.put_nowait(await future)
            except SummarizerError as error:
                outbox.put_nowait(_failure(article.id, error))
            except Exception as error:  # noqa: BLE001 - reported in-band, logged
                log.exception("article %r failed", article.id)
                outbox.put_nowait(_failure(article.id, error))
            finally:
                in_flight.discard(article.id)

        async def read() -> None:
            try:
                async for articles, options in requests:
                    self.check_count(articles)
                    self.check_ids(articles, required=True, taken=in_flight)
                    params = self.resolve(options)
                    for _ in articles:
                        await slots.acquire()
                    planned = await self._plan_all(articles, params,
                                                   options.long_input or self.long_input)
                    accepted = [p for p in planned if isinstance(p, _Planned)]
                    for article, plan in zip(articles, planned):
                        if isinstance(plan, InvalidArgument):
                            outbox.put_nowait(_failure(article.id, plan))
                    if not accepted:
                        continue
                    in_flight.update(p.article.id for p in accepted)
                    futures = await self._submit_waiting(accepted, params, deadline, group)
                    for plan, future in zip(accepted, futures):
                        task = asyncio.ensure_future(deliver(plan.article, future))
                        waiters.add(task)
                        task.add_done_callback(waiters.discard)
                if waiters:
                    await asyncio.gather(*list(waiters))
                outbox.put_nowait(None)
            except Exception as error:  # noqa: BLE001 - handed to the stream's consumer
                outbox.put_nowait(error)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await outbox.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
                slots.release()  # only once the caller has taken the result
        finally:
            reader.cancel()
            for task in list(waiters):
                task.cancel()

    async def _submit_waiting(self, plans: Sequence[_Planned], params: GenerationParams,
                              deadline: float | None, group: object
                              ) -> list[asyncio.Future[ArticleSummary]]:
        """Submit for a stream, article by article: a full queue means wait (bulk work pushes
        back, never fails)."""
        futures: list[asyncio.Future[ArticleSummary]] = []
        try:
            for plan in plans:
                futures += await self._when_room(
                    lambda plan=plan: self._enqueue([plan], params, deadline, group), deadline)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return futures
