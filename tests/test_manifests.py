"""Model manifests: families by model_type, named checkpoints, overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from service import manifests
from service.errors import ConfigError


def test_every_family_manifest_is_complete() -> None:
    families = manifests.families()
    assert {"bart", "mbart", "pegasus", "t5", "led", "generic"} <= set(families)
    for family in families.values():
        assert family.max_input_tokens > 0 and family.num_beams > 0
        assert 0 < family.summary_min_tokens <= family.summary_max_tokens
        assert 0 < family.headline_min_tokens <= family.headline_max_tokens


@pytest.mark.parametrize(("model_type", "family", "prefix"), [
    ("bart", "bart", ""), ("t5", "t5", "summarize: "), ("mt5", "t5", "summarize: "),
    ("pegasus", "pegasus", ""), ("led", "led", ""), ("marian", "generic", ""),
])
def test_family_is_found_by_model_type(model_type: str, family: str, prefix: str) -> None:
    manifest = manifests.manifest_for("some/checkpoint", model_type)
    assert (manifest.family, manifest.summary_prefix) == (family, prefix)


def test_named_manifest_overrides_its_family() -> None:
    flan = manifests.manifest_for("google/flan-t5-base", "t5")
    assert flan.family == "t5" and flan.summary_prefix == "summarize: "
    assert flan.headline_prefix.startswith("Write a short headline")
    assert flan.summary_max_tokens == 96 and flan.headline_max_tokens == 24
    assert flan.license == "apache-2.0"


def test_manifest_names_resolve_to_hub_ids(tmp_path: Path) -> None:
    assert manifests.source_for("distilbart-cnn-12-6") == "sshleifer/distilbart-cnn-12-6"
    assert manifests.source_for("org/unknown") == "org/unknown"
    assert manifests.source_for(str(tmp_path)) == str(tmp_path)  # a directory stays a directory


def test_forced_family_or_manifest_and_unknown_family() -> None:
    assert manifests.manifest_for("x/y", "bart", family="t5").summary_prefix == "summarize: "
    forced = manifests.manifest_for("./local-dir", "t5", family="flan-t5-base")
    assert forced.headline_prefix.startswith("Write a short headline")
    with pytest.raises(ConfigError, match="unknown family or manifest 'nope'"):
        manifests.manifest_for("x/y", "bart", family="nope")


def test_a_fetched_directory_keeps_its_named_manifest(tmp_path: Path) -> None:
    assert manifests.manifest_for(str(tmp_path), "t5").headline_prefix == "summarize: "
    manifests.write_marker(tmp_path, "google/flan-t5-base")  # what `summarizer fetch` leaves
    manifest = manifests.manifest_for(str(tmp_path), "t5")
    assert manifest.headline_prefix.startswith("Write a short headline")
    assert manifest.name == "flan-t5-base"
    (tmp_path / manifests.MARKER_FILE).write_text("{broken")
    with pytest.raises(ConfigError, match="unreadable"):
        manifests.manifest_for(str(tmp_path), "t5")


@pytest.mark.slow
def test_an_installed_wheel_carries_the_manifests(tmp_path: Path) -> None:
    """Outside a checkout the manifests come from package data; build the wheel and look."""
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(root)], check=True, timeout=300,
                   capture_output=True)
    wheel = next((tmp_path / "dist").glob("summarizer-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
    probe = ("from service import manifests; "
             "print(sorted(manifests.families())); print(sorted(manifests.named_models()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr
    families, named = done.stdout.splitlines()
    assert "'generic'" in families and "'t5'" in families
    assert "'distilbart-cnn-12-6'" in named
