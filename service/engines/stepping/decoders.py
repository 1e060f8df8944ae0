"""One decoding step for many sequences at different lengths, on a Hugging Face model's weights.

`generate` steps a batch whose sequences all have the same length. Continuous batching needs a
step over rows that joined at different times, so each row has its own position, its own
self-attention length and its own source length. These adapters run the model's own modules
(projections, norms, feed-forward, embeddings; nothing is copied or re-initialised) in the order
the model's forward runs them, with per-row positions and masks:

- the self-attention cache is right-aligned: every row's newest token is in the last column, and a
  row that has decoded `n` tokens holds its keys in the last `n` columns (the rest is masked);
- the cross-attention keys and values are computed once per source (an article's encoded input,
  `cross_kv`) and never copied per row: all rows that read one source (its summary's and its
  headline's beams) are that source's queries in one attention call, `[sources, heads, queries,
  dim]` against `[sources, heads, source length, dim]` padded on the right (masked). So beams
  share their article's keys and values (FastSeq's "attention cache" idea) and a beam reorder
  never touches them.

Supported: BART and PEGASUS (`BartLike`), T5 and mT5 (`T5Like`). `adapter_for` says which.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]
"""Keys and values of one layer: [rows (or sources), heads, length, head_dim] each."""


class CrossLayout:
    """Where each row's query goes in the per-source cross-attention call: row r is query
    `slot[r] % width` of source `slot[r] // width`."""

    def __init__(self, slot: torch.Tensor, sources: int, width: int) -> None:
        self.slot = slot
        self.sources = sources
        self.width = width

    def gather(self, q: torch.Tensor) -> torch.Tensor:
        """[rows, heads, 1, dim] -> [sources, heads, width, dim] (unused slots zero)."""
        rows, heads, _, dim = q.shape
        out = q.new_zeros((self.sources * self.width, heads, dim))
        out.index_copy_(0, self.slot, q[:, :, 0])
        return out.view(self.sources, self.width, heads, dim).transpose(1, 2)

    def scatter(self, out: torch.Tensor) -> torch.Tensor:
        """[sources, heads, width, dim] -> [rows, heads, 1, dim]"""
        sources, heads, width, dim = out.shape
        flat = out.transpose(1, 2).reshape(sources * width, heads, dim)
        return flat.index_select(0, self.slot)[:, :, None]

SUPPORTED_TYPES = frozenset({"bart", "pegasus", "t5", "mt5"})


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[rows, length, hidden] -> [rows, heads, length, head_dim]"""
    rows, length, _ = x.shape
    return x.view(rows, length, -1, head_dim).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[rows, heads, 1, head_dim] -> [rows, 1, hidden]"""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)


class Adapter:
    """What the running set needs from a model family."""

    model: Any
    layers: int
    heads: int
    head_dim: int

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Encoder hidden states [articles, length, hidden] of a right-padded batch."""
        return self.model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state

    def cross_kv(self, hidden: torch.Tensor) -> list[KV]:
        """Each decoder layer's cross-attention keys and values for encoder states `hidden`."""
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, self_kv: list[KV],
             self_valid: torch.Tensor, cross: list[KV], cross_valid: torch.Tensor,
             layout: CrossLayout) -> tuple[torch.Tensor, list[KV]]:
        """Decode one token per row. `tokens`, `positions`: [rows]; `self_kv`: the cache before
        this step: either length T (possibly 0), or length T + 1 whose last column is a free
        slot for this step's keys/values (a preallocated cache: the step writes the slot in
        place instead of concatenating the whole cache); `self_valid`: [rows, T + 1] bool, True
        where a row attends, this step's column included; `cross`: per source; `cross_valid`:
        [sources, S] bool; `layout`: which source each row reads.
        Returns float logits [rows, vocab] and each layer's self-attention keys/values with this
        step's column ([rows, heads, T + 1, head_dim]: the slotted tensors themselves, or new
        ones); nothing else passed in is mutated."""
        raise NotImplementedError

    def bytes_per_token(self) -> int:
        """Cache bytes for one token of one row: keys and values of every decoder layer."""
        element = next(self.model.parameters()).element_size()
        return 2 * self.layers * self.heads * self.head_dim * element


