"""The torch engine on tiny random-weight checkpoints: the machinery, never the prose."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from service.config import Settings
from service.domain import GenerationParams, Limits, Outputs, RequestedOptions, resolve_options
from service.engines.protocol import StepIn, StepOut
from service.engines.torch_engine import TorchEngine
from service.errors import ModelLoadError

TEXTS = [
    "The city council said on monday that new bus routes would open in march.",
    "Prices rose.",
    "Storm flooding homes residents school children teachers health doctors patients " * 3,
    "The government election voters president talks week year report market prices fell.",
]
LIMITS = Limits(max_num_beams=8, max_new_tokens=512)


def params(engine: TorchEngine, **changes) -> GenerationParams:
    return resolve_options(RequestedOptions(**changes), engine.defaults, LIMITS)


@pytest.fixture(scope="module")
def engines(tiny_bart: Path, tiny_t5: Path, tiny_pegasus: Path) -> dict[str, TorchEngine]:
    return {name: TorchEngine(Settings(model=str(path), threads=1)).load()
            for name, path in (("bart", tiny_bart), ("t5", tiny_t5), ("pegasus", tiny_pegasus))}


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_generates_within_the_requested_lengths(engines, family: str) -> None:
    engine = engines[family]
    p = params(engine, summary_max_tokens=10, summary_min_tokens=6, headline_max_tokens=5,
               headline_min_tokens=2, num_beams=2)
    prepared = engine.prepare(TEXTS, p)
    results = engine.generate(p, prepared)
    assert len(results) == len(TEXTS)
    for result in results:
        assert 6 <= result.summary_tokens <= 10
        assert 2 <= result.headline_tokens <= 5
        assert result.summary and result.headline
        assert "\n" not in result.headline


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_greedy_results_do_not_change_with_batching(engines, family: str) -> None:
    engine = engines[family]
    p = params(engine, summary_max_tokens=12, headline_max_tokens=6, num_beams=1)
    prepared = engine.prepare(TEXTS, p)
    together = engine.generate(p, prepared)
    alone = [engine.generate(p, [article])[0] for article in prepared]
    assert together == alone
    # The check is only worth something if different articles give different outputs.
    assert len({r.summary for r in together}) > 1


@pytest.mark.parametrize("family", ["bart", "t5"])
def test_shared_encoding_gives_the_same_outputs_as_separate_runs(engines, family: str) -> None:
    engine = engines[family]
    both = params(engine, summary_max_tokens=8, headline_max_tokens=5, num_beams=3)
    only_summary = params(engine, summary_max_tokens=8, headline_max_tokens=5, num_beams=3,
                          outputs=Outputs.SUMMARY)
    only_headline = params(engine, summary_max_tokens=8, headline_max_tokens=5, num_beams=3,
                           outputs=Outputs.HEADLINE)
    combined = engine.generate(both, engine.prepare(TEXTS, both))
    summaries = engine.generate(only_summary, engine.prepare(TEXTS, only_summary))
    headlines = engine.generate(only_headline, engine.prepare(TEXTS, only_headline))
    assert [r.summary for r in combined] == [r.summary for r in summaries]
    assert [r.headline for r in combined] == [r.headline for r in headlines]
    assert all(r.headline == "" for r in summaries)
    assert all(r.summary == "" for r in headlines)


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_long_input_is_cut_to_the_window_keeping_end_of_sequence(engines, family: str) -> None:
    engine = engines[family]
    tokenizer = engine.summary.tokenizer.tokenizer  # transformers'
    p = params(engine, max_input_tokens=20)
    short, long = engine.prepare(["Prices rose.", TEXTS[2] * 5], p)
    assert not short.truncated and short.input_tokens < 20
    assert long.truncated and long.input_tokens == 20 == len(long.summary_ids)
    assert long.summary_ids[-1] == tokenizer.eos_token_id
    full = tokenizer(engine.summary.summary_prefix + TEXTS[2] * 5)["input_ids"]
    assert list(long.summary_ids[:-1]) == full[:19]  # the start is kept, the end is cut


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_count_tokens_is_what_prepare_reads_without_the_cut(engines, family: str) -> None:
    engine = engines[family]
    p = params(engine, max_input_tokens=20)
    texts = ["Prices rose.", TEXTS[2] * 5, ""]
    counts = engine.count_tokens(texts, p)
    prepared = engine.prepare(texts, p)
    assert counts[0] == prepared[0].input_tokens < 20
    assert counts[1] > 20 == prepared[1].input_tokens  # counted whole, not cut
    assert counts[2] == prepared[2].input_tokens > 0  # the prefix and special tokens alone
    assert engine.models[0].chunked_headline == engine.summary.manifest.chunked_headline
    assert engine.prepare([], p) == [] and engine.count_tokens([], p) == []


def test_count_tokens_takes_the_larger_count_of_two_checkpoints(tiny_bart: Path,
                                                                tiny_t5: Path) -> None:
    engine = TorchEngine(Settings(model=str(tiny_bart), headline_model=str(tiny_t5),
                                  threads=1)).load()
    text = [TEXTS[0]]
    summary = engine.count_tokens(text, params(engine, outputs=Outputs.SUMMARY))
    headline = engine.count_tokens(text, params(engine, outputs=Outputs.HEADLINE))
    assert summary != headline
    assert engine.count_tokens(text, params(engine)) == [max(summary[0], headline[0])]


@pytest.mark.parametrize("family", ["bart", "t5", "pegasus"])
def test_special_tokens_typed_in_an_article_are_plain_text(engines, family: str) -> None:
    engine = engines[family]
    tokenizer = engine.summary.tokenizer.tokenizer  # transformers'
    (article,) = engine.prepare(["The city </s> council <pad> said <unk> no"], params(engine))
    ids = list(article.summary_ids)
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
    assert tokenizer.pad_token_id not in ids
    if family == "bart":  # byte-level BPE knows every character: nothing maps to <unk>
        assert tokenizer.unk_token_id not in ids


def test_window_defaults_to_the_family_manifest_capped_by_positions(engines) -> None:
    assert engines["t5"].defaults.max_input_tokens == 512  # T5 family manifest
    assert engines["bart"].defaults.max_input_tokens == 256  # tiny BART's position limit
    assert engines["t5"].summary.summary_prefix == "summarize: "
    assert engines["bart"].models[0].role == "summary+headline"


def test_a_second_checkpoint_can_write_the_headlines(tiny_bart: Path, tiny_t5: Path) -> None:
    engine = TorchEngine(Settings(model=str(tiny_bart), headline_model=str(tiny_t5),
                                  threads=1)).load()
    assert [(m.role, m.family) for m in engine.models] == [("summary", "bart"),
                                                           ("headline", "t5")]
    p = params(engine, summary_max_tokens=6, headline_max_tokens=4, num_beams=1)
    prepared = engine.prepare(TEXTS[:2], p)
    assert prepared[0].summary_ids != prepared[0].headline_ids  # two tokenizers
    results = engine.generate(p, prepared)
    assert all(r.summary and r.headline for r in results)


def test_settings_override_manifest_defaults(tiny_t5: Path) -> None:
    engine = TorchEngine(Settings(model=str(tiny_t5), summary_max_tokens=33, num_beams=1,
                                  headline_prefix="headline: ", max_input_tokens=64)).load()
    assert engine.defaults.summary_max_tokens == 33
    assert engine.defaults.num_beams == 1
    assert engine.defaults.max_input_tokens == 64
    assert engine.summary.headline_prefix == "headline: "


@pytest.mark.parametrize("compute_type", ["int8", "bfloat16"])
def test_lower_precision_compute_types_generate_the_requested_lengths(
        tiny_bart: Path, compute_type: str, tmp_path: Path) -> None:
    from service.engines.int8 import Int8Linear

    engine = TorchEngine(Settings(model=str(tiny_bart), threads=1, compute_type=compute_type,
                                  convert_cache_dir=str(tmp_path))).load()
    assert engine.models[0].dtype == compute_type
    quantised = any(isinstance(m, Int8Linear) for m in engine.summary.model.modules())
    assert quantised == (compute_type == "int8")
    p = params(engine, summary_max_tokens=7, summary_min_tokens=7, headline_max_tokens=3,
               headline_min_tokens=3, num_beams=2)
    results = engine.generate(p, engine.prepare(TEXTS, p))
    assert [(r.summary_tokens, r.headline_tokens) for r in results] == [(7, 3)] * len(TEXTS)
    assert all(r.summary for r in results)


def test_max_tokens_are_all_text_tokens(engines) -> None:
    # No forced end-of-sequence token takes the last place (tiny BART's config asks for one).
    engine = engines["bart"]
    assert engine.summary.model.generation_config.forced_eos_token_id is None
    p = params(engine, summary_max_tokens=6, summary_min_tokens=6, num_beams=1)
    assert {r.summary_tokens for r in engine.generate(p, engine.prepare(TEXTS, p))} == {6}


@pytest.mark.parametrize("batching", ["static", "continuous"])
def test_warmup_runs_the_path_requests_take(tiny_bart: Path, batching: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Static: one small generate of one article, both outputs. Continuous: a decoding session
    that admits the warm-up article and steps until it is done, without generate."""
    engine = TorchEngine(Settings(model=str(tiny_bart), threads=1, batching=batching)).load()
    generated: list[tuple[GenerationParams, int, list]] = []
    generate = engine.generate

    def counting_generate(p: GenerationParams, batch: list) -> list:
        results = generate(p, batch)
        generated.append((p, len(batch), results))
        return results

    outs: list = []
    open_session = engine.open_session

    def recording_session() -> object:
        session = open_session()
        advance = session.advance

        def recorded(step: StepIn) -> StepOut:
            outs.append((step, advance(step)))
            return outs[-1][1]

        session.advance = recorded
        return session

    monkeypatch.setattr(engine, "generate", counting_generate)
    monkeypatch.setattr(engine, "open_session", recording_session)
    engine.warmup()
    small = engine.warmup_params()
    assert small.outputs == Outputs.BOTH and small.summary_max_tokens <= 8
    if batching == "static":
        assert outs == []
        [(p, articles, results)] = generated
        assert (p, articles) == (small, 1)
        assert results[0].summary_tokens <= 8 and results[0].headline_tokens <= 8
    else:
        assert generated == []
        admitted = [a for step, _ in outs for a in step.admit]
        assert [(a.ticket, a.params) for a in admitted] == [(0, small)]
        done = [ticket for _, out in outs for ticket, _ in out.done]
        assert done == [0] and not outs[-1][1].active and not outs[-1][1].waiting


