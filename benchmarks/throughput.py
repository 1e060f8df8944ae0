"""Throughput: the real server over gRPC against the naive transformers loop, on the same work.

One run measures, on the same random-weight real-size checkpoint and the same articles, with fixed
output lengths (min = max new tokens, so every engine writes every token and EOS never ends a
sequence early):

- the naive baseline: transformers `generate`, one article at a time, the summary then the
  headline (what a user would write without this service);
- for each engine given (`--engines default torch:float32 ctranslate2:int8 ...`; `default` is
  the server with no engine flags, as the Quick start runs it):
  - the real server (`summarizer serve`, a separate process) driven by `--clients` concurrent
    gRPC clients, each sending single-article Summarize calls until the articles run out;
  - the same engine called in-process on batches formed as the batcher forms them (sorted by
    length, capped by count and padded tokens): the raw batched throughput the server can at
    best reach, so that server / raw is the cost of the service around the engine.

It prints articles/s, call latency percentiles, mean batch size, padding, peak RSS (each
measurement runs in its own process), the speed-up over the baseline and the server's share of the
raw throughput; then the same two ratios per CPU-second of the measured process (the work done
whatever share of the cores it got: steadier than wall time on a machine shared with other jobs).
Ratios within one run carry over between machines; absolute figures do not.

Beside the table it writes two figures into --plot-dir (benchmarks/plots.py): throughput.svg,
articles per second of each run, and latency.svg, the call latency distribution of each run that
timed calls.

    python benchmarks/throughput.py --preset bart-base --engines default torch:float32

Checkpoints are built (and converted for ctranslate2) once into --cache.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import random
import re
import signal
import statistics
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import PRESETS, cached_preset_checkpoint, training_text

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import cpu_seconds, peak_rss_mb, start_server  # noqa: E402 - sibling helpers
from plots import latency_by_class_svg, throughput_svg  # noqa: E402


@dataclass
class Work:
    model: str
    texts: list[str]
    num_beams: int
    summary_tokens: int
    headline_tokens: int
    max_batch_size: int
    max_batch_tokens: int
    threads: int = 0
    """Intra-op threads for every phase; 0: each engine's default (all cores)."""


@dataclass
class Result:
    name: str
    articles: int
    seconds: float
    rss_mb: float
    cpu_s: float = float("nan")
    """CPU time the measured process spent over the run: on a shared machine, the work done
    whatever the share of the cores it got."""
    latencies: list[float] = field(default_factory=list)
    mean_batch: float | None = None
    padding: float | None = None
    tokens_out: int = 0

    @property
    def rate(self) -> float:
        return self.articles / self.seconds

    @property
    def cpu_rate(self) -> float:
        return self.articles / self.cpu_s


def make_articles(model: str, count: int, low: int, high: int, seed: int = 1) -> list[str]:
    """`count` news-like articles whose lengths in tokens spread evenly over [low, high]."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    sentences = iter(training_text(sentences=count * 60, seed=seed))
    targets = [low + (high - low) * i // max(count - 1, 1) for i in range(count)]
    random.Random(seed).shuffle(targets)
    texts = []
    for target in targets:
        text = next(sentences)
        while len(tokenizer(text + " " + (following := next(sentences)))["input_ids"]) <= target:
            text += " " + following
        texts.append(text)
    return texts


# ----- the phases, each in a fresh process so that peak RSS is its own -----

def run_baseline(work: Work) -> Result:
    """The naive loop: transformers generate, one article at a time, summary then headline."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if work.threads:
        torch.set_num_threads(work.threads)
    tokenizer = AutoTokenizer.from_pretrained(work.model)
    model = AutoModelForSeq2SeqLM.from_pretrained(work.model).eval()
    window = min(tokenizer.model_max_length, 1024)

    def generate(inputs: dict, tokens: int) -> Any:
        return model.generate(**inputs, num_beams=work.num_beams, min_new_tokens=tokens,
                              max_new_tokens=tokens, forced_eos_token_id=None)

    with torch.inference_mode():
        generate(tokenizer(work.texts[0], return_tensors="pt"), 4)  # first-call costs
        started, cpu = time.perf_counter(), cpu_seconds()
        latencies = []
        for text in work.texts:
            begun = time.perf_counter()
            inputs = tokenizer(text, return_tensors="pt", truncation=True, max_length=window)
            summary = generate(inputs, work.summary_tokens)
            headline = generate(inputs, work.headline_tokens)
            tokenizer.decode(summary[0], skip_special_tokens=True)
            tokenizer.decode(headline[0], skip_special_tokens=True)
            latencies.append(time.perf_counter() - begun)
        seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return Result("baseline: transformers, one at a time", len(work.texts), seconds,
                  peak_rss_mb(), cpu, latencies)


