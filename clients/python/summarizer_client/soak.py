"""Load and soak test: many concurrent clients with mixed work for a fixed time, every response
checked against its request.

`summarizer soak --server HOST:PORT --duration 60 --clients 16` drives a running server (loopback
or a test deployment; never point it at production) with unary calls of 1 to many articles,
streams, calls with deadlines too short to meet, and calls cancelled midway. It verifies that
every call answered OK has exactly one result per article, in order, with the ids sent, and that
every stream returns each id once; that the same article text always comes back with the same
input token count (a result given to the wrong article would show up here); and it counts errors
by status code. It exits non-zero when anything was lost or mismatched, when an error code came
back that the run did not provoke (a DEADLINE_EXCEEDED or CANCELLED counts as provoked only on a
call the soak itself gave a too-short deadline or cancelled), or when a call took longer than
`--max-call-s`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import random
import statistics
import time
from dataclasses import dataclass, field

import grpc

from .client import MAX_MESSAGE_BYTES, auth_metadata, open_aio_channel
from .errors import code_name
from .gen.summarizer.v1 import summarizer_pb2 as pb
from .gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

WORDS = ("court", "minister", "river", "market", "election", "storm", "council", "players",
         "hospital", "bridge", "report", "village", "company", "police", "season", "budget")
EXPECTED_CODES = frozenset({"OK", "RESOURCE_EXHAUSTED", "INTERNAL_POISON",
                            "DEADLINE_EXCEEDED_PROVOKED", "CANCELLED_PROVOKED"})
"""Codes a soak may see: success; overload (RESOURCE_EXHAUSTED: the server refusing work it cannot
queue, by design); INTERNAL on articles that carry the injected poison; and DEADLINE_EXCEEDED or
CANCELLED on exactly the calls the soak gave a too-short deadline or cancelled. A plain
DEADLINE_EXCEEDED or CANCELLED is a call the server never answered in time: a failure."""
SHORT_DEADLINE_S = 0.001


@dataclass
class SoakConfig:
    duration_s: float = 30.0
    clients: int = 16
    max_articles: int = 16
    """Most articles in one unary call (the server's per-request limit must allow it)."""
    pool: int = 200
    """Distinct article texts; each is sent many times, so results can be compared."""
    min_chars: int = 40
    max_chars: int = 3000
    stream_share: float = 0.2
    short_deadline_share: float = 0.05
    cancel_share: float = 0.05
    cancel_within_s: float = 0.05
    """A cancelled call is cancelled at a random moment this soon after it starts."""
    poison_cancel_share: float = 0.0
    """Share of the calls carrying a poison article that are cancelled (instead of
    `cancel_share`): callers that go away while the server isolates their failure."""
    timeout_s: float = 120.0
    max_call_s: float = 0.0
    """Fail the run if any call takes longer than this (0: no bound). A stalled call shows up here
    long before its `timeout_s`."""
    seed: int = 1
    poison: str = ""
    """Text put into a few articles that the server is known to fail on (fault injection);
    those articles may fail with INTERNAL, nothing else may."""
    token: str = ""
    same_text: bool = False
    """Also require the same summary and headline every time an article is sent. Deterministic
    engines give that; a real model may differ in the last digits between batch compositions."""


@dataclass
class SoakReport:
    calls: int = 0
    articles_sent: int = 0
    results_verified: int = 0
    in_band_errors: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    lost: int = 0
    mismatched: int = 0
    problems: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    """Every call that was not cut short on purpose, however it ended."""
    slow_calls: int = 0
    max_call_s: float = 0.0
    elapsed_s: float = 0.0

    def problem(self, text: str) -> None:
        self.mismatched += 1
        if len(self.problems) < 20:
            self.problems.append(text)

    @property
    def unexpected_codes(self) -> dict[str, int]:
        return {c: n for c, n in self.codes.items() if c not in EXPECTED_CODES}

    def timed(self, seconds: float) -> None:
        """Record one call's duration, checking it against the bound."""
        self.latencies_s.append(seconds)
        if self.max_call_s and seconds > self.max_call_s:
            self.slow_calls += 1
            if len(self.problems) < 20:
                self.problems.append(f"a call took {seconds:.2f}s, over the bound of "
                                     f"{self.max_call_s:.2f}s")

    @property
    def ok(self) -> bool:
        return (self.lost == 0 and self.mismatched == 0 and not self.unexpected_codes
                and self.slow_calls == 0)

    def summary(self) -> dict[str, object]:
        latencies = sorted(self.latencies_s)

        def pct(q: float) -> float:
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3) \
                if latencies else 0.0

        return {
            "calls": self.calls, "articles_sent": self.articles_sent,
            "results_verified": self.results_verified, "in_band_errors": self.in_band_errors,
            "errors_by_code": dict(sorted(self.codes.items())), "lost": self.lost,
            "mismatched": self.mismatched, "unexpected_codes": self.unexpected_codes,
            "slow_calls": self.slow_calls, "max_call_s": self.max_call_s,
            "latency_p50_s": pct(0.50), "latency_p99_s": pct(0.99),
            "latency_max_s": round(latencies[-1], 3) if latencies else 0.0,
            "latency_mean_s": round(statistics.fmean(latencies), 3) if latencies else 0.0,
            "articles_per_s": round(self.results_verified / self.elapsed_s, 2)
            if self.elapsed_s else 0.0,
            "elapsed_s": round(self.elapsed_s, 1), "problems": self.problems,
        }


