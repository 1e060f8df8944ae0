"""A fake engine: deterministic, instant (or held on an event), no torch."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from service.domain import Generated, GenerationParams, Outputs, PreparedArticle
from service.engines.protocol import ModelDescription


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
