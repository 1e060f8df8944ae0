"""What a caller sent, checked before any work: how many articles, their ids, their text.

Every problem is an `InvalidArgument` naming the field and the article (index and id), so a caller
can fix the request; nothing here touches the model or the queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import InvalidArgument
from ..text import clean_article, has_nul

MAX_ID_CHARS = 256


@dataclass(frozen=True)
class ArticleIn:
    id: str
    text: str


class Validator:
    def __init__(self, *, max_articles_per_request: int, max_article_chars: int) -> None:
        self.max_articles_per_request = max_articles_per_request
        self.max_article_chars = max_article_chars

    def check_count(self, articles: Sequence[ArticleIn]) -> None:
        if not articles:
            raise InvalidArgument("articles", "the request has no articles")
        limit = self.max_articles_per_request
        if len(articles) > limit:
            raise InvalidArgument(
                "articles", f"{len(articles)} articles, over the limit of {limit} per request; "
                            "split the request or use SummarizeStream")

    def check_ids(self, articles: Sequence[ArticleIn], *, required: bool,
                  taken: set[str] | frozenset[str] = frozenset()) -> None:
        seen: set[str] = set()
        for index, article in enumerate(articles):
            if required and not article.id:
                raise InvalidArgument("articles.id", "is empty; SummarizeStream matches results "
                                      "by id, so every article needs one", article_index=index)
            if len(article.id) > MAX_ID_CHARS:
                raise InvalidArgument("articles.id", f"is {len(article.id)} characters long, "
                                      f"over the limit of {MAX_ID_CHARS}", article_index=index)
            if article.id and (article.id in seen or article.id in taken):
                raise InvalidArgument("articles.id", f"duplicate id {article.id!r}; ids must be "
                                      "unique" + (" among the stream's articles in flight"
                                                  if taken else " within a request"),
                                      article_index=index, article_id=article.id)
            seen.add(article.id)

    def clean(self, index: int, article: ArticleIn) -> str:
        """The article's cleaned text (paragraphs on lines), or InvalidArgument saying what is
        wrong."""
        def bad(problem: str) -> InvalidArgument:
            return InvalidArgument("articles.text", problem, article_index=index,
                                   article_id=article.id)

        limit = self.max_article_chars
        if len(article.text) > limit:
            raise bad(f"{len(article.text)} characters, over the server's limit of {limit} "
                      "(its --max-article-chars); split the article into parts of at most "
                      f"{limit} characters, or raise the limit; LONG_INPUT_POLICY_TRUNCATE "
                      "does not help: the limit applies before any truncation")
        if has_nul(article.text):
            raise bad("contains NUL characters; send the article as UTF-8 text (UTF-16 or "
                      "binary data was sent?)")
        cleaned = clean_article(article.text)
        if not cleaned:
            if article.text.strip() and not any(c.isalnum() for c in article.text):
                raise bad(f"has no words to summarise: its {len(article.text)} characters are "
                          "only emoji, symbols or punctuation; the model summarises text, so "
                          "send the article's words")
            raise bad("is empty (nothing left after removing whitespace and page furniture)")
        return cleaned
