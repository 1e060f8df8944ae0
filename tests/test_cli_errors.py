"""First-run mistakes: every subcommand, run as a real process, answers a user's error with one
line that says what went wrong and what to do, a non-zero exit, and no traceback."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import cli
from summarizer_client import cli as client_cli
from summarizer_client.cli import default_target
from summarizer_client.errors import ClientError
from service.engines.checkpoint import looks_like_path, resolve_source
from service.config import Settings
from service.errors import ModelLoadError

CLI = [sys.executable, "-m", "service"]


def env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("SUMMARIZER_", "HF_"))}
    environ.update({"HF_HUB_OFFLINE": "1", **extra})
    return environ


def run(*args: str, stdin: bytes | None = None, **environ: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], input=stdin, capture_output=True, timeout=120,
                          env=env(**environ))


def assert_one_clear_line(done: subprocess.CompletedProcess, *expected: str) -> str:
    stderr = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    assert done.returncode not in (0, None), stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    [line] = lines
    assert line.startswith("summarizer") and "error:" in line, line
    for text in expected:
        assert text in line, line
    return line


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    paths = {
        "good": root / "good.txt", "binary": root / "program", "latin1": root / "latin1.txt",
        "empty": root / "empty.txt", "missing": root / "absent.txt",
        "unreadable": root / "secret.txt", "data": root / "eval.jsonl",
        "model": root / "model", "file": root / "a-file",
    }
    paths["good"].write_text("The council voted to expand the bus network.\n")
    paths["binary"].write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    paths["latin1"].write_bytes("Caf\u00e9 prices rose in M\u00fcnchen.\n".encode("latin-1"))
    paths["empty"].write_text("  \n")
    paths["unreadable"].write_text("text")
    paths["unreadable"].chmod(0)
    paths["data"].write_text(json.dumps({"text": "An article.", "summary": "A summary."}) + "\n")
    paths["model"].mkdir()
    (paths["model"] / "config.json").write_text("{}")  # enough to get past the path checks
    paths["file"].write_text("x")
    return paths


@pytest.fixture()
def closed_port() -> Iterator[int]:
    """A port nothing listens on: held bound (so no other process can take it meanwhile) but
    never listening, so connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture()
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


NO_SERVER = "no server at 127.0.0.1:{port}; start one with `summarizer serve"

