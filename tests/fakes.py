"""A fake engine: deterministic, instant (or held on an event), no torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from service.domain import Generated, GenerationParams, Outputs, PreparedArticle
from service.engines.protocol import Admit, ModelDescription, StepFailure, StepIn, StepOut


class FakeEngine:
    """Encodes text as code points so results can be traced back to their article.

    The summary is "S:" + the article's first 12 characters (+ `summary_padding` dots, for big
    messages), the headline "H:" + its first 6.
    Set `hold` to make generate() block until it is set again; `batches` records every batch,
    `durations_s` how long each took; `batch_delay_s` makes every batch take that long (a model's
    time, for load tests), `solo_fail_delay_s` a failing
    input run alone that long (its caller has time to go away meanwhile).
    """

    name = "fake"

    def __init__(self, window: int = 64, summary_padding: int = 0) -> None:
        self.summary_padding = summary_padding
        self.defaults = GenerationParams(
            summary_max_tokens=20, summary_min_tokens=2, headline_max_tokens=8,
            headline_min_tokens=1, num_beams=2, outputs=Outputs.BOTH, max_input_tokens=window)
        self.models = [ModelDescription(
            role="summary+headline", model_id="fake/model", family="bart", model_type="bart",
            max_input_tokens=window, summary_prefix="", headline_prefix="", dtype="float32",
            device="cpu")]
        self.max_new_tokens: int | None = None
        self.batches: list[list[str]] = []
        self.hold: threading.Event | None = None
        self.started = threading.Event()
        self.fail_on: str | None = None
        self.batch_delay_s = 0.0
        self.solo_fail_delay_s = 0.0
        self.durations_s: list[float] = []
        self.warmed_up = False

    def prepare(self, texts: Sequence[str], params: GenerationParams) -> list[PreparedArticle]:
        out = []
        for text in texts:
            ids = tuple(ord(c) for c in text)
            cut = ids[:params.max_input_tokens]
            out.append(PreparedArticle(summary_ids=cut, headline_ids=cut, input_tokens=len(cut),
                                       truncated=len(cut) < len(ids)))
        return out

    def count_tokens(self, texts: Sequence[str], params: GenerationParams) -> list[int]:
        return [len(text) for text in texts]

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        started = time.monotonic()
        texts = ["".join(map(chr, a.summary_ids)) for a in batch]
        self.batches.append(texts)
        self.started.set()
        if self.hold is not None:
            self.hold.wait(timeout=30)
        if self.batch_delay_s:
            time.sleep(self.batch_delay_s)
        if self.fail_on is not None and any(self.fail_on in t for t in texts):
            if len(batch) == 1:  # alone, a failing input takes this long to fail
                time.sleep(self.solo_fail_delay_s)
            self.durations_s.append(time.monotonic() - started)
            raise RuntimeError("injected failure")
        self.durations_s.append(time.monotonic() - started)
        pad = "." * self.summary_padding
        return [Generated(summary=("S:" + t[:12] + pad) if params.outputs.summary else "",
                          headline=("H:" + t[:6]) if params.outputs.headline else "",
                          summary_tokens=params.summary_max_tokens,
                          headline_tokens=params.headline_max_tokens) for t in texts]

    def warmup(self) -> None:
        self.warmed_up = True


class FakeSteppingEngine(FakeEngine):
    """A FakeEngine that can also batch continuously (`open_session`), deterministically.

    Each article decodes for as many steps as its longest requested output's max tokens (so its
    options decide how long it lives) and ends with FakeEngine's result ("S:" + its first 12
    characters, "H:" + its first 6, token counts = the max tokens asked for). It costs
    `num_beams x (steps + input tokens)` bytes of a `budget_bytes` budget: articles that do not
    fit wait in the session (StepOut.waiting); one that alone exceeds the budget fails "too_large".
    An article whose text holds `fail_on` fails "error" at its first step, alone.

    The session honours the engine contract for priority classes: waiting articles are admitted
    most urgent class first (`Admit.priority`), then in arrival order; a ticket in `StepIn.pause`
    sits the step out (not counted down, not admitted while waiting; its rows are reported in
    `StepOut.paused_rows`, not in `rows`).

    For tests: `steps` records every step's decoding tickets (paused ones left out), `paused`
    every step's paused active tickets, `texts` each ticket's text,
    `removed` the tickets taken out by `StepIn.remove` (their memory freed at once); `hold`
    blocks every step until it is set; `started` is set when a step begins; `step_delay_s` makes
    each step take that long.
    """

    can_step = True

    def __init__(self, window: int = 64, budget_bytes: int = 1 << 30) -> None:
        super().__init__(window=window)
        self.budget_bytes = budget_bytes
        self.step_delay_s = 0.0
        self.steps: list[tuple[int, ...]] = []
        self.paused: list[tuple[int, ...]] = []
        self.texts: dict[int, str] = {}
        self.removed: list[int] = []
        self.sessions: list[FakeSession] = []

    def open_session(self) -> FakeSession:
        session = FakeSession(self)
        self.sessions.append(session)
        return session


def fake_steps(params: GenerationParams) -> int:
    """Steps an article with these options decodes for in a FakeSession."""
    return max(params.summary_max_tokens if params.outputs.summary else 0,
               params.headline_max_tokens if params.outputs.headline else 0, 1)


def fake_cost(params: GenerationParams, article: PreparedArticle) -> int:
    """An article's cache bytes in a FakeSession."""
    return max(params.num_beams, 1) * (fake_steps(params) + article.input_tokens)


