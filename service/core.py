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

from .batcher import Batcher, BatchReport, Job
from .config import Settings
from .domain import (ArticleFailure, ArticleSummary, Generated, GenerationParams, Limits,
                     PreparedArticle, RequestedOptions, resolve_options)
from .engine import Engine
from .errors import (GenerationFailed, InvalidArgument, OutOfMemory, QueueFull, SummarizerError,
                     is_out_of_memory, status_for)
from .text import clean_article, has_nul, model_text

log = logging.getLogger(__name__)

MAX_ID_CHARS = 256
QUEUE_FULL_RETRY_S = 0.05


@dataclass(frozen=True)
class ArticleIn:
    id: str
    text: str


def _failure(article_id: str, error: BaseException) -> ArticleFailure:
    code, message = status_for(error)
    return ArticleFailure(article_id, code.value[0], message)


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
            max_batch_tokens=settings.max_batch_tokens, on_batch=on_batch)
        # Tokenisers are not safe to call from several threads at once: one thread does it all.
        self._prep = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summarizer-prep")

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
        """The article's text as the model will read it, or InvalidArgument saying what is wrong."""
        def bad(problem: str) -> InvalidArgument:
            return InvalidArgument("articles.text", problem, article_index=index,
                                   article_id=article.id)

        limit = self.settings.max_article_chars
        if len(article.text) > limit:
            raise bad(f"{len(article.text)} characters, over the limit of {limit}")
        if has_nul(article.text):
            raise bad("contains NUL characters; send the article as UTF-8 text (UTF-16 or "
                      "binary data was sent?)")
        cleaned = model_text(clean_article(article.text))
        if not cleaned:
            raise bad("is empty (nothing left after removing whitespace and page furniture)")
        return cleaned

    # ----- work -----
    async def _prepare(self, texts: list[str], params: GenerationParams) -> list[PreparedArticle]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._prep, self.engine.prepare, texts, params)

    def _enqueue(self, articles: Sequence[ArticleIn], prepared: list[PreparedArticle],
                 params: GenerationParams, deadline: float | None
                 ) -> list[asyncio.Future[ArticleSummary]]:
        futures = self.batcher.submit(
            [Job(p, key=params, cost=p.cost, deadline=deadline) for p in prepared])
        return [self._assemble(article, p, f) for article, p, f in zip(articles, prepared, futures)]

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

    async def _clean_all(self, articles: Sequence[ArticleIn]) -> list[str | InvalidArgument]:
        """Each article's model text, or what is wrong with it. Runs in the prep thread: cleaning
        a request of long articles takes long enough to stall the event loop."""
        def work() -> list[str | InvalidArgument]:
            out: list[str | InvalidArgument] = []
            for index, article in enumerate(articles):
                try:
                    out.append(self.clean(index, article))
                except InvalidArgument as error:
                    out.append(error)
            return out

        return await asyncio.get_running_loop().run_in_executor(self._prep, work)

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
        texts = await self._clean_all(articles)
        for text in texts:
            if isinstance(text, InvalidArgument):
                raise text
        futures = self._enqueue(articles, await self._prepare(texts, params), params, deadline)
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
                    cleaned = await self._clean_all(articles)
                    accepted = [a for a, t in zip(articles, cleaned) if isinstance(t, str)]
                    texts = [t for t in cleaned if isinstance(t, str)]
                    for article, text in zip(articles, cleaned):
                        if isinstance(text, InvalidArgument):
                            outbox.put_nowait(_failure(article.id, text))
                    if not accepted:
                        continue
                    in_flight.update(a.id for a in accepted)
                    futures = await self._submit_waiting(accepted, texts, params, deadline)
                    for article, future in zip(accepted, futures):
                        task = asyncio.ensure_future(deliver(article, future))
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

    async def _submit_waiting(self, articles: Sequence[ArticleIn], texts: list[str],
                              params: GenerationParams, deadline: float | None
                              ) -> list[asyncio.Future[ArticleSummary]]:
        """Submit for a stream: a full queue means wait (bulk work pushes back, never fails)."""
        prepared = await self._prepare(texts, params)
        while True:
            try:
                return self._enqueue(articles, prepared, params, deadline)
            except QueueFull:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(QUEUE_FULL_RETRY_S)
