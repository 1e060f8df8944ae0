"""The worker process: load the engine, then run batches from the pipe until told to stop.

With `--batching continuous` (decided by the server, which passes it in the settings) the worker
opens one decoding session on its engine at start and answers each `DecodeStep` with the
session's `Advanced` (one step); the session's state lives here, so when the worker dies its
articles are admitted again on the next one by the server's slot (`pool.SessionReplay`).

Started with the `spawn` method (a fresh interpreter: no torch, OpenMP or gRPC state inherited
from the server). It dies with its parent: PR_SET_PDEATHSIG asks the kernel for SIGKILL when the
server goes, even by SIGKILL, and a parent that went before that call is caught by checking
`getppid()` right after it.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import signal
import sys
import time
from multiprocessing.connection import Connection
from typing import cast

from ..config import Settings
from ..engines.protocol import DecodingSession, Engine, SteppingEngine
from ..errors import OutOfMemory, first_line, is_out_of_memory
from ..serving.generation import generate_batch
from .messages import (Advanced, DecodeStep, Failed, Generate, LoadFailed, Ready, Results,
                       Stop)

PR_SET_PDEATHSIG = 1
log = logging.getLogger(__name__)


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent went before the call above
        os._exit(1)


def build(settings: Settings) -> Engine:
    if settings.worker_engine:
        module, _, name = settings.worker_engine.partition(":")
        return getattr(importlib.import_module(module), name)(settings)
    from ..engines.factory import build_engine

    return build_engine(settings)


def main(conn: Connection, settings: Settings, parent_pid: int) -> None:
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    logging.basicConfig(level=settings.log_level,
                        format=f"%(asctime)s %(levelname)s worker {os.getpid()}: %(message)s")
    started = time.perf_counter()
    try:
        engine = build(settings)
        loaded = time.perf_counter()
        if settings.warmup:
            engine.warmup()
        # The server asks for continuous batching only of an engine that can step.
        session = (cast(SteppingEngine, engine).open_session()
                   if settings.batching == "continuous" else None)
    except Exception as error:  # noqa: BLE001 - reported to the server, which exits clearly
        conn.send(LoadFailed(first_line(error)))
        conn.close()
        os._exit(1)
    warmed = time.perf_counter()
    conn.send(Ready(os.getpid(), loaded - started, warmed - loaded))
    run = generate_batch(engine)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the server went
            os._exit(0)
        if isinstance(message, Stop):
            conn.close()
            os._exit(0)
        if isinstance(message, DecodeStep):
            conn.send(advance(session, message))
            continue
        assert isinstance(message, Generate), message
        reply: Results | Failed
        try:
            reply = Results(message.batch, list(run(message.params, message.articles)))
        except OutOfMemory as error:
            reply = Failed(message.batch, True, type(error).__name__, error.message)
        except Exception as error:  # noqa: BLE001 - the server isolates the failing input
            log.error("batch failed (%s)", type(error).__name__, exc_info=error)
            reply = Failed(message.batch, False, type(error).__name__, "")
        conn.send(reply)


def advance(session: DecodingSession | None, message: DecodeStep) -> Advanced | Failed:
    """One step of the session; a session that raises (a bug: it reports each article's own
    failure in its StepOut) is answered with its type only."""
    try:
        assert session is not None, "a decoding step for a worker that batches statically"
        return Advanced(session.advance(message.step))
    except Exception as error:  # noqa: BLE001 - the server fails the articles it held
        log.error("decoding step failed (%s)", type(error).__name__, exc_info=error)
        oom = is_out_of_memory(error)
        return Failed(-1, oom, type(error).__name__,
                      "the model ran out of memory while decoding; retry later" if oom else "")
