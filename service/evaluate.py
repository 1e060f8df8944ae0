"""Evaluation: ROUGE of a model's summaries and headlines against reference texts, beside
extractive baselines computed on the same articles (`summarizer evaluate`).

- Scores are ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F1 from Google's `rouge-score` package with
  Porter stemming, averaged over articles and reported x100 (the scale papers use). ROUGE-L is
  the longest common subsequence of the whole text; ROUGE-Lsum (what CNN/DailyMail papers call
  ROUGE-L) takes it sentence by sentence, so compare published figures with that column.
- Baselines: lead-3 (the article's first three sentences) for summaries, the first sentence for
  headlines. A model that does not beat them on your data is not worth its cost there.
- Lengths in words (whitespace-separated) of outputs, baselines and references.

The scoring, the baselines and the report are pure functions; `run_server` and `run_in_process`
produce the model's outputs (over gRPC, or with an engine loaded in this process).
"""

from __future__ import annotations

import asyncio
import functools
import html
import json
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .domain import ArticleFailure, ArticleSummary, Outputs, RequestedOptions
from .errors import SummarizerError, code_name, status_for
from .serving.chunking import sentence_spans
from .text import clean_article

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ROUGE_LABELS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
                "rougeLsum": "ROUGE-Lsum"}
TASKS = ("summary", "headline")
BASELINE_SENTENCES = {"summary": 3, "headline": 1}
BASELINE_NAMES = {"summary": "lead-3", "headline": "first sentence"}

Result = ArticleSummary | ArticleFailure


@dataclass(frozen=True)
class Record:
    """One article of an evaluation set, with its reference summary and/or headline."""

    id: str
    text: str
    summary: str | None = None
    headline: str | None = None


def parse_records(lines: Iterable[str], source: str) -> list[Record]:
    """Records from JSON Lines: objects with `text` and a reference `summary` and/or `headline`
    (strings), and an optional `id` (default: the line number). Errors name the line."""
    records: list[Record] = []
    seen: set[str] = set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{source}:{number}"
        try:
            data = json.loads(line)
        except ValueError as error:
            raise SummarizerError(f"{where}: not JSON ({error})") from None
        if not isinstance(data, dict):
            raise SummarizerError(f"{where}: expected a JSON object")
        if not isinstance(data.get("text"), str) or not data["text"].strip():
            raise SummarizerError(f"{where}: needs a non-empty string 'text'")
        references = {task: data.get(task) for task in TASKS}
        for task, reference in references.items():
            if reference is not None and not isinstance(reference, str):
                raise SummarizerError(f"{where}: '{task}' must be a string")
        if not any(r and r.strip() for r in references.values()):
            raise SummarizerError(f"{where}: needs a reference 'summary' or 'headline'")
        record_id = str(data.get("id", number))
        if record_id in seen:
            raise SummarizerError(f"{where}: duplicate id {record_id!r}")
        seen.add(record_id)
        records.append(Record(record_id, data["text"], *(
            r if r and r.strip() else None for r in references.values())))
    if not records:
        raise SummarizerError(f"{source}: no records")
    return records


def outputs_needed(records: Sequence[Record]) -> Outputs:
    """Generate only what some record has a reference for."""
    summaries = any(r.summary for r in records)
    headlines = any(r.headline for r in records)
    if summaries and headlines:
        return Outputs.BOTH
    return Outputs.SUMMARY if summaries else Outputs.HEADLINE


# ----- sentences, baselines, scores (pure) -----

def split_sentences(text: str) -> list[str]:
    """The article's sentences: cleaned as the server cleans it (page furniture dropped), then
    split by the same rule-based splitter that chunks long articles (abbreviations and decimals
    kept whole)."""
    cleaned = clean_article(text)
    return [cleaned[start:end] for start, end in sentence_spans(cleaned)]


def lead(text: str, sentences: int) -> str:
    """The first `sentences` sentences of an article: the lead-N baseline."""
    return " ".join(split_sentences(text)[:sentences])


