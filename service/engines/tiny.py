"""Random-weight checkpoints in the standard Hugging Face layout, built locally in seconds.

For tests, demos and smoke tests of a deployment where no model can be downloaded: the text they
write is gibberish, but every piece of machinery (tokeniser, truncation, batching, beams, gRPC) runs
as with a real checkpoint. `summarizer make-tiny-model DIR --family bart|t5|pegasus` builds one.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

FAMILIES = ("bart", "t5", "pegasus")

_WORDS = (
    "the city council said on monday that new bus routes would open in march after officials "
    "agreed a budget of two million for the northern suburbs hospital university police minister "
    "government election voters president talks week year report market prices rose fell percent "
    "company shares investors court judge ruled case storm flooding rain homes residents school "
    "children teachers health doctors patients water energy prices oil gas summit leaders agreed "
    "climate emissions targets team season match won lost goal coach players fans stadium"
).split()


def training_text(sentences: int = 400, seed: int = 0) -> list[str]:
    """Deterministic news-like sentences to train a tokenizer on."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        words[0] = words[0].capitalize()
        out.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!"]))
    return out


def _bpe_tokenizer(family: str, vocab_size: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = training_text()
    if family == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
        tok.train_from_iterator(corpus, trainer)
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", 0), ("</s>", 2)])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            unk_token="<unk>", mask_token="<mask>", model_max_length=1024)
    # T5 and PEGASUS: sentencepiece-style (metaspace) tokens, "</s>" appended, pad 0 / eos 1.
    specials = ["<pad>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512)


# Real-size architectures (random weights, same FLOPs as the published checkpoints) for timings.
PRESETS: dict[str, dict] = {
    "bart-base": dict(family="bart", d_model=768, encoder_layers=6, decoder_layers=6, heads=12,
                      ffn=3072, vocab_size=50265, max_positions=1024),
    "distilbart-cnn-12-6": dict(family="bart", d_model=1024, encoder_layers=12,
                                decoder_layers=6, heads=16, ffn=4096, vocab_size=50264,
                                max_positions=1024),
    "flan-t5-small": dict(family="t5", d_model=512, encoder_layers=8, decoder_layers=8,
                          heads=6, d_kv=64, ffn=1024, vocab_size=32128,
                          feed_forward_proj="gated-gelu"),
}


def build_tiny_checkpoint(out_dir: str | Path, family: str = "bart", *, seed: int = 0,
                          vocab_size: int = 400, d_model: int = 32, layers: int = 2,
                          max_positions: int = 256) -> Path:
    """Write a tiny random-weight `family` checkpoint (safetensors) with its tokenizer."""
    return build_checkpoint(out_dir, family=family, seed=seed, tokenizer_vocab=vocab_size,
                            d_model=d_model, encoder_layers=layers, decoder_layers=layers,
                            heads=2, ffn=2 * d_model, max_positions=max_positions,
                            init_std=0.3)


def build_preset_checkpoint(out_dir: str | Path, preset: str, *, seed: int = 0) -> Path:
    """Write a real-size random-weight checkpoint (see PRESETS) for benchmarks."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(PRESETS)}")
    return build_checkpoint(out_dir, seed=seed, tokenizer_vocab=2000, **PRESETS[preset])


def cached_preset_checkpoint(cache_dir: str | Path, preset: str) -> Path:
    """The preset's checkpoint in `cache_dir/<preset>`, built (and announced on stderr) only when
    it is not there yet: benchmarks rerun without paying for the build again."""
    model = Path(cache_dir) / preset
    if not (model / "config.json").exists():
        print(f"building random-weight {preset} checkpoint in {model} ...", file=sys.stderr,
              flush=True)
        build_preset_checkpoint(model, preset)
    return model


def build_checkpoint(out_dir: str | Path, *, family: str, seed: int, tokenizer_vocab: int,
                     d_model: int, encoder_layers: int, decoder_layers: int, heads: int,
                     ffn: int, vocab_size: int = 0, max_positions: int = 1024, d_kv: int = 0,
                     feed_forward_proj: str = "relu", init_std: float | None = None) -> Path:
    """Write a random-weight checkpoint. The model's vocabulary may be larger than the trained
    tokenizer's (`vocab_size`), so the output layer costs what the real model's does."""
    import torch
    import transformers

    from .fetch import make_readable
    from transformers import (BartConfig, BartForConditionalGeneration, PegasusConfig,
                              PegasusForConditionalGeneration, T5Config,
                              T5ForConditionalGeneration)

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _bpe_tokenizer(family, tokenizer_vocab)
    vocab = max(vocab_size, len(tokenizer))
    torch.manual_seed(seed)
    bart_like: dict[str, Any] = dict(
        vocab_size=vocab, d_model=d_model, encoder_layers=encoder_layers,
        decoder_layers=decoder_layers, encoder_attention_heads=heads,
        decoder_attention_heads=heads, encoder_ffn_dim=ffn, decoder_ffn_dim=ffn,
        max_position_embeddings=max_positions)
    if init_std is not None:
        bart_like["init_std"] = init_std
    config: PretrainedConfig
    model: PreTrainedModel
    if family == "bart":
        config = BartConfig(**bart_like, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                            decoder_start_token_id=2, forced_eos_token_id=2)
        model = BartForConditionalGeneration(config)
    elif family == "t5":
        config = T5Config(
            vocab_size=vocab, d_model=d_model, d_kv=d_kv or d_model // heads, d_ff=ffn,
            num_layers=encoder_layers, num_decoder_layers=decoder_layers, num_heads=heads,
            feed_forward_proj=feed_forward_proj, pad_token_id=0, eos_token_id=1,
            initializer_factor=1.0 if init_std is None else init_std * 10)
        config.decoder_start_token_id = 0  # not in T5Config's signature: a generic config field
        model = T5ForConditionalGeneration(config)
    else:
        config = PegasusConfig(**bart_like, pad_token_id=0, eos_token_id=1,
                               decoder_start_token_id=0, forced_eos_token_id=1)
        model = PegasusForConditionalGeneration(config)
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_readable(out)
    return out


# ----- a checkpoint whose summaries end at varied lengths (benchmarks of continuous batching) -----

VARIED_LENGTHS_FILE = "varied_lengths.json"
"""Written next to the weights by `build_varied_length_checkpoint`: the bias and how it was
calibrated."""


def eos_gaps(model_dir: str | Path, texts: list[str], *, max_new_tokens: int,
             no_repeat_ngram_size: int = 3) -> list[list[float]]:
    """For each text, greedy decoding with end-of-sequence forbidden: at every step, how far the
    end-of-sequence logit lies below the best other token's (after the no-repeat rule). With a
    bias `b` added to the end-of-sequence logit (BART's `final_logits_bias`) and nothing else
    changed, greedy decoding ends at the first allowed step whose gap is below `b`: the tokens
    before it do not depend on `b`, so one run per text gives the length for every bias."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir).eval()
    eos = model.config.eos_token_id
    window = min(tokenizer.model_max_length, model.config.max_position_embeddings)
    gaps = []
    with torch.inference_mode():
        for text in texts:
            out = model.generate(
                **tokenizer(text, return_tensors="pt", truncation=True, max_length=window),
                num_beams=1,
                do_sample=False, min_new_tokens=max_new_tokens, max_new_tokens=max_new_tokens,
                forced_eos_token_id=None, no_repeat_ngram_size=no_repeat_ngram_size,
                output_logits=True, output_scores=True, return_dict_in_generate=True)
            row = []
            for scores, logits in zip(out.scores, out.logits):
                others = scores[0].clone()
                others[eos] = -float("inf")
                row.append(float(others.max() - logits[0, eos]))
            gaps.append(row)
    return gaps


def greedy_lengths(gaps: list[list[float]], bias: float, min_new_tokens: int,
                   max_new_tokens: int) -> list[int]:
    """The greedy output length of each text (end-of-sequence not counted) under `bias`."""
    return [next((step for step in range(min_new_tokens, max_new_tokens) if row[step] < bias),
                 max_new_tokens) for row in gaps]


def distance_from_uniform(lengths: list[int], min_new_tokens: int, max_new_tokens: int) -> float:
    """How far the lengths' distribution is from uniform over [min, max] (the Kolmogorov-Smirnov
    distance: the largest gap between their cumulative distributions)."""
    span = max(max_new_tokens - min_new_tokens, 1)
    ordered, count = sorted(lengths), len(lengths)
    return max(max(abs((i + 1) / count - (n - min_new_tokens) / span),
                   abs(i / count - (n - min_new_tokens) / span))
               for i, n in enumerate(ordered))


def calibrate_eos_bias(gaps: list[list[float]], min_new_tokens: int,
                       max_new_tokens: int) -> float:
    """The bias whose greedy lengths spread most evenly over [min, max] (closest to uniform; on
    a tie, the smallest such bias). Lengths only change where the bias crosses a gap, so the
    candidates are the gaps themselves, each raised by 0.001 (the precision kept)."""
    candidates = sorted({math.floor(row[step] * 1000) / 1000 + 0.001 for row in gaps
                         for step in range(min_new_tokens, min(max_new_tokens, len(row)))})
    best = min(candidates, key=lambda bias: (distance_from_uniform(
        greedy_lengths(gaps, bias, min_new_tokens, max_new_tokens), min_new_tokens,
        max_new_tokens), bias))
    return round(best, 3)


def build_varied_length_checkpoint(out_dir: str | Path, base_dir: str | Path, *,
                                   min_new_tokens: int = 56, max_new_tokens: int = 142,
                                   no_repeat_ngram_size: int = 3, bias: float | None = None,
                                   texts: Sequence[str] | None = None,
                                   calibration_texts: int = 8) -> Path:
    """Copy a BART-family checkpoint with `bias` added to its end-of-sequence logit (BART's
    `final_logits_bias`), so that summaries end at varied lengths between `min_new_tokens` and
    `max_new_tokens`, as a real news summariser's do (BART-CNN: 56 to 142), instead of always
    running to the limit.

    A random-weight model barely reads its input; it is the no-repeat rule that sends each
    article's decoding down its own path, so the gaps (see `eos_gaps`), and with them the
    lengths, differ between articles when `no_repeat_ngram_size` is on. Without `bias`, it is
    calibrated so that greedy lengths spread as evenly as they can over the range, on `texts`
    (best: the articles the benchmark will send), else on `calibration_texts` news-like texts
    drawn here. Greedy decoding of the calibration texts then gives exactly the lengths recorded
    in VARIED_LENGTHS_FILE (the bias changes no token before the end). That holds for greedy
    decoding only: with beams, some beam keeps avoiding the end (bart-base preset, 2 or 4 beams,
    length_penalty 1.0 or 2.0: every summary ran to 141-142 tokens), so benchmarks print the
    lengths they get."""
    import json
    import shutil

    import torch
    from transformers import AutoModelForSeq2SeqLM

    from .fetch import make_readable

    base, out = Path(base_dir), Path(out_dir)
    record: dict[str, object] = {"base": str(base), "min_new_tokens": min_new_tokens,
                                 "max_new_tokens": max_new_tokens,
                                 "no_repeat_ngram_size": no_repeat_ngram_size}
    if bias is None:
        if texts is None:
            sentences = training_text(sentences=calibration_texts * 20, seed=11)
            texts = [" ".join(sentences[i * 20:i * 20 + 8 + (i * 5) % 12])
                     for i in range(calibration_texts)]
        gaps = eos_gaps(base, list(texts), max_new_tokens=max_new_tokens,
                        no_repeat_ngram_size=no_repeat_ngram_size)
        bias = calibrate_eos_bias(gaps, min_new_tokens, max_new_tokens)
        record["calibration_greedy_lengths"] = sorted(
            greedy_lengths(gaps, bias, min_new_tokens, max_new_tokens))
        record["calibration_texts"] = len(texts)
    model = AutoModelForSeq2SeqLM.from_pretrained(base)
    if not hasattr(model, "final_logits_bias"):
        raise ValueError(f"{base}: a BART-family checkpoint is needed (one with "
                         f"final_logits_bias); this one is {model.config.model_type}")
    with torch.no_grad():
        model.final_logits_bias[0, model.config.eos_token_id] += bias
    record["eos_bias"] = bias
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    for item in base.iterdir():  # the tokenizer's files (and anything else but the model's)
        if item.is_file() and not (out / item.name).exists():
            shutil.copy2(item, out / item.name)
    (out / VARIED_LENGTHS_FILE).write_text(json.dumps(record, indent=1) + "\n")
    make_readable(out)
    return out
