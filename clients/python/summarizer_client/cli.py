"""The `summarizer` command of the client distribution: `summarize`, `health` and `soak`, which
need only the client. When the server distribution is installed too, its commands (`serve`,
`evaluate`, `convert`, ...) join them in the same command: the server registers a function in the
`summarizer.commands` entry point group that adds its subcommands to this parser (see
`Extension`), so one `summarizer` works from either install.

For extensions, besides `Extension` and `Command`: the flag types `positive_int`,
`count_or_default` and `seconds`, the generation-length flags (`add_generation_flags`,
`generation_lengths`), and the connection helpers (`server_of`, `security_of`, `require_server`,
`Connection`, `ChannelSecurity`), `read_text` and `cli_wording`. These are this module's public
API: the server distribution's commands use them.

A user's mistake (a missing or binary file, no server running, a bad flag) ends in one line on
stderr that says what went wrong and what to do, and a non-zero exit; never in a traceback.
Messages written for the gRPC API are reworded here in terms of the command's flags.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypedDict

from . import __version__
from .balancing import DEFAULT_STREAMS
from .errors import ClientError

if TYPE_CHECKING:
    import grpc

    from .bulk import BulkOutcome
    from .client import Result, SummarizerClient
    from .gen.summarizer.v1 import summarizer_pb2 as pb

Command = Callable[[argparse.Namespace], int]
Extension = Callable[["argparse._SubParsersAction", argparse.ArgumentParser], dict[str, Command]]
"""Adds subcommands: called with the subparsers and the parent parser of the connection flags
(--server, TLS, token), returns {name: handler}. A handler reports a user's mistake by raising
ClientError (one line, exit 2)."""
EXTENSIONS_GROUP = "summarizer.commands"

GENERATION_FLAGS = ("summary-max-tokens", "summary-min-tokens", "headline-max-tokens",
                    "headline-min-tokens", "num-beams", "max-input-tokens")
"""Per-request generation options that client commands take as flags (0: the default)."""

EXIT_FAILED = 1
"""Some work failed (an article, a call, a check); `health`: the server is not SERVING."""
EXIT_USAGE = 2
"""The command could not start: a bad flag, file or setting, or no server to send work to."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT, as shells report it)."""
_SOAK_MIN_CHARS = 40
"""soak's shortest generated article (SoakConfig.min_chars)."""
DEFAULT_PORT = 50051
PORT_VARIABLE = "SUMMARIZER_PORT"
TOKEN_VARIABLE = "SUMMARIZER_AUTH_TOKEN"


class InputError(ClientError):
    """An input file the command cannot use; the message names the file and the fix."""