# (subcommand arguments, texts the one line must hold); {good}, {port}... are filled in.
MISTAKES = [
    # serve
    (["serve", "--model", "{missing}", "--port", "0"], ["does not exist"]),
    (["serve", "--model", "{model}", "--host", "127.0.0.1", "--port", "{taken}"],
     ["cannot listen on 127.0.0.1:{taken}", "--port"]),
    (["serve", "--model", "distilbart-cnn"], ["did you mean distilbart-cnn-12-6"]),
    (["serve", "--port", "abc"], ["summarizer serve: error:", "--port"]),
    (["serve", "--bogus"], ["summarizer serve: error: unrecognized arguments: --bogus",
                            "summarizer serve --help"]),
    # summarize
    (["summarize", "--server", "127.0.0.1:{port}", "{missing}"], ["{missing}", "no such file"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{binary}"], ["{binary}", "binary"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{latin1}"],
     ["{latin1}", "is not UTF-8", "convert it"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{unreadable}"],
     ["{unreadable}", "permission denied"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{empty}"], ["{empty}", "is empty"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{model}"], ["{model}", "is a directory"]),
    (["summarize", "--server", "127.0.0.1:{port}", "{good}"], [NO_SERVER]),
    (["summarize", "--server", "host:port", "{good}"], ["--server", "HOST:PORT"]),
    (["summarize", "--batch", "0", "{good}"], ["--batch", "at least 1"]),
    (["summarize", "{good}", "--bogus"], ["summarizer summarize: error: unrecognized"]),
    (["summarize", "--server", "127.0.0.1:{port}", "--input", "{missing}"], ["no such file"]),
    # fetch
    (["fetch", "distilbart-cnn", "--out", "{missing}"], ["did you mean distilbart-cnn-12-6"]),
    (["fetch", "distilbart-cnn-12-6"], ["summarizer fetch: error:", "--out"]),
    (["fetch", "x/y", "--out", "{missing}", "--bogus"], ["summarizer fetch: error:"]),
    # convert
    (["convert", "{missing}", "--out", "{missing}"], ["does not exist"]),
    (["convert", "{model}", "--out", "x", "--compute-type", "int3"], ["--compute-type"]),
    (["convert", "{model}", "--bogus"], ["summarizer convert: error:"]),
    # health
    (["health", "--server", "127.0.0.1:{port}"], [NO_SERVER]),
    (["health", "--server", "127.0.0.1:99999"], ["--server"]),
    (["health", "--timeout", "soon"], ["--timeout"]),
    (["health", "--bogus"], ["summarizer health: error:"]),
    # soak
    (["soak", "--server", "127.0.0.1:{port}", "--duration", "1"], [NO_SERVER]),
    (["soak", "--clients", "0"], ["--clients", "at least 1"]),
    (["soak", "--server", "127.0.0.1:{port}", "--max-chars", "5"], ["--max-chars"]),
    (["soak", "--bogus"], ["summarizer soak: error:"]),
    # evaluate
    (["evaluate", "--server", "127.0.0.1:{port}", "--data", "{missing}"], ["no such file"]),
    (["evaluate", "--server", "127.0.0.1:{port}", "--data", "{binary}"], ["binary"]),
    (["evaluate", "--server", "127.0.0.1:{port}", "--data", "{data}"], [NO_SERVER]),
    (["evaluate", "--model", "{missing}", "--data", "{data}"], ["does not exist"]),
    (["evaluate", "--data", "{data}", "--limit", "-1"], ["--limit"]),
    (["evaluate", "--bogus"], ["summarizer evaluate: error:"]),
    # models
    (["models", "--bogus"], ["summarizer models: error:"]),
    # make-tiny-model
    (["make-tiny-model", "{file}"], ["{file}", "is a file"]),
    (["make-tiny-model", "{missing}", "--family", "gpt"], ["--family"]),
    (["make-tiny-model"], ["summarizer make-tiny-model: error:"]),
    # no subcommand
    (["frobnicate"], ["summarizer: error:"]),
]


@pytest.mark.parametrize(("args", "expected"), MISTAKES,
                         ids=[" ".join(args) for args, _ in MISTAKES])
def test_a_mistake_is_one_clear_line(args: list[str], expected: list[str],
                                     files: dict[str, Path], closed_port: int,
                                     taken_port: int) -> None:
    if "{unreadable}" in args and os.geteuid() == 0:
        pytest.skip("root reads any file: an unreadable file cannot be made")
    values = {name: str(path) for name, path in files.items()}
    values.update(port=str(closed_port), taken=str(taken_port))
    done = run(*(a.format(**values) for a in args))
    assert_one_clear_line(done, *(e.format(**values) for e in expected))


def test_binary_stdin_is_one_clear_line(closed_port: int) -> None:
    done = run("summarize", "--server", f"127.0.0.1:{closed_port}", "-",
               stdin=Path(sys.executable).read_bytes()[:65536])
    assert_one_clear_line(done, "stdin", "binary")
    latin1 = run("summarize", "--server", f"127.0.0.1:{closed_port}", "-",
                 stdin="Caf\u00e9".encode("latin-1"))
    assert_one_clear_line(latin1, "stdin", "is not UTF-8")


def test_an_unreachable_hub_fails_fast_and_says_what_to_do(tmp_path: Path,
                                                           closed_port: int) -> None:
    hub = dict(HF_ENDPOINT=f"http://127.0.0.1:{closed_port}", HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "hf"))
    started = time.monotonic()
    served = run("serve", "--model", "distilbart-cnn-12-6", "--port", "0", **hub)
    elapsed_s = time.monotonic() - started
    line = assert_one_clear_line(served, "cannot reach the model hub")
    assert elapsed_s < 15  # huggingface_hub's own retries took about 30 s
    for advice in ("--offline", "summarizer fetch distilbart-cnn-12-6", "--model DIR",
                   "make-tiny-model"):
        assert advice in line
    fetched = run("fetch", "distilbart-cnn-12-6", "--out", str(tmp_path / "m"), **hub)
    assert_one_clear_line(fetched, "cannot fetch", "cannot reach the model hub",
                          "make-tiny-model")


