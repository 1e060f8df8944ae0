"""The running set: sequence groups that join and leave between decoding steps.

`TorchSession.advance(StepIn)` is one iteration of the loop (the serving side calls it
back to back; see service/serving/continuous.py):

1. drop removed tickets (waiting or decoding; their rows and cache are freed at once);
2. queue new articles; refuse at once one whose cache could never fit the budget (`too_large`);
3. admit waiting articles, most urgent class first (`Admit.priority`), then in arrival order,
   while the budget has room and the encoder slice (`max_encode_tokens_per_step`) is not used up
   (at least one article per call): one batched encoder
   pass for all of them; an article's encoder output and each decoder layer's cross-attention keys
   and values (a "source") are computed once and serve every beam of its summary and of its
   headline (when both read the same input); each (article, output) becomes a group of `beams`
   rows, and the rows of one source are kept next to each other;
4. decode one step for every row of every group in one forward pass (rows at different lengths,
   with different options: see decoders.py), except the rows of paused tickets (`StepIn.pause`):
   they sit the step out, their caches and search state untouched (see "Pausing" below);
5. each group picks its rows' next tokens and parents (search.py), then one gather per layer
   applies every group's beam reordering and drops the rows of groups that finished;
6. an article whose outputs are all done is returned.

Memory: each row holds its self-attention keys/values, padded to the longest row (right-aligned);
each source holds its cross-attention keys/values once, padded to the longest source. The budget
counts the padded worst case of the set, for what is decoding plus the article being admitted:
(rows x longest max length + sources x longest source) x bytes per token; the article waits until
that fits.

Pausing: the forward pass runs over the other groups only (their caches cut to the columns they
need); the stepping rows' new caches are then written into the set's cache in place (beam
reordering applied), right-aligned as before, so the paused rows' caches are not touched at all.
Only when a group left in the step, or the stepping rows outgrew the set's cache width, is the
set's cache rebuilt once with the paused rows copied as they were. A paused article therefore
produces exactly the
tokens it would produce unpaused: its rows see the same inputs whenever they do step. A paused
article that is still waiting is not admitted (its encoding sits the step out too).

Encoder slicing: a burst of long articles is encoded a slice at a time, one slice per call, so
the rows already decoding step between slices instead of stalling behind the whole burst, and the
most urgent articles are encoded first. A slice holds articles while their padded encoder tokens
(distinct inputs x longest input) stay within `max_encode_tokens_per_step`; 0: no cap.

Failure isolation: a group whose search raises fails its article only; if the batched encoder or
decoder pass raises, each article is run alone to find which one fails, the others go on.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ...domain import Generated, GenerationParams, PreparedArticle
from ...errors import is_out_of_memory
from ..protocol import Admit, StepFailure, StepIn, StepOut
from .decoders import KV, Adapter, CrossLayout
from .search import Search, advance_all, hf_setup, new_search

log = logging.getLogger(__name__)

OUTPUTS = ("summary", "headline")


@dataclass(eq=False)
class _Article:
    ticket: int
    params: GenerationParams
    article: PreparedArticle
    inputs: dict[str, tuple[int, ...]]
    """Encoder input ids per output ("summary", "headline")."""
    reserve: tuple[int, int, int, int]
    """(rows, longest max length, sources, longest source) its groups need."""
    order: tuple[int, int] = (1, 0)
    """Its place in the waiting line: (priority class, arrival number); smallest first."""
    groups: list[_Group] = field(default_factory=list)
    texts: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(eq=False)
class _Source:
    """One encoded input: each decoder layer's cross-attention keys and values,
    [1, heads, length, dim], shared by every row that reads it."""

    kv: list[KV]
    length: int


@dataclass(eq=False)
class _Group:
    article: _Article
    output: str
    search: Search
    width: int
    source: _Source
    tokens: torch.Tensor
    """The tokens its rows feed to the next step: [width]."""
    length: int = 0
    """Tokens its rows hold in the self-attention cache."""


class TorchSession:
    def __init__(self, *, adapter: Adapter, model: Any, device: Any, budget_bytes: int,
                 generation_config: Callable[[str, GenerationParams], Any],
                 decode: Callable[[list[int], str], tuple[str, int]],
                 max_encode_tokens_per_step: int = 0) -> None:
        """`generation_config(output, params)`: the config the static engine would pass to
        generate for that output; `decode(ids, output)`: text and token count;
        `max_encode_tokens_per_step`: the encoder slice (padded tokens; 0: no cap)."""
        if max_encode_tokens_per_step < 0:
            raise ValueError("max_encode_tokens_per_step must not be negative (0: no cap)")
        self.adapter = adapter
        self.model = model
        self.device = device
        self.budget_bytes = budget_bytes
        self._config = generation_config
        self._decode = decode
        self.max_encode_tokens_per_step = max_encode_tokens_per_step
        self._waiting: list[_Article] = []
        """Articles not yet admitted, in admission order (`_Article.order`)."""
        self._arrivals = itertools.count()
        self._deferred = 0
        """Waiting articles the last admission held back for the encoder slice, not for room."""
        self._paused_cross: tuple[tuple[_Group, ...], tuple[list[KV], torch.Tensor,
                                                            CrossLayout]] | None = None
        """The sources of the groups that stepped while others were paused, kept while the same
        groups step (pauses tend to last): rebuilt when they change, dropped at a full step."""
        self._articles: dict[int, _Article] = {}
        self.groups: list[_Group] = []
        self._self_kv: list[KV] | None = None  # [rows, heads, T, dim] per layer
        self._slotted = False
        """Whether `_self_kv`'s last column is a free slot for the next step's keys/values
        (written in place by the step: the cache is copied once per step, by the reorder,
        instead of also being concatenated)."""
        self._cross: tuple[list[KV], torch.Tensor, CrossLayout] | None = None
        """The running set's sources as the step reads them (`_cross_inputs`); None: rebuild."""

    # ----- sizes -----
    @property
    def rows(self) -> int:
        return sum(g.width for g in self.groups)

    def _bytes(self, rows: int, self_len: int, sources: int, source_len: int) -> int:
        return (rows * self_len + sources * source_len) * self.adapter.bytes_per_token()

    def used_bytes(self) -> int:
        """What the running set may hold at most (its padded worst case)."""
        return self._reserved_with([])

    # ----- the loop -----
    def advance(self, step: StepIn) -> StepOut:
        failed: list[StepFailure] = []
        done: list[tuple[int, Generated]] = []
        paused = frozenset(step.pause)
        with torch.inference_mode():
            for ticket in step.remove:
                self._remove(ticket)
            for admit in step.admit:
                failure = self._queue(admit)
                if failure is not None:
                    failed.append(failure)
            started = time.perf_counter()
            waiting_before = len(self._waiting)
            failed += self._admit(paused)
            paused_rows = sum(g.width for g in self.groups if g.article.ticket in paused)
            rows = self.rows - paused_rows
            if rows:
                failed += self._step(done, paused)
            worked = rows or len(self._waiting) != waiting_before
            if not self.groups:
                self._paused_cross = None
            elapsed = time.perf_counter() - started if worked else 0.0
        return StepOut(done=tuple(done), failed=tuple(failed), waiting=len(self._waiting),
                       active=len({id(g.article) for g in self.groups}), rows=rows,
                       step_s=elapsed, used_bytes=self.used_bytes(),
                       budget_bytes=self.budget_bytes, paused_rows=paused_rows,
                       encode_deferred=self._deferred)

    # ----- joining -----
    def _queue(self, admit: Admit) -> StepFailure | None:
        params, article = admit.params, admit.article
        inputs = {}
        if params.outputs.summary:
            inputs["summary"] = article.summary_ids or ()
        if params.outputs.headline:
            inputs["headline"] = article.headline_ids or ()
        limits = {"summary": params.summary_max_tokens, "headline": params.headline_max_tokens}
        rows = params.num_beams * len(inputs)
        longest = 1 + max((limits[o] for o in inputs), default=0)
        sources = len(set(inputs.values()))
        source = max((len(ids) for ids in inputs.values()), default=0)
        state = _Article(ticket=admit.ticket, params=params, article=article, inputs=inputs,
                         reserve=(rows, longest, sources, source),
                         order=(admit.priority, next(self._arrivals)))
        need = self._bytes(rows, longest, sources, source)
        if need > self.budget_bytes:
            return StepFailure(
                admit.ticket, "too_large",
                f"this article needs {_mib(need)} of decoder cache ({params.num_beams} beams, "
                f"{source} input tokens, up to {longest - 1} new tokens) and the whole budget is "
                f"{_mib(self.budget_bytes)}; ask for fewer beams or tokens, send a shorter "
                "article, or raise --kv-cache-mb")
        self._articles[admit.ticket] = state
        bisect.insort(self._waiting, state, key=lambda a: a.order)
        return None

    def _admit(self, paused: frozenset[int] = frozenset()) -> list[StepFailure]:
        """Encode and join waiting articles in line order (most urgent class first), skipping
        paused ones, while the budget has room and the encoder slice lasts."""
        joining: list[_Article] = []
        self._deferred = 0
        line = [a for a in self._waiting if a.ticket not in paused]
        for position, candidate in enumerate(line):
            fits = self._reserved_with(joining + [candidate]) <= self.budget_bytes
            if not fits and (self.groups or joining):
                break  # in line order: a more urgent or earlier article waits for room first
            if joining and not self._within_encode_slice(joining + [candidate]):
                self._deferred = self._count_with_room(joining, line[position:])
                break
            joining.append(candidate)
        if not joining:
            return []
        for article in joining:
            self._waiting.remove(article)
        encoded, failed = self._encode(joining)
        for article in joining:
            if article.ticket not in encoded:
                continue
            try:
                self._join(article, encoded[article.ticket])
            except Exception as error:  # noqa: BLE001 - this article fails alone
                failed.append(_failure(article.ticket, error, "setting up"))
                if article.groups and any(g.article is article for g in self.groups):
                    self._drop_article(article)
                self._forget(article)
        return failed

    def _within_encode_slice(self, articles: list[_Article]) -> bool:
        """Whether one encoder pass over `articles` stays within the slice: padded tokens
        (distinct inputs x longest input), as `_encode_batch` pads them."""
        if not self.max_encode_tokens_per_step:
            return True
        inputs = {ids for article in articles for ids in article.inputs.values()}
        longest = max((len(ids) for ids in inputs), default=0)
        return len(inputs) * longest <= self.max_encode_tokens_per_step

    def _count_with_room(self, joining: list[_Article], rest: list[_Article]) -> int:
        """How many of `rest`, in line order, the budget would also have admitted: the
        articles the encoder slice alone holds back."""
        held: list[_Article] = []
        for article in rest:
            if self._reserved_with(joining + held + [article]) > self.budget_bytes:
                break
            held.append(article)
        return len(held)

    def _reserved_with(self, extra: list[_Article]) -> int:
        rows, self_len, sources, source_len = 0, 0, 0, 0
        articles = {id(g.article): g.article for g in self.groups}
        for a in extra:
            articles[id(a)] = a
        for a in articles.values():
            r, s, n, c = a.reserve
            rows, self_len = rows + r, max(self_len, s)
            sources, source_len = sources + n, max(source_len, c)
        return self._bytes(rows, self_len, sources, source_len)

    def _encode(self, articles: list[_Article]
                ) -> tuple[dict[int, dict[tuple[int, ...], _Source]], list[StepFailure]]:
        """Cross-attention keys/values per article and distinct input; an article whose encoding
        fails on its own is failed, the others go on."""
        try:
            return self._encode_batch(articles), []
        except Exception as error:  # noqa: BLE001 - isolated below
            if len(articles) == 1:
                self._forget(articles[0])
                return {}, [_failure(articles[0].ticket, error, "encoding")]
            log.warning("encoder pass for %d articles failed (%s); encoding each alone",
                        len(articles), type(error).__name__)
        encoded, failed = {}, []
        for article in articles:
            more, fails = self._encode([article])
            encoded.update(more)
            failed += fails
        return encoded, failed

    def _encode_batch(self, articles: list[_Article]) -> dict[int, dict[tuple, _Source]]:
        inputs = []
        for article in articles:
            for source_ids in article.inputs.values():
                if source_ids not in inputs:
                    inputs.append(source_ids)
        width = max(len(ids) for ids in inputs)
        pad = self.model.config.pad_token_id or 0
        ids = torch.full((len(inputs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(inputs), width), dtype=torch.long)
        for i, row in enumerate(inputs):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        hidden = self.adapter.encode(ids.to(self.device), mask.to(self.device))
        kv = self.adapter.cross_kv(hidden)
        sources = [_Source(kv=[(k[i:i + 1, :, :len(row)].contiguous(),
                                v[i:i + 1, :, :len(row)].contiguous()) for k, v in kv],
                           length=len(row))
                   for i, row in enumerate(inputs)]
        return {article.ticket: {row: sources[inputs.index(row)]
                                 for row in article.inputs.values()}
                for article in articles}

    def _join(self, article: _Article, sources: dict[tuple, _Source]) -> None:
        params = article.params
        # Groups that read the same source go next to each other (their rows are one
        # cross-attention call).
        for output, ids in sorted(article.inputs.items(), key=lambda item: item[1]):
            config = self._config(output, params)
            encoder_ids = torch.tensor([ids], dtype=torch.long, device=self.device)
            setup = hf_setup(self.model, config, encoder_ids)
            search = new_search(setup, self.model, self.device)
            group = _Group(article=article, output=output, search=search, width=search.width,
                           source=sources[ids],
                           tokens=torch.full((search.width,), setup.start_token,
                                             dtype=torch.long, device=self.device))
            article.groups.append(group)
            self._add_rows(group)

    def _add_rows(self, group: _Group) -> None:
        """Append a group's rows with an empty self-attention history (masked columns)."""
        width = group.width
        if self._self_kv is not None:
            self._self_kv = [(torch.cat((k, k.new_zeros((width, *k.shape[1:]))), 0),
                              torch.cat((v, v.new_zeros((width, *v.shape[1:]))), 0))
                             for k, v in self._self_kv]
        self.groups.append(group)
        self._cross = None

    # ----- one step -----
    def _step(self, done: list[tuple[int, Generated]],
              paused: frozenset[int] = frozenset()) -> list[StepFailure]:
        failed: list[StepFailure] = []
        stepping = self._stepping(paused)
        if len(stepping) != len(self.groups):
            self._unslot()  # the pausing paths work on the cache's own columns
        try:
            if len(stepping) == len(self.groups):
                self._paused_cross = None
                logits, merged = self._forward(stepping)
            else:
                logits, merged = self._forward(stepping, trim=True)
        except Exception as error:  # noqa: BLE001 - isolated below
            logits, merged, failed = self._forward_isolating(error, stepping)
            stepping = self._stepping(paused)  # without the articles that failed
            if not stepping:
                return failed
        # Every stepping group's search at once (search.advance_all batches alike beam groups);
        # a group whose own search raised gets its exception back.
        outcomes = iter(advance_all([self.groups[i].search for i in stepping], logits))
        keep: list[torch.Tensor] = []  # rows of the next step, in order
        stepped: list[torch.Tensor] = []  # the same for the stepping rows, among themselves
        keep_groups: list[_Group] = []
        broken: set[int] = set()
        offset = 0
        logit_offset = 0  # the paused groups have no logits
        for group in self.groups:
            if group.article.ticket in paused:  # sits this step out: rows kept as they are
                keep.append(torch.arange(offset, offset + group.width, device=self.device))
                keep_groups.append(group)
                offset += group.width
                continue
            local = logit_offset
            logit_offset += group.width
            outcome = next(outcomes)
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                tokens, parents = outcome
                if group.search.finished:
                    text = self._decode(group.search.result(), group.output)
            except Exception as error:  # noqa: BLE001 - this group's article fails alone
                failed.append(_failure(group.article.ticket, error, "search"))
                broken.add(id(group.article))
                offset += group.width
                continue
            group.length += 1
            if group.search.finished:
                group.article.texts[group.output] = text
            else:
                group.tokens = tokens
                keep.append(parents + offset)
                stepped.append(parents + local)
                keep_groups.append(group)
            offset += group.width
        # Groups of an article that failed leave with it.
        surviving = []
        for group, kept in zip(keep_groups, keep):
            if id(group.article) not in broken:
                surviving.append((group, kept))
        for group in self.groups:
            article = group.article
            if id(article) in broken:
                self._articles.pop(article.ticket, None)
            elif len(article.texts) == len(article.inputs) and article.ticket in self._articles:
                del self._articles[article.ticket]
                done.append((article.ticket, _generated(article)))
        try:
            if len(stepping) == len(self.groups):
                self._reorder(merged, surviving)
            elif not (len(surviving) == len(self.groups)
                      and self._write_stepped_rows(merged, stepping, stepped)):
                self._reorder(self._with_paused_rows(merged, stepping), surviving)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory copying the cache
            # The set's cache could not be rebuilt: the articles still decoding fail (the ones
            # done in this step are delivered above) and the set starts over empty, so no
            # group of a delivered or failed article stays behind.
            for article in {id(g.article): g.article for g, _ in surviving}.values():
                self._articles.pop(article.ticket, None)
                failed.append(_failure(article.ticket, error, "decoding"))
            self.groups, self._self_kv, self._cross = [], None, None
        return failed

    def _stepping(self, paused: frozenset[int]) -> list[int]:
        """Indices of the groups that decode this step: those of articles not paused."""
        return [i for i, group in enumerate(self.groups) if group.article.ticket not in paused]

    def _forward(self, group_indices: list[int], trim: bool = False
                 ) -> tuple[torch.Tensor, list[KV]]:
        """Logits and self-attention caches with this step's column for the rows of these
        groups (all of them, in order, for the normal step; the groups not paused; one
        article's when isolating a failure). `trim`: cut the caches to the columns these rows
        hold (the paused rows may hold more) and keep their sources for the next such step."""
        groups = [self.groups[i] for i in group_indices]
        everything = len(groups) == len(self.groups)
        self_kv = self._self_kv
        slot = 1 if self._slotted and self_kv is not None else 0
        if not everything and self_kv is not None:
            rows = self._row_index(group_indices)
            end = self_kv[0][0].shape[2] - slot
            start = end - max(g.length for g in groups) if trim else 0
            self_kv = [(k[:, :, start:end].index_select(0, rows),
                        v[:, :, start:end].index_select(0, rows)) for k, v in self_kv]
            slot = 0
        if everything:
            if self._cross is None:
                self._cross = self._cross_inputs(groups)
            cross, cross_valid, layout = self._cross
        elif trim:
            key = tuple(groups)
            if self._paused_cross is None or self._paused_cross[0] != key:
                self._paused_cross = (key, self._cross_inputs(groups))
            cross, cross_valid, layout = self._paused_cross[1]
        else:
            cross, cross_valid, layout = self._cross_inputs(groups)
        history = 0 if self_kv is None else self_kv[0][0].shape[2] - slot
        lengths = torch.tensor([g.length for g in groups for _ in range(g.width)],
                               device=self.device)
        columns = torch.arange(history + 1, device=self.device)
        self_valid = columns[None, :] >= (history - lengths)[:, None]
        tokens = torch.cat([g.tokens for g in groups])
        return self.adapter.step(tokens, lengths, self_kv or [], self_valid, cross, cross_valid,
                                 layout)

    def _cross_inputs(self, groups: list[_Group]
                      ) -> tuple[list[KV], torch.Tensor, CrossLayout]:
        """The sources these groups read, padded into one tensor per layer, their masks, and
        where each row's query goes. Rebuilt only when groups join or leave."""
        sources: list[_Source] = []
        slots: list[tuple[int, int]] = []  # (source index, query index) per row
        used: dict[int, int] = {}
        taken: list[int] = []  # queries per source so far
        for group in groups:
            index = used.get(id(group.source))
            if index is None:
                index = used[id(group.source)] = len(sources)
                sources.append(group.source)
                taken.append(0)
            slots += [(index, taken[index] + j) for j in range(group.width)]
            taken[index] += group.width
        width = max(j for _, j in slots) + 1
        longest = max(s.length for s in sources)
        layers = len(sources[0].kv)
        cross = [(torch.cat([_pad_to(s.kv[i][0], longest) for s in sources]),
                  torch.cat([_pad_to(s.kv[i][1], longest) for s in sources]))
                 for i in range(layers)]
        lengths = torch.tensor([s.length for s in sources], device=self.device)
        valid = torch.arange(longest, device=self.device)[None, :] < lengths[:, None]
        slot = torch.tensor([s * width + j for s, j in slots], device=self.device)
        return cross, valid, CrossLayout(slot, len(sources), width)

    def _row_index(self, group_indices: list[int]) -> torch.Tensor:
        starts, offset = [], 0
        for group in self.groups:
            starts.append(offset)
            offset += group.width
        return torch.cat([torch.arange(starts[i], starts[i] + self.groups[i].width)
                          for i in group_indices]).to(self.device)

    def _forward_isolating(self, error: BaseException, stepping: list[int]
                           ) -> tuple[torch.Tensor, list[KV], list[StepFailure]]:
        """The batched pass over the `stepping` groups raised: run each of their articles' rows
        alone; fail the ones that raise alone and drop their rows; return the others' results as
        if run together."""
        by_article: dict[int, list[int]] = {}
        for i in stepping:
            by_article.setdefault(id(self.groups[i].article), []).append(i)
        if len(by_article) == 1:
            article = self.groups[stepping[0]].article
            self._drop_article(article)
            return torch.empty(0), [], [_failure(article.ticket, error, "decoding")]
        log.warning("decoding step of %d articles failed (%s); stepping each alone",
                    len(by_article), type(error).__name__)
        # An article's groups are next to each other (they join together and keep their
        # order), so the survivors' results in article order are the rows in set order.
        failed, broken, results = [], [], []
        for indices in by_article.values():
            article = self.groups[indices[0]].article
            try:
                results.append(self._forward(indices))
            except Exception as alone:  # noqa: BLE001
                failed.append(_failure(article.ticket, alone, "decoding"))
                broken.append(article)
        for article in broken:
            self._drop_article(article)
        if not results:  # every article failed alone
            return torch.empty(0), [], failed
        logits = torch.cat([logits for logits, _ in results])
        merged = [(torch.cat([kv[i][0] for _, kv in results]),
                   torch.cat([kv[i][1] for _, kv in results]))
                  for i in range(len(results[0][1]))]
        return logits, merged, failed

    def _write_stepped_rows(self, merged: list[KV], stepping: list[int],
                            order: list[torch.Tensor]) -> bool:
        """After a step that left some groups out and where no group left: write the stepping
        rows' new caches (`merged`, reordered by `order`, their beams' parents) into the set's
        cache in place, right-aligned, so the paused rows' caches are not even copied. False
        (nothing written) when the stepping rows need more columns than the set's cache has.
        Columns left of a row's history may keep stale values: they are masked."""
        if self._self_kv is None or not order:
            return False
        width, total = merged[0][0].shape[2], self._self_kv[0][0].shape[2]
        if width > total:
            return False
        rows = self._row_index(stepping)
        parents = torch.cat(order)
        for (k, v), (k_new, v_new) in zip(self._self_kv, merged):
            k[rows, :, total - width:] = k_new.index_select(0, parents)
            v[rows, :, total - width:] = v_new.index_select(0, parents)
        return True

    def _with_paused_rows(self, merged: list[KV], stepping: list[int]) -> list[KV]:
        """The whole set's caches after a step that left some groups out: the stepping rows'
        caches with this step's column (`merged`, in order) and the paused rows' caches as they
        were, both right-aligned in one width, rows in set order. Nothing is recomputed."""
        chosen = set(stepping)
        paused = [i for i in range(len(self.groups)) if i not in chosen]
        history = max(self.groups[i].length for i in paused)  # columns the paused rows hold
        step_rows = self._row_index(stepping)
        paused_rows = self._row_index(paused)
        total = self.rows
        out: list[KV] = []
        for layer, new_kv in enumerate(merged):
            width = max(new_kv[0].shape[2], history)
            pair = []
            for part, new in enumerate(new_kv):
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

    # ----- leaving -----
    def _reorder(self, merged: list[KV], surviving: list[tuple[_Group, torch.Tensor]]) -> None:
        """From the caches with this step's column (`merged`), keep the surviving rows in their
        new order (each group's beam reordering and every finished group's exit in one gather
        per layer), and trim columns no row needs."""
        if not surviving:
            self.groups, self._self_kv, self._cross = [], None, None
            return
        order = torch.cat([rows for _, rows in surviving])
        total = sum(g.width for g in self.groups)
        identity = len(order) == total and bool(
            (order == torch.arange(total, device=order.device)).all())
        history = max(g.length for g, _ in surviving)
        width = merged[0][0].shape[2]
        start = width - history
        if identity:
            self._self_kv = [(k[:, :, start:], v[:, :, start:]) if start else (k, v)
                             for k, v in merged]
            self._slotted = False
        else:
            # One copy per layer: the kept rows, in their new order, into a cache with a free
            # last column that the next step writes in place.
            self._self_kv = [(_gather_slotted(k, order, start), _gather_slotted(v, order, start))
                             for k, v in merged]
            self._slotted = True
        if len(surviving) != len(self.groups):
            self._cross = None  # sources are per source, not per row: rebuilt for who is left
            self._paused_cross = None
        self.groups = [g for g, _ in surviving]

    def _drop_article(self, article: _Article) -> None:
        kept = [i for i, group in enumerate(self.groups) if group.article is not article]
        groups = [self.groups[i] for i in kept]
        if not groups:
            self.groups, self._self_kv, self._cross = [], None, None
            self._articles.pop(article.ticket, None)
            return
        keep = self._row_index(kept)
        self._unslot()
        if self._self_kv is not None:
            history = max(g.length for g in groups)
            self._self_kv = [(k.index_select(0, keep)[:, :, k.shape[2] - history:],
                              v.index_select(0, keep)[:, :, v.shape[2] - history:])
                             for k, v in self._self_kv]
            if history == 0:
                self._self_kv = None
        self._cross = None
        self.groups = groups
        # Forgotten last: if a copy above raised, the article is still removable.
        self._articles.pop(article.ticket, None)

    def _remove(self, ticket: int) -> None:
        article = self._articles.get(ticket)
        if article is None:
            return
        if article in self._waiting:
            self._waiting.remove(article)
            self._forget(article)
        else:
            self._drop_article(article)

    def _forget(self, article: _Article) -> None:
        self._articles.pop(article.ticket, None)

    def _unslot(self) -> None:
        """The cache without its free slot column (views, nothing copied)."""
        if self._slotted and self._self_kv is not None:
            self._self_kv = [(k[:, :, :-1], v[:, :, :-1]) for k, v in self._self_kv]
        self._slotted = False


def _gather_slotted(x: torch.Tensor, order: torch.Tensor, start: int) -> torch.Tensor:
    """Rows `order` of `x`'s columns from `start`, in a new tensor one column wider: the last
    column is left free (not initialised) for the next step to write."""
    width = x.shape[2] - start
    out = x.new_empty((order.shape[0], x.shape[1], width + 1, x.shape[3]))
    torch.index_select(x[:, :, start:], 0, order, out=out[:, :, :width])
    return out


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[2] == length:
        return x
    pad = x.new_zeros((x.shape[0], x.shape[1], length - x.shape[2], x.shape[3]))
    return torch.cat((x, pad), 2)


def _generated(article: _Article) -> Generated:
    summary, summary_tokens = article.texts.get("summary", ("", 0))
    headline, headline_tokens = article.texts.get("headline", ("", 0))
    return Generated(summary=summary, headline=headline, summary_tokens=summary_tokens,
                     headline_tokens=headline_tokens)


def _failure(ticket: int, error: BaseException, where: str) -> StepFailure:
    if is_out_of_memory(error):
        return StepFailure(ticket, "out_of_memory",
                           f"the model ran out of memory {where} this article; retry later, or "
                           "send a shorter article or ask for fewer beams", type(error).__name__)
    log.error("article failed in %s (%s)", where, type(error).__name__, exc_info=error)
    return StepFailure(ticket, "error", f"the model failed in {where} this article",
                       type(error).__name__)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"