def make_pool(config: SoakConfig) -> list[str]:
    """Distinct article texts of mixed lengths; a few carry the poison marker."""
    rng = random.Random(config.seed)
    texts = []
    for n in range(config.pool):
        length = rng.randint(config.min_chars, config.max_chars)
        words = [f"Article {n}."]
        while sum(len(w) + 1 for w in words) < length:
            words.append(rng.choice(WORDS))
        if config.poison and n % 50 == 7:
            words.insert(1, config.poison)
        texts.append(" ".join(words) + ".")
    return texts


class _Checker:
    """Verifies results and remembers what each article text gave before."""

    def __init__(self, report: SoakReport, texts: list[str], config: SoakConfig) -> None:
        self.report = report
        self.texts = texts
        self.poison = config.poison
        self.same_text = config.same_text
        self.seen: dict[int, tuple[object, ...]] = {}

    def result(self, article: int, result: pb.ArticleResult, *,
               short_deadline: bool = False) -> None:
        """Check one article's result; `short_deadline`: its call was given a too-short
        deadline on purpose (a fast server can still answer it, with the articles it could not
        reach in time failed in-band: provoked too)."""
        report = self.report
        if result.HasField("error"):
            report.in_band_errors += 1
            name = code_name(result.error.code)
            if name == "INTERNAL" and self.poison and self.poison in self.texts[article]:
                name = "INTERNAL_POISON"
            elif name == "DEADLINE_EXCEEDED" and short_deadline:
                name = "DEADLINE_EXCEEDED_PROVOKED"
            report.codes[name] += 1
            return
        if self.poison and self.poison in self.texts[article]:
            report.problem(f"article {article} holds the poison but came back with a result")
            return
        fingerprint: tuple[object, ...] = (result.input_tokens, result.truncated)
        if self.same_text:
            fingerprint += (result.summary, result.headline)
        before = self.seen.setdefault(article, fingerprint)
        if before != fingerprint:
            report.problem(f"article {article}: result {fingerprint} now, {before} before: "
                           "a result for another article?")
            return
        if result.input_tokens == 0:
            report.problem(f"article {article}: result reads 0 input tokens")
            return
        report.results_verified += 1


