"""What share of a CTranslate2 batch the encoder takes, and so what the second encoding costs.

CTranslate2's `Translator.translate_batch` encodes its inputs on every call, so the engine encodes
each article twice: once for the summary, once for the headline. This measures, on a real-size
random-weight checkpoint converted to int8, for batches as the server forms them:

- the encoder's time, at most: `translate_batch` with greedy search and one decoding step (the
  encoder, plus one step for the batch's rows, a sliver of a step with 4 beams);
- a whole batch: the summary call plus the headline call, with fixed output lengths.

Each figure is the fastest of `--repeats` interleaved tries: on a shared machine the fastest is the
one least disturbed by other work.

The encoder share of a batch is what encoding once instead of twice would save at most.

    python benchmarks/encoder_share.py --preset distilbart-cnn-12-6
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_articles  # noqa: E402 - sibling helpers

from service.engines.tiny import PRESETS, cached_preset_checkpoint  # noqa: E402


def fastest(functions: dict[str, object], repeats: int) -> dict[str, float]:
    """The fastest of `repeats` tries of each function, the tries interleaved."""
    best = {name: float("inf") for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            started = time.perf_counter()
            function()  # type: ignore[operator]
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="distilbart-cnn-12-6")
    parser.add_argument("--batch", type=int, default=6, help="articles per batch")
    parser.add_argument("--tokens", type=int, default=400, help="input tokens per article")
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()

    from service.config import Settings
    from service.domain import GenerationParams, Outputs
    from service.engines.ct2_engine import CTranslate2Engine
    from service.text import clean_article, model_text

    model = cached_preset_checkpoint(args.cache, args.preset)
    engine = CTranslate2Engine(Settings(model=str(model), engine="ctranslate2",
                                        compute_type="int8", threads=args.threads,
                                        convert_cache_dir=str(args.cache / "ctranslate2"))).load()
    texts = make_articles(str(model), args.batch, args.tokens, args.tokens)
    params = GenerationParams(
        summary_max_tokens=args.summary_tokens, summary_min_tokens=args.summary_tokens,
        headline_max_tokens=args.headline_tokens, headline_min_tokens=args.headline_tokens,
        num_beams=args.num_beams, outputs=Outputs.BOTH,
        max_input_tokens=engine.defaults.max_input_tokens)
    batch = engine.prepare([model_text(clean_article(t)) for t in texts], params)
    rows = [a.summary_ids for a in batch]
    summary_model = engine.summary.model
    engine.generate(params, batch)  # warm up

    greedy = dataclasses.replace(params, num_beams=1)
    times = fastest({
        "encoder": lambda: summary_model.run(rows, 1, 1, greedy, str),
        "whole": lambda: engine.generate(params, batch),
    }, args.repeats)
    encoder, whole = times["encoder"], times["whole"]
    print(f"checkpoint  {args.preset} (random weights) int8, {args.num_beams} beams, batch of "
          f"{args.batch} x {args.tokens} tokens, {args.summary_tokens}+{args.headline_tokens} "
          f"tokens out, {args.threads or 'all'} threads, fastest of {args.repeats}")
    print(f"encoder + one greedy step              {encoder:7.3f} s")
    print(f"whole batch (summary + headline calls) {whole:7.3f} s")
    print(f"encoder share of the batch, once:  {100 * encoder / whole:5.1f}%  (it runs twice: "
          f"{200 * encoder / whole:5.1f}%; encoding once would save at most the once figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
