"""Model manifests: families by model_type, named checkpoints, overrides."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import grpc
import pytest

from service.engines import manifests
from service.errors import ConfigError
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc


def test_every_family_manifest_is_complete() -> None:
    families = manifests.families()
    assert {"bart", "mbart", "pegasus", "t5", "led", "generic"} <= set(families)
    for family in families.values():
        assert family.max_input_tokens > 0 and family.num_beams > 0
        assert 0 < family.summary_min_tokens <= family.summary_max_tokens
        assert 0 < family.headline_min_tokens <= family.headline_max_tokens


def test_every_family_says_what_a_chunked_articles_headline_is_written_from() -> None:
    families = manifests.families()
    assert all(f.chunked_headline in manifests.CHUNKED_HEADLINE_SOURCES
               for f in families.values())
    assert families["bart"].chunked_headline == "opening+summary"
    assert families["t5"].chunked_headline == "summary"


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
    """Outside a checkout the manifests come from package data; build the wheels (the server
    and the client it depends on) and look."""
    import subprocess
    import sys
    import zipfile

    import shutil

    root = Path(__file__).resolve().parent.parent
    # Built from a copy: setuptools builds in the source's build/, whose leftovers from earlier
    # builds would hide a package missing from pyproject's list.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests")
    for name in ("pyproject.toml", "README.md"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    for name in ("service", "models", "protos", "clients"):
        shutil.copytree(root / name, source / name, ignore=ignore)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist"), str(source),
                    str(source / "clients" / "python")],
                   check=True, timeout=300, capture_output=True)
    for wheel in (tmp_path / "dist").glob("summarizer*.whl"):
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(tmp_path / "site")
    assert (tmp_path / "site" / "summarizer_client" / "gen" / "summarizer" / "v1"
            / "summarizer_pb2.pyi").is_file()
    # Every package of the checkout is in the wheel (a subpackage missing from pyproject's list
    # imports fine from a checkout and fails in the container).
    for init in (root / "service").rglob("__init__.py"):
        package = init.parent.relative_to(root)
        assert (tmp_path / "site" / package / "__init__.py").is_file(), f"{package} not packaged"
    probe = ("import service.api.server, service.workers.child; "
             "from service.engines import manifests; "
             "print(sorted(manifests.families())); print(sorted(manifests.named_models()))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0, done.stderr
    families, named = done.stdout.splitlines()
    assert "'generic'" in families and "'t5'" in families
    assert "'distilbart-cnn-12-6'" in named


# ----- what the named manifests tell a user: roles, size, licence, published scores -----

def test_named_manifests_say_roles_licence_size_and_scores_with_sources() -> None:
    catalogue = {m.name: m for m in manifests.catalogue()}
    assert set(catalogue) == set(manifests.named_models())
    for manifest in catalogue.values():
        assert manifest.roles and set(manifest.roles) <= set(manifests.ROLES)
        assert manifest.license and manifest.parameters.endswith("M")
        assert manifest.safetensors_mb == 0 or manifest.size_source.startswith("https://")
        if manifest.headline_model:  # a suggested headline model is one that writes headlines
            assert "headline" in catalogue[manifest.headline_model].roles
        assert manifest.scores or manifest.notes  # no scores: say why
        for score in manifest.scores:
            assert score.source.startswith("https://") and score.dataset
            figures = [score.rouge1, score.rouge2, score.rougeL, score.rougeLsum]
            assert any(f is not None for f in figures)
            assert all(f is None or 0 < f < 100 for f in figures)
    # Spot checks against the sources (see the comments in models/*.toml).
    assert catalogue["bart-large-cnn"].scores[0].rougeLsum == 40.90
    assert catalogue["distilbart-cnn-12-6"].scores[0].rouge2 == 21.26
    assert catalogue["flan-t5-base"].scores == ()
    # The serving values still come through: family defaults under the catalogue entry.
    assert catalogue["flan-t5-base"].summary_prefix == "summarize: "


def test_family_manifests_and_old_style_named_manifests_load_without_the_new_fields(
        tmp_path: Path) -> None:
    def root(name: str, named_manifest: str) -> Path:
        (tmp_path / name / "families").mkdir(parents=True)
        (tmp_path / name / "families" / "generic.toml").write_text(
            'family = "generic"\nmodel_types = []\nmax_input_tokens = 512\n'
            'summary_prefix = ""\nheadline_prefix = ""\nnum_beams = 2\n'
            '[summary]\nmax_tokens = 64\nmin_tokens = 8\n[headline]\nmax_tokens = 16\n'
            'min_tokens = 2\n')
        (tmp_path / name / f"{name}.toml").write_text(named_manifest)
        return tmp_path / name

    families, named = manifests.load_root(
        root("old", 'name = "old"\nhub_id = "org/old"\nfamily = "generic"\n'))
    assert families["generic"].roles == () and families["generic"].scores == ()
    assert named == {"old": {"name": "old", "hub_id": "org/old", "family": "generic"}}
    bad = root("bad", 'name = "bad"\nfamily = "generic"\n[[scores]]\ndataset = "x"\n'
                      'source = "https://x"\nbleu = 3.0\n')
    with pytest.raises(ConfigError, match="unknown score keys: bleu"):
        manifests.load_root(bad)


def test_documented_model_table_is_generated_from_the_manifests() -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text(
        encoding="utf-8")
    assert manifests.markdown_table() in page, (
        "docs/models.md's model table is stale: paste the output of "
        "`python -c 'from service.engines.manifests "
        "import markdown_table; print(markdown_table())'`")


def test_models_command_lists_the_manifests(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import main

    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("name") and len(lines) == 1 + len(manifests.named_models())
    assert any(line.startswith("bart-large-cnn") and "R-Lsum 40.90" in line for line in lines)
    assert main(["models", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {m["name"] for m in listed} == set(manifests.named_models())
    assert listed[0]["scores"][0]["source"].startswith("https://")


@pytest.mark.slow
def test_serve_resolves_a_manifest_name_to_its_hub_id_and_manifest(tiny_t5: Path,
                                                                    tmp_path: Path) -> None:
    """`serve --model flan-t5-base` loads google/flan-t5-base from the hub cache (here: a tiny
    T5 placed there, offline) and applies the named manifest (FLAN's headline prompt)."""
    from tests.test_cli import ServerProcess

    snapshot = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--google--flan-t5-base"
    shutil.copytree(tiny_t5, repo / "snapshots" / snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot)
    server = ServerProcess("--model", "flan-t5-base", "--offline", HF_HOME=str(tmp_path / "hf"))
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            info = pb_grpc.SummarizerStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                timeout=30)
    finally:
        server.stop()
    model = info.models[0]
    assert (model.model_id, model.family) == ("flan-t5-base", "t5")
    assert model.headline_prefix == "Write a short headline for this news article: "