def run_in_process(work: Work, engine: str, compute_type: str, cache: str) -> Result:
    """The engine alone, on the batches the batcher would form with every article queued."""
    from service.config import Settings
    from service.domain import GenerationParams, Outputs
    from service.api.server import default_engine_factory
    from service.text import clean_article, model_text

    settings = Settings(model=work.model, engine=engine, compute_type=compute_type,
                        convert_cache_dir=cache, threads=work.threads)
    model = default_engine_factory(settings)
    model.warmup()
    params = GenerationParams(
        summary_max_tokens=work.summary_tokens, summary_min_tokens=work.summary_tokens,
        headline_max_tokens=work.headline_tokens, headline_min_tokens=work.headline_tokens,
        num_beams=work.num_beams, outputs=Outputs.BOTH,
        max_input_tokens=model.defaults.max_input_tokens)
    started, cpu = time.perf_counter(), cpu_seconds()
    prepared = model.prepare([model_text(clean_article(t)) for t in work.texts], params)
    ordered = sorted(prepared, key=lambda a: a.cost)
    batches: list[list[Any]] = [[]]
    for article in ordered:
        batch = batches[-1]
        longest = max([a.cost for a in batch] + [article.cost])
        if batch and (len(batch) == work.max_batch_size or (
                work.max_batch_tokens and longest * (len(batch) + 1) > work.max_batch_tokens)):
            batches.append(batch := [])
        batch.append(article)
    tokens_out = 0
    for batch in batches:
        tokens_out += sum(g.summary_tokens + g.headline_tokens
                          for g in model.generate(params, batch))
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    # Mean padding ratio per batch, as the server's metrics count it.
    padding = statistics.mean(1 - sum(a.cost for a in b) / (len(b) * max(a.cost for a in b))
                              for b in batches)
    return Result(f"{label(engine, compute_type)}: in-process, batched", len(work.texts), seconds,
                  peak_rss_mb(), cpu, mean_batch=len(work.texts) / len(batches),
                  padding=padding, tokens_out=tokens_out)


def label(engine: str, compute_type: str) -> str:
    return "default (auto)" if engine == compute_type == "auto" else f"{engine} {compute_type}"


