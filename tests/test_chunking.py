"""Chunking long texts (service/serving/chunking.py): with a character-counting fake and with the
real tokenisers of the tiny checkpoints, whose counts are the ones the model reads."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.serving.chunking import OVERLAP_MAX_FRACTION, Chunk, chunks, sentence_spans
from service.config import Settings
from service.domain import Limits, Outputs, RequestedOptions, resolve_options
from service.engines.torch_engine import TorchEngine
from service.engines.tiny import training_text

OVERHEAD = 3
"""Tokens the fake counter adds to every text: a stand-in for a task prefix and special tokens."""


def count_chars(texts: Sequence[str]) -> list[int]:
    """One token per character, plus the overhead."""
    return [len(t) + OVERHEAD for t in texts]


def article(sentences: int, seed: int = 3, paragraph_every: int = 5) -> str:
    """News-like sentences, a paragraph (line) every few sentences."""
    lines = training_text(sentences, seed=seed)
    return "\n".join(" ".join(lines[i:i + paragraph_every])
                     for i in range(0, len(lines), paragraph_every))


def assert_covers(text: str, pieces: list[Chunk]) -> None:
    """Every non-space character of `text` is in some chunk, chunks go forward in order, and a
    chunk's text is the model text of its span."""
    covered = [False] * len(text)
    for chunk in pieces:
        assert chunk.text == text[chunk.start:chunk.end].replace("\n", " ")
        for i in range(chunk.start, chunk.end):
            covered[i] = True
    assert all(covered[i] or text[i].isspace() for i in range(len(text)))
    assert [c.start for c in pieces] == sorted(c.start for c in pieces)
    assert all(b.start > a.start and b.end > a.end for a, b in itertools.pairwise(pieces))


# ----- sentences -----

def test_sentences_end_at_sentence_marks_and_paragraph_ends_not_at_abbreviations() -> None:
    text = ("Dr. Smith met U.S. officials on Monday. They agreed!\n"
            "A paragraph without a full stop\nWas it late? Yes.")
    assert [text[s:e] for s, e in sentence_spans(text)] == [
        "Dr. Smith met U.S. officials on Monday.", "They agreed!",
        "A paragraph without a full stop", "Was it late?", "Yes."]


def test_sentence_spans_exclude_surrounding_whitespace() -> None:
    text = "  One.   Two.  \n\n Three. "
    assert [text[s:e] for s, e in sentence_spans(text)] == ["One.", "Two.", "Three."]


# ----- chunks with a character counter -----

@pytest.mark.parametrize("window", [40, 100, 400])
def test_every_chunk_fits_and_together_they_cover_the_text(window: int) -> None:
    text = article(60)
    pieces = list(chunks(text, count_chars, window))
    assert len(pieces) > 1
    for chunk in pieces:
        assert chunk.tokens == count_chars([chunk.text])[0] <= window
    assert_covers(text, pieces)


def test_chunk_boundaries_are_sentence_boundaries() -> None:
    text = article(60)
    spans = sentence_spans(text)
    starts, ends = {s for s, _ in spans}, {e for _, e in spans}
    pieces = list(chunks(text, count_chars, 200))
    for chunk in pieces:
        assert chunk.start in starts and chunk.end in ends


def test_chunks_are_packed_full() -> None:
    text = article(60)
    pieces = list(chunks(text, count_chars, 200))
    spans = sentence_spans(text)
    for chunk in pieces[:-1]:
        after = next(e for s, e in spans if s > chunk.end)
        # The next sentence would not have fit.
        assert count_chars([text[chunk.start:after]])[0] > 200


def test_a_short_last_sentence_is_repeated_at_the_start_of_the_next_chunk() -> None:
    short = "Short one."
    long = "This sentence is quite a lot longer than the short ones are. "
    text = (long + short + " ") * 6
    window = 2 * len(long) + OVERHEAD
    assert len(short) <= (window - OVERHEAD) * OVERLAP_MAX_FRACTION
    pieces = list(chunks(text, count_chars, window))
    assert any(text[a.start:a.end].endswith(short) and text[b.start:b.end].startswith(short)
               and b.start < a.end for a, b in itertools.pairwise(pieces))
    assert_covers(text, pieces)


