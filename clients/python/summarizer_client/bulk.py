"""Bulk runs: a JSON Lines corpus in, a JSON Lines file of results out, resumable.

`summarizer summarize --input corpus.jsonl --output results.jsonl` streams the corpus through
`SummarizeStream` (bounded in flight), writes each result as it arrives (flushed, so an
interrupted run loses nothing it was told), shows progress with rate and ETA on a terminal, and
on the next run skips every id that already has a result. Articles that failed are written as
`{"id": ..., "error": {"code": ..., "message": ...}}` and tried again by the next run.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from .errors import ClientError, code_name
from .results import ArticleFailure, ArticleSummary

PROGRESS_EVERY_S = 0.25


def read_jsonl_articles(path: Path, skip: frozenset[str] | set[str] = frozenset()
                        ) -> Iterator[tuple[str, str]]:
    """(id, text) for every record of `path` whose id is not in `skip`."""
    with path.open(encoding="utf-8") as handle:
        yield from parse_jsonl_articles(handle, path.name, str(path), skip)


def parse_jsonl_articles(lines: Iterable[str], name: str, where: str,
                         skip: frozenset[str] | set[str] = frozenset()
                         ) -> Iterator[tuple[str, str]]:
    """(id, text) for every JSON Lines record. A record without an id gets `<name>:<line>`; a
    duplicate id is an error (results are matched by id); errors say `<where>:<line>`."""
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            text = record["text"]
            article_id = str(record.get("id") or f"{name}:{number}")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ClientError(f"{where}:{number}: expected a JSON object with a 'text' "
                                  "field") from None
        if not isinstance(text, str):
            raise ClientError(f"{where}:{number}: 'text' must be a string")
        if article_id in seen:
            raise ClientError(f"{where}:{number}: duplicate id {article_id!r}")
        seen.add(article_id)
        if article_id not in skip:
            yield article_id, text


def count_records(path: Path) -> int:
    with path.open(encoding="utf-8") as handle:
        return sum(1 for line in handle if line.strip())


def finished_ids(output: Path) -> set[str]:
    """Ids that already have a result in `output`. A last line cut off by an interruption is
    removed, so appending goes on from a clean line."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[:data.rfind(b"\n") + 1]
        output.write_bytes(data)
    done: set[str] = set()
    for line in data.decode("utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "error" not in record and "id" in record:
            done.add(str(record["id"]))
    return done


def record_of(result: ArticleSummary | ArticleFailure) -> dict[str, object]:
    if isinstance(result, ArticleFailure):
        return {"id": result.id, "error": {"code": code_name(result.code),
                                           "message": result.message}}
    return asdict(result)


class Progress:
    """`done/total pct rate ETA` on one rewritten line, only when `stream` is a terminal."""

    def __init__(self, total: int, done: int = 0, stream: IO[str] | None = None, *,
                 enabled: bool | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total = total
        self.done = done
        self.failed = 0
        self._start_done = done
        self._clock = clock
        self._started = clock()
        self._shown = 0.0

    def advance(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        now = self._clock()
        if self.enabled and (now - self._shown >= PROGRESS_EVERY_S or self.done == self.total):
            self._shown = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float) -> str:
        elapsed = max(now - self._started, 1e-9)
        rate = (self.done - self._start_done) / elapsed
        left = max(self.total - self.done, 0)
        eta = _duration(left / rate) if rate > 0 else "?"
        percent = 100.0 * self.done / self.total if self.total else 100.0
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.done}/{self.total} ({percent:.1f}%{failed}) {rate:.2f} articles/s, "
                f"ETA {eta}")

    def close(self) -> None:
        """Show the final figures and end the line."""
        if self.enabled:
            self.stream.write("\r" + self.line(self._clock()) + "\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class BulkOutcome:
    total: int
    skipped: int
    succeeded: int = 0
    failed: int = 0


def write_results(results: Iterable[ArticleSummary | ArticleFailure], out: IO[str],
                  progress: Progress, outcome: BulkOutcome) -> None:
    """Write each result as one flushed line as it arrives."""
    for result in results:
        out.write(json.dumps(record_of(result), ensure_ascii=False) + "\n")
        out.flush()
        failed = isinstance(result, ArticleFailure)
        outcome.failed += failed
        outcome.succeeded += not failed
        progress.advance(failed)