class NoServer(ClientError):
    """Nothing answers at --server, so the command could not start its work (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """An error is one line, reported by the (sub)command it concerns, that points at its
    --help (argparse's usage block is a dozen lines of noise above it)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (usage: `{self.prog} --help`)\n")


def _whole_number(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return number


def positive_int(value: str) -> int:
    """A flag type: a whole number of 1 or more."""
    return _whole_number(value, 1)


def count_or_default(value: str) -> int:
    """A flag type: a whole number of 0 or more (0: the default)."""
    return _whole_number(value, 0)


def seconds(value: str) -> float:
    """A flag type: a positive, finite number of seconds."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not 0 < number < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} must be a positive number of seconds")
    return number


def server_target(value: str) -> str:
    """`--server`: HOST:PORT, [IPV6]:PORT, a bare PORT (this machine), or a gRPC target URI
    (dns:///..., unix:...) passed on as it is."""
    value = value.strip()
    if "://" in value or value.startswith(("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:")):
        return value
    host, colon, port = value.rpartition(":")
    if not colon:
        host, port = "localhost", value
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not HOST:PORT or a port number (e.g. localhost:50051, or 50051 for "
            "this machine)")
    host = host or "localhost"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address given without brackets
    return f"{host}:{port}"


def default_target(environ: Mapping[str, str] | None = None) -> str:
    """Where client commands find a server when --server is not given: this machine, at the
    port the server's own setting gives (SUMMARIZER_PORT), so one variable serves both sides."""
    environ = os.environ if environ is None else environ
    raw = environ.get(PORT_VARIABLE, str(DEFAULT_PORT))
    try:
        port = int(raw)
    except ValueError:
        raise ClientError(f"{PORT_VARIABLE}: cannot read {raw!r} as int") from None
    if not 1 <= port <= 65535:
        raise ClientError(f"{PORT_VARIABLE}={port} is not a port a client can connect to; "
                          "pass --server HOST:PORT")
    return f"localhost:{port}"


def default_token(environ: Mapping[str, str] | None = None) -> str:
    """The bearer token sent when no token file is given: the variable the server reads, so one
    secret serves both sides of a deployment."""
    environ = os.environ if environ is None else environ
    return environ.get(TOKEN_VARIABLE, "").strip()


def _server_help() -> str:
    return ("HOST:PORT of the server, a bare PORT for this machine, or a gRPC target URI "
            "naming several replicas (dns:///summarizer-headless:50051, "
            "ipv4:10.0.0.1:50051,10.0.0.2:50051), whose calls go round-robin over every address "
            f"(default: localhost:{DEFAULT_PORT}, or the port in {PORT_VARIABLE} when it is "
            "set, as for `serve`)")


def build_parser(extensions: Sequence[Extension] = ()) -> tuple[argparse.ArgumentParser,
                                                                 dict[str, Command]]:
    """The `summarizer` parser with the client's commands and those `extensions` add, and each
    command's handler."""
    parser = _Parser(
        prog="summarizer", description="A gRPC service that writes a summary and a headline "
                                       "for every news article.")
    parser.add_argument("--version", action="version", version=f"summarizer {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    connection = _Parser(add_help=False)
    connection.add_argument("--server", type=server_target, default=None,
                            metavar="HOST:PORT|URI", help=_server_help())
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
        "summarize", parents=[connection],
        help="summarise articles with a running server; prints JSON Lines",
        description="Send articles to a running server and print one JSON object per article. "
                    "Inputs: plain UTF-8 text files (one article each, id = file name), JSON "
                    "Lines files (*.jsonl, objects with 'id' and 'text'), or '-' for stdin (JSON "
                    "Lines if it starts with '{', else one plain-text article). A file that "
                    "cannot be used (missing, empty, binary, not UTF-8) or an article the server "
                    "refuses is reported on stderr, one line each, and the others are still "
                    "summarised; the exit status is then 1.")
    send.add_argument("inputs", nargs="*", default=["-"], metavar="FILE",
                      help="input files, or - for stdin (default)")
    send.add_argument("--timeout", type=seconds, default=300.0,
                      help="seconds each call may take (default 300)")
    send.add_argument("--batch", type=positive_int, default=16,
                      help="articles per call (default 16)")
    bulk = send.add_argument_group(
        "bulk runs", "--input streams a JSON Lines corpus through SummarizeStream; with "
                     "--output, a second run skips every id that already has a result")
    bulk.add_argument("--input", default="", metavar="JSONL",
                      help="corpus: one JSON object per line with 'text' (and 'id')")
    bulk.add_argument("--output", default="", metavar="JSONL",
                      help="results file, appended to and resumable (default: stdout)")
    bulk.add_argument("--max-in-flight", type=positive_int, default=64,
                      help="articles sent and not yet answered (default 64)")
    send.add_argument("--priority", choices=("interactive", "default", "bulk"), default=None,
                      help="the calls' class: interactive (someone waits for the result now), "
                           "default or bulk (back-fills: served when nothing more urgent "
                           "waits, shed first under overload). Default: the server's (or the "
                           "token's) default; bulk for --input runs")
    bulk.add_argument("--streams", type=positive_int, default=DEFAULT_STREAMS,
                      help="streams open at once, each to the next replica of a --server URI "
                           f"that names several (default {DEFAULT_STREAMS}); a replica that "
                           "fails has its unanswered articles sent again to the others")
    send.add_argument("--outputs", choices=("both", "summary", "headline"), default="both",
                      help="what to write for each article: both (default), or only the "
                           "summary or the headline (faster)")
    add_generation_flags(send, "the server's")

    health = commands.add_parser(
        "health", parents=[connection],
        help="exit 0 when a server reports SERVING (for container health checks)",
        description="Ask a server's grpc.health.v1 service whether it is ready: prints SERVING "
                    "and exits 0, or prints its status (NOT_SERVING while the model loads) or "
                    "why it could not be reached, and exits 1. Needs no token.")
    health.add_argument("--timeout", type=seconds, default=3.0,
                        help="seconds to wait (default 3)")

    soak = commands.add_parser(
        "soak", parents=[connection], help="load/soak test a running server, verifying every "
                                           "response; prints a JSON report",
        description="Many concurrent clients with mixed work (unary calls of 1 to many "
                    "articles, streams, too-short deadlines, cancellations) for a fixed time. "
                    "Every response is checked against its request; exits 1 if anything was "
                    "lost or mismatched or an unprovoked error code came back. For loopback and "
                    "test deployments only.")
    soak.add_argument("--duration", type=seconds, default=30.0, help="seconds (default 30)")
    soak.add_argument("--clients", type=positive_int, default=16,
                      help="concurrent clients (default 16)")
    soak.add_argument("--max-articles", type=positive_int, default=16,
                      help="most articles per call (default 16)")
    soak.add_argument("--max-chars", type=positive_int, default=3000,
                      help=f"longest article in characters (default 3000; at least "
                           f"{_SOAK_MIN_CHARS})")
    soak.add_argument("--seed", type=int, default=1)
    soak.add_argument("--timeout", type=float, default=120.0,
                      help="seconds each call may take before it counts as unanswered "
                           "(default 120)")
    soak.add_argument("--max-call-s", type=float, default=0.0,
                      help="fail the run if any call takes longer than this many seconds "
                           "(default 0: no bound)")

    handlers: dict[str, Command] = {"summarize": _summarize, "health": _health, "soak": _soak}
    for extend in extensions:
        handlers |= extend(commands, connection)
    return parser, handlers


def installed_extensions() -> list[Extension]:
    """The command sets other installed distributions (the server) register."""
    return [entry.load() for entry in entry_points(group=EXTENSIONS_GROUP)]


def _subcommand(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[name]


def add_generation_flags(parser: argparse.ArgumentParser, whose: str) -> None:
    """`--long-input` and the GENERATION_FLAGS (lengths; 0: `whose` setting) on `parser`."""
    parser.add_argument("--long-input", choices=("chunk", "truncate"), default="",
                        help="articles longer than the model's window: summarise them in "
                             f"chunks, or read their beginning only (default: {whose} setting)")
    for name in GENERATION_FLAGS:
        parser.add_argument(f"--{name}", type=count_or_default, default=0, metavar="N",
                            help=f"default 0: {whose} setting, which itself defaults to the "
                                 "model family's value")


def generation_lengths(args: argparse.Namespace) -> dict[str, int]:
    """The GENERATION_FLAGS values, as keyword arguments."""
    return {name: getattr(args, name)
            for name in (flag.replace("-", "_") for flag in GENERATION_FLAGS)}


# --- API wording -> command-line wording -----------------------------------------------------

_OPTION_FIELDS = "|".join(flag.replace("-", "_") for flag in GENERATION_FLAGS)


def cli_wording(message: str) -> str:
    """A server message written for API callers, reworded with this command's flags:
    `set options.long_input to LONG_INPUT_POLICY_TRUNCATE` -> `pass --long-input truncate`,
    `options.summary_max_tokens` -> `--summary-max-tokens`."""
    message = re.sub(r"set options\.long_input to LONG_INPUT_POLICY_(\w+)",
                     lambda m: f"pass --long-input {m[1].lower()}", message)
    message = re.sub(r"\bLONG_INPUT_POLICY_(\w+)", lambda m: f"--long-input {m[1].lower()}",
                     message)
    message = re.sub(r"\boptions\.long_input\b", "--long-input", message)
    message = re.sub(r"\boptions\.outputs\b", "--outputs", message)
    return re.sub(rf"(?<![\w-])(?:options\.)?({_OPTION_FIELDS})\b",
                  lambda m: "--" + m[1].replace("_", "-"), message)


_ARTICLE_PREFIX = re.compile(r"^articles(?:\.\w+)? \(article \d+(?:, id '[^']*')?\): ")


def _article_problem(details: str) -> str:
    """A per-article INVALID_ARGUMENT without its API field and position (the caller already
    names the article), in CLI wording."""
    return cli_wording(_ARTICLE_PREFIX.sub("", details))


def _rpc_error_line(target: str, error: grpc.RpcError) -> str:
    """One line for a failed call, with what to do about the usual causes."""
    import grpc

    code = error.code()
    details = error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "DNS resolution failed" in details or "name resolution" in details.lower():
            return (f"cannot resolve the host of --server {target}; check the name, or give an "
                    "address (e.g. 127.0.0.1:50051)")
        if any(s in details for s in ("Connection refused", "failed to connect to all",
                                      "Failed to connect")):
            return (f"no server at {target}; start one with `summarizer serve --model "
                    "DIR|NAME`, or pass --server HOST:PORT")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"{target}: no answer in time; allow more with --timeout SECONDS"
    if code == grpc.StatusCode.UNAUTHENTICATED:
        reason = details.split(";")[0]  # the rest tells API callers which metadata to send
        return (f"{target}: UNAUTHENTICATED: {reason}; pass --auth-token-file FILE or set "
                "SUMMARIZER_AUTH_TOKEN")
    return f"{target}: {code.name}: {cli_wording(details)}"


# --- reading inputs ----------------------------------------------------------------------------

_BINARY_SNIFF_BYTES = 8192


def read_text(path: str) -> str:
    """A UTF-8 text file ('-': stdin), or an InputError that names it and says what to do."""
    name = "stdin" if path == "-" else path
    data = _read_bytes(path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise InputError(
            f"{name}: is not UTF-8 text (byte 0x{data[error.start]:02x} at offset "
            f"{error.start}); convert it (e.g. `iconv -f latin1 -t utf-8`) or pass the "
            "articles as a UTF-8 .jsonl file") from None


def _read_bytes(path: str, limit: int = -1) -> bytes:
    """The bytes of a text file ('-': stdin), at most `limit`; an InputError for a file that is
    missing, unreadable, a directory or binary."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit)
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory; give the files in it (e.g. {path}/*.txt)"
                         ) from None
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except PermissionError:
        raise InputError(f"{name}: cannot be read (permission denied); check its permissions"
                         ) from None
    except OSError as error:
        raise InputError(f"{name}: cannot be read ({error.strerror or error})") from None
    if b"\x00" in data[:_BINARY_SNIFF_BYTES]:
        raise InputError(f"{name}: is a binary file, not text; give plain UTF-8 text files or "
                         "a .jsonl file of articles")
    return data


def _read_articles(paths: Sequence[str], reject: Callable[[str], None]
                   ) -> Iterator[tuple[str, str, str]]:
    """(id, text, where) for every article of `paths`; a file that cannot be used is passed to
    `reject` (one line naming it and why) and skipped, so the others are still summarised."""
    from .bulk import parse_jsonl_articles

    for path in paths:
        try:
            if path == "-" and sys.stdin.isatty():
                print("summarizer: reading an article from stdin (type or paste it, then Ctrl-D; "
                      "or give files: summarizer summarize FILE...)", file=sys.stderr, flush=True)
            text = read_text(path)
            if ((path == "-" and text.lstrip().startswith("{"))
                    or path.endswith((".jsonl", ".ndjson"))):
                name = "stdin" if path == "-" else Path(path).name
                where = "stdin" if path == "-" else path
                records = list(parse_jsonl_articles(text.splitlines(), name, where))
                if not records:
                    raise InputError(f"{where}: has no records; each line must be a JSON object "
                                     "with a 'text' field")
                for article_id, article in records:
                    yield article_id, article, f"{where} (id {article_id!r})"
            else:
                where = "stdin" if path == "-" else path
                if not text.strip():
                    raise InputError(f"{where}: is empty; nothing to summarise")
                yield ("stdin" if path == "-" else Path(path).stem), text, where
        except ClientError as error:
            reject(error.message)


# --- commands ----------------------------------------------------------------------------------


def server_of(args: argparse.Namespace) -> str:
    """--server, else this machine at the port SUMMARIZER_PORT gives."""
    if not args.server:
        args.server = default_target()
    return args.server


class ChannelSecurity(TypedDict):
    """How a channel is secured: keyword arguments of `client.open_channel` and `soak.main`."""

    tls: bool
    ca_cert: str
    client_cert: str
    client_key: str


class Connection(ChannelSecurity):
    """`security_of`'s result: keyword arguments of `SummarizerClient` (the channel's security
    and the bearer token)."""

    token: str


def channel_security(connection: Connection) -> ChannelSecurity:
    """`connection` without its token."""
    return ChannelSecurity(tls=connection["tls"], ca_cert=connection["ca_cert"],
                           client_cert=connection["client_cert"],
                           client_key=connection["client_key"])


def security_of(args: argparse.Namespace) -> Connection:
    """The client's security options from the command line (and SUMMARIZER_AUTH_TOKEN)."""
    token = default_token()
    if args.auth_token_file:
        token = read_text(args.auth_token_file).strip()
    return Connection(tls=args.tls, ca_cert=args.tls_ca, client_cert=args.tls_client_cert,
                      client_key=args.tls_client_key, token=token)


def _health_check(target: str, connection: Connection, timeout_s: float) -> int:
    """The server's overall health status; a grpc.RpcError when it cannot be asked."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from .client import open_channel

    with open_channel(target, **channel_security(connection)) as channel:  # health: no token
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(  # type: ignore[attr-defined]  # the stubs' HealthStub has no methods
            health_pb2.HealthCheckRequest(), timeout=timeout_s)
    return int(reply.status)


def require_server(target: str, connection: Connection) -> None:
    """Fail at once with NoServer (one line, exit 2: the work could not start) when nothing
    answers at `target`; otherwise the client's retries (meant for a server that restarts) would
    take seconds to say so. Any answer, even an error from a server without the health service,
    means a server is there."""
    import grpc

    try:
        _health_check(target, connection, 10.0)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise NoServer(_rpc_error_line(target, error)) from None


def _health(args: argparse.Namespace) -> int:
    from grpc_health.v1 import health_pb2

    status = _health_check(server_of(args), security_of(args), args.timeout)
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    return 0 if status == health_pb2.HealthCheckResponse.SERVING else EXIT_FAILED


def _soak(args: argparse.Namespace) -> int:
    from .soak import SoakConfig, main as soak_main

    if args.max_chars < _SOAK_MIN_CHARS:
        raise ClientError(f"--max-chars must be at least {_SOAK_MIN_CHARS}")
    target = server_of(args)
    connection = security_of(args)
    require_server(target, connection)
    config = SoakConfig(duration_s=args.duration, clients=args.clients,
                        max_articles=args.max_articles, max_chars=args.max_chars, seed=args.seed,
                        timeout_s=args.timeout, max_call_s=args.max_call_s,
                        token=connection["token"])
    return soak_main(target, config, **channel_security(connection))


def _send_batches(client: SummarizerClient, articles: Iterable[tuple[str, str, str]],
                  batch_size: int, options: pb.GenerationOptions,
                  reject: Callable[[str], None], priority: str = "") -> Iterator[Result]:
    """Results of `articles`, `batch_size` per call. A call refused with INVALID_ARGUMENT because
    of one of its articles is sent again one article per call, so that the other articles still
    get results; each refused article goes to `reject`. Other errors end the run."""
    import grpc

    def refused(error: grpc.RpcError) -> bool:
        return (error.code() == grpc.StatusCode.INVALID_ARGUMENT
                and _ARTICLE_PREFIX.match(error.details() or "") is not None)

    batch: list[tuple[str, str, str]] = []
    for article in [*articles, None]:
        if article is not None:
            batch.append(article)
            if len(batch) < batch_size:
                continue
        if not batch:
            break
        try:
            yield from client.summarize([(i, t) for i, t, _ in batch], options,
                                        priority=priority)
        except grpc.RpcError as error:
            if not refused(error):
                raise
            for article_id, text, where in batch:
                try:
                    yield from client.summarize([(article_id, text)], options,
                                                priority=priority)
                except grpc.RpcError as single:
                    if not refused(single):
                        raise
                    reject(f"{where}: {_article_problem(single.details() or '')}")
        batch = []


def _summarize(args: argparse.Namespace) -> int:
    from .bulk import BulkOutcome, Progress, write_results
    from .client import ArticleFailure, SummarizerClient, make_options
    from .errors import code_name

    options = make_options(outputs=args.outputs, long_input=args.long_input,
                           **generation_lengths(args))
    if args.input and args.inputs != ["-"]:
        raise ClientError("give either --input or input files, not both")
    if args.output and not args.input:
        raise ClientError("--output needs --input (a JSON Lines corpus)")
    rejected = 0

    def reject(line: str) -> None:
        nonlocal rejected
        rejected += 1
        print(f"summarizer: error: {line}", file=sys.stderr, flush=True)

    def reported(results: Iterable[Result]) -> Iterator[Result]:
        for result in results:
            if isinstance(result, ArticleFailure):
                print(f"summarizer: error: {result.id}: {code_name(result.code)}: "
                      f"{cli_wording(result.message)}", file=sys.stderr, flush=True)
            yield result

    target = server_of(args)
    connection = security_of(args)
    if args.input:
        _read_bytes(args.input, _BINARY_SNIFF_BYTES)  # a missing or binary corpus: one line
        require_server(target, connection)
        with SummarizerClient(target, timeout_s=args.timeout, **connection) as client:
            outcome = _bulk(client, args, options)
        return EXIT_FAILED if outcome.failed else 0
    articles = _read_articles(args.inputs, reject)
    first = next(articles, None)  # files are checked before the server is asked
    outcome = BulkOutcome(total=0, skipped=0)
    if first is not None:
        require_server(target, connection)
        with SummarizerClient(target, timeout_s=args.timeout, **connection) as client:
            results = _send_batches(client, itertools.chain([first], articles), args.batch,
                                    options, reject, args.priority or "")
            write_results(reported(results), sys.stdout, Progress(0, enabled=False), outcome)
    return EXIT_FAILED if outcome.failed or rejected else 0


def _bulk(client: SummarizerClient, args: argparse.Namespace,
          options: pb.GenerationOptions) -> BulkOutcome:
    from .bulk import (BulkOutcome, Progress, count_records, finished_ids, read_jsonl_articles,
                       write_results)

    source = Path(args.input)
    try:
        total = count_records(source)
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: is not UTF-8 text (offset {error.start}); convert it "
                         "(e.g. `iconv -f latin1 -t utf-8`)") from None
    done = finished_ids(Path(args.output)) if args.output else set()
    articles = read_jsonl_articles(source, skip=done)
    skipped = len(done)
    if skipped:
        print(f"summarizer: resuming: {skipped} of {total} articles already have results",
              file=sys.stderr)
    outcome = BulkOutcome(total=total, skipped=skipped)
    progress = Progress(total, done=min(skipped, total))
    out = open(args.output, "a", encoding="utf-8") if args.output else sys.stdout
    interrupted = False
    try:
        # A bulk run is a back-fill: BULK unless --priority says otherwise.
        write_results(client.summarize_many(articles, options, max_in_flight=args.max_in_flight,
                                            request_size=args.batch, streams=args.streams,
                                            priority=args.priority or "bulk"),
                      out, progress, outcome)
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        progress.close()
        if out is not sys.stdout:
            out.close()
        if interrupted:
            print(f"summarizer: {_interrupted_line(args, outcome)}", file=sys.stderr,
                  flush=True)
    print(f"summarizer: {outcome.succeeded} summarised, {outcome.failed} failed, "
          f"{outcome.skipped} skipped (done before)", file=sys.stderr)
    return outcome


def _interrupted_line(args: argparse.Namespace, outcome: BulkOutcome) -> str:
    """What an interrupted bulk run leaves behind, and how to go on."""
    written = outcome.succeeded + outcome.failed
    if not args.output:
        return (f"interrupted: {written} results printed; with --output FILE a run can be "
                "resumed")
    have = outcome.skipped + outcome.succeeded
    return (f"interrupted: {written} results written to {args.output} ({have} of "
            f"{outcome.total} articles have one); run the same command again to resume")


def _os_error_line(error: OSError) -> str:
    if error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return first_line(error)


def first_line(error: BaseException) -> str:
    """An exception as one line, for errors reported on the command line."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def main(argv: Sequence[str] | None = None, *,
         extensions: Sequence[Extension] | None = None) -> int:
    """`summarizer`: the client's commands and those of `extensions` (default: every installed
    one, see EXTENSIONS_GROUP)."""
    parser, handlers = build_parser(installed_extensions() if extensions is None
                                    else extensions)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # reported by the subcommand, pointing at its help, not the top-level one
        _subcommand(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    import grpc

    try:
        return handlers[args.command](args)
    except ClientError as error:
        print(f"summarizer: error: {cli_wording(error.message)}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as error:
        print(f"summarizer: error: {_rpc_error_line(getattr(args, 'server', ''), error)}",
              file=sys.stderr)
        return EXIT_FAILED
    except OSError as error:
        print(f"summarizer: error: {_os_error_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - a bug: one line, the traceback on request
        if args.debug:
            raise
        print(f"summarizer: error: unexpected {type(error).__name__}: {first_line(error)} "
              "(a bug; please report it with the command; `summarizer --debug ...` shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
