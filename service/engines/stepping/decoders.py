"""One decoding step for many sequences at different lengths, on a Hugging Face model's weights.

`generate` steps a batch whose sequences all have the same length. Continuous batching needs a
step over rows that joined at different times, so each row has its own position, its own
self-attention length and its own source length. These adapters run the model's own modules
(projections, norms, feed-forward, embeddings; nothing is copied or re-initialised) in the order
the model's forward runs them, with per-row positions and masks:

- the self-attention cache is right-aligned: every row's newest token is in the last column, and a
  row that has decoded `n` tokens holds its keys in the last `n` columns (the columns left of
  them belong to longer rows);
- the cross-attention keys and values are computed once per source (an article's encoded input,
  `cross_kv`) and never copied per row: the rows that read one source (its summary's and its
  headline's beams) are that source's queries in one attention call, `[1, heads, queries, dim]`
  against `[1, heads, source length, dim]`. So beams share their article's keys and values
  (FastSeq's "attention cache" idea) and a beam reorder never touches them.

Batch invariance: no attention call pads, masks or mixes rows of different articles. Attention
runs per `Layout` run: self-attention per run of rows with the same history length, on exactly
their own columns (a [rows x heads] batch of one query each: the batch size does not change a
row's result); cross-attention per run of rows reading one source, at the source's own length,
with the queries of that source only (how many there are is the article's own business: its
live beams). The kernels' reduction orders then depend on the article alone, never on the set it
decodes in; the int8 linear layers (int8.py) are row-wise, norms and embeddings are per row. So an
int8 article decodes bit for bit as it does alone (tests/test_continuous_exact.py). Padding (the
former layout: one call over every source, padded to the longest, and one masked call over every
row) changed the last bits with the set, and at a near-tie a token.

Supported: BART and PEGASUS (`BartLike`), T5 and mT5 (`T5Like`). `adapter_for` says which.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

KV = tuple[torch.Tensor, torch.Tensor]
"""Keys and values of one layer: [rows (or sources), heads, length, head_dim] each."""


class Layout:
    """Which rows attend together in one step (rows are in group order):

    - `self_runs`: (first row, end row, history length) of consecutive rows that hold the same
      number of tokens in the self-attention cache;
    - `cross_runs`: (first row, end row, source index) of consecutive rows that read the same
      source (an article's rows are consecutive)."""

    def __init__(self, self_runs: list[tuple[int, int, int]],
                 cross_runs: list[tuple[int, int, int]]) -> None:
        self.self_runs = self_runs
        self.cross_runs = cross_runs


def runs(values: list[Any], widths: list[int]) -> list[tuple[int, int, Any]]:
    """(first row, end row, value) of each run of consecutive equal `values`, item i being
    `widths[i]` rows."""
    out: list[tuple[int, int, Any]] = []
    row = 0
    for value, width in zip(values, widths, strict=True):
        if out and out[-1][2] == value and out[-1][1] == row:
            out[-1] = (out[-1][0], row + width, value)
        else:
            out.append((row, row + width, value))
        row += width
    return out


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
             self_valid: torch.Tensor, cross: list[list[KV]],
             layout: Layout) -> tuple[torch.Tensor, list[KV]]:
        """Decode one token per row. `tokens`, `positions`: [rows]; `self_kv`: the cache before
        this step: either length T (possibly 0), or length T + 1 whose last column is a free
        slot for this step's keys/values (a preallocated cache: the step writes the slot in
        place instead of concatenating the whole cache); `self_valid`: [rows, T + 1] bool, True
        where a row attends, this step's column included (each row's last `positions + 1`
        columns: `layout.self_runs` says the same per run); `cross`: per source, each decoder
        layer's keys/values [1, heads, length, dim]; `layout`: which rows attend together.
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


def _self_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Layout,
                 scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention of one new token per row, [rows, heads, 1, dim], against the right-aligned
    cache `k`, `v` [rows, heads, T + 1, dim], per run of rows with the same history: each run
    reads exactly its own last `history + 1` columns (no mask, no padding). `bias`: T5's position
    bias [1, heads, 1, T + 1] (it depends on the distance to the newest column only)."""
    out = torch.empty_like(q)
    total = k.shape[2]
    for start, end, history in layout.self_runs:
        first = total - history - 1
        scores = torch.matmul(q[start:end], k[start:end, :, first:].transpose(-1, -2))
        if scale != 1.0:
            scores.mul_(scale)
        if bias is not None:
            scores.add_(bias[..., first:])
        out[start:end] = torch.matmul(torch.softmax(scores, dim=-1), v[start:end, :, first:])
    return out


