"""What every engine for Hugging Face checkpoints shares: the tokenizer side of a checkpoint.

Finding a checkpoint (directory, hub id or manifest name), its config, tokenizer and manifest
defaults, the input window, tokenising articles and decoding outputs: the torch and CTranslate2
engines differ only in the model that turns input ids into output ids, so all of this lives here
and both engines derive from `CheckpointEngine`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from ..config import Settings
from ..domain import Generated, GenerationParams, Outputs, PreparedArticle
from .protocol import WARMUP_TEXT, ModelDescription
from ..errors import ModelLoadError, first_line
from .manifests import Manifest, manifest_for, source_for, unknown_name
from .tokenizer import GENERATION_KEYS, HFTokenizer, SideFile, TextTokenizer, encode_for_window

log = logging.getLogger(__name__)

RELATIVE_POSITION_TYPES = ("t5", "mt5", "umt5", "longt5")


@dataclass(frozen=True)
class Source:
    """Where a checkpoint comes from and how to ask `from_pretrained` for it."""

    ref: str
    """As the user gave it (a manifest name, hub id or directory)."""
    location: str
    """A directory or a hub id, as `from_pretrained` takes it."""
    local: bool
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments for every `from_pretrained` call (offline, revision, no remote code)."""


@dataclass
class Checkpoint:
    """One checkpoint's tokenizer and defaults; `model` is whatever the engine runs."""

    ref: str
    config: Any
    """transformers' config, or for a converted directory served without transformers the
    dict of the values the engine reads."""
    tokenizer: TextTokenizer
    manifest: Manifest
    window: int
    summary_prefix: str
    headline_prefix: str
    model_type: str
    pad_id: int
    special_ids: frozenset[int]
    max_new_tokens: int | None
    model: Any = None
    generation: dict[str, Any] = field(default_factory=dict)
    """The generation-config values the engines read (tokenizer.GENERATION_KEYS)."""

    def encode(self, texts: list[str], window: int) -> list[tuple[tuple[int, ...], bool]]:
        """Token ids per text, cut to `window` while keeping the special tokens at both ends."""
        if not texts:
            return []  # the tokenizer refuses an empty batch
        out = []
        encoded = (self.tokenizer.encode_batch(texts) if window == sys.maxsize
                   else encode_for_window(self.tokenizer, texts, window))
        for ids, mask in encoded:
            if len(ids) <= window:
                out.append((tuple(ids), False))
                continue
            lead = next((i for i, m in enumerate(mask) if not m), len(mask))
            trail = next((i for i, m in enumerate(reversed(mask)) if not m), 0)
            keep = max(window - lead - trail, 1)
            cut = ids[:lead + keep] + (ids[len(ids) - trail:] if trail else [])
            out.append((tuple(cut), True))
        return out

    def decode(self, rows: Sequence[Sequence[int]], tidy: Callable[[str], str]
               ) -> list[tuple[str, int]]:
        """Text and number of text tokens (special tokens not counted) per row of output ids."""
        texts = self.tokenizer.decode_batch(rows)
        counts = [sum(1 for t in row if t not in self.special_ids) for row in rows]
        return [(tidy(text), count) for text, count in zip(texts, counts)]


def _check_local(path: Path, weights: bool) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{str(path)!r} is not a Hugging Face checkpoint (no config.json)")
    if weights and not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"{str(path)!r} has no .safetensors weights; only safetensors are loaded (pickled "
            ".bin weights can run code). Convert the checkpoint with save_pretrained(..., "
            "safe_serialization=True)")


def looks_like_path(ref: str) -> bool:
    """A model reference names a local path (and is never taken for a hub id or manifest name)
    when it starts with /, ./, ../ or ~, is . or .., has more than one '/', or its part before a
    single '/' is an existing directory (models/tiny, with ./models present)."""
    if ref in (".", "..") or ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1:
        return True
    head, slash, _ = ref.partition("/")
    return bool(slash) and Path(head).expanduser().is_dir()


def _missing_path(location: str) -> ModelLoadError:
    import difflib

    path = Path(location).expanduser()
    hint = ""
    if path.parent.is_dir():
        siblings = [p.name for p in path.parent.iterdir() if p.is_dir()]
        close = difflib.get_close_matches(path.name, siblings, n=2)
        if close:
            hint = " (did you mean " + " or ".join(str(path.parent / c) for c in close) + "?)"
    return ModelLoadError(f"model path {location!r} does not exist{hint}; give a checkpoint "
                          "directory, or make a test one with `summarizer make-tiny-model DIR`")


