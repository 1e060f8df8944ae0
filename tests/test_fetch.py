"""Choosing where safetensors weights may come from when a repository's main branch has none."""

from __future__ import annotations

from dataclasses import dataclass

from service.engines.fetch import CONVERSION_BOT, CONVERSION_PR_TITLE, conversion_pr_revision


@dataclass
class Discussion:
    num: int
    title: str
    author: str
    status: str = "open"
    is_pull_request: bool = True


class FakeApi:
    def __init__(self, *discussions: Discussion) -> None:
        self.discussions = discussions

    def get_repo_discussions(self, repo_id: str):
        assert repo_id == "org/model"
        return iter(self.discussions)


def test_only_the_conversion_bots_open_pull_request_is_trusted() -> None:
    api = FakeApi(
        Discussion(1, CONVERSION_PR_TITLE, "someone-else"),            # same title, wrong author
        Discussion(2, CONVERSION_PR_TITLE, CONVERSION_BOT, status="closed"),
        Discussion(3, "Update README", CONVERSION_BOT),
        Discussion(4, CONVERSION_PR_TITLE, CONVERSION_BOT, is_pull_request=False),
        Discussion(5, CONVERSION_PR_TITLE, CONVERSION_BOT),
    )
    assert conversion_pr_revision(api, "org/model") == "refs/pr/5"


def test_no_conversion_pull_request_means_none() -> None:
    assert conversion_pr_revision(FakeApi(Discussion(1, CONVERSION_PR_TITLE, "mallory")),
                                  "org/model") is None
