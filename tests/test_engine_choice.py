"""`--engine auto` and `--compute-type auto`: CTranslate2 int8 where it supports the model and the
device, torch otherwise, with the reason in one log line."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from service.config import Settings
from service.engines.choice import choose_engine, resolved
from service.api.server import default_engine_factory

pytest.importorskip("ctranslate2")


def settings(model: str, **changes: object) -> Settings:
    return Settings(model=model, device="cpu", offline=True, **changes)


def with_model_type(source: Path, target: Path, model_type: str) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config["model_type"] = model_type
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_auto_picks_ctranslate2_for_the_families_it_is_tested_on(
        family: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"tiny_{family}")
    choice = choose_engine(settings(str(path)))
    assert choice.engine == "ctranslate2"
    assert "supports the model and the cpu" in choice.reason


def test_auto_picks_torch_for_other_model_types_and_says_why(tiny_bart: Path,
                                                             tmp_path: Path) -> None:
    led = with_model_type(tiny_bart, tmp_path / "led", "led")
    choice = choose_engine(settings(str(led)))
    assert choice.engine == "torch" and "is a led model" in choice.reason
    # Either role can force torch: here the headline model.
    both = choose_engine(settings(str(tiny_bart), headline_model=str(led)))
    assert both.engine == "torch" and str(led) in both.reason


def test_auto_picks_torch_on_a_device_ctranslate2_cannot_use(tiny_bart: Path) -> None:
    choice = choose_engine(Settings(model=str(tiny_bart), device="mps"))
    assert choice.engine == "torch" and "cpu and cuda, not mps" in choice.reason


def test_a_manifest_name_is_judged_by_its_family_without_any_download() -> None:
    assert choose_engine(settings("distilbart-cnn-12-6")).engine == "ctranslate2"


def test_an_unreadable_hub_id_falls_back_to_torch(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    choice = choose_engine(settings("some-org/not-in-any-cache"))
    assert choice.engine == "torch" and "could not be read" in choice.reason


def test_explicit_engines_are_left_alone(tiny_bart: Path) -> None:
    for engine in ("torch", "ctranslate2"):
        assert resolved(settings(str(tiny_bart), engine=engine)).engine == engine


def test_the_default_serves_ctranslate2_int8_on_cpu_and_logs_why(
        tiny_bart: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="service.engines.choice")
    engine = default_engine_factory(Settings(model=str(tiny_bart), device="cpu", threads=1,
                                             convert_cache_dir=str(tmp_path / "cache")))
    assert Settings().engine == "auto" and Settings().compute_type == "auto"
    assert engine.name == "ctranslate2" and engine.compute_type == "int8"
    assert engine.models[0].dtype == "int8"
    lines = [r.getMessage() for r in caplog.records if "engine auto" in r.getMessage()]
    assert lines == ["engine auto: ctranslate2 (ctranslate2 supports the model and the cpu)"]