def resolve_source(ref: str, settings: Settings, *, weights: bool = True) -> Source:
    """Where to load `ref` from; `weights`: a local directory must hold safetensors weights.

    Fails at once, with what to do, for a path that does not exist, a single name that is no
    manifest name (a misspelt one: hub ids are ORG/NAME; a legacy single-name hub id is accepted
    only from the hub cache), and a hub id when the hub cannot be reached and the hub cache does
    not hold it."""
    from .fetch import hub_unreachable, in_hub_cache, offline_help

    location = source_for(ref)
    local = Path(location).expanduser()
    if local.exists():
        _check_local(local, weights)
        location = str(local)
    elif looks_like_path(location):
        raise _missing_path(location)
    elif "/" not in location and not in_hub_cache(location, settings.revision):
        raise ModelLoadError(unknown_name(ref))
    offline = settings.offline or local.exists()
    if settings.offline and not local.exists() and not in_hub_cache(location, settings.revision):
        raise ModelLoadError(f"cannot load model {ref!r}: offline, and the hub cache does not "
                             f"hold {location}; give a checkpoint directory (--model DIR, e.g. "
                             f"made with `summarizer fetch {ref} --out DIR` where the hub can be "
                             "reached), or a test one from `summarizer make-tiny-model DIR`")
    if not offline:
        unreachable = hub_unreachable()
        if unreachable and in_hub_cache(location, settings.revision):
            log.warning("the model hub cannot be reached (%s); loading %s from the hub cache",
                        unreachable, location)
            offline = True
        elif unreachable:
            raise ModelLoadError(f"cannot download model {ref!r}: cannot reach the model hub "
                                 f"({unreachable}); {offline_help(ref)}")
    options: dict[str, Any] = {"trust_remote_code": False, "local_files_only": offline}
    if settings.revision and not local.exists():
        options["revision"] = settings.revision
    return Source(ref=ref, location=location, local=local.exists(), options=options)


def check_model_refs(settings: Settings) -> None:
    """Resolve the summary and headline models without loading them, so that a missing path,
    a misspelt name or an unreachable hub is reported before the server binds its port."""
    for ref in (settings.model, settings.headline_model):
        if ref:
            resolve_source(ref, settings, weights=False)


def load_failure(source: Source, settings: Settings, error: BaseException) -> ModelLoadError:
    hint = ""
    if settings.offline and not source.local:
        hint = " (offline: the model must already be in the hub cache, or give a directory)"
    return ModelLoadError(f"cannot load model {source.ref!r}: {first_line(error)}{hint}")


def load_checkpoint(source: Source, settings: Settings) -> Checkpoint:
    """Config, tokenizer and defaults of a checkpoint (not its weights); one-line errors."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    if settings.log_level != "DEBUG":
        transformers.utils.logging.set_verbosity_error()
    try:
        config = AutoConfig.from_pretrained(source.location, **source.options)
        tokenizer = AutoTokenizer.from_pretrained(source.location, **source.options)
    except Exception as error:  # noqa: BLE001 - any failure here means "this model won't load"
        raise load_failure(source, settings, error) from error
    values = {key: getattr(config, key, None) for key in (
        "model_type", "pad_token_id", "max_position_embeddings",
        "max_encoder_position_embeddings", "max_decoder_position_embeddings")}
    ckpt = _checkpoint(source.ref, config, values, HFTokenizer(tokenizer), settings)
    ckpt.generation = _generation_defaults(source, config)
    return ckpt


def _generation_defaults(source: Source, config: Any) -> dict[str, Any]:
    """The checkpoint's generation config values (GENERATION_KEYS): its generation_config.json,
    else what transformers derives from its config."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(source.location, **source.options)
    except Exception:  # noqa: BLE001 - none, or unreadable: what the config implies
        generation = GenerationConfig.from_model_config(config)
    return {key: getattr(generation, key, None) for key in GENERATION_KEYS}


def load_converted_checkpoint(ref: str, side: SideFile, settings: Settings) -> Checkpoint:
    """A converted directory's tokenizer and defaults from its side file: no transformers."""
    ckpt = _checkpoint(ref, side.config, side.config, side.tokenizer, settings)
    ckpt.generation = dict(side.generation)
    return ckpt


