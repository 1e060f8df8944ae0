"""Model manifests: per-family and per-checkpoint defaults, read from the TOML files in `models/`.

`models/families/*.toml` hold what holds for a whole architecture family (task prefixes, input
window, generation defaults), matched by the checkpoint's `model_type`. `models/*.toml` name
recommended checkpoints and may override any family value. `--model` accepts a manifest name
(`distilbart-cnn-12-6`) as well as a hub id or a directory.
"""

from __future__ import annotations

import functools
import json
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ModelLoadError

ROLES = ("summary", "headline")


@dataclass(frozen=True)
class PublishedScore:
    """A ROUGE result someone published for a checkpoint, with where it was published. ROUGE-L
    comes in two kinds: `rougeL` (longest common subsequence of the whole text) and `rougeLsum`
    (sentence by sentence; what CNN/DailyMail papers report as "ROUGE-L"), as in
    `summarizer evaluate`. Unreported measures stay None."""

    dataset: str
    source: str
    """URL of the model card or paper the figures come from."""
    reference: str = ""
    """Where in the source, e.g. the table."""
    rouge1: float | None = None
    rouge2: float | None = None
    rougeL: float | None = None  # noqa: N815 - named as rouge-score names it
    rougeLsum: float | None = None  # noqa: N815


@dataclass(frozen=True)
class Manifest:
    family: str
    model_types: tuple[str, ...]
    max_input_tokens: int
    summary_prefix: str
    headline_prefix: str
    num_beams: int
    summary_max_tokens: int
    summary_min_tokens: int
    headline_max_tokens: int
    headline_min_tokens: int
    chunked_headline: str = "summary"
    """What the headline of an article summarised in chunks is written from: "summary" or
    "opening+summary" (see the family manifests)."""
    name: str = ""
    hub_id: str = ""
    license: str = ""
    parameters: str = ""
    roles: tuple[str, ...] = ()
    """The outputs this checkpoint is recommended for ("summary", "headline")."""
    headline_model: str = ""
    """A separate headline model to pair with it (manifest name), if one is suggested."""
    safetensors_mb: int = 0
    """Size of its safetensors weights in MB as the hub lists it; 0: not known."""
    size_source: str = ""
    notes: str = ""
    scores: tuple[PublishedScore, ...] = ()


def _manifest_root() -> Path:
    # In a source checkout (or editable install) the files sit in <repo>/models; an installed
    # wheel carries them as the package data directory `service/model_manifests`.
    package = Path(__file__).resolve().parent.parent  # service/
    checkout = package.parent / "models"
    if (checkout / "families").is_dir():
        return checkout
    return package / "model_manifests"


CHUNKED_HEADLINE_SOURCES = ("summary", "opening+summary")


def _flatten(data: dict[str, Any]) -> dict[str, Any]:
    flat = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for task in ("summary", "headline"):
        for key, value in data.get(task, {}).items():
            flat[f"{task}_{key}"] = value
    if "model_types" in flat:
        flat["model_types"] = tuple(flat["model_types"])
    if "roles" in flat:
        flat["roles"] = tuple(flat["roles"])
        if not set(flat["roles"]) <= set(ROLES):
            raise ConfigError(f"roles must be among {', '.join(ROLES)}: {flat['roles']}")
    if "scores" in flat:
        known_score = {f.name for f in fields(PublishedScore)}
        for score in flat["scores"]:
            if set(score) - known_score:
                raise ConfigError("unknown score keys: "
                                  + ", ".join(sorted(set(score) - known_score)))
        flat["scores"] = tuple(PublishedScore(**score) for score in flat["scores"])
    known = {f.name for f in fields(Manifest)}
    unknown = set(flat) - known
    if unknown:
        raise ConfigError(f"unknown manifest keys: {', '.join(sorted(unknown))}")
    source = flat.get("chunked_headline", "summary")
    if source not in CHUNKED_HEADLINE_SOURCES:
        raise ConfigError(f"manifest key chunked_headline must be one of "
                          f"{', '.join(CHUNKED_HEADLINE_SOURCES)}, not {source!r}")
    return flat


@functools.cache
def load_root(root: Path) -> tuple[dict[str, Manifest], dict[str, dict[str, Any]]]:
    """The family manifests by family, and the named manifests' values by name, under `root`
    (a directory laid out like models/)."""
    families: dict[str, Manifest] = {}
    if not (root / "families" / "generic.toml").is_file():
        raise ConfigError(f"model manifests missing: no families/generic.toml under {root}")
    for path in sorted((root / "families").glob("*.toml")):
        data = _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        families[data["family"]] = Manifest(**data)
    named = {}
    for path in sorted(root.glob("*.toml")):
        data = _flatten(tomllib.loads(path.read_text(encoding="utf-8")))
        if data.get("family") not in families:
            raise ConfigError(f"manifest {path.name}: unknown family {data.get('family')!r}")
        named[data["name"]] = data
    return families, named


def families() -> dict[str, Manifest]:
    return load_root(_manifest_root())[0]


def named_models() -> dict[str, dict[str, Any]]:
    return load_root(_manifest_root())[1]


