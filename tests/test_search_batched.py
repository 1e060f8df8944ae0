"""Beam groups advance as one batch (service/engines/stepping/search.py `advance_all`): groups
with the same beam count, length and scoring options share one log-softmax, one top-k and one
pass of transformers' beam helpers per step, and each gets exactly what it gets alone."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from service.domain import Outputs
from service.engines.protocol import Admit, StepIn
from service.engines.stepping import search as search_module
from service.engines.stepping.search import advance_all, hf_setup, new_search
from tests import test_continuous_exact as exact
from tests.test_continuous_exact import check_exact, request, run, session

engines = exact.engines


def _searches(engine, options: list[dict]) -> list:
    model = engine.summary.model
    out = []
    for fixed in options:
        params = dataclasses.replace(engine.defaults, **fixed)
        config = engine.output_config("summary", params)
        setup = hf_setup(model, config, torch.zeros((1, 7), dtype=torch.long))
        out.append(new_search(setup, model, "cpu"))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_groups_step_exactly_as_each_group_alone(engines, seed):
    """Random logits (coarse, so that scores tie), groups of several option sets interleaved
    (batches are not contiguous rows), groups finishing at different steps: tokens, parents,
    finished flags and results equal those of each group advancing alone."""
    engine = engines["bart"]
    rng = random.Random(seed)
    option_sets = [dict(num_beams=2, summary_max_tokens=6, summary_min_tokens=6),
                   dict(num_beams=4, summary_max_tokens=9, summary_min_tokens=0),
                   dict(num_beams=4, summary_max_tokens=9, summary_min_tokens=3,
                        length_penalty=2.0, no_repeat_ngram_size=2),
                   dict(num_beams=1, summary_max_tokens=5, summary_min_tokens=0)]
    options = [rng.choice(option_sets) for _ in range(12)]
    batched, alone = _searches(engine, options), _searches(engine, options)
    vocab = engine.summary.model.config.vocab_size
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        while any(not s.finished for s in alone):
            live = [i for i, s in enumerate(alone) if not s.finished]
            rows = sum(alone[i].width for i in live)
            logits = (torch.randn((rows, vocab), generator=generator) * 4).round()
            got = advance_all([batched[i] for i in live], logits)
            offset = 0
            for i, outcome in zip(live, got):
                width = alone[i].width
                tokens, parents = alone[i].advance(logits[offset:offset + width])
                offset += width
                assert not isinstance(outcome, Exception)
                assert torch.equal(outcome[0], tokens) and torch.equal(outcome[1], parents)
                assert batched[i].finished == alone[i].finished
    assert [s.result() for s in batched] == [s.result() for s in alone]


def test_alike_beam_groups_share_one_top_k_per_step(engines, monkeypatch):
    """Six articles with the same options, summary and headline: two batches a step (the
    summaries, the headlines), not twelve searches; and the tokens are still generate's."""
    engine = engines["bart"]
    rng = random.Random(3)
    requests = {t: request(engine, rng, num_beams=2, outputs=Outputs.BOTH, summary_max_tokens=8,
                           summary_min_tokens=8, headline_max_tokens=5, headline_min_tokens=5,
                           length_penalty=None, no_repeat_ngram_size=None)
                for t in range(6)}
    model = engine.summary.model
    calls: list[int] = []
    top_k = model._get_top_k_continuations

    def counting(*args, **kwargs):
        calls.append(kwargs["batch_size"])
        return top_k(*args, **kwargs)

    monkeypatch.setattr(model, "_get_top_k_continuations", counting)
    results, failures, steps = run(session(engine),
                                   {0: [Admit(t, p, a) for t, (p, a) in requests.items()]})
    assert not failures
    assert max(calls) == 6  # the six summaries (or headlines) as one batch
    assert len(calls) == 5 * 2 + (8 - 5)  # two batches while both run, then the summaries
    monkeypatch.undo()
    check_exact(engine, requests, results)


def test_mixed_options_in_batches_are_token_exact(engines):
    """Option sets repeated over many articles (so batches form), joining at different steps
    (so equal options at different lengths do not batch). float32: the search-level test above
    holds for any logits, int8 included; int8 sessions against int8 generate differ on their
    own in rare near-ties (docs/int8-engine.md), batched or not."""
    engine = engines["bart"]
    rng = random.Random(11)
    option_sets = [dict(num_beams=4, length_penalty=2.0), dict(num_beams=2),
                   dict(num_beams=4, no_repeat_ngram_size=2, summary_min_tokens=0)]
    requests = {t: request(engine, rng, **option_sets[t % 3], outputs=Outputs.BOTH,
                           summary_max_tokens=10, headline_max_tokens=4)
                for t in range(12)}
    arrivals: dict[int, list[Admit]] = {}
    for t, (params, article) in requests.items():
        arrivals.setdefault(0 if t < 8 else 3, []).append(Admit(t, params, article))
    results, failures, _ = run(session(engine), arrivals)
    assert not failures
    check_exact(engine, requests, results)


def test_a_batch_that_raises_fails_only_the_group_that_raises_alone(engines, monkeypatch):
    """One group's logits processor raises inside a batch: the batch is advanced again one
    group at a time, so that group's article fails and its batch-mates go on, exact."""
    engine = engines["bart"]
    rng = random.Random(5)
    requests = {t: request(engine, rng, num_beams=2, outputs=Outputs.SUMMARY,
                           summary_max_tokens=6, summary_min_tokens=6, length_penalty=None)
                for t in range(4)}
    sess = session(engine)
    sess.advance(StepIn(admit=tuple(Admit(t, p, a) for t, (p, a) in requests.items())))
    victim = next(g for g in sess.running.groups if g.article.ticket == 1)
    processors = victim.search.setup.processors

    def boom(input_ids, scores):
        if input_ids.shape[-1] >= 3:
            raise RuntimeError("injected")
        return processors(input_ids, scores)

    monkeypatch.setattr(victim.search.setup, "processors", boom)
    batches: list[int] = []
    original = search_module._advance_beams

    def recording(batch, log_probs):
        batches.append(len(batch))
        return original(batch, log_probs)

    monkeypatch.setattr(search_module, "_advance_beams", recording)
    results, failures, _ = run(sess, {})
    assert set(failures) == {1} and failures[1].kind == "error"
    assert max(batches) == 4  # the victim was in a batch of four when it raised
    del requests[1]
    check_exact(engine, requests, results)
