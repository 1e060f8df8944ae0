"""Heavy and hostile input against a real server: who pays for it, and is the memory given back?

Starts `summarizer serve` on a tiny random-weight BART (one worker process) and runs:

- `big`: one valid 10 MB Summarize call (100 articles of 100,000 characters, TRUNCATE); 1 s in,
  a one-article call. Prints both latencies, the same 100 articles cut to the window beforehand
  (what the big call should cost), and the resident set (server + worker) before, at its peak,
  and 20 s after.
- `where` (alone): where that request's memory goes, step by step, in this process.
- `stall`: 40 raw HTTP/2 streams (one connection) that each announce a 16 MB message, send
  15 MB and stall; the resident set while they stall and 10 s after they disconnect. Streams
  past the server's per-connection limit are held back, or with `--connections N` go over up
  to N connections, as a hostile client would. With `--auth`, the server wants a bearer token
  and the streams send none.

    python benchmarks/hostile.py big stall
    python benchmarks/hostile.py stall --auth

Prints one JSON object per scenario. The machine's load average is printed beside the figures:
on a shared machine timings move with it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import h2.exceptions

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.rawh2

from concurrency import start_server  # noqa: E402
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb  # noqa: E402
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc  # noqa: E402
from service.engines.tiny import build_tiny_checkpoint, training_text  # noqa: E402
from tests.rawh2 import RawConnection, grpc_frame  # noqa: E402

MIB = 1024 * 1024
TOKEN = "hostile-bench-token"


def tree_rss_mib(pid: int) -> float:
    """Resident set of a process and its children (the worker), in MiB."""
    total = 0
    pids = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            pids += [int(c) for c in (task / "children").read_text().split()]
    except OSError:
        pass
    for each in pids:
        try:
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


class PeakSampler:
    """Samples the resident set every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = tree_rss_mib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, tree_rss_mib(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak


def article_text(chars: int, seed: int) -> str:
    sentences = training_text(sentences=max(10, chars // 40), seed=seed)
    text = " ".join(sentences)
    while len(text) < chars:
        text += " " + text
    return text[:chars]


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def big(target: str, pid: int, articles: int, chars: int, window_chars: int) -> dict[str, object]:
    texts = [article_text(chars, seed) for seed in range(articles)]
    options = pb.GenerationOptions(long_input=pb.LONG_INPUT_POLICY_TRUNCATE,
                                   summary_max_tokens=8, headline_max_tokens=4, num_beams=1)
    with grpc.insecure_channel(target, options=[
            ("grpc.max_send_message_length", 64 * MIB)]) as channel:
        stub = pb_grpc.SummarizerStub(channel)

        def call(batch: list[str]) -> pb.SummarizeResponse:
            return stub.Summarize(pb.SummarizeRequest(
                articles=[pb.Article(id=str(i), text=t) for i, t in enumerate(batch)],
                options=options), timeout=600)

        small_alone = timed(lambda: call([texts[0][:2000]]))
        cut_s = timed(lambda: call([t[:window_chars] for t in texts]))
        time.sleep(2)
        baseline = tree_rss_mib(pid)
        sampler = PeakSampler(pid)
        result: dict[str, float] = {}

        def big_call() -> None:
            result["big_s"] = timed(lambda: call(texts))
            result["big_done"] = time.monotonic()

        thread = threading.Thread(target=big_call)
        thread.start()
        time.sleep(1.0)
        small_during = timed(lambda: call([texts[0][:2000]]))
        thread.join()
        peak = sampler.stop()
        time.sleep(max(0.0, result["big_done"] + 20 - time.monotonic()))
        after = tree_rss_mib(pid)
        # Side by side, alternating (the machine's load moves between runs): the big call
        # alone against the same articles cut to the window beforehand.
        pairs = [(timed(lambda: call([t[:window_chars] for t in texts])),
                  timed(lambda: call(texts))) for _ in range(3)]
    return {"scenario": "big", "articles": articles, "chars": chars,
            "request_mib": round(articles * chars / MIB, 1),
            "small_alone_s": round(small_alone, 2), "small_during_s": round(small_during, 2),
            "big_s": round(result["big_s"], 2), "cut_beforehand_s": round(cut_s, 2),
            "alternating_cut_then_big_s": [[round(c, 2), round(b, 2)] for c, b in pairs],
            "median_big_over_cut": round(statistics.median(b for _, b in pairs)
                                         / statistics.median(c for c, _ in pairs), 2),
            "rss_baseline_mib": round(baseline), "rss_peak_mib": round(peak),
            "rss_20s_after_mib": round(after)}


def stall(host: str, port: int, pid: int, streams: int, announced_mib: int, sent_mib: int,
          auth: bool, max_connections: int = 1) -> dict[str, object]:
    """`streams` half-sent messages. When a connection's stream limit is reached, the rest go
    over new connections, up to `max_connections`; past that they are held back."""
    baseline = tree_rss_mib(pid)
    sampler = PeakSampler(pid)
    connections = [RawConnection(host, port, timeout_s=30)]
    frame = grpc_frame(b"\x0a" * (sent_mib * MIB), announced=announced_mib * MIB)
    connections[-1].receive(timeout_s=5)  # the server's SETTINGS (its stream limit)
    sent = cut_short = held_back = 0
    for _ in range(streams):
        try:
            stream_id = connections[-1].open("/summarizer.v1.Summarizer/Summarize")
        except h2.exceptions.TooManyStreamsError:
            if len(connections) == max_connections:
                held_back += 1
                continue
            connections.append(RawConnection(host, port, timeout_s=30))
            connections[-1].receive(timeout_s=5)
            stream_id = connections[-1].open("/summarizer.v1.Summarizer/Summarize")
        done = connections[-1].send(stream_id, frame)
        sent += done
        cut_short += done < len(frame)
    time.sleep(2)
    stalled = tree_rss_mib(pid)
    for connection in connections:
        connection.close()
    time.sleep(10)
    after = tree_rss_mib(pid)
    peak = sampler.stop()
    return {"scenario": "stall", "auth": auth, "streams": streams,
            "connections": len(connections), "announced_mib": announced_mib,
            "sent_mib_each": sent_mib, "mib_accepted_by_server": round(sent / MIB),
            "streams_cut_short": cut_short, "streams_held_back": held_back,
            "rss_baseline_mib": round(baseline), "rss_while_stalled_mib": round(stalled),
            "rss_peak_mib": round(peak), "rss_10s_after_disconnect_mib": round(after)}


def where(model: Path, articles: int, chars: int) -> dict[str, object]:
    """Where a 10 MB TRUNCATE request's memory goes, step by step, in this process: the
    resident set after each step (glibc keeps what Python frees, so it only grows)."""
    import gc

    from service.config import Settings
    from service.engines.torch_engine import TorchEngine
    from service.text import clean_article, model_text

    engine = TorchEngine(Settings(model=str(model), device="cpu")).load(weights=False)
    params = engine.defaults
    steps: dict[str, float] = {}
    gc.collect()
    last = tree_rss_mib(os.getpid())

    def step(name: str) -> None:
        nonlocal last
        now = tree_rss_mib(os.getpid())
        steps[name] = round(now - last, 1)
        last = now

    texts = [article_text(chars, seed) for seed in range(articles)]
    step("article texts built (str)")
    raw = pb.SummarizeRequest(articles=[pb.Article(id=str(i), text=t)
                                        for i, t in enumerate(texts)]).SerializeToString()
    del texts
    gc.collect()
    step("serialized message (what gRPC buffers)")
    message = pb.SummarizeRequest.FromString(raw)
    step("protobuf message parsed")
    strings = [a.text for a in message.articles]
    step("texts as Python str")
    cleaned = [model_text(clean_article(t)) for t in strings]
    step("cleaned texts")
    whole = engine.summary.tokenizer.encode_batch(
        [engine.summary.summary_prefix + t for t in cleaned])
    step("whole texts tokenised (before: ids and masks of every token)")
    tokens = sum(len(ids) for ids, _ in whole)
    del whole
    gc.collect()
    step("(freed)")
    prepared = engine.prepare(cleaned, params)
    step("window's worth tokenised (now)")
    kept = sum(p.input_tokens for p in prepared)
    return {"scenario": "where", "articles": articles, "chars": chars,
            "message_mib": round(len(raw) / MIB, 1), "tokens_whole": tokens,
            "tokens_kept": kept, "rss_growth_mib_by_step": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="+", choices=("big", "stall", "where"))
    parser.add_argument("--articles", type=int, default=100)
    parser.add_argument("--chars", type=int, default=100_000)
    parser.add_argument("--window-chars", type=int, default=2000,
                        help="what 'cut to the window beforehand' keeps of each article")
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--auth", action="store_true")
    parser.add_argument("--connections", type=int, default=1,
                        help="stall: connections the streams may use (a new one when the "
                             "server's stream limit is reached)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="more `summarizer serve` arguments (repeatable)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_checkpoint(Path(tmp) / "tiny-bart", "bart")
        if args.scenarios == ["where"]:
            print(json.dumps(where(model, args.articles, args.chars)), flush=True)
            return 0
        extra = ["--workers", "1", *args.server_arg]
        env_token = {"SUMMARIZER_AUTH_TOKEN": TOKEN} if args.auth else {}
        os.environ.update(env_token)
        process, target = start_server(model, extra)
        threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
        host, _, port = target.rpartition(":")
        try:
            for scenario in args.scenarios:
                if scenario == "big":
                    report = big(target, process.pid, args.articles, args.chars,
                                 args.window_chars)
                else:
                    report = stall(host, int(port), process.pid, args.streams, 16, 15,
                                   args.auth, args.connections)
                report["load_average"] = [round(x, 2) for x in os.getloadavg()]
                print(json.dumps(report), flush=True)
        finally:
            process.terminate()
            process.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
