"""The step adapters (service/engines/stepping/decoders.py) give the logits the model's own forward
gives, token by token, for configurations the tiny fixtures do not cover (untied T5 heads as in
FLAN-T5 and T5 v1.1, mT5, scaled BART/PEGASUS embeddings, a non-zero `final_logits_bias`)."""

from __future__ import annotations

import pytest
import torch

from service.engines.stepping.decoders import Layout, adapter_for


def _t5(config_class, model_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                          num_decoder_layers=2, num_heads=2, pad_token_id=0, eos_token_id=1,
                          decoder_start_token_id=0, **extra)
    return model_class(config).eval()


def _bart_like(config_class, model_class, **extra):
    torch.manual_seed(0)
    config = config_class(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=2,
                          encoder_attention_heads=2, decoder_attention_heads=2,
                          encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                          init_std=0.3, **extra)
    model = model_class(config).eval()
    with torch.no_grad():
        model.final_logits_bias.normal_()
    return model


def _model(kind: str):
    import transformers as tf

    if kind == "t5":
        return _t5(tf.T5Config, tf.T5ForConditionalGeneration)
    if kind == "t5-untied":  # FLAN-T5, T5 v1.1: no d_model**-0.5 before the head
        return _t5(tf.T5Config, tf.T5ForConditionalGeneration, tie_word_embeddings=False,
                   feed_forward_proj="gated-gelu")
    if kind == "mt5":
        return _t5(tf.MT5Config, tf.MT5ForConditionalGeneration, tie_word_embeddings=False,
                   feed_forward_proj="gated-gelu")
    if kind == "bart-scaled":
        return _bart_like(tf.BartConfig, tf.BartForConditionalGeneration, scale_embedding=True)
    return _bart_like(tf.PegasusConfig, tf.PegasusForConditionalGeneration,
                      scale_embedding=True)


def _stepped(model, ids: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    adapter = adapter_for(model)
    cross = [adapter.cross_kv(adapter.encode(ids, torch.ones_like(ids)))]
    self_kv, out = None, []
    for n, token in enumerate(tokens):
        valid = torch.ones((1, n + 1), dtype=torch.bool)
        layout = Layout(self_runs=[(0, 1, n)], cross_runs=[(0, 1, 0)])
        logits, self_kv = adapter.step(torch.tensor([token]), torch.tensor([n]), self_kv or [],
                                       valid, cross, layout)
        out.append(logits[0])
    return torch.stack(out)


@pytest.mark.parametrize("kind", ["t5", "t5-untied", "mt5", "bart-scaled", "pegasus-scaled"])
def test_stepped_logits_equal_the_models_forward(kind):
    model = _model(kind)
    ids = torch.tensor([[5, 9, 17, 3, 22, 1]])
    tokens = [model.config.decoder_start_token_id, 7, 12, 30, 7]
    with torch.inference_mode():
        expected = model(input_ids=ids, decoder_input_ids=torch.tensor([tokens])).logits[0]
        got = _stepped(model, ids, tokens)
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=1e-4)
