"""Tokenizers behind one small interface, so the CTranslate2 serving path needs no transformers.

`transformers` imports torch as soon as torch is installed (about 250 MB of a CTranslate2
server's memory, for a tokenizer). A converted directory therefore carries `summarizer-side.json`,
written by the conversion (a child process that has transformers anyway): the fast tokenizer
exactly as transformers loaded it (its `tokenizers` JSON), its padding and special token ids,
whether transformers cleans up spaces when decoding, and the few config and generation-config
values the engine reads. `RustTokenizer` serves from it with the `tokenizers` package alone;
`HFTokenizer` wraps a transformers tokenizer (the torch engine, and directories converted before
the side file existed). Both give the same ids and texts (tested).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SIDE_FILE = "summarizer-side.json"
SIDE_VERSION = 1


class TextTokenizer(Protocol):
    pad_token_id: int | None
    special_ids: frozenset[int]

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        """Ids and special-tokens mask per text; special tokens typed in a text are text."""

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        """Texts without special tokens."""

    def id_to_token(self, index: int) -> str: ...


class HFTokenizer:
    """A transformers tokenizer. Encoding (the prep thread) and decoding (the model's thread) can
    overlap; transformers' fast tokenizers reset truncation and padding on the shared Rust object
    at every call, which fails with "Already borrowed" when two threads meet, so one lock
    serialises them (each call takes milliseconds)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._lock = threading.Lock()
        self.pad_token_id = tokenizer.pad_token_id
        self.special_ids = frozenset(tokenizer.all_special_ids)

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        # split_special_tokens: "</s>" or "<pad>" typed in an article is text, not a control token.
        with self._lock:
            encoded = self.tokenizer(texts, padding=False, truncation=False,
                                     return_special_tokens_mask=True, split_special_tokens=True,
                                     verbose=False)
        return list(zip(encoded["input_ids"], encoded["special_tokens_mask"]))

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        with self._lock:
            return self.tokenizer.batch_decode(rows, skip_special_tokens=True)

    def id_to_token(self, index: int) -> str:
        return self.tokenizer.convert_ids_to_tokens(index)


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization`, for tokenizers that ask for it."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                          (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                          (" 're", "'re")):
        text = text.replace(before, after)
    return text


class RustTokenizer:
    """The same tokenizer from its `tokenizers` JSON, without transformers. Its settings are made
    once, here; encoding and decoding never change them, so two threads may use it at once."""

    def __init__(self, tokenizer_json: str, pad_token_id: int | None,
                 special_ids: Sequence[int], clean_up_spaces: bool) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.tokenizer.encode_special_tokens = True
        self.pad_token_id = pad_token_id
        self.special_ids = frozenset(special_ids)
        self.clean_up_spaces = clean_up_spaces

    def encode_batch(self, texts: list[str]) -> list[tuple[list[int], list[int]]]:
        return [(e.ids, e.special_tokens_mask)
                for e in self.tokenizer.encode_batch(texts, add_special_tokens=True)]

    def decode_batch(self, rows: Sequence[Sequence[int]]) -> list[str]:
        texts = self.tokenizer.decode_batch([list(r) for r in rows], skip_special_tokens=True)
        return [_clean_up_tokenization(t) for t in texts] if self.clean_up_spaces else texts

    def id_to_token(self, index: int) -> str:
        return self.tokenizer.id_to_token(index) or ""


PREFIX_CHARS_PER_TOKEN = 8
"""The first prefix of a long text tokenised for a window of N tokens is about N * this many
characters (news text averages 4 to 5 characters a token); a prefix that turns out too short is
doubled until it is long enough or is the whole text."""

PREFIX_MARGIN_TOKENS = 16
"""A prefix counts as long enough when it has this many tokens past the window: the cut changes
at most the tokens of the word it falls in, far from the tokens kept."""


def encode_for_window(tokenizer: TextTokenizer, texts: Sequence[str], window: int
                      ) -> list[tuple[list[int], list[int]]]:
    """Ids and special-tokens mask per text, enough of them for `window`: a text much longer
    than the window is tokenised from a prefix cut at a word boundary (see
    PREFIX_CHARS_PER_TOKEN), whose ids agree with the whole text's well past the window; a
    text that fits is tokenised whole. So a 100,000-character article read for a 1,024-token
    window costs a few thousand characters of tokenising, not all of it, with the same ids
    kept after truncation and the same verdict on whether it was truncated."""
    results: list[tuple[list[int], list[int]] | None] = [None] * len(texts)
    reach = [max(window, 1) * PREFIX_CHARS_PER_TOKEN] * len(texts)
    pending = list(range(len(texts)))
    while pending:
        cut = [_prefix(texts[i], reach[i]) for i in pending]
        encoded = tokenizer.encode_batch(cut)
        still: list[int] = []
        for i, piece, (ids, mask) in zip(pending, cut, encoded):
            if len(piece) == len(texts[i]) or len(ids) >= window + PREFIX_MARGIN_TOKENS:
                results[i] = (ids, mask)
            else:  # the prefix is too short to decide: try one twice as long
                reach[i] *= 2
                still.append(i)
        pending = still
    return [r for r in results if r is not None]


def _prefix(text: str, chars: int) -> str:
    """`text` cut before the last whitespace within its first `chars` characters (or at
    `chars`, in text without spaces); the whole text when it is no longer than that."""
    if len(text) <= chars:
        return text
    space = max(text.rfind(" ", chars // 2, chars), text.rfind("\n", chars // 2, chars))
    return text[:space] if space > 0 else text[:chars]


@dataclass(frozen=True)
class SideFile:
    """What the serving path reads from transformers, written once at conversion."""

    tokenizer: RustTokenizer
    config: dict[str, Any]
    """model_type, pad_token_id and the position limits, as transformers' config gives them."""
    generation: dict[str, Any]
    """length_penalty, no_repeat_ngram_size, forced_bos_token_id."""


CONFIG_KEYS = ("model_type", "pad_token_id", "max_position_embeddings",
               "max_encoder_position_embeddings", "max_decoder_position_embeddings")
GENERATION_KEYS = ("length_penalty", "no_repeat_ngram_size", "forced_bos_token_id")


def write_side_file(directory: Path) -> None:
    """Write `SIDE_FILE` for the checkpoint in `directory` (needs transformers)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(directory, **options)
    tokenizer = AutoTokenizer.from_pretrained(directory, **options)
    if not getattr(tokenizer, "is_fast", False):
        return  # no `tokenizers` JSON to serve from: the engine falls back to transformers
    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory, **options)
    else:
        generation = GenerationConfig.from_model_config(config)
    backend = tokenizer.backend_tokenizer
    clean_up = bool(tokenizer.clean_up_tokenization_spaces) and (
        type(backend.model).__name__ != "BPE" or getattr(
            tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
            False))
    side = {
        "version": SIDE_VERSION,
        "tokenizer": json.loads(backend.to_str()),
        "pad_token_id": tokenizer.pad_token_id,
        "special_ids": sorted(tokenizer.all_special_ids),
        "clean_up_spaces": clean_up,
        "config": {key: getattr(config, key, None) for key in CONFIG_KEYS},
        "generation": {key: getattr(generation, key, None) for key in GENERATION_KEYS},
    }
    (directory / SIDE_FILE).write_text(json.dumps(side), encoding="utf-8")


def read_side_file(directory: Path) -> SideFile | None:
    """The side file of a converted directory, or None (absent, or from another version)."""
    path = directory / SIDE_FILE
    if not path.is_file():
        return None
    side = json.loads(path.read_text(encoding="utf-8"))
    if side.get("version") != SIDE_VERSION:
        return None
    tokenizer = RustTokenizer(json.dumps(side["tokenizer"]), side["pad_token_id"],
                              side["special_ids"], side["clean_up_spaces"])
    return SideFile(tokenizer=tokenizer, config=side["config"], generation=side["generation"])
