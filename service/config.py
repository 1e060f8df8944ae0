"""All server settings, in one object.

Every field of `Settings` is documented here and is settable three ways, strongest first: a command
line flag (`--max-batch-size`), an environment variable (`SUMMARIZER_MAX_BATCH_SIZE`), the default.
Environment variables are read here and nowhere else, with one exception: tracing. Whether it is
on is decided here (`trace_exporters`, from the standard `OTEL_*` variables), and the rest of the
`OTEL_*` variables (endpoint, headers, service name, resource, sampler, batch processor) are read
by the OpenTelemetry SDK itself, as it defines them.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .domain import MIN_WINDOW_TOKENS, Priority
from .errors import ConfigError

ENV_PREFIX = "SUMMARIZER_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
             env: tuple[str, ...] = (), aliases: tuple[str, ...] = (),
             secret: bool = False) -> Any:
    """A settings field with its help text, allowed values, extra environment variable names and
    extra flag names (`aliases`, kept so that renamed flags go on working). A secret is left out
    of the settings' repr, so it never reaches a log line."""
    return field(default=default, repr=not secret,
                 metadata={"help": help, "choices": choices, "env": env, "aliases": aliases})


@dataclass(frozen=True)
class Settings:
    """Server configuration. Defaults suit a CPU machine; see docs/configuration.md."""

    # --- model ---
    model: str = _setting(
        "", "Summary model: a local checkpoint directory, a hub id, or a manifest name from "
            "models/.")
    headline_model: str = _setting(
        "", "Separate headline model (directory, hub id or manifest name); empty: the summary "
            "model also writes headlines.")
    revision: str = _setting(
        "", "Hub revision (branch, tag or commit) for hub ids; empty: default.")
    family: str = _setting(
        "", "Force the defaults: a family (bart, t5, pegasus, ...) or a manifest name "
            "(flan-t5-base), instead of detecting them from the checkpoint.")
    offline: bool = _setting(
        False, "Never contact the model hub; load from local files and the hub cache only. "
               "Also turned on by HF_HUB_OFFLINE=1.", env=("HF_HUB_OFFLINE",))
    engine: str = _setting(
        "auto", "Inference engine: auto (ctranslate2 where it supports the model and device, else "
                "torch; the start-up log says which and why), ctranslate2 (converts the "
                "checkpoint once into --convert-cache-dir), or torch (transformers: the reference, "
                "token-exact).",
        choices=("auto", "torch", "ctranslate2"))
    device: str = _setting("auto", "Where the model runs: auto (cuda when available), cpu, cuda, "
                                   "cuda:N.")
    compute_type: str = _setting(
        "auto", "Data type the engine computes in; auto: ctranslate2 int8 on CPU and float16 "
                "on GPU; torch float32 on CPU, bfloat16 on GPUs that support it, else float16. "
                "float32 gives token-exact parity with transformers. int8: torch quantises its "
                "linear layers dynamically (CPU only), ctranslate2 stores int8 weights.",
        choices=("auto", "float32", "bfloat16", "float16", "int8"),
        env=("SUMMARIZER_DTYPE",), aliases=("--dtype",))
    threads: int = _setting(0, "CPU threads for inference; 0: the engine's default (all cores).")
    convert_cache_dir: str = _setting(
        "", "Where the ctranslate2 engine keeps converted checkpoints, one directory per "
            "checkpoint and compute type; empty: ~/.cache/summarizer/ctranslate2, or, where that "
            "cannot be written (a read-only root filesystem), summarizer-ctranslate2 under the "
            "temporary directory ($TMPDIR, else /tmp).")
    warmup: bool = _setting(True, "Run a warm-up generation before reporting SERVING.")
    workers: int = _setting(
        1, "Engine worker processes: each loads the model and runs batches, supervised (a worker "
           "that crashes or hangs is replaced; its batch is retried, then split to isolate the "
           "input that kills it). The CPU threads are split between them. 0: run the model in the "
           "server process (no isolation; for debugging).")
    devices: str = _setting(
        "", "Comma-separated devices, one worker each (e.g. cuda:0,cuda:1); sets --workers. "
            "Empty: --workers workers on --device.")
    batch_timeout_s: float = _setting(
        0.0, "Watchdog: a worker whose batch runs longer than this is killed and replaced, and "
             "the batch treated as a crash. 0: 10x the slowest recent batch, at least 120 s "
             "(300 s until a batch has been timed).")
    max_worker_restarts: int = _setting(
        20, "Crash loop: more worker restarts than this within 5 minutes (or 3 failed starts "
            "in a row) sets health NOT_SERVING and makes the server exit non-zero, so an "
            "orchestrator restarts the pod.")
    worker_engine: str = _setting(
        "", "Test hook: build the workers' engine with this callable (module:function taking "
            "the settings) instead of --engine; used by the fault-injection tests.")

    # --- generation defaults (0: the model family's manifest default) ---
    max_input_tokens: int = _setting(
        0, "Input window in tokens; longer articles are chunked or truncated (see --long-input). "
           "0: the family default, capped by the model's position limit.")
    summary_prefix: str | None = _setting(
        None, "Text put before the article for summaries (e.g. 'summarize: '); unset: family "
              "default.")
    headline_prefix: str | None = _setting(
        None, "Text put before the article for headlines; unset: family default.")
    summary_max_tokens: int = _setting(0, "Default maximum summary length in tokens.")
    summary_min_tokens: int = _setting(0, "Default minimum summary length in tokens.")
    headline_max_tokens: int = _setting(0, "Default maximum headline length in tokens.")
    headline_min_tokens: int = _setting(0, "Default minimum headline length in tokens.")
    num_beams: int = _setting(0, "Default beam width.")

    # --- long articles ---
    long_input: str = _setting(
        "chunk", "Articles longer than the input window, when a request does not choose: chunk "
                 "(summarise window-sized chunks, then their joined summaries) or truncate (read "
                 "the beginning only; cheaper).", choices=("chunk", "truncate"))
    max_chunks_per_article: int = _setting(
        64, "Most chunks one article may be split into (at most --max-queue); a longer article is "
            "refused with INVALID_ARGUMENT (it may still ask for truncation).")
    max_chunk_depth: int = _setting(
        3, "Most times joined chunk summaries that exceed the window are chunked and summarised "
           "again; past it the final pass reads them cut to the window and the result says "
           "truncated.")

    # --- batching ---
    batching: str = _setting(
        "auto", "How articles share the model: static (a batch runs from start to end; only "
                "equal options share one) or continuous (articles join and leave between "
                "decoding steps, whatever their options; needs an engine that can step). auto: "
                "continuous when the engine is torch and can step the model type, else static.",
        choices=("auto", "static", "continuous"))
    max_batch_size: int = _setting(
        16, "Most articles generated together in one batch; --max-batch-tokens is the cap that "
            "usually binds on a CPU. Raise both on a GPU. With continuous batching: the most "
            "articles decoding at once (admitted to the engine, running or waiting for cache "
            "room).")
    max_wait_ms: float = _setting(
        10.0, "When the model is idle, how long the first queued article may wait for others to "
              "join its batch. While the model is busy, articles queue without a timer. Static "
              "batching only: with continuous batching the first article starts at once and "
              "others join at the next decoding step.")
    max_batch_tokens: int = _setting(
        2400, "Cap on a batch's padded input tokens (batch size x longest input): 6 articles of "
              "400 tokens or 12 of 200 (measured for BART-base on a 2-core CPU, both engines); "
              "0: no cap. Static batching only (continuous batching is bounded by "
              "--kv-cache-mb).")
    kv_cache_mb: int = _setting(
        0, "Memory for the decoder caches of continuous batching (self- and cross-attention, "
           "beams included), in MiB; a request that could never fit is refused with "
           "RESOURCE_EXHAUSTED. Counted between steps; a step briefly holds up to about 3x the "
           "self-attention part. 0: auto (an eighth of system RAM on "
           "CPU, 30% of free GPU memory after loading)")
    max_encode_tokens_per_step: int = _setting(
        1024, "Continuous batching: most input tokens (the articles' inputs added up) encoded "
              "between two decoding steps; a burst of long articles is encoded a slice per step, "
              "most urgent first, so articles already decoding keep stepping. At least one "
              "article per step whatever its length. 0: no cap (a burst is encoded at once).")
    max_queue: int = _setting(
        1024, "Most articles waiting for the model; past it calls get RESOURCE_EXHAUSTED.")

    # --- priority classes (docs/priority.md) ---
    default_priority: str = _setting(
        "default", "Class of a request that names none (a bearer token's own default wins): "
                   "interactive (someone waits for it now), default, or bulk (back-fills; runs "
                   "when nothing more urgent needs the model).",
        choices=("interactive", "default", "bulk"))
    max_queue_default: int = _setting(
        0, "Most DEFAULT articles queued at once (past it they get RESOURCE_EXHAUSTED, or wait, "
           "for streams); 0: --max-queue.")
    max_queue_bulk: int = _setting(
        0, "Most BULK articles queued at once; 0: --max-queue. Whatever the limits, more urgent "
           "work finding the queue full pushes out queued (never running) less urgent work, "
           "bulk first; those callers get RESOURCE_EXHAUSTED at once.")
    starvation_bound: int = _setting(
        8, "No starvation: a class with work waiting is served (static batching: in a batch; "
           "continuous: admitted) at least once in every this many batches or admissions, "
           "however much more urgent work arrives (how long a paused article sits out: "
           "--paused-share). 1: classes only order the queue (no pausing either).")
    interactive_headroom: int = _setting(
        4, "Continuous batching: INTERACTIVE articles may join the running set beyond "
           "--max-batch-size by this many, so a full set of bulk work never makes them wait "
           "for a slot.")
    small_bulk_batch: int = _setting(
        4, "Static batching: while interactive work arrived or started in the last 30 s, "
           "batches hold at most this many BULK articles (always, on the first worker when "
           "there are two or more), so an interactive call waits at most one small batch. "
           "0: no cap.")
    bulk_joins_per_step: int = _setting(
        1, "Continuous batching: while interactive work arrived or started in the last 30 s, "
           "at most this many BULK articles join the running set per decoding step (their "
           "encoding is part of that step, which an arriving interactive article waits for). "
           "0: no cap.")
    paused_share: float = _setting(
        0.1, "Continuous batching: while interactive articles decode, less urgent ones sit "
             "steps out, until the steps they sat out took (1 - this) / this times their last "
             "step; then one step decodes everyone. So they keep about this share of the "
             "decoding time beside interactive work, and a short interactive call meets no "
             "step of the whole set. 1: no pausing.")
    check_invariants: bool = _setting(
        False, "Check the batch queue's bookkeeping after every change (queued count, no article "
               "both queued and running) and fail loudly on a mismatch. For tests and debugging: "
               "it costs time in proportion to the queue.")

    # --- limits ---
    max_articles_per_request: int = _setting(256, "Most articles in one request.")
    max_article_chars: int = _setting(100_000, "Most characters in one article's text.")
    max_message_bytes: int = _setting(16 * 1024 * 1024, "Largest gRPC message received or sent.")
    max_num_beams: int = _setting(8, "Largest num_beams a request may ask for.")
    max_new_tokens: int = _setting(512, "Largest summary or headline length a request may ask for.")
    max_concurrent_rpcs: int = _setting(
        0, "Most Summarize/SummarizeStream calls handled at once; past it calls get "
           "RESOURCE_EXHAUSTED. Health checks never count. 0: no limit.")
    request_memory_mb: int = _setting(
        128, "Memory for the article text of calls in progress (as the server holds it, about "
             "1-4 bytes a character), in MiB; a call that would take the total past it gets "
             "RESOURCE_EXHAUSTED at once (a call alone is always let in). The process holds "
             "about twice this at most (the text and the message it came in). 0: no limit.")
    max_streams_per_connection: int = _setting(
        20, "Most calls open at once on one client connection (HTTP/2 "
            "SETTINGS_MAX_CONCURRENT_STREAMS); gRPC clients queue the rest inside their "
            "connection, in order, where priorities cannot reach them (the Python client sends "
            "INTERACTIVE calls over a connection of their own). Bounds what one connection can "
            "make the server buffer: this many half-sent messages of up to --max-message-bytes "
            "(20 x 16 MiB = 320 MiB by default; see docs/input-limits.md). 0: gRPC's default "
            "(no limit).")
    max_open_calls: int = _setting(
        0, "Most calls of any kind open at once (health checks included); past it gRPC "
           "refuses new calls with RESOURCE_EXHAUSTED before reading their message. Bounds what "
           "half-sent messages over many connections can buffer: this many x "
           "--max-message-bytes. 0: no limit.")

    # --- server ---
    host: str = _setting("0.0.0.0", "Address to listen on.")
    port: int = _setting(50051, "Port to listen on; 0 picks a free one.")
    reflection: bool = _setting(True, "Serve gRPC server reflection (for grpcurl).")
    grace_period_s: float = _setting(
        30.0, "On SIGTERM/SIGINT, how long in-flight calls may take to finish.")
    max_connection_age_s: float = _setting(
        0.0, "Close each client connection after this many seconds, gracefully (calls in flight "
             "get the grace period), so clients balancing over DNS (round_robin) re-resolve and "
             "reach new replicas; 0: never.")
    log_level: str = _setting("INFO", "Log level.",
                              choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _setting(
        "text", "Log lines as text, or as one JSON object per line for log shippers (request "
                "lines then carry their figures as fields).", choices=("text", "json"))
    metrics_port: int = _setting(
        0, "Port for Prometheus metrics (http://HOST:PORT/metrics, on --host); 0: off; -1: any "
           "free port (the log says which).")

    # --- security ---
    tls_cert: str = _setting("", "PEM certificate chain of the server; with --tls-key, the server "
                                 "speaks TLS only. Empty: plaintext.")
    tls_key: str = _setting("", "PEM private key of --tls-cert.")
    health_port: int = _setting(
        0, "Also serve grpc.health.v1 alone, in plaintext, on this port: for probes that cannot "
           "speak TLS (Kubernetes gRPC probes, `summarizer health` without certificates) when "
           "--tls-cert is on. 0: off; -1: any free port (the log says which).")
    tls_client_ca: str = _setting(
        "", "PEM CA bundle; when set, clients must present a certificate it signed (mutual TLS).")
    auth_token: str = _setting(
        "", "Bearer token every Summarizer and reflection call must carry (`authorization: "
            "Bearer TOKEN`); health checks are exempt. Prefer the environment variable or "
            "--auth-tokens-file: a command line is visible to other users.", secret=True)
    auth_tokens_file: str = _setting(
        "", "File of accepted bearer tokens, one per line (several allow rotation without "
            "downtime); combined with --auth-token. A token may be followed by default=CLASS "
            "and ceiling=CLASS: its calls' class when they name none, and the most urgent class "
            "it may ask for (above it: PERMISSION_DENIED); see docs/priority.md.")

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_batch_size", "max_queue", "max_articles_per_request", "starvation_bound",
                     "max_article_chars", "max_message_bytes", "max_num_beams", "max_new_tokens",
                     "max_chunks_per_article"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("threads", "max_input_tokens", "summary_max_tokens", "summary_min_tokens",
                     "headline_max_tokens", "headline_min_tokens", "num_beams",
                     "max_batch_tokens", "max_concurrent_rpcs", "port", "max_chunk_depth",
                     "workers", "max_worker_restarts", "kv_cache_mb",
                     "max_encode_tokens_per_step", "max_queue_default", "max_queue_bulk",
                     "interactive_headroom", "small_bulk_batch", "bulk_joins_per_step",
                     "request_memory_mb",
                     "max_streams_per_connection", "max_open_calls"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must not be negative")
        for name in ("metrics_port", "health_port"):  # 0: off, -1: any free port
            if getattr(self, name) < -1:
                problems.append(f"{name} must be a port, 0 (off) or -1 (any free port)")
        if not (0 <= self.max_wait_ms < math.inf and 0 <= self.grace_period_s < math.inf
                and 0 <= self.max_connection_age_s < math.inf
                and 0 <= self.batch_timeout_s < math.inf):
            problems.append("max_wait_ms, grace_period_s, max_connection_age_s and "
                            "batch_timeout_s must be finite and not negative")
        if not 0 < self.paused_share <= 1:
            problems.append("paused_share must be more than 0 and at most 1")
        if self.max_articles_per_request > self.max_queue:
            problems.append(f"max_articles_per_request ({self.max_articles_per_request}) must not "
                            f"exceed max_queue ({self.max_queue}): such a request could never "
                            "be queued")
        for name in ("max_queue_default", "max_queue_bulk"):
            if getattr(self, name) > self.max_queue:
                problems.append(f"{name} ({getattr(self, name)}) must not exceed max_queue "
                                f"({self.max_queue})")
        if 0 < self.max_input_tokens < MIN_WINDOW_TOKENS:
            problems.append(f"max_input_tokens must be 0 or at least {MIN_WINDOW_TOKENS}")
        if bool(self.tls_cert) != bool(self.tls_key):
            problems.append("tls_cert and tls_key must be given together")
        if self.tls_client_ca and not self.tls_cert:
            problems.append("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        for item in fields():
            choices = item.metadata["choices"]
            if choices and getattr(self, item.name) not in choices:
                problems.append(f"{item.name} must be one of {', '.join(choices)}")
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(problems))

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from defaults, then the environment, then `overrides` (e.g. parsed flags)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for item in fields():
            for var in env_names(item):
                if var in environ:
                    values[item.name] = _parse(item, environ[var], var)
                    break
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls(**values)

    def queue_limits(self) -> dict[Priority, int]:
        """Most articles of each class queued at once."""
        return {Priority.INTERACTIVE: self.max_queue,
                Priority.DEFAULT: self.max_queue_default or self.max_queue,
                Priority.BULK: self.max_queue_bulk or self.max_queue}

    @property
    def default_class(self) -> Priority:
        return Priority[self.default_priority.upper()]

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(Settings)


def env_names(item: dataclasses.Field) -> tuple[str, ...]:
    return (ENV_PREFIX + item.name.upper(), *item.metadata["env"])


def flag_name(item: dataclasses.Field) -> str:
    return "--" + item.name.replace("_", "-")


def flag_names(item: dataclasses.Field) -> tuple[str, ...]:
    return (flag_name(item), *item.metadata["aliases"])


def _value_type(item: dataclasses.Field) -> type:
    if isinstance(item.default, bool):
        return bool
    if isinstance(item.default, (int, float)):
        return type(item.default)
    return str


def _parse(item: dataclasses.Field, raw: str, source: str) -> Any:
    kind = _value_type(item)
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in _TRUE:
                return True
            if lowered in _FALSE:
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise ConfigError(f"{source}: cannot read {raw!r} as {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting. Unset flags parse as None so the environment can fill them."""
    for item in fields():
        kind = _value_type(item)
        env = " or ".join(env_names(item))
        # argparse %-formats help text: a literal % (as in "30% of free GPU memory") must be %%.
        help_text = f"{item.metadata['help']} [env {env}; default {item.default!r}]".replace(
            "%", "%%")
        if kind is bool:
            parser.add_argument(*flag_names(item), dest=item.name, default=None,
                                action=argparse.BooleanOptionalAction, help=help_text)
        else:
            parser.add_argument(*flag_names(item), dest=item.name, default=None, type=kind,
                                choices=item.metadata["choices"], help=help_text)


def from_arguments(namespace: argparse.Namespace,
                   environ: Mapping[str, str] | None = None) -> Settings:
    names = {item.name for item in fields()}
    overrides = {k: v for k, v in vars(namespace).items() if k in names}
    return Settings.load(overrides, environ)


def markdown_table() -> str:
    """The configuration table of docs/configuration.md, generated so that it cannot drift."""
    rows = ["| flag | environment | default | meaning |", "|---|---|---|---|"]
    for item in fields():
        default = "(unset)" if item.default is None else f"`{item.default!r}`"
        if not item.repr:
            default = "(unset)"
        env = ", ".join(f"`{name}`" for name in env_names(item))
        meaning = item.metadata["help"]
        if item.metadata["choices"]:
            meaning += " One of: " + ", ".join(item.metadata["choices"]) + "."
        flags = ", ".join(f"`{name}`" for name in flag_names(item))
        rows.append(f"| {flags} | {env} | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(rows)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity, as a container's CPU set gives it): what
    `--threads 0` means."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def trace_exporters(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The span exporters tracing is configured with, as OpenTelemetry entry point names
    (group `opentelemetry_traces_exporter`: `otlp_proto_http`, `console`, ...); empty: tracing
    is off. The one place that decides it, from the standard variables only:

    - off when `OTEL_SDK_DISABLED` is true, or `OTEL_TRACES_EXPORTER` is `none`;
    - on with the exporters `OTEL_TRACES_EXPORTER` names (comma-separated);
    - else on with OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
      is set (the specification's default exporter, made explicit by an endpoint);
    - else off: the SDK's default would export to localhost:4318, and a server should not send
      spans nobody asked for.

    `otlp` is OTLP over the protocol `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` (or
    `OTEL_EXPORTER_OTLP_PROTOCOL`) names: `http/protobuf` (the specification's default, and what
    the `otel` extra installs) or `grpc` (needs opentelemetry-exporter-otlp-proto-grpc)."""
    environ = os.environ if environ is None else environ
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    names = [n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",")
             if n.strip()]
    if not names and (environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                      or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        names = ["otlp"]
    if "none" in names:
        return ()
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip().lower()
    otlp = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}.get(
        protocol, f"otlp ({protocol})")
    return tuple(dict.fromkeys(otlp if name == "otlp" else name for name in names))


def worker_devices(settings: Settings) -> list[str]:
    """The device of each worker process (one per entry of --devices, else --workers times
    --device)."""
    if settings.devices.strip():
        return [d.strip() for d in settings.devices.split(",") if d.strip()]
    return [settings.device] * settings.workers
