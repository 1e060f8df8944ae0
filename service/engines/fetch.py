"""Download a checkpoint snapshot for offline use (Docker builds, air-gapped hosts).

Only what serving needs is fetched: configs, tokenizer files and safetensors weights. Pickled
weights (.bin, .pt, .ckpt), TensorFlow, Flax and ONNX files are never downloaded. Many older hub
repositories (sshleifer/distilbart-cnn-12-6 among them) carry safetensors weights only in the pull
request that Hugging Face's conversion bot opened; as `from_pretrained` does, the weights are then
taken from that pull request, and only from the bot's.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from ..errors import ModelLoadError, first_line
from .manifests import hub_id_for, write_marker

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5.0
"""How long one request may take to tell whether the model hub can be reached at all."""

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


@functools.cache
def hub_unreachable() -> str:
    """Why the model hub cannot be reached at all, or "" when it answers (any HTTP status).

    One request with a short timeout and no retries: without a network, huggingface_hub retries
    each file for about 30 s before it gives up. The answer is kept for the process."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - any failure to get an answer means unreachable
        return f"{constants.ENDPOINT}: {first_line(error)}"
    return ""


def in_hub_cache(repo_id: str, revision: str = "") -> bool:
    """The hub cache already holds `repo_id` (its config at least), so it can load offline."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision or None)
    except Exception:  # noqa: BLE001 - e.g. a malformed id: not in the cache
        return False
    return isinstance(found, str)


def offline_help(model_ref: str) -> str:
    """What to do when `model_ref` cannot be downloaded."""
    return (f"without the hub, serve a checkpoint directory (--model DIR) made with `summarizer "
            f"fetch {model_ref} --out DIR` where the hub can be reached, use a copy already in "
            "the hub cache with --offline, or try the service on a random-weight model from "
            "`summarizer make-tiny-model DIR`")


def make_readable(directory: Path) -> None:
    """Files 0644 and directories 0755 under `directory` (itself included): `save_pretrained`
    writes weights owner-only (0600), which a container's non-root user cannot read when the
    directory is mounted."""
    directory.chmod(0o755)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)


def fetch(model_ref: str, out_dir: str | Path, revision: str = "") -> Path:
    """Download `model_ref` (hub id or manifest name) into `out_dir`; return the directory."""
    from huggingface_hub import HfApi, snapshot_download

    repo_id = hub_id_for(model_ref)
    out = Path(out_dir)
    unreachable = hub_unreachable()
    if unreachable:
        raise ModelLoadError(f"cannot fetch {model_ref!r} ({repo_id}): cannot reach the model "
                             f"hub ({unreachable}); run `summarizer fetch` where it can be "
                             "reached and copy the directory, or try the service on a "
                             "random-weight model from `summarizer make-tiny-model DIR`")
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
    make_readable(out)
    return out
