"""Continuous (iteration-level) vs static batching: four scenarios on real servers over gRPC.

Each scenario starts one real server per mode (`summarizer serve`, a separate process, one engine
worker process with all cores), on a real-size random-weight checkpoint (`--preset`), and drives
it with real gRPC calls over a socket. The modes:

- `static`: `--engine torch --compute-type float32 --batching static` (today's batching: only
  calls with identical options share a batch, and a batch runs until its longest sequence ends);
- `continuous`: the same engine with `--batching continuous` (sequence groups join and leave the
  running set between decoding steps);
- `reference`: the default engine (`--engine auto`: ctranslate2 int8 on a CPU), static batching,
  as a reference row where it is cheap (`--reference`).

`--torch-compute-type int8` (or bfloat16, float16) runs both torch modes in that type (the token
check then compares int8 continuous with int8 static alone); `--reference-flags` names the
reference's engine explicitly, e.g. `--reference-flags='--engine ctranslate2 --compute-type int8'`.

On a server without the `--batching` setting, `static` runs without the flag (static batching is
then all it has) and `continuous` is skipped with a note.

Scenarios (`--scenarios`, all by default):

1. `mixed`: 12 concurrent single-article callers in three option sets (A: 16-token summaries, 2
   beams; B: 40 tokens, 4 beams; C: 40 tokens, 4 beams, length_penalty 2.0; fixed lengths,
   summary only unless `--outputs both`), against the same calls one at a time on the same
   server: wall time, per-call latency, and whether every result (text and token counts) equals
   the solo result of the static torch server (the reference for token-exactness).
2. `hol` (head-of-line blocking): five long calls (96 tokens, 4 beams) are decoding when a short
   greedy call (8 tokens, 1 beam) arrives: its latency as a multiple of its latency alone.
3. `load` (latency under load): capacity (articles/s) from a closed loop of mixed calls, then
   open-loop Poisson arrivals (seeded) at `--load-fraction` of that capacity for
   `--load-seconds`: p50/p99 latency, each call's latency divided by its option set's unloaded
   latency (measured alone on the same server).
4. `lengths` (varied output lengths): a copy of the checkpoint whose end-of-sequence logit is
   raised (`service.engines.tiny.build_varied_length_checkpoint`, calibrated once on these
   articles and cached) so that summaries end between 56 and 142 tokens as BART-CNN's do (its
   min/max new tokens and no_repeat_ngram_size 3): throughput of all articles sent at once, and
   the output length distribution. Greedy by default: the calibration is exact for greedy
   decoding, while with beams the summaries of this random-weight model ran (nearly) to 142
   tokens whatever the bias (bart-base preset: 2 and 4 beams with BART-CNN's length_penalty 2.0,
   4 beams with 1.0): some beam always avoids the end. `--lengths-beams` and `--lengths-penalty`
   are there to check that on other presets.

Every figure is a ratio measured within one run; absolute times vary up to 2x between runs on a
shared machine (the load average is printed at the start and end of each scenario). A compact
table per scenario, then one JSON line with all figures.

    python benchmarks/continuous.py                                 # all scenarios, ~10 min
    python benchmarks/continuous.py --scenarios hol --modes static continuous
    python benchmarks/continuous.py --scenarios load --load-seconds 90 --preset distilbart-cnn-12-6

Run it from the repository root (the servers run this checkout's `python -m service`). On 2
cores a default run takes about 5 minutes per torch mode plus 1 for the reference rows; the first
one also builds the checkpoints into --cache (the varied-length one calibrates on greedy decoding
of scenario 4's articles: a few minutes, once).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shlex
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

# This checkout's `service`, as the servers started from the repository root (`python -m service`)
# import it, not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.engines.tiny import (PRESETS, VARIED_LENGTHS_FILE, build_varied_length_checkpoint,
                                  cached_preset_checkpoint)
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import cpu_seconds, start_server  # noqa: E402 - sibling helpers
from throughput import make_articles, percentile, process_tree  # noqa: E402

SCENARIOS = ("mixed", "hol", "load", "lengths")
MODES = ("static", "continuous", "reference")
CALL_TIMEOUT_S = 3600.0


# ----- options -----

@dataclass(frozen=True)
class OptionSet:
    """One set of generation options; the summary length is fixed (min = max) unless
    `min_tokens` is given."""

    name: str
    summary_tokens: int
    num_beams: int
    length_penalty: float | None = None
    min_tokens: int | None = None
    no_repeat_ngram_size: int | None = None

    def options(self, outputs: str = "summary", headline_tokens: int = 12) -> pb.GenerationOptions:
        options = pb.GenerationOptions(
            summary_max_tokens=self.summary_tokens,
            summary_min_tokens=self.summary_tokens if self.min_tokens is None else self.min_tokens,
            num_beams=self.num_beams,
            outputs=pb.OUTPUTS_BOTH if outputs == "both" else pb.OUTPUTS_SUMMARY)
        if outputs == "both":
            options.headline_min_tokens = options.headline_max_tokens = headline_tokens
        if self.length_penalty is not None:
            options.length_penalty = self.length_penalty
        if self.no_repeat_ngram_size is not None:
            options.no_repeat_ngram_size = self.no_repeat_ngram_size
        return options

    def describe(self) -> str:
        length = (f"{self.summary_tokens}" if self.min_tokens is None
                  else f"{self.min_tokens}-{self.summary_tokens}")
        extra = "".join([f", length_penalty {self.length_penalty}" if self.length_penalty
                         is not None else "",
                         f", no_repeat_ngram_size {self.no_repeat_ngram_size}"
                         if self.no_repeat_ngram_size is not None else ""])
        return f"{self.name}: {length} tokens, {self.num_beams} beam(s){extra}"


MIXED = (OptionSet("A", 16, 2), OptionSet("B", 40, 4), OptionSet("C", 40, 4, 2.0))
HOL_LONG = OptionSet("long", 96, 4)
HOL_SHORT = OptionSet("short", 8, 1)


def varied_length_options(beams: int, length_penalty: float | None) -> OptionSet:
    """BART-CNN's lengths (56 to 142 tokens) and its no_repeat_ngram_size 3, which is also what
    makes a random-weight model's decoding, and so its length, differ between articles."""
    return OptionSet("cnn", 142, beams, length_penalty, min_tokens=56, no_repeat_ngram_size=3)


