"""The benchmark checkpoint whose summaries end at varied lengths (for continuous batching)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.config import Settings
from service.domain import Limits, Outputs, RequestedOptions, resolve_options
from service.engines.tiny import (VARIED_LENGTHS_FILE, build_varied_length_checkpoint,
                                  calibrate_eos_bias, eos_gaps, greedy_lengths)
from service.engines.torch_engine import TorchEngine

TEXTS = [
    "The city council said on monday that new bus routes would open in march.",
    "Storm flooding homes residents school children teachers health doctors patients " * 3,
    "The government election voters president talks week year report market prices fell.",
    "Team season match won lost goal coach players fans stadium.",
]


def test_the_end_of_sequence_bias_ends_greedy_summaries_where_the_calibration_predicts(
        tiny_bart: Path, tmp_path: Path) -> None:
    gaps = eos_gaps(tiny_bart, TEXTS, max_new_tokens=24, no_repeat_ngram_size=3)
    bias = calibrate_eos_bias(gaps, 4, 24, target_median=14)
    predicted = greedy_lengths(gaps, bias, 4, 24)
    out = build_varied_length_checkpoint(tmp_path / "varied", tiny_bart, min_new_tokens=4,
                                         max_new_tokens=24, bias=bias)
    assert json.loads((out / VARIED_LENGTHS_FILE).read_text())["eos_bias"] == bias
    # The directory is a checkpoint the server loads, and the bias does what was predicted.
    engine = TorchEngine(Settings(model=str(out), threads=1)).load()
    params = resolve_options(RequestedOptions(
        summary_max_tokens=24, summary_min_tokens=4, num_beams=1, no_repeat_ngram_size=3,
        outputs=Outputs.SUMMARY), engine.defaults, Limits(max_num_beams=8, max_new_tokens=512))
    results = engine.generate(params, engine.prepare(TEXTS, params))
    assert [r.summary_tokens for r in results] == predicted


def test_calibration_aims_the_median_and_refuses_models_without_a_logits_bias(
        tiny_bart: Path, tiny_t5: Path, tmp_path: Path) -> None:
    out = build_varied_length_checkpoint(tmp_path / "varied", tiny_bart, min_new_tokens=4,
                                         max_new_tokens=24, calibration_texts=4)
    record = json.loads((out / VARIED_LENGTHS_FILE).read_text())
    lengths = record["calibration_greedy_lengths"]
    assert all(4 <= n <= 24 for n in lengths)
    assert lengths[len(lengths) // 2] <= 14 < 24  # the median aimed at: the middle of 4-24
    with pytest.raises(ValueError, match="final_logits_bias"):
        build_varied_length_checkpoint(tmp_path / "t5", tiny_t5, bias=1.0)
