"""Settings: one object, flags over environment over defaults, and documentation that matches."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from service import config
from service.config import Settings
from service.errors import ConfigError


def parse(*argv: str, environ: dict[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_arguments(parser.parse_args(list(argv)), environ or {})


def test_defaults() -> None:
    settings = parse()
    assert settings.port == 50051 and settings.max_batch_size == 16 and settings.reflection
    assert settings.max_batch_tokens == 2400
    # Near interactive work: static batches hold 4 bulk articles, continuous batching lets 1
    # join per step (two settings since issue 20's measurements: each mode wants its own).
    assert (settings.small_bulk_batch, settings.bulk_joins_per_step) == (4, 1)
    assert settings.paused_share == 0.1


def test_environment_then_flags() -> None:
    env = {"SUMMARIZER_MAX_BATCH_SIZE": "4", "SUMMARIZER_MODEL": "org/model",
           "SUMMARIZER_REFLECTION": "false", "SUMMARIZER_MAX_WAIT_MS": "2.5"}
    settings = parse(environ=env)
    assert (settings.max_batch_size, settings.model, settings.reflection,
            settings.max_wait_ms) == (4, "org/model", False, 2.5)
    settings = parse("--max-batch-size", "16", "--reflection", environ=env)
    assert settings.max_batch_size == 16 and settings.reflection


def test_compute_type_also_answers_to_its_old_name_dtype() -> None:
    assert parse("--compute-type", "int8").compute_type == "int8"
    assert parse("--dtype", "bfloat16").compute_type == "bfloat16"
    assert parse(environ={"SUMMARIZER_DTYPE": "float16"}).compute_type == "float16"
    assert parse("--engine", "ctranslate2",
                 environ={"SUMMARIZER_COMPUTE_TYPE": "int8"}).engine == "ctranslate2"
    assert parse(environ={"SUMMARIZER_COMPUTE_TYPE": "int8"}).compute_type == "int8"


def test_side_ports_take_any_free_port_at_minus_one() -> None:
    assert parse("--metrics-port", "-1", "--health-port", "-1").metrics_port == -1
    assert parse(environ={"SUMMARIZER_HEALTH_PORT": "-1"}).health_port == -1


def test_hf_hub_offline_turns_offline_on() -> None:
    assert parse(environ={"HF_HUB_OFFLINE": "1"}).offline
    assert not parse(environ={"HF_HUB_OFFLINE": "1", "SUMMARIZER_OFFLINE": "0"}).offline


@pytest.mark.parametrize(("env", "message"), [
    ({"SUMMARIZER_PORT": "http"}, "SUMMARIZER_PORT: cannot read 'http' as int"),
    ({"SUMMARIZER_WARMUP": "maybe"}, "SUMMARIZER_WARMUP: cannot read 'maybe' as bool"),
    ({"SUMMARIZER_MAX_BATCH_SIZE": "0"}, "max_batch_size must be at least 1"),
    ({"SUMMARIZER_DTYPE": "int3"}, "compute_type must be one of"),
    ({"SUMMARIZER_ENGINE": "onnx"}, "engine must be one of"),
    ({"SUMMARIZER_MAX_WAIT_MS": "-1"}, "must be finite and not negative"),
    ({"SUMMARIZER_MAX_WAIT_MS": "inf"}, "must be finite and not negative"),
    ({"SUMMARIZER_GRACE_PERIOD_S": "nan"}, "must be finite and not negative"),
    ({"SUMMARIZER_MAX_QUEUE": "8"}, r"max_articles_per_request \(256\) must not exceed max_queue"),
    ({"SUMMARIZER_MAX_INPUT_TOKENS": "4"}, "max_input_tokens must be 0 or at least 16"),
    ({"SUMMARIZER_METRICS_PORT": "-2"}, r"metrics_port must be a port, 0 \(off\) or -1"),
    ({"SUMMARIZER_PORT": "-1"}, "port must not be negative"),
    ({"SUMMARIZER_PAUSED_SHARE": "0"}, "paused_share must be more than 0 and at most 1"),
    ({"SUMMARIZER_BULK_JOINS_PER_STEP": "-1"}, "bulk_joins_per_step must not be negative"),
])
def test_bad_values_are_reported_by_name(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.load(environ=env)


def test_documented_configuration_table_matches_the_settings() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    assert config.markdown_table() in page, (
        "docs/configuration.md's table is stale: paste the output of "
        "`python -c 'from service.config import markdown_table; print(markdown_table())'`")
