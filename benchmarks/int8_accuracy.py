"""How far each int8 engine is from float32 on the same inputs: torch int8 and ctranslate2 int8.

Fixed set: `--articles` news-like articles (`--min-tokens`..`--max-tokens` input tokens) on a
real-size checkpoint with RANDOM weights (`--preset`, bart-base by default: the model's shapes and
arithmetic, not a trained model's distributions). For each article the float32 torch model writes
`--tokens` tokens greedily (end of sequence suppressed, so every article has them all); then each
engine is teacher-forced on those float32 tokens and its logits at every step are compared with
float32's:

- top-1 agreement: the share of steps whose highest logit is float32's token;
- logit error: the mean absolute difference of the logits, and the relative error
  |int8 - float32| / |float32| (L2 over the vocabulary) per step, mean and worst;
- the float32 top token's log-probability under each engine, mean absolute difference.

torch int8 is the engine's model (service/engines/int8.py: per-channel weights, per-row
activations, every linear incl. the head); ctranslate2 int8 is the project's conversion of the same
checkpoint, read through `translate_batch(..., target_prefix=float32 tokens,
return_logits_vocab=True)` (its logits at every forced step). ctranslate2 masks nothing here
(no minimum length), so both are raw logits.

    python benchmarks/int8_accuracy.py                     # bart-base preset, 8 articles, 48 steps
    python benchmarks/int8_accuracy.py --articles 16 --tokens 64 --json

Run from the repository root; checkpoints and conversions are cached in --cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from service.config import Settings
from service.engines.tiny import PRESETS, cached_preset_checkpoint


def reference_tokens(model: Any, ids: list[int], tokens: int, eos: int) -> list[int]:
    """float32 greedy decoding of `tokens` tokens with the end token suppressed (decoder start
    token first)."""
    config = model.generation_config
    start = int(config.decoder_start_token_id)
    forced = config.forced_bos_token_id
    out = [start] + ([int(forced)] if forced is not None else [])
    with torch.inference_mode():
        encoded = model.get_encoder()(input_ids=torch.tensor([ids]))
        while len(out) < tokens + 1:
            logits = model(encoder_outputs=encoded, decoder_input_ids=torch.tensor([out])
                           ).logits[0, -1]
            logits[eos] = -float("inf")
            out.append(int(logits.argmax()))
    return out


def teacher_forced(model: Any, ids: list[int], sequence: list[int]) -> torch.Tensor:
    """Logits [steps, vocab] of `model` reading `sequence[:-1]`, predicting `sequence[1:]`."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids]),
                     decoder_input_ids=torch.tensor([sequence[:-1]])).logits[0].float()


def ct2_teacher_forced(engine: Any, ids: list[int], sequence: list[int]) -> torch.Tensor:
    import numpy as np

    model = engine.summary.model
    # The converted model's own vocabulary: it names every output row (placeholders where the
    # tokenizer has fewer tokens than the model has rows).
    names = {index: name for name, index in model.ids.items()}

    def token(index: int) -> str:
        return names[index]

    prefix = [token(i) for i in sequence[1:]]
    result = model.translator.translate_batch(
        [[token(i) for i in ids]], target_prefix=[prefix], beam_size=1,
        max_decoding_length=len(prefix), min_decoding_length=0, max_input_length=0,
        return_end_token=True, return_logits_vocab=True)[0]
    steps = result.logits[0]
    return torch.stack([torch.as_tensor(np.array(step)) for step in steps[:len(prefix)]]).float()


def compare(reference: torch.Tensor, other: torch.Tensor, targets: torch.Tensor
            ) -> dict[str, Any]:
    steps = min(len(reference), len(other))
    reference, other, targets = reference[:steps], other[:steps], targets[:steps]
    agree = (other.argmax(-1) == reference.argmax(-1)).float()
    absolute = (other - reference).abs().mean(-1)
    relative = (other - reference).norm(dim=-1) / reference.norm(dim=-1)
    ref_lp = torch.log_softmax(reference, -1).gather(1, targets[:, None])[:, 0]
    other_lp = torch.log_softmax(other, -1).gather(1, targets[:, None])[:, 0]
    return {"steps": steps, "agree": agree.sum().item(), "abs": absolute.tolist(),
            "rel": relative.tolist(), "logprob": (other_lp - ref_lp).abs().tolist()}


