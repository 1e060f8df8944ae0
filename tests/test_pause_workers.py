"""`StepIn.pause` reaches the decoding session inside a real worker process (the pool builds
its own StepIn for the worker: it must carry the pause along)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.engines.protocol import StepIn
from service.workers.pool import WorkerPool

from .worker_engines import stepping_pool_setup


async def test_a_pause_crosses_the_worker_pipe(tmp_path: Path) -> None:
    settings, by_ticket = stepping_pool_setup(tmp_path, (1, 2), summary_max_tokens=4,
                                              num_beams=2)
    admits = tuple(by_ticket.values())
    pool = WorkerPool(settings)
    await pool.start()
    try:
        [advance] = pool.advancers()
        out = await asyncio.to_thread(advance, StepIn(admit=admits))
        assert (out.rows, out.paused_rows) == (4, 0)
        out = await asyncio.to_thread(advance, StepIn(pause=(1,)))
        assert (out.rows, out.paused_rows, out.active) == (2, 2, 2)
    finally:
        await pool.stop(5)
