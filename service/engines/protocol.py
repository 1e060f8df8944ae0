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
    length_penalty: float | None = None
    """The checkpoint's own generation default (its generation config), used when a request
    leaves it unset; None when the checkpoint sets none."""
    no_repeat_ngram_size: int | None = None
    """Likewise (0: off)."""


class Engine(Protocol):
    name: str

    @property
    def models(self) -> Sequence[ModelDescription]:
        """The loaded checkpoints (read-only here: an engine may hold them in any sequence)."""
        ...

    defaults: GenerationParams
    """Options applied where a request leaves them unset; `max_input_tokens` is the window."""
    max_new_tokens: int | None
    """The most tokens the model(s) can write (a decoder's position limit); None: no limit."""

    def prepare(self, texts: Sequence[str], params: GenerationParams) -> list[PreparedArticle]:
        """Tokenise cleaned article texts for the outputs `params` asks for, cutting to the
        window."""
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


# ----- continuous batching (an engine that decodes step by step) -----

@dataclass(frozen=True)
class Admit:
    """A request for a stepping engine: one article with its own options."""

    ticket: int
    """The caller's id for this article; results and failures name it."""
    params: GenerationParams
    article: PreparedArticle
    priority: int = 1
    """The article's class (`domain.Priority`: 0 interactive, 1 default, 2 bulk). The session
    admits its waiting articles most urgent class first, then in the order given."""


@dataclass(frozen=True)
class StepIn:
    """What one `DecodingSession.advance` call changes before it decodes one step."""

    admit: tuple[Admit, ...] = ()
    """New articles: encoded (once, for both outputs) and joined to the running set as soon as
    the cache budget has room, in the order given; until then they wait in the session."""
    remove: tuple[int, ...] = ()
    """Tickets whose caller went (cancelled, deadline): dropped at once, waiting or decoding, and
    their cache memory freed. An unknown or finished ticket is ignored."""
    pause: tuple[int, ...] = ()
    """Tickets whose rows sit this step out (the serving side's policy decides, e.g. bulk
    articles while interactive ones decode): their rows, caches and search state are kept as
    they are, nothing is recomputed, and they resume at the first step that does not name them.
    A paused article still counts against the cache budget. A paused article that is still
    waiting is not admitted (not encoded) in that step. An unknown ticket is ignored."""
    in_flight: tuple[Admit, ...] = ()
    """Every article the caller holds in the session once this step's `remove` and `admit`
    apply, in admission order: the caller (serving/continuous.py's executor) is the one owner of
    the articles in flight. A session keeps its own state and ignores this; a supervisor that
    can lose the session (workers.pool: a worker process that dies) admits these again on a new
    one instead of keeping its own copy. Empty: the caller does not say (no replay)."""


@dataclass(frozen=True)
class StepFailure:
    """An article the session gave up on. Plain strings, so it crosses a process pipe."""

    ticket: int
    kind: str
    """"too_large" (needs more cache than the whole budget: it could never run),
    "out_of_memory" (the device ran out while it decoded), or "error" (its step raised)."""
    message: str
    """Ours, for the caller: never an engine's message (which could quote the input)."""
    error_type: str = ""


@dataclass(frozen=True)
class StepOut:
    """What one `advance` call did."""

    done: tuple[tuple[int, Generated], ...] = ()
    failed: tuple[StepFailure, ...] = ()
    waiting: int = 0
    """Articles admitted but still waiting for cache room."""
    active: int = 0
    """Articles decoding (an article leaves when both of its outputs are done)."""
    rows: int = 0
    """Sequences (beams included) in the step that ran; 0: no step ran (nothing active, or
    every active row paused)."""
    step_s: float = 0.0
    """Seconds the call spent in the model: encoding what joined, then the step."""
    used_bytes: int = 0
    """Cache memory held by the active articles after this call."""
    budget_bytes: int = 0
    paused_rows: int = 0
    """Sequences of active articles that sat this step out (`StepIn.pause`); not in `rows`."""
    encode_deferred: int = 0
    """Of `waiting`, the articles that had cache room but were left for a later step by the
    encoder slice (a burst of long inputs is encoded a slice per step); the others wait for
    room (or are paused)."""


class DecodingSession(Protocol):
    """One running set of sequence groups (continuous batching). One thread calls it."""

    def advance(self, step: StepIn) -> StepOut:
        """Apply `step`, admit what fits, decode one step for every active sequence, retire what
        finished. Returns at once (no step) when nothing is active."""
        ...


class SteppingEngine(Engine, Protocol):
    """An engine that can also batch continuously."""

    def open_session(self) -> DecodingSession:
        ...
