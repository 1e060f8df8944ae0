"""One prepared GPU run (under 10 minutes): the continuous torch engine in float16 and bfloat16
against static batching and ctranslate2 float16, on a real-size random-weight checkpoint.

It runs benchmarks/continuous.py twice on `--device cuda` servers (each a separate process over
real gRPC), scenarios 1 (`mixed`: concurrent calls with three option sets; the token check
compares continuous with static alone in the same compute type) and 2 (`hol`: a short call
arriving behind long ones):

1. `--torch-compute-type float16`: torch static, torch continuous, and the reference row
   `--engine ctranslate2 --compute-type float16` (static);
2. `--torch-compute-type bfloat16`: torch static and continuous.

With no CUDA GPU (or a CPU-only torch or ctranslate2 build) it says so and exits 2 at once:

    python benchmarks/gpu.py                       # on a machine with one CUDA GPU
    python benchmarks/gpu.py --preset distilbart-cnn-12-6 --mixed-articles 96

Figures: each run's tables on stdout and one JSON line per run in --out (default
.bench-cache/gpu-<compute type>.json). No figure from this script has been recorded yet: no GPU
was available to the project when it was written.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 570.0
"""The whole run's limit (both sub-runs), under 10 minutes."""


def cuda_problem() -> str | None:
    """Why this machine cannot run the GPU benchmark, or None."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        return f"torch {torch.__version__} ({build}) sees no CUDA GPU"
    try:
        import ctranslate2
    except ImportError:
        return "ctranslate2 is not installed"
    if ctranslate2.get_cuda_device_count() == 0:
        return f"ctranslate2 {ctranslate2.__version__} sees no CUDA GPU (a CPU-only build?)"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bart-base")
    parser.add_argument("--mixed-articles", type=int, default=48,
                        help="scenario 1's concurrent calls (a GPU wants more than a CPU)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".bench-cache")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory for the JSON lines (default: --cache)")
    args = parser.parse_args()
    problem = cuda_problem()
    if problem is not None:
        print(f"benchmarks/gpu.py needs a CUDA GPU: {problem}. Nothing was run.",
              file=sys.stderr)
        return 2
    out = args.out or args.cache
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUDGET_S
    runs = [("float16", ["static", "continuous", "reference"]),
            ("bfloat16", ["static", "continuous"])]
    status = 0
    for compute_type, modes in runs:
        left = deadline - time.monotonic()
        if left < 60:
            print(f"skipped {compute_type}: under a minute of the budget left", file=sys.stderr)
            status = 1
            continue
        command = [sys.executable, str(ROOT / "benchmarks" / "continuous.py"),
                   "--preset", args.preset, "--cache", str(args.cache),
                   "--scenarios", "mixed", "hol", "--modes", *modes,
                   "--reference", "mixed", "hol",
                   "--reference-flags=--engine ctranslate2 --compute-type float16",
                   "--torch-compute-type", compute_type,
                   "--mixed-articles", str(args.mixed_articles),
                   "--hol-delay-s", "0.2", "1.0",
                   "--server-flags=--device cuda",
                   "--json-out", str(out / f"gpu-{compute_type}.json")]
        print("$ " + " ".join(command), flush=True)
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=left, check=False)
        except subprocess.TimeoutExpired:
            print(f"{compute_type}: stopped at the time budget", file=sys.stderr)
            status = 1
            continue
        status = status or done.returncode
    return status


if __name__ == "__main__":
    raise SystemExit(main())
