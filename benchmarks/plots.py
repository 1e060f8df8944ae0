"""Small SVG figures for the benchmarks, written by hand: no plotting library needed.

- `throughput_svg(path, {configuration: rate})`: one horizontal bar per configuration
  (benchmarks/throughput.py: articles per second of each run).
- `latency_by_class_svg(path, {class_name: [seconds, ...]})`: the latency distribution of each
  class (or configuration) as a box plot: the box spans p25 to p75, the line inside is the
  median, the whiskers reach p5 and p95, the dot is p99; the figures are printed beside it
  (benchmarks/throughput.py per configuration; the mixed-load benchmark per priority class).

The elements carry their figures as data-* attributes (data-value, data-p50, ...), so tests and
scripts can read a figure back without parsing the drawing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

FONT = "font-family='sans-serif' font-size='12'"
CHAR_PX = 7.0  # a 12 px sans-serif character, wide enough for label margins
ROW_PX = 30
PLOT_PX = 440
COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), interpolated between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def nice_ticks(largest: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least `largest`."""
    if largest <= 0:
        return [0.0, 1.0]
    raw = largest / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(largest / step - 1e-9) + 1)]


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


class _Figure:
    """A title, labelled rows on the left, a linear x axis, notes on the right."""

    def __init__(self, title: str, labels: Sequence[str], largest: float, unit: str,
                 note_chars: int, subtitle: str = "") -> None:
        if not labels:
            raise ValueError("nothing to plot")
        self.ticks = nice_ticks(largest)
        self.left = 16 + CHAR_PX * max(len(label) for label in labels)
        self.top = 60 if subtitle else 44
        self.width = max(self.left + PLOT_PX + 24 + CHAR_PX * note_chars,
                         32 + 1.1 * CHAR_PX * max(len(title), len(subtitle)))  # bold title
        self.height = self.top + ROW_PX * len(labels) + 44
        self.parts = [
            f"<svg xmlns='http://www.w3.org/2000/svg' width='{self.width:.0f}' "
            f"height='{self.height:.0f}' viewBox='0 0 {self.width:.0f} {self.height:.0f}' "
            f"data-axis-max='{self.ticks[-1]}'>",
            "<rect width='100%' height='100%' fill='white'/>",
            f"<text x='{self.width / 2:.1f}' y='22' text-anchor='middle' {FONT} "
            f"font-weight='bold'>{escape(title)}</text>",
        ]
        if subtitle:
            self.parts.append(f"<text x='{self.width / 2:.1f}' y='40' text-anchor='middle' "
                              f"{FONT} fill='#555'>{escape(subtitle)}</text>")
        bottom = self.top + ROW_PX * len(labels)
        for tick in self.ticks:
            x = self.x(tick)
            self.parts.append(f"<line x1='{x:.1f}' y1='{self.top - 4}' x2='{x:.1f}' "
                              f"y2='{bottom}' stroke='#ddd'/>")
            self.parts.append(f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle' "
                              f"{FONT}>{tick:g}</text>")
        self.parts.append(f"<text x='{self.left + PLOT_PX / 2:.1f}' y='{bottom + 34}' "
                          f"text-anchor='middle' {FONT}>{escape(unit)}</text>")
        for index, label in enumerate(labels):
            self.parts.append(f"<text x='{self.left - 8:.1f}' y='{self.middle(index) + 4:.1f}' "
                              f"text-anchor='end' {FONT}>{escape(label)}</text>")

    def x(self, value: float) -> float:
        return self.left + PLOT_PX * value / self.ticks[-1]

    def middle(self, index: int) -> float:
        return self.top + ROW_PX * index + ROW_PX / 2

    def note(self, index: int, text: str) -> None:
        self.parts.append(f"<text x='{self.left + PLOT_PX + 12:.1f}' "
                          f"y='{self.middle(index) + 4:.1f}' {FONT}>{escape(text)}</text>")

    def write(self, path: str | Path) -> Path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("\n".join([*self.parts, "</svg>"]) + "\n", encoding="utf-8")
        return target


