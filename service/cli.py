"""The `summarizer` command: `serve` runs the server, `summarize` sends articles to one."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from . import config as config_module
from .errors import SummarizerError

if TYPE_CHECKING:
    from .bulk import BulkOutcome
    from .client import SummarizerClient
    from .gen.summarizer.v1 import summarizer_pb2 as pb

log = logging.getLogger("summarizer")

GENERATION_FLAGS = ("summary-max-tokens", "summary-min-tokens", "headline-max-tokens",
                    "headline-min-tokens", "num-beams", "max-input-tokens")
"""Per-request generation options that client commands take as flags (0: the default)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="summarizer", description="A gRPC service that writes a summary and a headline "
                                       "for every news article.")
    parser.add_argument("--version", action="version", version=f"summarizer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the gRPC server",
        description="Run the gRPC server. Every flag can also be set by its environment "
                    "variable; flags win.")
    config_module.add_arguments(serve)

    connection = argparse.ArgumentParser(add_help=False)
    secure = connection.add_argument_group("connection security")
    secure.add_argument("--tls", action="store_true",
                        help="use TLS, verifying the server against the system's CA roots")
    secure.add_argument("--tls-ca", default="", metavar="PEM",
                        help="use TLS, verifying the server against this CA bundle")
    secure.add_argument("--tls-client-cert", default="", metavar="PEM",
                        help="client certificate for mutual TLS (with --tls-client-key)")
    secure.add_argument("--tls-client-key", default="", metavar="PEM")
    secure.add_argument("--auth-token-file", default="", metavar="FILE",
                        help="file holding the bearer token to send (default: the "
                             "SUMMARIZER_AUTH_TOKEN environment variable, if set)")

    send = commands.add_parser(
        "summarize", parents=[connection], help="summarise articles with a running server; prints JSON Lines",
        description="Send articles to a running server and print one JSON object per article. "
                    "Inputs: plain text files (one article each, id = file name), JSON Lines "
                    "files (*.jsonl, objects with 'id' and 'text'), or '-' for stdin (JSON Lines "
                    "if it starts with '{', else one plain-text article).")
    send.add_argument("inputs", nargs="*", default=["-"], metavar="FILE",
                      help="input files, or - for stdin (default)")
    send.add_argument("--server", default="localhost:50051", help="host:port of the server")
    send.add_argument("--timeout", type=float, default=300.0,
                      help="seconds each call may take (default 300)")
    send.add_argument("--batch", type=int, default=16, help="articles per call (default 16)")
    bulk = send.add_argument_group(
        "bulk runs", "--input streams a JSON Lines corpus through SummarizeStream; with "
                     "--output, a second run skips every id that already has a result")
    bulk.add_argument("--input", default="", metavar="JSONL",
                      help="corpus: one JSON object per line with 'text' (and 'id')")
    bulk.add_argument("--output", default="", metavar="JSONL",
                      help="results file, appended to and resumable (default: stdout)")
    bulk.add_argument("--max-in-flight", type=int, default=64,
                      help="articles sent and not yet answered (default 64)")
    send.add_argument("--outputs", choices=("both", "summary", "headline"), default="both")
    _add_generation_flags(send, "the server's")
    fetch = commands.add_parser(
        "fetch", help="download a checkpoint (safetensors only) for offline use",
        description="Download a hub id or manifest name into a directory that `serve --model` "
                    "accepts; used by the Dockerfile to bake a model into the image.")
    fetch.add_argument("model", help="hub id (org/name) or manifest name from models/")
    fetch.add_argument("--out", required=True, help="directory to write")
    fetch.add_argument("--revision", default="", help="branch, tag or commit")

    convert = commands.add_parser(
        "convert", help="convert a checkpoint for --engine ctranslate2 ahead of time",
        description="Convert a checkpoint (directory, hub id or manifest name; safetensors only) "
                    "into a directory that `serve --engine ctranslate2 --model DIR` loads as is "
                    "(e.g. in a Docker build). Without it the engine converts on first start "
                    "into --convert-cache-dir.")
    convert.add_argument("model", help="checkpoint directory, hub id or manifest name")
    convert.add_argument("--out", required=True, help="directory to write")
    convert.add_argument("--compute-type", choices=("float32", "bfloat16", "float16", "int8"),
                         default="int8", help="weights' data type (default int8)")
    convert.add_argument("--revision", default="", help="branch, tag or commit (hub ids)")
    convert.add_argument("--offline", action="store_true", help="never contact the model hub")

    health = commands.add_parser(
        "health", parents=[connection], help="exit 0 when a server reports SERVING (for container health checks)")
    health.add_argument("--server", default=None,
                        help="host:port of the server (default: 127.0.0.1 and the port the "
                             "settings give, e.g. SUMMARIZER_PORT)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait")

    soak = commands.add_parser(
        "soak", parents=[connection], help="load/soak test a running server, verifying every "
                                           "response; prints a JSON report",
        description="Many concurrent clients with mixed work (unary calls of 1 to many "
                    "articles, streams, too-short deadlines, cancellations) for a fixed time. "
                    "Every response is checked against its request; exits 1 if anything was "
                    "lost or mismatched or an unprovoked error code came back. For loopback and "
                    "test deployments only.")
    soak.add_argument("--server", default="localhost:50051", help="host:port of the server")
    soak.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    soak.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    soak.add_argument("--max-articles", type=int, default=16,
                      help="most articles per call (default 16)")
    soak.add_argument("--max-chars", type=int, default=3000,
                      help="longest article in characters (default 3000)")
    soak.add_argument("--seed", type=int, default=1)
    soak.add_argument("--timeout", type=float, default=120.0,
                      help="seconds each call may take before it counts as unanswered "
                           "(default 120)")
    soak.add_argument("--max-call-s", type=float, default=0.0,
                      help="fail the run if any call takes longer than this many seconds "
                           "(default 0: no bound)")

    evaluate = commands.add_parser(
        "evaluate", parents=[connection],
        help="ROUGE of a model's summaries and headlines against references, beside lead baselines",
        description="Summarise the articles of a JSON Lines file (objects with 'text', a "
                    "reference 'summary' and/or 'headline', optional 'id') with a running server "
                    "(--server) or a model loaded in this process (--model), and print ROUGE-1/2/"
                    "L/Lsum F1 (rouge-score, stemmed) beside the lead-3 (summaries) and "
                    "first-sentence (headlines) baselines on the same articles, with lengths in "
                    "words. Exits 1 if any article failed (it is reported and not scored).")
    evaluate.add_argument("--data", required=True, metavar="FILE.jsonl", help="evaluation set")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="host:port of a running server")
    source.add_argument("--model", help="load this model in-process: a checkpoint directory, hub "
                                        "id or manifest name (other settings from SUMMARIZER_*)")
    evaluate.add_argument("--headline-model", default="", help="with --model: separate headline "
                                                               "model")
    evaluate.add_argument("--family", default="", help="with --model: force a family or manifest")
    evaluate.add_argument("--device", default=None, help="with --model: cpu, cuda, cuda:N, auto")
    evaluate.add_argument("--threads", type=int, default=None, help="with --model: CPU threads")
    evaluate.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    evaluate.add_argument("--html", metavar="FILE.html",
                          help="write a self-contained HTML report with a chart")
    evaluate.add_argument("--limit", type=int, default=0, help="only the first N records")
    evaluate.add_argument("--batch", type=int, default=8, help="articles per call (default 8)")
    evaluate.add_argument("--timeout", type=float, default=600.0,
                          help="with --server: seconds each call may take (default 600)")
    _add_generation_flags(evaluate, "the server's or model's")

    models = commands.add_parser(
        "models", help="list the recommended checkpoints (manifest names for --model)",
        description="The named manifests in models/: roles, size, licence and published ROUGE "
                    "with its source.")
    models.add_argument("--json", action="store_true", help="everything, as JSON")

    tiny = commands.add_parser(
        "make-tiny-model", help="write a tiny random-weight checkpoint (for smoke tests)",
        description="Write a tiny random-weight checkpoint with its tokenizer. It writes "
                    "gibberish, but exercises the whole service without any download.")
    tiny.add_argument("out", help="directory to write")
    tiny.add_argument("--family", choices=("bart", "t5", "pegasus"), default="bart")
    return parser


