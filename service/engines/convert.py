"""Convert a Hugging Face checkpoint for the CTranslate2 engine, once.

A converted directory holds the checkpoint's Hugging Face side (config, generation config,
tokenizer files, the `summarizer fetch` marker) at the top, so it loads like any checkpoint
directory, and the CTranslate2 model in `ctranslate2/`, with `summarizer-ct2.json` saying what it
was converted from. `summarizer convert` writes one ahead of time (for a Docker build);
`--engine ctranslate2` given a plain checkpoint converts it into a cache directory keyed by the
checkpoint and the compute type, and reuses it afterwards.

CTranslate2's converter predates some `transformers` changes; `_converter_class` fills the gaps
instead of pinning `transformers` back: BART and PEGASUS configs no longer carry `normalize_before`
(and PEGASUS not `normalize_embedding`), T5 v1.1 / FLAN-T5 moved "untied embeddings" to
`scale_decoder_outputs`, and a model vocabulary larger than the tokenizer's (common: rows padded
for speed) is padded with placeholder tokens.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .checkpoint import Source
from ..errors import ModelLoadError, first_line
from .manifests import MARKER_FILE, write_marker
from .tokenizer import SIDE_FILE, write_side_file

log = logging.getLogger(__name__)

CT2_DIR = "ctranslate2"
CT2_MARKER = "summarizer-ct2.json"
DEFAULT_CACHE_DIR = "~/.cache/summarizer/ctranslate2"
HF_SIDE_SUFFIXES = (".json", ".model", ".txt", ".tiktoken")
"""Files copied next to the CTranslate2 model: configs and tokenizer files, never weights."""
QUANTIZATION = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16",
                "int8": "int8"}
_CONFIG_PATCHES: dict[str, dict[str, Any]] = {
    "bart": {"normalize_before": False},
    "mbart": {"normalize_before": True},
    "pegasus": {"normalize_before": True, "normalize_embedding": False},
}
"""Config attributes CTranslate2's loaders read that current `transformers` configs lack."""
PLACEHOLDER_TOKEN = "<summarizer_unused_{}>"


def is_converted(path: str | Path) -> bool:
    return (Path(path).expanduser() / CT2_DIR / "model.bin").is_file()


