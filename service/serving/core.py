"""The serving core: what the API layer calls. It wires the parts and runs the two call shapes.

- `validation.py` checks what a caller sent; `planning.py` tokenises, plans (whole or in chunks)
  and assembles results; `mapreduce.py` runs a long article's passes; `calls.py` holds one
  caller's work in the queue (and cancels it, in one place); `stream.py` runs a stream;
  `batcher.py` queues and runs batches; `generation.py` is what a batch runs.
- `summarize` (a unary call) and `summarize_stream`; `describe` is what GetModelInfo reports.
- `tracer` (service/serving/tracing.py): spans for checking and tokenising a request, each
  article and its passes; the engine batches and queue waits are traced by the `on_batch` hook.

Speaks only domain types (no protobuf): the gRPC servicer converts at the edge.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from ..config import Settings
from ..domain import (ArticleFailure, ArticleSummary, Generated, GenerationParams, Limits,
                      LongInput, PreparedArticle, Priority, RequestedOptions, failure_for,
                      resolve_options)
from ..engines.protocol import Engine, ModelDescription
from ..errors import GenerationFailed, InvalidArgument, SummarizerError
from .batcher import Batcher, BatchReport, StepReport
from .continuous import Advance
from .calls import CallWork
from .executor import RunBatch
from .generation import generate_batch
from .planning import ArticleTrace, Plan, Planner
from .stream import Requests, StreamCall
from .tracing import NO_TRACER, Tracer, span
from .validation import ArticleIn, Validator

__all__ = ["ArticleIn", "Scheduling", "ServiceDescription", "SummarizerCore"]


@dataclass(frozen=True)
class ServiceDescription:
    """What the service runs and allows: the GetModelInfo answer, in domain types."""

    engine: str
    models: list[ModelDescription]
    defaults: GenerationParams
    long_input: LongInput
    max_articles_per_request: int
    max_article_chars: int
    max_batch_size: int
    max_queue: int
    limits: Limits
    max_chunks_per_article: int
    max_chunk_depth: int
    scheduling: Scheduling


@dataclass(frozen=True)
class Scheduling:
    """The priority classes' settings (docs/priority.md)."""

    default_priority: Priority
    queue_limits: dict[Priority, int]
    starvation_bound: int
    interactive_headroom: int
    small_bulk_batch: int


