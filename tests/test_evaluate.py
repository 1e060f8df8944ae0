"""`summarizer evaluate`: ROUGE against hand-worked values, the baselines, the reports, and whole
runs on a tiny checkpoint in-process and through a real server (the machinery, never quality)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service import evaluate
from service.cli import main
from service.config import Settings
from service.domain import ArticleFailure, ArticleSummary
from service.errors import SummarizerError
from service.api.server import default_engine_factory

from .conftest import server_in_thread

# ----- ROUGE, worked by hand -----
# The scorer lower-cases, keeps [a-z0-9] tokens and stems words over three letters; the short
# words below are left alone, so counts can be done on paper.


def test_rouge_of_one_substituted_word() -> None:
    # the cat sat on the mat / the cat lay on the mat: 6 unigrams each, 5 shared (the x2, cat,
    # on, mat); 5 bigrams each, 3 shared (the-cat, on-the, the-mat); LCS "the cat on the mat" 5.
    scores = evaluate.score_pair("the cat sat on the mat", "the cat lay on the mat")
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(100 * 3 / 5)
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)


def test_rouge_of_a_short_prediction_is_the_harmonic_mean() -> None:
    # "the cat" vs 6 words: unigram P 2/2, R 2/6 -> F 2PR/(P+R) = 1/2; bigram P 1/1, R 1/5 -> 1/3.
    scores = evaluate.score_pair("the cat", "the cat sat on the mat")
    assert scores["rouge1"] == pytest.approx(50.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)
    assert scores["rougeL"] == pytest.approx(50.0)


def test_rouge_l_follows_order_and_rouge_lsum_goes_sentence_by_sentence() -> None:
    # Same six words, sentences swapped. Unigrams all shared: 1. Bigrams: 4 of 5 shared (only
    # far-the / left-it differ). LCS over the whole text: "it ran far" = 3 of 6 -> 1/2. Lsum:
    # each reference sentence is found whole in some predicted sentence: 6 of 6 -> 1.
    prediction, reference = "It ran far. The bus left.", "The bus left. It ran far."
    scores = evaluate.score_pair(prediction, reference)
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(80.0)
    assert scores["rougeL"] == pytest.approx(50.0)
    assert scores["rougeLsum"] == pytest.approx(100.0)


def test_rouge_stems_and_ignores_case_and_punctuation() -> None:
    assert evaluate.score_pair("Running DOGS!", "run dog")["rouge1"] == pytest.approx(100.0)
    assert evaluate.score_pair("cats", "dogs")["rouge1"] == 0.0


def test_mean_scores_average_per_article_f1() -> None:
    means = evaluate.mean_scores([("the cat sat on the mat", "the cat lay on the mat"),
                                  ("the cat", "the cat sat on the mat")])
    assert means["rouge1"] == pytest.approx((100 * 5 / 6 + 50) / 2)
    assert means["rouge2"] == pytest.approx((60 + 100 / 3) / 2)
    assert evaluate.mean_scores([]) == {name: 0.0 for name in evaluate.ROUGE_TYPES}


# ----- baselines -----

ARTICLE = ("Advertisement\n"
           "The council met on Monday with Dr. Smith of the U.S. Army. Prices rose 3.5 percent, "
           "officials said. Buses will run until 11 p.m. from March.\n"
           "Residents were pleased. Nobody objected.\n"
           "Share it\nRead more\n")


def test_sentences_keep_abbreviations_and_decimals_and_drop_page_furniture() -> None:
    assert evaluate.split_sentences(ARTICLE) == [
        "The council met on Monday with Dr. Smith of the U.S. Army.",
        "Prices rose 3.5 percent, officials said.",
        "Buses will run until 11 p.m. from March.",
        "Residents were pleased.",
        "Nobody objected.",
    ]


def test_lead_baselines() -> None:
    assert evaluate.lead(ARTICLE, 3) == (
        "The council met on Monday with Dr. Smith of the U.S. Army. Prices rose 3.5 percent, "
        "officials said. Buses will run until 11 p.m. from March.")
    assert evaluate.lead(ARTICLE, 1) == "The council met on Monday with Dr. Smith of the U.S. Army."
    assert evaluate.lead("One line without a full stop", 3) == "One line without a full stop"


def test_length_stats_count_words() -> None:
    assert evaluate.length_stats(["one two three", "a b", "x y z w v"]) == {
        "mean": pytest.approx(10 / 3), "median": 3, "min": 2, "max": 5}


# ----- data and reports -----

def test_records_need_text_and_a_reference_and_unique_ids() -> None:
    records = evaluate.parse_records(
        ['{"id": "a", "text": "T.", "summary": "S."}', "", '{"text": "U.", "headline": "H"}'],
        "data.jsonl")
    assert records == [evaluate.Record("a", "T.", "S.", None),
                       evaluate.Record("3", "U.", None, "H")]
    assert evaluate.outputs_needed(records).value == "both"
    assert evaluate.outputs_needed(records[:1]).value == "summary"
    for lines, problem in [(['{"text": "T."}'], "data.jsonl:1: needs a reference"),
                           (['{"summary": "S"}'], "data.jsonl:1: needs a non-empty string 'text'"),
                           (["[1]"], "data.jsonl:1: expected a JSON object"),
                           (["{oops"], "data.jsonl:1: not JSON"),
                           (['{"text": "T", "headline": 3}'], "'headline' must be a string"),
                           (['{"id": 1, "text": "T", "summary": "S"}',
                             '{"id": "1", "text": "U", "summary": "S"}'],
                            "data.jsonl:2: duplicate id '1'"),
                           ([], "data.jsonl: no records")]:
        with pytest.raises(SummarizerError, match=re.escape(problem)):
            evaluate.parse_records(lines, "data.jsonl")


def _output(article_id: str, summary: str, headline: str) -> ArticleSummary:
    return ArticleSummary(article_id, summary, headline, input_tokens=10, truncated=False,
                          summary_tokens=len(summary.split()), headline_tokens=1)


def _report() -> dict:
    records = [evaluate.Record("a", "Prices rose. Shares fell. Oil gained. Gold slipped.",
                               summary="Prices rose. Shares fell. Oil gained.",
                               headline="Prices rose"),
               evaluate.Record("b", "Storm hits coast. Homes flooded.",
                               headline="Storm hits coast"),
               evaluate.Record("c", "Bad one.", summary="Whatever.")]
    results = [_output("a", summary="Oil gained.", headline="Prices rose"),
               _output("b", summary="", headline="Storm"),
               ArticleFailure("c", 3, "articles.text: is empty")]
    return evaluate.build_report(records, results, data="set.jsonl", source="model ./m")


def test_report_scores_model_and_baseline_on_the_same_articles() -> None:
    report = _report()
    assert (report["articles"], report["evaluated"]) == (3, 2)
    assert report["failed"] == [{"id": "c", "code": "INVALID_ARGUMENT",
                                 "message": "articles.text: is empty"}]
    assert report["scoring"]["stemming"] is True
    summary, headline = report["summary"], report["headline"]
    # Summaries: only "a" (c failed); lead-3 is exactly the reference.
    assert summary["articles"] == 1 and summary["baseline"] == "lead-3"
    assert summary["rouge"]["baseline"]["rouge2"] == pytest.approx(100.0)
    # "Oil gained." vs 6 reference words: P 1, R 2/6 -> F 1/2.
    assert summary["rouge"]["model"]["rouge1"] == pytest.approx(50.0)
    assert summary["words"] == {
        "model": {"mean": 2.0, "median": 2.0, "min": 2, "max": 2},
        "baseline": {"mean": 6.0, "median": 6.0, "min": 6, "max": 6},
        "reference": {"mean": 6.0, "median": 6.0, "min": 6, "max": 6}}
    # Headlines: a (exact) and b ("Storm" vs 3 words: P 1, R 1/3 -> F 1/2).
    assert headline["articles"] == 2 and headline["baseline"] == "first sentence"
    assert headline["rouge"]["model"]["rouge1"] == pytest.approx((100 + 50) / 2)
    assert headline["rouge"]["baseline"]["rouge1"] == pytest.approx(100.0)
    json.dumps(report)  # the JSON report is exactly this


def test_text_report_lists_scores_lengths_and_failures() -> None:
    text = evaluate.render_text(_report())
    assert "2 of 3 articles evaluated (model ./m)" in text
    assert re.search(r"lead-3\s+100\.00\s+100\.00\s+100\.00\s+100\.00", text)
    assert "c: INVALID_ARGUMENT: articles.text: is empty" in text


def test_html_report_is_self_contained_with_a_bar_chart() -> None:
    page = evaluate.render_html(_report())
    assert page.startswith("<!DOCTYPE html>")
    assert page.count("<svg") == 2  # one chart per task
    # One bar per ROUGE measure for the model and for the baseline, per chart.
    assert page.count('class="bar"') == 2 * 2 * len(evaluate.ROUGE_TYPES)
    assert "<title>ROUGE-1 model: 50.00</title>" in page
    assert "<script" not in page and "http://" not in page.replace(
        "http://www.w3.org/2000/svg", "") and "https://" not in page
    assert "articles.text: is empty" in page


def test_html_escapes_what_came_from_the_data() -> None:
    report = _report()
    report["failed"][0]["id"] = "<b>x</b>"
    assert "<b>x</b>" not in evaluate.render_html(report)


# ----- whole runs on a tiny checkpoint -----

DATA = [
    {"id": "council", "text": ARTICLE,
     "summary": "The council met; buses will run until 11 p.m. from March.",
     "headline": "Council extends bus hours"},
    {"id": "prices", "text": "Prices rose five percent this year, the report said. Investors "
                             "sold shares on Monday. The market fell.",
     "summary": "Prices rose five percent and the market fell."},
    {"text": "Storm hits the coast. Homes were flooded. Schools closed.",
     "headline": "Storm floods coastal homes"},
]
LENGTHS = ["--summary-max-tokens", "12", "--headline-max-tokens", "6", "--num-beams", "2"]


def _write_data(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_evaluate_in_process_writes_reports(tiny_bart: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_data(tmp_path / "set.jsonl", DATA)
    code = main(["evaluate", "--data", str(data), "--model", str(tiny_bart), "--threads", "1",
                 "--batch", "2", "--report", str(tmp_path / "r.json"),
                 "--html", str(tmp_path / "r.html"), *LENGTHS])
    assert code == 0
    out = capsys.readouterr().out
    assert "3 of 3 articles evaluated" in out and "lead-3" in out and "first sentence" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"] == f"model {tiny_bart}" and report["failed"] == []
    assert (report["summary"]["articles"], report["headline"]["articles"]) == (2, 2)
    for task, limit in (("summary", 12), ("headline", 6)):
        words = report[task]["words"]
        assert 0 < words["model"]["max"] <= 2 * limit  # at most `limit` tokens were written
        assert set(report[task]["rouge"]["model"]) == set(evaluate.ROUGE_TYPES)
        assert all(0 <= v <= 100 for v in report[task]["rouge"]["model"].values())
    # Lead-3 of the council story: 12 + 6 + 8 words; of the prices story: 9 + 5 + 3.
    assert report["summary"]["words"]["baseline"] == {"mean": 21.5, "median": 21.5, "min": 17,
                                                      "max": 26}
    assert "<svg" in (tmp_path / "r.html").read_text()


@pytest.mark.slow
def test_evaluate_through_a_server_matches_in_process_and_isolates_a_bad_article(
        tiny_bart: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_data(tmp_path / "set.jsonl", DATA)
    assert main(["evaluate", "--data", str(data), "--model", str(tiny_bart), "--threads", "1",
                 "--report", str(tmp_path / "local.json"), *LENGTHS]) == 0
    capsys.readouterr()
    # "Advertisement" is page furniture: nothing is left, so the server refuses that article
    # (and with it its whole call); the run goes on article by article and reports it.
    bad = _write_data(tmp_path / "bad.jsonl",
                      DATA + [{"id": "empty", "text": "Advertisement", "summary": "Nothing."}])
    settings = Settings(model=str(tiny_bart), threads=1, warmup=False)
    with server_in_thread(settings, default_engine_factory) as port:
        done = subprocess.run(
            [sys.executable, "-m", "service", "evaluate", "--data", str(bad), "--server",
             f"127.0.0.1:{port}", "--batch", "4", "--report", str(tmp_path / "remote.json"),
             *LENGTHS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one article failed
    assert "empty: INVALID_ARGUMENT: articles.text" in done.stdout
    local = json.loads((tmp_path / "local.json").read_text())
    remote = json.loads((tmp_path / "remote.json").read_text())
    assert (remote["articles"], remote["evaluated"]) == (4, 3)
    assert remote["source"] == f"server 127.0.0.1:{port} ({tiny_bart})"
    assert [f["id"] for f in remote["failed"]] == ["empty"]
    # Same model, same options, greedy or beam search alike: the same outputs either way.
    for task in evaluate.TASKS:
        assert remote[task]["rouge"] == local[task]["rouge"]
        assert remote[task]["words"] == local[task]["words"]


def test_evaluate_without_a_server_is_one_clear_line(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_data(tmp_path / "set.jsonl", DATA)
    assert main(["evaluate", "--data", str(data), "--server", "127.0.0.1:1",
                 "--timeout", "1"]) == 2  # the work could not start
    err = capsys.readouterr().err
    assert err.startswith("summarizer: error: no server at 127.0.0.1:1; start one with "
                          "`summarizer serve") and "Traceback" not in err


def test_evaluate_refuses_a_bad_data_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "set.jsonl"
    data.write_text('{"text": "no reference"}\n')
    assert main(["evaluate", "--data", str(data), "--server", "127.0.0.1:1"]) == 2
    assert "set.jsonl:1: needs a reference" in capsys.readouterr().err