# ----- servers and calls -----

def has_batching_setting() -> bool:
    """Whether this checkout's server has the --batching setting (continuous batching)."""
    from service.config import fields

    return any(item.name == "batching" for item in fields())


TORCH_COMPUTE_TYPE = ["float32"]
"""The torch modes' compute type (`--torch-compute-type`), set once by main()."""
REFERENCE_FLAGS = [["--engine", "auto"]]
"""The reference mode's engine flags (`--reference-flags`), set once by main()."""


def mode_flags(mode: str, batching: bool) -> list[str] | None:
    """Server flags for a mode; None when this server cannot run it."""
    if mode == "reference":
        return list(REFERENCE_FLAGS[0])  # by default --compute-type auto: the Quick start's
    torch = ["--engine", "torch", "--compute-type", TORCH_COMPUTE_TYPE[0]]
    if not batching:
        return None if mode == "continuous" else torch
    return [*torch, "--batching", mode]


def mode_label(mode: str) -> str:
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
    return {"reference": f"reference ({' '.join(REFERENCE_FLAGS[0][1:]) or 'auto'}, static)"}.get(
        mode, f"torch {short.get(TORCH_COMPUTE_TYPE[0], TORCH_COMPUTE_TYPE[0])} {mode}")


class ServerRefused(Exception):
    """A server that exited before SERVING (e.g. a --batching mode its engine cannot run)."""


REFUSED: dict[str, str] = {}
"""Modes whose server refused to start, with why: not tried again in later scenarios."""


class Server:
    """A real server for one mode, started on a free port and stopped (SIGTERM) on exit. Its log
    is read all along (a full pipe would stall it); the last lines are kept for errors."""

    def __init__(self, model: Path, flags: list[str], args: argparse.Namespace) -> None:
        self.model = model
        self.flags = ["--offline", "--workers", "1", "--threads", str(args.threads),
                      "--convert-cache-dir", str(args.cache / "ctranslate2"), *flags]
        self.log: collections.deque[str] = collections.deque(maxlen=50)

    def start(self) -> Server:
        """Start the server; ServerRefused, with its error line, when it does not come up."""
        started, startup_log = time.perf_counter(), []
        try:
            self.process, target = start_server(self.model, self.flags, startup_log)
        except SystemExit as refusal:
            errors = [line.strip() for line in startup_log if "error" in line.lower()]
            raise ServerRefused(errors[-1] if errors else str(refusal)) from None
        self.start_s = time.perf_counter() - started
        threading.Thread(target=self._drain, daemon=True).start()
        self.channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024)])
        self.stub = pb_grpc.SummarizerStub(self.channel)
        # A connection of its own for interactive calls (mix.py), as the Python client keeps:
        # calls past the server's --max-streams-per-connection wait inside the client.
        self.interactive_channel = grpc.insecure_channel(target, options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.use_local_subchannel_pool", 1)])
        self.interactive_stub = pb_grpc.SummarizerStub(self.interactive_channel)
        return self

    def __enter__(self) -> Server:
        return self

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)

    def cpu_s(self) -> float:
        """CPU time of the server and its worker so far."""
        return sum(cpu_seconds(pid) for pid in process_tree(self.process.pid))

    def __exit__(self, kind: type | None, *exc: Any) -> None:
        if kind is not None:  # the server's last words help more than the client's
            print("server log, last lines:\n" + "".join(self.log), file=sys.stderr, flush=True)
        self.channel.close()
        self.interactive_channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=120)
        except Exception:  # noqa: BLE001 - a server that will not stop must not outlive us
            self.process.kill()
            self.process.wait()


