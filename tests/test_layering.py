"""The package layout is the architecture, and these rules keep it so.

- `service/serving/` (queue, batch execution, the request path) imports no torch, transformers,
  ctranslate2, grpc or protobuf, and nothing of `service/api/`: scheduling knows no model and no
  wire format.
- `service/engines/` imports nothing of `service/api/` or `service/serving/`, and no grpc or
  protobuf: an engine can run in another process behind the serving layer.
- `service/workers/` (engine worker processes) imports nothing of `service/api/`, no grpc or
  protobuf: what crosses the pipe is token ids and strings.
- The shared modules (`config`, `errors`, `domain`, `text`) import none of the subpackages.

Checked twice: each module's own import statements (the direct rule), and a fresh interpreter
importing every serving module (what they pull in transitively).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = Path(__file__).resolve().parent.parent / "service"
HEAVY = ("torch", "transformers", "ctranslate2", "grpc", "grpc_health", "grpc_reflection",
         "google.protobuf", "summarizer_client.gen", "summarizer_client.client")
RULES = {
    "serving": HEAVY + ("service.api", "prometheus_client"),
    "engines": ("grpc", "google.protobuf", "summarizer_client.gen", "service.api",
                "service.serving"),
    "workers": ("grpc", "google.protobuf", "summarizer_client.gen", "service.api"),
    "": ("service.api", "service.serving", "service.engines", "service.workers", "torch",
         "grpc"),
}
SHARED = ("config.py", "errors.py", "domain.py", "text.py")


def imported(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved)."""
    package = ["service", *path.relative_to(SERVICE).parts[:-1]]
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


def modules(layer: str) -> list[Path]:
    if layer:
        return sorted((SERVICE / layer).glob("*.py"))
    return [SERVICE / name for name in SHARED]


def forbidden(name: str, banned: tuple[str, ...]) -> bool:
    return any(name == b or name.startswith(b + ".") for b in banned)


@pytest.mark.parametrize("layer", sorted(RULES))
def test_each_layer_imports_only_what_its_rule_allows(layer: str) -> None:
    found = modules(layer)
    assert found, f"no modules in service/{layer}"
    breaches = [f"{path.relative_to(SERVICE)} imports {name}"
                for path in found for name in sorted(imported(path))
                if forbidden(name, RULES[layer])]
    assert not breaches, breaches


def test_the_serving_layer_pulls_in_no_model_and_no_wire_format_transitively() -> None:
    names = [f"service.serving.{p.stem}" for p in modules("serving") if p.stem != "__init__"]
    script = ("import sys\n" + "".join(f"import {n}\n" for n in names)
              + f"print(sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') "
                f"for b in {HEAVY!r})))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=SERVICE.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout


def test_the_rule_can_fail() -> None:
    """The checker sees a breach when there is one (a test that cannot fail proves nothing)."""
    assert forbidden("service.api.servicer", RULES["serving"])
    assert forbidden("torch.nn", RULES["serving"])
    assert not forbidden("service.errors", RULES["serving"])
    assert "service.api.metrics" in imported(SERVICE / "api" / "server.py")
