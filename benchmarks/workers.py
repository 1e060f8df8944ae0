"""What engine worker processes cost and how fast they come back.

Two real servers on the same checkpoint, one with the model in a worker process (the default,
`--workers 1`) and one with the model in the server process (`--workers 0`), measured side by
side:

- idle latency: `--calls` single-article calls one after another (nothing else running), the
  median and p90 of each, and the difference (what the pipe to the worker adds to a call);
- memory: the resident memory of the server process and of each worker once warm;
- recovery: the worker is killed (SIGKILL) `--kills` times; the time from the kill to the server
  reporting SERVING again with a new worker that has answered a call.

    python benchmarks/workers.py                       # a tiny checkpoint: IPC cost alone
    python benchmarks/workers.py --preset bart-base    # a real-size one: recovery includes loading
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency import start_server  # noqa: E402 - sibling helpers
from throughput import process_tree  # noqa: E402

from service.engines.tiny import PRESETS, build_tiny_checkpoint, cached_preset_checkpoint  # noqa: E402
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb  # noqa: E402
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc  # noqa: E402

ARTICLE = ("The city council voted on Tuesday to expand the bus network to the northern "
           "districts, after a year of complaints about long waits and crowded routes.")


def workers_of(pid: int) -> list[int]:
    """The server's engine workers (its other child is multiprocessing's resource tracker)."""
    def cmdline(child: int) -> str:
        try:
            return Path(f"/proc/{child}/cmdline").read_text()
        except OSError:
            return ""
    return [c for c in process_tree(pid)[1:]
            if "spawn_main" in cmdline(c) and "resource_tracker" not in cmdline(c)]


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def call(stub: pb_grpc.SummarizerStub, options: pb.GenerationOptions) -> float:
    started = time.perf_counter()
    stub.Summarize(pb.SummarizeRequest(articles=[pb.Article(id="a", text=ARTICLE)],
                                       options=options), timeout=600)
    return time.perf_counter() - started


def serving(channel: grpc.Channel) -> bool:
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=1)
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def measure(model: Path, workers: int, args: argparse.Namespace) -> dict[str, object]:
    process, target = start_server(model, ["--workers", str(workers), "--threads",
                                           str(args.threads), "--convert-cache-dir",
                                           str(args.cache / "ctranslate2")])
    options = pb.GenerationOptions(summary_min_tokens=args.tokens, summary_max_tokens=args.tokens,
                                   headline_min_tokens=4, headline_max_tokens=4, num_beams=2)
    report: dict[str, object] = {"workers": workers}
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SummarizerStub(channel)
            for _ in range(3):
                call(stub, options)  # warm
            times = sorted(call(stub, options) for _ in range(args.calls))
            report["median_ms"] = 1000 * statistics.median(times)
            report["p90_ms"] = 1000 * times[int(0.9 * (len(times) - 1))]
            tree = process_tree(process.pid)
            report["server_rss_mb"] = rss_mb(tree[0])
            report["worker_rss_mb"] = [rss_mb(p) for p in workers_of(process.pid)]
            recoveries = []
            for _ in range(args.kills if workers else 0):
                [worker] = workers_of(process.pid)
                killed = time.perf_counter()
                os.kill(worker, signal.SIGKILL)
                while workers_of(process.pid) in ([], [worker]) or not serving(channel):
                    time.sleep(0.01)
                call(stub, options)
                recoveries.append(time.perf_counter() - killed)
            if recoveries:
                report["kill_to_serving_again_s"] = [round(r, 2) for r in recoveries]
    finally:
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=120)
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", *sorted(PRESETS)], default="tiny")
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=8, help="summary tokens per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()
    if args.preset == "tiny":
        model = build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "bart")
    else:
        model = cached_preset_checkpoint(args.cache, args.preset)
    print(f"checkpoint {args.preset}; {args.calls} one-article calls one after another "
          f"({args.tokens}+4 tokens, 2 beams), {args.threads} thread(s); load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    inside, outside = measure(model, 0, args), measure(model, 1, args)
    for report in (inside, outside):
        print(report, flush=True)
    print(f"added by the worker process: median {outside['median_ms'] - inside['median_ms']:+.1f}"
          f" ms, p90 {outside['p90_ms'] - inside['p90_ms']:+.1f} ms per one-article call")
    return 0


if __name__ == "__main__":
    sys.exit(main())
