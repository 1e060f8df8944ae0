"""Prometheus metrics: what a scraper sees on `--metrics-port`.

One `Metrics` object per server, on its own registry (so several servers in one process, as in
the tests, never share counters). The servicer records calls and results, the batcher's `on_batch`
hook records batches (with continuous batching: each article from admission to done), the
`on_step` hook records continuous batching's decoding steps, and gauges read the queue (and the
engines' last steps) at scrape time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engines.protocol import StepOut
from ..serving.batcher import BatcherStats, BatchReport, DropReason, StepReport
from ..domain import ArticleFailure, ArticleSummary, Priority
from ..engines.protocol import ModelDescription
from ..errors import code_name
from ..workers.pool import WorkerPool

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)
CHUNK_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
RATIO_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _BatcherStatsCollector(Collector):
    """Counters the batcher keeps itself, read at scrape time."""

    def __init__(self) -> None:
        self.stats: BatcherStats | None = None
        self.depth_of: Callable[[Priority], int] | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.stats
        if stats is None:
            return
        for name, text, counts in (
                ("summarizer_priority_articles_admitted", "Articles queued, by class.",
                 stats.admitted_by_priority),
                ("summarizer_priority_articles_refused", "Articles refused at admission because "
                 "the queue (or their class's share of it) was full: RESOURCE_EXHAUSTED, by "
                 "class.", stats.refused_by_priority),
                ("summarizer_priority_articles_displaced", "Queued articles pushed out by more "
                 "urgent work (their callers get RESOURCE_EXHAUSTED), by class.",
                 stats.displaced_by_priority),
                ("summarizer_priority_paused_steps", "Continuous batching: decoding steps an "
                 "article sat out so more urgent work decoded alone, by the article's class.",
                 stats.paused_steps_by_priority)):
            family = CounterMetricFamily(name, text, labels=["priority"])
            for priority in Priority:
                family.add_metric([priority.name.lower()], counts[priority])
            yield family
        if self.depth_of is not None:
            depth = GaugeMetricFamily("summarizer_priority_queue_depth",
                                      "Articles waiting for the model, by class.",
                                      labels=["priority"])
            for priority in Priority:
                depth.add_metric([priority.name.lower()], self.depth_of(priority))
            yield depth
        dropped = CounterMetricFamily(
            "summarizer_articles_dropped",
            "Articles that left the queue (or a retry) without a result from the model, each "
            "counted once, by reason.", labels=["reason"])
        for reason in DropReason:
            dropped.add_metric([reason.value], stats.dropped_by_reason[reason])
        yield dropped
        yield CounterMetricFamily("summarizer_failed_engine_calls",
                                  "Engine calls that raised (each try of a split batch counts).",
                                  value=stats.failed_batches)
        yield CounterMetricFamily("summarizer_isolated_failures",
                                  "Articles that failed on their own after batch splitting.",
                                  value=stats.failed_jobs)


class _WorkersCollector(Collector):
    """The worker processes' state and restarts, read at scrape time."""

    def __init__(self) -> None:
        self.pool: WorkerPool | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        pool = self.pool
        if pool is None:
            return
        yield GaugeMetricFamily("summarizer_workers_ready", "Engine worker processes ready.",
                                value=pool.ready)
        restarts = CounterMetricFamily(
            "summarizer_worker_restarts", "Engine workers replaced, by cause: exit (it exited), "
            "signal (killed, e.g. a segfault or the OOM killer), watchdog (a batch ran too "
            "long).", labels=["cause"])
        for cause in ("exit", "signal", "watchdog"):
            restarts.add_metric([cause], pool.stats.restarts[cause])
        yield restarts
        yield CounterMetricFamily("summarizer_batches_retried_after_crash",
                                  "Batches sent again after their worker died.",
                                  value=pool.stats.retried_after_crash)


