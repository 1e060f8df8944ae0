"""Batch-invariant int8 linear layers for the torch engine, and int8 checkpoints converted once.

`Int8Linear` replaces every `nn.Linear` of a model (the output head included):

- weights are int8 with one float32 scale per output channel (`max |w| / 127` of that row);
- activations are quantised when the layer runs, one scale per row (`max |x| / 127` of that row),
  never per tensor;
- `torch._int_mm` multiplies int8 by int8 into int32 (integer sums are exact whatever order the
  kernel adds in), and the product is rescaled to float32 by the row's and the column's scales.

Each output row then depends on its own input row alone: a sequence's result does not depend on
what else is in the batch (its batch-mates, their number, the padding of the set). That is what
makes the int8 engine steppable with the continuous session: an article decoded beside others gets
the tokens it gets alone. `torch.ao.quantization.quantize_dynamic`, the engine's former int8,
scales activations per tensor, so a row's result depended on the other rows.

On the CPU `torch._int_mm` takes any shape (1 row, dimensions that are no multiple of 8: checked
in tests/test_int8.py); on CUDA it needs more than 16 rows and multiples of 8, which is one reason
int8 stays a CPU compute type for this engine.

Loading never holds a float32 copy of the model: a checkpoint is converted once, in a child
process (`python -m service.engines.int8 SOURCE OUT`), into a directory with `int8.safetensors`
(int8 weights and scales, the rest as stored) and the generation config, keyed by the checkpoint's
files like the ctranslate2 engine's conversions; the server builds the model's skeleton without
memory (meta device), swaps its linear layers for empty int8 ones and assigns the stored tensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelLoadError, first_line
from .checkpoint import Source
from .convert import DEFAULT_CACHE_DIR, _fingerprint, convert_into_cache, staged


WEIGHTS_FILE = "int8.safetensors"
MARKER_FILE = "summarizer-int8.json"
FORMAT = 2
"""Bumped when what a converted directory holds changes (a new cache entry is then written)."""
_SMALLEST_SCALE = 1e-12
"""A row of zeros gets this scale (its int8 values are all 0), never a division by zero."""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 scales [rows, 1] of a 2-D float tensor, one scale per row."""
    # Few passes over x (each op is a parallel region: they add up at decoding's small row
    # counts). max |x| / scale is 127 at most, so no clamp is needed before the cast.
    # abs().amax() rather than vector_norm(x, inf): the same (exact) maximum, 4-13x faster on
    # this CPU (vector_norm's inf-norm kernel was 12% of an int8 decoding step).
    scale = x.abs().amax(dim=1, keepdim=True)
    scale = scale.clamp_(min=_SMALLEST_SCALE).div_(127.0)
    return torch.div(x, scale).round_().to(torch.int8), scale


def _int8_rows(module: nn.Module, rows: int, columns: int, device: Any) -> None:
    """Register `module`'s int8 `weight` [rows, columns] and its float32 per-row `weight_scale`
    (empty: filled by loading or by quantising)."""
    module.register_buffer("weight", torch.empty((rows, columns), dtype=torch.int8,
                                                 device=device))
    module.register_buffer("weight_scale", torch.empty(rows, dtype=torch.float32, device=device))


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 per output channel and x quantised per row (see the module
    docstring): batch-invariant, float32 in and out."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 device: Any = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        _int8_rows(self, out_features, in_features, device)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.float32,
                                                     device=device))
        else:
            self.bias = None

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        weight = linear.weight.detach().float()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  device=weight.device)
        values, scale = quantize_rows(weight)
        out.weight.copy_(values)
        out.weight_scale.copy_(scale[:, 0])
        if linear.bias is not None:
            assert out.bias is not None
            out.bias.copy_(linear.bias.detach().float())
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, self.in_features).float()
        values, scale = quantize_rows(flat)
        out = torch._int_mm(values, self.weight.t()).float()
        out.mul_(scale).mul_(self.weight_scale)
        if self.bias is not None:
            out.add_(self.bias)
        return out.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, int8 per channel x per row")


