"""The fake stepping engine (tests/fakes.py) keeps the engine contract the serving tests rely on:
admission most urgent class first, then arrival; paused tickets sit steps out."""

from __future__ import annotations

import dataclasses

from service.domain import Outputs
from service.engines.protocol import Admit, StepIn

from .fakes import FakeSteppingEngine, fake_cost, fake_steps


def admits(engine: FakeSteppingEngine, classes: dict[int, int], max_tokens: int = 3
           ) -> list[Admit]:
    params = dataclasses.replace(engine.defaults, summary_max_tokens=max_tokens,
                                 outputs=Outputs.SUMMARY, num_beams=2)
    return [Admit(ticket, params, engine.prepare([f"article {ticket}"], params)[0],
                  priority=priority) for ticket, priority in classes.items()]


def test_waiting_articles_are_admitted_most_urgent_class_first_then_in_order() -> None:
    engine = FakeSteppingEngine()
    arrivals = admits(engine, {1: 2, 2: 2, 3: 1, 4: 0, 5: 0})
    engine.budget_bytes = fake_cost(arrivals[0].params, arrivals[0].article)  # one at a time
    session = engine.open_session()
    session.advance(StepIn(admit=tuple(arrivals)))
    while session.active or session.waiting:
        session.advance(StepIn())
    started = list(dict.fromkeys(t for step in engine.steps for t in step))
    assert started == [4, 5, 3, 1, 2]


def test_a_paused_ticket_sits_the_step_out_and_resumes() -> None:
    engine = FakeSteppingEngine()
    arrivals = admits(engine, {1: 2, 2: 0}, max_tokens=3)
    session = engine.open_session()
    out = session.advance(StepIn(admit=tuple(arrivals)))
    assert (out.rows, out.paused_rows) == (4, 0)
    out = session.advance(StepIn(pause=(1,)))
    assert (out.rows, out.paused_rows, out.active) == (2, 2, 2)
    out = session.advance(StepIn(pause=(1,)))
    assert [t for t, _ in out.done] == [2] and out.paused_rows == 2
    out = session.advance(StepIn(pause=(1,)))  # all paused: no step
    assert (out.rows, out.paused_rows, out.active) == (0, 2, 1)
    while out.active:
        out = session.advance(StepIn())
    assert engine.steps == [(2, 1), (2,), (2,), (1,), (1,)]  # 2 is admitted first
    assert engine.paused == [(), (1,), (1,), (), ()]
    assert fake_steps(arrivals[0].params) == 3  # ticket 1 stepped 3 times: once, then twice


def test_a_paused_waiting_article_is_not_admitted() -> None:
    engine = FakeSteppingEngine()
    arrivals = admits(engine, {1: 1, 2: 1})
    session = engine.open_session()
    out = session.advance(StepIn(admit=tuple(arrivals), pause=(1,)))
    assert (out.active, out.waiting) == (1, 1) and engine.steps == [(2,)]
    out = session.advance(StepIn())
    assert (out.active, out.waiting) == (2, 0)
