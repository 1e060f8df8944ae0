"""Is server-loop batching worth it? Concurrent single-article calls vs the same calls in turn.

Starts the real server (`summarizer serve`) on a real-size random-weight checkpoint, then sends N
single-article Summarize calls one after another, then the same N calls all at once, with fixed
output lengths (min = max new tokens) so both runs do the same work. Prints articles/s for both
and their ratio.

    python benchmarks/concurrency.py --preset bart-base --articles 12

The checkpoint is built once into --cache (random weights: the text is gibberish; the FLOPs are
those of the real architecture).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import grpc

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import PRESETS, cached_preset_checkpoint, training_text


def articles(count: int, seed: int = 1) -> list[str]:
    sentences = training_text(sentences=count * 30, seed=seed)
    # 12 to 29 sentences each: roughly 150 to 450 tokens.
    return [" ".join(sentences[i * 30:i * 30 + 12 + (i * 7) % 18]) for i in range(count)]


def start_server(model: Path, extra: list[str],
                 startup_log: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """A server on a free port, once SERVING: (process, HOST:PORT). Its log lines up to SERVING
    are appended to `startup_log` (other ports it chose are there, e.g. `--metrics-port -1`)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", "0", *extra], stderr=subprocess.PIPE, text=True)
    startup_log = [] if startup_log is None else startup_log
    for line in process.stderr:
        startup_log.append(line)
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            target = f"127.0.0.1:{match.group(1)}"
            break
    else:
        raise SystemExit("server did not start")
    for line in process.stderr:
        startup_log.append(line)
        if "SERVING" in line and "NOT_SERVING" not in line:
            return process, target
        if "error" in line.lower():
            raise SystemExit(line)
    raise SystemExit("server exited before SERVING")


def peak_rss_mb(pid: int | None = None) -> float:
    """Peak resident memory of a process (this one by default), in MB."""
    if pid is not None:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return float("nan")
        match = re.search(r"VmHWM:\s+(\d+) kB", status)
        return int(match.group(1)) / 1024 if match else float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), all its threads."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--articles", type=int, default=12)
    parser.add_argument("--summary-tokens", type=int, default=48)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-batch-tokens", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()

    model = cached_preset_checkpoint(args.cache, args.preset)
    process, target = start_server(model, ["--max-batch-size", str(args.max_batch_size),
                                           "--max-batch-tokens", str(args.max_batch_tokens)])
    options = pb.GenerationOptions(
        summary_min_tokens=args.summary_tokens, summary_max_tokens=args.summary_tokens,
        headline_min_tokens=args.headline_tokens, headline_max_tokens=args.headline_tokens,
        num_beams=args.num_beams)
    texts = articles(args.articles)
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SummarizerStub(channel)

            def request(text: str) -> pb.SummarizeRequest:
                return pb.SummarizeRequest(articles=[pb.Article(id="a", text=text)],
                                           options=options)

            stub.Summarize(request(texts[0]), timeout=600)  # first-call costs out of the way
            started = time.perf_counter()
            sequential = [stub.Summarize(request(t), timeout=600) for t in texts]
            sequential_s = time.perf_counter() - started
            started = time.perf_counter()
            futures = [stub.Summarize.future(request(t), timeout=600) for t in texts]
            concurrent = [f.result() for f in futures]
            concurrent_s = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=60)
    tokens = [r.results[0].input_tokens for r in sequential]
    same = sum(a.results[0].summary == b.results[0].summary
               for a, b in zip(sequential, concurrent))
    print(f"checkpoint        {args.preset} (random weights), {args.num_beams} beams, "
          f"{args.summary_tokens}+{args.headline_tokens} tokens out")
    print(f"articles          {len(texts)}, {min(tokens)}-{max(tokens)} input tokens")
    print(f"one at a time     {sequential_s:7.2f} s  {len(texts) / sequential_s:6.3f} articles/s")
    print(f"all concurrent    {concurrent_s:7.2f} s  {len(texts) / concurrent_s:6.3f} articles/s")
    print(f"batching          max batch {args.max_batch_size}, max batch tokens "
          f"{args.max_batch_tokens or 'off'}")
    print(f"speed-up          {sequential_s / concurrent_s:.2f}x")
    print(f"identical outputs {same} of {len(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
