"""Building an engine from the settings: the one place that knows which class serves which
`--engine` (after `auto` is decided)."""

from __future__ import annotations

from ..config import Settings
from .choice import resolved
from .protocol import Engine


def build_engine(settings: Settings, *, weights: bool = True) -> Engine:
    """The engine `settings` ask for (or `auto` chooses), loaded: ready to serve; without its
    weights when not `weights` (tokenizers and defaults only, see CheckpointEngine.load).
    Engines are imported only here, when a model is loaded (ctranslate2 never imports torch)."""
    settings = resolved(settings)
    if settings.engine == "ctranslate2":
        from .ct2_engine import CTranslate2Engine

        return CTranslate2Engine(settings).load(weights=weights)
    from .torch_engine import TorchEngine

    return TorchEngine(settings).load(weights=weights)
