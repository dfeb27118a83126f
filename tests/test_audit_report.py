"""The report's pieces: SVG plots, escaping, tolerance of missing optional metrics."""

from __future__ import annotations

import math
from pathlib import Path

from shared.audit.plots import Chart, Rule, Series, nice_ticks, render_svg
from shared.audit.report import build_report, render_html, run_section, short_fingerprint


def test_plot_draws_one_line_per_series_and_the_budget_rule():
    chart = Chart(
        "eps",
        "entry",
        "epsilon",
        [Series("a", [1, 2, 3], [0.5, 1.0, 1.4]), Series("b", [1, 2], [0.2, 0.3], color="#d62728")],
        hrules=[Rule(2.0, "budget")],
    )

    svg = render_svg(chart)

    assert svg.count("<polyline") == 2
    assert svg.count("<circle") == 5
    assert "budget" in svg and 'stroke-dasharray="8 4"' in svg


def test_infinite_epsilon_is_pinned_to_the_top_with_a_note():
    svg = render_svg(Chart("eps", "x", "y", [Series("a", [1, 2], [0.5, math.inf])]))

    assert "<path d=" in svg and "epsilon = inf" in svg


def test_an_empty_plot_says_so():
    assert "no data" in render_svg(Chart("eps", "x", "y", []))


def test_text_in_plots_is_escaped():
    svg = render_svg(Chart("<script>alert(1)</script>", "x", "y", [Series("<b>", [1], [1.0])]))

    assert "<script>" not in svg and "&lt;script&gt;" in svg and "<b>" not in svg


def test_integer_axes_get_integer_ticks():
    assert nice_ticks(0.5, 18.5, 8, min_step=1.0) == [0, 5, 10, 15]


def test_html_escapes_values_from_the_files(tmp_path):
    evil = "<img src=x onerror=alert(1)>"
    run = run_section(None, {"run_id": evil, "rounds": [{"round": 1, "test": {"accuracy": 0.7}}]}, tmp_path, None)

    page = render_html(build_report(sites=[], runs=[run], findings=[]))

    assert evil not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<script" not in page


def test_metrics_without_optional_fields_still_render(tmp_path):
    metrics = {"rounds": [{"round": 1}, {"round": 2, "test": {"loss": 0.3}}, {"no": "round"}]}

    run = run_section(None, metrics, Path(tmp_path / "run-7"), None)
    page = render_html(build_report(sites=[], runs=[run], findings=[]))

    assert [r["round"] for r in run["rounds"]] == [1, 2]
    assert run["run_id"] == "run-7"
    assert page.count('<svg class="plot"') == 1


def test_short_fingerprint_keeps_the_row_count():
    assert short_fingerprint("sha256:" + "ab" * 32 + ":rows=120") == "abababababab\u2026 (120 rows)"