def batch_metrics(port: int) -> tuple[float | None, float | None]:
    """Mean batch size and mean padding ratio per batch, from the server's Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()

    def value(name: str) -> float | None:
        match = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        return float(match.group(1)) if match else None

    batches = value("summarizer_batch_size_count")
    if not batches:
        return None, None
    return (value("summarizer_batch_size_sum") / batches,
            value("summarizer_batch_padding_ratio_sum") / batches)


def process_tree(pid: int) -> list[int]:
    """`pid` and its child processes (the server's engine workers)."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [pid, *children]


def run_server(work: Work, engine: str, compute_type: str, cache: str, clients: int,
               extra: list[str], name: str) -> Result:
    """The real server, driven by `clients` concurrent callers of single-article Summarize.
    CPU time and peak RSS count the server and its worker processes; both are also printed
    apart."""
    startup_log: list[str] = []
    launched = time.perf_counter()
    process, target = start_server(Path(work.model), [
        "--metrics-port", "-1",  # any free port; the log says which
        # "default" passes no engine flags at all: what a user gets from the Quick start.
        *([] if engine == "auto" and compute_type == "auto"
          else ["--engine", engine, "--compute-type", compute_type]),
        "--convert-cache-dir", cache,
        "--max-batch-size", str(work.max_batch_size),
        "--max-batch-tokens", str(work.max_batch_tokens), "--threads", str(work.threads),
        *extra],  # last: they win over the flags above
        startup_log)
    startup_s = time.perf_counter() - launched
    [metrics_port] = [int(m.group(1)) for line in startup_log
                      if (m := re.search(r"metrics on http://[^:]+:(\d+)/metrics", line))]
    options = pb.GenerationOptions(
        summary_min_tokens=work.summary_tokens, summary_max_tokens=work.summary_tokens,
        headline_min_tokens=work.headline_tokens, headline_max_tokens=work.headline_tokens,
        num_beams=work.num_beams)
    todo: queue.Queue[tuple[int, str]] = queue.Queue()
    for index, text in enumerate(work.texts):
        todo.put((index, text))
    latencies: list[float] = []
    tokens_out = []
    failures: list[BaseException] = []

    def client(stub: pb_grpc.SummarizerStub) -> None:
        while True:
            try:
                index, text = todo.get_nowait()
            except queue.Empty:
                return
            begun = time.perf_counter()
            try:
                reply = stub.Summarize(pb.SummarizeRequest(
                    articles=[pb.Article(id=str(index), text=text)], options=options),
                    timeout=3600)
            except grpc.RpcError as error:
                failures.append(error)
                return
            latencies.append(time.perf_counter() - begun)
            tokens_out.append(reply.results[0].summary_tokens + reply.results[0].headline_tokens)

    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SummarizerStub(channel)
            threads = [threading.Thread(target=client, args=(stub,)) for _ in range(clients)]
            tree = process_tree(process.pid)
            started, cpu = time.perf_counter(), sum(cpu_seconds(p) for p in tree)
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            seconds = time.perf_counter() - started
            cpu = sum(cpu_seconds(p) for p in tree) - cpu
        rss_each = [peak_rss_mb(p) for p in tree]
        rss = sum(rss_each)
        print(f"{name}: peak RSS {rss_each[0]:.0f} MB in the server process"
              + (f", {', '.join(f'{r:.0f}' for r in rss_each[1:])} MB in its worker(s)"
                 if len(rss_each) > 1 else " (no worker processes)")
              + f"; start-up to SERVING {startup_s:.1f} s", flush=True)
        mean_batch, padding = batch_metrics(metrics_port)
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    if failures:
        raise SystemExit(f"server calls failed: {failures[0]}")
    return Result(f"{name}: server, {clients} clients", len(work.texts),
                  seconds, rss, cpu, latencies, mean_batch=mean_batch, padding=padding,
                  tokens_out=sum(tokens_out))


def in_child(function: Any, *args: Any) -> Result:
    """Run one phase in a fresh process (spawned: no memory shared with this one), with the
    OpenMP runtime's default wait policy, as the server's worker processes run the model (see
    service/cli.py): the baseline and the in-process runs get the same treatment as the server."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


# ----- report -----

def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def row(result: Result, baseline: Result, raw: Result | None) -> str:
    lat = result.latencies
    cells = [
        f"{result.name:<44}", f"{result.rate:7.3f}",
        *(f"{percentile(lat, q):6.1f}" if lat else "     -" for q in (50, 95, 99)),
        f"{result.mean_batch:5.2f}" if result.mean_batch else "    -",
        f"{100 * result.padding:5.1f}%" if result.padding is not None else "     -",
        f"{result.rss_mb:7.0f}", f"{result.rate / baseline.rate:6.2f}x",
        f"{100 * result.rate / raw.rate:5.1f}%" if raw else "     -",
        f"{result.cpu_s:6.1f}", f"{result.cpu_rate / baseline.cpu_rate:6.2f}x",
        f"{100 * result.cpu_rate / raw.cpu_rate:5.1f}%" if raw else "     -",
    ]
    return " ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--engines", nargs="+", default=["default", "torch:float32"],
                        metavar="ENGINE:COMPUTE_TYPE",
                        help="engines to measure; 'default' passes no engine flags (what "
                             "--engine auto and --compute-type auto pick); @flag=value,... adds "
                             "server flags, e.g. default@workers=2")
    parser.add_argument("--articles", type=int, default=24)
    parser.add_argument("--min-tokens", type=int, default=200, help="shortest article")
    parser.add_argument("--max-tokens", type=int, default=400, help="longest article")
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=0,
                        help="server and in-process batches; 0: the server default")
    parser.add_argument("--max-batch-tokens", type=int, default=-1,
                        help="-1: the server default; 0: no cap")
    parser.add_argument("--threads", type=int, default=0,
                        help="intra-op threads in every phase; 0: the engines' defaults. On a "
                             "machine shared with other jobs, 1 keeps CPU time a fair measure "
                             "(idle threads of a multi-threaded run spin and burn CPU)")
    parser.add_argument("--skip-baseline", action="store_true",
                        help="skip the naive loop; the 'vs base' columns are then against the "
                             "first engine given (e.g. --engines ctranslate2:int8 torch:int8)")
    parser.add_argument("--skip-raw", action="store_true",
                        help="skip the in-process runs (no server overhead figure)")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    parser.add_argument("--plot-dir", type=Path, default=Path("."),
                        help="where to write throughput.svg and latency.svg")
    parser.add_argument("--no-plots", action="store_true", help="write no figures")
    args = parser.parse_args()

    from service.config import Settings

    defaults = Settings()
    model = cached_preset_checkpoint(args.cache, args.preset)
    work = Work(model=str(model),
                texts=make_articles(str(model), args.articles, args.min_tokens, args.max_tokens),
                num_beams=args.num_beams, summary_tokens=args.summary_tokens,
                headline_tokens=args.headline_tokens,
                max_batch_size=args.max_batch_size or defaults.max_batch_size,
                max_batch_tokens=(defaults.max_batch_tokens if args.max_batch_tokens < 0
                                  else args.max_batch_tokens),
                threads=args.threads)
    cache = str(args.cache / "ctranslate2")
    print(f"checkpoint  {args.preset} (random weights), {args.num_beams} beams, "
          f"{args.summary_tokens}+{args.headline_tokens} tokens out (fixed)")
    print(f"work        {args.articles} articles of {args.min_tokens}-{args.max_tokens} tokens; "
          f"batches of at most {work.max_batch_size} articles, "
          f"{work.max_batch_tokens or 'no cap on'} padded tokens; "
          f"{args.threads or 'default'} threads")
    print(f"machine     {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start", flush=True)

    results: list[tuple[Result, Result | None]] = []
    if not args.skip_baseline:
        results.append((in_child(run_baseline, work), None))
    for spec in args.engines:
        # ENGINE:COMPUTE_TYPE, or default; then @flag=value,... for the server, e.g.
        # default@workers=2 or default@workers=0 (the model in the server process).
        choice, _, flags = spec.partition("@")
        engine, _, compute_type = ("auto:auto" if choice == "default" else choice).partition(":")
        extra = [arg for flag in filter(None, flags.split(","))
                 for arg in (f"--{flag.partition('=')[0]}", flag.partition("=")[2])]
        raw = None if args.skip_raw else in_child(run_in_process, work, engine,
                                                  compute_type or "auto", cache)
        name = label(engine, compute_type or "auto") + (f" @{flags}" if flags else "")
        server = run_server(work, engine, compute_type or "auto", cache, args.clients, extra,
                            name)
        results += [(server, raw)] + ([(raw, None)] if raw else [])
        expected = args.articles * (args.summary_tokens + args.headline_tokens)
        if server.tokens_out != expected:
            print(f"warning: {spec} wrote {server.tokens_out} tokens, not {expected}")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    baseline = results[0][0]
    if args.skip_baseline:
        print(f"(no naive loop: 'vs base' is against {baseline.name})")
    print(f"{'run':<44} {'art/s':>7} {'p50 s':>6} {'p95 s':>6} {'p99 s':>6} {'batch':>5} "
          f"{'pad':>6} {'RSS MB':>7} {'vs base':>7} {'vs raw':>6} {'CPU s':>6} "
          f"{'per CPU-s vs base, vs raw':>14}")
    for result, raw in results:
        print(row(result, baseline, raw))
    if not args.no_plots:
        write_figures(args.plot_dir, [result for result, _ in results], baseline,
                      f"{args.preset} (random weights), {args.articles} articles, "
                      f"{args.num_beams} beams")
    return 0


def write_figures(directory: Path, results: list[Result], baseline: Result, work: str) -> None:
    """throughput.svg (articles/s of every run, with the speed-up over the baseline) and
    latency.svg (the latency distribution of every run that timed its calls)."""
    throughput = throughput_svg(
        directory / "throughput.svg", {r.name: r.rate for r in results},
        notes={r.name: f"{r.rate / baseline.rate:.2f}x the baseline"
               for r in results if r is not baseline},
        title=f"Throughput per configuration: {work}")
    latency = latency_by_class_svg(
        directory / "latency.svg", {r.name: r.latencies for r in results if r.latencies},
        title=f"Latency per configuration (the baseline per article, servers per call): {work}")
    print(f"\nfigures: {throughput}, {latency}")


if __name__ == "__main__":
    sys.exit(main())
