"""The series selectors of a PromQL expression: which metric names and label matchers it reads.

A small tokenizer, enough to check alert rules and dashboard queries against the metrics a server
really exports; it is not a PromQL parser (it never checks the syntax: promtool does). An
identifier is a metric name unless it calls a function or aggregation (followed by `(`, or by
`by`/`without`), is a keyword or operator word, or sits in the label list of by/without/on/
ignoring/group_left/group_right. Strings, ranges (`[5m]`, `[$__rate_interval]`), numbers,
durations and Grafana variables (`$pod`, `${pod}`) are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<range>\[[^\]]*\])
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`|[^}"'`])*\})
  | (?P<number>(?:0x[0-9a-fA-F]+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)
  | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<operator>==|!=|<=|>=|=~|!~|[-+*/%^<>(),@=])
""", re.VERBOSE)

_MATCHER = re.compile(r"""\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*
                          ("(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)\s*,?""", re.VERBOSE)

LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = LABEL_LIST_KEYWORDS | frozenset(
    {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "Inf", "NaN"})


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    """`name` is empty for a selector that names its metric only in a `__name__` matcher that
    is not an equality."""

    name: str
    matchers: tuple[Matcher, ...]


def _unquote(text: str) -> str:
    if text[0] == "`":
        return text[1:-1]
    return re.sub(r"\\(.)", r"\1", text[1:-1])


def parse_matchers(braces: str) -> tuple[Matcher, ...]:
    """`{a="x", b=~"y|z"}` -> its matchers; fails on anything else."""
    body, matchers, at = braces[1:-1], [], 0
    while body[at:].strip():
        found = _MATCHER.match(body, at)
        if found is None:
            raise ValueError(f"cannot read label matchers {braces!r} at {body[at:]!r}")
        matchers.append(Matcher(found[1], found[2], _unquote(found[3])))
        at = found.end()
    return tuple(matchers)


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) for each token, spaces and comments left out; fails on a character it
    cannot read."""
    found, at = [], 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:at + 20]!r} in {expr!r}")
        kind = match.lastgroup or ""
        if kind not in ("space", "comment"):
            found.append((kind, match.group()))
        at = match.end()
    return found


def selectors(expr: str) -> list[Selector]:
    """Every series selector of `expr`, in order."""
    items = tokens(expr)
    result: list[Selector] = []
    index = 0
    while index < len(items):
        kind, text = items[index]
        following = items[index + 1] if index + 1 < len(items) else ("", "")
        if kind == "name" and text in LABEL_LIST_KEYWORDS:
            if following == ("operator", "("):  # a list of label names, not metrics
                close = items.index(("operator", ")"), index + 1)
                index = close + 1
                continue
        elif (kind == "name" and text not in KEYWORDS and following != ("operator", "(")
              and following not in (("name", "by"), ("name", "without"))):  # `sum by (...)`
            matchers = parse_matchers(following[1]) if following[0] == "matchers" else ()
            result.append(Selector(text, matchers))
            index += 2 if matchers or following[0] == "matchers" else 1
            continue
        elif kind == "matchers":  # {__name__="x", ...} with no name in front
            matchers = parse_matchers(text)
            names = [m.value for m in matchers if m.label == "__name__" and m.op == "="]
            result.append(Selector(names[0] if names else "",
                                   tuple(m for m in matchers if m.label != "__name__")))
        index += 1
    return result


def metric_names(expr: str) -> set[str]:
    return {s.name for s in selectors(expr) if s.name}
