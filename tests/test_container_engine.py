"""The image's runtime for ENGINE=ctranslate2 (the default) leaves torch and transformers out:
the Dockerfile's `serve` stage uninstalls them. Here a server runs in an environment made the
same way (a virtual environment with this one's packages less those the Dockerfile uninstalls,
so that they truly cannot be imported, in the server and in every process it starts): it serves
a converted checkpoint with `--engine auto`, and refuses an unconverted one with a line that
says what to do.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import grpc
import pytest
from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc

from .test_cli import ServerProcess, env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def uninstalled_by_the_dockerfile() -> set[str]:
    """The distributions the Dockerfile's ENGINE=ctranslate2 runtime leaves out."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (names,) = re.findall(r"pip uninstall --yes ([a-z0-9 _-]+?);", text)
    return set(names.split())


def test_the_dockerfile_leaves_torch_and_transformers_out_of_the_ctranslate2_runtime() -> None:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG ENGINE=ctranslate2$", text, re.MULTILINE)
    assert {"torch", "transformers"} <= uninstalled_by_the_dockerfile()
    assert "COPY --from=serve /opt/venv /opt/venv" in text  # the runtime takes that venv


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def venv_without(removed: set[str], into: Path) -> Path:
    """A virtual environment (its python returned) whose site-packages is this one's, entry by
    entry (symlinks), without the `removed` distributions (packages and metadata) and with the
    checkout's packages on a .pth file. A real environment, so that every process the server
    starts (workers, conversion) runs in it too."""
    removed = {_normalized(n) for n in removed}
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(into)], check=True,
                   timeout=120)
    site = Path(sysconfig.get_paths()["purelib"])
    (slim_site,) = into.glob("lib/python*/site-packages")
    for entry in site.iterdir():
        top = _normalized(entry.name.split("-")[0].removesuffix(".py"))
        if top in removed or entry.suffix == ".pth":
            continue
        (slim_site / entry.name).symlink_to(entry)
    (slim_site / "checkout.pth").write_text(f"{ROOT}\n{ROOT / 'clients' / 'python'}\n")
    return into / "bin" / "python"


@pytest.fixture(scope="module")
def slim_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The python of an environment like the ENGINE=ctranslate2 image's."""
    return str(venv_without(uninstalled_by_the_dockerfile(),
                            tmp_path_factory.mktemp("slim") / "venv"))


def run_slim(python: str, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([python, "-c", code], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=120, check=False)


def test_the_slim_environment_has_no_torch_but_the_server(slim_python: str) -> None:
    """The checks below can fail: torch and transformers cannot be imported there."""
    for module in ("torch", "transformers"):
        assert run_slim(slim_python, f"import {module}").returncode != 0, module
    done = run_slim(slim_python, "import sys, service.api.server, ctranslate2, tokenizers; "
                                 "print(sys.executable)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == slim_python  # its own interpreter: what it starts, too


@pytest.fixture(scope="module")
def converted_bart(tiny_bart: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("converted") / "bart"
    shutil.copytree(tiny_bart, model)
    subprocess.run([sys.executable, "-m", "service", "convert", str(model), "--in-place",
                    "--compute-type", "int8", "--offline"], check=True, capture_output=True,
                   env=env(), timeout=300)
    return model


class SlimServer(ServerProcess):
    """`summarizer serve` in the slim environment."""

    def __init__(self, python: str, *args: str) -> None:
        self.process = subprocess.Popen(
            [python, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0",
             "--threads", "1", *args], stderr=subprocess.PIPE, text=True, env=env(), cwd=ROOT)
        self.log: list[str] = []
        self.port = self._wait_for(r"listening on 127\.0\.0\.1:(\d+)")
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()


def test_a_converted_model_is_served_without_torch_or_transformers(
        slim_python: str, converted_bart: Path) -> None:
    server = SlimServer(slim_python, "--model", str(converted_bart))  # --engine auto
    try:
        server.wait_serving()
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.SummarizerStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            reply = stub.Summarize(pb.SummarizeRequest(articles=[pb.Article(
                id="a", text="The council met on Tuesday to vote on the new bus routes.")]),
                timeout=120)
    finally:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
        status = server.process.wait(timeout=60)
    assert info.engine == "ctranslate2", info
    (result,) = reply.results
    assert result.id == "a" and result.summary_tokens > 0 and result.headline_tokens > 0
    assert status == 0, "".join(server.log)


def test_an_unconverted_model_without_torch_is_one_line_that_says_what_to_do(
        slim_python: str, tiny_bart: Path, tmp_path: Path) -> None:
    # A HOME of its own: no conversion of this checkpoint cached by another test.
    done = subprocess.run(
        [slim_python, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0",
         "--model", str(tiny_bart)], capture_output=True, text=True,
        env=env(HOME=str(tmp_path)), cwd=ROOT, timeout=300, check=False)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert "summarizer convert" in done.stderr and "ENGINE=torch" in done.stderr, done.stderr
