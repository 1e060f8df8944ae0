"""The benchmark checkpoint whose summaries end at varied lengths (for continuous batching)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.config import Settings
from service.domain import Limits, Outputs, RequestedOptions, resolve_options
from service.engines.tiny import (VARIED_LENGTHS_FILE, build_varied_length_checkpoint,
                                  calibrate_eos_bias, distance_from_uniform, eos_gaps,
                                  greedy_lengths)
from service.engines.torch_engine import TorchEngine

TEXTS = [
    "The city council said on monday that new bus routes would open in march.",
    "Storm flooding homes residents school children teachers health doctors patients " * 3,
    "The government election voters president talks week year report market prices fell.",
    "Team season match won lost goal coach players fans stadium.",
]


def test_the_end_of_sequence_bias_ends_greedy_summaries_where_the_calibration_predicts(
        tiny_bart: Path, tmp_path: Path) -> None:
    out = build_varied_length_checkpoint(tmp_path / "varied", tiny_bart, min_new_tokens=4,
                                         max_new_tokens=24, texts=TEXTS)
    record = json.loads((out / VARIED_LENGTHS_FILE).read_text())
    # The directory is a checkpoint the server loads, and its greedy summaries of the
    # calibration texts end where the calibration said.
    engine = TorchEngine(Settings(model=str(out), threads=1)).load()
    params = resolve_options(RequestedOptions(
        summary_max_tokens=24, summary_min_tokens=4, num_beams=1, no_repeat_ngram_size=3,
        outputs=Outputs.SUMMARY), engine.defaults, Limits(max_num_beams=8, max_new_tokens=512))
    results = engine.generate(params, engine.prepare(TEXTS, params))
    assert sorted(r.summary_tokens for r in results) == record["calibration_greedy_lengths"]


def test_the_calibration_spreads_lengths_most_evenly_and_needs_a_logits_bias(
        tiny_bart: Path, tiny_t5: Path, tmp_path: Path) -> None:
    gaps = eos_gaps(tiny_bart, TEXTS, max_new_tokens=24, no_repeat_ngram_size=3)
    bias = calibrate_eos_bias(gaps, 4, 24)

    def distance(b: float) -> float:
        return distance_from_uniform(greedy_lengths(gaps, b, 4, 24), 4, 24)

    assert all(distance(bias) <= distance(other)
               for other in (-50, 50, bias - 0.5, bias - 0.1, bias + 0.1, bias + 0.5))
    assert distance_from_uniform([24] * 4, 4, 24) == 1.0  # all at the limit: as far as can be
    with pytest.raises(ValueError, match="final_logits_bias"):
        build_varied_length_checkpoint(tmp_path / "t5", tiny_t5, bias=1.0)
