"""The ctranslate2 engine: same checkpoints, same ids in, same tokens out as the torch engine."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from service.engines.checkpoint import resolve_source
from service.config import Settings
from service.engines.convert import CT2_MARKER, cache_path, convert, is_converted
from service.engines.ct2_engine import CTranslate2Engine
from service.engines.torch_engine import TorchEngine
from service.errors import ModelLoadError
from tests.test_engine import TEXTS, params

pytest.importorskip("ctranslate2")

FAMILIES = ("bart", "t5", "pegasus")


@pytest.fixture(scope="module")
def bart_cnn_like(tiny_bart: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny BART with BART-CNN's generation settings: a forced first token, no repeated
    trigrams, a length penalty."""
    path = tmp_path_factory.mktemp("bart-cnn-like") / "model"
    shutil.copytree(tiny_bart, path)
    generation = json.loads((path / "generation_config.json").read_text())
    generation.update(forced_bos_token_id=0, no_repeat_ngram_size=3, length_penalty=2.0)
    (path / "generation_config.json").write_text(json.dumps(generation))
    return path


@pytest.fixture(scope="module")
def checkpoints(tiny_bart: Path, tiny_t5: Path, tiny_pegasus: Path,
                bart_cnn_like: Path) -> dict[str, Path]:
    return {"bart": tiny_bart, "t5": tiny_t5, "pegasus": tiny_pegasus,
            "bart-cnn-like": bart_cnn_like}


@pytest.fixture(scope="module")
def converted(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
              ) -> dict[str, Path]:
    """Each checkpoint converted (float32) in-process, as `summarizer convert` does."""
    root = tmp_path_factory.mktemp("converted")
    return {name: convert(resolve_source(str(path), Settings()), root / name, "float32")
            for name, path in checkpoints.items()}


@pytest.fixture(scope="module")
def pairs(checkpoints: dict[str, Path], converted: dict[str, Path]
          ) -> dict[str, tuple[TorchEngine, CTranslate2Engine]]:
    return {name: (TorchEngine(Settings(model=str(checkpoints[name]), threads=1)).load(),
                   CTranslate2Engine(Settings(model=str(converted[name]), threads=1,
                                              compute_type="float32",
                                              engine="ctranslate2")).load())
            for name in checkpoints}


def both(pair, **options):
    torch_engine, ct2_engine = pair
    p = params(torch_engine, **options)
    assert params(ct2_engine, **options) == p, "both engines resolve the same defaults"
    return (torch_engine.generate(p, torch_engine.prepare(TEXTS, p)),
            ct2_engine.generate(p, ct2_engine.prepare(TEXTS, p)))


@pytest.mark.parametrize("name", [*FAMILIES, "bart-cnn-like"])
def test_greedy_tokens_match_the_torch_engine(pairs, name: str) -> None:
    from_torch, from_ct2 = both(pairs[name], summary_max_tokens=12, headline_max_tokens=6,
                                num_beams=1)
    assert from_ct2 == from_torch
    assert len({r.summary for r in from_torch}) > 1  # different inputs, different outputs
    assert all(r.summary_tokens and r.headline_tokens for r in from_ct2)


@pytest.mark.parametrize(("name", "options"), [
    ("bart", {"num_beams": 2, "no_repeat_ngram_size": 2, "length_penalty": 1.5}),
    ("t5", {"num_beams": 2, "length_penalty": 1.5}),
    # Beam search with no_repeat_ngram_size can pick other beams than transformers for T5.
    ("t5", {"num_beams": 1, "no_repeat_ngram_size": 2}),
    ("pegasus", {"num_beams": 3, "length_penalty": 0.5}),
])
def test_fixed_lengths_beams_and_options_match_the_torch_engine(pairs, name: str,
                                                                options: dict) -> None:
    from_torch, from_ct2 = both(pairs[name], summary_max_tokens=9, summary_min_tokens=9,
                                headline_max_tokens=4, headline_min_tokens=4,
                                max_input_tokens=20, **options)
    assert from_ct2 == from_torch
    assert all(r.summary_tokens == 9 and r.headline_tokens == 4 for r in from_ct2)


def test_prepared_inputs_are_the_torch_engines(pairs) -> None:
    torch_engine, ct2_engine = pairs["t5"]
    p = params(torch_engine, max_input_tokens=20)
    assert ct2_engine.prepare(TEXTS, p) == torch_engine.prepare(TEXTS, p)
    assert ct2_engine.defaults == torch_engine.defaults
    assert ct2_engine.max_new_tokens == torch_engine.max_new_tokens


def test_describes_itself(pairs, converted) -> None:
    _, engine = pairs["bart"]
    assert engine.name == "ctranslate2"
    [model] = engine.models
    assert (model.role, model.family, model.dtype, model.device) == (
        "summary+headline", "bart", "float32", "cpu")
    assert json.loads((converted["bart"] / CT2_MARKER).read_text())["compute_type"] == "float32"


