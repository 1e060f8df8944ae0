"""Download a checkpoint snapshot for offline use (Docker builds, air-gapped hosts).

Only what serving needs is fetched: configs, tokenizer files and safetensors weights. Pickled
weights (.bin, .pt, .ckpt), TensorFlow, Flax and ONNX files are never downloaded. Many older hub
repositories (sshleifer/distilbart-cnn-12-6 among them) carry safetensors weights only in the pull
request that Hugging Face's conversion bot opened; as `from_pretrained` does, the weights are then
taken from that pull request, and only from the bot's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .errors import ModelLoadError, first_line
from .manifests import source_for, write_marker

log = logging.getLogger(__name__)

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.md"]
CONVERSION_PR_TITLE = "Adding `safetensors` variant of this model"
CONVERSION_BOT = "SFconvertbot"


def conversion_pr_revision(api: Any, repo_id: str) -> str | None:
    """The git reference of the conversion bot's open safetensors pull request, if any."""
    for discussion in api.get_repo_discussions(repo_id=repo_id):
        if (discussion.is_pull_request and discussion.status == "open"
                and discussion.title == CONVERSION_PR_TITLE
                and discussion.author == CONVERSION_BOT):
            return f"refs/pr/{discussion.num}"
    return None


def fetch(model_ref: str, out_dir: str | Path, revision: str = "") -> Path:
    """Download `model_ref` (hub id or manifest name) into `out_dir`; return the directory."""
    from huggingface_hub import HfApi, snapshot_download

    repo_id = source_for(model_ref)
    out = Path(out_dir)
    try:
        snapshot_download(repo_id, revision=revision or None, local_dir=out,
                          allow_patterns=ALLOW_PATTERNS)
        if not any(out.glob("*.safetensors")) and not revision:
            pr_revision = conversion_pr_revision(HfApi(), repo_id)
            if pr_revision:
                log.info("%s: safetensors weights from %s (%s's conversion)", repo_id,
                         pr_revision, CONVERSION_BOT)
                snapshot_download(repo_id, revision=pr_revision, local_dir=out,
                                  allow_patterns=["*.safetensors", "*.safetensors.index.json"])
    except Exception as error:  # noqa: BLE001 - every failure becomes one clear line
        raise ModelLoadError(
            f"cannot fetch {model_ref!r} ({repo_id}): {first_line(error)}") from error
    if not any(out.glob("*.safetensors")):
        raise ModelLoadError(f"{repo_id} publishes no safetensors weights; only safetensors "
                             "are served. Convert it with save_pretrained(safe_serialization=True)")
    write_marker(out, repo_id)  # so serving the directory still finds the model's manifest
    return out
