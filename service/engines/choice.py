"""`--engine auto` and `--compute-type auto`: the fast path unless the model or device needs torch.

CTranslate2 int8 measured 8-10x the naive transformers loop on a 2-core CPU, torch float32 1.4-2.5x
(docs/performance.md), in a third of the memory; so auto picks CTranslate2 wherever it supports
the checkpoint's model type and the device, else torch, and says why in one log line. The choice
needs the model type before anything loads: a directory's config.json, a named manifest's family,
or a hub id's config.json (one small file, from the hub cache when offline).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..config import Settings
from ..errors import ConfigError
from .convert import is_converted
from .manifests import lookup, source_for

log = logging.getLogger(__name__)

CT2_MODEL_TYPES = frozenset({"bart", "pegasus", "t5"})
"""Model types this project converts and tests with CTranslate2 (token-exact against torch at
float32); others (LED, LongT5, mBART, mT5, ...) stay on torch under auto."""
CT2_CPU_COMPUTE_TYPE = "int8"
"""The fastest CTranslate2 type measured on these CPUs (int8 weights, VNNI where present)."""
CT2_GPU_COMPUTE_TYPE = "float16"
"""CTranslate2's usual GPU type. Not measured here: no GPU was available to this project."""


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    reason: str


def _model_type(ref: str, settings: Settings) -> str | None:
    """The checkpoint's model type without loading it, or None when it cannot be read."""
    location = source_for(ref)
    directory = Path(location).expanduser()
    if directory.is_dir():
        try:
            return json.loads((directory / "config.json").read_text(encoding="utf-8")).get(
                "model_type")
        except (OSError, ValueError):
            return None
    named = lookup(ref)
    if named is not None:
        return named["family"]
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(location, "config.json", revision=settings.revision or None,
                               local_files_only=settings.offline)
        return json.loads(Path(path).read_text(encoding="utf-8")).get("model_type")
    except Exception:  # noqa: BLE001 - any failure: unknown, and the torch engine reports it
        return None


def _ct2_device(settings: Settings) -> tuple[str | None, str]:
    """The device kind CTranslate2 would run on, or None with the reason it cannot."""
    try:
        import ctranslate2
    except ImportError:
        return None, "ctranslate2 is not installed"
    kind = settings.device.partition(":")[0]
    if kind == "auto":
        kind = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if kind not in ("cpu", "cuda"):
        return None, f"ctranslate2 runs on cpu and cuda, not {settings.device}"
    if kind == "cuda" and ctranslate2.get_cuda_device_count() == 0:
        return None, "ctranslate2 sees no CUDA GPU"
    return kind, ""


def choose_engine(settings: Settings) -> EngineChoice:
    """The engine for `settings.engine == "auto"`, with the reason."""
    device, problem = _ct2_device(settings)
    if device is None:
        return EngineChoice("torch", problem)
    refs = [settings.model] + ([settings.headline_model] if settings.headline_model else [])
    for ref in refs:
        if is_converted(source_for(ref)):
            continue
        model_type = _model_type(ref, settings)
        if model_type is None:
            return EngineChoice("torch", f"the model type of {ref!r} could not be read before "
                                         "loading")
        if model_type not in CT2_MODEL_TYPES:
            return EngineChoice("torch", f"{ref!r} is a {model_type} model; ctranslate2 is used "
                                         f"for {', '.join(sorted(CT2_MODEL_TYPES))}")
    if settings.compute_type != "auto":
        import ctranslate2

        if settings.compute_type not in ctranslate2.get_supported_compute_types(device):
            return EngineChoice("torch", f"ctranslate2 has no {settings.compute_type} on this "
                                         f"{device}")
    return EngineChoice("ctranslate2", f"ctranslate2 supports the model and the {device}")


def resolved(settings: Settings) -> Settings:
    """`settings` with `engine` decided (auto resolved, logged in one line)."""
    if settings.engine != "auto":
        return settings
    choice = choose_engine(settings)
    log.info("engine auto: %s (%s)", choice.engine, choice.reason)
    return settings.replace(engine=choice.engine)


def ct2_compute_type(device_kind: str) -> str:
    """What `--compute-type auto` means for CTranslate2 on a device kind."""
    return CT2_CPU_COMPUTE_TYPE if device_kind == "cpu" else CT2_GPU_COMPUTE_TYPE


def main(argv: list[str] | None = None) -> int:
    """`python -m service.engines.choice MODEL`: print what auto picks and why; exit 0 for
    ctranslate2, 1 for torch (the Dockerfile converts at build time only when it is 0)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m service.engines.choice MODEL", file=sys.stderr)
        return 2
    choice = choose_engine(Settings.load({"model": args[0]}))
    print(f"{choice.engine}: {choice.reason}")
    return 0 if choice.engine == "ctranslate2" else 1


if __name__ == "__main__":
    raise SystemExit(main())


def can_step(engine: object) -> bool:
    """Whether `engine` can batch continuously: it opens decoding sessions and says it can step
    its model type (`can_step`; an engine that does not say cannot)."""
    return callable(getattr(engine, "open_session", None)) and bool(
        getattr(engine, "can_step", False))


def batching_mode(settings: Settings, engine: object) -> str:
    """What `--batching` means for the engine actually loaded: "static" or "continuous".

    auto is continuous for the torch engine when it can step the model (see `can_step`), static
    otherwise; continuous with an engine that cannot step is a ConfigError naming the engine and
    the model type."""
    if settings.batching == "static":
        return "static"
    stepping = can_step(engine)
    if settings.batching == "continuous":
        if not stepping:
            name = getattr(engine, "name", "") or type(engine).__name__
            types = ", ".join(sorted({m.model_type for m in getattr(engine, "models", ())}))
            raise ConfigError(
                f"--batching continuous: the {name} engine cannot batch continuously for "
                f"{types or 'this'} models; use --batching static (or auto), or --engine torch "
                "where it supports the model type")
        return "continuous"
    mode = "continuous" if stepping and getattr(engine, "name", "") == "torch" else "static"
    log.info("batching auto: %s", mode)
    return mode