def throughput_svg(path: str | Path, rates: Mapping[str, float], *,
                   title: str = "Throughput per configuration", unit: str = "articles/s",
                   notes: Mapping[str, str] | None = None) -> Path:
    """One bar per configuration, in the order given; `notes` adds text after a bar's value
    (e.g. the speed-up over a baseline)."""
    notes = notes or {}
    if any(rate < 0 or math.isnan(rate) for rate in rates.values()):
        raise ValueError(f"rates must be numbers >= 0: {dict(rates)}")
    texts = {label: f"{_number(rate)} {unit}" + (f" ({notes[label]})" if label in notes else "")
             for label, rate in rates.items()}
    figure = _Figure(title, list(rates), max(rates.values(), default=0.0), unit,
                     max((len(t) for t in texts.values()), default=0))
    for index, (label, rate) in enumerate(rates.items()):
        y = figure.middle(index) - ROW_PX * 0.35
        figure.parts.append(
            f"<rect class='bar' data-label={quoteattr(label)} data-value='{rate!r}' "
            f"x='{figure.left:.1f}' y='{y:.1f}' width='{figure.x(rate) - figure.left:.2f}' "
            f"height='{ROW_PX * 0.7:.1f}' fill='{COLORS[index % len(COLORS)]}'/>")
        figure.note(index, texts[label])
    return figure.write(path)


def latency_by_class_svg(path: str | Path, latencies: Mapping[str, Sequence[float]], *,
                         title: str = "Latency by class", unit: str = "seconds") -> Path:
    """A box plot per class, in the order given: box p25-p75, median line, whiskers p5-p95,
    a dot at p99; n, p50, p95 and p99 printed beside it. A class with no values gets a row
    that says so."""
    labels = [f"{name} (n={len(values)})" for name, values in latencies.items()]
    summaries = {name: {q: percentile(values, q) for q in (5, 25, 50, 75, 95, 99)}
                 for name, values in latencies.items() if values}
    largest = max((s[99] for s in summaries.values()), default=0.0)
    notes = {name: (f"p50 {_number(s[50])}, p95 {_number(s[95])}, p99 {_number(s[99])}"
                    if (s := summaries.get(name)) else "no data")
             for name in latencies}
    figure = _Figure(title, labels, largest, unit,
                     max((len(n) for n in notes.values()), default=0),
                     subtitle="box: p25 to p75, line: median, whiskers: p5 to p95, dot: p99")
    for index, name in enumerate(latencies):
        figure.note(index, notes[name])
        summary = summaries.get(name)
        if summary is None:
            continue
        middle, half = figure.middle(index), ROW_PX * 0.3
        color = COLORS[index % len(COLORS)]
        x = {q: figure.x(value) for q, value in summary.items()}
        attributes = " ".join(f"data-p{q}='{value!r}'" for q, value in summary.items())
        figure.parts += [
            f"<g class='distribution' data-name={quoteattr(name)} "
            f"data-count='{len(latencies[name])}' {attributes}>",
            f"<line class='whisker' x1='{x[5]:.2f}' y1='{middle:.1f}' x2='{x[95]:.2f}' "
            f"y2='{middle:.1f}' stroke='{color}' stroke-width='1.5'/>",
            f"<rect class='box' x='{x[25]:.2f}' y='{middle - half:.1f}' "
            f"width='{x[75] - x[25]:.2f}' height='{2 * half:.1f}' fill='{color}' "
            f"fill-opacity='0.35' stroke='{color}'/>",
            f"<line class='median' x1='{x[50]:.2f}' y1='{middle - half:.1f}' x2='{x[50]:.2f}' "
            f"y2='{middle + half:.1f}' stroke='black' stroke-width='2'/>",
            f"<circle class='p99' cx='{x[99]:.2f}' cy='{middle:.1f}' r='3' fill='{color}'/>",
            "</g>",
        ]
    return figure.write(path)