def lookup(model_ref: str) -> dict[str, Any] | None:
    """The named manifest `model_ref` refers to, by name or hub id, if any."""
    for data in named_models().values():
        if model_ref in (data["name"], data.get("hub_id")):
            return data
    return None


def source_for(model_ref: str) -> str:
    """What to load: a manifest name becomes its hub id; anything else is returned as is."""
    if Path(model_ref).expanduser().exists():
        return model_ref
    data = lookup(model_ref)
    return data["hub_id"] if data else model_ref


def close_names(model_ref: str, count: int = 3) -> list[str]:
    """Manifest names that look like `model_ref` (a misspelt name), closest first."""
    import difflib

    names = list(named_models())
    by_hub_name = {data["hub_id"].rsplit("/", 1)[-1]: name
                   for name, data in named_models().items() if data.get("hub_id")}
    close = difflib.get_close_matches(model_ref, [*names, *by_hub_name], n=count * 2)
    found = [str(by_hub_name.get(match, match)) for match in close]
    return list(dict.fromkeys(found))[:count]


def hub_id_for(model_ref: str) -> str:
    """The hub id of a manifest name or hub id. Hub ids have ORG/NAME form; a single name that
    is no manifest name is refused with the closest manifest names (it is most likely one of
    them, misspelt)."""
    hub_id = source_for(model_ref)
    if "/" not in hub_id:
        raise ModelLoadError(unknown_name(model_ref))
    return hub_id


def unknown_name(model_ref: str) -> str:
    """The message for a name that is no manifest name, directory or ORG/NAME hub id."""
    close = close_names(model_ref)
    hint = (f"did you mean {' or '.join(close)}? " if close else "")
    return (f"{model_ref!r} is not a manifest name, a local directory or a hub id (hub ids are "
            f"ORG/NAME, e.g. google-t5/t5-small); {hint}`summarizer models` lists the manifest "
            "names; for a test model use `summarizer make-tiny-model DIR`")


MARKER_FILE = "summarizer-model.json"
"""Written by `summarizer fetch` into a snapshot: which hub id (and so which manifest) it holds."""


def write_marker(directory: Path, hub_id: str) -> None:
    (directory / MARKER_FILE).write_text(json.dumps({"hub_id": hub_id}) + "\n", encoding="utf-8")


def _named_for(model_ref: str) -> dict[str, Any] | None:
    directory = Path(model_ref).expanduser()
    if not directory.exists():
        return lookup(model_ref)
    marker = directory / MARKER_FILE
    if marker.is_file():
        try:
            return lookup(json.loads(marker.read_text(encoding="utf-8"))["hub_id"])
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{marker}: unreadable; delete it or fetch the model again") from None
    return None


def manifest_for(model_ref: str, model_type: str, family: str = "") -> Manifest:
    """Defaults for a checkpoint: its family's, overridden by its named manifest, if any.

    The named manifest is found by manifest name or hub id, for a directory by the marker
    `summarizer fetch` leaves there; `family` may force a family or a manifest name.
    """
    all_families = families()
    named = _named_for(model_ref)
    if family and family not in all_families:
        named = lookup(family)
        if named is None:
            known = sorted(all_families) + sorted(named_models())
            raise ConfigError(f"unknown family or manifest {family!r}; known: {', '.join(known)}")
        family = ""
    if family:
        base = all_families[family]
    elif named:
        base = all_families[named["family"]]
    else:
        base = next((m for m in all_families.values() if model_type in m.model_types),
                    all_families["generic"])
    if named:
        base = replace(base, **{k: v for k, v in named.items() if k != "family"})
    return base


def catalogue() -> list[Manifest]:
    """The named manifests (recommended checkpoints), each complete with its family's values."""
    return [manifest_for(name, "") for name in named_models()]


def score_figures(score: PublishedScore) -> str:
    """The published figures in one line, e.g. "R-1 44.16, R-2 21.28, R-Lsum 40.90"."""
    return ", ".join(f"{label} {value:.2f}" for label, value in (
        ("R-1", score.rouge1), ("R-2", score.rouge2), ("R-L", score.rougeL),
        ("R-Lsum", score.rougeLsum)) if value is not None)


def _score_cell(score: PublishedScore) -> str:
    return f"{score_figures(score)} ([{score.reference or 'source'}]({score.source}))"


def markdown_table() -> str:
    """The table of recommended checkpoints in docs/models.md, generated so that it cannot drift."""
    rows = ["| name | hub id | family | roles | parameters | safetensors | licence | "
            "published ROUGE (CNN/DailyMail test) |", "|---|---|---|---|---|---|---|---|"]
    for manifest in catalogue():
        roles = " + ".join(manifest.roles) or "-"
        if manifest.headline_model:
            roles += f" (headlines: `{manifest.headline_model}`)"
        size = f"{manifest.safetensors_mb:,} MB" if manifest.safetensors_mb else "not known"
        scores = ("; ".join(_score_cell(s) for s in manifest.scores)
                  or f"none published: {manifest.notes}")
        rows.append(f"| `{manifest.name}` | `{manifest.hub_id}` | {manifest.family} | {roles} | "
                    f"{manifest.parameters} | {size} | {manifest.license} | {scores} |")
    return "\n".join(rows)