def summary(parts: list[dict[str, Any]]) -> dict[str, float]:
    steps = sum(p["steps"] for p in parts)
    flat = {key: [v for p in parts for v in p[key]] for key in ("abs", "rel", "logprob")}
    return {"steps": steps, "top1_agreement": sum(p["agree"] for p in parts) / steps,
            "logit_mean_abs_error": sum(flat["abs"]) / steps,
            "logit_rel_error_mean": sum(flat["rel"]) / steps,
            "logit_rel_error_max": max(flat["rel"]),
            "top_token_logprob_abs_diff_mean": sum(flat["logprob"]) / steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--articles", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=200, help="shortest article")
    parser.add_argument("--max-tokens", type=int, default=400, help="longest article")
    parser.add_argument("--tokens", type=int, default=48, help="decoding steps per article")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--json", action="store_true", help="one JSON line only")
    args = parser.parse_args()

    from throughput import make_articles
    from transformers import AutoModelForSeq2SeqLM

    from service.engines.ct2_engine import CTranslate2Engine
    from service.engines.torch_engine import TorchEngine

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = cached_preset_checkpoint(args.cache, args.preset)
    started = time.perf_counter()
    float32 = AutoModelForSeq2SeqLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    settings = Settings(model=str(model_dir), threads=args.threads, convert_cache_dir=str(
        args.cache / "converted"))
    torch_int8 = TorchEngine(settings.replace(engine="torch", compute_type="int8")).load()
    ct2_int8 = CTranslate2Engine(settings.replace(engine="ctranslate2",
                                                  compute_type="int8")).load()
    texts = make_articles(str(model_dir), args.articles, args.min_tokens, args.max_tokens)
    params = torch_int8.defaults
    articles = torch_int8.prepare(texts, params)
    eos = int(float32.generation_config.eos_token_id)
    torch_parts, ct2_parts = [], []
    for article in articles:
        ids = list(article.summary_ids or ())
        sequence = reference_tokens(float32, ids, args.tokens, eos)
        reference = teacher_forced(float32, ids, sequence)
        targets = torch.tensor(sequence[1:])
        torch_parts.append(compare(reference, teacher_forced(torch_int8.summary.model, ids,
                                                             sequence), targets))
        ct2_parts.append(compare(reference, ct2_teacher_forced(ct2_int8, ids, sequence),
                                 targets))
    figures = {"preset": args.preset, "weights": "random", "articles": len(articles),
               "tokens": args.tokens, "torch_int8": summary(torch_parts),
               "ctranslate2_int8": summary(ct2_parts),
               "seconds": round(time.perf_counter() - started, 1),
               "load_average": os.getloadavg()}
    if not args.json:
        print(f"{args.preset} (RANDOM weights), {len(articles)} articles of "
              f"{args.min_tokens}-{args.max_tokens} tokens, {args.tokens} teacher-forced steps "
              "each; vs float32 torch")
        print(f"{'engine':<18} {'top-1 agree':>11} {'mean |dlogit|':>13} {'rel err mean':>12} "
              f"{'rel err max':>11} {'|dlogp top|':>11}")
        for name in ("torch_int8", "ctranslate2_int8"):
            f = figures[name]
            print(f"{name:<18} {f['top1_agreement']:>11.4f} {f['logit_mean_abs_error']:>13.5f} "
                  f"{f['logit_rel_error_mean']:>12.5f} {f['logit_rel_error_max']:>11.5f} "
                  f"{f['top_token_logprob_abs_diff_mean']:>11.5f}")
        print(f"load average {figures['load_average']}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
