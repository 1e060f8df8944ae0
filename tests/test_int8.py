"""The torch engine's int8 (service/engines/int8.py): batch-invariant linear layers, every linear
layer replaced, a lossless conversion round trip, and loading without the float32 weights.

Random-weight checkpoints: these tests compare numbers and token ids, never prose.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import ModelLoadError
import torch
from torch import nn

from service.config import Settings
from service.engines import int8
from service.engines.int8 import Int8Embedding, Int8Linear, quantize_model
from service.engines.tiny import build_checkpoint
from service.engines.torch_engine import TorchEngine

ROOT = Path(__file__).resolve().parent.parent


def _linear(in_features: int, out_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features)


@pytest.mark.parametrize("shape", [(768, 3072), (37, 29), (8, 1)])
def test_each_row_is_the_same_whatever_the_batch_around_it(shape):
    """Bitwise: a row computed alone, among 2, 5, 33 or 200 other rows (other scales, other
    magnitudes) gives the same float32 result. Per-tensor activation scales would not."""
    layer = Int8Linear.from_float(_linear(*shape, seed=1))
    torch.manual_seed(2)
    row = torch.randn(1, shape[0])
    alone = layer(row)
    for others in (2, 5, 33, 200):
        batch = torch.randn(others, shape[0]) * torch.logspace(-2, 2, others)[:, None]
        position = others // 2
        mixed = torch.cat((batch[:position], row, batch[position:]))
        assert torch.equal(layer(mixed)[position:position + 1], alone), others
    # Leading dimensions are rows too ([batch, length, hidden] in the model).
    three_d = layer(torch.cat((row, row * 3)).view(1, 2, shape[0]))
    assert torch.equal(three_d[0, :1], alone)


def test_int_mm_takes_any_shape_on_the_cpu_and_the_sums_are_exact():
    """One row, and dimensions that are no multiple of 8: the int32 products equal an int64
    reference exactly (no padding or fallback path is needed on the CPU)."""
    for rows, in_features, out_features in ((1, 37, 29), (3, 770, 3001), (17, 8, 1)):
        layer = Int8Linear.from_float(_linear(in_features, out_features, seed=rows))
        x = torch.randn(rows, in_features)
        values, scale = int8.quantize_rows(x)
        exact = (values.long() @ layer.weight.long().t()).float()
        expected = exact * scale * layer.weight_scale + layer.bias
        assert torch.equal(layer(x), expected)


def test_zero_rows_and_an_all_zero_row():
    layer = Int8Linear.from_float(_linear(16, 24, seed=3))
    assert layer(torch.zeros(0, 16)).shape == (0, 24)
    assert layer.bias is not None
    assert torch.equal(layer(torch.zeros(2, 16)), layer.bias.expand(2, 24))


def test_close_to_float32():
    """Per-channel weights and per-row activations keep a layer's output within about 1% of
    float32 (relative to the output's norm) on Gaussian data."""
    linear = _linear(768, 3072, seed=4)
    layer = Int8Linear.from_float(linear)
    x = torch.randn(64, 768)
    with torch.no_grad():
        expected = linear(x)
    error = (layer(x) - expected).norm() / expected.norm()
    assert 0 < error < 0.02


@pytest.fixture(scope="module")
def converted(tiny_bart: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    cache = tmp_path_factory.mktemp("int8-cache")
    return TorchEngine(Settings(model=str(tiny_bart), threads=1, engine="torch",
                                compute_type="int8", convert_cache_dir=str(cache))).load()


def test_every_linear_layer_is_int8_the_head_included(converted, tiny_bart):
    from transformers import AutoModelForSeq2SeqLM

    model = converted.summary.model
    reference = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart)
    linear_names = {n for n, m in reference.named_modules() if isinstance(m, nn.Linear)}
    int8_names = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert "lm_head" in linear_names
    assert int8_names == linear_names
    assert not any(type(m) is nn.Linear for m in model.modules())
    # The embeddings tied to the head read the head's int8 matrix and scales: the vocabulary
    # matrix is held once, in int8, shared by encoder, decoder and head.
    for embedding in (model.model.shared, model.get_encoder().embed_tokens,
                      model.get_decoder().embed_tokens):
        assert isinstance(embedding, Int8Embedding)
        assert embedding.weight is model.lm_head.weight
        assert embedding.weight_scale is model.lm_head.weight_scale
    assert not any(p.dtype == torch.float32 and p.shape[0] == model.config.vocab_size
                   for p in model.parameters())
    assert converted.can_step


def test_the_converted_checkpoint_round_trips_exactly(converted, tiny_bart):
    """The model loaded from the int8 file computes bitwise what the float32 model quantised in
    memory computes, on the encoder and the logits."""
    from transformers import AutoModelForSeq2SeqLM

    reference = AutoModelForSeq2SeqLM.from_pretrained(tiny_bart).eval()
    linears, embeddings = quantize_model(reference)
    assert linears == sum(isinstance(m, Int8Linear) for m in converted.summary.model.modules())
    assert embeddings >= 1
    ids = torch.tensor([[0, 45, 91, 12, 7, 2], [0, 33, 5, 2, 1, 1]])
    mask = (ids != 1).long()
    decoder = torch.tensor([[2, 0, 55], [2, 0, 9]])
    with torch.inference_mode():
        got = converted.summary.model(input_ids=ids, attention_mask=mask,
                                      decoder_input_ids=decoder).logits
        expected = reference(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder).logits
    assert torch.equal(got, expected)


def test_a_converted_entry_is_reused_and_a_changed_checkpoint_converts_again(tiny_t5, tmp_path):
    settings = Settings(model=str(tiny_t5), threads=1, engine="torch", compute_type="int8",
                        convert_cache_dir=str(tmp_path))
    TorchEngine(settings).load()
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].name.endswith("-torch-int8")
    marker = json.loads((entries[0] / int8.MARKER_FILE).read_text())
    assert marker["linear_layers"] > 0
    stamp = (entries[0] / int8.WEIGHTS_FILE).stat().st_mtime_ns
    TorchEngine(settings).load()
    assert list(tmp_path.iterdir()) == entries
    assert (entries[0] / int8.WEIGHTS_FILE).stat().st_mtime_ns == stamp


