"""Heavy and hostile input costs its sender, not everyone else (issue 24).

Real server processes on a tiny random-weight BART; protocol-level misbehaviour (half-sent
messages, streams reset mid-call, a malformed `grpc-timeout`) comes from a raw HTTP/2 client
(tests/rawh2.py, the `h2` library)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from service.config import Settings
from service.engines.tiny import training_text
from service.engines.torch_engine import TorchEngine

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def article(chars: int, seed: int = 0) -> str:
    text = " ".join(training_text(sentences=max(10, chars // 40), seed=seed))
    while len(text) < chars:
        text += " " + text
    return text[:chars]


@dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def rss_mib(self) -> float:
        """Resident set of the server and its worker processes."""
        pids = [self.process.pid]
        for task in Path(f"/proc/{self.process.pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
        total = 0
        for pid in pids:
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
        return total / 1024

    def wait_log(self, pattern: str, timeout_s: float = 10) -> str:
        """The first log line matching `pattern`, waiting for it to be written."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for line in self.log().splitlines():
                if re.search(pattern, line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no log line matching {pattern!r}:\n{self.log()[-3000:]}")


@pytest.fixture
def serve(tiny_bart: Path, tmp_path: Path) -> Iterator:
    """Start `summarizer serve` processes: serve(*extra_args, env=...) -> ServerProcess."""
    started: list[ServerProcess] = []

    def start(*extra: str, env: dict[str, str] | None = None) -> ServerProcess:
        log_path = tmp_path / f"server-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--model", str(tiny_bart),
                 "--host", "127.0.0.1", "--port", "0", *extra],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO,
                env={**os.environ, **(env or {})})
        server = ServerProcess(process, 0, log_path)
        started.append(server)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            text = server.log()
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            if match and re.search(r"\bSERVING:", text):
                server.port = int(match.group(1))
                return server
            time.sleep(0.1)
        raise AssertionError(f"server did not start:\n{server.log()[-3000:]}")

    yield start
    for server in started:
        server.process.terminate()
        try:
            server.process.wait(30)
        except subprocess.TimeoutExpired:
            server.process.kill()


def truncate_options(**more: int) -> pb.GenerationOptions:
    return pb.GenerationOptions(long_input=pb.LONG_INPUT_POLICY_TRUNCATE, num_beams=1,
                                summary_max_tokens=8, headline_max_tokens=4, **more)


def request_of(texts: list[str], options: pb.GenerationOptions | None = None
               ) -> pb.SummarizeRequest:
    return pb.SummarizeRequest(articles=[pb.Article(id=str(i), text=t)
                                         for i, t in enumerate(texts)],
                               options=options or truncate_options())


# ----- 1. TRUNCATE reads what the window holds, with today's result -----

@pytest.mark.parametrize("family", ["tiny_bart", "tiny_t5", "tiny_pegasus"])
def test_truncate_tokenises_only_what_the_window_holds_with_the_same_ids(
        family: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(family)
    engine = TorchEngine(Settings(model=str(path), device="cpu")).load(weights=False)
    tokenizer = engine.summary.tokenizer
    seen: list[int] = []
    encode_batch = tokenizer.encode_batch

    def recording(texts: list[str]) -> list[tuple[list[int], list[int]]]:
        seen.extend(len(t) for t in texts)
        return encode_batch(texts)

    tokenizer.encode_batch = recording  # type: ignore[method-assign]
    words = article(100_000, seed=3)
    texts = [words, words.replace(" ", ""), article(400, seed=4), "x" * 100_000,
             "\u4e2d\u6587" * 30_000]
    params = engine.defaults
    window = params.max_input_tokens
    prepared = engine.prepare(texts, params)
    assert max(seen) < 100_000 // 4, "a 100,000-character article was tokenised whole"
    # Today's result: the whole text tokenised, then cut to the window keeping the special
    # tokens at both ends.
    for text, got in zip(texts, prepared):
        ids, mask = encode_batch([engine.summary.summary_prefix + text])[0]
        truncated = len(ids) > window
        if truncated:
            lead = next(i for i, m in enumerate(mask) if not m)
            trail = next(i for i, m in enumerate(reversed(mask)) if not m)
            ids = ids[:window - trail] + ids[len(ids) - trail:]
            assert lead < window
        assert got.summary_ids == tuple(ids)
        assert got.truncated == truncated
        assert got.input_tokens == len(ids)


def test_truncated_results_over_grpc_match_the_whole_text_tokenised(serve) -> None:
    """Same summaries, token counts and truncated flags as with the text cut to the window by
    the caller (what today's server reads of it), over a real server."""
    server = serve("--workers", "0", "--batching", "static")
    texts = [article(100_000, seed) for seed in range(3)] + [article(300, 9)]
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        long_reply = stub.Summarize(request_of(texts), timeout=120)
        info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        window = info.default_options.max_input_tokens
        # The window's worth of text, cut by the caller well past what the window reads.
        cut_reply = stub.Summarize(request_of([t[:window * 16] for t in texts]), timeout=120)
    for long, cut in zip(long_reply.results, cut_reply.results):
        assert long.summary == cut.summary and long.headline == cut.headline
        assert long.input_tokens == cut.input_tokens
        assert long.truncated == cut.truncated
    assert [r.truncated for r in long_reply.results] == [True, True, True, False]


# ----- 2. Preparation is fair and proportional -----

def test_a_one_article_call_answers_within_a_second_during_a_10mb_truncate_request(
        serve) -> None:
    server = serve("--workers", "1")
    texts = [article(100_000, seed % 7) for seed in range(100)]
    big = request_of(texts)
    assert big.ByteSize() > 9.5 * MIB
    small = request_of([article(2000, 1)])
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)
        stub.Summarize(small, timeout=60)  # warm
        started = time.perf_counter()
        pending = stub.Summarize.future(big, timeout=300)
        time.sleep(1.0)  # the big call is in the server (sent; being prepared or generated)
        began = time.perf_counter()
        stub.Summarize(small, timeout=60)
        small_s = time.perf_counter() - began
        big_done = pending.result()
        big_s = time.perf_counter() - started
        # What the same articles cost cut to the window beforehand.
        began = time.perf_counter()
        stub.Summarize(request_of([t[:4000] for t in texts]), timeout=300)
        cut_s = time.perf_counter() - began
    assert len(big_done.results) == 100
    assert small_s < 1.0, f"the one-article call waited {small_s:.1f}s (big call {big_s:.1f}s)"
    assert big_s < 2 * cut_s + 2.0, f"10 MB call {big_s:.1f}s vs {cut_s:.1f}s cut beforehand"
