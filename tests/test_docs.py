"""The documentation stays true: its runnable examples run against a real server, its module map
lists the modules that exist, and the README's commands and links point at real things.

(`mkdocs build --strict`, in .ci/run, checks the links and anchors between the pages of docs/.)
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
RUNNABLE_MARK = "<!-- runnable -->"
EXAMPLE_TARGET = "localhost:50051"
"""The server address examples use; the test points it at the server it starts."""
MAPPED_ROOTS = ("service", "clients/python/summarizer_client", "benchmarks", "protos")
UNMAPPED = {"__init__.py", "__main__.py"}
"""Package markers and `python -m` shims: not modules with a job of their own."""
GENERATED = "clients/python/summarizer_client/gen"


@dataclass(frozen=True)
class Example:
    page: str
    line: int
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def runnable_examples() -> list[Example]:
    """Every fenced block right after a `<!-- runnable -->` line; the mark must be followed by a
    Python block (a mark before anything else is an error, not a silently skipped example)."""
    examples = []
    for page in markdown_pages():
        lines = page.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines):
            if line.strip() != RUNNABLE_MARK:
                continue
            where = f"{page.relative_to(ROOT)}:{number + 1}"
            fence = lines[number + 1] if number + 1 < len(lines) else ""
            assert fence.strip() == "```python", (
                f"{where}: {RUNNABLE_MARK} must be followed directly by a ```python block")
            end = lines.index("```", number + 2)
            examples.append(Example(str(page.relative_to(ROOT)), number + 2,
                                    "\n".join(lines[number + 2:end]) + "\n"))
    return examples


EXAMPLES = runnable_examples()


def test_the_client_examples_are_marked_runnable() -> None:
    pages = {example.page for example in EXAMPLES}
    assert "docs/clients.md" in pages and len(EXAMPLES) >= 3, [str(e) for e in EXAMPLES]
    assert all(EXAMPLE_TARGET in example.code for example in EXAMPLES), (
        f"a runnable example must call the server at {EXAMPLE_TARGET}, which the test points "
        "at the server it starts")


@pytest.fixture(scope="module")
def example_server(tiny_bart: Path) -> Iterator[str]:
    from tests.test_cli import ServerProcess

    server = ServerProcess("--model", str(tiny_bart), "--summary-max-tokens", "12",
                           "--headline-max-tokens", "6")
    try:
        server.wait_serving()
        yield server.target
    finally:
        server.process.kill()
        server.process.wait()


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=str)
def test_runnable_example_runs_against_a_server(example: Example, example_server: str) -> None:
    """Run as a reader would paste it, from the repository's root."""
    code = example.code.replace(EXAMPLE_TARGET, example_server)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"the example at {example} failed:\n{done.stderr}"
    assert done.stdout.strip(), f"the example at {example} printed nothing"


# --- the module map -------------------------------------------------------------------------


def existing_modules() -> set[str]:
    modules = set()
    for root in MAPPED_ROOTS:
        for path in (ROOT / root).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if path.name not in UNMAPPED and not relative.startswith(GENERATED):
                modules.add(relative)
    return modules


def mapped_modules() -> set[str]:
    text = (DOCS / "development.md").read_text(encoding="utf-8")
    match = re.search(r"^## Module map\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, "docs/development.md has no '## Module map' section"
    table = "\n".join(line for line in match.group(1).splitlines() if line.startswith("| `"))
    return set(re.findall(r"`([\w./]+\.py)`", table))


def test_module_map_lists_exactly_the_modules_that_exist() -> None:
    existing, mapped = existing_modules(), mapped_modules()
    problems = [f"add a row for {module}: | `{module}` | <its one job> |  (under its layer)"
                for module in sorted(existing - mapped)]
    problems += [f"remove {module} from its row: no such module"
                 for module in sorted(mapped - existing)]
    assert not problems, ("docs/development.md, '## Module map', is out of date:\n  "
                          + "\n  ".join(problems))


def test_module_map_check_names_a_missing_module(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail, and says which row to add."""
    monkeypatch.setattr(sys.modules[__name__], "existing_modules",
                        lambda: mapped_modules() | {"service/serving/newly_added.py"})
    with pytest.raises(AssertionError, match=re.escape(
            "add a row for service/serving/newly_added.py: | `service/serving/newly_added.py` |")):
        test_module_map_lists_exactly_the_modules_that_exist()


# --- the README -------------------------------------------------------------------------------


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def code_blocks(text: str, language: str = "bash") -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_readme_links_and_files_exist() -> None:
    text = readme()
    targets = {link.split("#")[0] for link in re.findall(r"\]\(([^)#][^)]*)\)", text)
               if "://" not in link}
    named = set(re.findall(r"(docs/[\w/.-]+\.\w+)", text))
    missing = sorted(t for t in targets | named if not (ROOT / t).exists())
    assert targets and not missing, f"README.md names files that do not exist: {missing}"


def test_readme_offline_quick_start_matches_the_docs() -> None:
    """The offline block is written twice (README, docs/index.md); both must stay the same, use
    the tiny model and summarise the two sample articles."""
    [offline] = [block for block in code_blocks(readme()) if "make-tiny-model" in block]
    assert offline in code_blocks((DOCS / "index.md").read_text(encoding="utf-8"))
    samples = sorted((DOCS / "examples").glob("*.txt"))
    assert len(samples) == 2 and all(s.read_text(encoding="utf-8").strip() for s in samples)
    for sample in samples:
        assert sample.relative_to(ROOT).as_posix() in offline


def test_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    [tests] = [block for block in code_blocks(readme()) if "pytest" in block]
    install, _, run = tests.strip().partition(" && ")
    assert install == "pip install -e clients/python -e '.[test]'", tests
    assert f"python -m {install}" in ci, "CI installs what the README's test command installs"
    assert run == "python -m pytest" and "\npython -m pytest\n" in ci


def test_client_install_figures_say_what_is_measured() -> None:
    """The figures quoted are the ones .ci/run prints: what the install adds, with and without
    pip and setuptools, and the time with its conditions."""
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'echo "client install: pip install ./clients/python added' in ci
    page = (DOCS / "clients.md").read_text(encoding="utf-8")
    quoted = re.search(r"What it costs, as `\.ci/run` measures it.*?load average \d+\.", page,
                       re.S)
    assert quoted, "docs/clients.md must say where its client-install figures come from"
    sentence = " ".join(quoted.group(0).split())
    for needed in ("adds **22 MB** to a fresh virtual environment", "47 MB",
                   "pip and setuptools", "load average"):
        assert needed in sentence, (needed, sentence)


@pytest.mark.slow
def test_readme_offline_quick_start_runs(tmp_path: Path) -> None:
    """The README's offline block, as pasted (the install lines aside: this environment is the
    install), in bash from the repository's root; SUMMARIZER_PORT moves both the server and the
    client commands off the default port, and the tiny model goes to a temporary directory."""
    [offline] = [block for block in code_blocks(readme()) if "make-tiny-model" in block]
    lines = [line for line in offline.splitlines()
             if not line.startswith(("python3 -m venv", "pip install"))]
    script = "set -e\n" + "\n".join(lines).replace("./tiny-model", str(tmp_path / "tiny-model"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("SUMMARIZER_", "HF_"))}
    environ.update(SUMMARIZER_PORT=str(port), HF_HUB_OFFLINE="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{environ.get('PATH', '')}")
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["id"] for r in results] == ["council-buses", "harbour-bridge"]
    assert all(r["summary"] and r["headline"] for r in results)
