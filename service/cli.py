"""The server's commands of `summarizer`: `serve` runs the server; `evaluate`, `convert`,
`fetch`, `models` and `make-tiny-model` work with models.

The `summarizer` command itself is the client distribution's (`summarizer_client.cli`), with
`summarize`, `health` and `soak`; this module adds the commands above to it through the
`summarizer.commands` entry point (`add_commands`), so one command works from either install.
`python -m service` runs it with these commands whatever the installed entry points say.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from summarizer_client import cli as client_cli
from summarizer_client.cli import (Command, add_generation_flags, cli_wording, count_or_default,
                                   generation_lengths, positive_int, read_text, require_server,
                                   seconds, security_of, server_of, server_target)
from summarizer_client.errors import ClientError

from . import config as config_module
from .errors import SummarizerError

__all__ = ["add_commands", "cli_wording", "main", "server_target"]

log = logging.getLogger("summarizer")

EXIT_FAILED = client_cli.EXIT_FAILED


class InputError(SummarizerError):
    """An input file the command cannot use; the message names the file and the fix."""


def add_commands(commands: argparse._SubParsersAction,
                 connection: argparse.ArgumentParser) -> dict[str, Command]:
    """The server's subcommands (a `summarizer_client.cli.Extension`)."""
    serve = commands.add_parser(
        "serve", help="run the gRPC server",
        description="Run the gRPC server. Every flag can also be set by its environment "
                    "variable; flags win. --model takes a checkpoint directory (a path: it "
                    "starts with /, ./, ../ or ~, or names an existing directory), a manifest "
                    "name (`summarizer models`), or a hub id in ORG/NAME form.")
    config_module.add_arguments(serve)

    fetch = commands.add_parser(
        "fetch", help="download a checkpoint (safetensors only) for offline use",
        description="Download a hub id or manifest name into a directory that `serve --model` "
                    "accepts; used by the Dockerfile to bake a model into the image.")
    fetch.add_argument("model", help="hub id (ORG/NAME) or manifest name (`summarizer models`)")
    fetch.add_argument("--out", required=True, help="directory to write")
    fetch.add_argument("--revision", default="", help="branch, tag or commit")

    convert = commands.add_parser(
        "convert", help="convert a checkpoint for --engine ctranslate2 ahead of time",
        description="Convert a checkpoint (directory, hub id or manifest name; safetensors only) "
                    "into a directory that `serve --engine ctranslate2 --model DIR` loads as is "
                    "(e.g. in a Docker build). Without it the engine converts on first start "
                    "into --convert-cache-dir.")
    convert.add_argument("model", help="checkpoint directory, hub id or manifest name")
    convert.add_argument("--out", default="",
                         help="directory to write (a new directory with the checkpoint's configs "
                              "and tokenizer, and the converted model)")
    convert.add_argument("--in-place", action="store_true",
                         help="add the converted model to the checkpoint directory itself, so "
                              "one directory serves both engines (the Dockerfile does this)")
    convert.add_argument("--compute-type", choices=("float32", "bfloat16", "float16", "int8"),
                         default="int8", help="weights' data type (default int8)")
    convert.add_argument("--revision", default="", help="branch, tag or commit (hub ids)")
    convert.add_argument("--offline", action="store_true", help="never contact the model hub")

    evaluate = commands.add_parser(
        "evaluate", parents=[connection],
        help="ROUGE of a model's summaries and headlines against references, beside lead baselines",
        description="Summarise the articles of a JSON Lines file (objects with 'text', a "
                    "reference 'summary' and/or 'headline', optional 'id') with a running server "
                    "(--server, the default) or a model loaded in this process (--model), and "
                    "print ROUGE-1/2/L/Lsum F1 (rouge-score, stemmed) beside the lead-3 "
                    "(summaries) and first-sentence (headlines) baselines on the same articles, "
                    "with lengths in words. Exits 1 if any article failed (it is reported and "
                    "not scored).")
    evaluate.add_argument("--data", required=True, metavar="FILE.jsonl", help="evaluation set")
    evaluate.add_argument("--model", help="load this model in-process instead of asking a "
                                          "server: a checkpoint directory, hub id or manifest "
                                          "name (other settings from SUMMARIZER_*)")
    evaluate.add_argument("--headline-model", default="", help="with --model: separate headline "
                                                               "model")
    evaluate.add_argument("--family", default="", help="with --model: force a family or manifest")
    evaluate.add_argument("--device", default=None, help="with --model: cpu, cuda, cuda:N, auto")
    evaluate.add_argument("--threads", type=count_or_default, default=None,
                          help="with --model: CPU threads")
    evaluate.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    evaluate.add_argument("--html", metavar="FILE.html",
                          help="write a self-contained HTML report with a chart")
    evaluate.add_argument("--limit", type=count_or_default, default=0,
                          help="only the first N records (default 0: all)")
    evaluate.add_argument("--batch", type=positive_int, default=8,
                          help="articles per call (default 8)")
    evaluate.add_argument("--timeout", type=seconds, default=600.0,
                          help="with a server: seconds each call may take (default 600)")
    add_generation_flags(evaluate, "the server's or model's")

    models = commands.add_parser(
        "models", help="list the recommended checkpoints (manifest names for --model)",
        description="The named manifests in models/: roles, size, licence and published ROUGE "
                    "with its source.")
    models.add_argument("--json", action="store_true", help="everything, as JSON")

    tiny = commands.add_parser(
        "make-tiny-model", help="write a tiny random-weight checkpoint (for smoke tests)",
        description="Write a tiny random-weight checkpoint with its tokenizer, readable by "
                    "everyone (files 0644, directories 0755: a container's non-root user can "
                    "read it when mounted). It writes gibberish, but exercises the whole "
                    "service without any download.")
    tiny.add_argument("out", help="directory to write")
    tiny.add_argument("--family", choices=("bart", "t5", "pegasus"), default="bart")
    return {name: _reported(handler) for name, handler in COMMANDS.items()}