@dataclass
class Outcome:
    """One call's result and timing."""

    label: str
    sent_s: float
    done_s: float = float("nan")
    summary: str = ""
    headline: str = ""
    summary_tokens: int = 0
    headline_tokens: int = 0
    error: str = ""

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s

    def result(self) -> tuple[str, str, int, int]:
        return self.summary, self.headline, self.summary_tokens, self.headline_tokens


class Pending:
    """A call in flight (a gRPC future): its completion time is taken in the callback, so that
    waiting on other calls first does not inflate it."""

    def __init__(self, stub: pb_grpc.SummarizerStub, text: str, options: pb.GenerationOptions,
                 label: str, **request_fields: Any) -> None:
        """`request_fields`: more SummarizeRequest fields (e.g. a priority, where the stubs
        have one)."""
        self.outcome = Outcome(label, time.perf_counter())
        self.done = threading.Event()
        self.future = stub.Summarize.future(
            pb.SummarizeRequest(articles=[pb.Article(id=label, text=text)], options=options,
                                **request_fields),
            timeout=CALL_TIMEOUT_S)
        self.future.add_done_callback(self._finished)

    def _finished(self, future: grpc.Future) -> None:
        outcome = self.outcome
        outcome.done_s = time.perf_counter()
        try:
            [result] = future.result().results
        except grpc.RpcError as error:
            outcome.error = f"{error.code().name}: {error.details()}"
        except Exception as error:  # noqa: BLE001 - a reply we cannot read must not hang us
            outcome.error = repr(error)
        else:
            if result.HasField("error"):
                outcome.error = f"{result.error.code}: {result.error.message}"
            outcome.summary, outcome.headline = result.summary, result.headline
            outcome.summary_tokens = result.summary_tokens
            outcome.headline_tokens = result.headline_tokens
        self.done.set()

    def wait(self) -> Outcome:
        self.done.wait()
        return self.outcome


def call(stub: pb_grpc.SummarizerStub, text: str, options: pb.GenerationOptions,
         label: str = "a") -> Outcome:
    return Pending(stub, text, options, label).wait()


def all_at_once(stub: pb_grpc.SummarizerStub,
                jobs: list[tuple[str, pb.GenerationOptions, str]]) -> tuple[float, list[Outcome]]:
    """Every job as its own call, all sent at once: (wall seconds, outcomes in job order)."""
    started = time.perf_counter()
    pendings = [Pending(stub, text, options, label) for text, options, label in jobs]
    outcomes = [p.wait() for p in pendings]
    return time.perf_counter() - started, outcomes


def one_at_a_time(stub: pb_grpc.SummarizerStub,
                  jobs: list[tuple[str, pb.GenerationOptions, str]],
                  ) -> tuple[float, list[Outcome]]:
    started = time.perf_counter()
    outcomes = [call(stub, text, options, label) for text, options, label in jobs]
    return time.perf_counter() - started, outcomes


def warm_up(server: Server, text: str) -> None:
    """First-call costs out of the way (the server warmed up greedy decoding before SERVING):
    a short call with beams."""
    check([call(server.stub, text, OptionSet("warm-up", 4, 4).options())], "warm-up")


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.label}: {o.error}" for o in outcomes if o.error]