def _fetch(args: argparse.Namespace) -> int:
    from .fetch import fetch

    print(fetch(args.model, args.out, args.revision))
    return 0


def _add_generation_flags(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument("--long-input", choices=("chunk", "truncate"), default="",
                        help="articles longer than the model's window: summarise them in "
                             f"chunks, or read their beginning only (default: {whose} setting)")
    for name in GENERATION_FLAGS:
        parser.add_argument(f"--{name}", type=int, default=0, help=f"0: {whose} default")


def _generation_lengths(args: argparse.Namespace) -> dict[str, int]:
    """The GENERATION_FLAGS values, as keyword arguments."""
    return {name: getattr(args, name)
            for name in (flag.replace("-", "_") for flag in GENERATION_FLAGS)}


def _connection(args: argparse.Namespace) -> dict[str, object]:
    """The client's security options from the command line (and SUMMARIZER_AUTH_TOKEN)."""
    token = config_module.client_auth_token()
    if args.auth_token_file:
        token = Path(args.auth_token_file).read_text(encoding="utf-8").strip()
    return {"tls": args.tls, "ca_cert": args.tls_ca, "client_cert": args.tls_client_cert,
            "client_key": args.tls_client_key, "token": token}


def _convert(args: argparse.Namespace) -> int:
    from .checkpoint import resolve_source
    from .convert import convert

    settings = config_module.Settings(offline=args.offline, revision=args.revision)
    print(convert(resolve_source(args.model, settings), args.out, args.compute_type,
                  args.revision))
    return 0


def _health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .client import open_channel

    target = args.server or f"127.0.0.1:{config_module.Settings.load().port}"
    connection = _connection(args)
    del connection["token"]  # health checks need no token
    with open_channel(target, **connection) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=args.timeout)
        except grpc.RpcError as error:
            print(f"summarizer: {target}: {error.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _soak(args: argparse.Namespace) -> int:
    from .soak import SoakConfig, main as soak_main

    connection = _connection(args)
    config = SoakConfig(duration_s=args.duration, clients=args.clients,
                        max_articles=args.max_articles, max_chars=args.max_chars, seed=args.seed,
                        timeout_s=args.timeout, max_call_s=args.max_call_s,
                        token=str(connection.pop("token")))
    return soak_main(args.server, config, **connection)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import build_tiny_checkpoint

    print(build_tiny_checkpoint(args.out, args.family))
    return 0


def _read_inputs(paths: Sequence[str]) -> Iterator[tuple[str, str]]:
    from .bulk import parse_jsonl_articles, read_jsonl_articles

    for path in paths:
        if path == "-":
            text = sys.stdin.read()
            if text.lstrip().startswith("{"):
                yield from parse_jsonl_articles(text.splitlines(), "stdin", "stdin")
            else:
                yield "stdin", text
        elif path.endswith((".jsonl", ".ndjson")):
            yield from read_jsonl_articles(Path(path))
        else:
            yield Path(path).stem, Path(path).read_text(encoding="utf-8")


def _summarize(args: argparse.Namespace) -> int:
    import grpc

    from .bulk import BulkOutcome, Progress, write_results
    from .client import SummarizerClient, make_options

    options = make_options(outputs=args.outputs, long_input=args.long_input,
                           **_generation_lengths(args))
    if args.input and args.inputs != ["-"]:
        raise SummarizerError("give either --input or input files, not both")
    if args.output and not args.input:
        raise SummarizerError("--output needs --input (a JSON Lines corpus)")
    with SummarizerClient(args.server, timeout_s=args.timeout, **_connection(args)) as client:
        try:
            if args.input:
                outcome = _bulk(client, args, options)
            else:
                outcome = BulkOutcome(total=0, skipped=0)
                results = client.summarize_batches(_read_inputs(args.inputs), args.batch,
                                                   options)
                write_results(results, sys.stdout, Progress(0, enabled=False), outcome)
        except grpc.RpcError as error:
            print(f"summarizer: error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 1 if outcome.failed else 0


def _bulk(client: SummarizerClient, args: argparse.Namespace,
          options: pb.GenerationOptions) -> BulkOutcome:
    from .bulk import (BulkOutcome, Progress, count_records, finished_ids, read_jsonl_articles,
                       write_results)

    source = Path(args.input)
    total = count_records(source)
    done = finished_ids(Path(args.output)) if args.output else set()
    articles = read_jsonl_articles(source, skip=done)
    skipped = len(done)
    if skipped:
        print(f"summarizer: resuming: {skipped} of {total} articles already have results",
              file=sys.stderr)
    outcome = BulkOutcome(total=total, skipped=skipped)
    progress = Progress(total, done=min(skipped, total))
    out = open(args.output, "a", encoding="utf-8") if args.output else sys.stdout
    try:
        write_results(client.summarize_many(articles, options, max_in_flight=args.max_in_flight,
                                            request_size=args.batch), out, progress, outcome)
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
    print(f"summarizer: {outcome.succeeded} summarised, {outcome.failed} failed, "
          f"{outcome.skipped} skipped (done before)", file=sys.stderr)
    return outcome


def _models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .manifests import catalogue, score_figures

    manifests = catalogue()
    if args.json:
        print(json.dumps([asdict(m) for m in manifests], indent=2))
        return 0
    rows = [("name", "hub id", "family", "roles", "params", "weights", "licence",
             "published ROUGE (first source; --json for all)")]
    for m in manifests:
        roles = "+".join(m.roles) + (f" (headline: {m.headline_model})" if m.headline_model
                                      else "")
        rouge = score_figures(m.scores[0]) if m.scores else "none published"
        rows.append((m.name, m.hub_id, m.family, roles, m.parameters,
                     f"{m.safetensors_mb} MB" if m.safetensors_mb else "?", m.license, rouge))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from . import evaluate

    with open(args.data, encoding="utf-8") as handle:
        records = evaluate.parse_records(handle, args.data)
    records = records[:args.limit] if args.limit > 0 else records
    lengths = _generation_lengths(args)
    outputs = evaluate.outputs_needed(records)
    if args.server:
        import grpc

        from .client import SummarizerClient, make_options

        with SummarizerClient(args.server, timeout_s=args.timeout, **_connection(args)) as client:
            try:
                info = client.model_info(timeout_s=min(args.timeout, 30.0))
                results = evaluate.run_server(
                    client, records, args.batch,
                    make_options(outputs=outputs.value, long_input=args.long_input, **lengths))
            except grpc.RpcError as error:
                print(f"summarizer: error: {args.server}: {error.code().name}: "
                      f"{error.details()}", file=sys.stderr)
                return 1
        source = f"server {args.server} ({', '.join(m.model_id for m in info.models)})"
    else:
        from .domain import LongInput, RequestedOptions
        from .server import default_engine_factory

        overrides = {"model": args.model, "headline_model": args.headline_model,
                     "family": args.family, "device": args.device, "threads": args.threads}
        settings = config_module.Settings.load(overrides)
        engine = default_engine_factory(settings)
        long_input = LongInput(args.long_input) if args.long_input else None
        results = evaluate.run_in_process(
            engine, settings, records, args.batch,
            RequestedOptions(outputs=outputs, long_input=long_input, **lengths))
        source = f"model {args.model}" + (f", headlines {args.headline_model}"
                                          if args.headline_model else "")
    report = evaluate.build_report(records, results, data=args.data, source=source)
    print(evaluate.render_text(report))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.html:
        Path(args.html).write_text(evaluate.render_html(report), encoding="utf-8")
    return 1 if report["failed"] else 0


def _serve(args: argparse.Namespace) -> int:
    from .logs import configure_logging
    from .server import run

    settings = config_module.from_arguments(args)
    if not settings.model:
        raise SummarizerError("no model given: pass --model (a directory, hub id or manifest "
                              "name) or set SUMMARIZER_MODEL")
    configure_logging(settings.log_level, settings.log_format)
    # Before torch or ctranslate2 load their OpenMP runtimes (they read it once, at load): idle
    # OpenMP threads that spin keep the cores from the server's other threads and from the other
    # runtime (torch and ctranslate2 each bundle one). Spinning made the server 4x (torch) to 10x
    # (ctranslate2) slower than the same engine in-process on a 2-core machine under load; an
    # explicit OMP_WAIT_POLICY is left alone.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if asyncio.run(run(settings)):
        # A batch abandoned after the grace period still runs in the model thread; Python would
        # wait for it at exit. Nobody needs its results: exit now, as the grace period promised.
        log.warning("exiting while the model finishes an abandoned batch")
        logging.shutdown()
        os._exit(0)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"serve": _serve, "summarize": _summarize, "fetch": _fetch,
                    "convert": _convert, "health": _health, "soak": _soak,
                    "make-tiny-model": _make_tiny_model, "evaluate": _evaluate,
                    "models": _models}
        return commands[args.command](args)
    except SummarizerError as error:
        print(f"summarizer: error: {error.message}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as error:
        print(f"summarizer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
