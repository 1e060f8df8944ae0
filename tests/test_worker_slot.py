"""A worker slot's `ready`/`busy` bookkeeping (service/workers/pool.py), without processes: a
worker that dies is replaced exactly once, by the request it died under, by the request that
had its reply already, or by the idle watch, whichever thread gets there."""

from __future__ import annotations

import threading

from service.config import Settings
from service.workers.pool import Slot


class FakeProcess:
    """What the slot asks of its process: whether it is alive."""

    pid = 4242

    def __init__(self) -> None:
        self.alive = True

    def is_alive(self) -> bool:
        return self.alive


def ready_slot() -> tuple[Slot, FakeProcess]:
    slot = Slot(0, Settings(), context=None)  # type: ignore[arg-type]  # spawns nothing here
    process = FakeProcess()
    slot.process = process  # type: ignore[assignment]
    slot.ready = True
    return slot, process


def test_a_death_after_the_reply_is_the_requests_to_report_once() -> None:
    slot, process = ready_slot()
    assert slot.claim() and slot.busy
    process.alive = False  # dies after replying, before the request is over
    assert not slot.lost_idle(process), "the idle watch must leave a busy worker's death"
    assert slot.release(), "nobody would replace the dead worker"
    assert not slot.ready and not slot.busy
    assert not slot.lost_idle(process), "replaced twice"


def test_a_death_between_requests_is_the_idle_watchs() -> None:
    slot, process = ready_slot()
    assert slot.claim()
    assert not slot.release()  # alive: nothing to replace
    process.alive = False
    assert slot.lost_idle(process)
    assert not slot.claim(), "a request must wait for the replacement"
    assert not slot.lost_idle(process)


def test_a_death_during_the_request_is_the_requests() -> None:
    slot, process = ready_slot()
    assert slot.claim()
    process.alive = False
    slot.lost()  # the request saw EOF on the pipe
    assert not slot.lost_idle(process)
    assert not slot.release()


def test_a_replaced_worker_is_not_the_old_watchs() -> None:
    slot, old = ready_slot()
    old.alive = False
    slot.process = FakeProcess()  # type: ignore[assignment]  # replaced meanwhile
    assert not slot.lost_idle(old)
    assert slot.ready


def race_for_one_death() -> list[bool]:
    """A busy worker dies; its request ends while the idle watch looks at the death."""
    slot, process = ready_slot()
    assert slot.claim()
    process.alive = False
    start = threading.Barrier(2)
    wins: list[bool] = []

    def request() -> None:
        start.wait()
        wins.append(slot.release())

    def watch() -> None:
        start.wait()
        wins.append(slot.lost_idle(process))

    threads = [threading.Thread(target=request), threading.Thread(target=watch)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return wins


def test_the_request_and_the_idle_watch_never_both_replace() -> None:
    """Race the two for the same death, many times: exactly one of them wins each time."""
    for _ in range(300):
        assert sorted(race_for_one_death()) == [False, True]


class _ReapedElsewhere:
    """A worker killed by SIGKILL that another thread is reaping: `exitcode` reads None until
    that thread has stored the code (what multiprocessing's `poll` answers the loser of two
    `waitpid`s), then -9."""

    def __init__(self, none_reads: int) -> None:
        self.none_reads = none_reads

    def join(self, timeout: float | None = None) -> None:
        return None

    @property
    def exitcode(self) -> int | None:
        if self.none_reads:
            self.none_reads -= 1
            return None
        return -9


def test_a_kill_reaped_by_another_thread_is_still_a_signal() -> None:
    """`_cause` waited for nothing: when the idle watch and a request reaped the same killed
    worker at once, one of them logged and counted the SIGKILL as an exit (seen in CI: 3
    restarts by signal for 4 kills)."""
    from service.workers.pool import _cause

    assert _cause(_ReapedElsewhere(none_reads=3)) == "signal"  # type: ignore[arg-type]
    assert _cause(_ReapedElsewhere(none_reads=0)) == "signal"  # type: ignore[arg-type]
