"""Plain data the service works with, free of protobuf and torch."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from summarizer_client.results import ArticleFailure, ArticleSummary

from .errors import InvalidArgument, status_for

__all__ = ["ArticleFailure", "ArticleSummary"]  # results: the client's types, shared


MIN_WINDOW_TOKENS = 16
"""The smallest input window allowed: room for a task prefix, special tokens and some text."""
MAX_LENGTH_PENALTY = 10.0
"""Beam scores divide by length**penalty: far past this they overflow and mean nothing."""
RECENT_BATCHES = 16
"""How many of the most recent batch (or decoding step) durations the service remembers for its
estimates: the queue's "deadline cannot be met" check uses the fastest recent batch of a key
(serving/queue.py), a worker's watchdog the slowest recent batch of its worker
(workers/pool.py). Enough to ride out one odd batch, few enough to follow a change of load."""


class Outputs(enum.Enum):
    BOTH = "both"
    SUMMARY = "summary"
    HEADLINE = "headline"

    @property
    def summary(self) -> bool:
        return self is not Outputs.HEADLINE

    @property
    def headline(self) -> bool:
        return self is not Outputs.SUMMARY


class Priority(enum.IntEnum):
    """A request's class: which work may wait. Lower values run first (the policy in
    service/serving/ orders work by class, then fairly across callers)."""

    INTERACTIVE = 0
    """Someone is waiting for it now (an editor's call)."""
    DEFAULT = 1
    BULK = 2
    """Back-fills and batch jobs: runs when nothing more urgent needs the model."""


class LongInput(enum.Enum):
    """What to do with an article longer than the model's input window."""

    TRUNCATE = "truncate"
    """Read its beginning, up to the window; the result says truncated."""
    CHUNK = "chunk"
    """Summarise it in window-sized chunks, then summarise the chunks' summaries."""


@dataclass(frozen=True)
class RequestedOptions:
    """Options as a caller sent them: 0 / None mean "server default"."""

    summary_max_tokens: int = 0
    summary_min_tokens: int = 0
    headline_max_tokens: int = 0
    headline_min_tokens: int = 0
    num_beams: int = 0
    outputs: Outputs = Outputs.BOTH
    max_input_tokens: int = 0
    length_penalty: float | None = None
    no_repeat_ngram_size: int | None = None
    long_input: LongInput | None = None
    """None: the server's default."""


@dataclass(frozen=True)
class GenerationParams:
    """Fully resolved options. Hashable: jobs batch together only when these are equal."""

    summary_max_tokens: int
    summary_min_tokens: int
    headline_max_tokens: int
    headline_min_tokens: int
    num_beams: int
    outputs: Outputs
    max_input_tokens: int
    length_penalty: float | None = None
    """None: the checkpoint's own generation default."""
    no_repeat_ngram_size: int | None = None


@dataclass(frozen=True)
class Limits:
    max_num_beams: int
    max_new_tokens: int


def resolve_options(requested: RequestedOptions, defaults: GenerationParams,
                    limits: Limits) -> GenerationParams:
    """Fill server defaults into `requested` and check the result can be generated."""

    def pick(name: str) -> int:
        value = getattr(requested, name)
        return value if value else getattr(defaults, name)

    def pick_min(task: str) -> int:
        # A default minimum never exceeds the maximum a request asked for; only a minimum the
        # caller set explicitly can be "impossible".
        value = getattr(requested, f"{task}_min_tokens")
        return value if value else min(getattr(defaults, f"{task}_min_tokens"),
                                       pick(f"{task}_max_tokens"))

    params = GenerationParams(
        summary_max_tokens=pick("summary_max_tokens"),
        summary_min_tokens=pick_min("summary"),
        headline_max_tokens=pick("headline_max_tokens"),
        headline_min_tokens=pick_min("headline"),
        num_beams=pick("num_beams"),
        outputs=requested.outputs,
        # The window can be narrowed per request, never widened.
        max_input_tokens=min(requested.max_input_tokens or defaults.max_input_tokens,
                             defaults.max_input_tokens),
        length_penalty=(defaults.length_penalty if requested.length_penalty is None
                        else requested.length_penalty),
        no_repeat_ngram_size=(defaults.no_repeat_ngram_size
                              if requested.no_repeat_ngram_size is None
                              else requested.no_repeat_ngram_size),
    )
    if 0 < requested.max_input_tokens < MIN_WINDOW_TOKENS:
        raise InvalidArgument("options.max_input_tokens",
                              f"{requested.max_input_tokens} is below the minimum of "
                              f"{MIN_WINDOW_TOKENS}")
    for task in ("summary", "headline"):
        low = getattr(params, f"{task}_min_tokens")
        high = getattr(params, f"{task}_max_tokens")
        if high > limits.max_new_tokens:
            raise InvalidArgument(f"options.{task}_max_tokens",
                                  f"{high} is over this server's limit of {limits.max_new_tokens}")
        if low > high:
            raise InvalidArgument(f"options.{task}_min_tokens",
                                  f"{low} is more than {task}_max_tokens ({high})")
    if params.num_beams > limits.max_num_beams:
        raise InvalidArgument("options.num_beams",
                              f"{params.num_beams} is over this server's limit of "
                              f"{limits.max_num_beams}")
    if params.length_penalty is not None and not (
            math.isfinite(params.length_penalty)
            and abs(params.length_penalty) <= MAX_LENGTH_PENALTY):
        raise InvalidArgument("options.length_penalty",
                              f"must be between -{MAX_LENGTH_PENALTY} and {MAX_LENGTH_PENALTY}")
    if params.no_repeat_ngram_size is not None and params.no_repeat_ngram_size > 64:
        raise InvalidArgument("options.no_repeat_ngram_size", "must be at most 64")
    return params


@dataclass(frozen=True)
class PreparedArticle:
    """An article tokenised for the model(s), ready to batch."""

    summary_ids: tuple[int, ...] | None
    headline_ids: tuple[int, ...] | None
    input_tokens: int
    truncated: bool

    @property
    def cost(self) -> int:
        return max(len(self.summary_ids or ()), len(self.headline_ids or ()))


@dataclass(frozen=True)
class Generated:
    """What the engine wrote for one article."""

    summary: str = ""
    headline: str = ""
    summary_tokens: int = 0
    headline_tokens: int = 0


def failure_for(article_id: str, error: BaseException) -> ArticleFailure:
    """One article's in-band failure: the status code and message its error maps to."""
    code, message = status_for(error)
    return ArticleFailure(article_id, int(code), message)
