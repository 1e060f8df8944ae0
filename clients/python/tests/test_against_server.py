"""The client against a real server (SUMMARIZER_TEST_SERVER, or one the fixture starts): typed
results, both clients' summarize_many, and the `summarizer` commands that need only the client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from summarizer_client import (ArticleSummary, AsyncSummarizerClient, SummarizerClient,
                               make_options)

pytestmark = pytest.mark.slow  # a real server, started as a process unless one is given
COMMAND = [sys.executable, "-m", "summarizer_client"]


def articles(n: int) -> list[tuple[str, str]]:
    return [(f"c{i}", f"The council met on day {i} and approved the new bridge budget.")
            for i in range(n)]


def test_summarize_returns_typed_results_in_order(server: str) -> None:
    with SummarizerClient(server) as client:
        results = client.summarize(articles(3), make_options(outputs="summary", num_beams=1))
        info = client.model_info()
    assert [r.id for r in results] == ["c0", "c1", "c2"]
    assert all(isinstance(r, ArticleSummary) and r.input_tokens > 0 for r in results)
    assert info.models


def test_both_clients_summarize_many_lose_nothing(server: str) -> None:
    options = make_options(outputs="headline", num_beams=1, headline_max_tokens=8)
    with SummarizerClient(server) as client:
        blocking = list(client.summarize_many(articles(20), options, max_in_flight=5,
                                              request_size=3))

    async def run() -> list[object]:
        async with AsyncSummarizerClient(server) as client:
            return [r async for r in client.summarize_many(articles(20), options,
                                                           max_in_flight=5, request_size=3)]

    for results in (blocking, asyncio.run(run())):
        assert sorted(r.id for r in results) == sorted(i for i, _ in articles(20))


def test_health_command(server: str) -> None:
    done = subprocess.run([*COMMAND, "health", "--server", server], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "SERVING", done.stderr


def test_bulk_summarize_command_resumes(server: str, tmp_path: Path) -> None:
    corpus, out = tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in articles(6)))
    command = [*COMMAND, "summarize", "--server", server, "--input", str(corpus), "--output",
               str(out), "--outputs", "headline", "--num-beams", "1"]
    first = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == \
        sorted(i for i, _ in articles(6))
    again = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "6 skipped" in again.stderr, again.stderr
    assert len(out.read_text().splitlines()) == 6


def test_soak_command(server: str) -> None:
    done = subprocess.run([*COMMAND, "soak", "--server", server, "--duration", "3",
                           "--clients", "2", "--max-articles", "2", "--max-chars", "200"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    assert json.loads(done.stdout)["results_verified"] > 0


def test_no_server_is_one_clear_line() -> None:
    done = subprocess.run([*COMMAND, "health", "--server", "127.0.0.1:1", "--timeout", "1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "summarizer: error:" in done.stderr
