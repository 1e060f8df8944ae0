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
    per group and per step these small costs add up (generate pays them once per batch)."""

    def __init__(self, min_length: int, skip: int, eos: torch.Tensor) -> None:
        self.min_length = min_length
        self.skip = skip
        self.eos = eos.reshape(-1).tolist()

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[-1] - self.skip < self.min_length:
            scores = scores.clone()
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

    def advance(self, logits):
        m = self.model
        beams = self.width
        cur_len = self.length
        flat = self.running[0, :, :cur_len]
        log_probs = nn.functional.log_softmax(logits, dim=-1)
        log_probs = self.setup.processors(flat, log_probs)
        log_probs = log_probs.reshape(1, beams, -1) + self.running_scores[:, :, None]
        log_probs = log_probs.reshape(1, -1)
        topk_log_probs, topk_running, topk_indices = m._get_top_k_continuations(
            accumulated_log_probs=log_probs, running_sequences=self.running,
            running_beam_indices=self.running_indices, cur_len=cur_len, decoder_prompt_len=1,
            do_sample=False, beams_to_keep=self.beams_to_keep, num_beams=beams, batch_size=1)
        hits = self.setup.stopping(topk_running[0, :, :cur_len + 1], None)
        self.hits = hits.reshape(1, self.beams_to_keep)
        self.running, self.running_scores, self.running_indices = (
            m._get_running_beams_for_next_iteration(
                topk_log_probs=topk_log_probs, topk_running_sequences=topk_running,
                topk_running_beam_indices=topk_indices,
                next_token_hits_stopping_criteria=self.hits, num_beams=beams))
        self.sequences, self.scores, self.indices, self.is_finished = m._update_finished_beams(
            sequences=self.sequences, topk_running_sequences=topk_running,
            beam_scores=self.scores, topk_log_probs=topk_log_probs, beam_indices=self.indices,
            topk_running_beam_indices=topk_indices,
            is_early_stop_heuristic_unsatisfied=self.improvable,
            is_sent_finished=self.is_finished, next_token_hits_stopping_criteria=self.hits,
            top_num_beam_mask=self.top_mask, num_beams=beams, cur_len=cur_len,
            decoder_prompt_len=1, length_penalty=self.length_penalty,
            early_stopping=self.early_stopping)
        parents = self.running_indices[0, :, cur_len - 1].long()
        tokens = self.running[0, :, cur_len]
        self.length = cur_len = cur_len + 1
        self.improvable = m._check_early_stop_heuristic(
            is_early_stop_heuristic_unsatisfied=self.improvable,
            running_beam_scores=self.running_scores, beam_scores=self.scores,
            is_sent_finished=self.is_finished, cur_len=cur_len,
            max_length=self.setup.max_length, decoder_prompt_len=1,
            early_stopping=self.early_stopping, length_penalty=self.length_penalty)
        going = m._beam_search_has_unfinished_sequences(
            self.improvable, self.is_finished, self.hits, self.early_stopping)
        # generate's loop also ends at max_length (its `_has_unfinished_sequences` with the
        # stopping criteria); the hits above carry it.
        self.finished = not bool(going) or cur_len >= self.setup.max_length
        return tokens, parents

    def result(self):
        generated = int(((self.indices[0, 0] + 1).bool()).sum())
        return self.sequences[0, 0, :1 + generated].tolist()


def new_search(setup: Setup, model: Any, device: Any) -> Search:
    if int(setup.config.num_beams) > 1:
        return Beams(setup, model, device)
    return Greedy(setup, device)
