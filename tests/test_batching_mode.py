"""`--batching`: what it means for the engine actually loaded (service/engines/choice.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from service.config import Settings
from service.engines.choice import batching_mode
from service.errors import ConfigError

from .fakes import FakeSteppingEngine


def fake(name: str, *, can: bool | None, session: bool = True) -> object:
    engine = SimpleNamespace(name=name, models=[SimpleNamespace(model_type="led")])
    if session:
        engine.open_session = lambda: None
    if can is not None:
        engine.can_step = can
    return engine


@pytest.mark.parametrize(("engine", "setting", "mode"), [
    (fake("torch", can=True), "auto", "continuous"),
    (fake("torch", can=False), "auto", "static"),
    (fake("torch", can=None), "auto", "static"),  # an engine that does not say cannot
    (fake("torch", can=True, session=False), "auto", "static"),
    (fake("ctranslate2", can=None, session=False), "auto", "static"),
    (fake("fake", can=True), "auto", "static"),  # auto means the torch engine
    (fake("fake", can=True), "continuous", "continuous"),
    (fake("torch", can=True), "static", "static"),
])
def test_batching_mode_for_each_engine(engine: object, setting: str, mode: str) -> None:
    assert batching_mode(Settings(batching=setting), engine) == mode


def test_continuous_names_the_engine_and_the_model_type_it_cannot_step() -> None:
    with pytest.raises(ConfigError, match="torch engine cannot batch continuously for led"):
        batching_mode(Settings(batching="continuous"), fake("torch", can=False))


def test_static_batching_is_unchanged_with_a_stepping_engine_under_auto() -> None:
    assert batching_mode(Settings(), FakeSteppingEngine()) == "static"
