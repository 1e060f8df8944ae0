"""How much memory does a replica need? The resident set of `summarizer serve`, measured.

Starts the real server on a real-size random-weight checkpoint (same tensors as the published
model, so the same bytes), reads the process's resident set (Linux /proc) once the model is
loaded and warmed up, then sends a worst-case batch (a full --max-batch-size of articles that
fill the input window, with the longest default outputs forced; the token cap is turned off so
they do form one batch) and reads the peak. Prints JSON.

    python benchmarks/memory.py --preset distilbart-cnn-12-6

The Kubernetes resource requests in deploy/kubernetes/ are sized from this measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from concurrency import start_server
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import PRESETS, cached_preset_checkpoint, training_text


def memory_mib(pid: int) -> dict[str, float]:
    """Current (VmRSS) and peak (VmHWM) resident set of a process, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024  # kB -> MiB
    return {"rss_mib": round(fields["VmRSS"]), "peak_rss_mib": round(fields["VmHWM"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="distilbart-cnn-12-6")
    parser.add_argument("--max-batch-size", type=int, default=6)
    parser.add_argument("--summary-tokens", type=int, default=142)
    parser.add_argument("--headline-tokens", type=int, default=24)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()

    model = cached_preset_checkpoint(args.cache, args.preset)
    started = time.monotonic()
    process, target = start_server(model, ["--max-batch-size", str(args.max_batch_size),
                                           "--max-batch-tokens", "0",
                                           "--threads", str(args.threads), "--device", "cpu"])
    report: dict[str, object] = {"preset": args.preset, "max_batch_size": args.max_batch_size,
                                 "num_beams": args.num_beams,
                                 "summary_tokens": args.summary_tokens,
                                 "headline_tokens": args.headline_tokens,
                                 "ready_s": round(time.monotonic() - started, 1)}
    try:
        report["after_warmup"] = memory_mib(process.pid)
        # Long enough to fill any input window: every article is truncated to it (asked for
        # explicitly: the server's default for long articles is to summarise them in chunks).
        text = " ".join(training_text(sentences=400, seed=2))
        options = pb.GenerationOptions(
            summary_min_tokens=args.summary_tokens, summary_max_tokens=args.summary_tokens,
            headline_min_tokens=args.headline_tokens, headline_max_tokens=args.headline_tokens,
            num_beams=args.num_beams, long_input=pb.LONG_INPUT_POLICY_TRUNCATE)
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SummarizerStub(channel)

            def call(n: int) -> pb.SummarizeResponse:
                return stub.Summarize(pb.SummarizeRequest(
                    articles=[pb.Article(id=str(n), text=text)], options=options), timeout=3600)

            begun = time.monotonic()
            with ThreadPoolExecutor(args.max_batch_size) as pool:
                replies = list(pool.map(call, range(args.max_batch_size)))
            report["batch_s"] = round(time.monotonic() - begun, 1)
        report["input_tokens"] = replies[0].results[0].input_tokens
        report["after_full_batch"] = memory_mib(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=120)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