def test_a_plain_checkpoint_is_converted_once_into_the_cache(tiny_t5: Path,
                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    settings = Settings(model=str(tiny_t5), engine="ctranslate2", compute_type="int8",
                        convert_cache_dir=str(cache), threads=1)
    CTranslate2Engine(settings).load()
    [entry] = list(cache.iterdir())
    assert is_converted(entry) and entry.name.endswith("-int8")
    weights = entry / "ctranslate2" / "model.bin"
    stamp = weights.stat().st_mtime_ns
    engine = CTranslate2Engine(settings).load()  # the second start reuses the conversion
    assert [p.name for p in cache.iterdir()] == [entry.name]
    assert weights.stat().st_mtime_ns == stamp
    p = params(engine, summary_max_tokens=5, summary_min_tokens=5, num_beams=2)
    assert all(r.summary_tokens == 5 for r in engine.generate(p, engine.prepare(TEXTS, p)))
    # Another compute type is another entry.
    source = resolve_source(str(tiny_t5), settings)
    assert cache_path(str(cache), source, "", "int8") == entry
    assert cache_path(str(cache), source, "", "float32") != entry


@pytest.mark.slow  # another process
def test_convert_command_writes_a_directory_the_engine_loads_as_is(tiny_bart: Path,
                                                                   tmp_path: Path) -> None:
    out = tmp_path / "converted"
    done = subprocess.run([sys.executable, "-m", "service", "convert", str(tiny_bart), "--out",
                           str(out), "--compute-type", "int8"], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert is_converted(out) and not list(out.glob("*.safetensors"))
    cache = tmp_path / "cache"
    engine = CTranslate2Engine(Settings(model=str(out), engine="ctranslate2",
                                        compute_type="int8", convert_cache_dir=str(cache))).load()
    assert not cache.exists()
    assert engine.models[0].dtype == "int8"


def test_a_directory_without_weights_is_a_clear_error(tiny_bart: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-weights"
    shutil.copytree(tiny_bart, copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        CTranslate2Engine(Settings(model=str(copy), engine="ctranslate2",
                                   convert_cache_dir=str(tmp_path / "cache"))).load()


def test_a_failed_conversion_is_one_clear_line(tiny_bart: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bart, broken)
    (broken / "model.safetensors").write_bytes(b"not really safetensors")
    with pytest.raises(ModelLoadError, match="cannot convert .* for ctranslate2"):
        CTranslate2Engine(Settings(model=str(broken), engine="ctranslate2",
                                   convert_cache_dir=str(tmp_path / "cache"))).load()
    assert not any((tmp_path / "cache").glob("*/ctranslate2")), "no half-written cache entry"


# ----------------------------------------------------------------------------------------------
# serving without transformers (and so without torch)

PARITY_TEXTS = [*TEXTS, "The city </s> council <pad> said <unk> no <s> <mask>", "ÄÖÜ é 東京 📈",
                "  spaces   and\ttabs\nand lines  ", "It isn't 'quoted' , is it ? Yes !", ""]


@pytest.mark.parametrize("name", ["bart", "t5", "pegasus", "bart-cnn-like"])
def test_the_side_file_tokenizer_gives_transformers_ids_and_texts(converted: dict[str, Path],
                                                                  name: str) -> None:
    from transformers import AutoTokenizer

    from service.engines.tokenizer import HFTokenizer, read_side_file

    side = read_side_file(converted[name])
    assert side is not None, "the conversion wrote the side file"
    reference = HFTokenizer(AutoTokenizer.from_pretrained(converted[name]))
    assert side.tokenizer.encode_batch(PARITY_TEXTS) == [
        (list(ids), list(mask)) for ids, mask in reference.encode_batch(PARITY_TEXTS)]
    assert side.tokenizer.pad_token_id == reference.pad_token_id
    assert side.tokenizer.special_ids == reference.special_ids
    rows = [ids for ids, _ in reference.encode_batch(PARITY_TEXTS)]
    rows.append(list(range(200)))  # arbitrary output ids, special ones among them
    assert side.tokenizer.decode_batch(rows) == reference.decode_batch(rows)
    assert [side.tokenizer.id_to_token(i) for i in range(50)] == [
        reference.id_to_token(i) for i in range(50)]


@pytest.mark.slow  # another process
def test_the_ctranslate2_serving_path_imports_neither_torch_nor_transformers(
        converted: dict[str, Path]) -> None:
    """A fresh interpreter loads a converted directory, summarises, and never imports torch or
    transformers: the server process stays about 250 MB smaller."""
    script = (
        "import sys\n"
        "from service.config import Settings\n"
        "from service.engines.ct2_engine import CTranslate2Engine\n"
        "from service.domain import GenerationParams, Outputs\n"
        f"engine = CTranslate2Engine(Settings(model={str(converted['bart'])!r}, "
        "threads=1, engine='ctranslate2', compute_type='int8')).load()\n"
        "p = GenerationParams(summary_max_tokens=6, summary_min_tokens=6, headline_max_tokens=3, "
        "headline_min_tokens=3, num_beams=2, outputs=Outputs.BOTH, max_input_tokens=64)\n"
        "[out] = engine.generate(p, engine.prepare(['The council met on Tuesday.'], p))\n"
        "assert out.summary_tokens == 6 and out.headline_tokens == 3, out\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_a_directory_converted_before_the_side_file_still_loads(
        converted: dict[str, Path], tmp_path: Path) -> None:
    from service.engines.tokenizer import SIDE_FILE

    old = tmp_path / "old"
    shutil.copytree(converted["bart"], old)
    (old / SIDE_FILE).unlink()
    engine = CTranslate2Engine(Settings(model=str(old), threads=1, engine="ctranslate2",
                                        compute_type="float32")).load()
    fresh = CTranslate2Engine(Settings(model=str(converted["bart"]), threads=1,
                                       engine="ctranslate2", compute_type="float32")).load()
    p = params(engine)
    assert engine.generate(p, engine.prepare(TEXTS[:2], p)) == fresh.generate(
        p, fresh.prepare(TEXTS[:2], p))
