"""One sequence group's search: greedy or beam search for one (article, output), step by step.

A group owns `width` rows of the running set (its beams; 1 for greedy) and decides, from those
rows' logits, each row's next token and which row it continues (its parent). The rules are
transformers' own, so a group's tokens equal `generate` run on that request alone:

- its logits processors and stopping criteria are built by the model's own `generate` helpers from
  the same generation config the static engine passes to `generate` (`hf_setup`): forced first
  token, min/max new tokens, no-repeat n-grams, and whatever else the checkpoint's config asks;
- beam search calls the model's own beam helpers (`_get_top_k_continuations`,
  `_update_finished_beams`, `_check_early_stop_heuristic`, ...) on the group as a batch of one, so
  length-penalty normalisation, the early-stopping heuristic and the 2 x beams candidate rule are
  exactly the pinned version's (transformers #20901 describes how they differ between versions);
- greedy follows `generate`'s greedy path: processors on the raw logits, then argmax.

A step advances all groups at once (`advance_all`): beam groups with the same beam count, length,
max length and scoring options (`Beams.key`) go through those helpers as one batch, as `generate`
steps a batch of articles (one log-softmax, one top-k, one pass of the bookkeeping instead of one
per group); every operation is row-wise, so each group gets exactly what it gets alone
(tests/test_search_batched.py). Each group's own logits processors and stopping criteria still
run on its own rows.

These are private helpers of transformers; the exactness tests (tests/test_continuous_exact.py)
catch a version that changes them.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Setup:
    """What transformers' generate prepares for one request: processors, stopping criteria,
    lengths and special tokens."""

    config: Any
    processors: Any
    stopping: Any
    max_length: int
    """Decoder length at which the group stops: the start token plus max new tokens."""
    start_token: int
    eos: torch.Tensor | None
    pad: int


def hf_setup(model: Any, config: Any, encoder_ids: torch.Tensor) -> Setup:
    """Run generate's preparation (transformers' `GenerationMixin.generate`, steps 1-8) for a
    batch of one, without running it."""
    from transformers import LogitsProcessorList, StoppingCriteriaList

    defaults = model.generation_config
    has_default_max_length = config.max_length is None and defaults.max_length is None
    has_default_min_length = config.min_length is None and defaults.min_length is None
    config, _ = model._prepare_generation_config(copy.deepcopy(config))
    mode = config.get_generation_mode()
    if str(getattr(mode, "value", mode)) not in ("greedy_search", "beam_search"):
        # e.g. a checkpoint whose generation config asks for group or contrastive search: this
        # loop runs greedy and plain beam search only, and must not silently write otherwise.
        raise ValueError(f"continuous batching runs greedy and beam search only, not {mode}")
    device = encoder_ids.device
    model._prepare_special_tokens(config, True, device=device, batch_size=1)
    config = model._prepare_generated_length(
        generation_config=config, has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length, model_input_name="input_ids",
        input_ids_length=1, inputs_tensor=encoder_ids)
    processors = model._get_logits_processor(
        generation_config=config, input_ids_seq_length=1, encoder_input_ids=encoder_ids,
        prefix_allowed_tokens_fn=None, logits_processor=LogitsProcessorList(), device=device,
        model_kwargs={})
    processors = LogitsProcessorList(_faster(p) for p in processors)
    stopping = model._get_stopping_criteria(generation_config=config,
                                            stopping_criteria=StoppingCriteriaList())
    eos = config._eos_token_tensor
    pad = config._pad_token_tensor
    start = config._decoder_start_token_tensor
    start_token = (int(start.reshape(-1)[0]) if start is not None
                   else int(config.decoder_start_token_id))
    fill = int(pad) if pad is not None else (int(eos.reshape(-1)[0]) if eos is not None else -1)
    return Setup(config=config, processors=processors, stopping=stopping,
                 max_length=int(config.max_length), start_token=start_token, eos=eos, pad=fill)


class _MinLength:
    """transformers' MinLength/MinNewTokensLength processors with the same output, without their
    per-call `arange` + `isin` over the vocabulary and the copy once the minimum is reached:
    per group and per step these small costs add up (generate pays them once per batch).
    It writes into `scores` instead of a copy ([rows, vocabulary] each step while the minimum is
    not reached): the searches own the scores they pass (a log-softmax they computed, or the
    group's own rows of the step's logits, read by nothing else)."""

    def __init__(self, min_length: int, skip: int, eos: torch.Tensor) -> None:
        self.min_length = min_length
        self.skip = skip
        self.eos = eos.reshape(-1).tolist()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.skip < self.min_length:
            scores[:, self.eos] = -math.inf
        return scores


def _faster(processor: Any) -> Any:
    from transformers import MinLengthLogitsProcessor, MinNewTokensLengthLogitsProcessor

    if type(processor) is MinLengthLogitsProcessor:
        return _MinLength(processor.min_length, 0, processor.eos_token_id)
    if type(processor) is MinNewTokensLengthLogitsProcessor:
        return _MinLength(processor.min_new_tokens, processor.prompt_length_to_skip,
                          processor.eos_token_id)
    return processor


class Search:
    """The state of one group's search. `advance(logits)` takes the logits of its rows (float,
    [width, vocab]) and returns (next tokens, parent row per new row), both [width], with
    `finished` set once the group is done; `result()` is then the output's token ids."""

    width: int
    finished: bool = False

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def result(self) -> list[int]:
        raise NotImplementedError