class FakeSession:
    """The running set of one FakeSteppingEngine session (see there)."""

    def __init__(self, engine: FakeSteppingEngine) -> None:
        self.engine = engine
        self.waiting: list[Admit] = []
        """In admission order: most urgent class first, then arrival (a stable sort)."""
        self.active: dict[int, tuple[Admit, int]] = {}
        """ticket -> (its request, steps left)"""

    @property
    def used_bytes(self) -> int:
        return sum(fake_cost(a.params, a.article) for a, _ in self.active.values())

    def advance(self, step: StepIn) -> StepOut:
        engine = self.engine
        started = time.monotonic()
        failed: list[StepFailure] = []
        for ticket in step.remove:
            if ticket in self.active or any(a.ticket == ticket for a in self.waiting):
                engine.removed.append(ticket)
            self.active.pop(ticket, None)
            self.waiting = [a for a in self.waiting if a.ticket != ticket]
        for admit in step.admit:
            text = "".join(map(chr, admit.article.summary_ids or ()))
            engine.texts[admit.ticket] = text
            if fake_cost(admit.params, admit.article) > engine.budget_bytes:
                failed.append(StepFailure(admit.ticket, "too_large",
                                          "the article needs more cache than the whole budget"))
            else:
                self.waiting.append(admit)
        self.waiting.sort(key=lambda a: a.priority)  # stable: arrival order within a class
        paused = frozenset(step.pause)
        for admit in [a for a in self.waiting if a.ticket not in paused]:
            if self.used_bytes + fake_cost(admit.params, admit.article) > engine.budget_bytes:
                break  # in line order: the rest waits for room
            self.waiting.remove(admit)
            self.active[admit.ticket] = (admit, fake_steps(admit.params))
        done: list[tuple[int, Generated]] = []
        stepping = [t for t in self.active if t not in paused]
        rows = sum(max(self.active[t][0].params.num_beams, 1) for t in stepping)
        paused_rows = sum(max(a.params.num_beams, 1) for t, (a, _) in self.active.items()
                          if t in paused)
        if stepping:
            engine.started.set()
            if engine.hold is not None:
                engine.hold.wait(timeout=30)
            if engine.step_delay_s:
                time.sleep(engine.step_delay_s)
            engine.steps.append(tuple(stepping))
            engine.paused.append(tuple(t for t in self.active if t in paused))
            for ticket in stepping:
                admit, left = self.active[ticket]
                text = engine.texts[ticket]
                if engine.fail_on is not None and engine.fail_on in text:
                    del self.active[ticket]
                    failed.append(StepFailure(ticket, "error", "", "RuntimeError"))
                elif left <= 1:
                    del self.active[ticket]
                    p = admit.params
                    done.append((ticket, Generated(
                        summary=("S:" + text[:12]) if p.outputs.summary else "",
                        headline=("H:" + text[:6]) if p.outputs.headline else "",
                        summary_tokens=p.summary_max_tokens,
                        headline_tokens=p.headline_max_tokens)))
                else:
                    self.active[ticket] = (admit, left - 1)
        return StepOut(done=tuple(done), failed=tuple(failed), waiting=len(self.waiting),
                       active=len(self.active), rows=rows, step_s=time.monotonic() - started,
                       used_bytes=self.used_bytes, budget_bytes=engine.budget_bytes,
                       paused_rows=paused_rows)
