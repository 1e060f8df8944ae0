"""The small interface between the service and an inference engine. No torch here.

The service calls `prepare` and `count_tokens` (tokenise; any thread but one at a time) and
`generate` (one worker thread) and reads `models` and `defaults`. `torch_engine.TorchEngine` and
`ct2_engine.CTranslate2Engine` implement it (their shared half is `checkpoint.CheckpointEngine`);
tests swap in a fake engine.

The service only ever sees loaded engines: the server's engine factory builds one and returns it
ready (`TorchEngine(settings).load()`), so loading is not part of this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..domain import Generated, GenerationParams, PreparedArticle


@dataclass(frozen=True)
class ModelDescription:
    role: str
    """"summary", "headline" or "summary+headline"."""
    model_id: str
    family: str
    model_type: str
    max_input_tokens: int
    summary_prefix: str
    headline_prefix: str
    dtype: str
    device: str
    chunked_headline: str = "summary"
    """For an article summarised in chunks, what the headline is written from: "summary" (the
    final summary) or "opening+summary" (the article's opening sentences, then the summary).
    Meaningful for the model that writes headlines."""


class Engine(Protocol):
    name: str
    models: Sequence[ModelDescription]
    defaults: GenerationParams
    """Options applied where a request leaves them unset; `max_input_tokens` is the window."""
    max_new_tokens: int | None
    """The most tokens the model(s) can write (a decoder's position limit); None: no limit."""

    def prepare(self, texts: Sequence[str], params: GenerationParams) -> list[PreparedArticle]:
        """Tokenise cleaned article texts for the outputs `params` asks for, cutting to the window."""
        ...

    def count_tokens(self, texts: Sequence[str], params: GenerationParams) -> list[int]:
        """Tokens `prepare` would give each text for `params.outputs` if it cut nothing: task
        prefix and special tokens included (the larger count where two models read the text)."""
        ...

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        """Write the outputs for a batch; one result per article, in order. Blocking."""
        ...

    def warmup(self) -> None:
        """Run a small generation so the first real request pays no start-up cost."""
        ...


WARMUP_TEXT = (
    "The city council voted on Tuesday to expand the bus network, adding three routes that will "
    "connect the northern suburbs with the hospital and the university. Officials said the new "
    "services would start in March and cost about two million a year."
)
