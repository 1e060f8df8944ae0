"""Real `summarizer serve` processes for tests: a fixture that starts them on the tiny BART and
reads their log and resident set; request helpers shared by the hostile-input tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb

from service.engines.tiny import training_text

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
SUMMARIZE = "/summarizer.v1.Summarizer/Summarize"
STREAM = "/summarizer.v1.Summarizer/SummarizeStream"
Serve = Callable[..., "ServerProcess"]


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

    def start(*extra: str, env: dict[str, str] | None = None,
              model: Path | None = None) -> ServerProcess:
        log_path = tmp_path / f"server-{len(started)}.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve", "--model", str(model or tiny_bart),
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