class _StepsCollector(Collector):
    """Continuous batching: what the engines hold now (summed over engine instances), read at
    scrape time from each one's last step."""

    def __init__(self) -> None:
        self.last_steps: Callable[[], list[StepOut]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.last_steps is None:
            return
        steps = self.last_steps()
        for name, text, value in (
                ("summarizer_active_articles", "Continuous batching: articles decoding.",
                 sum(s.active for s in steps)),
                ("summarizer_waiting_articles", "Continuous batching: articles admitted to the "
                 "engine, waiting for cache room.", sum(s.waiting for s in steps)),
                ("summarizer_active_sequences", "Continuous batching: sequences (beams "
                 "included) in the last decoding step.", sum(s.rows for s in steps)),
                ("summarizer_cache_used_bytes", "Continuous batching: decoder cache memory held "
                 "by the active articles.", sum(s.used_bytes for s in steps)),
                ("summarizer_cache_budget_bytes", "Continuous batching: decoder cache budget "
                 "(--kv-cache-mb).", sum(s.budget_bytes for s in steps))):
            yield GaugeMetricFamily(name, text, value=value)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("summarizer_requests", "Calls answered, by method and status "
                                "code.", ["method", "code"], registry=r)
        self.request_seconds = Histogram(
            "summarizer_request_duration_seconds", "End-to-end call latency.", ["method"],
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.in_flight = Gauge("summarizer_requests_in_flight", "Calls in progress.", ["method"],
                               registry=r)
        self.queue_wait_seconds = Histogram(
            "summarizer_queue_wait_seconds", "Time an article queued before its batch started "
            "(continuous batching: before it was admitted to the engine).",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("summarizer_queue_depth", "Articles waiting for the model.",
                                 registry=r)
        # Per class (docs/priority.md): new series beside the totals above, which keep their
        # names and labels.
        self.class_requests = Counter(
            "summarizer_priority_requests", "Summarize/SummarizeStream calls answered, by class "
            "and status code.", ["method", "priority", "code"], registry=r)
        self.class_request_seconds = Histogram(
            "summarizer_priority_request_duration_seconds", "End-to-end call latency, by class.",
            ["method", "priority"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.class_queue_wait_seconds = Histogram(
            "summarizer_priority_queue_wait_seconds", "Time an article queued before its batch "
            "started (continuous batching: before it was admitted to the engine), by class.",
            ["priority"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("summarizer_batch_size", "Articles per engine call.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.padding_ratio = Histogram(
            "summarizer_batch_padding_ratio", "Share of a batch's padded input that is padding.",
            buckets=RATIO_BUCKETS, registry=r)
        self.batch_seconds = Histogram("summarizer_batch_duration_seconds",
                                       "Time of one engine call.", buckets=LATENCY_BUCKETS_S,
                                       registry=r)
        self.articles = Counter("summarizer_articles", "Articles answered, by outcome (ok or "
                                "the status code of an in-band error).", ["outcome"],
                                registry=r)
        self.input_tokens = Counter("summarizer_input_tokens", "Input tokens the model read.",
                                    registry=r)
        self.output_tokens = Counter("summarizer_output_tokens", "Tokens generated, by output.",
                                     ["output"], registry=r)
        self.truncated = Counter("summarizer_articles_truncated",
                                 "Articles cut to the model's input window.", registry=r)
        self.chunks = Histogram("summarizer_article_chunks",
                                "Pieces the model read per article (1: it fit the window; more: "
                                "summarised in chunks).", buckets=CHUNK_BUCKETS, registry=r)
        self.load_seconds = Gauge("summarizer_model_load_seconds", "Time to load the model.",
                                  registry=r)
        self.warmup_seconds = Gauge("summarizer_model_warmup_seconds",
                                    "Time of the warm-up generation.", registry=r)
        self.info = Info("summarizer_model", "The loaded engine and models.", registry=r)
        self._batcher = _BatcherStatsCollector()
        r.register(self._batcher)
        self._workers = _WorkersCollector()
        r.register(self._workers)
        self.decode_steps = Counter("summarizer_decode_steps", "Continuous batching: decoding "
                                    "steps run.", registry=r)
        self.step_seconds = Histogram(
            "summarizer_decode_step_duration_seconds", "Continuous batching: time of one "
            "engine step (admitting, removing and decoding one token for every active "
            "sequence).", buckets=STEP_BUCKETS_S, registry=r)
        self._steps = _StepsCollector()
        r.register(self._steps)
        self._http: WSGIServer | None = None

    # ----- wiring -----
    def attach(self, queue_depth: Callable[[], int], stats: BatcherStats,
               depth_of: Callable[[Priority], int] | None = None) -> None:
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self._batcher.stats = stats
        self._batcher.depth_of = depth_of

    def attach_steps(self, last_steps: Callable[[], list[StepOut]]) -> None:
        """Continuous batching: the gauges read each engine instance's last step."""
        self._steps.last_steps = last_steps

    def attach_workers(self, pool: WorkerPool) -> None:
        self._workers.pool = pool

    def model_loaded(self, engine: str, models: Iterable[ModelDescription], load_s: float,
                     warmup_s: float) -> None:
        self.load_seconds.set(load_s)
        self.warmup_seconds.set(warmup_s)
        labels = {"engine": engine}
        for m in models:
            prefix = m.role.replace("+", "_")
            labels.update({f"{prefix}_model": m.model_id, f"{prefix}_family": m.family,
                           f"{prefix}_dtype": m.dtype, f"{prefix}_device": m.device})
        self.info.info(labels)

    # ----- observations -----
    def _observe_waits(self, report: BatchReport) -> None:
        for index, waited in enumerate(report.waited_s):
            self.queue_wait_seconds.observe(waited)
            if index < len(report.priorities):
                self.class_queue_wait_seconds.labels(
                    Priority(report.priorities[index]).name.lower()).observe(waited)

    def observe_batch(self, report: BatchReport) -> None:
        if report.decoding:
            # Continuous batching: one article, from admission to done. Its queue wait is
            # truthful; batch sizes and durations have no meaning here (see observe_step).
            self._observe_waits(report)
            return
        self.batch_seconds.observe(report.duration_s)
        if report.failed:
            return  # counted by the batcher's own stats; its articles are retried or reported
        self.batch_size.observe(len(report.costs))
        self.padding_ratio.observe(report.padding_ratio)
        self._observe_waits(report)

    def observe_step(self, report: StepReport) -> None:
        if report.rows:
            self.decode_steps.inc()
            self.step_seconds.observe(report.duration_s)

    def observe_result(self, result: ArticleSummary | ArticleFailure) -> None:
        if isinstance(result, ArticleFailure):
            self.articles.labels(code_name(result.code)).inc()
            return
        self.articles.labels("ok").inc()
        self.input_tokens.inc(result.input_tokens)
        self.output_tokens.labels("summary").inc(result.summary_tokens)
        self.output_tokens.labels("headline").inc(result.headline_tokens)
        if result.truncated:
            self.truncated.inc()
        self.chunks.observe(result.chunks)

    def observe_call(self, method: str, code: str, seconds: float, priority: str = "") -> None:
        """`priority`: the call's class, once resolved ("" for GetModelInfo, or a call refused
        before its class was known: counted in the totals only)."""
        self.requests.labels(method, code).inc()
        self.request_seconds.labels(method).observe(seconds)
        if priority:
            self.class_requests.labels(method, priority, code).inc()
            self.class_request_seconds.labels(method, priority).observe(seconds)

    # ----- HTTP endpoint -----
    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on a background thread; returns the bound port."""
        http, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = http
        bound = http.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
