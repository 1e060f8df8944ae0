"""Interactive calls beside a bulk back-fill (issue 20): latency per class, bulk throughput kept.

One real server per configuration (`summarizer serve`, a separate process, one engine worker with
all cores) on a real-size random-weight checkpoint (`--preset`, bart-base by default) with fixed
output lengths (min = max tokens), driven over gRPC:

- bulk: a saturating stream of long single-article calls (`--bulk-min/max-input-tokens`,
  ~400 tokens), 4 beams, a 48-token summary and a 12-token headline, `--bulk-in-flight` (16)
  callers each sending its next call when its last is answered;
- interactive: single-article calls (150-300 tokens), 2 beams, 16 + 12 tokens, Poisson
  arrivals (seeded) over `--window-s`, `--interactive-interval-s` apart on average; by default
  the interval is set per configuration so that the calls need `--interactive-busy` (25%) of the
  server's time (their unloaded latency / 0.25): on a loaded shared machine a fixed interval can
  ask for more than the whole machine.

Per configuration, on the same server: each interactive article alone (its unloaded latency),
`--bulk-unloaded-calls` bulk calls alone; then the bulk stream alone for `--window-s` (after
`--ramp-s` to fill up), then the bulk stream again with the interactive calls over a window of
the same length. Reported:

- per class, p50/p99/worst of each call's latency over its unloaded latency (interactive: the
  same article alone; bulk: the median bulk call alone; the calls in flight during the window);
- bulk throughput beside the interactive calls over bulk alone (articles per second inside each
  window, each call counted by the share of its lifetime inside it), judged against the
  work-conserving share: bulk alone x (1 - busy fraction), where
  the busy fraction is calls x unloaded interactive latency / window (the machine time the
  interactive calls need themselves).

Configurations (`--configs`): `default` (`--engine auto`: ctranslate2 int8, static batches),
`torch` (`--engine torch`: continuous batching, float32) and `torch-int8` (`--engine torch
--compute-type int8`: continuous batching in int8). Targets (issue 20): interactive worst <= 2.5x,
median <= 1.5x, bulk >= 90% of its work-conserving share.

Priorities: where the client's generated stubs have a `priority` field on SummarizeRequest,
interactive calls are sent INTERACTIVE and bulk calls BULK (`--priorities auto`); `off` sends
none (the "before" figures on a server that has them), `on` insists.

    python benchmarks/mix.py                      # both configurations, 8-11 min on 2 loaded cores
    python benchmarks/mix.py --configs torch --window-s 90 --interactive-interval-s 2

Run it from the repository root. Ratios within one run are what count: absolute times vary up to
2x between runs on a shared machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb

from service.engines.tiny import PRESETS, cached_preset_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from continuous import (
    OptionSet,
    Outcome,
    Pending,
    Server,
    ServerRefused,
    check,
    load_average,
    warm_up,
)
from throughput import make_articles, percentile
from plots import latency_by_class_svg

CONFIGS = {"default": ["--engine", "auto"], "torch": ["--engine", "torch"],
           "torch-int8": ["--engine", "torch", "--compute-type", "int8"]}
LABELS = {"default": "default (--engine auto)", "torch": "--engine torch (continuous)",
          "torch-int8": "--engine torch --compute-type int8 (continuous)"}
BULK = OptionSet("bulk", 48, 4)
INTERACTIVE = OptionSet("interactive", 16, 2)


# ----- priorities, where the stubs have them -----

def priority_fields(mode: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """SummarizeRequest fields for (interactive, bulk) calls and a note saying which. The field
    `priority` is looked up in the generated stubs: an enum whose value names hold INTERACTIVE
    and BULK, or an integer (the service's classes: 0 interactive, 2 bulk)."""
    field = pb.SummarizeRequest.DESCRIPTOR.fields_by_name.get("priority")
    if mode == "off" or field is None:
        if mode == "on":
            raise SystemExit("--priorities on: this client's stubs have no "
                             "SummarizeRequest.priority")
        return {}, {}, ("none sent (" + ("--priorities off" if field is not None
                                         else "the stubs have no SummarizeRequest.priority")
                        + ")")
    if field.enum_type is not None:
        names = {value.name: value.number for value in field.enum_type.values}
        interactive = [n for name, n in names.items() if "INTERACTIVE" in name]
        bulk = [n for name, n in names.items() if "BULK" in name]
        if not (interactive and bulk):
            raise SystemExit(f"SummarizeRequest.priority has no INTERACTIVE/BULK values: "
                             f"{sorted(names)}")
        values = interactive[0], bulk[0]
    else:
        values = 0, 2
    return ({"priority": values[0]}, {"priority": values[1]},
            f"interactive calls send priority={values[0]}, bulk calls {values[1]}")


# ----- the load -----

class BulkStream:
    """`in_flight` callers, each sending its next bulk call when its last one is answered, until
    `stop()`; `stop()` waits for the calls in flight (the server is idle afterwards). The
    callers' first calls are spread over `stagger_s`, so that (with fixed output lengths) their
    articles do not all start and end in the same step, wave after wave."""

    def __init__(self, server: Server, texts: list[str], options: pb.GenerationOptions,
                 in_flight: int, fields: dict[str, Any], stagger_s: float) -> None:
        self.server, self.texts, self.options, self.fields = server, texts, options, fields
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._next = 0
        self._threads = [threading.Thread(target=self._caller, args=(i * stagger_s / in_flight,),
                                          daemon=True)
                         for i in range(in_flight)]

    def start(self) -> BulkStream:
        self.started_s = time.perf_counter()
        for thread in self._threads:
            thread.start()
        return self

    def _caller(self, delay_s: float) -> None:
        if self._stopping.wait(delay_s):
            return
        while not self._stopping.is_set():
            with self._lock:
                index, self._next = self._next, self._next + 1
            text = self.texts[index % len(self.texts)]
            outcome = Pending(self.server.stub, text, self.options, f"bulk{index}",
                              **self.fields).wait()
            with self._lock:
                self.outcomes.append(outcome)

    def stop(self) -> list[Outcome]:
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        return self.outcomes

    def completed_between(self, start_s: float, end_s: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start_s <= o.done_s < end_s]

    def overlapping(self, start_s: float, end_s: float) -> list[Outcome]:
        """The calls that were in flight at some point of [start_s, end_s] (after `stop()`)."""
        return [o for o in self.outcomes if o.sent_s < end_s and o.done_s > start_s]

    def rate(self, start_s: float, end_s: float) -> float:
        """Articles per second over [start_s, end_s], counting each call by the share of its
        lifetime inside the window (after `stop()`, when every call has ended): Little's law
        call by call, so it does not matter where a window cuts a wave of completions."""
        work = sum(max(0.0, min(o.done_s, end_s) - max(o.sent_s, start_s)) / o.latency_s
                   for o in self.outcomes if o.latency_s > 0)
        return work / (end_s - start_s)


def poisson_arrivals(window_s: float, interval_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    arrivals, at = [], rng.expovariate(1 / interval_s)
    while at < window_s:
        arrivals.append(at)
        at += rng.expovariate(1 / interval_s)
    return arrivals


def ratios(values: list[float]) -> dict[str, float]:
    return {"p50": round(percentile(values, 50), 2), "p99": round(percentile(values, 99), 2),
            "worst": round(max(values), 2)}


@dataclass
class Texts:
    bulk: list[str]
    interactive: list[str]


# ----- one configuration -----

def run_config(name: str, model: Path, texts: Texts, args: argparse.Namespace,
               fields: tuple[dict[str, Any], dict[str, Any]],
               latencies: dict[str, list[float]]) -> dict[str, Any]:
    """One configuration's row of the report; `latencies` gets its calls' latencies in seconds,
    by class (for the figure)."""
    interactive_fields, bulk_fields = fields
    bulk_options = BULK.options("both", args.headline_tokens)
    interactive_options = INTERACTIVE.options("both", args.headline_tokens)
    row: dict[str, Any] = {"load_average_start": load_average()}
    server = Server(model, CONFIGS[name] + args.server_flags, args)
    try:
        server.start()
    except ServerRefused as refusal:
        return {"refused": str(refusal)}
    with server:
        warm_up(server, texts.interactive[0])
        # Unloaded latencies, each call alone.
        alone = [Pending(server.interactive_stub, text, interactive_options, f"interactive{i}",
                         **interactive_fields).wait()
                 for i, text in enumerate(texts.interactive)]
        check(alone, f"{name}: interactive calls alone")
        unloaded = [o.latency_s for o in alone]
        bulk_alone_calls = [Pending(server.stub, texts.bulk[i % len(texts.bulk)], bulk_options,
                                    f"bulk-alone{i}", **bulk_fields).wait()
                            for i in range(args.bulk_unloaded_calls)]
        check(bulk_alone_calls, f"{name}: bulk calls alone")
        bulk_unloaded = statistics.median(o.latency_s for o in bulk_alone_calls)
        print(f"  {name}: unloaded interactive {statistics.median(unloaded):.2f} s (median), "
              f"bulk {bulk_unloaded:.2f} s", flush=True)

        # The bulk stream alone.
        stream = BulkStream(server, texts.bulk, bulk_options, args.bulk_in_flight,
                            bulk_fields, args.ramp_s).start()
        time.sleep(args.ramp_s)  # the stream fills the server; nothing is measured meanwhile
        window_start = time.perf_counter()
        time.sleep(args.window_s)
        window_end = window_start + args.window_s
        alone_done = stream.completed_between(window_start, window_end)
        check(stream.stop(), f"{name}: bulk alone")
        bulk_alone_rate = stream.rate(window_start, window_end)
        alone_calls = stream.overlapping(window_start, window_end)
        print(f"  {name}: bulk alone {bulk_alone_rate:.3f} articles/s", flush=True)

        # The bulk stream with the interactive calls beside it.
        stream = BulkStream(server, texts.bulk, bulk_options, args.bulk_in_flight,
                            bulk_fields, args.ramp_s).start()
        time.sleep(args.ramp_s)
        interval_s = (args.interactive_interval_s
                      or statistics.median(unloaded) / args.interactive_busy)
        arrivals = poisson_arrivals(args.window_s, interval_s, args.seed)
        pendings: list[tuple[int, Pending]] = []
        window_start = time.perf_counter()
        for n, at in enumerate(arrivals):
            delay = window_start + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            index = n % len(texts.interactive)
            pendings.append((index, Pending(server.interactive_stub, texts.interactive[index],
                                            interactive_options, f"interactive{n}",
                                            **interactive_fields)))
        delay = window_start + args.window_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        window_end = window_start + args.window_s
        beside_done = stream.completed_between(window_start, window_end)
        interactive = [(index, pending.wait()) for index, pending in pendings]
        check(stream.stop(), f"{name}: bulk beside interactive")
        bulk_beside_rate = stream.rate(window_start, window_end)
        beside_calls = stream.overlapping(window_start, window_end)
        check([o for _, o in interactive], f"{name}: interactive calls under the back-fill")
    row["load_average_end"] = load_average()
    latencies[f"{name}: interactive, beside bulk"] = [o.latency_s for _, o in interactive]
    latencies[f"{name}: bulk, beside interactive"] = [o.latency_s for o in beside_done]
    latencies[f"{name}: bulk alone"] = [o.latency_s for o in alone_done]

    interactive_ratios = [o.latency_s / unloaded[index] for index, o in interactive]
    mean_unloaded = statistics.mean(unloaded[index] for index, _ in interactive) if interactive \
        else 0.0
    busy = len(interactive) * mean_unloaded / args.window_s
    share = bulk_alone_rate * max(0.0, 1 - busy)
    row.update({
        "server_flags": server.flags,
        "interactive_interval_s": round(interval_s, 2),
        "interactive_calls": len(interactive),
        "interactive_unloaded_s": {"median": round(statistics.median(unloaded), 3),
                                   "max": round(max(unloaded), 3)},
        "interactive_latency_s": ({"p50": round(percentile([o.latency_s for _, o in interactive],
                                                           50), 3),
                                   "worst": round(max(o.latency_s for _, o in interactive), 3)}
                                  if interactive else {}),
        "interactive_vs_unloaded": ratios(interactive_ratios) if interactive else {},
        "bulk_unloaded_s": round(bulk_unloaded, 3),
        "bulk_alone_vs_unloaded": ratios([o.latency_s / bulk_unloaded for o in alone_calls]),
        "bulk_beside_vs_unloaded": ratios([o.latency_s / bulk_unloaded for o in beside_calls]),
        "bulk_completed_in_window": {"alone": len(alone_done), "beside": len(beside_done)},
        "bulk_alone_articles_per_s": round(bulk_alone_rate, 3),
        "bulk_beside_articles_per_s": round(bulk_beside_rate, 3),
        "bulk_kept": round(bulk_beside_rate / bulk_alone_rate, 3) if bulk_alone_rate else None,
        "interactive_busy_fraction": round(busy, 3),
        "bulk_work_conserving_share_per_s": round(share, 3),
        "bulk_vs_share": round(bulk_beside_rate / share, 3) if share else None,
    })
    return row


def report(rows: dict[str, dict[str, Any]]) -> list[str]:
    header = (f"  {'configuration':<30} {'interactive x unloaded':>24} "
              f"{'bulk x unloaded':>20} {'bulk art/s alone':>16} {'beside':>7} {'kept':>6} "
              f"{'busy':>5} {'vs share':>8}")
    lines = [header, f"  {'':<30} {'p50 / p99 / worst':>24} {'p50 / p99 / worst':>20}"]
    for name, row in rows.items():
        if "refused" in row:
            lines.append(f"  {LABELS[name]:<30} refused to start: {row['refused']}")
            continue
        inter, bulk = row["interactive_vs_unloaded"], row["bulk_beside_vs_unloaded"]
        inter_s = (f"{inter['p50']:.1f} / {inter['p99']:.1f} / {inter['worst']:.1f}x"
                   if inter else "no calls")
        bulk_s = (f"{bulk['p50']:.1f} / {bulk['p99']:.1f} / {bulk['worst']:.1f}x"
                  if bulk else "none done")
        kept = "-" if row["bulk_kept"] is None else f"{row['bulk_kept']:.0%}"
        vs_share = "-" if row["bulk_vs_share"] is None else f"{row['bulk_vs_share']:.0%}"
        lines.append(
            f"  {LABELS[name]:<30} {inter_s:>24} {bulk_s:>20} "
            f"{row['bulk_alone_articles_per_s']:16.3f} {row['bulk_beside_articles_per_s']:7.3f} "
            f"{kept:>6} {row['interactive_busy_fraction']:5.2f} {vs_share:>8}")
        lines.append(f"  {'':<30} {row['interactive_calls']} interactive calls, unloaded "
                     f"{row['interactive_unloaded_s']['median']:.2f} s median; bulk unloaded "
                     f"{row['bulk_unloaded_s']:.2f} s; load average "
                     f"{row['load_average_start']} -> {row['load_average_end']}")
    lines.append("  x unloaded: a call's latency over its latency alone on the same server "
                 "(interactive: the same article; bulk: the median bulk call alone, over the "
                 "calls in flight during the window)")
    lines.append("  kept: bulk articles/s beside the interactive calls over bulk alone; vs share: "
                 "over bulk alone x (1 - busy), busy = calls x unloaded interactive latency / "
                 "window")
    lines.append("  targets (issue 20): interactive p50 <= 1.5x and worst <= 2.5x, bulk >= 90% "
                 "of its share")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS),
                        default=["default", "torch"])
    parser.add_argument("--priorities", choices=("auto", "on", "off"), default="auto",
                        help="send priorities where the stubs have them (auto), insist (on), or "
                             "send none (off: the 'before' figures)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--threads", type=int, default=0,
                        help="the worker's threads; 0: all cores")
    parser.add_argument("--window-s", type=float, default=60.0,
                        help="seconds each measuring window lasts (bulk alone, then beside the "
                             "interactive calls)")
    parser.add_argument("--ramp-s", type=float, default=15.0,
                        help="seconds the bulk stream runs before a window starts; its callers' "
                             "first calls are spread over it")
    parser.add_argument("--interactive-interval-s", type=float, default=0.0,
                        help="mean seconds between interactive arrivals (Poisson); the number "
                             "of calls is about window / interval. 0: the unloaded interactive "
                             "latency / --interactive-busy, per configuration (the calls then "
                             "need the same share of each server's time)")
    parser.add_argument("--interactive-busy", type=float, default=0.25,
                        help="with --interactive-interval-s 0: the busy fraction to offer")
    parser.add_argument("--interactive-articles", type=int, default=8,
                        help="distinct interactive articles (each timed alone first)")
    parser.add_argument("--bulk-in-flight", type=int, default=16)
    parser.add_argument("--bulk-articles", type=int, default=24)
    parser.add_argument("--bulk-unloaded-calls", type=int, default=2)
    parser.add_argument("--bulk-min-input-tokens", type=int, default=350)
    parser.add_argument("--bulk-max-input-tokens", type=int, default=450)
    parser.add_argument("--interactive-min-input-tokens", type=int, default=150)
    parser.add_argument("--interactive-max-input-tokens", type=int, default=300)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--server-flags", type=shlex.split, default=[],
                        help="more flags for every server, as one string")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--plot-dir", type=Path, default=Path("."),
                        help="where to write mix-latency.svg (latency per class)")
    parser.add_argument("--no-plots", action="store_true", help="write no figure")
    args = parser.parse_args()
    if args.window_s <= 0 or args.interactive_interval_s < 0 or not 0 < args.interactive_busy < 1:
        parser.error("--window-s must be positive, --interactive-interval-s not negative, "
                     "--interactive-busy between 0 and 1")

    interactive_fields, bulk_fields, priority_note = priority_fields(args.priorities)
    model = cached_preset_checkpoint(args.cache, args.preset)
    texts = Texts(
        bulk=make_articles(str(model), args.bulk_articles, args.bulk_min_input_tokens,
                           args.bulk_max_input_tokens, seed=5),
        interactive=make_articles(str(model), args.interactive_articles,
                                  args.interactive_min_input_tokens,
                                  args.interactive_max_input_tokens, seed=6))
    started = time.perf_counter()
    print(f"checkpoint {args.preset} (random weights, fixed output lengths); one worker, "
          f"{args.threads or 'all'} thread(s); {os.cpu_count()} CPUs; load average "
          f"{load_average()} at the start", flush=True)
    print(f"bulk: {args.bulk_in_flight} in flight, {BULK.describe()} + {args.headline_tokens}-"
          f"token headline, {args.bulk_min_input_tokens}-{args.bulk_max_input_tokens}-token "
          f"articles; interactive: Poisson every "
          f"{args.interactive_interval_s or f'(unloaded / {args.interactive_busy:g})'} s on "
          f"average over {args.window_s:g} s, {INTERACTIVE.describe()} + "
          f"{args.headline_tokens}-token "
          f"headline; priorities: {priority_note}", flush=True)
    rows = {}
    latencies: dict[str, list[float]] = {}
    for name in args.configs:
        rows[name] = run_config(name, model, texts, args, (interactive_fields, bulk_fields),
                                latencies)
        print(f"  {name}: " + json.dumps(rows[name], separators=(",", ":")), flush=True)
    elapsed = time.perf_counter() - started
    if latencies and not args.no_plots:
        figure = latency_by_class_svg(
            args.plot_dir / "mix-latency.svg", latencies,
            title=f"Call latency per class: {args.preset} (random weights); load average "
                  f"{' '.join(f'{x:g}' for x in load_average())}")
        print(f"figure: {figure}", flush=True)
    print(f"\n---- mixed load ({elapsed / 60:.1f} min; load average {load_average()} at the "
          f"end; priorities: {priority_note})")
    for line in report(rows):
        print(line)
    print(json.dumps({"benchmark": "mix", "preset": args.preset, "threads": args.threads,
                      "priorities": priority_note, "window_s": args.window_s,
                      "minutes": round(elapsed / 60, 1), "configs": rows},
                     separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