def _reported(handler: Command) -> Command:
    """The server's errors meant for the user (bad settings, a model that cannot load) become
    the client command's one-line errors."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SummarizerError as error:
            raise ClientError(error.message) from None

    return run


def _parser() -> argparse.ArgumentParser:
    """The whole `summarizer` parser, client commands included."""
    return client_cli.build_parser([add_commands])[0]


def _fetch(args: argparse.Namespace) -> int:
    from .engines.fetch import fetch

    print(fetch(args.model, args.out, args.revision))
    return 0


def _convert(args: argparse.Namespace) -> int:
    from .engines.checkpoint import resolve_source
    from .engines.convert import convert, convert_in_place

    settings = config_module.Settings(offline=args.offline, revision=args.revision)
    if bool(args.out) == args.in_place:
        raise SummarizerError("convert: give either --out DIR or --in-place")
    source = resolve_source(args.model, settings)
    if args.in_place:
        if not source.local:
            raise SummarizerError(f"convert --in-place: {args.model!r} is not a local directory; "
                                  "use --out DIR")
        print(convert_in_place(source, args.compute_type))
    else:
        print(convert(source, args.out, args.compute_type, args.revision))
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from .engines.tiny import build_tiny_checkpoint

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise InputError(f"{args.out}: is a file; give a directory to write the model into")
    print(build_tiny_checkpoint(args.out, args.family))
    return 0


def _models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .engines.manifests import catalogue, score_figures

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

    if args.model and args.server:
        raise SummarizerError("give either --server or --model, not both")
    records = evaluate.parse_records(read_text(args.data).splitlines(), args.data)
    records = records[:args.limit] if args.limit > 0 else records
    lengths = generation_lengths(args)
    outputs = evaluate.outputs_needed(records)
    if not args.model:
        from summarizer_client.client import SummarizerClient, make_options

        target = server_of(args)
        connection = security_of(args)
        require_server(target, connection)
        with SummarizerClient(target, timeout_s=args.timeout, **connection) as client:
            info = client.model_info(timeout_s=min(args.timeout, 30.0))
            results = evaluate.run_server(
                client, records, args.batch,
                make_options(outputs=outputs.value, long_input=args.long_input, **lengths))
        source = f"server {target} ({', '.join(m.model_id for m in info.models)})"
    else:
        from .engines.checkpoint import check_model_refs
        from .domain import LongInput, RequestedOptions
        from .api.server import default_engine_factory

        overrides = {"model": args.model, "headline_model": args.headline_model,
                     "family": args.family, "device": args.device, "threads": args.threads}
        settings = config_module.Settings.load(overrides)
        check_model_refs(settings)
        engine = default_engine_factory(settings)
        long_input = LongInput(args.long_input) if args.long_input else None
        results = evaluate.run_in_process(
            engine, settings, records, args.batch,
            RequestedOptions(outputs=outputs, long_input=long_input, **lengths))
        source = f"model {args.model}" + (f", headlines {args.headline_model}"
                                          if args.headline_model else "")
    report = evaluate.build_report(records, results, data=args.data, source=source)
    print(cli_wording(evaluate.render_text(report)))  # failed articles' messages name flags
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.html:
        Path(args.html).write_text(evaluate.render_html(report), encoding="utf-8")
    return EXIT_FAILED if report["failed"] else 0


def _serve(args: argparse.Namespace) -> int:
    from .engines.checkpoint import check_model_refs
    from .api.logs import configure_logging
    from .api.server import run

    settings = config_module.from_arguments(args)
    if not settings.model:
        raise SummarizerError("no model given: pass --model (a directory, hub id or manifest "
                              "name) or set SUMMARIZER_MODEL")
    configure_logging(settings.log_level, settings.log_format)
    # Before the port is bound: a misspelt path or name, or a hub that cannot be reached, is
    # reported at once instead of after a NOT_SERVING start.
    check_model_refs(settings)
    # OpenMP's wait policy, before torch or ctranslate2 load their runtimes (read once, at load).
    # The model runs in worker processes (--workers >= 1) that do nothing else: they keep the
    # runtime's default (threads spin briefly between parallel regions, then sleep). A step is
    # hundreds of small parallel operations; with PASSIVE every one of them woke its threads
    # through the kernel, and a worker ran a torch int8 step at half its in-process speed
    # (docs/performance.md, "OpenMP wait policy"). Only a model run inside the server process
    # (--workers 0) sleeps at once (PASSIVE): there, spinning threads took the cores from gRPC's
    # threads and the other bundled runtime, 4x (torch) to 10x (ctranslate2) slower under load.
    # An explicit OMP_WAIT_POLICY is left alone, for both.
    if not config_module.worker_devices(settings):
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if asyncio.run(run(settings)):
        # A batch abandoned after the grace period still runs in the model thread; Python would
        # wait for it at exit. Nobody needs its results: exit now, as the grace period promised.
        log.warning("exiting while the model finishes an abandoned batch")
        logging.shutdown()
        os._exit(0)
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _serve, "fetch": _fetch, "convert": _convert, "make-tiny-model": _make_tiny_model,
    "evaluate": _evaluate, "models": _models}


def main(argv: Sequence[str] | None = None) -> int:
    """`summarizer` with the client's commands and these."""
    return client_cli.main(argv, extensions=[add_commands])


if __name__ == "__main__":
    raise SystemExit(main())
