"""Long texts in pieces: sentence-aligned chunks that each fit a model's input window.

Sentences come from `sentencex` (Wikimedia's rule-based segmenter: no model to download, written in
Rust, so a 100,000-character article splits in well under a millisecond); each line of a cleaned
article is a paragraph, and paragraph ends are sentence ends too. Token counts come from the engine
(`Engine.count_tokens`), so a chunk fits the window exactly as the model will read it, task prefix
and special tokens included: packing estimates from per-sentence counts, then every chunk is
counted whole before it is handed out.

Sentences are packed greedily in order. The next chunk starts with the previous chunk's last
sentence when that sentence is short (see OVERLAP_MAX_FRACTION), so a reference across the cut
("He said ...") keeps its antecedent. A sentence too long for the window on its own is cut into
window-sized pieces, at word boundaries where possible, else between characters.

Nothing here knows about models, asyncio or protobuf.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import sentencex

from ..text import model_text

SENTENCE_LANGUAGE = "en"
"""Segmentation rules. English rules also split at the sentence marks of other scripts (。？！);
what changes between languages is mostly the list of abbreviations."""

OVERLAP_MAX_FRACTION = 0.15
"""The last sentence of a chunk is repeated at the start of the next when it takes at most this
share of the window: context across the cut for a few per cent more tokens."""

_WORD = re.compile(r"\S+")

COUNT_BLOCK = 64
"""Sentences counted per call of the token counter. Counting goes only as far as packing does, so
an article past the chunk cap is refused without tokenising all of it."""

CHARS_PER_TOKEN_BOUND = 32
"""No tokeniser averages this many characters per token over a window's worth of text. Used only
to bound how much of a giant sentence is tokenised at once: a sentence is first counted up to
`window * CHARS_PER_TOKEN_BOUND` characters, and cuts are looked for no further than that."""

CountTokens = Callable[[Sequence[str]], list[int]]
"""Tokens each text takes in the model's input, task prefix and special tokens included."""


@dataclass(frozen=True)
class Chunk:
    """A span `text[start:end]` of the chunked text, and the model text read for it."""

    start: int
    end: int
    text: str
    tokens: int
    """What the model reads for it, task prefix and special tokens included."""


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of every sentence of `text`, whitespace around it excluded; lines are
    paragraphs, so a sentence never spans a newline."""
    spans: list[tuple[int, int]] = []
    line_start = 0
    for line in text.split("\n"):
        position = line_start
        for sentence in sentencex.segment(SENTENCE_LANGUAGE, line):
            # The segments concatenate to the line, whitespace included.
            start = position + len(sentence) - len(sentence.lstrip())
            end = position + len(sentence.rstrip())
            if end > start:
                spans.append((start, end))
            position += len(sentence)
        line_start += len(line) + 1
    return spans


@dataclass(frozen=True)
class _Piece:
    start: int
    end: int
    tokens: int
    """Tokens of its text alone, without the prefix and special tokens."""


class _Pieces:
    """The sentences of a text with their token counts, produced lazily: sentences are counted a
    block at a time, and a sentence longer than the window becomes window-sized pieces one at a
    time, so a consumer that stops early leaves the rest of the text untouched."""

    def __init__(self, text: str, count: CountTokens, window: int) -> None:
        self.text = text
        self.count = count
        self.window = window
        self.reach = window * CHARS_PER_TOKEN_BOUND
        self.overhead = count([""])[0]
        self.items: list[_Piece] = []
        self._source = self._produce()

    def available(self, index: int) -> bool:
        """Whether piece `index` exists, producing pieces up to it as needed."""
        while index >= len(self.items):
            piece = next(self._source, None)
            if piece is None:
                return False
            self.items.append(piece)
        return True

    def tokens(self, start: int, end: int) -> int:
        """What the model reads for text[start:end], prefix and special tokens included."""
        return self.count([model_text(self.text[start:end])])[0]

    def _produce(self) -> Iterator[_Piece]:
        sentences = sentence_spans(self.text)
        for block_start in range(0, len(sentences), COUNT_BLOCK):
            block = sentences[block_start:block_start + COUNT_BLOCK]
            counts = self.count([model_text(self.text[s:min(e, s + self.reach)])
                                 for s, e in block])
            for (start, end), tokens in zip(block, counts):
                if tokens <= self.window and end - start > self.reach:
                    tokens = self.tokens(start, end)  # only its beginning was counted
                if tokens <= self.window:
                    yield _Piece(start, end, tokens - self.overhead)
                else:
                    yield from self._split(start, end)

    def _split(self, start: int, end: int) -> Iterator[_Piece]:
        """Cut an over-long sentence into the longest pieces that fit: at word ends where a
        word-aligned piece fits, else between characters."""
        word_ends = [m.end() for m in _WORD.finditer(self.text, start, end)]
        first = 0
        while start < end:
            while word_ends[first] <= start:
                first += 1
            reach = min(end, start + self.reach)
            last = bisect.bisect_right(word_ends, reach, lo=first)
            offset = first
            # The lambdas run inside _last_true, before `start` and `offset` move on.
            k = _last_true(last - offset,
                           lambda k: self.tokens(start, word_ends[offset + k]) <= self.window)  # noqa: B023
            if k >= 0:
                cut = word_ends[offset + k]
            else:  # one word longer than the window
                cut = start + 1 + max(0, _last_true(
                    reach - start - 1, lambda k: self.tokens(start, start + 1 + k) <= self.window))  # noqa: B023
            yield _Piece(start, cut, self.tokens(start, cut) - self.overhead)
            start = cut
            while start < end and self.text[start].isspace():
                start += 1


def _last_true(n: int, test: Callable[[int], bool]) -> int:
    """The largest k in [0, n) with test(k), for a test that is true up to some k and false after;
    -1 when test(0) is false. Galloping, then bisecting: each probe tokenises a prefix, and none
    reaches far beyond the answer."""
    if n == 0 or not test(0):
        return -1
    low, step = 0, 1
    while low + step < n and test(low + step):
        low += step
        step *= 2
    high = min(low + step, n)  # test(high) is false, or high == n
    while high - low > 1:
        middle = (low + high) // 2
        if test(middle):
            low = middle
        else:
            high = middle
    return low


def chunks(text: str, count: CountTokens, window: int) -> Iterator[Chunk]:
    """Split `text` into sentence-aligned chunks of at most `window` tokens each (as `count`
    measures them), in order, together covering all of the text. Lazy: stop iterating to stop
    the work."""
    pieces = _Pieces(text, count, window)
    budget = window - pieces.overhead
    first = 0
    overlapped = False
    while pieces.available(first):
        used = 0
        last = first
        while pieces.available(last) and used + pieces.items[last].tokens <= budget:
            used += pieces.items[last].tokens
            last += 1
        last = max(last, first + 1)  # one piece always fits on its own
        while True:
            # Sentence counts do not add up exactly to the count of their concatenation: the
            # chunk itself is counted, and loses its last sentence until it fits.
            start, end = pieces.items[first].start, pieces.items[last - 1].end
            tokens = pieces.tokens(start, end)
            if tokens <= window or last - first == 1:
                break
            last -= 1
        if overlapped and last - first == 1:
            # Only the repeated sentence fits beside the next one: no overlap this time.
            first += 1
            overlapped = False
            continue
        yield Chunk(start, end, model_text(text[start:end]), tokens)
        tail = pieces.items[last - 1]
        overlapped = (last - first > 1 and tail.tokens <= budget * OVERLAP_MAX_FRACTION
                      and pieces.available(last))
        first = last - 1 if overlapped else last
