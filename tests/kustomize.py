"""What the kustomizations under deploy/kubernetes put together, read without kustomize (the
files each one lists, through its resources and components, recursively), and rendered with
`kubectl kustomize` where kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = [KUBERNETES, *OVERLAYS]
"""Every directory a user applies: the top one (`kubectl apply -k deploy/kubernetes`) and the
overlays."""
AUTOSCALER_KINDS = {"HorizontalPodAutoscaler", "ScaledObject"}


def kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text(encoding="utf-8"))


def listed_files(directory: Path) -> list[Path]:
    """The manifest files `directory`'s kustomization takes in, following the directories it
    lists (resources and components) down. A listed path that does not exist fails here."""
    files: list[Path] = []
    spec = kustomization(directory)
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        assert path.exists(), f"{directory / 'kustomization.yaml'} lists {entry}: not there"
        files.extend(listed_files(path) if path.is_dir() else [path])
    return files


def objects(directory: Path) -> list[dict[str, Any]]:
    """The Kubernetes objects of `directory`'s kustomization, as the files hold them."""
    found = []
    for path in listed_files(directory):
        found.extend(d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d)
    return found


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named = {f"{o['kind']}/{o['metadata']['name']}": o for o in items}
    assert len(named) == len(items), "two objects with the same kind and name"
    return named


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY`: what `kubectl apply -k` would send."""
    tool = kubectl()
    assert tool is not None
    done = subprocess.run([tool, "kustomize", str(directory)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]
