"""The `summarizer` command as users run it: a real server process on a tiny checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import training_text

from .conftest import wait_until

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "service"]
ARTICLE = ("The city council voted on Tuesday to expand the bus network.\n"
           "Officials said the new routes would open in March.\nShare it\nRead more\n")


def env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SUMMARIZER_")}
    environ.update(HF_HUB_OFFLINE="1", **extra)
    return environ


class ServerProcess:
    def __init__(self, *args: str, **environ: str) -> None:
        self.process = subprocess.Popen(
            [*CLI, "serve", "--host", "127.0.0.1", "--port", "0", "--threads", "1", *args],
            stderr=subprocess.PIPE, text=True, env=env(**environ))
        self.log: list[str] = []
        self.port = self._wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _wait_for(self, pattern: str) -> int:
        for line in self.process.stderr:
            self.log.append(line)
            match = re.search(pattern, line)
            if match:
                return int(match.group(1))
        raise AssertionError("server exited early:\n" + "".join(self.log))

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout_s: float = 120) -> None:
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            wait_until(lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                       == health_pb2.HealthCheckResponse.SERVING, timeout_s, "SERVING",
                       interval_s=0.1, details=lambda: "".join(self.log))

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)


@pytest.fixture()
def bart_server(tiny_bart: Path) -> Iterator[ServerProcess]:
    server = ServerProcess("--model", str(tiny_bart), "--summary-max-tokens", "12",
                           "--headline-max-tokens", "6", "--num-beams", "2")
    try:
        server.wait_serving()
        yield server
    finally:
        server.process.kill()
        server.process.wait()


def test_summarize_command_prints_json_lines(bart_server: ServerProcess, tmp_path: Path) -> None:
    article = tmp_path / "council.txt"
    article.write_text(ARTICLE)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"id": "j1", "text": "Prices rose five percent."}) + "\n"
                     + json.dumps({"id": "j2", "text": "Storm hits the coast."}) + "\n")
    done = subprocess.run([*CLI, "summarize", "--server", bart_server.target, str(article),
                           str(jsonl)], capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["id"] for r in results] == ["council", "j1", "j2"]
    for result in results:
        assert result["summary"] and result["headline"]
        assert 0 < result["summary_tokens"] <= 12 and 0 < result["headline_tokens"] <= 6
        assert result["truncated"] is False
    long = tmp_path / "long.txt"
    long.write_text(" ".join(training_text(60, seed=5)))  # several of the model's windows
    for policy, chunked in (("truncate", False), ("chunk", True)):
        done = subprocess.run([*CLI, "summarize", "--server", bart_server.target,
                               "--long-input", policy, str(long)],
                              capture_output=True, text=True, timeout=120, env=env())
        assert done.returncode == 0, done.stderr
        result = json.loads(done.stdout)
        assert (result["chunks"] > 1, result["truncated"]) == (chunked, not chunked)


def test_summarize_command_reads_stdin_and_reports_errors(bart_server: ServerProcess) -> None:
    done = subprocess.run([*CLI, "summarize", "--server", bart_server.target, "-"],
                          input=ARTICLE, capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["id"] == "stdin"
    bad = subprocess.run([*CLI, "summarize", "--server", bart_server.target, "-"],
                         input="   \n", capture_output=True, text=True, timeout=120, env=env())
    assert bad.returncode == 1
    assert bad.stderr == "summarizer: error: stdin: is empty; nothing to summarise\n"


def test_an_article_over_the_size_limit_says_what_to_do(bart_server: ServerProcess,
                                                        tmp_path: Path) -> None:
    """A 200 KB article: the line names the server's limit, the way out (split it) and that
    --long-input truncate does not help."""
    big = tmp_path / "big.txt"
    big.write_text("word " * 40_960)  # 204,800 characters
    for policy in ([], ["--long-input", "truncate"]):
        done = subprocess.run([*CLI, "summarize", "--server", bart_server.target, *policy,
                               str(big)], capture_output=True, text=True, timeout=120, env=env())
        assert done.returncode == 1 and not done.stdout
        assert done.stderr == (
            f"summarizer: error: {big}: 204800 characters, over the server's limit of 100000 "
            "(its --max-article-chars); split the article into parts of at most 100000 "
            "characters, or raise the limit; --long-input truncate does not help: the limit "
            "applies before any truncation\n")


def test_summarize_reports_each_bad_input_and_summarises_the_rest(tiny_bart: Path,
                                                                  tmp_path: Path) -> None:
    """Files the client can judge (empty, not UTF-8, missing) are reported without being sent;
    articles the server refuses (too long to chunk, blank) are reported after the call that held
    them is sent again one article at a time; the good ones still get results."""
    server = ServerProcess("--model", str(tiny_bart), "--summary-max-tokens", "8",
                           "--headline-max-tokens", "4", "--num-beams", "1",
                           "--max-chunks-per-article", "1")
    try:
        server.wait_serving()
        (tmp_path / "good.txt").write_text(ARTICLE)
        (tmp_path / "empty.txt").write_text("")
        (tmp_path / "latin1.txt").write_bytes("Caf\u00e9 au lait.".encode("latin-1"))
        (tmp_path / "long.txt").write_text(" ".join(training_text(60, seed=5)))
        (tmp_path / "mixed.jsonl").write_text(
            json.dumps({"id": "j1", "text": "Storm hits the coast."}) + "\n"
            + json.dumps({"id": "j2", "text": "   "}) + "\n")
        names = ["good.txt", "empty.txt", "latin1.txt", "absent.txt", "long.txt", "mixed.jsonl"]
        done = subprocess.run([*CLI, "summarize", "--server", server.target,
                               *(str(tmp_path / n) for n in names)],
                              capture_output=True, text=True, timeout=120, env=env())
    finally:
        assert server.stop() == 0
    assert done.returncode == 1
    assert [json.loads(line)["id"] for line in done.stdout.splitlines()] == ["good", "j1"]
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    expected = {"empty.txt": "is empty", "latin1.txt": "is not UTF-8", "absent.txt": "no such file",
                "long.txt": "pass --long-input truncate", "mixed.jsonl (id 'j2')": "is empty"}
    assert len(lines) == len(expected), done.stderr
    for name, reason in expected.items():
        [line] = [line for line in lines if f"{tmp_path / name}" in line]
        assert line.startswith("summarizer: error: ") and reason in line, line
    assert "LONG_INPUT_POLICY" not in done.stderr and "options." not in done.stderr


def test_client_commands_find_the_server_at_summarizer_port(bart_server: ServerProcess,
                                                            tmp_path: Path) -> None:
    article = tmp_path / "council.txt"
    article.write_text(ARTICLE)
    port = str(bart_server.port)
    by_env = subprocess.run([*CLI, "summarize", str(article)], capture_output=True, text=True,
                            timeout=120, env=env(SUMMARIZER_PORT=port))
    assert by_env.returncode == 0, by_env.stderr
    assert json.loads(by_env.stdout)["id"] == "council"
    bare = subprocess.run([*CLI, "summarize", "--server", port, str(article)],
                          capture_output=True, text=True, timeout=120, env=env())
    assert bare.returncode == 0, bare.stderr
    health = subprocess.run([*CLI, "health"], capture_output=True, text=True, timeout=60,
                            env=env(SUMMARIZER_PORT=port))
    assert (health.returncode, health.stdout.strip()) == (0, "SERVING")


def test_concurrent_calls_give_the_same_results_as_sequential(bart_server: ServerProcess) -> None:
    """16 concurrent single-article calls (batched by the server) vs the same calls one by one:
    identical outputs. The timing ratio is printed, not asserted (see benchmarks/)."""
    texts = [f"Report number {n}: the council said prices rose {n} percent this year. " * 4
             for n in range(16)]
    options = pb.GenerationOptions(summary_min_tokens=12, summary_max_tokens=12,
                                   headline_min_tokens=6, headline_max_tokens=6, num_beams=2)
    with grpc.insecure_channel(bart_server.target) as channel:
        stub = pb_grpc.SummarizerStub(channel)

        def call(text: str) -> pb.SummarizeResponse:
            return stub.Summarize(pb.SummarizeRequest(articles=[pb.Article(id="x", text=text)],
                                                      options=options), timeout=120)

        started = time.perf_counter()
        sequential = [call(t) for t in texts]
        sequential_s = time.perf_counter() - started
        futures = [stub.Summarize.future(pb.SummarizeRequest(
            articles=[pb.Article(id="x", text=t)], options=options), timeout=120) for t in texts]
        started = time.perf_counter()
        concurrent = [f.result() for f in futures]
        concurrent_s = time.perf_counter() - started
    # Same outputs whatever the batching (greedy is not required: beams are deterministic too).
    assert [r.results[0].summary for r in concurrent] == [r.results[0].summary
                                                          for r in sequential]
    print(f"\n16 calls: sequential {sequential_s:.2f}s, concurrent {concurrent_s:.2f}s, "
          f"ratio {sequential_s / concurrent_s:.2f}x")


def metrics_port(server: ServerProcess) -> int:
    """The port a `--metrics-port -1` server chose, from its log."""
    for line in server.log:
        match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
        if match:
            return int(match.group(1))
    raise AssertionError("no metrics line in the log:\n" + "".join(server.log))


def scrape(port: int) -> dict[str, float]:
    """The endpoint's unlabelled samples, by name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


