"""The running set as a data structure: the rows that decode together, their caches and sources.

`RunningSet` owns the tensors of continuous batching and their slot layout, and nothing else: it
knows neither search (session.py and search.py pick tokens and parents) nor failure isolation
(session.py decides who fails). Its operations are named for what they do:

- `join(group)`: a group's rows join at the end with an empty self-attention history (TGI's
  `Batch.concatenate`, one group at a time);
- `filter(keep)`: groups that do not pass leave, with their rows and caches (TGI's
  `Batch.filter`);
- `step_inputs(indices)`: what one forward pass over some of the groups reads (all of them; or
  the ones not paused, their caches cut to the columns they need);
- `after_step(new_kv, stepped, kept)`: the caches after that pass: each kept group's beam
  reordering applied, the groups that left dropped, paused groups untouched.

Layout: a group is `width` consecutive rows (its beams); rows are in group order. Each row's
self-attention keys/values sit in one tensor per layer, [rows, heads, T, dim], right-aligned
(a row with `length` tokens of history holds the last `length` columns; the columns left of them
belong to longer rows). A group reads one `Source` (an encoded input: each decoder layer's
cross-attention keys/values, [1, heads, length, dim]); groups that read the same source share it
and sit next to each other. A step reads every source as it is (never padded or copied into one
tensor), and `decoders.Layout` says which rows attend together: runs of rows with the same
history length, runs of rows that read the same source.

Copies: after a step the kept rows are gathered once per layer into a cache one column wider
whose last column (the "slot") the next step writes in place, so the cache is copied once per
step. Pausing: when some groups sit a step out, the stepping rows' new caches are written back
into the set's cache in place (`after_step`), so the paused rows' caches are not even copied;
only when a group left is it rebuilt once with the paused rows copied as they were. When the
stepping rows outgrow the cache, it is widened on the left with `WIDEN_COLUMNS` to spare (one copy
for that many steps). A paused row therefore sees exactly the same inputs whenever it steps as it
would have unpaused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from .decoders import KV, Layout, runs


@dataclass(eq=False)
class Source:
    """One encoded input: each decoder layer's cross-attention keys and values,
    [1, heads, length, dim], shared by every row that reads it."""

    kv: list[KV]
    length: int


class Rows(Protocol):
    """What the running set needs of a group of rows (session.py's groups carry more)."""

    width: int
    """Its rows (beams)."""
    source: Source
    tokens: torch.Tensor
    """The tokens its rows feed to the next step: [width]."""
    length: int
    """Tokens its rows hold in the self-attention cache."""


G = TypeVar("G", bound=Rows)
Cross = tuple[list[list[KV]], list[tuple[int, int, int]]]
"""The sources the rows read (each one's keys/values per layer) and the runs of rows that read
each (`Layout.cross_runs`)."""


@dataclass(frozen=True)
class StepInputs:
    """One forward pass's inputs, in the argument order of `Adapter.step`."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    self_kv: list[KV]
    self_valid: torch.Tensor
    cross: list[list[KV]]
    layout: Layout

    def args(self) -> tuple[Any, ...]:
        return (self.tokens, self.lengths, self.self_kv, self.self_valid, self.cross,
                self.layout)


class RunningSet(Generic[G]):
    """The groups decoding together and the tensors they hold (see the module docstring).
    Used by one thread (the session's)."""

    def __init__(self, device: Any) -> None:
        self.device = device
        self.groups: list[G] = []
        """In row order: group i's rows follow group i-1's."""
        self._self_kv: list[KV] | None = None  # [rows, heads, T, dim] per layer
        self._slotted = False
        """Whether `_self_kv`'s last column is a free slot for the next step's keys/values."""

    # ----- sizes -----
    @property
    def rows(self) -> int:
        return sum(g.width for g in self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def self_kv(self) -> list[KV] | None:
        """Each row's self-attention cache per layer, without the free slot column (views)."""
        if self._self_kv is None:
            return None
        if self._slotted:
            return [(k[:, :, :-1], v[:, :, :-1]) for k, v in self._self_kv]
        return list(self._self_kv)

    # ----- joining and leaving -----
    def join(self, group: G) -> None:
        """Append a group's rows with an empty self-attention history (masked columns)."""
        width = group.width
        if self._self_kv is not None:
            self._self_kv = [(torch.cat((k, k.new_zeros((width, *k.shape[1:]))), 0),
                              torch.cat((v, v.new_zeros((width, *v.shape[1:]))), 0))
                             for k, v in self._self_kv]
        self.groups.append(group)

    def filter(self, keep: Callable[[G], bool]) -> None:
        """Keep the groups that pass `keep`, with their rows' caches as they were; the others
        leave. Nothing changes (and nothing is copied) when all pass."""
        kept = [i for i, group in enumerate(self.groups) if keep(group)]
        if len(kept) == len(self.groups):
            return
        groups = [self.groups[i] for i in kept]
        if not groups:
            self.clear()
            return
        rows = self.row_index(kept)
        self._unslot()
        if self._self_kv is not None:
            history = max(g.length for g in groups)
            self._self_kv = [(k.index_select(0, rows)[:, :, k.shape[2] - history:],
                              v.index_select(0, rows)[:, :, v.shape[2] - history:])
                             for k, v in self._self_kv] if history else None
        self.groups = groups

    def clear(self) -> None:
        self.groups, self._self_kv, self._slotted = [], None, False

    # ----- one step -----
    def step_inputs(self, indices: Sequence[int], *, trim: bool = False) -> StepInputs:
        """The inputs of one forward pass over the rows of the groups `indices` (in order): all
        of them for a normal step, the groups not paused, or one article's when isolating a
        failure. `trim`: cut the caches to the columns these rows hold (the paused rows may hold
        more)."""
        groups = [self.groups[i] for i in indices]
        everything = len(groups) == len(self.groups)
        if not everything:
            self._unslot()  # the pausing paths work on the cache's own columns
        self_kv = self._self_kv
        slot = 1 if self._slotted and self_kv is not None else 0
        if not everything and self_kv is not None:
            rows = self.row_index(indices)
            end = self_kv[0][0].shape[2]
            start = end - max(g.length for g in groups) if trim else 0
            self_kv = [(k[:, :, start:end].index_select(0, rows),
                        v[:, :, start:end].index_select(0, rows)) for k, v in self_kv]
        cross = self._cross_inputs(groups)
        history = 0 if self_kv is None else self_kv[0][0].shape[2] - slot
        lengths = torch.tensor([g.length for g in groups for _ in range(g.width)],
                               device=self.device)
        columns = torch.arange(history + 1, device=self.device)
        self_valid = columns[None, :] >= (history - lengths)[:, None]
        tokens = torch.cat([g.tokens for g in groups])
        widths = [g.width for g in groups]
        layout = Layout(runs([g.length for g in groups], widths), cross[1])
        return StepInputs(tokens, lengths, self_kv or [], self_valid, cross[0], layout)

    def after_step(self, new_kv: list[KV], stepped: Sequence[int],
                   kept: dict[int, torch.Tensor | None]) -> None:
        """The set after a forward pass over the groups `stepped` (indices, in order), whose
        caches with this step's column are `new_kv` (their rows only, in order). `kept`: the
        groups that stay, by index, each with its rows' parents among its own rows (its beam
        reordering), or None for a group that did not step (kept as it was). The stepped groups'
        lengths grow by one; every other group leaves."""
        stepping = set(stepped)
        for i in stepped:
            self.groups[i].length += 1
        if not kept:
            self.clear()
            return
        offsets = self._offsets()
        order: list[torch.Tensor] = []  # the kept rows in set order, in the next step's order
        for i in sorted(kept):
            parents = kept[i]
            if parents is None:
                parents = torch.arange(self.groups[i].width, device=self.device)
            order.append(parents + offsets[i])
        everyone_stays = len(kept) == len(self.groups)
        if len(stepping) == len(self.groups):
            self._reorder(new_kv, kept, order)
        elif not (everyone_stays and self._write_stepped_rows(new_kv, stepped, kept)):
            self._reorder(self._with_paused_rows(new_kv, stepped), kept, order)

    def row_index(self, indices: Sequence[int]) -> torch.Tensor:
        """The rows of the groups `indices`, in that order."""
        offsets = self._offsets()
        return torch.cat([torch.arange(offsets[i], offsets[i] + self.groups[i].width)
                          for i in indices]).to(self.device)

    # ----- internals -----
    def _offsets(self) -> list[int]:
        starts, offset = [], 0
        for group in self.groups:
            starts.append(offset)
            offset += group.width
        return starts

    def _cross_inputs(self, groups: list[G]) -> Cross:
        """The sources these groups read, each once, as they are (no padding, no copy), and the
        runs of rows that read each."""
        index: dict[int, int] = {}
        sources: list[list[KV]] = []
        for group in groups:
            if id(group.source) not in index:
                index[id(group.source)] = len(sources)
                sources.append(group.source.kv)
        read = [index[id(group.source)] for group in groups]
        return sources, runs(read, [g.width for g in groups])

    def _write_stepped_rows(self, new_kv: list[KV], stepped: Sequence[int],
                            kept: dict[int, torch.Tensor | None]) -> bool:
        """After a step that left some groups out and where no group left: write the stepping
        rows' new caches (beam reordering applied) into the set's cache in place, right-aligned,
        so the paused rows' caches are not even copied. When the stepping rows need more
        columns than the set's cache has (they outgrew the paused rows' history), the cache is
        first widened on the left with `WIDEN_COLUMNS` to spare, once for that many steps,
        instead of rebuilt at every step. False (nothing written) only without a cache.
        Columns left of a row's history may keep stale values: no row reads them."""
        if self._self_kv is None or not stepped:
            return False
        width, total = new_kv[0][0].shape[2], self._self_kv[0][0].shape[2]
        if width > total:
            self._widen(width + WIDEN_COLUMNS)
            total = self._self_kv[0][0].shape[2]
        parents, local = [], 0
        for i in stepped:
            own = kept[i]
            assert own is not None  # a group that stepped has parents
            parents.append(own + local)
            local += self.groups[i].width
        rows = self.row_index(stepped)
        order = torch.cat(parents)
        for (k, v), (k_new, v_new) in zip(self._self_kv, new_kv):
            k[rows, :, total - width:] = k_new.index_select(0, order)
            v[rows, :, total - width:] = v_new.index_select(0, order)
        return True

    def _widen(self, columns: int) -> None:
        """The set's cache, `columns` wide: zero columns added on the left (older than any row's
        history, so never read), one layer at a time."""
        assert self._self_kv is not None and not self._slotted  # a paused step unslotted it
        cache = self._self_kv
        for layer, (k, v) in enumerate(cache):
            cache[layer] = (_left_padded(k, columns), _left_padded(v, columns))

    def _with_paused_rows(self, new_kv: list[KV], stepped: Sequence[int]) -> list[KV]:
        """The whole set's caches after a step that left some groups out: the stepping rows'
        caches with this step's column (`new_kv`, in order) and the paused rows' caches as they
        were, both right-aligned in one width, rows in set order. Nothing is recomputed."""
        chosen = set(stepped)
        paused = [i for i in range(len(self.groups)) if i not in chosen]
        history = max(self.groups[i].length for i in paused)  # columns the paused rows hold
        step_rows = self.row_index(stepped)
        paused_rows = self.row_index(paused)
        total = self.rows
        out: list[KV] = []
        for layer, layer_kv in enumerate(new_kv):
            width = max(layer_kv[0].shape[2], history)
            pair = []
            for part, new in enumerate(layer_kv):
                full = new.new_zeros((total, new.shape[1], width, new.shape[3]))
                full[step_rows, :, width - new.shape[2]:] = new
                if history:
                    assert self._self_kv is not None  # rows with a history have a cache
                    old = self._self_kv[layer][part]
                    full[paused_rows, :, width - history:] = \
                        old[:, :, old.shape[2] - history:].index_select(0, paused_rows)
                pair.append(full)
            out.append((pair[0], pair[1]))
        return out

    def _reorder(self, new_kv: list[KV], kept: dict[int, torch.Tensor | None],
                 order: list[torch.Tensor]) -> None:
        """From the whole set's caches with this step's column (`new_kv`), keep the rows
        `order` (each group's beam reordering and every leaving group's exit in one gather per
        layer), and trim columns no row needs."""
        surviving = [self.groups[i] for i in sorted(kept)]
        rows = torch.cat(order)
        total = self.rows
        identity = len(rows) == total and bool(
            (rows == torch.arange(total, device=rows.device)).all())
        history = max(g.length for g in surviving)
        start = new_kv[0][0].shape[2] - history
        if identity:
            self._self_kv = [(k[:, :, start:], v[:, :, start:]) if start else (k, v)
                             for k, v in new_kv]
            self._slotted = False
        else:
            # One copy per layer: the kept rows, in their new order, into a cache with a free
            # last column that the next step writes in place. Layer by layer, each layer's old
            # tensors let go as soon as its copy exists (here and in `new_kv`, which the caller
            # passes on): the step holds one layer twice at a time, not the whole cache.
            old, self._self_kv = self._self_kv, None
            gathered: list[KV] = []
            for layer in range(len(new_kv)):
                k, v = new_kv[layer]
                new_kv[layer] = _RELEASED
                if old is not None:
                    old[layer] = _RELEASED
                gathered.append((_gather_slotted(k, rows, start), _gather_slotted(v, rows, start)))
                del k, v
            self._self_kv = gathered
            self._slotted = True
        self.groups = surviving

    def _unslot(self) -> None:
        """The cache without its free slot column (views, nothing copied)."""
        self._self_kv = self.self_kv()
        self._slotted = False


WIDEN_COLUMNS = 16
"""Columns to spare when stepping rows outgrow the set's cache while others sit out: the paused
rows' caches are copied once every this many steps, not at every step (a 16-article bulk set
behind one interactive article: its steps 17 ms instead of 40 ms, in process)."""

_RELEASED: KV = (torch.empty(0), torch.empty(0))
"""What a cache layer is replaced by once it has been copied (its tensors let go)."""


def _gather_slotted(x: torch.Tensor, order: torch.Tensor, start: int) -> torch.Tensor:
    """Rows `order` of `x`'s columns from `start`, in a new tensor one column wider: the last
    column is left free (not initialised) for the next step to write."""
    width = x.shape[2] - start
    out = x.new_empty((order.shape[0], x.shape[1], width + 1, x.shape[3]))
    torch.index_select(x[:, :, start:], 0, order, out=out[:, :, :width])
    return out


def _left_padded(x: torch.Tensor, columns: int) -> torch.Tensor:
    """`x` [rows, heads, T, dim] right-aligned in `columns` >= T columns, zeros on the left."""
    out = x.new_zeros((x.shape[0], x.shape[1], columns, x.shape[3]))
    out[:, :, columns - x.shape[2]:] = x
    return out
