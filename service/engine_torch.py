"""The Hugging Face `transformers` engine on torch.

Loads any seq2seq checkpoint `AutoModelForSeq2SeqLM` knows (BART, mBART, PEGASUS, T5, FLAN-T5,
LED, ...) from a directory or a hub id: safetensors weights only, never remote code, offline when
asked. When one checkpoint writes both outputs from the same input, the article is encoded once and
both outputs are decoded from that encoding.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .domain import Generated, GenerationParams, Outputs, PreparedArticle
from .engine import WARMUP_TEXT, ModelDescription
from .errors import ModelLoadError, first_line
from .manifests import Manifest, manifest_for, source_for
from .text import tidy_headline, tidy_summary

log = logging.getLogger(__name__)


@dataclass
class _Checkpoint:
    """One loaded model with its tokenizer and the defaults that apply to it."""

    ref: str
    model: Any
    tokenizer: Any
    manifest: Manifest
    window: int
    summary_prefix: str
    headline_prefix: str
    model_type: str
    pad_id: int
    special_ids: frozenset[int]
    max_new_tokens: int | None

    def encode(self, texts: list[str], window: int) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids per text, cut to `window` while keeping the special tokens at both ends."""
        if not texts:
            return []  # the tokenizer refuses an empty batch
        # split_special_tokens: "</s>" or "<pad>" typed in an article is text, not a control token.
        encoded = self.tokenizer(texts, padding=False, truncation=False,
                                 return_special_tokens_mask=True, split_special_tokens=True,
                                 verbose=False)
        out = []
        for ids, mask in zip(encoded["input_ids"], encoded["special_tokens_mask"]):
            if len(ids) <= window:
                out.append((tuple(ids), False))
                continue
            lead = next((i for i, m in enumerate(mask) if not m), len(mask))
            trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
            keep = max(window - lead - trail, 1)
            cut = ids[:lead + keep] + (ids[len(ids) - trail:] if trail else [])
            out.append((tuple(cut), True))
        return out


def _resolve_device(device: str, torch: Any) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA GPU "
                             "(is the CPU build of torch installed?)")
    return device


def _resolve_dtype(dtype: str, device: str, torch: Any) -> Any:
    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, dtype)