def test_an_unwritable_home_converts_under_tmp_and_no_writable_directory_says_what_to_do(
        tiny_t5, tmp_path, monkeypatch):
    """The int8 conversion shares the ctranslate2 one's cache choice (issue 22's crash: a
    read-only home on a read-only root filesystem)."""
    from service.engines.checkpoint import Source

    source = Source(ref=str(tiny_t5), location=str(tiny_t5), local=True,
                    options={"local_files_only": True})
    monkeypatch.setenv("HOME", "/dev/null/home")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    converted = int8.converted_for(source, "")
    assert converted.parent == tmp_path / "summarizer-ctranslate2"
    assert converted.name.endswith("-torch-int8") and int8.is_converted(converted)
    with pytest.raises(ModelLoadError, match=r"to int8: no writable cache directory \(tried "
                       r"/dev/null/cache\).*--convert-cache-dir.*--compute-type float32"):
        int8.converted_for(source, "/dev/null/cache")


_PEAK_SCRIPT = """
import json, sys
from pathlib import Path
import torch, transformers
from transformers import AutoConfig, AutoModelForSeq2SeqLM
from service.engines import int8

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])

model_dir, converted, how = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
config = AutoConfig.from_pretrained(model_dir)
with torch.device("meta"):  # imports the model's modules before the baseline
    AutoModelForSeq2SeqLM.from_config(config)
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
if how == "int8":
    model = int8.load(converted, config)
else:
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, config=config)
# Touch every weight, as serving does (a lazily mapped file counts once read).
for tensor in list(model.parameters()) + list(model.buffers()):
    if tensor.numel():
        tensor.max()
print(json.dumps({"peak_kib": status("VmHWM") - before}))
"""


@pytest.mark.slow
def test_loading_int8_never_holds_the_float32_weights(tmp_path):
    """In a fresh process, loading the converted model raises the peak RSS by far less than the
    float32 weights' size (float32 loading: at least that much)."""
    model_dir = build_checkpoint(tmp_path / "model", family="bart", seed=0, tokenizer_vocab=400,
                                 d_model=512, encoder_layers=4, decoder_layers=4, heads=8,
                                 ffn=2048, vocab_size=8000, max_positions=256)
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir)
    float32_kib = sum(p.numel() * 4 for p in model.parameters()) // 1024
    linear_kib = sum(m.weight.numel() * 4 for m in model.modules()
                     if isinstance(m, nn.Linear)) // 1024
    del model
    from service.engines.checkpoint import Source

    source = Source(ref=str(model_dir), location=str(model_dir), local=True,
                    options={"local_files_only": True})
    converted = int8.converted_for(source, str(tmp_path / "cache"))

    def peak(how: str) -> int:
        done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(model_dir),
                               str(converted), how], capture_output=True, text=True, cwd=ROOT,
                              check=True)
        return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_kib"])

    int8_peak, float32_peak = peak("int8"), peak("float32")
    assert float32_peak >= 0.9 * float32_kib
    # The int8 weights (a quarter of the linear ones) and the float32 embeddings, nothing more.
    assert int8_peak <= float32_kib - 0.6 * linear_kib, (int8_peak, float32_kib, linear_kib)
