"""A worker that dies takes its decoding session with it: the runner admits again, on the new
worker, what the step says is in flight (`StepIn.in_flight`, the executor's), nothing it kept on
its own; an article the caller removed meanwhile is not brought back."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from service.engines.protocol import StepIn
from service.workers.pool import WorkerPool

from .worker_engines import stepping_pool_setup


async def test_a_lost_session_is_rebuilt_from_what_the_step_says_is_in_flight(
        tmp_path: Path) -> None:
    settings, admits = stepping_pool_setup(tmp_path, (1, 2, 3), summary_max_tokens=6,
                                           num_beams=1)
    pool = WorkerPool(settings)
    await pool.start()
    try:
        [advance] = pool.advancers()
        everything = tuple(admits.values())
        out = await asyncio.to_thread(advance, StepIn(admit=everything, in_flight=everything))
        assert out.active + out.waiting == 3 and not out.done
        slot = pool.slots[0]
        first = slot.process
        assert first is not None and first.pid is not None
        os.kill(first.pid, signal.SIGKILL)
        await asyncio.to_thread(first.join, 10)
        # Ticket 2's caller went while the worker was dead: the executor removes it and no
        # longer holds it.
        flight = (admits[1], admits[3])
        out = await asyncio.to_thread(advance, StepIn(remove=(2,), in_flight=flight))
        assert slot.process is not first
        assert out.active + out.waiting == 2 and not out.failed
        done = {t for t, _ in out.done}
        for _ in range(20):
            if done == {1, 3}:
                break
            flight = tuple(a for a in flight if a.ticket not in done)
            out = await asyncio.to_thread(advance, StepIn(in_flight=flight))
            assert not out.failed
            done |= {t for t, _ in out.done}
        assert done == {1, 3}
    finally:
        await pool.stop(5)
