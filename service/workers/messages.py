"""What crosses the pipe between the server and a worker: token ids in, strings out.

Messages are small frozen dataclasses, pickled by `multiprocessing.connection` (both ends are
this package, in processes started from the same installation). A batch request carries the
generation options and each article's token ids (`PreparedArticle`); a reply carries each
article's summary and headline text with their token counts (`Generated`), or the failure's
kind and type name (never its message, which could quote an input).

With continuous batching the worker holds a decoding session: `DecodeStep` carries one `StepIn`
(articles to admit, tickets to remove) and `Advanced` the session's `StepOut`; a step that raises
is answered with `Failed` (batch -1). (`DecodeStep`, not `Advance`: that name is the serving
layer's, for the blocking `advance(StepIn) -> StepOut` callable a continuous executor drives.)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..domain import Generated, GenerationParams, PreparedArticle
from ..engines.protocol import StepIn, StepOut


@dataclass(frozen=True)
class Ready:
    """The worker has loaded and warmed up its model."""

    pid: int
    load_s: float
    warmup_s: float


@dataclass(frozen=True)
class LoadFailed:
    """The worker could not load its model: one line, for the server's log and exit."""

    message: str


@dataclass(frozen=True)
class Generate:
    batch: int
    params: GenerationParams
    articles: list[PreparedArticle]


@dataclass(frozen=True)
class Results:
    batch: int
    results: list[Generated]


@dataclass(frozen=True)
class Failed:
    batch: int
    out_of_memory: bool
    error_type: str
    message: str
    """Only for out-of-memory (ours, names no input); empty otherwise."""


@dataclass(frozen=True)
class DecodeStep:
    """Continuous batching: apply `step` to the worker's session and decode one step."""

    step: StepIn


@dataclass(frozen=True)
class Advanced:
    out: StepOut


@dataclass(frozen=True)
class Stop:
    """Finish: exit after the current batch (the server sends it on shutdown)."""
