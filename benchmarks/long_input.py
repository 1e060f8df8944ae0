"""What does reading a whole long article cost? LONG_INPUT_POLICY_CHUNK against TRUNCATE.

Starts the real server (`summarizer serve`) on a real-size random-weight checkpoint, then sends
single-article Summarize calls for articles of the given lengths in characters, once with each
policy, one call at a time on an otherwise idle server, with fixed output lengths (min = max new
tokens) so every pass does the same work whatever the random weights write. Prints, per article
length and policy, the article's tokens, the wall and server CPU seconds per article (best of
--repeats), the chunks and tokens the model read, and the CPU ratio CHUNK / TRUNCATE. On a
machine shared with other work, CPU seconds are the cost; wall seconds are what a caller waits.

    python benchmarks/long_input.py --preset bart-base --chars 5000 20000 --threads 1

The articles are news-like text written here, with paragraphs and sentences of ordinary length,
from a vocabulary chosen so that the benchmark tokenizer needs about as many tokens per character
as BART's real one does on English news (about 4.3 characters per token: a 5,000-character
article is about 1,150 tokens, over BART's 1,024-token window); the script prints the token
counts. The checkpoint is built once into --cache (random weights: the text is gibberish; the
FLOPs are those of the real architecture).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import grpc
# this directory: run as `python benchmarks/long_input.py`
from concurrency import cpu_seconds, start_server

from summarizer_client.gen.summarizer.v1 import summarizer_pb2 as pb
from summarizer_client.gen.summarizer.v1 import summarizer_pb2_grpc as pb_grpc
from service.engines.tiny import PRESETS, cached_preset_checkpoint

# Words the benchmark tokenizer knows whole (it was trained on service.engines.tiny's word list) and
# words it must spell in pieces; the mix sets the tokens per character.
_KNOWN = ("the city council said on monday that new bus routes would open in march after "
          "officials agreed a budget of two million for the northern suburbs hospital "
          "university police minister government election voters president talks week year "
          "report market prices rose fell percent company shares investors court judge ruled "
          "case storm flooding rain homes residents school children teachers health doctors "
          "patients water energy oil gas summit leaders climate emissions targets team season "
          "match won lost goal coach players fans stadium").split()
_OTHER = ("spokeswoman announced thursday regional infrastructure improvements including bridges "
          "railway stations motorway junctions although critics argued the consultation "
          "ignored farmers fishermen shopkeepers commuters pensioners nurses firefighters "
          "engineers contractors negotiations continued overnight before unions accepted "
          "revised proposals covering salaries overtime pensions redundancy safeguards "
          "inspectors discovered contamination downstream prompting evacuations warnings "
          "compensation lawsuits parliamentary committee hearings testimony whistleblowers "
          "documents revealed").split()


def article(chars: int, seed: int = 7, other_share: float = 0.09) -> str:
    """News-like text of about `chars` characters: sentences of 12-30 words, four or five to a
    paragraph."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    total = 0
    while total < chars:
        sentences = []
        for _ in range(rng.randint(4, 5)):
            words = [rng.choice(_OTHER if rng.random() < other_share else _KNOWN)
                     for _ in range(rng.randint(12, 30))]
            sentences.append(" ".join(words).capitalize() + rng.choice([".", ".", ".", "?"]))
        paragraphs.append(" ".join(sentences))
        total += len(paragraphs[-1]) + 1
    return "\n".join(paragraphs)[:chars].rsplit(" ", 1)[0] + "."


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bart-base")
    parser.add_argument("--chars", type=int, nargs="+", default=[5000, 20000])
    parser.add_argument("--summary-tokens", type=int, default=60)
    parser.add_argument("--headline-tokens", type=int, default=12)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0,
                        help="the server's --threads; 1 gives steady figures on a machine shared "
                             "with other work (0: all cores)")
    parser.add_argument("--cache", type=Path, default=Path(".bench-cache"))
    args = parser.parse_args()

    model = cached_preset_checkpoint(args.cache, args.preset)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    process, target = start_server(model, ["--threads", str(args.threads)])
    options = dict(summary_min_tokens=args.summary_tokens, summary_max_tokens=args.summary_tokens,
                   headline_min_tokens=args.headline_tokens,
                   headline_max_tokens=args.headline_tokens, num_beams=args.num_beams)
    policies = {"truncate": pb.LONG_INPUT_POLICY_TRUNCATE, "chunk": pb.LONG_INPUT_POLICY_CHUNK}
    rows = []
    try:
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.SummarizerStub(channel)

            def call(text: str, policy: int) -> tuple[float, float, pb.ArticleResult]:
                request = pb.SummarizeRequest(
                    articles=[pb.Article(id="a", text=text)],
                    options=pb.GenerationOptions(long_input=policy, **options))
                cpu = cpu_seconds(process.pid)
                started = time.perf_counter()
                reply = stub.Summarize(request, timeout=3600)
                return (time.perf_counter() - started, cpu_seconds(process.pid) - cpu,
                        reply.results[0])

            call(article(2000), policies["truncate"])  # first-call costs out of the way
            for chars in args.chars:
                text = article(chars)
                tokens = len(tokenizer(text, verbose=False)["input_ids"])
                for name, policy in policies.items():
                    runs = [call(text, policy) for _ in range(args.repeats)]
                    wall = min(w for w, _, _ in runs)
                    cpu = min(c for _, c, _ in runs)
                    rows.append((chars, tokens, name, wall, cpu, runs[0][2]))
                    print(f"  {chars} chars, {name}: wall {[round(w, 1) for w, _, _ in runs]} s, "
                          f"server CPU {[round(c, 1) for _, c, _ in runs]} s", flush=True)
    finally:
        process.terminate()
        process.wait(timeout=60)

    print(f"checkpoint  {args.preset} (random weights), {args.num_beams} beams, "
          f"{args.summary_tokens}+{args.headline_tokens} tokens out, best of {args.repeats}, "
          f"server threads {args.threads or 'all'}")
    print(f"{'chars':>7} {'tokens':>7} {'policy':>9} {'wall s':>8} {'CPU s':>8} {'chunks':>7} "
          f"{'tokens read':>12} {'truncated':>10} {'CPU vs truncate':>16}")
    baseline = {}
    for chars, tokens, name, wall, cpu, result in rows:
        if name == "truncate":
            baseline[chars] = cpu
        print(f"{chars:>7} {tokens:>7} {name:>9} {wall:>8.1f} {cpu:>8.1f} {result.chunks:>7} "
              f"{result.input_tokens:>12} {str(result.truncated):>10} "
              f"{cpu / baseline[chars]:>15.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
