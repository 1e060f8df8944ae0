"""Engines for the priority tests that run in engine worker processes (`--worker-engine
tests.priority_engines:NAME`): what a session is told must cross the worker's pipe."""

from __future__ import annotations

import collections
import dataclasses

from service.config import Settings
from service.engines.protocol import StepIn, StepOut

from .fakes import FakeEngine, FakeSession, FakeSteppingEngine

STEP_S = 0.01


class _PausingSession(FakeSession):
    """A FakeSession that obeys `StepIn.pause` (paused articles keep their state and sit the
    step out) and writes into each summary how many steps its article sat out: "|paused=N"."""

    def __init__(self, engine: FakeSteppingEngine) -> None:
        super().__init__(engine)
        self.paused: collections.Counter[int] = collections.Counter()

    def advance(self, step: StepIn) -> StepOut:
        held = {t: self.active.pop(t) for t in step.pause if t in self.active}
        self.paused.update(list(held))
        out = super().advance(dataclasses.replace(step, pause=()))
        self.active.update(held)
        done = tuple((t, dataclasses.replace(g, summary=f"{g.summary}|paused={self.paused[t]}"))
                     for t, g in out.done)
        return dataclasses.replace(out, done=done, active=len(self.active),
                                   rows=out.rows + len(held))


class _Pausing(FakeSteppingEngine):
    def open_session(self) -> FakeSession:
        session = _PausingSession(self)
        self.sessions.append(session)
        return session


def pausing(settings: Settings) -> FakeEngine:
    """Batches continuously, each step taking STEP_S, obeying and reporting paused steps."""
    engine = _Pausing(window=4096)
    engine.step_delay_s = STEP_S
    return engine