@functools.cache
def _scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise SummarizerError("evaluation needs the rouge-score package: "
                              "pip install 'summarizer[eval]'") from None

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def score_pair(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE F1 x100 of one prediction against one reference. Sentences go on separate lines,
    as ROUGE-Lsum needs (the other measures ignore line breaks)."""
    scores = _scorer().score("\n".join(split_sentences(reference)),
                             "\n".join(split_sentences(prediction)))
    return {name: 100 * scores[name].fmeasure for name in ROUGE_TYPES}


def mean_scores(pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """Mean ROUGE F1 x100 over (prediction, reference) pairs."""
    per_pair = [score_pair(prediction, reference) for prediction, reference in pairs]
    return {name: statistics.fmean(s[name] for s in per_pair) if per_pair else 0.0
            for name in ROUGE_TYPES}


def word_count(text: str) -> int:
    return len(text.split())


def length_stats(texts: Sequence[str]) -> dict[str, float]:
    """Mean, median, min and max length in words."""
    counts = [word_count(t) for t in texts]
    if not counts:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0}
    return {"mean": statistics.fmean(counts), "median": statistics.median(counts),
            "min": min(counts), "max": max(counts)}


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def build_report(records: Sequence[Record], results: Sequence[Result], *, data: str,
                 source: str) -> dict[str, Any]:
    """The evaluation report: per task (summary, headline) the mean ROUGE of the model and of
    the baseline, and lengths, over the articles that have a reference for the task and a model
    output; failed articles are listed, not scored."""
    outputs = {r.id: r for r in results if isinstance(r, ArticleSummary)}
    failures = [{"id": r.id, "code": code_name(r.code), "message": r.message}
                for r in results if isinstance(r, ArticleFailure)]
    report: dict[str, Any] = {
        "data": data, "source": source, "articles": len(records),
        "evaluated": sum(1 for r in records if r.id in outputs), "failed": failures,
        "scoring": {"package": f"rouge-score {_package_version('rouge-score')}",
                    "stemming": True, "measure": "mean per-article F1 x 100",
                    "sentence_splitter": f"sentencex {_package_version('sentencex')}"},
    }
    for task in TASKS:
        scored = [r for r in records if getattr(r, task) and r.id in outputs]
        if not any(getattr(r, task) for r in records):
            continue
        references = [getattr(r, task) for r in scored]
        model = [getattr(outputs[r.id], task) for r in scored]
        baseline = [lead(r.text, BASELINE_SENTENCES[task]) for r in scored]
        report[task] = {
            "articles": len(scored),
            "baseline": BASELINE_NAMES[task],
            "rouge": {"model": mean_scores(list(zip(model, references))),
                      "baseline": mean_scores(list(zip(baseline, references)))},
            "words": {"model": length_stats(model), "baseline": length_stats(baseline),
                      "reference": length_stats(references)},
        }
    return report


# ----- rendering (pure) -----

def render_text(report: Mapping[str, Any]) -> str:
    """The report as the terminal table `summarizer evaluate` prints."""
    lines = [f"{report['evaluated']} of {report['articles']} articles evaluated "
             f"({report['source']})"]
    for task in TASKS:
        if task not in report:
            continue
        part = report[task]
        baseline = part["baseline"]
        lines += ["", f"{task}: {part['articles']} articles, baseline {baseline}",
                  f"  {'':<16}" + "".join(f"{ROUGE_LABELS[n]:>12}" for n in ROUGE_TYPES)]
        for who, label in (("model", "model"), ("baseline", baseline)):
            lines.append(f"  {label:<16}" + "".join(
                f"{part['rouge'][who][n]:>12.2f}" for n in ROUGE_TYPES))
        lines.append(f"  {'words':<16}" + "".join(
            f"{h:>12}" for h in ("mean", "median", "min", "max")))
        for who, label in (("model", "model"), ("baseline", baseline),
                           ("reference", "reference")):
            stats = part["words"][who]
            lines.append(f"  {label:<16}{stats['mean']:>12.1f}{stats['median']:>12.1f}"
                         f"{stats['min']:>12}{stats['max']:>12}")
    if report["failed"]:
        lines += ["", f"{len(report['failed'])} articles failed (not scored):"]
        lines += [f"  {f['id']}: {f['code']}: {f['message']}" for f in report["failed"]]
    return "\n".join(lines)


_MODEL_COLOUR = "#2f6f9f"
_BASELINE_COLOUR = "#b8b8b8"


def bar_chart_svg(part: Mapping[str, Any], title: str) -> str:
    """An inline SVG grouped bar chart: model vs baseline for each ROUGE measure."""
    width, height, left, top, bottom = 560, 240, 40, 30, 40
    plot_h = height - top - bottom
    top_value = max([10.0] + [part["rouge"][w][n] for w in ("model", "baseline")
                              for n in ROUGE_TYPES])
    scale_max = 10 * -(-top_value // 10)  # next multiple of 10
    group_w = (width - left - 10) / len(ROUGE_TYPES)
    bar_w = group_w / 3
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           f'<text x="{left}" y="18" font-size="14">{html.escape(title)}</text>']
    for tick in range(0, int(scale_max) + 1, 10 if scale_max <= 50 else 20):
        y = top + plot_h - plot_h * tick / scale_max
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" '
                   f'stroke="#e4e4e4"/><text x="{left - 6}" y="{y + 4:.1f}" font-size="10" '
                   f'text-anchor="end">{tick}</text>')
    for index, name in enumerate(ROUGE_TYPES):
        x0 = left + index * group_w + bar_w / 2
        for offset, (who, colour) in enumerate((("model", _MODEL_COLOUR),
                                                ("baseline", _BASELINE_COLOUR))):
            value = part["rouge"][who][name]
            bar_h = plot_h * value / scale_max
            label = f"{ROUGE_LABELS[name]} {who}: {value:.2f}"
            out.append(f'<rect class="bar" x="{x0 + offset * bar_w:.1f}" '
                       f'y="{top + plot_h - bar_h:.1f}" width="{bar_w - 2:.1f}" '
                       f'height="{bar_h:.1f}" fill="{colour}"><title>{html.escape(label)}'
                       f'</title></rect>')
        out.append(f'<text x="{x0 + bar_w:.1f}" y="{height - bottom + 16}" font-size="11" '
                   f'text-anchor="middle">{ROUGE_LABELS[name]}</text>')
    legend_y = height - 10
    for offset, (label, colour) in enumerate((("model", _MODEL_COLOUR),
                                              (part["baseline"], _BASELINE_COLOUR))):
        x = left + offset * 140
        out.append(f'<rect x="{x}" y="{legend_y - 9}" width="10" height="10" fill="{colour}"/>'
                   f'<text x="{x + 14}" y="{legend_y}" font-size="11">{html.escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(report: Mapping[str, Any]) -> str:
    """A self-contained HTML page (inline CSS and SVG, no scripts, nothing fetched)."""
    esc = html.escape
    body = [f"<h1>Summarizer evaluation</h1><p>{report['evaluated']} of {report['articles']} "
            f"articles evaluated; data <code>{esc(str(report['data']))}</code>; outputs from "
            f"<code>{esc(str(report['source']))}</code>; "
            f"{esc(report['scoring']['measure'])}, {esc(report['scoring']['package'])} "
            "with stemming.</p>"]
    for task in TASKS:
        if task not in report:
            continue
        part = report[task]
        body.append(f"<h2>{task.capitalize()}s ({part['articles']} articles)</h2>")
        body.append(bar_chart_svg(part, f"{task}: model vs {part['baseline']} baseline"))
        header = "".join(f"<th>{ROUGE_LABELS[n]}</th>" for n in ROUGE_TYPES)
        rows = "".join(
            f"<tr><td>{esc(label)}</td>" + "".join(
                f"<td>{part['rouge'][who][n]:.2f}</td>" for n in ROUGE_TYPES) + "</tr>"
            for who, label in (("model", "model"), ("baseline", part["baseline"])))
        body.append(f"<table><tr><th></th>{header}</tr>{rows}</table>")
        rows = "".join(
            f"<tr><td>{esc(label)}</td><td>{s['mean']:.1f}</td><td>{s['median']:.1f}</td>"
            f"<td>{s['min']}</td><td>{s['max']}</td></tr>"
            for who, label in (("model", "model"), ("baseline", part["baseline"]),
                               ("reference", "reference"))
            for s in (part["words"][who],))
        body.append("<table><tr><th>words</th><th>mean</th><th>median</th><th>min</th>"
                    f"<th>max</th></tr>{rows}</table>")
    if report["failed"]:
        items = "".join(f"<li><code>{esc(f['id'])}</code>: {esc(f['code'])}: "
                        f"{esc(f['message'])}</li>" for f in report["failed"])
        body.append(f"<h2>Failed articles (not scored)</h2><ul>{items}</ul>")
    style = ("body{font-family:sans-serif;max-width:46em;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
             "td:first-child{text-align:left}")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>Summarizer evaluation</title><style>{style}</style></head><body>"
            + "".join(body) + "</body></html>\n")


# ----- producing the model's outputs -----

def _collect(articles: Sequence[tuple[str, str]], batch_size: int,
             call: Callable[[Sequence[tuple[str, str]]], list[Result]],
             failure: Callable[[BaseException], tuple[int, str] | None]) -> list[Result]:
    """Results for all articles, `batch_size` per call. A call that fails as a whole (one
    invalid article fails its request) is retried article by article, so only the bad article
    is lost. `failure` turns an error into (code, message), or None for errors that should end
    the run (server unreachable, not authorised)."""
    results: list[Result] = []
    for start in range(0, len(articles), batch_size):
        chunk = articles[start:start + batch_size]
        try:
            results.extend(call(chunk))
        except Exception as error:  # noqa: BLE001 - sorted by `failure`
            outcome = failure(error)
            if outcome is None:
                raise
            if len(chunk) == 1:
                results.append(ArticleFailure(chunk[0][0], *outcome))
            else:
                results.extend(_collect(chunk, 1, call, failure))
    return results


def run_server(client: Any, records: Sequence[Record], batch_size: int,
               options: Any) -> list[Result]:
    """The model's outputs from a running server, through a `summarizer_client.SummarizerClient`
    (`options`: its protobuf GenerationOptions)."""
    import grpc

    fatal = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED,
             grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED}

    def failure(error: BaseException) -> tuple[int, str] | None:
        if not isinstance(error, grpc.RpcError) or error.code() in fatal:
            return None
        return error.code().value[0], error.details() or ""

    def call(chunk: Sequence[tuple[str, str]]) -> list[Result]:
        return list(client.summarize_batches(chunk, len(chunk), options))

    return _collect([(r.id, r.text) for r in records], batch_size, call, failure)


def run_in_process(engine: Any, settings: Any, records: Sequence[Record], batch_size: int,
                   options: RequestedOptions) -> list[Result]:
    """The model's outputs from an engine in this process, through the same core the server
    uses (clean-up, validation, batching), without gRPC."""
    from .serving.core import ArticleIn, SummarizerCore

    def failure(error: BaseException) -> tuple[int, str] | None:
        if not isinstance(error, SummarizerError):
            return None
        code, message = status_for(error)
        return int(code), message

    with asyncio.Runner() as runner:
        core = SummarizerCore(engine, settings)
        runner.run(core.start())
        try:
            def call(chunk: Sequence[tuple[str, str]]) -> list[Result]:
                return runner.run(core.summarize([ArticleIn(i, t) for i, t in chunk], options))

            return _collect([(r.id, r.text) for r in records], batch_size, call, failure)
        finally:
            runner.run(core.stop())