async def _unary(stub: pb_grpc.SummarizerStub, rng: random.Random, config: SoakConfig,
                 checker: _Checker, serial: int) -> None:
    report = checker.report
    count = rng.randint(1, config.max_articles)
    picks = [rng.randrange(config.pool) for _ in range(count)]
    ids = [f"{serial}-{i}-{p}" for i, p in enumerate(picks)]
    request = pb.SummarizeRequest(articles=[pb.Article(id=i, text=checker.texts[p])
                                            for i, p in zip(ids, picks)])
    short_deadline = rng.random() < config.short_deadline_share
    timeout = SHORT_DEADLINE_S if short_deadline else config.timeout_s
    poisoned_call = bool(config.poison) and any(config.poison in checker.texts[p] for p in picks)
    cancelled = rng.random() < (config.poison_cancel_share if poisoned_call
                                and config.poison_cancel_share else config.cancel_share)
    report.calls += 1
    report.articles_sent += count
    started = time.monotonic()
    call = stub.Summarize(request, timeout=timeout, metadata=auth_metadata(config.token))
    if cancelled:
        await asyncio.sleep(rng.random() * config.cancel_within_s)
        call.cancel()
    try:
        reply = await call
    except asyncio.CancelledError:
        report.codes["CANCELLED_PROVOKED" if cancelled else "CANCELLED"] += 1
        return
    except grpc.aio.AioRpcError as error:
        name = error.code().name
        if name == "DEADLINE_EXCEEDED" and short_deadline or name == "CANCELLED" and cancelled:
            report.codes[name + "_PROVOKED"] += 1
            return
        report.timed(time.monotonic() - started)
        poisoned = config.poison and all(config.poison in checker.texts[p] for p in picks)
        report.codes["INTERNAL_POISON" if name == "INTERNAL" and poisoned else name] += 1
        return
    if not short_deadline and not cancelled:
        report.timed(time.monotonic() - started)
    report.codes["OK"] += 1
    got = [r.id for r in reply.results]
    if got != ids:
        missing = len(set(ids) - set(got))
        report.lost += missing
        report.problem(f"call {serial}: sent ids {ids[:3]}..., got {got[:3]}... "
                       f"({len(got)} results for {len(ids)} articles)")
        return
    for pick, result in zip(picks, reply.results):
        checker.result(pick, result, short_deadline=short_deadline)


async def _stream(stub: pb_grpc.SummarizerStub, rng: random.Random, config: SoakConfig,
                  checker: _Checker, serial: int) -> None:
    report = checker.report
    requests = []
    expected: dict[str, int] = {}
    for r in range(rng.randint(1, 4)):
        picks = [rng.randrange(config.pool) for _ in range(rng.randint(1, config.max_articles))]
        articles = []
        for i, p in enumerate(picks):
            article_id = f"s{serial}-{r}-{i}-{p}"
            expected[article_id] = p
            articles.append(pb.Article(id=article_id, text=checker.texts[p]))
        requests.append(pb.SummarizeRequest(articles=articles))
    report.calls += 1
    report.articles_sent += len(expected)
    started = time.monotonic()
    received: set[str] = set()
    try:
        async for result in stub.SummarizeStream(iter(requests), timeout=config.timeout_s,
                                                 metadata=auth_metadata(config.token)):
            if result.id not in expected:
                report.problem(f"stream {serial}: unknown id {result.id!r}")
                continue
            if result.id in received:
                report.problem(f"stream {serial}: id {result.id!r} twice")
                continue
            received.add(result.id)
            checker.result(expected[result.id], result)
    except grpc.aio.AioRpcError as error:
        report.timed(time.monotonic() - started)
        report.codes[error.code().name] += 1
        return
    report.timed(time.monotonic() - started)
    report.codes["OK"] += 1
    if len(received) != len(expected):
        report.lost += len(expected) - len(received)
        report.problem(f"stream {serial}: {len(expected) - len(received)} ids never came back")


async def run_soak(target: str, config: SoakConfig, *, tls: bool = False, ca_cert: str = "",
                   client_cert: str = "", client_key: str = "") -> SoakReport:
    """Drive `target` for `config.duration_s` seconds and return the verified figures."""
    report = SoakReport(max_call_s=config.max_call_s)
    checker = _Checker(report, make_pool(config), config)
    channel = open_aio_channel(target, tls=tls, ca_cert=ca_cert, client_cert=client_cert,
                               client_key=client_key,
                               options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
    stub = pb_grpc.SummarizerStub(channel)
    end = time.monotonic() + config.duration_s
    serials = iter(range(1 << 62))

    async def client(number: int) -> None:
        rng = random.Random(config.seed * 1000 + number)
        while time.monotonic() < end:
            work = _stream if rng.random() < config.stream_share else _unary
            await work(stub, rng, config, checker, next(serials))

    started = time.monotonic()
    try:
        await asyncio.gather(*(client(n) for n in range(config.clients)))
    finally:
        await channel.close()
    report.elapsed_s = time.monotonic() - started
    return report


def main(target: str, config: SoakConfig, *, tls: bool = False, ca_cert: str = "",
         client_cert: str = "", client_key: str = "") -> int:
    report = asyncio.run(run_soak(target, config, tls=tls, ca_cert=ca_cert,
                                  client_cert=client_cert, client_key=client_key))
    print(json.dumps({"target": target, "config": dataclasses.asdict(config) | {"token": ""},
                      **report.summary()}, indent=2))
    return 0 if report.ok else 1