def _checkpoint(ref: str, config: Any, values: dict[str, Any], tokenizer: TextTokenizer,
                settings: Settings) -> Checkpoint:
    model_type = values["model_type"]
    manifest = manifest_for(ref, model_type, settings.family)
    window = settings.max_input_tokens or manifest.max_input_tokens
    position_limit = (values.get("max_encoder_position_embeddings")
                      or values.get("max_position_embeddings"))
    relative_positions = model_type in RELATIVE_POSITION_TYPES
    if position_limit and not relative_positions:
        window = min(window, position_limit)
    decoder_limit = (values.get("max_decoder_position_embeddings")
                     or values.get("max_position_embeddings"))
    # The decoder start token takes one position.
    max_new_tokens = None if relative_positions or not decoder_limit else decoder_limit - 1
    pad_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else values.get("pad_token_id"))
    if pad_id is None:
        raise ModelLoadError(f"cannot load model {ref!r}: its tokenizer defines no "
                             "padding token")
    return Checkpoint(
        ref=ref, config=config, tokenizer=tokenizer, manifest=manifest, window=window,
        summary_prefix=(settings.summary_prefix if settings.summary_prefix is not None
                        else manifest.summary_prefix),
        headline_prefix=(settings.headline_prefix if settings.headline_prefix is not None
                         else manifest.headline_prefix),
        model_type=model_type,
        pad_id=pad_id,
        special_ids=tokenizer.special_ids | {pad_id},
        max_new_tokens=max_new_tokens,
    )


def _optional(kind: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else kind(value)


class CheckpointEngine:
    """The Engine protocol's shared half: loading both roles, defaults, `prepare`, `warmup`.

    Built in two steps: the constructor only takes the settings and decides the device and
    compute type (cheap; it fails early on impossible ones), `load()` loads the checkpoints and
    models. A subclass sets `name`, `device` and `compute_type` in its constructor and implements
    `_load_model` (one checkpoint with its model) and `generate`."""

    name = ""
    device = "cpu"
    compute_type = ""

    # Set by load().
    summary: Checkpoint
    headline: Checkpoint
    max_new_tokens: int | None
    defaults: GenerationParams
    models: list[ModelDescription]

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loaded = False

    def load(self, *, weights: bool = True) -> Self:
        """Load the summary model (and the headline model, when separate); returns the engine,
        so that `TorchEngine(settings).load()` is a ready engine. Once only.

        `weights=False` loads everything but the model weights: tokenizers, defaults and
        descriptions, what the server process needs when the models run in worker processes
        (it prepares inputs and decodes nothing; `generate` is the workers')."""
        if self.loaded:
            raise RuntimeError(f"{type(self).__name__} is already loaded")
        settings = self.settings
        self.summary = self._load_model(settings.model, weights=weights)
        self.headline = (self._load_model(settings.headline_model, weights=weights)
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
        if self.headline is self.summary:
            self.models = [self._describe(self.summary, "summary+headline")]
        else:
            self.models = [self._describe(self.summary, "summary"),
                           self._describe(self.headline, "headline")]
        self.loaded = True
        return self

    def _load_model(self, ref: str, *, weights: bool = True) -> Checkpoint:
        """One checkpoint (`ref`: directory, hub id or manifest name) with its model (without it
        when not `weights`)."""
        raise NotImplementedError

    def _describe(self, ckpt: Checkpoint, role: str) -> ModelDescription:
        return ModelDescription(
            role=role, model_id=ckpt.ref, family=ckpt.manifest.family, model_type=ckpt.model_type,
            max_input_tokens=ckpt.window, summary_prefix=ckpt.summary_prefix,
            headline_prefix=ckpt.headline_prefix, dtype=self.compute_type, device=self.device,
            chunked_headline=ckpt.manifest.chunked_headline,
            length_penalty=_optional(float, ckpt.generation.get("length_penalty")),
            no_repeat_ngram_size=_optional(int, ckpt.generation.get("no_repeat_ngram_size")))

    def prepare(self, texts: Sequence[str], params: GenerationParams) -> list[PreparedArticle]:
        texts = list(texts)
        window = params.max_input_tokens
        summary = headline = None
        if params.outputs.summary:
            summary = self.summary.encode([self.summary.summary_prefix + t for t in texts],
                                          min(window, self.summary.window))
        if params.outputs.headline:
            if summary is not None and self.shares_input():
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

    def shares_input(self) -> bool:
        """One checkpoint reads the same input for both outputs (it can be encoded once)."""
        return (self.headline is self.summary
                and self.summary.summary_prefix == self.summary.headline_prefix)

    def generate(self, params: GenerationParams,
                 batch: Sequence[PreparedArticle]) -> list[Generated]:
        raise NotImplementedError

    def warmup(self) -> None:
        params = self.warmup_params()
        self.generate(params, self.prepare([WARMUP_TEXT], params))

    def warmup_params(self) -> GenerationParams:
        """A small generation with the default beams: both outputs, at most 8 tokens each."""
        return GenerationParams(
            summary_max_tokens=min(8, self.defaults.summary_max_tokens), summary_min_tokens=0,
            headline_max_tokens=min(8, self.defaults.headline_max_tokens), headline_min_tokens=0,
            num_beams=self.defaults.num_beams, outputs=Outputs.BOTH,
            max_input_tokens=self.defaults.max_input_tokens)
