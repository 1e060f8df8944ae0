"""Bulk runs: `summarizer summarize --input ... --output ...` against a real server: every id
once, failures per id without stopping, resume without redoing finished ids, progress."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from service import cli
from summarizer_client.bulk import Progress, finished_ids, read_jsonl_articles
from summarizer_client.errors import ClientError

from .conftest import server_in_thread
from .fakes import FakeEngine
from .test_grpc import BASE


def write_corpus(path: Path, n: int, poison: set[int] = frozenset()) -> list[str]:
    ids = [f"story-{i:03d}" for i in range(n)]
    with path.open("w", encoding="utf-8") as handle:
        for i, article_id in enumerate(ids):
            text = f"Story {i:03d} " + ("poison " if i in poison else "") + "body text."
            handle.write(json.dumps({"id": article_id, "text": text}) + "\n")
    return ids


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_bulk_run_writes_every_id_once_and_reports_failures_per_id(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus, output = tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    ids = write_corpus(corpus, 120, poison={17, 90})
    engine = FakeEngine()
    engine.fail_on = "poison"
    with server_in_thread(BASE, lambda s: engine) as port:
        code = cli.main(["summarize", "--server", f"127.0.0.1:{port}", "--input", str(corpus),
                         "--output", str(output), "--max-in-flight", "16", "--batch", "5"])
    assert code == 1, "failures make the exit code 1, but the run went on"
    got = records(output)
    assert sorted(r["id"] for r in got) == ids
    failed = {r["id"]: r["error"] for r in got if "error" in r}
    assert set(failed) == {"story-017", "story-090"}
    assert failed["story-017"]["code"] == "INTERNAL"
    ok = {r["id"]: r for r in got if "error" not in r}
    assert ok["story-005"]["summary"] == "S:Story 005 bo"
    err = capsys.readouterr().err
    assert "118 summarised, 2 failed, 0 skipped" in err
    assert "\r" not in err, "no progress bar when stderr is not a terminal"


def test_an_interrupted_run_resumes_without_redoing_finished_ids(tmp_path: Path) -> None:
    corpus, output = tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    ids = write_corpus(corpus, 40)
    # A run that was killed: 10 results, one failure, and half a line.
    with output.open("w", encoding="utf-8") as handle:
        for article_id in ids[:10]:
            handle.write(json.dumps({"id": article_id, "summary": "old", "headline": "old"})
                         + "\n")
        handle.write(json.dumps({"id": ids[10], "error": {"code": "UNAVAILABLE",
                                                          "message": "server going down"}})
                     + "\n")
        handle.write('{"id": "story-011", "summ')
    engine = FakeEngine()
    with server_in_thread(BASE, lambda s: engine) as port:
        code = cli.main(["summarize", "--server", f"127.0.0.1:{port}", "--input", str(corpus),
                         "--output", str(output)])
    assert code == 0
    generated = sorted(t for batch in engine.batches for t in batch)
    assert len(generated) == 30, "only the 30 ids without a result were sent"
    assert not any(t.startswith(f"Story {i:03d}") for t in generated for i in range(10))
    got = records(output)  # every line parses: the cut-off line was removed
    latest = {}
    for record in got:
        latest[record["id"]] = record
    assert sorted(latest) == ids
    assert all("error" not in r for r in latest.values())
    assert latest[ids[0]]["summary"] == "old" and latest[ids[10]]["summary"].startswith("S:")


def test_finished_ids_skips_failures_and_repairs_a_cut_off_line(tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    output.write_text('{"id": "a", "summary": "s"}\n{"id": "b", "error": {"code": "INTERNAL"}}\n'
                      '{"id": "c", "summ')
    assert finished_ids(output) == {"a"}
    assert output.read_text().endswith('"INTERNAL"}}\n')
    assert finished_ids(tmp_path / "absent.jsonl") == set()


def test_corpus_errors_name_the_line(tmp_path: Path) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": "x", "text": "fine"}\n{"id": "x", "text": "again"}\n')
    with pytest.raises(ClientError, match=r"bad.jsonl:2: duplicate id 'x'"):
        list(read_jsonl_articles(corpus))
    corpus.write_text('{"id": "x", "text": "fine"}\n\n{"title": "no text"}\n')
    with pytest.raises(ClientError, match=r"bad.jsonl:3: expected a JSON object"):
        list(read_jsonl_articles(corpus))
    corpus.write_text('{"text": "no id"}\n')
    assert list(read_jsonl_articles(corpus)) == [("bad.jsonl:1", "no id")]


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_shows_rate_and_eta_on_a_terminal_only() -> None:
    now = [0.0]
    terminal = FakeTerminal()
    progress = Progress(total=100, done=20, stream=terminal, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 0.5
        progress.advance()
    progress.advance(failed=True)
    progress.close()
    lines = terminal.getvalue().split("\r")
    assert lines[-2] == "30/100 (30.0%) 2.00 articles/s, ETA 0m35s"  # 10 in 5 s, 70 to go
    assert lines[-1].startswith("31/100 (31.0%, 1 failed)"), "close shows the final figures"
    assert terminal.getvalue().endswith("\n")
    quiet = io.StringIO()
    silent = Progress(total=10, stream=quiet)
    silent.advance()
    silent.close()
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_ctrl_c_says_what_was_written_and_that_the_command_resumes(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) during a bulk run, as a real process: it says how many results are in
    the file and that the same command resumes; then the same command finishes the rest."""
    import os
    import signal
    import subprocess
    import sys
    import time

    corpus, output = tmp_path / "corpus.jsonl", tmp_path / "out.jsonl"
    ids = write_corpus(corpus, 300)
    engine = FakeEngine()
    engine.batch_delay_s = 0.05  # a model's time: the run lasts long enough to interrupt
    with server_in_thread(BASE, lambda s: engine) as port:
        command = [sys.executable, "-m", "service", "summarize", "--server",
                   f"127.0.0.1:{port}", "--input", str(corpus), "--output", str(output),
                   "--max-in-flight", "2", "--batch", "1"]
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SUMMARIZER_")}
        process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environ)
        deadline = time.monotonic() + 60
        while not (output.exists() and output.read_text().count("\n") >= 3):
            assert process.poll() is None and time.monotonic() < deadline, "no results came"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
        written = len(records(output))
        assert process.returncode == 130, stderr
        assert 3 <= written < len(ids)
        assert stderr.endswith(
            f"summarizer: interrupted: {written} results written to {output} ({written} of "
            f"{len(ids)} articles have one); run the same command again to resume\n"), stderr
        assert "Traceback" not in stderr and "Task was destroyed" not in stderr, stderr
        engine.batch_delay_s = 0.0
        again = subprocess.run(command, stderr=subprocess.PIPE, text=True, env=environ,
                               timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {written} of {len(ids)} articles already have results" in again.stderr
    assert sorted(r["id"] for r in records(output)) == ids  # each once
