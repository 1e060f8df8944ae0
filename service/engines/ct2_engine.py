"""The CTranslate2 engine: the same checkpoints, converted once, run by CTranslate2.

`--model` takes what the torch engine takes (a directory, hub id or manifest name; the checkpoint is
converted into `--convert-cache-dir` on first use) or a directory `summarizer convert` wrote.
Tokenising, windows, defaults and results are the shared ones (service/engines/checkpoint.py), so
both engines read the same ids and answer in the same format; the options are passed to CTranslate2
explicitly, since it reads no `generation_config.json`: beams, lengths, `length_penalty`,
`no_repeat_ngram_size` and a checkpoint's forced first token (BART-CNN's `forced_bos_token_id`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .checkpoint import (Checkpoint, CheckpointEngine, Source, load_checkpoint,
                         load_converted_checkpoint, resolve_source)
from ..config import Settings, available_cpus
from .convert import CT2_DIR, converted_for, is_converted
from ..domain import Generated, GenerationParams, PreparedArticle
from .choice import ct2_compute_type
from ..errors import ModelLoadError
from ..text import tidy_headline, tidy_summary
from .tokenizer import read_side_file

log = logging.getLogger(__name__)


class CTranslate2Engine(CheckpointEngine):
    name = "ctranslate2"

    def __init__(self, settings: Settings) -> None:
        """Settings, device and compute type only; `load()` converts (once) and loads."""
        super().__init__(settings)
        try:
            import ctranslate2
        except ImportError as error:
            raise ModelLoadError("the ctranslate2 engine needs the ctranslate2 package: "
                                 "pip install ctranslate2") from error
        self._ct2 = ctranslate2
        device = settings.device
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        kind, _, index = device.partition(":")
        if kind == "cuda" and ctranslate2.get_cuda_device_count() == 0:
            raise ModelLoadError(f"device {device!r} asked for, but ctranslate2 sees no CUDA GPU")
        self.device = device
        self._device_kind, self._device_index = kind, int(index or 0)
        supported = ctranslate2.get_supported_compute_types(kind)
        compute_type = settings.compute_type
        if compute_type == "auto":
            compute_type = ct2_compute_type(kind)
            if compute_type not in supported:
                compute_type = "float32"
        if compute_type not in supported:
            raise ModelLoadError(f"compute type {compute_type} is not supported by ctranslate2 on "
                                 f"this {kind}; supported: {', '.join(sorted(supported))}")
        self.compute_type = compute_type

    def _load_model(self, ref: str, *, weights: bool = True) -> Checkpoint:
        settings = self.settings
        source = resolve_source(ref, settings, weights=not is_converted(ref))
        directory = converted_for(source, self.compute_type, settings.convert_cache_dir,
                                  settings.revision)
        side = read_side_file(directory)
        if side is not None:  # the tokenizer without transformers (and so without torch)
            ckpt = load_converted_checkpoint(ref, side, settings)
            generation = side.generation
        else:
            log.info("%s was converted before summarizer-side.json existed: its tokenizer "
                     "loads through transformers (convert it again to leave torch out)", ref)
            ckpt = load_checkpoint(
                Source(ref=ref, location=str(directory), local=True,
                       options={"trust_remote_code": False, "local_files_only": True}), settings)
            generation = _generation_values(directory, ckpt)
        if not weights:
            return ckpt
        try:
            translator = self._ct2.Translator(
                str(directory / CT2_DIR), device=self._device_kind,
                device_index=self._device_index, compute_type=self.compute_type,
                inter_threads=1, intra_threads=settings.threads or available_cpus())
        except (RuntimeError, ValueError, OSError) as error:
            raise ModelLoadError(f"cannot load model {ref!r} with ctranslate2: {error}") from error
        ckpt.model = _Model(translator, directory, ckpt, generation)
        return ckpt

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        summaries: list[tuple[str, int]] = [("", 0)] * len(batch)
        headlines: list[tuple[str, int]] = [("", 0)] * len(batch)
        if params.outputs.summary:
            summaries = self.summary.model.run(
                [a.summary_ids for a in batch], params.summary_min_tokens,
                params.summary_max_tokens, params, tidy_summary)
        if params.outputs.headline:
            headlines = self.headline.model.run(
                [a.headline_ids for a in batch], params.headline_min_tokens,
                params.headline_max_tokens, params, tidy_headline)
        return [Generated(summary=s, headline=h, summary_tokens=sn, headline_tokens=hn)
                for (s, sn), (h, hn) in zip(summaries, headlines)]


class _Model:
    """A CTranslate2 translator with what it needs from the checkpoint's generation config."""

    def __init__(self, translator: Any, directory: Path, ckpt: Checkpoint,
                 generation: dict[str, Any]) -> None:
        self.translator = translator
        self.ckpt = ckpt
        self.length_penalty = float(generation.get("length_penalty") or 1.0)
        self.no_repeat_ngram_size = int(generation.get("no_repeat_ngram_size") or 0)
        forced = generation.get("forced_bos_token_id")
        self.prefix = [ckpt.tokenizer.id_to_token(forced)] if forced is not None else None
        vocabulary = json.loads((directory / CT2_DIR / "shared_vocabulary.json").read_text(
            encoding="utf-8"))
        # Output tokens back to ids by the model's own vocabulary (it may hold placeholders the
        # tokenizer does not know).
        self.ids = {token: index for index, token in enumerate(vocabulary)}

    def run(self, rows: Sequence[tuple[int, ...] | None], min_tokens: int, max_tokens: int,
            params: GenerationParams, tidy: Callable[[str], str]) -> list[tuple[str, int]]:
        token = self.ckpt.tokenizer.id_to_token
        source = [[token(i) for i in row or ()] for row in rows]
        greedy = params.num_beams == 1
        results = self.translator.translate_batch(
            source,
            target_prefix=[self.prefix] * len(rows) if self.prefix else None,
            beam_size=params.num_beams,
            length_penalty=1.0 if greedy else (
                self.length_penalty if params.length_penalty is None else params.length_penalty),
            no_repeat_ngram_size=(self.no_repeat_ngram_size if params.no_repeat_ngram_size is None
                                  else params.no_repeat_ngram_size),
            max_decoding_length=max_tokens,
            min_decoding_length=min_tokens,
            max_input_length=0,  # inputs are already cut to the window
            return_end_token=True,
        )
        return self.ckpt.decode([[self.ids[t] for t in r.hypotheses[0]] for r in results], tidy)


def _generation_values(directory: Path, ckpt: Checkpoint) -> dict[str, Any]:
    """What the engine reads of a generation config, through transformers."""
    from transformers import GenerationConfig

    if (directory / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(directory)
    else:
        generation = GenerationConfig.from_model_config(ckpt.config)
    return {"length_penalty": generation.length_penalty,
            "no_repeat_ngram_size": generation.no_repeat_ngram_size,
            "forced_bos_token_id": generation.forced_bos_token_id}
