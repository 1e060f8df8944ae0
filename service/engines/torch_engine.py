"""The Hugging Face `transformers` engine on torch.

Loads any seq2seq checkpoint `AutoModelForSeq2SeqLM` knows (BART, mBART, PEGASUS, T5, FLAN-T5,
LED, ...) from a directory or a hub id: safetensors weights only, never remote code, offline when
asked. When one checkpoint writes both outputs from the same input, the article is encoded once and
both outputs are decoded from that encoding.

Compute types: float32; bfloat16 (native on CPUs with AVX512-BF16 or AMX, emulated and slow
elsewhere, so a warning says so); float16 (GPUs); int8 (CPU only): every linear layer, the output
head included, runs int8 x int8 with weights scaled per output channel and activations per row
(service/engines/int8.py), so a row's result does not depend on its batch-mates and int8 batches
continuously like float32. The checkpoint is converted to int8 once, in a child process, and
cached (`--convert-cache-dir`); the server then loads the int8 weights without a float32 copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .checkpoint import Checkpoint, CheckpointEngine, load_checkpoint, load_failure, resolve_source
from ..config import Settings
from ..domain import Generated, GenerationParams
from ..errors import ConfigError, ModelLoadError
from ..text import tidy_headline, tidy_summary

log = logging.getLogger(__name__)


def _resolve_device(device: str, torch: Any) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but torch sees no CUDA GPU "
                             "(is the CPU build of torch installed?)")
    return device


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def _resolve_compute_type(compute_type: str, device: str, torch: Any) -> str:
    on_gpu = device.startswith("cuda")
    if compute_type == "auto":
        if not on_gpu:
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if compute_type == "int8":
        if on_gpu:
            raise ModelLoadError("compute type int8 runs on the CPU only with the torch engine; "
                                 "use bfloat16 or float16 on a GPU")
        if not hasattr(torch, "_int_mm"):
            raise ModelLoadError("compute type int8: this torch build has no torch._int_mm "
                                 "(int8 matrix multiply); install torch >= 2.2")
    if compute_type == "bfloat16" and not on_gpu and not {"avx512_bf16", "amx_bf16"} & _cpu_flags():
        log.warning("compute type bfloat16: this CPU has no native bfloat16 instructions; "
                    "expect it to be slower than float32")
    return compute_type


class TorchEngine(CheckpointEngine):
    name = "torch"

    def __init__(self, settings: Settings) -> None:
        """Settings, threads, device and compute type only; `load()` loads the models."""
        super().__init__(settings)
        try:
            import torch
        except ImportError as error:  # pragma: no cover - depends on the install
            raise ModelLoadError(
                "the torch engine needs torch, which this installation leaves out (the container "
                "image built with ENGINE=ctranslate2 serves models ctranslate2 takes, converted): "
                "install torch (docs/engines.md) or build the image with --build-arg "
                "ENGINE=torch") from error
        self._torch = torch
        if settings.threads:
            torch.set_num_threads(settings.threads)
        try:
            # One generate call at a time: intra-op threads do the work; inter-op threads
            # would only compete with them for the cores.
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set, or parallel work already ran in this process
            pass
        self.device = _resolve_device(settings.device, torch)
        self.compute_type = _resolve_compute_type(settings.compute_type, self.device, torch)

    def _load_model(self, ref: str, *, weights: bool = True) -> Checkpoint:
        from transformers import AutoModelForSeq2SeqLM

        torch = self._torch
        settings = self.settings
        source = resolve_source(ref, settings)
        ckpt = load_checkpoint(source, settings)
        if not weights:
            return ckpt
        try:
            if self.compute_type == "int8":
                from . import int8

                directory = int8.converted_for(source, settings.convert_cache_dir,
                                               settings.revision)
                model = int8.load(directory, ckpt.config)
            else:
                model = AutoModelForSeq2SeqLM.from_pretrained(
                    source.location, config=ckpt.config, dtype=getattr(torch, self.compute_type),
                    use_safetensors=True, **source.options)
        except ModelLoadError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure here means "this model won't load"
            raise load_failure(source, settings, error) from error
        model.to(self.device)
        model.eval()
        # A forced end-of-sequence token would take the last of a request's max tokens for
        # itself; the limit counts text tokens, as in the ctranslate2 engine (which has no such
        # option). Cleared here: transformers reads None in a per-call config as "unset".
        model.generation_config.forced_eos_token_id = None
        ckpt.model = model
        return ckpt

    # ----- Engine protocol -----
    def generate(self, params: GenerationParams,
                 batch: Sequence[Any]) -> list[Generated]:
        torch = self._torch
        summaries: list[tuple[str, int]] = [("", 0)] * len(batch)
        headlines: list[tuple[str, int]] = [("", 0)] * len(batch)
        with torch.inference_mode():
            shared = None
            if params.outputs.summary:
                inputs = self._pad(self.summary, [a.summary_ids for a in batch])
                if params.outputs.headline and self.shares_input() and self._can_share_encoder():
                    shared = self.summary.model.get_encoder()(**inputs)
                summaries = self._run(self.summary, inputs, params.summary_min_tokens,
                                      params.summary_max_tokens, params, shared, tidy_summary)
            if params.outputs.headline:
                inputs = self._pad(self.headline, [a.headline_ids for a in batch])
                headlines = self._run(self.headline, inputs, params.headline_min_tokens,
                                      params.headline_max_tokens, params, shared, tidy_headline)
        return [Generated(summary=s, headline=h, summary_tokens=sn, headline_tokens=hn)
                for (s, sn), (h, hn) in zip(summaries, headlines)]

    # ----- continuous batching -----
    @property
    def can_step(self) -> bool:
        """Continuous batching works here: one checkpoint writes both outputs, and its model type
        has a step adapter (service/engines/stepping/decoders.py)."""
        from .stepping.decoders import SUPPORTED_TYPES

        return (self.headline is self.summary and self.summary.model_type in SUPPORTED_TYPES
                and _transformers_major() >= 5)

    def open_session(self) -> Any:
        """A running set for continuous batching (service/engines/stepping/session.py)."""
        from .stepping.decoders import adapter_for
        from .stepping.session import TorchSession

        if not self.can_step:
            raise ConfigError(
                f"continuous batching needs one checkpoint of type "
                f"{', '.join(sorted(_stepping_types()))}; this "
                f"engine runs {self.summary.model_type}"
                + (" with a separate headline model" if self.headline is not self.summary else "")
                + f" in {self.compute_type}: use --batching static")
        ckpt = self.summary
        tidy = {"summary": tidy_summary, "headline": tidy_headline}

        def decode(ids: list[int], output: str) -> tuple[str, int]:
            return ckpt.decode([ids], tidy[output])[0]

        return TorchSession(adapter=adapter_for(ckpt.model), model=ckpt.model,
                            device=self.device, budget_bytes=self._cache_budget(),
                            generation_config=self.output_config, decode=decode,
                            max_encode_tokens_per_step=getattr(
                                self.settings, "max_encode_tokens_per_step", 0))

    def output_config(self, output: str, params: GenerationParams) -> Any:
        """The generation config `output` ("summary" or "headline") is written with."""
        if output == "summary":
            low, high = params.summary_min_tokens, params.summary_max_tokens
        else:
            low, high = params.headline_min_tokens, params.headline_max_tokens
        return self._generation_config(self.summary, low, high, params)

    def warmup(self) -> None:
        """Warm up the path requests will take: a decoding session when batching is continuous
        (or auto, which is continuous for this engine when it can step), else generate."""
        if self.settings.batching == "static" or not self.can_step:
            super().warmup()
            return
        from .protocol import WARMUP_TEXT, Admit, StepIn

        params = self.warmup_params()
        session = self.open_session()
        out = session.advance(StepIn(admit=(Admit(0, params, self.prepare([WARMUP_TEXT],
                                                                          params)[0]),)))
        while out.active or out.waiting:
            out = session.advance(StepIn())

    def _cache_budget(self) -> int:
        """--kv-cache-mb, or auto: an eighth of the machine's memory on a CPU, 30% of what the
        GPU has free once the model is loaded. The budget counts the caches as they stand
        between steps; a step briefly holds up to about three times the self-attention cache
        (appending and reordering copy it) and two copies of the cross-attention one, which the
        auto values leave room for."""
        megabytes = getattr(self.settings, "kv_cache_mb", 0)
        if megabytes:
            return int(megabytes) * 2**20
        torch = self._torch
        if self.device.startswith("cuda"):
            free, _total = torch.cuda.mem_get_info(torch.device(self.device))
            return int(free * 0.3)
        try:
            import os

            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 8
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
            return 4 * 2**30

    def _generation_config(self, ckpt: Checkpoint, min_tokens: int, max_tokens: int,
                           params: GenerationParams) -> Any:
        """The generation config one output is written with (both batching modes)."""
        config = copy.deepcopy(ckpt.model.generation_config)
        # The *_new_tokens settings take precedence over a checkpoint's own max/min_length
        # (BART-CNN ships min_length=56, which would otherwise stretch every headline).
        config.max_length = None
        config.min_length = None
        config.max_new_tokens = max_tokens
        config.min_new_tokens = min_tokens
        config.num_beams = params.num_beams
        config.num_return_sequences = 1
        config.do_sample = False
        if params.length_penalty is not None:
            config.length_penalty = params.length_penalty
        if params.no_repeat_ngram_size is not None:
            config.no_repeat_ngram_size = params.no_repeat_ngram_size
        if params.num_beams == 1:
            config.early_stopping = False
            config.length_penalty = 1.0
        return config

    # ----- helpers -----
    def _can_share_encoder(self) -> bool:
        return self.summary.model_type != "led"  # LED's encoder needs a global attention mask

    def _pad(self, ckpt: Checkpoint, rows: Sequence[tuple[int, ...] | None]) -> dict[str, Any]:
        torch = self._torch
        width = max(len(r or ()) for r in rows)
        ids = torch.full((len(rows), width), ckpt.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            row = row or ()
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = 1
        inputs = {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device)}
        if ckpt.model_type == "led":
            global_mask = torch.zeros_like(mask)
            global_mask[:, 0] = 1
            inputs["global_attention_mask"] = global_mask.to(self.device)
        return inputs

    def _run(self, ckpt: Checkpoint, inputs: dict[str, Any], min_tokens: int, max_tokens: int,
             params: GenerationParams, encoder_outputs: Any, tidy: Any) -> list[tuple[str, int]]:
        config = self._generation_config(ckpt, min_tokens, max_tokens, params)
        kwargs = dict(inputs)
        if encoder_outputs is not None:
            kwargs = {"encoder_outputs": copy.copy(encoder_outputs),
                      "attention_mask": inputs["attention_mask"]}
        sequences = ckpt.model.generate(**kwargs, generation_config=config)
        return ckpt.decode(sequences.tolist(), tidy)


def _stepping_types() -> frozenset[str]:
    from .stepping.decoders import SUPPORTED_TYPES

    return SUPPORTED_TYPES


def _transformers_major() -> int:
    """The step loop calls transformers 5's generation helpers (their signatures changed from
    4.x); with 4.x the torch engine batches statically."""
    import transformers

    try:
        return int(transformers.__version__.split(".")[0])
    except ValueError:  # pragma: no cover - an unusual version string
        return 0