def _fingerprint(source: Source, revision: str) -> str:
    """What identifies a checkpoint: its location, and for a directory its files' sizes and times
    (a checkpoint rewritten in place gets a new cache entry); for a hub id, the revision."""
    parts: list[str] = [source.location, revision]
    if source.local:
        for path in sorted(Path(source.location).iterdir()):
            if path.is_file():
                stat = path.stat()
                parts.append(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def cache_path(cache_dir: str, source: Source, revision: str, compute_type: str) -> Path:
    """The cache directory for one checkpoint at one compute type."""
    import ctranslate2

    name = Path(source.location.rstrip("/")).name or "model"
    key = _fingerprint(source, revision + "@ct2-" + ctranslate2.__version__)
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{name}-{key}-{compute_type}"


def _converter_class() -> type:
    """CTranslate2's converter with the gaps filled (a function: ctranslate2 is optional)."""
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        local_files_only = False

        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            config = kwargs["config"]
            for name, value in _CONFIG_PATCHES.get(config.model_type, {}).items():
                if not hasattr(config, name):
                    setattr(config, name, value)
            kwargs.update(use_safetensors=True, trust_remote_code=False,
                          local_files_only=self.local_files_only)
            model = model_class.from_pretrained(model_name_or_path, **kwargs)
            if hasattr(model.config, "scale_decoder_outputs"):
                # transformers 5 says "scale the outputs (embeddings tied)" here; CTranslate2
                # reads tie_word_embeddings and would otherwise scale untied (FLAN-T5) outputs.
                model.config.tie_word_embeddings = model.config.scale_decoder_outputs
            self.model_vocab_size = model.config.vocab_size
            return model

        def load_tokenizer(self, tokenizer_class: Any, model_name_or_path: str,
                           **kwargs: Any) -> Any:
            tokenizer = tokenizer_class.from_pretrained(
                model_name_or_path, local_files_only=self.local_files_only, **kwargs)
            return _PaddedVocabulary(tokenizer, self.model_vocab_size)

    return Converter


class _PaddedVocabulary:
    """A tokenizer whose vocabulary is padded with placeholders to the model's output size, so
    that every output row of the model has a token (CTranslate2 sizes its layers by it)."""

    def __init__(self, tokenizer: Any, size: int) -> None:
        self._tokenizer = tokenizer
        self._size = size

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def get_vocab(self) -> dict[str, int]:
        vocab = dict(self._tokenizer.get_vocab())
        taken = set(vocab.values())
        for index in range(self._size):
            if index not in taken:
                vocab[PLACEHOLDER_TOKEN.format(index)] = index
        return vocab


def convert(source: Source, out: str | Path, compute_type: str, revision: str = "") -> Path:
    """Write a converted directory for `source` at `out` (atomically: complete or absent)."""
    try:
        import ctranslate2  # noqa: F401
    except ImportError as error:
        raise ModelLoadError("the ctranslate2 engine needs the ctranslate2 package: "
                             "pip install ctranslate2") from error
    _check_conversion_tools(source)
    out = Path(out).expanduser()
    with staged(out) as staging:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        converter = _converter_class()(source.location, revision=revision or None)
        converter.local_files_only = bool(source.options.get("local_files_only"))
        try:
            converter.convert(str(staging / CT2_DIR), quantization=QUANTIZATION[compute_type],
                              force=True)
        except Exception as error:  # noqa: BLE001 - any failure means "cannot convert"
            raise ModelLoadError(f"cannot convert {source.ref!r} for ctranslate2: "
                                 f"{first_line(error)}") from error
        _copy_hf_side(source, staging, revision)
        write_side_file(staging)
        (staging / CT2_MARKER).write_text(json.dumps({
            "source": source.ref, "compute_type": compute_type,
            "ctranslate2": ctranslate2.__version__}) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A staging directory beside `out` for a conversion to write; when the block completes it
    becomes `out` (replacing an older one), and when the block raises it is removed: `out`
    appears complete or not at all. The ctranslate2 and torch int8 conversions both use it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_conversion_tools(source: Source) -> None:
    """Converting reads the checkpoint with torch and transformers. An installation that serves
    converted models only (the image built with ENGINE=ctranslate2) has neither: say so, and
    what to do, instead of failing inside the converter."""
    import importlib.util

    missing = [name for name in ("torch", "transformers") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"cannot convert {source.ref!r} for ctranslate2: converting needs "
            f"{' and '.join(missing)}, which this installation leaves out (the container image "
            "built with ENGINE=ctranslate2 serves converted models only). Convert it once where "
            "they are installed (`summarizer convert DIR --in-place`) and serve that directory, "
            "or build the image with --build-arg ENGINE=torch")


def convert_in_place(source: Source, compute_type: str) -> Path:
    """Add the CTranslate2 model (and the side file) to a local checkpoint directory: it then
    loads as a converted directory with `--engine ctranslate2` and as a checkpoint with torch."""
    directory = Path(source.location)
    staging = Path(tempfile.mkdtemp(prefix=".convert.", dir=directory.parent))
    try:
        converted = convert(source, staging / "out", compute_type)
        for name in (CT2_DIR, CT2_MARKER, SIDE_FILE):
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            if (converted / name).exists():
                shutil.move(str(converted / name), str(target))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _copy_hf_side(source: Source, out: Path, revision: str) -> None:
    if source.local:
        for path in Path(source.location).iterdir():
            if path.is_file() and path.suffix in HF_SIDE_SUFFIXES:
                shutil.copy2(path, out / path.name)
        return
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    options = dict(source.options, **({"revision": revision} if revision else {}))
    AutoConfig.from_pretrained(source.location, **options).save_pretrained(out)
    AutoTokenizer.from_pretrained(source.location, **options).save_pretrained(out)
    try:
        GenerationConfig.from_pretrained(source.location, **options).save_pretrained(out)
    except OSError:  # the checkpoint has no generation_config.json
        pass
    if not (out / MARKER_FILE).exists():
        write_marker(out, source.location)


def _writable(directory: Path) -> bool:
    """Whether a conversion could be written under `directory` (created if need be)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK | os.X_OK)


def cache_candidates(cache_dir: str) -> list[str]:
    """Where converted checkpoints may live, in the order tried: the one given; else
    ~/.cache/summarizer/ctranslate2, then one under the temporary directory (a container's home
    is often on a read-only root filesystem while /tmp is a writable volume)."""
    if cache_dir:
        return [cache_dir]
    return [DEFAULT_CACHE_DIR, str(Path(tempfile.gettempdir()) / "summarizer-ctranslate2")]


def convert_into_cache(source: Source, cache_dir: str, entry: str, what: str,
                       command: Callable[[Path], list[str]],
                       converted: Callable[[Path], bool], remedies: str) -> Path:
    """The cache entry `entry` of a one-time conversion of `source` (`what`: "for ctranslate2",
    "to int8"): one already converted under any of `cache_candidates`, else one under the first
    that can be written, made by running `command(target)` in a child process (so that the
    float32 weights it loads never stay in the server's memory). Where nothing can be written,
    the error names --convert-cache-dir and `remedies`."""
    targets = [Path(base).expanduser() / entry for base in cache_candidates(cache_dir)]
    for target in targets:
        if converted(target):
            return target
    writable = [target for target in targets if _writable(target.parent)]
    if not writable:
        tried = ", ".join(str(target.parent) for target in targets)
        raise ModelLoadError(
            f"cannot convert {source.ref!r} {what}: no writable cache directory "
            f"(tried {tried}). Give a writable one with --convert-cache-dir "
            f"(SUMMARIZER_CONVERT_CACHE_DIR), {remedies}")
    target = writable[0]
    log.info("converting %s %s into %s, once", source.ref, what, target)
    done = subprocess.run(command(target), capture_output=True, text=True, check=False)
    if done.returncode != 0 or not converted(target):
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelLoadError(f"cannot convert {source.ref!r} {what}: {detail}")
    return target


def converted_for(source: Source, compute_type: str, cache_dir: str, revision: str = "") -> Path:
    """A converted directory for `source`: itself if pre-converted, else the cache entry,
    converting into it first if needed (`convert_into_cache`)."""
    if source.local and is_converted(source.location):
        return Path(source.location)

    def command(target: Path) -> list[str]:
        args = [sys.executable, "-m", "service", "convert", source.location, "--out",
                str(target), "--compute-type", compute_type]
        if revision:
            args += ["--revision", revision]
        if source.options.get("local_files_only"):
            args.append("--offline")
        return args

    return convert_into_cache(
        source, cache_dir, cache_path("", source, revision, compute_type).name,
        "for ctranslate2", command, is_converted,
        "convert ahead of time with `summarizer convert MODEL --in-place` (or --out DIR, then "
        "serve that directory), or serve without conversion with --engine torch")
