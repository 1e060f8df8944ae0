"""Wiring: the gRPC server, health, reflection, model start-up and graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc
from google.protobuf import descriptor, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from ..config import Settings, trace_exporters, worker_devices
from ..serving.core import SummarizerCore
from ..serving.batcher import BatchReport
from ..serving.tracing import NO_TRACER
from ..engines.choice import batching_mode, resolved
from ..engines.factory import build_engine
from ..workers.child import build as build_worker_engine
from ..workers.pool import CrashLoop, WorkerPool
from ..engines.protocol import Engine, SteppingEngine
from ..errors import ConfigError
from .memory import MIB, MemoryReleaser, RequestBudget
from .metrics import Metrics
from .priority import PriorityRules
from .security import interceptors, server_credentials, token_classes
from .servicer import SERVICE_NAME, SummarizerServicer, add_to_server, install_peer_gone_filter

if TYPE_CHECKING:
    from .tracing import Tracing

log = logging.getLogger(__name__)

EngineFactory = Callable[[Settings], Engine]
T = TypeVar("T")

REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
"""Server reflection as current clients (grpcurl, Postman) ask for it first; grpcio-reflection
ships only v1alpha, whose messages are the same on the wire."""


class MethodSymbolPool:
    """The default protobuf descriptor pool, which also finds the file of a method symbol.

    grpcurl and Postman describe a method by asking for the file containing
    `summarizer.v1.Summarizer.Summarize`; protobuf's Python pool resolves messages, services
    and fields but not methods (grpc/grpc#34743), so reflection answered `Symbol not found`.
    A name that is not found is tried as SERVICE.METHOD: the service's file is the answer, as
    the C++ and Go servers give it. Everything else goes to the pool as it is."""

    def __init__(self, pool: descriptor_pool.DescriptorPool | None = None) -> None:
        self._pool = pool or descriptor_pool.Default()

    def FindFileContainingSymbol(self, symbol: str) -> descriptor.FileDescriptor:  # noqa: N802
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method = symbol.rpartition(".")
            if not service_name:
                raise
            service = self._pool.FindServiceByName(service_name)  # KeyError: not found
            if method not in service.methods_by_name:
                raise
            return service.file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pool, name)


def enable_reflection(server: grpc.aio.Server, service_names: tuple[str, ...]) -> None:
    """Serve reflection as grpc.reflection.v1 and v1alpha, both by the same servicer.

    The services listed are the ones whose descriptors the servicer can describe: v1alpha's is
    in the protobuf pool, v1's is not (no module ships it), so v1 is served but not listed.
    Method symbols resolve too (MethodSymbolPool)."""
    servicer = reflection.aio.ReflectionServicer((*service_names, reflection.SERVICE_NAME),
                                                 pool=MethodSymbolPool())
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        REFLECTION_V1_SERVICE, {"ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)}),))


def _check_free(host: str, port: int, flags: str) -> None:
    """Raise a clear error when `host:port` cannot be listened on, before gRPC tries (its
    C core logs its own failure to stderr, a line of noise above ours). gRPC sets SO_REUSEADDR
    too, so what binds here binds there; a port taken between the two is still caught."""
    if not port:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}; check {flags}"
                          ) from None
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise ConfigError(
                        f"cannot listen on {host}:{port}: the port is taken (is another server "
                        f"running?); choose another with {flags}, or stop what holds it"
                        ) from None
                if error.errno == errno.EADDRNOTAVAIL:
                    raise ConfigError(f"cannot listen on {host}:{port}: {host} is not an "
                                      f"address of this machine; check {flags}") from None


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None,
          flags: str) -> int:
    """Listen on `address`; a port that cannot be had is one clear error naming the flags."""
    host, _, wanted = address.rpartition(":")
    _check_free(host, int(wanted), flags)
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio: "Failed to bind to address ..."
        port = 0
    if not port:
        raise ConfigError(f"cannot listen on {address}: the port is taken (is another server "
                          f"running?) or the address is not this machine's; choose another "
                          f"with {flags}, or stop what holds it")
    return port


def default_engine_factory(settings: Settings) -> Engine:
    """The engine `settings` ask for (or `auto` chooses), loaded in this process."""
    return build_engine(settings)


def tracing_from_environment() -> Tracing | None:
    """Tracing as the standard `OTEL_*` variables configure it (see config.trace_exporters);
    None when they don't, or when the `otel` extra is not installed (said once in the log)."""
    exporters = trace_exporters()
    if not exporters:
        return None
    try:
        from .tracing import Tracing
    except ImportError as error:
        log.warning("tracing is configured (OTEL_* variables) but OpenTelemetry is not "
                    "installed (%s): serving without tracing; pip install 'summarizer[otel]'",
                    error.name)
        return None
    return Tracing.from_exporters(exporters)


def _settle(future: asyncio.Future, result: object, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


async def _in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """Run blocking `fn` in a daemon thread, so a shutdown during model loading need not wait."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(_settle, future, None, error)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=target, name=name, daemon=True).start()
    return await future


class SummarizerServer:
    """The whole service: start() listens at once (health NOT_SERVING), loads and warms the model,
    then reports SERVING; stop() drains in-flight calls within the grace period."""

    def __init__(self, settings: Settings,
                 engine_factory: EngineFactory = default_engine_factory,
                 tracing: Tracing | None = None) -> None:
        """`tracing`: None takes it from the environment (off unless `OTEL_*` configure it)."""
        self.settings = settings
        self._engine_factory = engine_factory
        self.workers: WorkerPool | None = None
        self.batching = ""
        """"static" or "continuous", once loaded (`--batching` decided for the engine)."""
        self._stopping = False
        # Health updates the workers trigger: held until done (the loop keeps only weak references).
        self._health_updates: set[asyncio.Future[None]] = set()
        self.tracing = tracing if tracing is not None else tracing_from_environment()
        self.metrics = Metrics()
        self.metrics_port: int | None = None
        self.health_port: int | None = None
        self._health_server: grpc.aio.Server | None = None
        self.releaser = MemoryReleaser()
        install_peer_gone_filter()
        self.servicer = SummarizerServicer(
            settings.max_concurrent_rpcs, self.metrics,
            PriorityRules(settings.default_class, token_classes(settings)),
            budget=RequestBudget(settings.request_memory_mb * MIB),
            on_call_end=self.releaser.call_ended)
        self.health = health.aio.HealthServicer()
        self.core: SummarizerCore | None = None
        self.port: int | None = None
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        if settings.max_streams_per_connection:
            options.append(("grpc.max_concurrent_streams", settings.max_streams_per_connection))
        if settings.max_connection_age_s:
            options += [
                ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
            ]
        self._credentials = server_credentials(settings)
        auth = interceptors(settings)
        self._authenticating = bool(auth)
        # Tracing first: a call refused for its token still has its server span.
        traced = [self.tracing.interceptor()] if self.tracing is not None else []
        self.server = grpc.aio.server(options=options, interceptors=[*traced, *auth],
                                      maximum_concurrent_rpcs=settings.max_open_calls or None)
        add_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if settings.reflection:
            enable_reflection(self.server, (SERVICE_NAME, health.SERVICE_NAME))

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def listen(self) -> int:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = _bind(self.server, address, self._credentials,
                          "--port/--host (SUMMARIZER_PORT/SUMMARIZER_HOST)")
        await self.server.start()
        if self.settings.metrics_port:  # -1: any free port
            try:
                self.metrics_port = self.metrics.serve(self.settings.host,
                                                       max(self.settings.metrics_port, 0))
            except OSError as error:
                raise ConfigError(
                    f"cannot serve metrics on {self.settings.host}:{self.settings.metrics_port} "
                    f"({error.strerror or error}); choose another --metrics-port "
                    "(SUMMARIZER_METRICS_PORT), or 0 for none") from None
        if self.settings.health_port:
            self.health_port = await self._serve_health_alone(max(self.settings.health_port, 0))
        log.info("listening on %s:%d%s (NOT_SERVING until the model is ready)",
                 self.settings.host, self.port, self._security_summary())
        return self.port

    async def _serve_health_alone(self, port: int) -> int:
        """The same health service (same statuses), alone and in plaintext, for probes."""
        self._health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
        address = f"{self.settings.host}:{port}"
        bound = _bind(self._health_server, address, None,
                      "--health-port (SUMMARIZER_HEALTH_PORT)")
        await self._health_server.start()
        log.info("health checks alone, in plaintext, on %s:%d", self.settings.host, bound)
        return bound

    def _security_summary(self) -> str:
        parts = []
        if self._credentials is not None:
            parts.append("mutual TLS" if self.settings.tls_client_ca else "TLS")
        if self._authenticating:
            parts.append("bearer tokens")
        return f" with {' and '.join(parts)}" if parts else ""

    @property
    def uses_workers(self) -> bool:
        """The model runs in worker processes: the default engines, with --workers 1 or more
        (a custom engine factory, as tests pass, runs in this process)."""
        return (self._engine_factory is default_engine_factory
                and bool(worker_devices(self.settings)))

    async def load(self) -> None:
        started = time.perf_counter()
        run_batches = advancers = None
        if self.uses_workers:
            # This process tokenises (the engine without its weights); the workers generate.
            # A --worker-engine (test hook) tokenises here too: its ids must be its own.
            # `--engine auto` is decided once, here: the workers get the engine it chose.
            settings = (self.settings if self.settings.worker_engine else
                        await _in_daemon_thread(lambda: resolved(self.settings),
                                                "summarizer-choose"))
            engine: Engine = await _in_daemon_thread(
                lambda: (build_worker_engine(settings) if settings.worker_engine
                         else build_engine(settings, weights=False)), "summarizer-load")
            # Decided once, here, like the engine: the workers open sessions when it says so.
            settings = settings.replace(batching=batching_mode(settings, engine))
            self.batching = settings.batching
            self.workers = WorkerPool(settings, on_change=self._workers_changed)
            self.metrics.attach_workers(self.workers)
            await self.workers.start()
            if self.batching == "continuous":
                advancers = self.workers.advancers()
            else:
                run_batches = self.workers.run_batches()
            loaded = warmed = time.perf_counter()
        else:
            engine = await _in_daemon_thread(
                lambda: self._engine_factory(self.settings), "summarizer-load")
            self.batching = batching_mode(self.settings, engine)
            loaded = time.perf_counter()
            if self.settings.warmup:
                await _in_daemon_thread(engine.warmup, "summarizer-warmup")
            if self.batching == "continuous":
                # batching_mode chose continuous: the engine can step
                stepping = cast(SteppingEngine, engine)
                session = await _in_daemon_thread(stepping.open_session, "summarizer-session")
                advancers = [session.advance]
            warmed = time.perf_counter()
        on_batch = self.metrics.observe_batch
        tracing = self.tracing
        if tracing is not None:
            tracing.engine_loaded(engine)

            def on_batch(report: BatchReport) -> None:
                self.metrics.observe_batch(report)
                tracing.observe_batch(report)

        core = SummarizerCore(engine, self.settings, on_batch=on_batch,
                              tracer=tracing if tracing is not None else NO_TRACER,
                              run_batches=run_batches, advancers=advancers,
                              on_step=self.metrics.observe_step)
        await core.start()
        self.metrics.attach(lambda: core.batcher.queue_depth, core.batcher.stats,
                            core.batcher.queue_depth_of)
        if advancers:
            self.metrics.attach_steps(core.batcher.last_steps)
        self.metrics.model_loaded(engine.name, engine.models, loaded - started, warmed - loaded)
        self.core = core
        self.servicer.core = core
        self.releaser.start()  # the floor: the model loaded
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        described = ", ".join(f"{m.model_id} ({m.role}, {m.family}, {m.dtype} on {m.device})"
                              for m in engine.models)
        log.info("SERVING: %s; engine %s; %s; %s batching; loaded in %.1fs, warmed up in %.1fs",
                 described, engine.name, f"{len(self.workers.slots)} worker process(es)"
                 if self.workers else "in the server process", self.batching, loaded - started,
                 warmed - loaded)

    def _workers_changed(self) -> None:
        """Health follows the workers: SERVING while at least one is ready."""
        workers = self.workers
        if workers is None or self.core is None or self._stopping:
            return
        serving = workers.ready > 0 and workers.failed is None
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        update = asyncio.ensure_future(self._set_health(status))
        self._health_updates.add(update)
        update.add_done_callback(self._health_updates.discard)

    async def start(self) -> int:
        port = await self.listen()
        await self.load()
        return port

    async def stop(self, grace_s: float | None = None) -> None:
        """Health NOT_SERVING and new calls refused at once; in-flight calls get `grace_s` to
        finish, then are cancelled; returns within about `grace_s`, even if the model is still
        busy with a batch nobody waits for any more (see `worker_busy`)."""
        grace_s = self.settings.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace_s
        self._stopping = True
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
        await self.releaser.stop()
        if self.core is not None:
            await self.core.stop(timeout_s=max(0.0, deadline - time.monotonic()))
        if self.workers is not None:
            # Their batches are done (or abandoned): they exit, or are killed after the grace.
            await self.workers.stop(max(1.0, deadline - time.monotonic()))
        self.metrics.stop()
        if self.tracing is not None:
            self.tracing.shutdown()
        if self._health_server is not None:
            await self._health_server.stop(None)
        log.info("stopped")

    @property
    def worker_busy(self) -> bool:
        """The model thread is still generating (a batch abandoned at shutdown)."""
        return (self.workers is None and self.core is not None
                and self.core.batcher.worker_busy)


async def run(settings: Settings, engine_factory: EngineFactory = default_engine_factory) -> bool:
    """Serve until SIGTERM or SIGINT, then drain and return. True when the model thread is still
    busy with an abandoned batch: the caller should then exit without joining it."""
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    def on_signal() -> None:
        if stop_requested.is_set():  # a second signal: stop waiting for the drain
            log.warning("second shutdown signal; exiting without finishing in-flight work")
            os._exit(1)
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    server = SummarizerServer(settings, engine_factory)
    try:
        await server.listen()
    except BaseException:
        if server.port is not None:  # e.g. the metrics port was taken after the main one bound
            await server.stop(0)
        raise
    loading = asyncio.ensure_future(server.load())
    stopping = asyncio.ensure_future(stop_requested.wait())
    try:
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # raises a load error
            crash_loop = (asyncio.ensure_future(server.workers.crash_loop.wait())
                          if server.workers is not None else asyncio.Future())
            await asyncio.wait({stopping, crash_loop}, return_when=asyncio.FIRST_COMPLETED)
            if crash_loop.done() and server.workers is not None:
                await server.health.enter_graceful_shutdown()
                raise CrashLoop(f"the model workers keep crashing ({server.workers.failed}); "
                                "see the log above")
            crash_loop.cancel()
            log.info("shutdown requested; draining in-flight calls (grace %.0fs)",
                     settings.grace_period_s)
        else:
            log.info("shutdown requested while loading the model; exiting")
            loading.cancel()
    finally:
        stopping.cancel()
        await server.stop()
    return server.worker_busy
