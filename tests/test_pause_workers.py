"""`StepIn.pause` reaches the decoding session inside a real worker process (the pool builds
its own StepIn for the worker: it must carry the pause along)."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from service.config import Settings
from service.domain import Outputs
from service.engines.protocol import Admit, StepIn
from service.workers.pool import WorkerPool

from .worker_engines import stepping


async def test_a_pause_crosses_the_worker_pipe(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    settings = Settings(model=str(tmp_path), worker_engine="tests.worker_engines:stepping",
                        workers=1, batching="continuous", threads=1)
    engine = stepping(settings)  # the same engine the worker builds: to prepare articles
    params = dataclasses.replace(engine.defaults, summary_max_tokens=4, num_beams=2,
                                 outputs=Outputs.SUMMARY)
    admits = tuple(Admit(t, params, engine.prepare([f"article {t}"], params)[0])
                   for t in (1, 2))
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