def test_long_sentences_are_not_repeated() -> None:
    text = " ".join(f"Sentence number {i} is long enough to be worth more than a tenth." for i
                    in range(20))
    pieces = list(chunks(text, count_chars, 150))
    assert all(b.start >= a.end for a, b in itertools.pairwise(pieces))
    assert_covers(text, pieces)


def test_a_sentence_longer_than_the_window_is_cut_at_word_ends() -> None:
    words = [f"word{i}" for i in range(200)]
    text = "Before it. " + " ".join(words) + ". After it."
    pieces = list(chunks(text, count_chars, 50))
    assert all(c.tokens <= 50 for c in pieces)
    assert_covers(text, pieces)
    middle = [c for c in pieces if "word" in c.text]
    assert len(middle) > 5
    for chunk in middle:
        assert text[chunk.start - 1].isspace() and (
            chunk.end == len(text) or not text[chunk.end].isalnum())
    # Word pieces are packed full: adding the next word would overflow.
    assert all(c.tokens > 50 - len("word199") - 2 for c in middle[:-1])


def test_a_word_longer_than_the_window_is_cut_between_characters() -> None:
    text = "Start. " + "x" * 500 + " end."
    pieces = list(chunks(text, count_chars, 64))
    assert all(c.tokens <= 64 for c in pieces)
    assert_covers(text, pieces)
    assert sum(c.text.count("x") for c in pieces) == 500


def test_chunking_is_deterministic() -> None:
    text = article(80, seed=9)
    assert list(chunks(text, count_chars, 120)) == list(chunks(text, count_chars, 120))


def test_a_huge_text_is_tokenised_only_as_far_as_it_is_chunked() -> None:
    counted: list[int] = []

    def counting(texts: Sequence[str]) -> list[int]:
        counted.append(sum(len(t) for t in texts))
        return count_chars(texts)

    text = article(40) * 400  # about 1 MB, one very long paragraph line per repeat
    assert len(text) > 1_000_000
    first = list(itertools.islice(chunks(text, counting, 500), 10))
    assert len(first) == 10
    assert sum(counted) < 100_000


def test_a_huge_sentence_is_cut_only_as_far_as_it_is_chunked() -> None:
    counted: list[int] = []

    def counting(texts: Sequence[str]) -> list[int]:
        counted.append(sum(len(t) for t in texts))
        return count_chars(texts)

    first = list(itertools.islice(chunks("y" * 1_000_000, counting, 500), 10))
    assert [c.tokens for c in first] == [500] * 10
    assert sum(counted) < 100_000


def test_empty_and_blank_texts_have_no_chunks() -> None:
    assert list(chunks("", count_chars, 40)) == []
    assert list(chunks(" \n ", count_chars, 40)) == []


# ----- chunks as the model reads them -----

@pytest.fixture(scope="module")
def tiny_engines(tiny_bart: Path, tiny_t5: Path) -> dict[str, TorchEngine]:
    return {"bart": TorchEngine(Settings(model=str(tiny_bart), threads=1)).load(),
            "t5": TorchEngine(Settings(model=str(tiny_t5), threads=1)).load()}


@pytest.mark.parametrize("family", ["bart", "t5"])
@pytest.mark.parametrize("window", [32, 100])
def test_real_tokenisers_chunks_fit_the_window_prefix_included(tiny_engines, family: str,
                                                               window: int) -> None:
    engine = tiny_engines[family]
    params = resolve_options(RequestedOptions(max_input_tokens=window, outputs=Outputs.SUMMARY),
                             engine.defaults, Limits(max_num_beams=8, max_new_tokens=512))
    text = article(40) + "\n" + " ".join(["council"] * 300) + "."  # and one over-long sentence
    pieces = list(chunks(text, lambda t: engine.count_tokens(t, params), window))
    prepared = engine.prepare([c.text for c in pieces], params)
    assert len(pieces) > 3
    for chunk, tokenised in zip(pieces, prepared):
        assert not tokenised.truncated
        assert tokenised.input_tokens == chunk.tokens <= window
    assert_covers(text, pieces)
