"""The scheduling policy: what runs next. It owns the ORDER of queued work, never its admission.

`queue.BatchQueue` admits work (a bounded queue, waiters, deadlines, job states) and asks this
object every time it must choose; the executors (`executor.Executor`, static batches, and
`continuous.ContinuousExecutor`, step by step) ask it, through the queue or directly, what to
admit, what to pause and how much room to keep. A new scheduling rule goes here, and only here.

The rules, in order:
1. Class first (`domain.Priority`): a more urgent class is served before a less urgent one.
2. Fairness within a class: each caller (a queue group) is one round-robin turn, so a caller
   with one article is served next even behind a caller with hundreds.
3. Shortest first within a caller; when not all callers fit a batch, the others are chosen by how
   close their next job's length is to the first one's (less padding); `max_batch_tokens` caps a
   static batch's padded size.
4. No starvation: a class that had work waiting and got none is passed over; once passed over
   `starvation_bound - 1` times in a row it goes first in the next cut (a batch, or an admission
   between decoding steps). So a class with work waiting is served at least once in every
   `starvation_bound` cuts (`starvation_bound + 1` when two starving classes are due at once).
5. Static batches (keys must match): a batch is cut from its first class and fills its room from
   less urgent ones, except that bulk work never rides in a batch with interactive work (it would
   set the batch's pace). While interactive work arrived or started in the last
   `RECENT_INTERACTIVE_S` seconds, or on an urgent lane (the first worker of two or more), a
   batch holds at most `small_bulk_batch` bulk jobs: an interactive call arriving then waits for
   a small batch at most.
6. Continuous batching: interactive articles may join the running set `interactive_headroom`
   beyond its size (and while the session has articles waiting for cache room, when nothing
   else may); while interactive work arrived or started in the last `RECENT_INTERACTIVE_S`
   seconds, at most `bulk_joins_per_step` bulk articles join per step (their encoding is part
   of the step: a burst of long bulk encodings is sliced by articles), and none in a step that
   interactive articles join. While interactive articles decode, less urgent ones sit steps out
   (`pauses`), their caches kept, and are not admitted (`sits_out`); they get their turn by
   time, not by a count of steps: once the steps they sat out took
   `(1 - paused_share) / paused_share` times their last step (a step costs what its rows cost,
   and a step of the whole set costs many interactive ones), one step decodes everyone and
   admits them too. So they get about `paused_share` of the decoding time beside
   interactive work, and an interactive call shorter than that turn meets no bulk step.
7. Overload: more urgent work finding the queue full displaces queued (never running) work of
   less urgent classes, the least urgent class first and, within it, the work queued last
   (`victims`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from ..domain import Priority
from .jobs import Entry

CLASSES: tuple[Priority, ...] = tuple(sorted(Priority))
"""Every class, most urgent first."""
RECENT_INTERACTIVE_S = 30.0
"""How long after interactive work last arrived or started bulk batches stay small: longer than
an interactive caller's usual pause between calls (a caller that waits for one reply before
sending the next must still find bulk batches small)."""


@dataclass(eq=False)
class Group:
    """The queued jobs of one caller in one class, shortest first."""

    owner: Hashable | None
    priority: Priority
    entries: collections.deque[Entry] = field(default_factory=collections.deque)


@dataclass(frozen=True)
class Room:
    """How many articles a continuous executor may admit now."""

    any: int
    """Of any class."""
    interactive: int
    """Of INTERACTIVE work, in all (at least `any`)."""


class SchedulingPolicy:
    """Holds the queued entries in the order the rules give (one round-robin line of caller
    groups per class) and makes every choice of what runs next. It changes no job's state: the
    queue takes what the policy hands out (`cut`) or gives up (`victims`)."""

    def __init__(self, *, max_batch_size: int, max_batch_tokens: int = 0,
                 share_keys: bool = False, starvation_bound: int = 8,
                 small_bulk_batch: int = 0, interactive_headroom: int = 0,
                 bulk_joins_per_step: int = 0, paused_share: float = 0.1) -> None:
        if starvation_bound < 1:
            raise ValueError("starvation_bound must be at least 1")
        if small_bulk_batch < 0 or interactive_headroom < 0 or bulk_joins_per_step < 0:
            raise ValueError("small_bulk_batch, bulk_joins_per_step and interactive_headroom "
                             "must not be negative")
        if not 0 < paused_share <= 1:
            raise ValueError("paused_share must be in (0, 1]")
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.share_keys = share_keys
        self.starvation_bound = starvation_bound
        self.small_bulk_batch = small_bulk_batch
        self.interactive_headroom = interactive_headroom
        self.bulk_joins_per_step = bulk_joins_per_step
        self.paused_share = paused_share
        self._lines: dict[Priority, collections.deque[Group]] = {
            p: collections.deque() for p in CLASSES}
        self._group_of: dict[Entry, Group] = {}
        self._passed_over: collections.Counter[Priority] = collections.Counter()
        self._last_interactive: float | None = None

    # ----- the queued work -----
    def add(self, entries: Sequence[Entry], owner: Hashable | None, now: float) -> None:
        """Queue entries of one caller: each joins its caller's group of its class (made at the
        back of the class's line if the caller has none there)."""
        for priority in CLASSES:
            mine = [e for e in entries if e.job.priority is priority]
            if not mine:
                continue
            if priority is Priority.INTERACTIVE:
                self._last_interactive = now
            line = self._lines[priority]
            group = next((g for g in line if owner is not None and g.owner == owner), None)
            if group is None:
                group = Group(owner, priority)
                line.append(group)
            for entry in mine:
                self._group_of[entry] = group
            group.entries = collections.deque(
                sorted([*group.entries, *mine], key=lambda e: e.job.cost))

    def discard(self, entry: Entry) -> None:
        """Forget a queued entry (taken, dropped or displaced); empty groups leave their line."""
        group = self._group_of.pop(entry, None)
        if group is None:
            return
        group.entries.remove(entry)
        if not group.entries:
            self._lines[group.priority].remove(group)

    def queued(self) -> Iterator[Entry]:
        """Every queued entry, in line order (most urgent class first)."""
        for priority in CLASSES:
            for group in self._lines[priority]:
                yield from group.entries

    def waiting_classes(self) -> list[Priority]:
        return [p for p in CLASSES if self._lines[p]]

    def problems(self, queued: Collection[Entry]) -> list[str]:
        """Bookkeeping mismatches against what the queue counts as queued (check_invariants)."""
        problems = []
        mine = list(self.queued())
        if len(mine) != len(queued) or set(map(id, mine)) != set(map(id, queued)):
            problems.append("the policy's lines and the queue disagree on what is queued")
        if any(not g.entries for line in self._lines.values() for g in line):
            problems.append("an empty group is left in a line")
        if any(e.job.priority is not g.priority
               for line in self._lines.values() for g in line for e in g.entries):
            problems.append("a job is queued in another class's line")
        if len(self._group_of) != len(mine) or any(
                e not in self._group_of or e not in self._group_of[e].entries for e in mine):
            problems.append("a queued job does not know its group")
        return problems

    # ----- whose turn -----
    def _order(self) -> list[Priority]:
        """Classes in the order the next cut serves them: most urgent first, except that a class
        passed over `starvation_bound - 1` times in a row goes first."""
        due = [p for p in CLASSES
               if self._lines[p] and self._passed_over[p] >= self.starvation_bound - 1]
        return due + [p for p in CLASSES if p not in due]

    def batch_key(self, entry: Entry) -> Hashable:
        """What must be equal for two jobs to share a batch: their key, or nothing when
        `share_keys` (continuous batching)."""
        return None if self.share_keys else entry.job.key

    def turn(self) -> Entry | None:
        """The job whose turn it is: the next cut starts with it (its key decides the batch's)."""
        for priority in self._order():
            line = self._lines[priority]
            if line:
                return line[0].entries[0]
        return None

    def full_key(self, turn: Entry) -> Hashable | None:
        """A key with a full batch queued in the turn's class (the turn's own key first), or
        None: such a batch need not wait for `max_wait_ms`."""
        counts: dict[Hashable, int] = collections.Counter(
            self.batch_key(e) for g in self._lines[turn.job.priority] for e in g.entries)
        preferred = self.batch_key(turn)
        if counts.get(preferred, 0) >= self.max_batch_size:
            return preferred
        return next((k for k, n in counts.items() if n >= self.max_batch_size), None)

    def small_bulk(self, now: float, urgent_lane: bool) -> bool:
        """Whether a cut takes at most `bulk_cap` bulk jobs now (rules 5 and 6)."""
        if not self.bulk_cap:
            return False
        recent = (self._last_interactive is not None
                  and now - self._last_interactive < RECENT_INTERACTIVE_S)
        return urgent_lane or recent

    @property
    def bulk_cap(self) -> int:
        """Near interactive work: the most bulk jobs in a static batch (`small_bulk_batch`), or
        joining the running set per decoding step (`bulk_joins_per_step`); 0: no cap."""
        return self.bulk_joins_per_step if self.share_keys else self.small_bulk_batch

    # ----- cutting -----
    def cut(self, key: Hashable, limit: int | None = None, *,
            classes: Collection[Priority] = CLASSES, small_bulk: bool = False,
            take: Callable[[Entry], None], now: float | None = None) -> list[Entry]:
        """Choose up to a batch (or `limit`) of `key` jobs by the rules above, handing each to
        `take` (the queue marks it running) and forgetting it here."""
        size = self.max_batch_size if limit is None else min(limit, self.max_batch_size)
        order = [p for p in self._order() if p in classes]
        first = next((p for p in order
                      if any(self.batch_key(e) == key for g in self._lines[p] for e in g.entries)),
                     None)
        if first is None or size < 1:
            return []
        batch: list[Entry] = []
        longest = 0
        anchor: int | None = None
        waiting = set(self.waiting_classes())
        for priority in order:
            if len(batch) >= size:
                break
            if (priority is Priority.BULK
                    and any(e.job.priority is Priority.INTERACTIVE for e in batch)):
                # Static: bulk work would set an interactive batch's pace. Continuous: its
                # encoding would lengthen the interactive articles' first step.
                continue
            if order.index(priority) < order.index(first):
                continue  # nothing of the key there
            room = size
            if small_bulk and priority is Priority.BULK:
                room = min(size, len(batch) + self.bulk_cap)
            served, longest, anchor = self._cut_line(priority, key, room, batch, longest, anchor,
                                                     take)
            line = self._lines[priority]
            # Groups served go to the back of their line: round-robin carries over.
            self._lines[priority] = collections.deque(
                [g for g in line if id(g) not in served] + [g for g in line if id(g) in served])
        got = {e.job.priority for e in batch}
        if Priority.INTERACTIVE in got and now is not None:
            self._last_interactive = now
        for priority in waiting if set(classes) >= set(CLASSES) else ():
            self._passed_over[priority] = 0 if priority in got else self._passed_over[priority] + 1
        return batch

    def _cut_line(self, priority: Priority, key: Hashable, size: int, batch: list[Entry],
                  longest: int, anchor: int | None, take: Callable[[Entry], None]
                  ) -> tuple[set[int], int, int | None]:
        """Fill `batch` from one class's line, round-robin across its groups."""
        line = self._lines[priority]
        full_groups: set[int] = set()
        served: set[int] = set()
        progress = True
        while progress and len(batch) < size:
            progress = False
            offers = []  # each group's next job of `key`, in round-robin order
            for group in line:
                entry = next((e for e in group.entries if self.batch_key(e) == key), None)
                if entry is not None and id(group) not in full_groups:
                    offers.append((group, entry))
            if anchor is None and offers:
                anchor = offers[0][1].job.cost  # the first group in line is always served
            # The rest by closeness of length to it: less padding when not all fit.
            offers.sort(key=lambda offer: abs(offer[1].job.cost - (anchor or 0)))
            for group, entry in offers:
                if len(batch) >= size:
                    break
                new_longest = max(longest, entry.job.cost)
                if (batch and self.max_batch_tokens and not self.share_keys
                        and new_longest * (len(batch) + 1) > self.max_batch_tokens):
                    full_groups.add(id(group))
                    continue
                served.add(id(group))
                self._group_of.pop(entry)
                group.entries.remove(entry)
                take(entry)
                batch.append(entry)
                longest = new_longest
                progress = True
        # Emptied groups leave the line (the queue prunes nothing of ours).
        for group in [g for g in line if not g.entries]:
            line.remove(group)
        return served, longest, anchor

    # ----- overload -----
    def victims(self, priority: Priority, needed: int) -> list[Entry]:
        """Queued jobs of classes less urgent than `priority` that may be displaced to make
        room for `needed` jobs of it: the least urgent class first, the latest queued first.
        Empty when they would not free enough room (then nothing is displaced)."""
        candidates: list[Entry] = []
        for victim_class in reversed(CLASSES):
            if victim_class <= priority:
                break
            queued = [e for g in self._lines[victim_class] for e in g.entries]
            candidates += sorted(queued, key=lambda e: e.enqueued_at, reverse=True)
            if len(candidates) >= needed:
                return candidates[:needed]
        return []

    # ----- continuous batching -----
    def room(self, held: Sequence[Priority], max_active: int, session_waiting: int,
             pausing: bool = False) -> Room:
        """How many articles a continuous executor holding `held` may admit now: up to
        `max_active` of any class (none while the session has some waiting for cache room: they
        go first; none either while less urgent work sits the next step out, `pausing`: it
        would only wait, paused, and its encoding would lengthen the step that ends the pause),
        and interactive ones up to `interactive_headroom` beyond."""
        free = 0 if session_waiting > 0 or pausing else max(0, max_active - len(held))
        interactive = max(free, max_active + self.interactive_headroom - len(held))
        return Room(any=free, interactive=interactive)

    def pauses(self, held: Mapping[int, Priority], sat_out_s: float,
               turn_s: float) -> tuple[int, ...]:
        """Tickets that sit the next decoding step out: while interactive articles are held,
        every less urgent one, until the steps they sat out since they last decoded
        (`sat_out_s`) took `(1 - paused_share) / paused_share` times that last step
        (`turn_s`); then nobody sits out (their turn). So, beside interactive work, less urgent
        articles decode at least once in every such stretch, and get about `paused_share` of
        the decoding time. `starvation_bound` 1 or `paused_share` 1: no pausing."""
        if not self.sits_out(held, sat_out_s, turn_s):
            return ()
        return tuple(t for t, p in held.items() if p is not Priority.INTERACTIVE)

    def sits_out(self, held: Mapping[int, Priority], sat_out_s: float, turn_s: float) -> bool:
        """Whether less urgent work sits the next step out (`pauses`): held, it is paused;
        queued, it is not admitted (`room`). The steps in which it did count towards its turn
        even when none was held, so queued bulk work is admitted on its turn too."""
        if self.starvation_bound <= 1 or self.paused_share >= 1:
            return False
        if not any(p is Priority.INTERACTIVE for p in held.values()):
            return False
        return sat_out_s < turn_s * (1 - self.paused_share) / self.paused_share