def test_serve_checks_the_model_before_binding_the_port(tmp_path: Path) -> None:
    done = run("serve", "--model", "./tiny-modle", "--port", "0")
    assert "listening" not in done.stderr.decode()
    assert_one_clear_line(done, "'./tiny-modle' does not exist", "make-tiny-model")


def test_model_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_like_path("./x") and looks_like_path("~/x") and looks_like_path("a/b/c")
    assert looks_like_path("models/tiny")  # ./models exists: a path, not the hub org "models"
    assert not looks_like_path("facebook/bart-large-cnn") and not looks_like_path("t5-small")
    offline = Settings(offline=True)
    with pytest.raises(ModelLoadError, match="did you mean flan-t5-base"):
        resolve_source("flan-t5-bse", offline)
    with pytest.raises(ModelLoadError, match="ORG/NAME"):
        resolve_source("t5-small", offline)  # a legacy single name, not in the hub cache
    # ORG/NAME hub ids and manifest names get past the name check (then: not in the cache).
    for ref in ("facebook/bart-large-cnn", "distilbart-cnn-12-6"):
        with pytest.raises(ModelLoadError, match="offline, and the hub cache does not hold"):
            resolve_source(ref, offline)
    with pytest.raises(ModelLoadError, match="did you mean .*tiny-model"):
        (tmp_path / "tiny-model").mkdir()
        resolve_source("./tiny-modle", offline)


def test_api_wording_becomes_flags() -> None:
    message = ("articles.text (article 0, id 'x'): too long to summarise in chunks (...); send "
               "a shorter text, or set options.long_input to LONG_INPUT_POLICY_TRUNCATE to "
               "summarise its beginning")
    assert cli.cli_wording(message).endswith(
        "or pass --long-input truncate to summarise its beginning")
    assert cli.cli_wording("options.summary_min_tokens: 9 is more than summary_max_tokens (4)"
                           ) == "--summary-min-tokens: 9 is more than --summary-max-tokens (4)"
    assert cli.cli_wording("options.num_beams: 9 is over this server's limit (--max-num-beams)"
                           ) == "--num-beams: 9 is over this server's limit (--max-num-beams)"


def test_server_targets() -> None:
    assert cli.server_target("50051") == "localhost:50051"
    assert cli.server_target(":7000") == "localhost:7000"
    assert cli.server_target("10.0.0.2:8000") == "10.0.0.2:8000"
    assert cli.server_target("::1:50051") == "[::1]:50051"
    assert cli.server_target("dns:///svc.ns:50051") == "dns:///svc.ns:50051"
    for bad in ("host", "host:port", "0", "host:70000"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.server_target(bad)
    assert default_target({}) == "localhost:50051"
    assert default_target({"SUMMARIZER_PORT": "6000"}) == "localhost:6000"
    with pytest.raises(ClientError, match="--server"):
        default_target({"SUMMARIZER_PORT": "0"})


def test_help_describes_every_command_and_flag() -> None:
    health = run("health", "--help").stdout.decode()
    assert "grpc.health.v1" in health and "localhost:50051" in health
    send = run("summarize", "--help").stdout.decode()
    assert "only the summary or the headline" in send  # --outputs
    assert "model family's value" in send  # what 0 means for the generation flags
    assert "SUMMARIZER_PORT" in send


def test_hub_warnings_are_printed_once_in_the_server_log() -> None:
    """huggingface_hub's own handler printed each retry warning a second time, unformatted."""
    script = ("import logging; from service.api.logs import configure_logging; "
              "configure_logging('DEBUG', 'text'); "
              "import huggingface_hub.utils._http; "  # as model loading does, after set-up
              "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s')")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env())
    assert done.stderr.count("Retrying in 1s") == 1, done.stderr


@pytest.mark.parametrize("args", [
    ["summarize", "{good}"], ["summarize", "--input", "{data}"], ["soak", "--duration", "1"],
    ["evaluate", "--data", "{data}"]], ids=lambda args: " ".join(args[:2]))
def test_no_server_means_the_command_could_not_start(args: list[str], files: dict[str, Path],
                                                    closed_port: int) -> None:
    """Exit 2, as documented: the work could not start (1 means some work failed)."""
    values = {name: str(path) for name, path in files.items()}
    done = run(*(a.format(**values) for a in args), "--server", f"127.0.0.1:{closed_port}")
    assert_one_clear_line(done, NO_SERVER.format(port=closed_port))
    assert done.returncode == 2


