"""The running set's operations (service/engines/stepping/running.py) keep each row's cache equal
to what it was, checked on the tensors: rows join, leave, are reordered by beam parents, and sit
steps out, against a plain model of what each row should hold."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from service.engines.stepping.running import RunningSet, Source, StepInputs

LAYERS, HEADS, DIM = 2, 2, 3


@dataclass(eq=False)
class _Rows:
    width: int
    source: Source
    tokens: torch.Tensor
    length: int = 0
    expected: list[list[torch.Tensor]] = field(default_factory=list)
    """Per row, the columns it should hold: [layers, 2, heads, dim] each, oldest first."""


def _source(length: int) -> Source:
    return Source(kv=[(torch.randn(1, HEADS, length, DIM), torch.randn(1, HEADS, length, DIM))
                      for _ in range(LAYERS)], length=length)


def _group(width: int, source: Source | None = None) -> _Rows:
    return _Rows(width=width, source=source or _source(random.randint(2, 5)),
                 tokens=torch.zeros(width, dtype=torch.long), expected=[[] for _ in range(width)])


def _fake_step(inputs: StepInputs) -> tuple[list[torch.Tensor], list[tuple]]:
    """What an adapter's step does to the cache (decoders.py): this step's column, random,
    written into the free slot of a slotted cache or appended. Returns the new columns
    ([rows, layers, 2, heads, dim]) and the caches with them."""
    rows, length = inputs.tokens.shape[0], inputs.self_valid.shape[1]
    columns = torch.randn(rows, LAYERS, 2, HEADS, DIM)
    out = []
    for layer in range(LAYERS):
        new = [columns[:, layer, part, :, None, :] for part in (0, 1)]
        past = inputs.self_kv[layer] if inputs.self_kv else None
        if past is None or past[0].shape[2] == 0:
            out.append((new[0], new[1]))
        elif past[0].shape[2] == length:
            past[0][:, :, -1:] = new[0]
            past[1][:, :, -1:] = new[1]
            out.append(past)
        else:
            out.append((torch.cat((past[0], new[0]), 2), torch.cat((past[1], new[1]), 2)))
    return list(columns), out


def _check(running: RunningSet) -> None:
    """What a full step would read: each row's valid columns are exactly its history, and its
    cross-attention slot points at its own source."""
    assert running.rows == sum(g.width for g in running.groups)
    if not running.groups:
        return
    inputs = running.step_inputs(range(len(running)))
    history = inputs.self_valid.shape[1] - 1
    row = 0
    for group in running.groups:
        for j in range(group.width):
            valid = inputs.self_valid[row, :history]
            assert int(valid.sum()) == group.length == len(group.expected[j])
            assert bool(inputs.self_valid[row, history])  # this step's column
            for layer in range(LAYERS):
                for part in (0, 1):
                    held = inputs.self_kv[layer][part][row, :, :history][:, valid]
                    want = [c[layer, part] for c in group.expected[j]]
                    if want:
                        assert torch.equal(held, torch.stack(want, 1))
            layout = inputs.layout
            [source] = [s for start, end, s in layout.cross_runs if start <= row < end]
            assert inputs.cross[source] is group.source.kv  # the source itself, not a copy
            [length] = [n for start, end, n in layout.self_runs if start <= row < end]
            assert length == group.length
            row += 1


def _step(running: RunningSet, stepped: list[int], leaving: set[int], rng: random.Random,
          trim: bool) -> None:
    """One step over the groups `stepped`, random beam parents; the groups `leaving` leave."""
    inputs = running.step_inputs(stepped, trim=trim)
    columns, new_kv = _fake_step(inputs)
    kept: dict[int, torch.Tensor | None] = {}
    offset = 0
    for i, group in enumerate(running.groups):
        if i not in stepped:
            if i not in leaving:
                kept[i] = None
            continue
        parents = [rng.randrange(group.width) for _ in range(group.width)]
        mine = columns[offset:offset + group.width]
        offset += group.width
        if i in leaving:
            continue
        kept[i] = torch.tensor(parents)
        group.expected = [group.expected[p] + [mine[p]] for p in parents]
    running.after_step(new_kv, stepped, kept)


def _new_set(seed: int, *widths: int) -> tuple[RunningSet[_Rows], random.Random]:
    """A running set of groups of these widths, joined and not stepped yet, and its rng."""
    random.seed(seed)
    running: RunningSet[_Rows] = RunningSet("cpu")
    for width in widths:
        running.join(_group(width))
    return running, random.Random(seed)


def test_join_adds_empty_rows_and_keeps_the_others():
    running, rng = _new_set(1, 2)
    for _ in range(3):
        _step(running, [0], set(), rng, trim=False)
    before = [list(g.expected) for g in running.groups]
    running.join(_group(3))
    _check(running)
    assert running.groups[0].expected == before[0]
    assert running.groups[1].length == 0


def test_filter_drops_a_group_and_keeps_the_others_caches():
    random.seed(2)
    running: RunningSet[_Rows] = RunningSet("cpu")
    shared = _source(4)
    groups = [_group(2, shared), _group(1), _group(3, shared)]
    rng = random.Random(2)
    for group in groups:
        running.join(group)
        _step(running, list(range(len(running))), set(), rng, trim=False)
    running.filter(lambda g: g is not groups[1])
    assert running.groups == [groups[0], groups[2]]
    _check(running)
    running.filter(lambda g: False)
    assert not running.groups and running.rows == 0 and running.self_kv() is None


def test_reorder_by_beam_parents_moves_each_rows_history_with_it():
    running, rng = _new_set(3, 4)
    for _ in range(5):
        _step(running, [0], set(), rng, trim=False)
        _check(running)


@pytest.mark.parametrize("seed", range(6))
def test_random_joins_leaves_pauses_and_reorders_keep_every_rows_cache(seed):
    """Random arrivals, pauses (both ways of keeping the paused rows: written in place, or the
    cache rebuilt when a group leaves), beam reordering and leavers, checked after each step."""
    random.seed(seed)
    rng = random.Random(seed)
    running: RunningSet[_Rows] = RunningSet("cpu")
    sources = [_source(rng.randint(1, 6)) for _ in range(3)]
    for _ in range(40):
        if len(running) < 5 and rng.random() < 0.5:
            running.join(_group(rng.randint(1, 3), rng.choice(sources + [None])))
        if running.groups and rng.random() < 0.1:
            victim = rng.choice(running.groups)
            running.filter(lambda g, victim=victim: g is not victim)
        if not running.groups:
            continue
        everyone = list(range(len(running)))
        stepped = [i for i in everyone if rng.random() < 0.7] or everyone[:1]
        leaving = {i for i in everyone if rng.random() < 0.15}
        _step(running, stepped, leaving, rng, trim=len(stepped) != len(running))
        _check(running)


def _two_groups_stepped(seed: int, width: int, steps: int
                        ) -> tuple[RunningSet[_Rows], random.Random]:
    """A running set of two groups of `width` rows that have stepped `steps` times together."""
    running, rng = _new_set(seed, width, width)
    for _ in range(steps):
        _step(running, [0, 1], set(), rng, trim=False)
    return running, rng


def test_paused_rows_are_written_around_not_copied():
    """A step that leaves a group out and where nobody leaves writes the stepping rows in place:
    the paused rows' cache is the same tensor, its values untouched."""
    running, rng = _two_groups_stepped(seed=4, width=2, steps=3)
    _step(running, [1], set(), rng, trim=True)  # group 1 is now a column ahead of group 0
    cache = running.self_kv()
    assert cache is not None
    paused = cache[0][0][2:].clone()
    _step(running, [0], set(), rng, trim=True)
    after = running.self_kv()
    assert after is not None and after[0][0].data_ptr() == cache[0][0].data_ptr()
    assert torch.equal(after[0][0][2:], paused)
    _check(running)


def test_stepping_rows_that_outgrow_the_paused_ones_widen_the_cache_once_per_headroom():
    """A young bulk set sits out while a later article decodes past the bulk rows' history: the
    set's cache is widened on the left with WIDEN_COLUMNS to spare, then written in place for
    that many steps (it was rebuilt, every paused row copied, at every step), and every row's
    history stays exact."""
    from service.engines.stepping.running import WIDEN_COLUMNS

    running, rng = _two_groups_stepped(seed=5, width=4, steps=2)
    running.join(_group(2))  # the late article: it decodes alone, the others paused
    allocations = set()
    for _ in range(2 * WIDEN_COLUMNS):
        _step(running, [2], set(), rng, trim=True)
        cache = running.self_kv()
        assert cache is not None
        allocations.add(cache[0][0].untyped_storage().data_ptr())
        _check(running)
    assert running.groups[2].length == 2 * WIDEN_COLUMNS
    assert len(allocations) <= 3  # one widening per WIDEN_COLUMNS steps (it was one per step)
    _step(running, [0, 1, 2], set(), rng, trim=False)  # everyone again
    _check(running)
