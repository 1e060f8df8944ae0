"""Random-weight checkpoints in the standard Hugging Face layout, built locally in seconds.

For tests, demos and smoke tests of a deployment where no model can be downloaded: the text they
write is gibberish, but every piece of machinery (tokeniser, truncation, batching, beams, gRPC) runs
as with a real checkpoint. `summarizer make-tiny-model DIR --family bart|t5|pegasus` builds one.
"""

from __future__ import annotations

import random
from pathlib import Path

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


def _bpe_tokenizer(family: str, vocab_size: int):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = training_text()
    if family == "bart":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
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
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials)
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512)


def build_tiny_checkpoint(out_dir: str | Path, family: str = "bart", *, seed: int = 0,
                          vocab_size: int = 400, d_model: int = 32, layers: int = 2,
                          max_positions: int = 256) -> Path:
    """Write a random-weight `family` checkpoint (safetensors) with its tokenizer to `out_dir`."""
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, PegasusConfig,
                              PegasusForConditionalGeneration, T5Config,
                              T5ForConditionalGeneration)

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _bpe_tokenizer(family, vocab_size)
    vocab = len(tokenizer)
    torch.manual_seed(seed)
    heads = 2
    if family == "bart":
        config = BartConfig(
            vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
            max_position_embeddings=max_positions, pad_token_id=1, bos_token_id=0,
            eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2, init_std=0.3)
        model = BartForConditionalGeneration(config)
    elif family == "t5":
        config = T5Config(
            vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
            num_layers=layers, num_decoder_layers=layers, num_heads=heads, pad_token_id=0,
            eos_token_id=1, decoder_start_token_id=0, initializer_factor=3.0)
        model = T5ForConditionalGeneration(config)
    else:
        config = PegasusConfig(
            vocab_size=vocab, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
            encoder_attention_heads=heads, decoder_attention_heads=heads,
            encoder_ffn_dim=2 * d_model, decoder_ffn_dim=2 * d_model,
            max_position_embeddings=max_positions, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, forced_eos_token_id=1, init_std=0.3)
        model = PegasusForConditionalGeneration(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