class Greedy(Search):
    def __init__(self, setup: Setup, device: Any) -> None:
        self.setup = setup
        self.width = 1
        self.ids = torch.full((1, setup.max_length), setup.pad, dtype=torch.long, device=device)
        self.ids[0, 0] = setup.start_token
        self.length = 1
        self._parent = torch.zeros(1, dtype=torch.long, device=device)

    def advance(self, logits):
        setup = self.setup
        ids = self.ids[:, :self.length]
        scores = setup.processors(ids, logits)
        token = torch.argmax(scores, dim=-1)
        self.ids[0, self.length] = token[0]
        self.length += 1
        done = setup.stopping(self.ids[:, :self.length], None)
        self.finished = bool(done[0]) or self.length >= setup.max_length
        return token, self._parent

    def result(self):
        return self.ids[0, :self.length].tolist()


class Beams(Search):
    """transformers' vectorised beam search (`GenerationMixin._beam_search`), one step per call,
    for a batch of one."""

    def __init__(self, setup: Setup, model: Any, device: Any) -> None:
        self.setup = setup
        self.model = model
        config = setup.config
        beams = self.width = int(config.num_beams)
        self.length_penalty = config.length_penalty
        self.early_stopping = config.early_stopping
        n_eos = setup.eos.shape[0] if setup.eos is not None else 0
        self.beams_to_keep = max(2, 1 + n_eos) * beams
        self.top_mask = torch.cat((torch.ones(beams, dtype=torch.bool),
                                   torch.zeros(self.beams_to_keep - beams, dtype=torch.bool))
                                  ).to(device)
        max_length = setup.max_length
        self.running = torch.full((1, beams, max_length), setup.pad, dtype=torch.int64,
                                  device=device)
        self.running[:, :, 0] = setup.start_token
        self.sequences = self.running.clone()
        self.running_scores = torch.zeros((1, beams), dtype=torch.float, device=device)
        self.running_scores[:, 1:] = -1e9
        self.scores = torch.full((1, beams), -1e9, dtype=torch.float, device=device)
        self.is_finished = torch.zeros((1, beams), dtype=torch.bool, device=device)
        self.improvable = torch.ones((1, 1), dtype=torch.bool, device=device)
        self.hits = torch.zeros((1, beams), dtype=torch.bool, device=device)
        self.running_indices = torch.full((1, beams, max_length - 1), -1, dtype=torch.int32,
                                          device=device)
        self.indices = self.running_indices.clone()
        self.length = 1

    def key(self) -> tuple[Any, ...]:
        """Groups with equal keys advance as one batch (`advance_all`): the same beam count,
        length, max length and scoring options, so transformers' helpers take them as a batch."""
        return (self.width, self.beams_to_keep, self.length, self.setup.max_length,
                self.length_penalty, self.early_stopping, str(self.running.device))

    def advance(self, logits):
        return _advance_beams([self], nn.functional.log_softmax(logits, dim=-1))[0]

    def result(self):
        generated = int(((self.indices[0, 0] + 1).bool()).sum())
        return self.sequences[0, 0, :1 + generated].tolist()