def _check_local(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{str(path)!r} has no .safetensors weights; only safetensors are loaded (pickled "
            ".bin weights can run code). Convert the checkpoint with save_pretrained(..., "
            "safe_serialization=True)")


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1


def load_checkpoint(ref: str, settings: Settings, device: str, dtype: Any) -> _Checkpoint:
    """Load one checkpoint, turning every failure into a one-line ModelLoadError."""
    import transformers
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    source = source_for(ref)
    local = Path(source).expanduser()
    if local.exists():
        _check_local(local)
        source = str(local)
    elif _looks_like_path(source):
        raise ModelLoadError(f"model path {source!r} does not exist")
    common: dict[str, Any] = {"trust_remote_code": False,
                              "local_files_only": settings.offline or local.exists()}
    if settings.revision and not local.exists():
        common["revision"] = settings.revision
    transformers.utils.logging.disable_progress_bar()
    try:
        config = AutoConfig.from_pretrained(source, **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        model = AutoModelForSeq2SeqLM.from_pretrained(source, config=config, dtype=dtype,
                                                      use_safetensors=True, **common)
    except Exception as error:  # noqa: BLE001 - any failure here means "this model won't load"
        hint = ""
        if settings.offline and not local.exists():
            hint = " (offline: the model must already be in the hub cache, or give a directory)"
        raise ModelLoadError(f"cannot load model {ref!r}: {first_line(error)}{hint}") from error
    model.to(device)
    model.eval()
    manifest = manifest_for(ref, config.model_type, settings.family)
    window = settings.max_input_tokens or manifest.max_input_tokens
    position_limit = getattr(config, "max_encoder_position_embeddings", None) or getattr(
        config, "max_position_embeddings", None)
    relative_positions = config.model_type in ("t5", "mt5", "umt5", "longt5")
    if position_limit and not relative_positions:
        window = min(window, position_limit)
    decoder_limit = getattr(config, "max_decoder_position_embeddings", None) or getattr(
        config, "max_position_embeddings", None)
    # The decoder start token takes one position.
    max_new_tokens = None if relative_positions or not decoder_limit else decoder_limit - 1
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else config.pad_token_id
    if pad_id is None:
        raise ModelLoadError(f"cannot load model {ref!r}: its tokenizer defines no padding token")
    return _Checkpoint(
        ref=ref, model=model, tokenizer=tokenizer, manifest=manifest, window=window,
        summary_prefix=(settings.summary_prefix if settings.summary_prefix is not None
                        else manifest.summary_prefix),
        headline_prefix=(settings.headline_prefix if settings.headline_prefix is not None
                         else manifest.headline_prefix),
        model_type=config.model_type,
        pad_id=pad_id,
        special_ids=frozenset(tokenizer.all_special_ids) | {pad_id},
        max_new_tokens=max_new_tokens,
    )


class TorchEngine:
    name = "torch"

    def __init__(self, settings: Settings) -> None:
        try:
            import torch
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ModelLoadError("torch is not installed; see README 'Install'") from error
        self._torch = torch
        if settings.log_level != "DEBUG":
            import transformers

            transformers.utils.logging.set_verbosity_error()
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.device = _resolve_device(settings.device, torch)
        dtype = _resolve_dtype(settings.dtype, self.device, torch)
        self.summary = load_checkpoint(settings.model, settings, self.device, dtype)
        self.headline = (load_checkpoint(settings.headline_model, settings, self.device, dtype)
                         if settings.headline_model else self.summary)
        limits = [c.max_new_tokens for c in (self.summary, self.headline) if c.max_new_tokens]
        self.max_new_tokens = min(limits) if limits else None
        m = self.summary.manifest
        h = self.headline.manifest
        self.defaults = GenerationParams(
            summary_max_tokens=settings.summary_max_tokens or m.summary_max_tokens,
            summary_min_tokens=settings.summary_min_tokens or m.summary_min_tokens,
            headline_max_tokens=settings.headline_max_tokens or h.headline_max_tokens,
            headline_min_tokens=settings.headline_min_tokens or h.headline_min_tokens,
            num_beams=settings.num_beams or m.num_beams,
            outputs=Outputs.BOTH,
            max_input_tokens=min(self.summary.window, self.headline.window),
        )
        dtype_name = str(dtype).removeprefix("torch.")
        if self.headline is self.summary:
            self.models = [self._describe(self.summary, "summary+headline", dtype_name)]
        else:
            self.models = [self._describe(self.summary, "summary", dtype_name),
                           self._describe(self.headline, "headline", dtype_name)]

    def _describe(self, ckpt: _Checkpoint, role: str, dtype: str) -> ModelDescription:
        return ModelDescription(
            role=role, model_id=ckpt.ref, family=ckpt.manifest.family, model_type=ckpt.model_type,
            max_input_tokens=ckpt.window, summary_prefix=ckpt.summary_prefix,
            headline_prefix=ckpt.headline_prefix, dtype=dtype, device=self.device,
            chunked_headline=ckpt.manifest.chunked_headline)

    # ----- Engine protocol -----
    def prepare(self, texts: Sequence[str], params: GenerationParams) -> list[PreparedArticle]:
        texts = list(texts)
        window = params.max_input_tokens
        summary = headline = None
        if params.outputs.summary:
            summary = self.summary.encode([self.summary.summary_prefix + t for t in texts],
                                          min(window, self.summary.window))
        if params.outputs.headline:
            if summary is not None and self._shares_input():
                headline = summary
            else:
                headline = self.headline.encode([self.headline.headline_prefix + t for t in texts],
                                                min(window, self.headline.window))
        prepared = []
        for i in range(len(texts)):
            s_ids, s_cut = summary[i] if summary else (None, False)
            h_ids, h_cut = headline[i] if headline else (None, False)
            prepared.append(PreparedArticle(
                summary_ids=s_ids, headline_ids=h_ids,
                input_tokens=len(s_ids) if s_ids is not None else len(h_ids or ()),
                truncated=s_cut or h_cut))
        return prepared

    def count_tokens(self, texts: Sequence[str], params: GenerationParams) -> list[int]:
        counts = [0] * len(texts)
        for ckpt, prefix, wanted in ((self.summary, self.summary.summary_prefix,
                                      params.outputs.summary),
                                     (self.headline, self.headline.headline_prefix,
                                      params.outputs.headline)):
            if wanted:
                encoded = ckpt.encode([prefix + t for t in texts], sys.maxsize)
                counts = [max(n, len(ids)) for n, (ids, _) in zip(counts, encoded)]
        return counts

    def _shares_input(self) -> bool:
        return (self.headline is self.summary
                and self.summary.summary_prefix == self.summary.headline_prefix)

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        torch = self._torch
        summaries: list[tuple[str, int]] = [("", 0)] * len(batch)
        headlines: list[tuple[str, int]] = [("", 0)] * len(batch)
        with torch.inference_mode():
            shared = None
            if params.outputs.summary:
                inputs = self._pad(self.summary, [a.summary_ids for a in batch])
                if params.outputs.headline and self._shares_input() and self._can_share_encoder():
                    shared = self.summary.model.get_encoder()(**inputs)
                summaries = self._run(self.summary, inputs, params.summary_min_tokens,
                                      params.summary_max_tokens, params, shared, tidy_summary)
            if params.outputs.headline:
                inputs = self._pad(self.headline, [a.headline_ids for a in batch])
                headlines = self._run(self.headline, inputs, params.headline_min_tokens,
                                      params.headline_max_tokens, params, shared, tidy_headline)
        return [Generated(summary=s, headline=h, summary_tokens=sn, headline_tokens=hn)
                for (s, sn), (h, hn) in zip(summaries, headlines)]

    def warmup(self) -> None:
        params = GenerationParams(
            summary_max_tokens=min(8, self.defaults.summary_max_tokens), summary_min_tokens=0,
            headline_max_tokens=min(8, self.defaults.headline_max_tokens), headline_min_tokens=0,
            num_beams=self.defaults.num_beams, outputs=Outputs.BOTH,
            max_input_tokens=self.defaults.max_input_tokens)
        self.generate(params, self.prepare([WARMUP_TEXT], params))

    # ----- helpers -----
    def _can_share_encoder(self) -> bool:
        return self.summary.model_type != "led"  # LED's encoder needs a global attention mask

    def _pad(self, ckpt: _Checkpoint, rows: Sequence[tuple[int, ...] | None]) -> dict[str, Any]:
        torch = self._torch
        width = max(len(r or ()) for r in rows)
        ids = torch.full((len(rows), width), ckpt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            row = row or ()
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if ckpt.model_type == "led":
            global_mask = torch.zeros_like(mask)
            global_mask[:, 0] = 1
            inputs["global_attention_mask"] = global_mask.to(self.device)
        return inputs

    def _run(self, ckpt: _Checkpoint, inputs: dict[str, Any], min_tokens: int, max_tokens: int,
             params: GenerationParams, encoder_outputs: Any, tidy: Any) -> list[tuple[str, int]]:
        config = copy.deepcopy(ckpt.model.generation_config)
        # The *_new_tokens settings take precedence over a checkpoint's own max/min_length
        # (BART-CNN ships min_length=56, which would otherwise stretch every headline).
        config.max_length = None
        config.min_length = None
        config.max_new_tokens = max_tokens
        config.min_new_tokens = min_tokens
        config.num_beams = params.num_beams
        config.num_return_sequences = 1
        config.do_sample = False
        if params.length_penalty is not None:
            config.length_penalty = params.length_penalty
        if params.no_repeat_ngram_size is not None:
            config.no_repeat_ngram_size = params.no_repeat_ngram_size
        if params.num_beams == 1:
            config.early_stopping = False
            config.length_penalty = 1.0
        kwargs = dict(inputs)
        if encoder_outputs is not None:
            kwargs = {"encoder_outputs": copy.copy(encoder_outputs),
                      "attention_mask": inputs["attention_mask"]}
        sequences = ckpt.model.generate(**kwargs, generation_config=config)
        texts = ckpt.tokenizer.batch_decode(sequences, skip_special_tokens=True)
        counts = [sum(1 for t in row if t not in ckpt.special_ids) for row in sequences.tolist()]
        return [(tidy(text), count) for text, count in zip(texts, counts)]
