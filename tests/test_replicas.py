"""Many replicas behind one target: three real server processes, one `ipv4:` target URI listing
them, and the client's round_robin balancing (summarizer_client.balancing).

- A bulk run (`summarizer summarize --input --output`) spreads its articles over all three,
  counted by each server's own metrics.
- One replica killed (SIGKILL) in the middle of a run: the articles it held are sent again to
  the other two, and the run (or the one rerun that resumes it) ends with every article answered
  exactly once.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cli import CLI, ServerProcess, env

pytestmark = pytest.mark.slow

ARTICLES = 240


class Replica(ServerProcess):
    """A server with its metrics on a port of its own (`--metrics-port -1`)."""

    def __init__(self, model: Path) -> None:
        super().__init__("--model", str(model), "--engine", "torch", "--metrics-port", "-1",
                         "--summary-max-tokens", "12", "--headline-max-tokens", "6",
                         "--num-beams", "2")
        self.metrics_port = self._metrics_port()

    def _metrics_port(self) -> int:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for line in list(self.log):
                match = re.search(r"metrics on http://[\d.]+:(\d+)/metrics", line)
                if match:
                    return int(match.group(1))
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError("no metrics port in the log:\n" + "".join(self.log))

    def metric(self, name: str, labels: str = "") -> float:
        """One sample of the server's /metrics (0 when it has none yet)."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        pattern = re.escape(name) + (r"\{" + re.escape(labels) + r"\}" if labels else "")
        match = re.search(rf"^{pattern} ([0-9.e+]+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def answered(self) -> int:
        return int(self.metric("summarizer_articles_total", 'outcome="ok"'))


@pytest.fixture()
def replicas(tiny_bart: Path) -> Iterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for _ in range(3):
            started.append(Replica(tiny_bart))
        for replica in started:
            replica.wait_serving()
        yield started
    finally:
        for replica in started:
            replica.process.kill()
            replica.process.wait()


def target_of(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(replica.target for replica in replicas)


def write_corpus(path: Path) -> list[str]:
    ids = [f"story-{n:03d}" for n in range(ARTICLES)]
    with path.open("w", encoding="utf-8") as corpus:
        for n, article_id in enumerate(ids):
            text = (f"The council met on day {n} to discuss the bus network. Officials said the "
                    f"new routes would open in month {n % 12 + 1} and serve the hospital.")
            corpus.write(json.dumps({"id": article_id, "text": text}) + "\n")
    return ids


def bulk_command(target: str, corpus: Path, output: Path) -> list[str]:
    return [*CLI, "summarize", "--server", target, "--input", str(corpus), "--output",
            str(output), "--batch", "2", "--max-in-flight", "12", "--streams", "3",
            "--timeout", "120"]


def results_of(output: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]


def test_a_bulk_run_spreads_over_every_replica_of_the_target(replicas: list[Replica],
                                                             tmp_path: Path) -> None:
    ids = write_corpus(tmp_path / "corpus.jsonl")
    output = tmp_path / "results.jsonl"
    done = subprocess.run(bulk_command(target_of(replicas), tmp_path / "corpus.jsonl", output),
                          capture_output=True, text=True, timeout=600, env=env(), check=False)
    assert done.returncode == 0, done.stderr
    results = results_of(output)
    assert sorted(str(r["id"]) for r in results) == ids
    assert all("error" not in r for r in results)
    per_replica = [replica.answered() for replica in replicas]
    assert sum(per_replica) == ARTICLES, per_replica
    assert all(count > 0 for count in per_replica), per_replica


def test_a_replica_killed_mid_run_loses_no_article_and_answers_none_twice(
        replicas: list[Replica], tmp_path: Path) -> None:
    ids = write_corpus(tmp_path / "corpus.jsonl")
    output = tmp_path / "results.jsonl"
    command = bulk_command(target_of(replicas), tmp_path / "corpus.jsonl", output)
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, env=env())
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(run.stderr or []), daemon=True)
    reader.start()
    victim = replicas[0]
    # Kill it while it works for the run: it has answered some articles and a stream of the
    # run is open on it (its articles are in flight there).
    deadline = time.monotonic() + 300
    while not (victim.answered() >= 4
               and victim.metric("summarizer_requests_in_flight",
                                 'method="SummarizeStream"') > 0):
        assert run.poll() is None, "the run ended before the replica could be killed"
        assert time.monotonic() < deadline, "the replica never got work from the run"
        time.sleep(0.05)
    answered_before_kill = victim.answered()
    victim.process.send_signal(signal.SIGKILL)
    victim.process.wait(timeout=30)
    assert run.poll() is None, "the run ended before the replica was killed"
    status = run.wait(timeout=600)
    reader.join(10)
    if status != 0:  # allowed once: the rerun resumes from the output file
        rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env(),
                               check=False)
        assert rerun.returncode == 0, "".join(stderr) + rerun.stderr
    results = results_of(output)
    answered = [str(r["id"]) for r in results if "error" not in r]
    assert sorted(answered) == ids, "".join(stderr)  # every article, each exactly once
    survivors = [replica.answered() for replica in replicas[1:]]
    assert all(count > 0 for count in survivors), survivors
    # The victim's share: no more than it had answered when killed plus what was in flight on
    # it; the other two answered the rest, the resent articles included.
    assert sum(survivors) + answered_before_kill >= ARTICLES
    assert sum(survivors) < ARTICLES
