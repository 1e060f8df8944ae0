"""Download a checkpoint snapshot for offline use (Docker builds, air-gapped hosts).

Only what serving needs is fetched: configs, tokenizer files and safetensors weights. Pickled
weights (.bin, .pt, .ckpt), TensorFlow, Flax and ONNX files are never downloaded.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ModelLoadError
from .manifests import source_for, write_marker

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.md"]


def fetch(model_ref: str, out_dir: str | Path, revision: str = "") -> Path:
    """Download `model_ref` (hub id or manifest name) into `out_dir`; return the directory."""
    from huggingface_hub import snapshot_download

    repo_id = source_for(model_ref)
    out = Path(out_dir)
    try:
        snapshot_download(repo_id, revision=revision or None, local_dir=out,
                          allow_patterns=ALLOW_PATTERNS)
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise ModelLoadError(f"cannot fetch {model_ref!r} ({repo_id}): {first}") from error
    if not any(out.glob("*.safetensors")):
        raise ModelLoadError(f"{repo_id} publishes no safetensors weights; only safetensors "
                             "are served. Convert it with save_pretrained(safe_serialization=True)")
    write_marker(out, repo_id)  # so serving the directory still finds the model's manifest
    return out
