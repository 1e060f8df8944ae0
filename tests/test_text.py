"""Article clean-up and output tidying."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.text import clean_article, has_nul, model_text, tidy_headline


def test_whitespace_and_unicode_are_normalised() -> None:
    raw = "  Caf\u0065\u0301\u00a0prices\u2009rose\u200b.\r\n\r\n\tSecond\u00a0\u00a0para.  \x07"
    assert clean_article(raw) == "Caf\u00e9 prices rose.\nSecond para."


def test_trailing_scraped_boilerplate_is_removed() -> None:
    raw = ("Officials said the bridge will reopen.\nTraffic will be diverted until then.\n"
           "Share it\nNext Story: Markets slide again\nRead more >>\nAdvertisement\n* * *\n")
    assert clean_article(raw) == ("Officials said the bridge will reopen.\n"
                                  "Traffic will be diverted until then.")


def test_inline_advertisement_lines_go_but_article_sentences_stay() -> None:
    raw = ("He said he would read more books this year.\n- Advertisement -\n"
           "Share prices rose.\nRead more about it below, officials said.")
    assert clean_article(raw) == ("He said he would read more books this year.\n"
                                  "Share prices rose.\nRead more about it below, officials said.")


@pytest.mark.parametrize("sentence", [
    "Copyright holders said they would challenge the new rules in court.",
    "Copyright reform passed the Senate on Tuesday, 61 votes to 39.",
    "Sign up to vote closes on Friday, officials said.",
    "More from the inquiry will be published on Sunday.",
    "Subscribers will pay more from January, the company said.",
])
def test_closing_sentences_that_start_like_boilerplate_are_kept(sentence: str) -> None:
    assert clean_article("The council met.\n" + sentence) == "The council met.\n" + sentence
    assert clean_article(sentence) == sentence


@pytest.mark.parametrize("trailer", [
    "Sign up for our newsletter.", "\u00a9 2024 Example News. All rights reserved.",
    "Copyright 2025 Example Media Ltd.", "Follow us on X", "Tags: politics, transport",
    "Read more: Council budget row", "Related stories", "Share this article", "3 comments",
])
def test_short_trailing_lines_are_stripped(trailer: str) -> None:
    assert clean_article("The council met.\n" + trailer) == "The council met."


@pytest.mark.parametrize("text", ["", "   \n\t", "Advertisement\nShare it\nRead more"])
def test_nothing_left_means_empty(text: str) -> None:
    assert clean_article(text) == ""


def test_non_latin_scripts_and_emoji_survive() -> None:
    raw = "東京で新しい駅が開業した。\nالمدينة تفتتح محطة جديدة 🚆"
    assert clean_article(raw) == raw


def test_nul_is_detected() -> None:
    assert has_nul("a\x00b") and not has_nul("ab")


def test_model_text_runs_paragraphs_together() -> None:
    assert model_text("One.\nTwo.") == "One. Two."


@pytest.mark.parametrize(("raw", "headline"), [
    ("Council expands bus network. It will cost two million.", "Council expands bus network"),
    ("  Storm hits\ncoast  ", "Storm hits coast"),
    ("Is this the end?", "Is this the end?"),
    ("U.S. stocks fall...", "U.S. stocks fall..."),
])
def test_headline_is_one_line_first_sentence(raw: str, headline: str) -> None:
    assert tidy_headline(raw) == headline


def _clean_article_by_regex(text: str) -> str:
    """clean_article as it was written first (a regular expression per kind of character):
    the reference the one-pass version must equal."""
    import re
    import unicodedata

    from service.text import _FURNITURE, _bare, _is_trailer

    text = unicodedata.normalize("NFC", text).translate(
        dict.fromkeys(map(ord, "\u200b\ufeff\u00ad\u2060\u180e"), None))
    text = re.sub(r"\r\n|\r|\u2028|\u2029|\x0b|\x0c|\x85", "\n", text)
    text = re.sub(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]", "", text)
    lines = [re.sub(r"[^\S\n]+", " ", line).strip() for line in text.split("\n")]
    lines = [line for line in lines if line and not _FURNITURE.match(_bare(line))]
    while lines and _is_trailer(lines[-1]):
        lines.pop()
    return "\n".join(lines)


_MESSY = st.text(alphabet=st.one_of(
    st.sampled_from(list(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u2028\u2029\u3000\u2009\u200b\ufeff"
                         "\u00ad\x00\x07\x7f\x9fe\u0301.-*")),
    st.characters()), max_size=60)


@settings(max_examples=400, deadline=None)
@given(_MESSY)
def test_one_pass_cleaning_equals_the_regex_cleaning(text: str) -> None:
    assert clean_article(text) == _clean_article_by_regex(text)


def test_one_pass_cleaning_equals_the_regex_cleaning_on_scraped_pages() -> None:
    page = ("Headline\r\n\r\nFirst\u00a0para  with\ttabs.\u2028Advertisement\n"
            "Second para\u200b.\x0c\x85 Read more >>\n\u00a9 2024 Example News")
    for text in (page, page * 50, " \n ".join([page] * 3)):
        assert clean_article(text) == _clean_article_by_regex(text)
