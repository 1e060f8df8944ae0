"""Engines for the fault-injection tests of the engine workers (tests/test_workers.py).

Each is named by `--worker-engine tests.worker_engines:NAME` and built from the settings in each
worker process (and in the server, which tokenises with it). They are `FakeEngine`s: the summary
is "S:" + the article's first 12 characters, so a result can be traced back to its article.
Poison words in an article's text make a batch holding it misbehave the way a broken model would.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from service.config import Settings
from service.domain import Generated, GenerationParams, Outputs, PreparedArticle

from service.engines.protocol import Admit, StepIn, StepOut

from .fakes import FakeEngine, FakeSession, FakeSteppingEngine

WINDOW = 4096
"""Wide enough that no test article is chunked: one article, one generation."""
BATCH_S = 0.3
STEP_S = 0.02
log = logging.getLogger(__name__)
LOAD_DELAY_FILE_ENV = "SUMMARIZER_TEST_LOAD_DELAY_FILE"
"""A file path: while the file exists, building an engine first sleeps the seconds it holds."""


def _texts(batch: Sequence[PreparedArticle]) -> list[str]:
    return ["".join(map(chr, a.summary_ids)) for a in batch]


class _Poisoned(FakeEngine):
    """Misbehaves (`poisoned`) when a batch holds `poison`; `batch_delay_s` per batch."""

    poison = ""

    def __init__(self, batch_delay_s: float = 0.0) -> None:
        super().__init__(window=WINDOW)
        self.batch_delay_s = batch_delay_s

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        poisoned = bool(self.poison) and any(self.poison in t for t in _texts(batch))
        # In the server's log (a worker's stderr is the server's): the tests wait for it.
        log.info("generating a batch of %d%s", len(batch), " (poisoned)" if poisoned else "")
        if poisoned:
            self.poisoned()
        return super().generate(params, batch)

    def poisoned(self) -> None:
        raise NotImplementedError


class _Segfaults(_Poisoned):
    poison = "SEGFAULT"

    def poisoned(self) -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV, the process dies


class _Hangs(_Poisoned):
    poison = "HANG"

    def poisoned(self) -> None:
        threading.Event().wait()  # forever: only the watchdog ends it


class _CrashesAlways(FakeEngine):
    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        os._exit(3)


def _load_delay() -> None:
    path = os.environ.get(LOAD_DELAY_FILE_ENV, "")
    try:
        with open(path, encoding="utf-8") as marker:
            seconds = float(marker.read())
    except (OSError, ValueError):
        return
    time.sleep(seconds)


def slow(settings: Settings) -> FakeEngine:
    """Every batch takes BATCH_S: a kill lands in the middle of one."""
    return _Poisoned(batch_delay_s=BATCH_S)


def fast(settings: Settings) -> FakeEngine:
    return _Poisoned()


def segfault(settings: Settings) -> FakeEngine:
    """Dies by SIGSEGV on a batch holding "SEGFAULT"."""
    return _Segfaults(batch_delay_s=0.05)


def hang(settings: Settings) -> FakeEngine:
    """Never returns from a batch holding "HANG"."""
    return _Hangs()


def crash(settings: Settings) -> FakeEngine:
    """Loads fine, exits (code 3) on every batch."""
    return _CrashesAlways(window=WINDOW)


def slow_restart(settings: Settings) -> FakeEngine:
    """Loads slowly while the LOAD_DELAY_FILE_ENV file exists (the test makes it after the first
    start); batches take BATCH_S."""
    _load_delay()
    return _Poisoned(batch_delay_s=BATCH_S)


class _LoggedSession(FakeSession):
    """Says in the log when it admits articles (the kill test waits for it)."""

    def advance(self, step: StepIn) -> StepOut:
        if step.admit:
            log.info("session admitting %d articles (tickets %s)", len(step.admit),
                     ",".join(str(a.ticket) for a in step.admit))
        return super().advance(step)


class _SteppingLogged(FakeSteppingEngine):
    def open_session(self) -> FakeSession:
        session = _LoggedSession(self)
        self.sessions.append(session)
        return session


class _SegfaultingSession(_LoggedSession):
    def advance(self, step: StepIn) -> StepOut:
        out = super().advance(step)
        if any("SEGFAULT" in self.engine.texts[t] for t in self.active):
            ctypes.string_at(0)  # SIGSEGV while it decodes: the worker and its session die
        return out


class _SteppingSegfaults(FakeSteppingEngine):
    def open_session(self) -> FakeSession:
        session = _SegfaultingSession(self)
        self.sessions.append(session)
        return session


def stepping_segfault(settings: Settings) -> FakeEngine:
    """Batches continuously; dies by SIGSEGV in any step where an article holding "SEGFAULT"
    is decoding."""
    engine = _SteppingSegfaults(window=WINDOW)
    engine.step_delay_s = STEP_S
    return engine


def stepping(settings: Settings) -> FakeEngine:
    """Batches continuously (`--batching continuous`); each step takes STEP_S, so an article of
    the default options (20 summary tokens) decodes for about 0.4 s: a kill lands mid-decode."""
    engine = _SteppingLogged(window=WINDOW)
    engine.step_delay_s = STEP_S
    return engine


def stepping_pool_setup(model_dir: Path, tickets: Sequence[int], **options: int
                        ) -> tuple[Settings, dict[int, Admit]]:
    """For a test that drives a real `WorkerPool` of one `stepping` worker by hand: its settings,
    and an `Admit` per ticket (summary only, `options` on the engine's defaults), prepared by the
    same engine the worker builds."""
    (model_dir / "config.json").write_text("{}")
    settings = Settings(model=str(model_dir), worker_engine="tests.worker_engines:stepping",
                        workers=1, batching="continuous", threads=1)
    engine = stepping(settings)
    params = dataclasses.replace(engine.defaults, outputs=Outputs.SUMMARY, **options)
    return settings, {t: Admit(t, params, engine.prepare([f"article {t}"], params)[0])
                      for t in tickets}
