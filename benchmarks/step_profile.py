"""Where a continuous decoding step's time goes, in float32 and in int8 (the torch engine).

In process, on a real-size RANDOM-weight checkpoint (`--preset`, bart-base by default): one
decoding session (service/engines/stepping/) gets `--articles` articles at once in three option
sets (4 beams; summary and headline by default, fixed lengths), then every step is timed until the
set is empty. The time is split by wrapping the pieces (wall-clock, nested calls counted once):

- linear: every linear layer (int8: quantising the activations, `torch._int_mm`, rescaling);
- attention: self-attention (per run of rows with the same history) and cross-attention (per
  source);
- search: the groups' beam/greedy bookkeeping (`Search.advance`, logits processors included);
- cache: the running set's self-attention cache work between steps (`after_step`: beam reordering,
  finished rows leaving, trimming) and `torch.cat` inside the step (appending the new column);
- encode: admitting articles (encoder pass, cross-attention keys and values);
- other: the rest of the step (embeddings, norms, residuals, masks, Python).

    python benchmarks/step_profile.py --compute-types float32 int8
    python benchmarks/step_profile.py --compute-types int8 --torch-profile   # + top aten ops

Absolute times vary up to 2x between runs on a shared machine; the shares are what carry over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from service.config import Settings
from service.domain import Outputs
from service.engines.protocol import Admit, StepIn
from service.engines.tiny import PRESETS, cached_preset_checkpoint

CATEGORIES = ("linear", "attention", "cache", "search", "encode", "other")


class Clock:
    """Wall time per category; a category entered while another runs is charged to the
    inner one only."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []

    @contextlib.contextmanager
    def charge(self, category: str) -> Iterator[None]:
        started = time.perf_counter()
        frame = [category, 0.0]
        self.stack.append(frame)
        try:
            yield
        finally:
            self.stack.pop()
            spent = time.perf_counter() - started
            self.total[category] += spent - frame[1]
            if self.stack:
                self.stack[-1][1] += spent

    def wrap(self, owner: Any, name: str, category: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            with self.charge(category):
                return original(*args, **kwargs)

        setattr(owner, name, wrapped)


def instrument(clock: Clock, session: Any) -> Callable[[], None]:
    """Wrap the pieces; returns a function that undoes the module-level wraps."""
    from torch import nn

    from service.engines.int8 import Int8Linear
    from service.engines.stepping import decoders, search
    from service.engines.stepping import session as session_module

    undo: list[tuple[Any, str, Any]] = []
    for owner, name, category in ((Int8Linear, "forward", "linear"),
                                  (nn.Linear, "forward", "linear"),
                                  (decoders, "_self_attend", "attention"),
                                  (decoders, "_cross_attend", "attention"),
                                  (decoders, "_with_column", "cache"),
                                  (search.Beams, "advance", "search"),
                                  (search.Greedy, "advance", "search"),
                                  (session_module, "advance_all", "search")):
        undo.append((owner, name, getattr(owner, name)))
        clock.wrap(owner, name, category)
    clock.wrap(session.running, "after_step", "cache")
    clock.wrap(session, "_encode_and_join", "encode")

    def restore() -> None:
        for owner, name, original in undo:
            setattr(owner, name, original)

    return restore


def _per_group(searches: list[Any], logits: torch.Tensor) -> list[Any]:
    """search.advance_all without the batching: each group's search on its own rows."""
    out, offset = [], 0
    for search in searches:
        try:
            out.append(search.advance(logits[offset:offset + search.width]))
        except Exception as error:  # noqa: BLE001 - as advance_all reports it
            out.append(error)
        offset += search.width
    return out


def run(model_dir: Path, compute_type: str, args: argparse.Namespace,
        per_group: bool = False) -> dict[str, Any]:
    from throughput import make_articles

    from service.engines.stepping import session as session_module

    from service.engines.torch_engine import TorchEngine

    engine = TorchEngine(Settings(model=str(model_dir), engine="torch", threads=args.threads,
                                  compute_type=compute_type,
                                  convert_cache_dir=str(args.cache / "ctranslate2"))).load()
    texts = make_articles(str(model_dir), args.articles, args.min_tokens, args.max_tokens)
    outputs = Outputs.BOTH if args.outputs == "both" else Outputs.SUMMARY
    option_sets = [{"summary_max_tokens": args.summary_tokens,
                        "summary_min_tokens": args.summary_tokens, "num_beams": args.num_beams},
                   {"summary_max_tokens": args.summary_tokens,
                        "summary_min_tokens": args.summary_tokens, "num_beams": args.num_beams,
                        "length_penalty": 2.0},
                   {"summary_max_tokens": args.summary_tokens // 2,
                        "summary_min_tokens": args.summary_tokens // 2,
                        "num_beams": args.num_beams}]
    admits = []
    for i, text in enumerate(texts):
        params = dataclasses.replace(engine.defaults, outputs=outputs,
                                     headline_max_tokens=args.headline_tokens,
                                     headline_min_tokens=args.headline_tokens,
                                     **option_sets[i % 3])
        admits.append(Admit(i, params, engine.prepare([text], params)[0]))
    engine.warmup()
    session = engine.open_session()
    clock = Clock()
    batched = session_module.advance_all
    if per_group:
        session_module.advance_all = _per_group  # type: ignore[assignment]
    restore = instrument(clock, session)
    steps, rows = 0, 0
    profiler = (torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                if args.torch_profile else contextlib.nullcontext())
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        with profiler:
            out = session.advance(StepIn(admit=tuple(admits)))
            while out.active or out.waiting:
                steps += 1
                rows += out.rows
                out = session.advance(StepIn())
    finally:
        restore()
        session_module.advance_all = batched  # type: ignore[assignment]
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    measured = sum(clock.total.values())
    shares = dict(clock.total)
    shares["other"] = wall - measured
    result = {"compute_type": compute_type,
              "search": "per group" if per_group else "batched", "wall_s": round(wall, 2),
              "cpu_s": round(cpu, 2), "steps": steps,
              "mean_rows": round(rows / max(steps, 1), 1),
              "ms_per_step": round(1000 * (wall - shares.get("encode", 0.0)) / max(steps, 1), 1),
              "seconds": {c: round(shares.get(c, 0.0), 2) for c in CATEGORIES},
              "share": {c: round(shares.get(c, 0.0) / wall, 3) for c in CATEGORIES}}
    if args.torch_profile:
        assert isinstance(profiler, torch.profiler.profile)
        result["top_ops"] = profiler.key_averages().table(sort_by="self_cpu_time_total",
                                                          row_limit=15)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--compute-types", nargs="+", default=["float32", "int8"],
                        choices=("float32", "int8", "bfloat16"))
    parser.add_argument("--articles", type=int, default=12)
    parser.add_argument("--min-tokens", type=int, default=200, help="shortest article")
    parser.add_argument("--max-tokens", type=int, default=400, help="longest article")
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--outputs", choices=("summary", "both"), default="both")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--per-group-search", action="store_true",
                        help="also run each compute type with every group's search advanced "
                             "on its own (the step before search.advance_all batched them)")
    parser.add_argument("--torch-profile", action="store_true",
                        help="also print torch.profiler's top operators (slows the run)")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = cached_preset_checkpoint(args.cache, args.preset)
    print(f"{args.preset} (RANDOM weights), {args.articles} articles of {args.min_tokens}-"
          f"{args.max_tokens} tokens, {args.num_beams} beams, {args.summary_tokens} "
          f"(or {args.summary_tokens // 2}) + {args.headline_tokens} tokens; load average "
          f"{os.getloadavg()}", flush=True)
    results = []
    variants = [False, True] if args.per_group_search else [False]
    for compute_type, per_group in [(c, v) for c in args.compute_types for v in variants]:
        result = run(model_dir, compute_type, args, per_group)
        results.append(result)
        print(f"\n{compute_type}, search {result['search']}: {result['wall_s']} s "
              f"({result['cpu_s']} CPU-s), {result['steps']} steps of "
              f"{result['mean_rows']} rows on average, {result['ms_per_step']} ms per step "
              "(encoding apart)")
        for category in CATEGORIES:
            print(f"  {category:<10} {result['seconds'][category]:7.2f} s "
                  f"{100 * result['share'][category]:5.1f}%")
        if "top_ops" in result:
            print(result.pop("top_ops"))
    print(f"\nload average {os.getloadavg()} at the end")
    print(json.dumps({"benchmark": "step_profile", "preset": args.preset,
                      "results": results}, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