def check(outcomes: list[Outcome], what: str) -> None:
    """Stop on a failed call: figures over failed calls would mislead."""
    failed = failures(outcomes)
    if failed:
        raise SystemExit(f"{what}: {len(failed)} call(s) failed, e.g. {failed[0]}")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def secs(values: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max of latencies, rounded for the JSON line."""
    return {"p50": round(percentile(values, 50), 3), "p90": round(percentile(values, 90), 3),
            "p99": round(percentile(values, 99), 3), "max": round(max(values), 3)}


@dataclass
class Scenario:
    """What a scenario prints and puts in the JSON line."""

    name: str
    lines: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)


def runnable_modes(args: argparse.Namespace, scenario: str, batching: bool,
                   report: Scenario) -> list[tuple[str, list[str]]]:
    modes = []
    for mode in args.modes:
        if mode == "reference" and scenario not in args.reference:
            continue
        flags = mode_flags(mode, batching)
        if flags is None:
            report.say(f"  {mode}: skipped (this server has no --batching setting yet)")
        elif mode in REFUSED:
            report.say(f"  {mode}: skipped (its server refused to start: {REFUSED[mode]})")
        else:
            modes.append((mode, flags))
    return modes


def start(mode: str, model: Path, flags: list[str], args: argparse.Namespace,
          report: Scenario) -> Server | None:
    """A started server for `mode`, or None (said in the report) when it refused to start."""
    try:
        return Server(model, flags + args.server_flags, args).start()
    except ServerRefused as refusal:
        REFUSED[mode] = str(refusal)
        report.say(f"  {mode}: skipped (its server refused to start: {refusal})")
        return None


# ----- scenario 1: mixed options -----

def scenario_mixed(model: Path, args: argparse.Namespace, batching: bool) -> Scenario:
    report = Scenario("mixed")
    texts = make_articles(str(model), args.mixed_articles, args.min_input_tokens,
                          args.max_input_tokens, seed=1)
    jobs = [(text, MIXED[i % len(MIXED)].options(args.outputs, args.headline_tokens),
             f"{MIXED[i % len(MIXED)].name}{i}") for i, text in enumerate(texts)]
    report.say(f"== 1. mixed options: {len(jobs)} concurrent single-article callers in "
               f"{len(MIXED)} option sets ({'; '.join(s.describe() for s in MIXED)}), "
               + ("summary only" if args.outputs == "summary" else
                  f"summary and a {args.headline_tokens}-token headline"))
    report.figures["load_average_start"] = load_average()
    solo_reference: list[tuple] | None = None
    rows = {}
    for mode, flags in runnable_modes(args, "mixed", batching, report):
        if (server := start(mode, model, flags, args, report)) is None:
            continue
        with server:
            warm_up(server, texts[0])
            seq_s, solo = one_at_a_time(server.stub, jobs)
            check(solo, f"{mode} one at a time")
            cpu = server.cpu_s()
            conc_s, together = all_at_once(server.stub, jobs)
            cpu = server.cpu_s() - cpu
            check(together, f"{mode} all at once")
        if mode != "reference" and solo_reference is None:
            solo_reference = [o.result() for o in solo]
        reference = ([o.result() for o in solo] if mode == "reference" else solo_reference)
        same = sum(o.result() == r for o, r in zip(together, reference))
        same_solo = sum(o.result() == r for o, r in zip(solo, reference))
        latencies = [o.latency_s for o in together]
        by_set = {s.name: round(statistics.mean(o.latency_s for o in together
                                                if o.label.startswith(s.name)), 3)
                  for s in MIXED}
        solo_by_set = {s.name: round(statistics.mean(o.latency_s for o in solo
                                                     if o.label.startswith(s.name)), 3)
                       for s in MIXED}
        rows[mode] = {
            "sequential_s": round(seq_s, 2), "concurrent_s": round(conc_s, 2),
            "speedup_vs_sequential": round(seq_s / conc_s, 2),
            "concurrent_latency_s": secs(latencies), "concurrent_mean_by_set_s": by_set,
            "solo_mean_by_set_s": solo_by_set,
            "concurrent_cpu_s": round(cpu, 1),
            "identical_to_solo": f"{same}/{len(jobs)}",
            "solo_identical_to_reference_solo": f"{same_solo}/{len(jobs)}",
            "solo_reference": ("own solo run" if mode == "reference"
                               else "first torch mode's solo run"),
            "server_start_s": round(server.start_s, 1)}
        print(f"  {mode}: done ({rows[mode]['concurrent_s']} s concurrent)", flush=True)
    report.figures["load_average_end"] = load_average()
    report.figures["modes"] = rows
    names = "/".join(s.name for s in MIXED)
    report.say(f"  {'mode':<30} {'seq s':>7} {'conc s':>7} {'speedup':>7} {'p50 s':>6} "
               f"{'max s':>6} {'conc mean s ' + names:>20} {'solo mean s ' + names:>20} "
               f"same as solo")
    for mode, row in rows.items():
        lat = row["concurrent_latency_s"]
        by_set = "/".join(f"{v:.2f}" for v in row["concurrent_mean_by_set_s"].values())
        solo_by_set = "/".join(f"{v:.2f}" for v in row["solo_mean_by_set_s"].values())
        report.say(
            f"  {mode_label(mode):<30} {row['sequential_s']:7.2f} {row['concurrent_s']:7.2f} "
            f"{row['speedup_vs_sequential']:6.2f}x {lat['p50']:6.2f} {lat['max']:6.2f} "
            f"{by_set:>20} {solo_by_set:>20} "
            f"{row['identical_to_solo']} (solo: {row['solo_identical_to_reference_solo']})")
    if "static" in rows and "continuous" in rows:
        ratio = rows["static"]["concurrent_s"] / rows["continuous"]["concurrent_s"]
        report.figures["continuous_speedup_vs_static"] = round(ratio, 2)
        report.say(f"  continuous vs static, wall time of the concurrent calls: {ratio:.2f}x")
    report.say("  same as solo: concurrent results (text and token counts) equal to the first "
               "torch mode's solo results (reference: its own); in brackets, that mode's own "
               "solo run against them")
    report.say(f"  load average {report.figures['load_average_start']} at the start, "
               f"{report.figures['load_average_end']} at the end")
    return report


# ----- scenario 2: head-of-line blocking -----

def scenario_hol(model: Path, args: argparse.Namespace, batching: bool) -> Scenario:
    report = Scenario("hol")
    texts = make_articles(str(model), args.hol_long + 1, args.min_input_tokens,
                          args.max_input_tokens, seed=2)
    long_texts, short_text = texts[:-1], texts[-1]
    delays = " and ".join(f"{d:g} s" for d in args.hol_delay_s)
    report.say(f"== 2. head-of-line blocking: {args.hol_long} long calls ({HOL_LONG.describe()})"
               f" decoding; {delays} after they are sent (one run each), one short call "
               f"({HOL_SHORT.describe()}); summary only")
    report.figures["load_average_start"] = load_average()
    short_options, long_options = HOL_SHORT.options(), HOL_LONG.options()
    rows = {}
    for mode, flags in runnable_modes(args, "hol", batching, report):
        if (server := start(mode, model, flags, args, report)) is None:
            continue
        with server:
            warm_up(server, long_texts[0])
            unloaded = [call(server.stub, short_text, short_options, "short")
                        for _ in range(args.hol_unloaded_calls)]
            check(unloaded, f"{mode} short call alone")
            unloaded_s = statistics.median(o.latency_s for o in unloaded)
            for delay in args.hol_delay_s:
                started = time.perf_counter()
                longs = [Pending(server.stub, text, long_options, f"long{i}")
                         for i, text in enumerate(long_texts)]
                time.sleep(delay)
                short = Pending(server.stub, short_text, short_options, "short").wait()
                long_outcomes = [p.wait() for p in longs]
                check([short, *long_outcomes], f"{mode} under load")
                first_long_done = min(o.done_s for o in long_outcomes)
                key = f"{mode}@{delay:g}s"
                rows[key] = {
                    "delay_s": delay,
                    "short_unloaded_s": round(unloaded_s, 3),
                    "short_loaded_s": round(short.latency_s, 3),
                    "short_slowdown": round(short.latency_s / unloaded_s, 1),
                    "short_done_before_first_long": short.done_s < first_long_done,
                    "long_wall_s": round(max(o.done_s for o in long_outcomes) - started, 2),
                    "long_latency_s": secs([o.latency_s for o in long_outcomes]),
                    "short_identical_to_unloaded": short.result() == unloaded[0].result()}
                print(f"  {key}: done (short call {rows[key]['short_slowdown']}x)", flush=True)
    report.figures["load_average_end"] = load_average()
    report.figures["modes"] = rows
    report.say(f"  {'mode':<30} {'short alone s':>13} {'short loaded s':>14} {'slowdown':>8} "
               f"{'before longs':>12} {'longs wall s':>12} {'longs p50 s':>11} {'same':>5}")
    for key, row in rows.items():
        mode, _, delay = key.partition("@")
        report.say(f"  {mode_label(mode) + ' @' + delay:<30} {row['short_unloaded_s']:13.2f} "
                   f"{row['short_loaded_s']:14.2f} {row['short_slowdown']:7.1f}x "
                   f"{str(row['short_done_before_first_long']):>12} {row['long_wall_s']:12.2f} "
                   f"{row['long_latency_s']['p50']:11.2f} "
                   f"{str(row['short_identical_to_unloaded']):>5}")
    report.say("  slowdown: the short call's latency over its latency alone on the same server "
               "(target for continuous: <= 4x); same: its result equals the unloaded one")
    report.say(f"  load average {report.figures['load_average_start']} at the start, "
               f"{report.figures['load_average_end']} at the end")
    return report


# ----- scenario 3: latency under load -----

def scenario_load(model: Path, args: argparse.Namespace, batching: bool) -> Scenario:
    report = Scenario("load")
    texts = make_articles(str(model), args.load_articles, args.min_input_tokens,
                          args.max_input_tokens, seed=3)
    options = [s.options(args.outputs, args.headline_tokens) for s in MIXED]
    report.say(f"== 3. latency under load: capacity from a closed loop ({args.load_clients} "
               f"callers, {args.capacity_calls} calls), then Poisson arrivals at "
               f"{args.load_fraction:.0%} of it for {args.load_seconds:.0f} s (seed "
               f"{args.seed}); option sets as in 1, drawn at random; "
               + ("summary only" if args.outputs == "summary" else
                  f"summary and a {args.headline_tokens}-token headline"))
    report.figures["load_average_start"] = load_average()
    rows = {}
    for mode, flags in runnable_modes(args, "load", batching, report):
        if (server := start(mode, model, flags, args, report)) is None:
            continue
        with server:
            warm_up(server, texts[0])
            # Unloaded latency of each option set: alone on this server, over a few articles.
            unloaded = {}
            for option_set, opts in zip(MIXED, options):
                alone = [call(server.stub, texts[i % len(texts)], opts, option_set.name)
                         for i in range(args.unloaded_calls)]
                check(alone, f"{mode} unloaded")
                unloaded[option_set.name] = statistics.median(o.latency_s for o in alone)
            # Capacity: a closed loop, `load_clients` callers each sending its next call when
            # its last one is answered.
            todo = collections.deque(range(args.capacity_calls))
            lock = threading.Lock()
            closed: list[Outcome] = []

            def caller(todo: collections.deque[int], lock: threading.Lock,
                       closed: list[Outcome]) -> None:
                while True:
                    with lock:
                        if not todo:
                            return
                        i = todo.popleft()
                    closed.append(call(server.stub, texts[i % len(texts)],
                                       options[i % len(options)], MIXED[i % len(MIXED)].name))

            started = time.perf_counter()
            threads = [threading.Thread(target=caller, args=(todo, lock, closed))
                       for _ in range(args.load_clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            capacity = args.capacity_calls / (time.perf_counter() - started)
            check(closed, f"{mode} closed loop")
            # Open loop: Poisson arrivals, whatever the server's progress.
            rate = args.load_rate or args.load_fraction * capacity
            rng = random.Random(args.seed)
            arrivals, at = [], rng.expovariate(rate)
            while at < args.load_seconds:
                arrivals.append((at, rng.randrange(len(texts)), rng.randrange(len(MIXED))))
                at += rng.expovariate(rate)
            pendings = []
            started = time.perf_counter()
            for at, text_index, set_index in arrivals:
                delay = started + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pendings.append(Pending(server.stub, texts[text_index], options[set_index],
                                        MIXED[set_index].name))
            last_sent = time.perf_counter()
            outcomes = [p.wait() for p in pendings]
            drain_s = max(o.done_s for o in outcomes) - last_sent if outcomes else 0.0
            check(outcomes, f"{mode} open loop")
        latencies = [o.latency_s for o in outcomes]
        relative = [o.latency_s / unloaded[o.label] for o in outcomes]
        rows[mode] = {
            "unloaded_s": {k: round(v, 3) for k, v in unloaded.items()},
            "capacity_articles_per_s": round(capacity, 3),
            "offered_articles_per_s": round(rate, 3), "arrivals": len(arrivals),
            "latency_s": secs(latencies) if latencies else {},
            "latency_vs_unloaded": ({"p50": round(percentile(relative, 50), 2),
                                     "p99": round(percentile(relative, 99), 2),
                                     "max": round(max(relative), 2)} if relative else {}),
            "p99_vs_unloaded_by_set": {
                s.name: round(percentile(r, 99), 2) for s in MIXED
                if (r := [o.latency_s / unloaded[s.name] for o in outcomes
                          if o.label == s.name])},
            "drain_after_last_arrival_s": round(drain_s, 2)}
        print(f"  {mode}: done (capacity {capacity:.3f} articles/s, {len(arrivals)} arrivals)",
              flush=True)
    report.figures["load_average_end"] = load_average()
    report.figures["modes"] = rows
    report.say(f"  {'mode':<30} {'capacity/s':>10} {'offered/s':>9} {'calls':>5} "
               f"{'p50 s':>6} {'p99 s':>6} {'p50 x':>6} {'p99 x':>6} {'max x':>6} "
               f"{'p99 x by set':>16} {'unloaded s by set':>18}")
    for mode, row in rows.items():
        lat, rel = row["latency_s"], row["latency_vs_unloaded"]
        if not lat:
            report.say(f"  {mode_label(mode):<30} no arrivals: raise --load-seconds")
            continue
        report.say(
            f"  {mode_label(mode):<30} {row['capacity_articles_per_s']:10.3f} "
            f"{row['offered_articles_per_s']:9.3f} {row['arrivals']:5d} {lat['p50']:6.2f} "
            f"{lat['p99']:6.2f} {rel['p50']:5.2f}x {rel['p99']:5.2f}x {rel['max']:5.2f}x "
            f"{' '.join(f'{v:.1f}' for v in row['p99_vs_unloaded_by_set'].values()):>16} "
            f"{' '.join(f'{v:.2f}' for v in row['unloaded_s'].values()):>18}")
    report.say("  x: a call's latency over its option set's unloaded latency on the same server "
               "(target for continuous: p99 <= 2x); with few calls, p99 is about the maximum")
    report.say(f"  load average {report.figures['load_average_start']} at the start, "
               f"{report.figures['load_average_end']} at the end")
    return report


# ----- scenario 4: varied output lengths -----

def varied_length_checkpoint(base: Path, texts: list[str], args: argparse.Namespace) -> Path:
    """The preset with its end-of-sequence logit raised (see build_varied_length_checkpoint),
    calibrated on the scenario's own articles so that their greedy lengths spread over 56-142:
    built once per set of articles into the cache."""
    if args.eos_bias is not None:
        out = args.cache / f"{args.preset}-varied-lengths-bias{args.eos_bias:g}"
    else:
        out = args.cache / (f"{args.preset}-varied-lengths-{len(texts)}x"
                            f"{args.min_input_tokens}-{args.max_input_tokens}")
    if not (out / VARIED_LENGTHS_FILE).exists():
        print(f"building {out} (end-of-sequence bias"
              f"{' calibrated on greedy decoding' if args.eos_bias is None else ''}) ...",
              file=sys.stderr, flush=True)
        build_varied_length_checkpoint(out, base, bias=args.eos_bias, texts=texts)
    return out


def length_histogram(lengths: list[int], low: int = 56, high: int = 142, width: int = 16) -> str:
    counts = collections.Counter(min((n - low) // width, (high - low) // width) for n in lengths)
    return " ".join(f"{low + b * width}-{min(low + (b + 1) * width - 1, high)}:{counts[b]}"
                    for b in range((high - low) // width + 1))


def scenario_lengths(base: Path, args: argparse.Namespace, batching: bool) -> Scenario:
    report = Scenario("lengths")
    if PRESETS[args.preset]["family"] != "bart":
        report.say("== 4. varied output lengths: skipped (needs a BART-family preset)")
        return report
    texts = make_articles(str(base), args.lengths_articles, args.min_input_tokens,
                          args.max_input_tokens, seed=4)
    model = varied_length_checkpoint(base, texts, args)
    built = json.loads((model / VARIED_LENGTHS_FILE).read_text())
    option_set = varied_length_options(args.lengths_beams, args.lengths_penalty)
    jobs = [(text, option_set.options(), f"a{i}") for i, text in enumerate(texts)]
    report.say(f"== 4. varied output lengths: {len(jobs)} articles sent at once, "
               f"{option_set.describe()}, summary only; end-of-sequence bias "
               f"{built['eos_bias']} (greedy calibration lengths "
               f"{built.get('calibration_greedy_lengths', 'not calibrated')})")
    report.figures["eos_bias"] = built["eos_bias"]
    report.figures["load_average_start"] = load_average()
    rows, lengths_of = {}, {}
    for mode, flags in runnable_modes(args, "lengths", batching, report):
        if (server := start(mode, model, flags, args, report)) is None:
            continue
        with server:
            warm_up(server, texts[0])
            cpu = server.cpu_s()
            wall, outcomes = all_at_once(server.stub, jobs)
            cpu = server.cpu_s() - cpu
            check(outcomes, f"{mode} all at once")
        lengths = [o.summary_tokens for o in outcomes]
        lengths_of[mode] = [o.result() for o in outcomes]
        rows[mode] = {
            "wall_s": round(wall, 2), "articles_per_s": round(len(jobs) / wall, 3),
            "tokens_per_s": round(sum(lengths) / wall, 1), "cpu_s": round(cpu, 1),
            "lengths": lengths,
            "length_quartiles": [min(lengths), *(int(q) for q in statistics.quantiles(
                lengths, n=4, method="inclusive")), max(lengths)] if len(lengths) > 1 else lengths,
            "latency_s": secs([o.latency_s for o in outcomes])}
        print(f"  {mode}: done ({wall:.1f} s)", flush=True)
    report.figures["load_average_end"] = load_average()
    report.figures["modes"] = rows
    report.say(f"  {'mode':<30} {'wall s':>7} {'art/s':>6} {'tok/s':>6} {'CPU s':>6} "
               f"{'p50 s':>6} {'max s':>6}  lengths min/q1/median/q3/max; histogram")
    for mode, row in rows.items():
        report.say(f"  {mode_label(mode):<30} {row['wall_s']:7.2f} {row['articles_per_s']:6.3f} "
                   f"{row['tokens_per_s']:6.1f} {row['cpu_s']:6.1f} "
                   f"{row['latency_s']['p50']:6.2f} {row['latency_s']['max']:6.2f}  "
                   f"{'/'.join(map(str, row['length_quartiles']))}; "
                   f"{length_histogram(row['lengths'])}")
    if "static" in rows and "continuous" in rows:
        ratio = rows["continuous"]["articles_per_s"] / rows["static"]["articles_per_s"]
        same = sum(a == b for a, b in zip(lengths_of["static"], lengths_of["continuous"]))
        report.figures["continuous_throughput_vs_static"] = round(ratio, 2)
        report.figures["continuous_identical_to_static"] = f"{same}/{len(jobs)}"
        report.say(f"  continuous vs static throughput: {ratio:.2f}x; results identical: "
                   f"{same}/{len(jobs)}")
    report.say(f"  load average {report.figures['load_average_start']} at the start, "
               f"{report.figures['load_average_end']} at the end")
    return report


# ----- main -----

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="reference runs only in the --reference scenarios")
    parser.add_argument("--reference", nargs="*", choices=SCENARIOS, default=["mixed", "hol"],
                        help="scenarios with the default-engine reference row (costs a server "
                             "start and a run each)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--threads", type=int, default=0,
                        help="the worker's threads, same for every mode; 0: all cores")
    parser.add_argument("--outputs", choices=("summary", "both"), default="summary",
                        help="scenarios 1 and 3: summary only, or also a headline")
    parser.add_argument("--headline-tokens", type=int, default=12,
                        help="fixed headline length with --outputs both")
    parser.add_argument("--min-input-tokens", type=int, default=150, help="shortest article")
    parser.add_argument("--max-input-tokens", type=int, default=400, help="longest article")
    parser.add_argument("--mixed-articles", type=int, default=12)
    parser.add_argument("--hol-long", type=int, default=5, help="long calls in scenario 2")
    parser.add_argument("--hol-delay-s", type=float, nargs="+", default=[1.0, 3.0],
                        help="when the short call follows the long ones, one run each: 1 s "
                             "lands while the long articles are still being encoded on these "
                             "2-core machines, 3 s while they decode (the issue's case)")
    parser.add_argument("--hol-unloaded-calls", type=int, default=3)
    parser.add_argument("--load-articles", type=int, default=12)
    parser.add_argument("--load-clients", type=int, default=6,
                        help="callers of the closed loop that measures capacity")
    parser.add_argument("--capacity-calls", type=int, default=12)
    parser.add_argument("--unloaded-calls", type=int, default=1,
                        help="calls per option set, alone, for the unloaded latency")
    parser.add_argument("--load-fraction", type=float, default=0.5,
                        help="offered load as a fraction of each mode's own capacity")
    parser.add_argument("--load-rate", type=float, default=0.0,
                        help="offered articles/s for every mode instead (0: use the fraction)")
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--lengths-articles", type=int, default=12)
    parser.add_argument("--lengths-beams", type=int, default=1)
    parser.add_argument("--lengths-penalty", type=float, default=None,
                        help="scenario 4's length_penalty; unset: the model's (1.0)")
    parser.add_argument("--eos-bias", type=float, default=None,
                        help="scenario 4: this end-of-sequence bias instead of a calibrated one")
    parser.add_argument("--server-flags", type=shlex.split, default=[],
                        help="more flags for every server, as one string, e.g. "
                             "--server-flags='--kv-cache-mb 512'")
    parser.add_argument("--torch-compute-type", default="float32",
                        choices=("float32", "int8", "bfloat16", "float16"),
                        help="the static and continuous torch modes' compute type")
    parser.add_argument("--reference-flags", type=shlex.split, default=["--engine", "auto"],
                        help="the reference server's engine flags, e.g. "
                             "--reference-flags='--engine ctranslate2 --compute-type int8'")
    parser.add_argument("--json-out", type=Path, default=None,
                        help="also write the final JSON line to this file")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()
    TORCH_COMPUTE_TYPE[0] = args.torch_compute_type
    REFERENCE_FLAGS[0] = args.reference_flags

    batching = has_batching_setting()
    base = cached_preset_checkpoint(args.cache, args.preset)
    started = time.perf_counter()
    print(f"checkpoint {args.preset} (random weights); one worker process, "
          f"{args.threads or 'all'} thread(s); {os.cpu_count()} CPUs, load average "
          f"{load_average()} at the start; --batching "
          f"{'available' if batching else 'not in this server yet: static runs without it'}",
          flush=True)
    runners = {"mixed": scenario_mixed, "hol": scenario_hol, "load": scenario_load,
               "lengths": scenario_lengths}
    reports = [runners[name](base, args, batching) for name in args.scenarios]
    elapsed = time.perf_counter() - started
    print(f"\n---- summary ({elapsed / 60:.1f} min; load average {load_average()} at the end)")
    for report in reports:
        for line in report.lines:
            print(line)
    line = json.dumps({"benchmark": "continuous", "preset": args.preset,
                       "threads": args.threads, "outputs": args.outputs,
                       "torch_compute_type": args.torch_compute_type,
                       "reference_flags": args.reference_flags,
                       "batching_setting": batching, "minutes": round(elapsed / 60, 1),
                       "refused": REFUSED,
                       **{r.name: r.figures for r in reports}}, separators=(",", ":"))
    print(line)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
