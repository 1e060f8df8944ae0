"""One SummarizeStream call: requests in, results out as they finish.

Three parts, each with its own state:
- the reader (`_read`, a task) takes requests as they come, checks them, plans their articles and
  queues them (waiting for room in the queue: a stream is slowed, never refused, for load);
- one delivery task per article awaits its result and puts it in `results`;
- the consumer (`results()`, the caller's iteration) hands results on and ends when the reader
  has finished and everything it started has been delivered, or raises the reader's error (a
  malformed request ends the stream).

Backpressure both ways: every article holds one of `slots` (max_articles_per_request) from the
moment it is read until its result has been taken by the caller. A sender that outpaces the
model, or a caller that stops reading, stops the reading of new requests, and HTTP/2 flow control
pushes back on the sender.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence

from ..domain import (ArticleFailure, ArticleSummary, GenerationParams, LongInput, failure_for,
                      RequestedOptions)
from ..errors import InvalidArgument, SummarizerError, Unavailable
from .calls import CallWork
from .planning import ArticleTrace, Plan, Planner
from .tracing import NO_TRACER, Tracer, span
from .validation import ArticleIn, Validator

log = logging.getLogger(__name__)

Result = ArticleSummary | ArticleFailure
Requests = AsyncIterator[tuple[Sequence[ArticleIn], RequestedOptions]]


class StreamCall:
    def __init__(self, requests: Requests, *, validator: Validator, planner: Planner,
                 resolve: Callable[[RequestedOptions], GenerationParams],
                 long_input: LongInput, work: CallWork, tracer: Tracer = NO_TRACER) -> None:
        self._requests = requests
        self._tracer = tracer
        self._validator = validator
        self._planner = planner
        self._resolve = resolve
        self._long_input = long_input
        self._work = work
        self._slots = asyncio.Semaphore(validator.max_articles_per_request)
        self._in_flight: set[str] = set()
        self._deliveries: set[asyncio.Task] = set()
        self._results: asyncio.Queue[Result] = asyncio.Queue()

    async def results(self) -> AsyncIterator[Result]:
        reader = asyncio.ensure_future(self._read())
        taken: asyncio.Future[Result] | None = None
        try:
            while True:
                taken = asyncio.ensure_future(self._results.get())
                await asyncio.wait({taken, reader}, return_when=asyncio.FIRST_COMPLETED)
                if not taken.done():
                    break  # the reader has finished: every result it started is in the queue
                result, taken = taken.result(), None
                yield result
                self._slots.release()  # only once the caller has taken the result
            while not self._results.empty():
                yield self._results.get_nowait()
                self._slots.release()
            reader.result()  # a malformed request's error ends the stream here
        finally:
            if taken is not None:
                taken.cancel()
            reader.cancel()
            self._work.close()

    async def _read(self) -> None:
        async for articles, options in self._requests:
            with span(self._tracer, "prepare", articles=len(articles),
                      priority=self._work.priority.name.lower()) as prepare:
                self._validator.check_count(articles)
                self._validator.check_ids(articles, required=True, taken=self._in_flight)
                params = self._resolve(options)
                await self._take_slots(len(articles))
                plans = await self._planner.plan_all(articles, params,
                                                     options.long_input or self._long_input)
                prepare.set(model_inputs=sum(p.model_inputs for p in plans
                                             if isinstance(p, Plan)))
            for article, plan in zip(articles, plans):
                if isinstance(plan, InvalidArgument):
                    self._results.put_nowait(failure_for(article.id, plan))
                else:
                    self._in_flight.add(article.id)
            for index, plan in enumerate(plans):
                if isinstance(plan, Plan):
                    trace = self._planner.trace(plan, index)
                    try:
                        first = await self._work.admit(
                            plan.first_jobs(params, self._work.deadline, trace))
                    except BaseException as error:
                        trace.article.fail(error)
                        trace.end()
                        raise
                    delivery = self._work.start(self._deliver(plan, first, params, trace))
                    self._deliveries.add(delivery)
                    delivery.add_done_callback(self._deliveries.discard)
        if self._deliveries:
            await asyncio.wait(set(self._deliveries))

    async def _take_slots(self, count: int) -> None:
        """One slot per article; when the stream has to wait for room (backpressure), the wait
        has a span of its own."""
        taken = 0
        while taken < count and not self._slots.locked():
            await self._slots.acquire()
            taken += 1
        if taken < count:
            with span(self._tracer, "backpressure", articles=count - taken):
                for _ in range(count - taken):
                    await self._slots.acquire()

    async def _deliver(self, plan: Plan, first: list[asyncio.Future],
                       params: GenerationParams, trace: ArticleTrace) -> None:
        article_id = plan.article.id
        try:
            result: Result = await self._planner.assemble(plan, first, params, self._work,
                                                          trace)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the stream is ending
            # Its queued work was cancelled from elsewhere (shutdown): the caller still hears.
            result = failure_for(article_id, Unavailable("server is shutting down"))
        except SummarizerError as error:
            result = failure_for(article_id, error)
        except Exception as error:  # noqa: BLE001 - reported in-band, logged
            log.exception("article %r failed", article_id)
            result = failure_for(article_id, error)
        finally:
            self._in_flight.discard(article_id)
        self._results.put_nowait(result)
