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


def _entry(seq, run_id, rnd, eps, source="default"):
    return {"seq": seq, "run_id": run_id, "round": rnd, "epsilon_site": eps, "data_source": source}


def test_an_older_ledger_without_budgets_says_not_recorded_and_a_new_one_says_none_set():
    from types import SimpleNamespace

    from shared.audit.report import budget_text, site_budget

    def site(data_source):
        entry = SimpleNamespace(max_epsilon=None, data_source=data_source)
        return SimpleNamespace(checks=[SimpleNamespace(entry=entry)], max_epsilon=None)

    legacy, current = site_budget(site(None)), site_budget(site("default"))

    assert legacy["status"] == "not recorded" and budget_text(legacy).startswith("not recorded (older ledger")
    assert current["status"] == "none" and budget_text(current).startswith("none set")


def test_the_epsilon_plot_has_one_point_per_round_after_its_last_release():
    from shared.audit.report import epsilon_chart, round_axis

    entries = [  # run a: the centering query (round 0), round 1 trained and evaluated; run b: round 1
        _entry(0, "a", 0, 0.16),
        _entry(1, "a", 1, 2.0),
        _entry(2, "a", 1, 2.1),
        _entry(3, "b", 1, 3.0),
    ]
    site = {"site_id": "s", "data_sources": {"default": {}}, "entries": entries, "budget": {"status": "none"}}

    chart = epsilon_chart(site, round_axis([site], []))

    (series,) = chart.series
    assert list(series.xs) == [0, 1, 2] and list(series.ys) == [0.16, 2.1, 3.0]
    assert chart.x_ticks == [(0, "0"), (1, "1"), (2, "1")]
    assert [(r.value, r.label) for r in chart.vrules] == [(-0.5, "run a"), (1.5, "run b")]
    assert chart.hrules == []  # no budget and no run target known


def test_many_rounds_get_thinned_tick_labels():
    ticks = [(float(i), str(i % 10)) for i in range(60)]

    svg = render_svg(Chart("eps", "round", "epsilon", [Series("a", [0, 59], [0.1, 0.2])], x_ticks=ticks))

    assert 20 <= svg.count('y2="258"') <= 30  # one tick mark per label shown, at most ~24