class SummarizerCore:
    def __init__(self, engine: Engine, settings: Settings,
                 on_batch: Callable[[BatchReport], None] | None = None,
                 tracer: Tracer = NO_TRACER,
                 run_batches: Sequence[RunBatch[PreparedArticle, Generated]] | None = None,
                 advancers: Sequence[Advance] | None = None,
                 on_step: Callable[[StepReport], None] | None = None) -> None:
        """`engine` prepares inputs (and generates, unless `run_batches` is given: one blocking
        callable per engine instance elsewhere, e.g. a worker process each). With `advancers`
        (one blocking `advance(StepIn) -> StepOut` per engine instance: a decoding session's, or
        a worker's) the batcher batches continuously instead; `on_step` then hears every
        step."""
        self.engine = engine
        self.settings = settings
        self.tracer = tracer
        self.limits = Limits(max_num_beams=settings.max_num_beams,
                             max_new_tokens=min(settings.max_new_tokens,
                                                engine.max_new_tokens or settings.max_new_tokens))
        self.long_input = LongInput(settings.long_input)
        run: (RunBatch[PreparedArticle, Generated]
              | list[RunBatch[PreparedArticle, Generated]] | None) = None
        if not advancers:
            run = list(run_batches) if run_batches else generate_batch(engine)
        self.batcher: Batcher[PreparedArticle, Generated] = Batcher(
            run, advancers=advancers, on_step=on_step,
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue,
            max_batch_tokens=settings.max_batch_tokens, on_batch=on_batch,
            check_invariants=settings.check_invariants, class_limits=settings.queue_limits(),
            starvation_bound=settings.starvation_bound,
            small_bulk_batch=settings.small_bulk_batch,
            interactive_headroom=settings.interactive_headroom,
            bulk_joins_per_step=settings.bulk_joins_per_step,
            paused_share=settings.paused_share)
        self.validator = Validator(max_articles_per_request=settings.max_articles_per_request,
                                   max_article_chars=settings.max_article_chars)
        # An article's chunks are queued all at once, so the queue must hold them.
        self.planner = Planner(engine, self.validator,
                               max_chunks=min(settings.max_chunks_per_article,
                                              self.batcher.max_queue),
                               max_depth=settings.max_chunk_depth, tracer=tracer)

    async def start(self) -> None:
        await self.batcher.start()

    async def stop(self, timeout_s: float | None = None) -> None:
        await self.batcher.stop(timeout_s)
        self.planner.shutdown()

    def resolve(self, options: RequestedOptions) -> GenerationParams:
        return resolve_options(options, self.engine.defaults, self.limits)

    def describe(self) -> ServiceDescription:
        s = self.settings
        return ServiceDescription(
            engine=self.engine.name, models=list(self.engine.models),
            defaults=self.model_defaults(), long_input=self.long_input,
            max_articles_per_request=s.max_articles_per_request,
            max_article_chars=s.max_article_chars, max_batch_size=s.max_batch_size,
            max_queue=self.batcher.max_queue, limits=self.limits,
            max_chunks_per_article=self.planner.mapreduce.max_chunks,
            max_chunk_depth=s.max_chunk_depth,
            scheduling=Scheduling(
                default_priority=s.default_class, queue_limits=self.batcher.class_limits,
                starvation_bound=s.starvation_bound,
                interactive_headroom=s.interactive_headroom if self.batcher.continuous else 0,
                small_bulk_batch=self.batcher.policy.bulk_cap))

    def model_defaults(self) -> GenerationParams:
        """The engine's defaults, with the summary model's own length penalty and n-gram block
        where the engine leaves them to the model (what a request leaving them unset gets)."""
        defaults = self.engine.defaults
        if not self.engine.models:
            return defaults
        model = self.engine.models[0]
        return dataclasses.replace(
            defaults,
            length_penalty=(model.length_penalty if defaults.length_penalty is None
                            else defaults.length_penalty),
            no_repeat_ngram_size=(model.no_repeat_ngram_size
                                  if defaults.no_repeat_ngram_size is None
                                  else defaults.no_repeat_ngram_size))

    async def summarize(self, articles: Sequence[ArticleIn], options: RequestedOptions,
                        deadline: float | None = None, priority: Priority | None = None
                        ) -> list[ArticleSummary | ArticleFailure]:
        """All results in request order, the call's work queued in class `priority` (None: the
        server's default). Any invalid article fails the call before any work
        starts. An article that fails in the model (after its batch was split to isolate it)
        comes back as an ArticleFailure beside its neighbours' results; when every article
        failed, the call fails with the first failure."""
        priority = self.settings.default_class if priority is None else priority
        with span(self.tracer, "prepare", articles=len(articles),
                  priority=priority.name.lower()) as prepare:
            self.validator.check_count(articles)
            self.validator.check_ids(articles, required=False)
            params = self.resolve(options)
            planned = await self.planner.plan_all(articles, params,
                                                  options.long_input or self.long_input)
            plans: list[Plan] = []
            for plan in planned:
                if isinstance(plan, InvalidArgument):
                    raise plan
                plans.append(plan)
            prepare.set(model_inputs=sum(plan.model_inputs for plan in plans))
        needed = sum(plan.model_inputs for plan in plans)
        room = self.batcher.class_limits[priority]
        if needed > room:
            raise InvalidArgument(
                "articles", f"split into chunks, the request's long articles make {needed} "
                f"model inputs, more than the server's queue holds ({room}"
                f"{'' if room >= self.batcher.max_queue else ' of ' + priority.name}); send "
                "fewer long articles per call, or use SummarizeStream")
        call = CallWork(self.batcher, deadline, priority)
        traces: list[ArticleTrace] = []
        try:
            traces = [self.planner.trace(plan, index) for index, plan in enumerate(plans)]
            # The first round of every article at once, all or none: a full queue refuses the
            # call (RESOURCE_EXHAUSTED) rather than holding it.
            jobs = [plan.first_jobs(params, deadline, trace)
                    for plan, trace in zip(plans, traces)]
            futures = iter(call.submit_now([job for group in jobs for job in group]))
            assembled = [call.start(self.planner.assemble(
                plan, [next(futures) for _ in group], params, call, trace))
                for plan, group, trace in zip(plans, jobs, traces)]
            outcomes = await asyncio.gather(*assembled, return_exceptions=True)
        finally:
            call.close()
            for trace in traces:  # those never assembled (e.g. the queue was full)
                trace.end()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if len(errors) == len(outcomes):
            if isinstance(errors[0], SummarizerError):
                raise errors[0]
            # Already logged with its traceback where it happened (the batcher).
            raise GenerationFailed("every article of the call failed") from errors[0]
        return [failure_for(a.id, o) if isinstance(o, BaseException) else o
                for a, o in zip(articles, outcomes)]

    def summarize_stream(self, requests: Requests, deadline: float | None = None,
                         priority: Priority | None = None
                         ) -> AsyncIterator[ArticleSummary | ArticleFailure]:
        """Results as they finish, the stream's work queued in class `priority` (None: the
        server's default). Article-level problems come back as ArticleFailure; a malformed
        request raises InvalidArgument and ends the stream (see stream.py)."""
        priority = self.settings.default_class if priority is None else priority
        return StreamCall(requests, validator=self.validator, planner=self.planner,
                          resolve=self.resolve, long_input=self.long_input,
                          work=CallWork(self.batcher, deadline, priority),
                          tracer=self.tracer).results()
