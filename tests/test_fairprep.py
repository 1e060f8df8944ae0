"""The preparation thread takes callers in turn and drops the work of callers who went away."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service.serving.fairprep import CALLER, FairPrep, caller_scope


class Gate:
    """Pieces of work that record their order; the first one blocks until released."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.release = threading.Event()
        self.first_started = threading.Event()

    def piece(self, name: str) -> str:
        if not self.ran:
            self.first_started.set()
            assert self.release.wait(10)
        self.ran.append(name)
        return name


async def _until_waiting(prep: FairPrep, pieces: int) -> None:
    """Yield to the loop until `pieces` pieces are queued (the callers' tasks have run)."""
    for _ in range(1000):
        if prep.waiting == pieces:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{prep.waiting} pieces queued, not {pieces}")


async def _as_caller(prep: FairPrep, gate: Gate, name: str, pieces: int) -> list[str]:
    caller_scope()
    return [await prep.run(gate.piece, f"{name}{i}") for i in range(pieces)]


async def _queue_all(prep: FairPrep, gate: Gate, name: str, pieces: int) -> list[str]:
    caller_scope()
    return list(await asyncio.gather(*(prep.run(gate.piece, f"{name}{i}")
                                       for i in range(pieces))))


@pytest.mark.asyncio
async def test_a_small_caller_waits_for_one_piece_of_a_big_one_not_all() -> None:
    prep = FairPrep()
    gate = Gate()
    try:
        big = asyncio.ensure_future(_queue_all(prep, gate, "big", 50))
        await asyncio.to_thread(gate.first_started.wait, 10)
        await _until_waiting(prep, 49)
        small = asyncio.ensure_future(_queue_all(prep, gate, "small", 1))
        await _until_waiting(prep, 50)
        gate.release.set()
        assert await small == ["small0"]
        await big
    finally:
        prep.shutdown()
    # The big caller's first piece was running; the small one's came right after it.
    assert gate.ran.index("small0") == 1, gate.ran


@pytest.mark.asyncio
async def test_callers_alternate_piece_by_piece() -> None:
    prep = FairPrep()
    gate = Gate()
    try:
        a = asyncio.ensure_future(_queue_all(prep, gate, "a", 4))
        await asyncio.to_thread(gate.first_started.wait, 10)
        await _until_waiting(prep, 3)
        b = asyncio.ensure_future(_queue_all(prep, gate, "b", 3))
        await _until_waiting(prep, 6)
        gate.release.set()
        await asyncio.gather(a, b)
    finally:
        prep.shutdown()
    assert gate.ran == ["a0", "b0", "a1", "b1", "a2", "b2", "a3"]


@pytest.mark.asyncio
async def test_a_gone_callers_queued_work_never_runs() -> None:
    prep = FairPrep()
    gate = Gate()
    try:
        gone = asyncio.ensure_future(_queue_all(prep, gate, "gone", 20))
        await asyncio.to_thread(gate.first_started.wait, 10)
        await _until_waiting(prep, 19)
        gone.cancel()
        await asyncio.sleep(0)
        gate.release.set()
        after = await _as_caller(prep, gate, "next", 2)
    finally:
        prep.shutdown()
    assert after == ["next0", "next1"]
    # Only the piece already running when its caller went ran.
    assert [name for name in gate.ran if name.startswith("gone")] == ["gone0"]


@pytest.mark.asyncio
async def test_tasks_started_by_a_call_share_its_turn() -> None:
    async def child() -> object:
        return CALLER.get(None)

    caller = caller_scope()
    assert await asyncio.ensure_future(child()) is caller
    assert caller_scope() is caller