class Int8Embedding(nn.Module):
    """An embedding stored as int8 rows with one float32 scale per row: the output head's own
    int8 matrix and scales where the two are tied (`quantize_model`), so the model holds the
    vocabulary matrix once, in int8, instead of a float32 copy beside the head's int8 one. A
    lookup dequantises the rows it reads (row-wise: batch-invariant); `embed_scale` is the
    scale of the embedding it replaces (BART's `BartScaledWordEmbedding` multiplies by it)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 embed_scale: float | None = None, device: Any = None) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        _int8_rows(self, num_embeddings, embedding_dim, device)

    @classmethod
    def like(cls, embedding: nn.Embedding, device: Any = None) -> Int8Embedding:
        """An empty one of `embedding`'s shape and scale."""
        return cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                   getattr(embedding, "embed_scale", None), device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = nn.functional.embedding(ids, self.weight).float()
        out.mul_(self.weight_scale[ids].unsqueeze(-1))
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"
                + (f", scale={self.embed_scale}" if self.embed_scale is not None else ""))


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` of `model` by an `Int8Linear`, one at a time (each float32
    weight is released as soon as its int8 copy exists, unless something else holds it, as a
    tied embedding does). Returns how many were replaced."""
    names = _linear_names(model)
    for name in names:
        linear = model.get_submodule(name)
        assert isinstance(linear, nn.Linear)
        _replace(model, name, Int8Linear.from_float(linear))
    return len(names)


def quantize_model(model: nn.Module) -> tuple[int, int]:
    """`quantize_linears`, and every embedding tied to a linear layer (the input embeddings of
    a model whose output head shares their matrix: BART, PEGASUS, T5) becomes an
    `Int8Embedding` on that layer's int8 matrix and scales (per output channel of the head is
    per row of the embedding: the same numbers). Returns (linear layers, embeddings) replaced."""
    weights = {id(module.weight): name for name, module in model.named_modules()
               if type(module) is nn.Linear}
    # Every name of a shared module (BART's encoder and decoder may hold the same embedding).
    tied = [(name, weights[id(module.weight)])
            for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, nn.Embedding) and id(module.weight) in weights]
    linears = quantize_linears(model)
    for name, linear_name in tied:
        embedding = model.get_submodule(name)
        head = model.get_submodule(linear_name)
        assert isinstance(embedding, nn.Embedding) and isinstance(head, Int8Linear)
        out = Int8Embedding.like(embedding, device=head.weight.device)
        out.weight, out.weight_scale = head.weight, head.weight_scale
        _replace(model, name, out)
    return linears, len(tied)


# ----- converting once -----
def cache_path(cache_dir: str, source: Source, revision: str) -> Path:
    """The cache entry of one checkpoint's int8 conversion (beside the ctranslate2 ones)."""
    name = Path(source.location.rstrip("/")).name or "model"
    key = _fingerprint(source, f"{revision}@torch-int8-{FORMAT}-{torch.__version__}")
    return Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / f"{name}-{key}-torch-int8"


def is_converted(directory: Path) -> bool:
    return (directory / WEIGHTS_FILE).is_file() and (directory / MARKER_FILE).is_file()


def convert(location: str, out: Path, options: dict[str, Any]) -> Path:
    """Load `location` in float32, quantise its linear layers and write `out` (atomically: the
    directory appears complete or not at all). Runs in a child process (see `converted_for`)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSeq2SeqLM

    with staged(out) as staging:
        model = AutoModelForSeq2SeqLM.from_pretrained(location, dtype=torch.float32,
                                                      use_safetensors=True, **options)
        model.eval()
        replaced, embeddings = quantize_model(model)
        tensors, aliases = _unique_tensors(model)
        save_file(tensors, str(staging / WEIGHTS_FILE),
                  metadata={"aliases": json.dumps(aliases)})
        model.generation_config.save_pretrained(staging)
        (staging / MARKER_FILE).write_text(json.dumps({
            "source": location, "format": FORMAT, "torch": torch.__version__,
            "linear_layers": replaced, "int8_embeddings": embeddings}) + "\n",
            encoding="utf-8")
    return out


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every parameter and buffer (non-persistent ones too: a model built on the meta device has
    no values for them), each storage once; `aliases` maps the other names of a shared tensor
    (tied embeddings) to the stored one."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    # Non-persistent buffers too: a model built on the meta device has no values for them.
    named = list(model.named_parameters(remove_duplicate=False)) + list(
        model.named_buffers(remove_duplicate=False))
    for name, tensor in named:
        key = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()),
               tuple(int(n) for n in tensor.shape))
        if key in seen:
            if seen[key] != name:
                aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = tensor.detach().contiguous()
    return tensors, aliases


def converted_for(source: Source, cache_dir: str, revision: str = "") -> Path:
    """The int8 directory for `source`: the cache entry, converting into it first when it is not
    there (`convert.convert_into_cache`: a child process, so the float32 weights never sit in this
    process's memory; the temporary directory where the cache directory cannot be written)."""
    options = json.dumps(source.options | ({"revision": revision} if revision else {}))
    return convert_into_cache(
        source, cache_dir, cache_path("", source, revision).name, "to int8",
        lambda target: [sys.executable, "-m", "service.engines.int8", source.location,
                        str(target), options],
        is_converted, "or serve without conversion with --compute-type float32")


# ----- loading -----
def load(directory: Path, config: Any) -> Any:
    """The model of `config`'s class with the int8 weights of `directory`: built on the meta
    device (no memory), linear layers swapped for int8 ones, then every tensor assigned from
    the file, so the process never holds the float32 linear weights."""
    from safetensors import safe_open
    from transformers import AutoModelForSeq2SeqLM, GenerationConfig

    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    for name in _linear_names(model):
        linear = model.get_submodule(name)
        _replace(model, name, Int8Linear(linear.in_features, linear.out_features,
                                         linear.bias is not None, device="meta"))
    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as weights:
        aliases = json.loads((weights.metadata() or {}).get("aliases", "{}"))
        stored = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118 - no __iter__
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, nn.Embedding) and (f"{name}.weight_scale" in stored
                                                 or f"{name}.weight_scale" in aliases):
            _replace(model, name, Int8Embedding.like(module, device="meta"))
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    missing = [name for name in named if name not in stored and name not in aliases]
    if missing:
        raise ModelLoadError(f"{directory} does not match the model: no {missing[0]} "
                             f"({len(missing)} missing); delete it to convert again")
    for name, current in named.items():
        tensor = stored[aliases.get(name, name)]
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        if isinstance(current, nn.Parameter):
            if not isinstance(tensor, nn.Parameter):
                tensor = nn.Parameter(tensor, requires_grad=False)
                # Tied names stay one parameter: later names reuse the one made here.
                stored[aliases.get(name, name)] = tensor
            owner._parameters[attr] = tensor
        else:
            owner._buffers[attr] = tensor
    left = [name for name, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta]
    if left:
        raise ModelLoadError(f"int8 model from {directory}: {left[0]} has no value")
    model.generation_config = GenerationConfig.from_pretrained(str(directory))
    model.eval()
    return model


def main(argv: list[str] | None = None) -> int:
    """`python -m service.engines.int8 LOCATION OUT [OPTIONS_JSON]`: convert once (the engine
    runs this in a child process)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m service.engines.int8 LOCATION OUT [OPTIONS_JSON]",
              file=sys.stderr)
        return 2
    options = json.loads(args[2]) if len(args) == 3 else {}
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        convert(args[0], Path(args[1]).expanduser(), options)
    except Exception as error:  # noqa: BLE001 - reported to the parent on one line
        print(f"cannot convert {args[0]!r} to int8: {first_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