def adapter_for(model: Any) -> Adapter:
    model_type = model.config.model_type
    if model_type in ("t5", "mt5"):
        return T5Like(model)
    if model_type in ("bart", "pegasus"):
        return BartLike(model)
    raise ValueError(f"continuous batching does not support model type {model_type!r}")


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
            scale: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _with_column(past: KV | None, new: KV, length: int) -> KV:
    """The cache with this step's column: written into the free last column of a slotted
    cache (`length` columns already, the slot included), else appended (a new tensor)."""
    if past is None or past[0].shape[2] == 0:
        return new
    if past[0].shape[2] == length:
        past[0][:, :, -1:] = new[0]
        past[1][:, :, -1:] = new[1]
        return past
    return torch.cat((past[0], new[0]), dim=2), torch.cat((past[1], new[1]), dim=2)


class BartLike(Adapter):
    """BART (post-norm, learned positions offset by 2, an embedding layer norm) and PEGASUS
    (pre-norm, sinusoidal positions, a final layer norm)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        config = model.config
        self.pre_norm = config.model_type == "pegasus"
        self.layers = len(self.decoder.layers)
        self.heads = config.decoder_attention_heads
        self.head_dim = config.d_model // self.heads
        self.scaling = self.head_dim ** -0.5
        # BART's embedding scales itself (BartScaledWordEmbedding); PEGASUS's decoder scales.
        self.embed_scale = getattr(self.decoder, "embed_scale", None)
        self.position_offset = getattr(self.decoder.embed_positions, "offset", 0)

    def cross_kv(self, hidden: torch.Tensor) -> list[KV]:
        out = []
        for layer in self.decoder.layers:
            attn = layer.encoder_attn
            out.append((_heads(attn.k_proj(hidden), self.head_dim),
                        _heads(attn.v_proj(hidden), self.head_dim)))
        return out

    def _attention(self, attn: Any, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor, layout: CrossLayout | None = None) -> torch.Tensor:
        q = _heads(attn.q_proj(h), self.head_dim)
        if layout is None:
            return attn.out_proj(_merge(_attend(q, k, v, mask, self.scaling)))
        out = _attend(layout.gather(q), k, v, mask, self.scaling)
        return attn.out_proj(_merge(layout.scatter(out)))

    def step(self, tokens, positions, self_kv, self_valid, cross, cross_valid, layout):
        decoder = self.decoder
        h = decoder.embed_tokens(tokens[:, None])
        if self.embed_scale is not None:
            h = h * self.embed_scale
        h = h + F.embedding(positions[:, None] + self.position_offset,
                            decoder.embed_positions.weight)
        if getattr(decoder, "layernorm_embedding", None) is not None:
            h = decoder.layernorm_embedding(h)
        self_mask = self_valid[:, None, None, :]
        cross_mask = cross_valid[:, None, None, :]
        new_kv = []
        for i, layer in enumerate(decoder.layers):
            sa = layer.self_attn
            residual = h
            x = layer.self_attn_layer_norm(h) if self.pre_norm else h
            column = (_heads(sa.k_proj(x), self.head_dim), _heads(sa.v_proj(x), self.head_dim))
            k, v = _with_column(self_kv[i] if self_kv else None, column, self_valid.shape[1])
            new_kv.append((k, v))
            h = residual + self._attention(sa, x, k, v, self_mask)
            if not self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            residual = h
            x = layer.encoder_attn_layer_norm(h) if self.pre_norm else h
            h = residual + self._attention(layer.encoder_attn, x, cross[i][0], cross[i][1],
                                           cross_mask, layout)
            if not self.pre_norm:
                h = layer.encoder_attn_layer_norm(h)
            residual = h
            x = layer.final_layer_norm(h) if self.pre_norm else h
            h = residual + layer.fc2(layer.activation_fn(layer.fc1(x)))
            if not self.pre_norm:
                h = layer.final_layer_norm(h)
        if getattr(decoder, "layer_norm", None) is not None:
            h = decoder.layer_norm(h)
        logits = self.model.lm_head(h[:, 0])
        bias = getattr(self.model, "final_logits_bias", None)
        if bias is not None:
            logits = logits + bias.to(logits.device)
        return logits.float(), new_kv


class T5Like(Adapter):
    """T5, FLAN-T5 and mT5: RMS norms, pre-norm, no attention scaling, a learned relative position
    bias (computed by the first self-attention layer and shared by all), a head whose input is
    scaled by d_model**-0.5 where the model's forward does so (`_scales_decoder_output`)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.decoder = model.get_decoder()
        config = model.config
        self.layers = len(self.decoder.block)
        self.heads = config.num_heads
        self.head_dim = config.d_kv
        self.scale_output = _scales_decoder_output(config)
        self.model_dim = config.d_model

    def cross_kv(self, hidden: torch.Tensor) -> list[KV]:
        out = []
        for block in self.decoder.block:
            attn = block.layer[1].EncDecAttention
            out.append((_heads(attn.k(hidden), self.head_dim),
                        _heads(attn.v(hidden), self.head_dim)))
        return out

    def _attention(self, attn: Any, h: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: torch.Tensor, layout: CrossLayout | None = None) -> torch.Tensor:
        q = _heads(attn.q(h), self.head_dim)
        if layout is None:
            return attn.o(_merge(_attend(q, k, v, mask, 1.0)))
        return attn.o(_merge(layout.scatter(_attend(layout.gather(q), k, v, mask, 1.0))))

    def step(self, tokens, positions, self_kv, self_valid, cross, cross_valid, layout):
        decoder = self.decoder
        h = decoder.embed_tokens(tokens[:, None])
        length = self_valid.shape[1]
        # Right-aligned: the new token is the last column for every row, so the relative
        # distance of each column to it is the same for all rows.
        first = decoder.block[0].layer[0].SelfAttention
        bias = first.compute_bias(1, length, device=h.device, past_seen_tokens=length - 1)
        bias = bias.to(h.dtype)
        low = torch.finfo(h.dtype).min
        self_mask = bias.masked_fill(~self_valid[:, None, None, :], low)
        cross_mask = torch.zeros(cross_valid.shape, dtype=h.dtype, device=h.device)
        cross_mask = cross_mask.masked_fill(~cross_valid, low)[:, None, None, :]
        new_kv = []
        for i, block in enumerate(decoder.block):
            sa_layer, ca_layer, ff_layer = block.layer[0], block.layer[1], block.layer[2]
            sa = sa_layer.SelfAttention
            x = sa_layer.layer_norm(h)
            column = (_heads(sa.k(x), self.head_dim), _heads(sa.v(x), self.head_dim))
            k, v = _with_column(self_kv[i] if self_kv else None, column, self_valid.shape[1])
            new_kv.append((k, v))
            h = _clamp(h + self._attention(sa, x, k, v, self_mask))
            x = ca_layer.layer_norm(h)
            h = _clamp(h + self._attention(ca_layer.EncDecAttention, x, cross[i][0], cross[i][1],
                                           cross_mask, layout))
            h = _clamp(h + ff_layer.DenseReluDense(ff_layer.layer_norm(h)))
        h = decoder.final_layer_norm(h)
        if self.scale_output:
            h = h * (self.model_dim ** -0.5)
        return self.model.lm_head(h[:, 0]).float(), new_kv


def _scales_decoder_output(config: Any) -> bool:
    """Whether the model's forward multiplies the decoder output by d_model**-0.5 before the head.
    transformers 4 does so when `tie_word_embeddings` (T5 and mT5; False in FLAN-T5, T5 v1.1 and
    mT5 checkpoints). transformers 5 forces `tie_word_embeddings` to True in both configs: T5 keeps
    the checkpoint's choice as `scale_decoder_outputs`, mT5 never scales."""
    scale = getattr(config, "scale_decoder_outputs", None)
    if scale is not None:
        return bool(scale)
    import transformers

    if config.model_type == "mt5" and int(transformers.__version__.split(".")[0]) >= 5:
        return False
    return bool(getattr(config, "tie_word_embeddings", True))


def _clamp(h: torch.Tensor) -> torch.Tensor:
    """T5's guard against float16 overflow, as its blocks apply it."""
    if h.dtype == torch.float16:
        limit = torch.finfo(h.dtype).max - 1000
        h = torch.where(torch.isinf(h).any(), torch.clamp(h, -limit, limit), h)
    return h