def test_sigterm_drains_in_flight_work_and_exits_zero(tiny_bart: Path) -> None:
    # torch: a batch of 4 takes about a second, so SIGTERM surely comes while batches are still
    # queued (ctranslate2 int8 may finish them all between a scrape and the signal).
    server = ServerProcess("--model", str(tiny_bart), "--grace-period-s", "300",
                           "--max-batch-size", "4", "--engine", "torch", "--batching", "static",
                           "--metrics-port", "-1")
    try:
        server.wait_serving()
        port = metrics_port(server)
        channel = grpc.insecure_channel(server.target)
        stub = pb_grpc.SummarizerStub(channel)
        options = pb.GenerationOptions(summary_min_tokens=60, summary_max_tokens=60,
                                       num_beams=4)
        big = pb.SummarizeRequest(articles=[pb.Article(id=str(n), text=ARTICLE * 3)
                                            for n in range(16)], options=options)
        future = stub.Summarize.future(big, timeout=300)
        def generating() -> bool:
            samples = scrape(port)
            return (samples.get("summarizer_batch_size_count", 0) >= 1
                    and samples.get("summarizer_queue_depth", 0) > 0) or future.done()

        wait_until(generating, 60, "a batch of the call done and the rest still queued")
        assert not future.done()
        server.process.send_signal(signal.SIGTERM)
        reply = future.result()
        assert len(reply.results) == 16
        assert server.process.wait(timeout=120) == 0
        channel.close()
    finally:
        server.process.kill()
    log = "".join(server.log)
    assert "draining" in log and "stopped" in log
    assert "Traceback" not in log


