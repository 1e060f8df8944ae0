"""The package layout is the architecture, and these rules keep it so.

- `service/serving/` (queue, batch execution, the request path) imports no torch, transformers,
  ctranslate2, grpc or protobuf, and nothing of `service/api/`: scheduling knows no model and no
  wire format.
- `service/engines/` (with `engines/stepping/`) imports nothing of `service/api/` or
  `service/serving/`, and no grpc or protobuf: an engine can run in another process behind the
  serving layer.
- `service/workers/` (engine worker processes) imports nothing of `service/api/`, no grpc or
  protobuf: what crosses the pipe is token ids and strings.
- The shared modules (`config`, `errors`, `domain`, `text`) import none of the subpackages.
- `service/api/` (the gRPC edge) and the entry points (`cli`, `evaluate`, `__main__`) may import
  any layer.

Every module under service/ is checked, at any depth, and each belongs to exactly one of these
rules: a new subpackage or top-level module fails the test until it is given one. Checked twice:
each module's own import statements (the direct rule), and a fresh interpreter importing every
serving module and the shared ones (what they pull in transitively).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
HEAVY = ("torch", "transformers", "ctranslate2", "grpc", "grpc_health", "grpc_reflection",
         "google.protobuf", "summarizer_client.gen", "summarizer_client.client")
SUBPACKAGES = ("service.api", "service.serving", "service.engines", "service.workers")
RULES: dict[str, tuple[str, ...]] = {
    "serving": HEAVY + ("service.api", "prometheus_client"),
    "engines": ("grpc", "google.protobuf", "summarizer_client.gen", "service.api",
                "service.serving"),
    "workers": ("grpc", "google.protobuf", "summarizer_client.gen", "service.api"),
    "shared": SUBPACKAGES + ("torch", "grpc"),
    "api": (),
    "entry": (),
}
SHARED = ("config.py", "errors.py", "domain.py", "text.py")
ENTRY = ("__init__.py", "__main__.py", "cli.py", "evaluate.py")


def layer_of(path: Path, root: Path = SERVICE) -> str | None:
    """The rule `path` (a module under `root`) answers to; None: no rule names it."""
    parts = path.relative_to(root).parts
    if len(parts) > 1:
        return parts[0] if parts[0] in RULES else None
    if parts[0] in SHARED:
        return "shared"
    return "entry" if parts[0] in ENTRY else None


def imported(path: Path, root: Path = SERVICE) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved), anywhere in the
    module: in functions too, and under `if TYPE_CHECKING:`."""
    package = [root.name, *path.relative_to(root).parts[:-1]]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                names.add(".".join(base + ([node.module] if node.module else [])))
            else:
                names.add(node.module or "")
    return names


def forbidden(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


def all_modules(root: Path = SERVICE) -> list[Path]:
    """Every Python module under `root`, at any depth."""
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


def breaches(root: Path = SERVICE) -> list[str]:
    """Every import that breaks its module's rule, and every module that has no rule."""
    found = []
    for path in all_modules(root):
        layer = layer_of(path, root)
        where = path.relative_to(root)
        if layer is None:
            found.append(f"{where} belongs to no layer rule: add it to RULES")
            continue
        found += [f"{where} ({layer}) imports {name}" for name in sorted(imported(path, root))
                  if forbidden(name, RULES[layer])]
    return found


def test_every_module_follows_its_layer_rule() -> None:
    assert not breaches()


@pytest.mark.parametrize("layer", sorted(RULES))
def test_each_rule_covers_modules(layer: str) -> None:
    """A rule that matches nothing (a renamed subpackage) would silently check nothing."""
    assert any(layer_of(p) == layer for p in all_modules()), f"no module answers to {layer}"


def test_nested_packages_are_checked() -> None:
    checked = {p.relative_to(SERVICE).as_posix() for p in all_modules()}
    assert "engines/stepping/session.py" in checked
    assert layer_of(SERVICE / "engines" / "stepping" / "session.py") == "engines"


@pytest.mark.parametrize(("module", "planted"), [
    ("engines/stepping/session.py", "import grpc"),
    ("engines/stepping/search.py", "from ...serving import queue"),
    ("serving/queue.py", "import torch"),
    ("workers/pool.py", "from ..api.servicer import SummarizerServicer"),
    ("config.py", "from .engines import protocol"),
])
def test_the_checker_catches_a_planted_import(tmp_path: Path, module: str, planted: str) -> None:
    """The checker run over a copy of the tree with one forbidden import planted (inside a
    function, where a review would miss it) reports exactly that import."""
    root = tmp_path / "service"
    shutil.copytree(SERVICE, root, ignore=shutil.ignore_patterns("__pycache__"))
    assert not breaches(root)
    target = root / module
    target.write_text(target.read_text(encoding="utf-8")
                      + f"\n\ndef _planted() -> None:\n    {planted}\n", encoding="utf-8")
    found = breaches(root)
    assert len(found) == 1 and found[0].startswith(f"{module} ("), found


def test_the_checker_catches_a_module_without_a_rule(tmp_path: Path) -> None:
    root = tmp_path / "service"
    shutil.copytree(SERVICE, root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "plugins").mkdir()
    (root / "plugins" / "extra.py").write_text("import os\n", encoding="utf-8")
    (root / "helpers.py").write_text("import os\n", encoding="utf-8")
    assert breaches(root) == ["helpers.py belongs to no layer rule: add it to RULES",
                              "plugins/extra.py belongs to no layer rule: add it to RULES"]


def loaded_by(modules: list[str], banned: tuple[str, ...]) -> list[str]:
    """The `banned` modules (or their submodules) a fresh interpreter has loaded after importing
    `modules`."""
    script = ("import sys\n" + "".join(f"import {n}\n" for n in modules)
              + f"print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') "
                f"for b in {banned!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=SERVICE.parent)
    assert done.returncode == 0, done.stderr
    return ast.literal_eval(done.stdout.strip())


def test_the_serving_layer_pulls_in_no_model_and_no_wire_format_transitively() -> None:
    serving = [f"service.serving.{p.stem}" for p in all_modules()
               if layer_of(p) == "serving" and p.stem != "__init__"]
    assert loaded_by(serving, HEAVY + ("service.api",)) == []


def test_the_shared_modules_pull_in_no_subpackage_transitively() -> None:
    shared = [f"service.{Path(name).stem}" for name in SHARED]
    assert loaded_by(shared, RULES["shared"]) == []


def test_the_rule_can_fail() -> None:
    """The predicates see a breach when there is one (a test that cannot fail proves nothing)."""
    assert forbidden("service.api.servicer", RULES["serving"])
    assert forbidden("torch.nn", RULES["serving"])
    assert not forbidden("service.errors", RULES["serving"])
    assert "service.api.metrics" in imported(SERVICE / "api" / "server.py")
    assert "service.engines.protocol" in imported(SERVICE / "engines" / "stepping" / "session.py")