# ----- loading failures: one clear line, never a traceback wall -----

def test_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    engine = TorchEngine(Settings(model=str(tmp_path / "nope")))  # constructing loads nothing
    with pytest.raises(ModelLoadError, match="does not exist"):
        engine.load()


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        TorchEngine(Settings(model=str(tmp_path))).load()


def test_pickled_weights_are_refused(tiny_bart: Path, tmp_path: Path) -> None:
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_bart, copy)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        TorchEngine(Settings(model=str(copy))).load()


def test_broken_weights_are_a_clear_error(tiny_bart: Path, tmp_path: Path) -> None:
    copy = tmp_path / "broken"
    shutil.copytree(tiny_bart, copy)
    (copy / "model.safetensors").write_bytes(b"not really safetensors")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        TorchEngine(Settings(model=str(copy))).load()


def test_a_model_that_is_not_seq2seq_is_refused(tiny_bart: Path, tmp_path: Path) -> None:
    copy = tmp_path / "gpt2"
    shutil.copytree(tiny_bart, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="cannot load model"):
        TorchEngine(Settings(model=str(copy))).load()


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"cannot load model 'nobody/no-such-model'.*offline"):
        TorchEngine(Settings(model="nobody/no-such-model", offline=True)).load()


def test_output_length_is_capped_by_the_decoder_positions(engines) -> None:
    assert engines["bart"].max_new_tokens == 255  # tiny BART: 256 positions, one for the start
    assert engines["t5"].max_new_tokens is None  # relative positions: no hard limit