def test_missing_model_is_one_clear_line_and_nonzero_exit(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "serve", "--model", str(tmp_path / "absent"), "--port", "0"],
                          capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert lines and "does not exist" in lines[-1]
    assert "Traceback" not in done.stderr


def test_serve_without_a_model_says_how_to_give_one() -> None:
    done = subprocess.run([*CLI, "serve"], capture_output=True, text=True, timeout=60, env=env())
    assert done.returncode == 2
    assert "no model given" in done.stderr and "Traceback" not in done.stderr


def test_health_command_reports_serving(bart_server: ServerProcess) -> None:
    done = subprocess.run([*CLI, "health", "--server", bart_server.target],
                          capture_output=True, text=True, timeout=60, env=env())
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")
    down = subprocess.run([*CLI, "health", "--server", "127.0.0.1:1", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60, env=env())
    assert down.returncode == 1
    assert down.stderr.startswith("summarizer: error: no server at 127.0.0.1:1; start one with "
                                  "`summarizer serve")


def test_make_tiny_model_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    """Quietly (only the directory on stdout), and readable by everyone even under a strict
    umask: a container's non-root user must read it when it is mounted."""
    out = tmp_path / "m"
    done = subprocess.run([*CLI, "make-tiny-model", str(out), "--family", "t5"],
                          capture_output=True, text=True, timeout=120, env=env(),
                          preexec_fn=lambda: os.umask(0o077))
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == (f"{out}\n", "")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in [out, *out.rglob("*")]}
    assert modes == {name: 0o755 if (out / name).is_dir() else 0o644 for name in modes}


def test_fetch_offline_without_cache_is_one_clear_line(tmp_path: Path) -> None:
    done = subprocess.run([*CLI, "fetch", "distilbart-cnn-12-6", "--out", str(tmp_path / "m")],
                          capture_output=True, text=True, timeout=120,
                          env=env(HF_HOME=str(tmp_path / "hf")))
    assert done.returncode == 2
    assert done.stderr.startswith("summarizer: error: cannot fetch 'distilbart-cnn-12-6' "
                                  "(sshleifer/distilbart-cnn-12-6)")
    assert "Traceback" not in done.stderr


def test_sigterm_during_model_load_exits_promptly(tiny_bart: Path) -> None:
    server = ServerProcess("--model", str(tiny_bart))
    try:
        # "listening" is logged before torch is even imported: the model is surely still loading.
        server.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - started < 10
    finally:
        server.process.kill()
    server.reader.join(timeout=5)
    assert "shutdown requested while loading the model" in "".join(server.log)


def test_soak_command_verifies_every_response_of_a_real_model_server(
        bart_server: ServerProcess) -> None:
    done = subprocess.run(
        [*CLI, "soak", "--server", bart_server.target, "--duration", "4", "--clients", "6",
         "--max-articles", "4", "--max-chars", "600"],
        capture_output=True, text=True, timeout=120, env=env())
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["results_verified"] > 0 and report["calls"] > 0
    assert (report["lost"], report["mismatched"], report["unexpected_codes"]) == (0, 0, {})
    assert report["errors_by_code"]["OK"] > 0


def test_ctranslate2_engine_serves_from_env_settings(tiny_bart: Path, tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2")
    cache = tmp_path / "cache"
    server = ServerProcess("--model", str(tiny_bart), SUMMARIZER_ENGINE="ctranslate2",
                           SUMMARIZER_COMPUTE_TYPE="int8",
                           SUMMARIZER_CONVERT_CACHE_DIR=str(cache))
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SummarizerStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            reply = stub.Summarize(pb.SummarizeRequest(
                articles=[pb.Article(id="a", text=ARTICLE)],
                options=pb.GenerationOptions(summary_min_tokens=7, summary_max_tokens=7,
                                             headline_max_tokens=3, num_beams=2)), timeout=60)
    finally:
        assert server.stop() == 0
    assert info.engine == "ctranslate2" and info.models[0].dtype == "int8"
    [result] = reply.results
    assert result.id == "a" and result.summary_tokens == 7 and 1 <= result.headline_tokens <= 3
    assert [p.name.rsplit("-", 1)[1] for p in cache.iterdir()] == ["int8"]
