"""One worker's decoding session: sequence groups that join and leave between decoding steps.

`TorchSession.advance(StepIn)` is one iteration of the loop (the serving side calls it
back to back; see service/serving/continuous.py):

1. drop removed tickets (waiting or decoding; their rows and cache are freed at once);
2. queue new articles; refuse at once one whose cache could never fit the budget (`too_large`);
3. admit waiting articles, most urgent class first (`Admit.priority`), then in arrival order,
   while the budget has room and the encoder slice (`max_encode_tokens_per_step`) is not used up
   (at least one article per call): each distinct input is encoded on its own (unpadded, so its
   encoding does not depend on what is encoded beside it); an article's encoder output and each
   decoder layer's cross-attention keys and values (a "source") are computed once and serve
   every beam of its summary and of its headline (when both read the same input); each
   (article, output) becomes a group of `beams` rows that joins the running set, and the rows of
   one source are kept next to each other;
4. decode one step for every row of every group in one forward pass (rows at different lengths,
   with different options: see decoders.py), except the rows of paused tickets (`StepIn.pause`):
   they sit the step out, their caches and search state untouched (see running.py);
5. each group picks its rows' next tokens and parents (search.py), then the running set applies
   every group's beam reordering and drops the rows of groups that finished (one gather per
   layer);
6. an article whose outputs are all done is returned.

Who owns what: this class keeps admission (the waiting line, the budget, encoder slices),
search and failure isolation, and orchestrates; the rows, their self-attention caches, the
sources and their slot layout belong to the running set (`running.RunningSet`), which knows
nothing of search or isolation. `_articles` (by ticket) is the engine's side of the articles in
flight, waiting or decoding; it lives in the worker process and mirrors what the serving side's
`ContinuousExecutor` holds (the one owner of the articles in flight, see continuous.py):
`StepOut.active + waiting` must equal what the executor holds (`--check-invariants`).

Memory: each row holds its self-attention keys/values, padded to the longest row (right-aligned);
each source holds its cross-attention keys/values once, at its own length. The budget counts the
worst case of the set, for what is decoding plus the article being admitted: (rows x longest max
length + the sources' tokens) x bytes per token; the article waits until that fits.

Pausing: a paused article produces exactly the tokens it would produce unpaused (running.py says
how its caches are kept). A paused article that is still waiting is not admitted (its encoding
sits the step out too).

Encoder slicing: a burst of long articles is encoded a slice at a time, one slice per call, so
the rows already decoding step between slices instead of stalling behind the whole burst, and the
most urgent articles are encoded first. A slice holds articles while their encoder tokens
(the distinct inputs' lengths added up) stay within `max_encode_tokens_per_step`; 0: no cap.

Failure isolation: a group whose search raises fails its article only; if an encoder pass or the
batched decoder pass raises, each article is run alone to find which one fails, the others go on.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ...domain import Generated, GenerationParams, PreparedArticle
from ...errors import is_out_of_memory
from ..protocol import Admit, StepFailure, StepIn, StepOut
from .decoders import KV, Adapter
from .running import RunningSet, Source
from .search import Search, advance_all, hf_setup, new_search

log = logging.getLogger(__name__)

OUTPUTS = ("summary", "headline")


class _Reserve(NamedTuple):
    """What an article's groups need of the cache: `rows` of `self_len` tokens of self-attention
    (padded to the set's longest when counted for a set) and `source_tokens` of cross-attention
    (its sources x its longest input: each source is held at its own length)."""

    rows: int
    self_len: int
    source_tokens: int


@dataclass(eq=False)
class _Article:
    ticket: int
    params: GenerationParams
    article: PreparedArticle
    inputs: dict[str, tuple[int, ...]]
    """Encoder input ids per output ("summary", "headline")."""
    reserve: _Reserve
    """What its groups need of the cache."""
    order: tuple[int, int] = (1, 0)
    """Its place in the waiting line: (priority class, arrival number); smallest first."""
    groups: list[_Group] = field(default_factory=list)
    texts: dict[str, tuple[str, int]] = field(default_factory=dict)


@dataclass(eq=False)
class _Group:
    """One (article, output): `width` rows (its beams) in the running set, and their search."""

    article: _Article
    output: str
    search: Search
    width: int
    source: Source
    tokens: torch.Tensor
    """The tokens its rows feed to the next step: [width]."""
    length: int = 0
    """Tokens its rows hold in the self-attention cache."""


class TorchSession:
    """Admission, search and failure isolation around one `RunningSet` (the module docstring
    says who owns what). Used by one thread."""

    def __init__(self, *, adapter: Adapter, model: Any, device: Any, budget_bytes: int,
                 generation_config: Callable[[str, GenerationParams], Any],
                 decode: Callable[[list[int], str], tuple[str, int]],
                 max_encode_tokens_per_step: int = 0) -> None:
        """`generation_config(output, params)`: the config the static engine would pass to
        generate for that output; `decode(ids, output)`: text and token count;
        `max_encode_tokens_per_step`: the encoder slice (input tokens; 0: no cap)."""
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
        self._articles: dict[int, _Article] = {}
        """The articles in flight here, waiting or decoding, by ticket."""
        self.running: RunningSet[_Group] = RunningSet(device)

    # ----- sizes -----
    @property
    def rows(self) -> int:
        return self.running.rows

    def _bytes(self, need: _Reserve) -> int:
        return (need.rows * need.self_len + need.source_tokens) * self.adapter.bytes_per_token()

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
            failed += self._encode_and_join(paused)
            paused_rows = sum(g.width for g in self.running.groups if g.article.ticket in paused)
            rows = self.rows - paused_rows
            if rows:
                done, failed_in_step = self._step(paused)
                failed += failed_in_step
            worked = rows or len(self._waiting) != waiting_before
            elapsed = time.perf_counter() - started if worked else 0.0
        return StepOut(done=tuple(done), failed=tuple(failed), waiting=len(self._waiting),
                       active=len(_articles_of(self.running.groups)), rows=rows,
                       step_s=elapsed, used_bytes=self.used_bytes(),
                       budget_bytes=self.budget_bytes, paused_rows=paused_rows,
                       encode_deferred=self._deferred)

    # ----- admission: queue (`StepIn.admit`), then encode and join when there is room -----
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
                         reserve=_Reserve(rows, longest, sources * source),
                         order=(admit.priority, next(self._arrivals)))
        need = self._bytes(state.reserve)
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

    def _encode_and_join(self, paused: frozenset[int] = frozenset()) -> list[StepFailure]:
        """Encode and join waiting articles in line order (most urgent class first), skipping
        paused ones, while the budget has room and the encoder slice lasts."""
        joining: list[_Article] = []
        self._deferred = 0
        line = [a for a in self._waiting if a.ticket not in paused]
        for position, candidate in enumerate(line):
            fits = self._reserved_with(joining + [candidate]) <= self.budget_bytes
            if not fits and (self.running.groups or joining):
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
                self._join_groups(article, encoded[article.ticket])
            except Exception as error:  # noqa: BLE001 - this article fails alone
                failed.append(_failure(article.ticket, error, "setting up"))
                self._drop(article)
        return failed

    def _within_encode_slice(self, articles: list[_Article]) -> bool:
        """Whether encoding `articles` stays within the slice: their distinct inputs' tokens."""
        if not self.max_encode_tokens_per_step:
            return True
        inputs = {ids for article in articles for ids in article.inputs.values()}
        return sum(len(ids) for ids in inputs) <= self.max_encode_tokens_per_step

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
        """The cache the running set's articles and `extra` need together, padded."""
        articles = {id(g.article): g.article for g in self.running.groups}
        for a in extra:
            articles[id(a)] = a
        needs = [a.reserve for a in articles.values()]
        return self._bytes(_Reserve(rows=sum(n.rows for n in needs),
                                    self_len=max((n.self_len for n in needs), default=0),
                                    source_tokens=sum(n.source_tokens for n in needs)))

    def _encode(self, articles: list[_Article]
                ) -> tuple[dict[int, dict[tuple[int, ...], Source]], list[StepFailure]]:
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

    def _encode_batch(self, articles: list[_Article]) -> dict[int, dict[tuple, Source]]:
        """Each distinct input encoded alone (no padding: its keys and values, and so its
        article's tokens, do not depend on the inputs encoded beside it)."""
        sources: dict[tuple[int, ...], Source] = {}
        for article in articles:
            for row in article.inputs.values():
                if row not in sources:
                    sources[row] = self._encode_one(row)
        return {article.ticket: {row: sources[row] for row in article.inputs.values()}
                for article in articles}

    def _encode_one(self, row: tuple[int, ...]) -> Source:
        ids = torch.tensor([row], dtype=torch.long, device=self.device)
        hidden = self.adapter.encode(ids, torch.ones_like(ids))
        kv = self.adapter.cross_kv(hidden)
        return Source(kv=[(k.contiguous(), v.contiguous()) for k, v in kv], length=len(row))

    def _join_groups(self, article: _Article, sources: dict[tuple, Source]) -> None:
        """The article's groups join the running set, one per output, reading `sources`."""
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
            self.running.join(group)

    # ----- one step -----
    def _step(self, paused: frozenset[int]
              ) -> tuple[list[tuple[int, Generated]], list[StepFailure]]:
        """Decode one step for the groups not paused. Returns the articles done and failed."""
        logits, new_kv, stepping, failed = self._forward(paused)
        if not stepping:
            return [], failed
        kept, broken, failed_in_search = self._search(logits, stepping)
        done = self._finished(broken)
        return done, failed + failed_in_search + self._keep(new_kv, stepping, kept)

    def _stepping(self, paused: frozenset[int]) -> list[int]:
        """Indices of the groups that decode this step: those of articles not paused."""
        return [i for i, group in enumerate(self.running.groups)
                if group.article.ticket not in paused]

    def _forward(self, paused: frozenset[int]
                 ) -> tuple[torch.Tensor, list[KV], list[int], list[StepFailure]]:
        """Logits and self-attention caches with this step's column for the rows of the groups
        not paused, and those groups' indices; if the batched pass raises, the articles that
        fail alone are failed and leave (see `_isolate`)."""
        stepping = self._stepping(paused)
        try:
            logits, new_kv = self._pass(stepping, trim=len(stepping) != len(self.running))
            return logits, new_kv, stepping, []
        except Exception as error:  # noqa: BLE001 - isolated below
            logits, new_kv, failed = self._isolate(error, stepping)
            return logits, new_kv, self._stepping(paused), failed

    def _pass(self, indices: list[int], trim: bool = False) -> tuple[torch.Tensor, list[KV]]:
        """One forward pass over the rows of the groups `indices` (running.py: `step_inputs`)."""
        return self.adapter.step(*self.running.step_inputs(indices, trim=trim).args())

    def _isolate(self, error: BaseException, stepping: list[int]
                 ) -> tuple[torch.Tensor, list[KV], list[StepFailure]]:
        """The batched pass over the `stepping` groups raised: run each of their articles' rows
        alone; fail the ones that raise alone and drop their rows; return the others' results as
        if run together."""
        groups = self.running.groups
        by_article: dict[int, list[int]] = {}
        for i in stepping:
            by_article.setdefault(id(groups[i].article), []).append(i)
        if len(by_article) == 1:
            article = groups[stepping[0]].article
            self._drop(article)
            return torch.empty(0), [], [_failure(article.ticket, error, "decoding")]
        log.warning("decoding step of %d articles failed (%s); stepping each alone",
                    len(by_article), type(error).__name__)
        # An article's groups are next to each other (they join together and keep their
        # order), so the survivors' results in article order are the rows in set order.
        failed, broken, results = [], [], []
        for indices in by_article.values():
            article = groups[indices[0]].article
            try:
                results.append(self._pass(indices))
            except Exception as alone:  # noqa: BLE001
                failed.append(_failure(article.ticket, alone, "decoding"))
                broken.append(article)
        for article in broken:
            self._drop(article)
        if not results:  # every article failed alone
            return torch.empty(0), [], failed
        logits = torch.cat([logits for logits, _ in results])
        new_kv = [(torch.cat([kv[i][0] for _, kv in results]),
                   torch.cat([kv[i][1] for _, kv in results]))
                  for i in range(len(results[0][1]))]
        return logits, new_kv, failed

    def _search(self, logits: torch.Tensor, stepping: list[int]
                ) -> tuple[dict[int, torch.Tensor | None], set[int], list[StepFailure]]:
        """Each stepping group picks its rows' next tokens and parents from its rows' logits.
        Returns the groups that go on (by index: their rows' parents; None: paused), the
        articles (ids) whose search raised, and their failures."""
        kept: dict[int, torch.Tensor | None] = {}
        broken: set[int] = set()
        failed: list[StepFailure] = []
        groups = self.running.groups
        # Every stepping group's search at once (search.advance_all batches alike beam groups;
        # the logits are the stepping groups' rows in order); a group whose own search raised
        # gets its exception back.
        outcomes = dict(zip(stepping, advance_all([groups[i].search for i in stepping], logits),
                            strict=True))
        for i, group in enumerate(groups):
            if i not in outcomes:  # sits this step out: rows kept as they are
                kept[i] = None
                continue
            outcome = outcomes[i]
            try:
                if isinstance(outcome, Exception):
                    raise outcome
                tokens, parents = outcome
                if group.search.finished:
                    text = self._decode(group.search.result(), group.output)
            except Exception as error:  # noqa: BLE001 - this group's article fails alone
                failed.append(_failure(group.article.ticket, error, "search"))
                broken.add(id(group.article))
                continue
            if group.search.finished:
                group.article.texts[group.output] = text
            else:
                group.tokens = tokens
                kept[i] = parents
        # Groups of an article that failed leave with it.
        return ({i: p for i, p in kept.items() if id(groups[i].article) not in broken},
                broken, failed)

    def _finished(self, broken: set[int]) -> list[tuple[int, Generated]]:
        """Forget the articles whose search failed, and return (and forget) the ones whose
        outputs are all done."""
        done = []
        for article in _articles_of(self.running.groups):
            if id(article) in broken:
                self._forget(article)
            elif len(article.texts) == len(article.inputs) and article.ticket in self._articles:
                self._forget(article)
                done.append((article.ticket, _generated(article)))
        return done

    def _keep(self, new_kv: list[KV], stepping: list[int],
              kept: dict[int, torch.Tensor | None]) -> list[StepFailure]:
        """The running set keeps the groups that go on (running.py: `after_step`)."""
        going_on = _articles_of([self.running.groups[i] for i in kept])
        try:
            self.running.after_step(new_kv, stepping, kept)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory copying the cache
            # The set's cache could not be rebuilt: the articles still decoding fail (the ones
            # done in this step are delivered) and the set starts over empty, so no group of a
            # delivered or failed article stays behind.
            self.running.clear()
            for article in going_on:
                self._forget(article)
            return [_failure(article.ticket, error, "decoding") for article in going_on]
        return []

    # ----- leaving -----
    def _drop(self, article: _Article) -> None:
        """The article leaves: its groups' rows leave the running set, then it is forgotten
        (last: if a copy raised, the article is still removable)."""
        self.running.filter(lambda group: group.article is not article)
        self._forget(article)

    def _remove(self, ticket: int) -> None:
        article = self._articles.get(ticket)
        if article is None:
            return
        if article in self._waiting:
            self._waiting.remove(article)
            self._forget(article)
        else:
            self._drop(article)

    def _forget(self, article: _Article) -> None:
        self._articles.pop(article.ticket, None)


def _articles_of(groups: list[_Group]) -> list[_Article]:
    """The articles of these groups, once each, in the groups' order."""
    return list({id(g.article): g.article for g in groups}.values())


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