def _advance_beams(batch: list[Beams], log_probs: torch.Tensor
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One step of several beam groups with equal `Beams.key()`, as transformers' vectorised
    beam search steps a batch: `log_probs` [groups x beams, vocab] (the log-softmax of their
    logits, which this overwrites), the groups' rows one after the other. Every operation is
    row-wise (top-k per group, gathers), so each group gets what it gets as a batch of one.
    The groups' state is replaced only once everything has been computed: if this raises, no
    group has moved."""
    first = batch[0]
    m = first.model
    beams, keep, cur_len = first.width, first.beams_to_keep, first.length
    size = len(batch)
    for g, search in enumerate(batch):
        part = log_probs[g * beams:(g + 1) * beams]
        scored = search.setup.processors(search.running[0, :, :cur_len], part)
        if scored is not part:
            part.copy_(scored)

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors) if size > 1 else tensors[0]

    running = cat([s.running for s in batch])
    running_scores = cat([s.running_scores for s in batch])
    running_indices = cat([s.running_indices for s in batch])
    log_probs = log_probs.view(size, beams, -1).add_(running_scores[:, :, None])
    topk_log_probs, topk_running, topk_indices = m._get_top_k_continuations(
        accumulated_log_probs=log_probs.view(size, -1), running_sequences=running,
        running_beam_indices=running_indices, cur_len=cur_len, decoder_prompt_len=1,
        do_sample=False, beams_to_keep=keep, num_beams=beams, batch_size=size)
    if size > 1:
        # transformers numbers beams across the batch (group g's beam b is g * beams + b);
        # a group's own numbering is the batch-of-one one.
        offsets = torch.arange(size, device=log_probs.device)[:, None] * beams
        topk_indices[:, :, cur_len - 1] -= offsets.to(topk_indices.dtype)
    hits = torch.cat([s.setup.stopping(topk_running[g, :, :cur_len + 1], None)
                      .reshape(1, keep) for g, s in enumerate(batch)])
    new_running, new_running_scores, new_running_indices = (
        m._get_running_beams_for_next_iteration(
            topk_log_probs=topk_log_probs, topk_running_sequences=topk_running,
            topk_running_beam_indices=topk_indices,
            next_token_hits_stopping_criteria=hits, num_beams=beams))
    improvable = cat([s.improvable for s in batch])
    sequences, scores, indices, is_finished = m._update_finished_beams(
        sequences=cat([s.sequences for s in batch]), topk_running_sequences=topk_running,
        beam_scores=cat([s.scores for s in batch]), topk_log_probs=topk_log_probs,
        beam_indices=cat([s.indices for s in batch]),
        topk_running_beam_indices=topk_indices,
        is_early_stop_heuristic_unsatisfied=improvable,
        is_sent_finished=cat([s.is_finished for s in batch]),
        next_token_hits_stopping_criteria=hits, top_num_beam_mask=first.top_mask,
        num_beams=beams, cur_len=cur_len, decoder_prompt_len=1,
        length_penalty=first.length_penalty, early_stopping=first.early_stopping)
    parents = new_running_indices[:, :, cur_len - 1].long()
    tokens = new_running[:, :, cur_len]
    improvable = m._check_early_stop_heuristic(
        is_early_stop_heuristic_unsatisfied=improvable,
        running_beam_scores=new_running_scores, beam_scores=scores,
        is_sent_finished=is_finished, cur_len=cur_len + 1,
        max_length=first.setup.max_length, decoder_prompt_len=1,
        early_stopping=first.early_stopping, length_penalty=first.length_penalty)
    # transformers' `_beam_search_has_unfinished_sequences`, per group instead of for the
    # whole batch: (a) improvement possible, (b) an open beam (with early_stopping=True),
    # (c) a continuation that does not hit the stopping criteria.
    going = (improvable.any(dim=-1)
             & ~(is_finished.all(dim=-1) & (first.early_stopping is True))
             & ~hits.all(dim=-1)).tolist()
    # generate's loop also ends at max_length (its `_has_unfinished_sequences` with the
    # stopping criteria); the hits above carry it.
    at_end = cur_len + 1 >= first.setup.max_length
    out = []
    for g, search in enumerate(batch):
        here = slice(g, g + 1)
        search.running, search.running_scores = new_running[here], new_running_scores[here]
        search.running_indices = new_running_indices[here]
        search.sequences, search.scores = sequences[here], scores[here]
        search.indices, search.is_finished = indices[here], is_finished[here]
        search.improvable, search.hits = improvable[here], hits[here]
        search.length = cur_len + 1
        search.finished = not going[g] or at_end
        out.append((tokens[g], parents[g]))
    return out


Outcome = tuple[torch.Tensor, torch.Tensor] | Exception


def advance_all(searches: list[Search], logits: torch.Tensor) -> list[Outcome]:
    """Advance every group of a step: `logits` holds their rows one group after the other, in
    the order of `searches`. Beam groups with equal keys advance as one batch (one log-softmax,
    one top-k, one pass of transformers' beam helpers instead of one per group), each with the
    result it gets alone; greedy groups one at a time. Returns, per group, its (next tokens,
    parents) or the exception its own search raised: when a batch raises, its groups advance
    one at a time again so that only the group that fails alone fails."""
    outcomes: list[Outcome | None] = [None] * len(searches)
    rows: list[slice] = []
    offset = 0
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, search in enumerate(searches):
        rows.append(slice(offset, offset + search.width))
        offset += search.width
        if isinstance(search, Beams):
            batches.setdefault(search.key(), []).append(i)
        else:
            batches[("alone", i)] = [i]
    for members in batches.values():
        if len(members) > 1:
            try:
                start, stop = rows[members[0]].start, rows[members[-1]].stop
                if stop - start == sum(searches[i].width for i in members):  # contiguous
                    chosen = logits[start:stop]
                else:
                    index = torch.cat([torch.arange(rows[i].start, rows[i].stop)
                                       for i in members]).to(logits.device)
                    chosen = logits.index_select(0, index)
                batched = _advance_beams([searches[i] for i in members],  # type: ignore[misc]
                                         nn.functional.log_softmax(chosen, dim=-1))
            except Exception:  # noqa: BLE001 - found below, one group at a time
                log.debug("batched beam step failed; advancing its groups one at a time")
            else:
                for i, outcome in zip(members, batched):
                    outcomes[i] = outcome
                continue
        for i in members:
            try:
                outcomes[i] = searches[i].advance(logits[rows[i]])
            except Exception as error:  # noqa: BLE001 - this group's article fails alone
                outcomes[i] = error
    return outcomes  # type: ignore[return-value]


def new_search(setup: Setup, model: Any, device: Any) -> Search:
    if int(setup.config.num_beams) > 1:
        return Beams(setup, model, device)
    return Greedy(setup, device)