def test_health_without_a_server_is_a_failed_check(closed_port: int) -> None:
    """`health` answers a question: anything but SERVING, unreachable included, exits 1."""
    done = run("health", "--server", f"127.0.0.1:{closed_port}")
    assert_one_clear_line(done, NO_SERVER.format(port=closed_port))
    assert done.returncode == 1


def test_summarize_on_a_terminal_says_it_reads_stdin(closed_port: int) -> None:
    """With no file and stdin a terminal, say what it waits for instead of waiting silently."""
    import pty

    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen([*CLI, "summarize", "--server", f"127.0.0.1:{closed_port}"],
                                   stdin=terminal, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env())
        os.write(controller, b"\x04")  # Ctrl-D: the end of what was typed (nothing)
        _, stderr = process.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)
    lines = stderr.decode().splitlines()
    assert lines[0].startswith("summarizer: reading an article from stdin"), lines
    assert "Ctrl-D" in lines[0] and "summarizer summarize FILE" in lines[0]
    assert lines[1:] == ["summarizer: error: stdin: is empty; nothing to summarise"]


def test_summarize_reading_a_pipe_says_nothing_more(closed_port: int) -> None:
    done = run("summarize", "--server", f"127.0.0.1:{closed_port}", stdin=b"")
    assert "reading an article" not in done.stderr.decode()


def test_every_subcommand_help_prints() -> None:
    """`--help` of every command (the client's and the server's) prints its page and exits 0:
    an unescaped % in one setting's help made `serve --help` end in a TypeError."""
    parser, _ = client_cli.build_parser([cli.add_commands])
    [commands] = [action for action in parser._actions
                  if isinstance(action, argparse._SubParsersAction)]
    names = sorted(commands.choices)
    assert {"serve", "summarize", "health", "convert", "make-tiny-model"} <= set(names)
    for name in names:
        done = run(name, "--help")
        stdout = done.stdout.decode()
        assert done.returncode == 0, (name, done.stderr.decode())
        assert stdout.startswith(f"usage: summarizer {name}"), (name, stdout[:200])
    # argparse wraps the help: compare with the line breaks folded.
    assert "30% of free GPU memory" in " ".join(run("serve", "--help").stdout.decode().split())


@pytest.fixture(scope="module")
def unconverted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.engines.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("unconverted") / "tiny")


@pytest.mark.slow
def test_unconverted_model_without_a_writable_cache_says_what_to_do(unconverted: Path,
                                                                    tmp_path: Path) -> None:
    """The cache directory given cannot be written (a read-only filesystem): one line naming the
    three ways out, and exit 2 ("could not start")."""
    done = run("serve", "--model", str(unconverted), "--engine", "ctranslate2", "--port", "0",
               "--convert-cache-dir", "/dev/null/cache", HOME="/dev/null/home")
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("summarizer: error: cannot convert"), stderr
    for text in ("no writable cache directory", "/dev/null/cache", "--convert-cache-dir",
                 "summarizer convert MODEL --in-place", "--engine torch"):
        assert text in last, last


@pytest.mark.slow
def test_unconverted_model_with_an_unwritable_home_converts_under_tmp(unconverted: Path,
                                                                      tmp_path: Path) -> None:
    """The shipped manifests' case: HOME on a read-only root, /tmp a writable volume. The server
    converts there and reaches SERVING instead of exiting 2 in a crash loop."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    server = subprocess.Popen(
        [*CLI, "serve", "--model", str(unconverted), "--host", "127.0.0.1", "--port", "0",
         "--no-warmup"], stderr=subprocess.PIPE, text=True,
        env=env(HOME="/dev/null/home", TMPDIR=str(tmp)))
    try:
        lines: list[str] = []
        assert server.stderr is not None
        for line in server.stderr:
            lines.append(line)
            if "SERVING: " in line or "Traceback" in line or "error:" in line:
                break
        assert any("SERVING: " in line for line in lines), "".join(lines)
        converted = list((tmp / "summarizer-ctranslate2").iterdir())
        assert len(converted) == 1 and converted[0].name.startswith("tiny-"), converted
    finally:
        server.kill()
        server.wait(timeout=30)