def _cross_attend(q: torch.Tensor, sources: list[KV], layout: Layout,
                  scale: float) -> torch.Tensor:
    """Cross-attention of [rows, heads, 1, dim] queries, one call per run of rows that read one
    source: [1, heads, queries, dim] against that source's [1, heads, length, dim]."""
    out = torch.empty_like(q)
    for start, end, source in layout.cross_runs:
        k, v = sources[source]
        queries = q[start:end, :, 0].transpose(0, 1)[None]
        attended = F.scaled_dot_product_attention(queries, k, v, scale=scale)
        out[start:end, :, 0] = attended[0].transpose(0, 1)
    return out


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

    def step(self, tokens, positions, self_kv, self_valid, cross, layout):
        decoder = self.decoder
        h = decoder.embed_tokens(tokens[:, None])
        if self.embed_scale is not None:
            h = h * self.embed_scale
        h = h + F.embedding(positions[:, None] + self.position_offset,
                            decoder.embed_positions.weight)
        if getattr(decoder, "layernorm_embedding", None) is not None:
            h = decoder.layernorm_embedding(h)
        new_kv = []
        for i, layer in enumerate(decoder.layers):
            sa = layer.self_attn
            residual = h
            x = layer.self_attn_layer_norm(h) if self.pre_norm else h
            column = (_heads(sa.k_proj(x), self.head_dim), _heads(sa.v_proj(x), self.head_dim))
            k, v = _with_column(self_kv[i] if self_kv else None, column, self_valid.shape[1])
            new_kv.append((k, v))
            q = _heads(sa.q_proj(x), self.head_dim)
            h = residual + sa.out_proj(_merge(_self_attend(q, k, v, layout, self.scaling)))
            if not self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            residual = h
            x = layer.encoder_attn_layer_norm(h) if self.pre_norm else h
            ca = layer.encoder_attn
            q = _heads(ca.q_proj(x), self.head_dim)
            attended = _cross_attend(q, [source[i] for source in cross], layout, self.scaling)
            h = residual + ca.out_proj(_merge(attended))
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

    def step(self, tokens, positions, self_kv, self_valid, cross, layout):
        decoder = self.decoder
        h = decoder.embed_tokens(tokens[:, None])
        length = self_valid.shape[1]
        # Right-aligned: the new token is the last column for every row, so the relative
        # distance of each column to it is the same for all rows.
        first = decoder.block[0].layer[0].SelfAttention
        bias = first.compute_bias(1, length, device=h.device, past_seen_tokens=length - 1)
        bias = bias.to(h.dtype)
        new_kv = []
        for i, block in enumerate(decoder.block):
            sa_layer, ca_layer, ff_layer = block.layer[0], block.layer[1], block.layer[2]
            sa = sa_layer.SelfAttention
            x = sa_layer.layer_norm(h)
            column = (_heads(sa.k(x), self.head_dim), _heads(sa.v(x), self.head_dim))
            k, v = _with_column(self_kv[i] if self_kv else None, column, self_valid.shape[1])
            new_kv.append((k, v))
            q = _heads(sa.q(x), self.head_dim)
            h = _clamp(h + sa.o(_merge(_self_attend(q, k, v, layout, 1.0, bias))))
            ca = ca_layer.EncDecAttention
            q = _heads(ca.q(ca_layer.layer_norm(h)), self.head_dim)
            attended = _cross_attend(q, [source[i] for source in cross], layout, 1.0)
            h = _clamp(h + ca.o(_merge(attended)))
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




