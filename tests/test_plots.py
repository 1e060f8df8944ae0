"""benchmarks/plots.py: the SVG figures hold the figures they were given, in the right places."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from types import ModuleType

import pytest

SVG = "{http://www.w3.org/2000/svg}"


def load_plots() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "plots.py"
    spec = importlib.util.spec_from_file_location("benchmark_plots", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


plots = load_plots()


def parse(path: Path) -> ElementTree.Element:
    root = ElementTree.parse(path).getroot()  # fails on malformed XML
    assert root.tag == f"{SVG}svg"
    return root


def texts(root: ElementTree.Element) -> list[str]:
    return [t.text or "" for t in root.iter(f"{SVG}text")]


def test_throughput_bars_are_in_order_and_proportional_to_the_rates(tmp_path: Path) -> None:
    rates = {"baseline: one at a time": 1.5, "server <torch & friends>": 6.0, "idle": 0.0}
    path = plots.throughput_svg(tmp_path / "sub" / "throughput.svg", rates,
                                notes={"server <torch & friends>": "4.00x"})
    root = parse(path)
    bars = [b for b in root.iter(f"{SVG}rect") if b.get("class") == "bar"]
    assert [b.get("data-label") for b in bars] == list(rates)
    assert [float(b.get("data-value")) for b in bars] == list(rates.values())
    widths = [float(b.get("width")) for b in bars]
    assert widths[1] == pytest.approx(4 * widths[0]) and widths[2] == 0
    axis_max = float(root.get("data-axis-max"))
    assert 6.0 <= axis_max < 12  # a round axis just past the largest rate
    assert widths[1] == pytest.approx(plots.PLOT_PX * 6.0 / axis_max)
    assert "6 articles/s (4.00x)" in texts(root)
    assert "server <torch & friends>" in texts(root)  # escaped in the file, intact when read
    ys = [float(b.get("y")) for b in bars]
    assert ys == sorted(ys) and len(set(ys)) == 3


def test_latency_boxes_hold_the_percentiles_of_each_class(tmp_path: Path) -> None:
    interactive = [0.1 * i for i in range(1, 101)]  # 0.1 .. 10 s
    batch = [5.0 + 0.2 * i for i in range(1, 51)]  # 5.2 .. 15 s
    path = plots.latency_by_class_svg(tmp_path / "latency.svg",
                                      {"interactive": interactive, "batch": batch, "idle": []})
    root = parse(path)
    groups = {g.get("data-name"): g for g in root.iter(f"{SVG}g")
              if g.get("class") == "distribution"}
    assert list(groups) == ["interactive", "batch"]  # no box for a class without values
    for name, values in (("interactive", interactive), ("batch", batch)):
        group = groups[name]
        assert int(group.get("data-count")) == len(values)
        quartiles = statistics.quantiles(values, n=4, method="inclusive")
        assert float(group.get("data-p25")) == pytest.approx(quartiles[0])
        assert float(group.get("data-p50")) == pytest.approx(statistics.median(values))
        assert float(group.get("data-p75")) == pytest.approx(quartiles[2])
    axis_max = float(root.get("data-axis-max"))

    def x_of(value: float) -> float:
        left = float(next(b for b in groups["batch"] if b.get("class") == "box").get("x"))
        return left - plots.PLOT_PX * (float(groups["batch"].get("data-p25")) - value) / axis_max

    medians = {name: float(next(e for e in group if e.get("class") == "median").get("x1"))
               for name, group in groups.items()}
    assert medians["batch"] > medians["interactive"]
    assert medians["interactive"] == pytest.approx(x_of(statistics.median(interactive)), abs=0.02)
    box = next(e for e in groups["interactive"] if e.get("class") == "box")
    assert float(box.get("width")) == pytest.approx(
        plots.PLOT_PX * (quartiles_of(interactive)[2] - quartiles_of(interactive)[0]) / axis_max,
        abs=0.02)
    assert axis_max >= plots.percentile(batch, 99)
    assert "idle (n=0)" in texts(root) and "no data" in texts(root)


def quartiles_of(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4, method="inclusive")


def test_a_long_title_widens_the_figure(tmp_path: Path) -> None:
    short = parse(plots.throughput_svg(tmp_path / "a.svg", {"a": 1.0}, title="T"))
    long = parse(plots.throughput_svg(tmp_path / "b.svg", {"a": 1.0}, title="T" * 200))
    assert float(long.get("width")) >= 200 * plots.CHAR_PX > float(short.get("width"))


def test_percentile_interpolates_and_refuses_nothing() -> None:
    assert plots.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert plots.percentile([1.0], 99) == 1.0
    assert plots.percentile([0.0, 10.0], 95) == pytest.approx(9.5)
    with pytest.raises(ValueError):
        plots.percentile([], 50)


def test_nothing_to_plot_or_negative_rates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.latency_by_class_svg(tmp_path / "x.svg", {})
    with pytest.raises(ValueError, match="rates"):
        plots.throughput_svg(tmp_path / "x.svg", {"a": -1.0})
