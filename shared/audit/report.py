"""The audit report: one JSON document (the record) and one self-contained HTML page rendered from it.

The HTML has no script and no external resource: inline CSS and inline SVG plots
(:mod:`shared.audit.plots`), so it opens the same anywhere, offline, years later. Per site: epsilon over
rounds and runs against its budget, the DP parameters, the verification results and a plain-language
statement of the guarantee; per run: test accuracy over rounds, who trained, declined or dropped; the
empirical canary audit when one was run.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.audit.plots import PALETTE, Chart, Rule, Series, render_svg
from shared.audit.verify import Finding, RunAudit, SiteAudit
from shared.hashchain import json_safe

REPORT_HTML = "report.html"
REPORT_JSON = "report.json"


def _num(value: Any) -> float:
    """A JSON number or its spelled-out non-finite form back to a float (None -> nan)."""
    if value is None:
        return math.nan
    return float(value)


def _eps(value: Any) -> str:
    v = _num(value)
    return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.3f}")


def short_fingerprint(fingerprint: str) -> str:
    """``<12 hex>… (keyed)`` for a keyed fingerprint, ``<12 hex>… (n rows)`` for a legacy one, for display."""
    parts = fingerprint.split(":")
    if len(parts) == 3 and parts[0] == "sha256":
        return f"{parts[1][:12]}\u2026 ({parts[2].removeprefix('rows=')} rows)"
    if len(parts) == 2 and parts[0] == "hmac-sha256":
        return f"{parts[1][:12]}\u2026 (keyed)"
    return fingerprint[:24]


NOT_COVERED = (
    "Not covered: a person with several records is protected only as a group (roughly k times "
    "epsilon for k records); facts true of the whole data set (its size, label balance, typical "
    "vocabulary) are not hidden; metrics a site computes on its own data for evaluation are not part "
    "of the guarantee; the guarantee assumes the recorded DP-SGD really ran (Poisson sampling, "
    "per-example clipping, Gaussian noise), which the ledger records but cannot prove: the canary "
    "audit is the empirical check of that."
)
SECURE_AGGREGATION = (
    "the server saw only the sum of the surviving sites' updates, never one site's update. This hides "
    "which site contributed what from the server; it does not change the epsilon above, which already "
    "holds against a server that sees every update (the noise is added at each site). Dropped sites "
    "are listed per round; a site that trained but was dropped still spent its budget, and its own "
    "ledger counts it."
)


# -- the JSON report
# -------------------------------------------------------------------------------------------


def site_section(site: SiteAudit) -> dict[str, Any]:
    entries = []
    for c in site.checks:
        e = c.entry
        entries.append(
            {
                "line": c.line,
                "seq": e.seq,
                "run_id": e.run_id,
                "round": e.round,
                "time": e.time,
                "dataset_fingerprint": e.dataset_fingerprint,
                "data_source": e.data_source,
                "purpose": e.release,
                "adapter_hash": e.adapter_hash,
                "event": e.event.to_dict(),
                "delta": e.delta,
                "accountant": e.accountant,
                "max_epsilon": e.max_epsilon,
                "epsilon_recorded": e.epsilon,
                "epsilon_recomputed": c.recomputed,
                "epsilon_site": c.site_epsilon,
                "epsilon_pld": c.cross_check,
                "matches": c.matches,
                "seeded_noise": e.seeded_noise,
            }
        )
    accounting = site.accounting
    data_sources = {
        name: {
            "epsilon": d.epsilon,
            "epsilon_pld": d.epsilon_pld,
            "delta": accounting.delta if accounting else None,
            "accountant": accounting.accountant if accounting else None,
            "accounting_from": accounting.source if accounting else None,
            "rounds": d.rounds,
            "runs": d.runs,
            "seeded_noise_rounds": d.seeded_noise_rounds,
            "fingerprints": {fp: seqs for fp, seqs in d.fingerprints.items()},
        }
        for name, d in site.sources.items()
    }
    parameters: dict[tuple[Any, ...], dict[str, Any]] = {}
    for c in site.checks:
        e = c.entry
        key = (
            e.event.sample_rate,
            e.event.noise_multiplier,
            e.event.steps,
            e.event.clip_norm,
            e.delta,
            e.accountant,
        )
        p = parameters.setdefault(
            key,
            {
                "sample_rate": e.event.sample_rate,
                "noise_multiplier": e.event.noise_multiplier,
                "steps": e.event.steps,
                "clip_norm": e.event.clip_norm,
                "sampling": e.event.sampling,
                "delta": e.delta,
                "accountant": e.accountant,
                "rounds": 0,
            },
        )
        p["rounds"] += 1
    return {
        "site_id": site.site_id,
        "ledger": str(site.path),
        "verified": site.ok,
        "verified_entries": len(site.checks),
        "max_epsilon": site.max_epsilon,
        "data_sources": data_sources,
        "dp_parameters": list(parameters.values()),
        "entries": entries,
        "findings": [f.to_dict() for f in site.findings],
    }


def run_section(
    run: RunAudit | None, metrics: Mapping[str, Any] | None, run_dir: Path, canary: Mapping[str, Any] | None
) -> dict[str, Any]:
    run_id = run.run_id if run is not None else str((metrics or {}).get("run_id", run_dir.name))
    rounds_by_number: dict[int, dict[str, Any]] = {}
    for r in (metrics or {}).get("rounds", []) or []:
        if isinstance(r, Mapping) and isinstance(r.get("round"), int):
            rounds_by_number[r["round"]] = {"round": r["round"], "test": dict(r.get("test") or {})}
    for rec in run.records if run is not None else []:
        row = rounds_by_number.setdefault(int(rec["round"]), {"round": int(rec["round"]), "test": {}})
        row.update(
            participants=rec.get("participants", []),
            declined=rec.get("declined", {}),
            survivors=rec.get("survivors", []),
            dropped=rec.get("dropped", []),
            aborted=rec.get("aborted", False),
            secure_aggregation=rec.get("secure_aggregation", False),
            aggregate_hash=rec.get("aggregate_hash"),
            attested_epsilon={s: a.get("epsilon") for s, a in rec.get("attestations", {}).items()},
        )
        if not row["test"]:
            row["test"] = dict(rec.get("metrics") or {})
    initial = (metrics or {}).get("initial_test")
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "run_ledger": str(run.path) if run is not None else None,
        "verified": run.ok if run is not None else None,
        "config": (metrics or {}).get("config", {}),
        "initial_test": dict(initial) if isinstance(initial, Mapping) else None,
        "rounds": [rounds_by_number[k] for k in sorted(rounds_by_number)],
        "secure_aggregation": any(r.get("secure_aggregation") for r in rounds_by_number.values()),
        "canary": dict(canary) if canary is not None else None,
        "findings": [f.to_dict() for f in run.findings] if run is not None else [],
    }


def guarantee_statements(sites: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plain-language statements of what the verified ledgers prove, and what they do not."""
    out = []
    for s in sites:
        for source, d in s["data_sources"].items():
            eps, delta = _num(d["epsilon"]), d["delta"]
            what = f"{s['site_id']}, data source {source!r}"
            runs_text = f"{d['rounds']} release(s) in {len(d['runs'])} run(s)"
            if math.isinf(eps):
                out.append(
                    f"{what}: NO differential-privacy guarantee. At least one of its {runs_text} "
                    "trained without noise, so its epsilon is infinite."
                )
                continue
            out.append(
                f"{what}: every single record has record-level (epsilon = {eps:.3f}, delta = {delta:g}) "
                f"differential privacy over all {runs_text} recorded in the site's own ledger "
                f"({d['accountant'].upper()} accountant, the site's delta and accountant from "
                f"{d['accounting_from']}). The probability of anything released (every "
                f"update and every model of those runs) changes by at most a factor "
                f"e^{eps:.3f} = {math.exp(eps):.2f}, except with probability {delta:g}, whether or not "
                "any one record was used."
            )
            if d.get("seeded_noise_rounds"):
                out.append(
                    f"{what}: {d['seeded_noise_rounds']} of its rounds drew their DP noise and sampling from "
                    "the run's seed (reproducible-noise, for experiments): against anyone who knows that seed, "
                    "the server included, those rounds give NO guarantee."
                )
    out.append(NOT_COVERED)
    secure = [r["run_id"] for r in runs if r.get("secure_aggregation")]
    plain = [r["run_id"] for r in runs if not r.get("secure_aggregation")]
    if secure:
        out.append(f"Secure aggregation (run(s) {', '.join(secure)}): {SECURE_AGGREGATION}")
    if plain:
        out.append(
            f"No secure aggregation in run(s) {', '.join(plain)}: the server saw each site's clipped, "
            "noised update in the clear. The epsilon above still holds against it."
        )
    return out


def build_report(
    *,
    sites: Sequence[SiteAudit],
    runs: Sequence[Mapping[str, Any]],
    findings: Sequence[Finding],
) -> dict[str, Any]:
    """The JSON report. ``runs`` are :func:`run_section` dicts; ``findings`` every finding of the audit."""
    site_sections = [site_section(s) for s in sites]
    errors = [f for f in findings if f.severity == "error"]
    return json_safe(
        {
            "generated": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "verdict": "verified" if not errors else "FAILED",
            "errors": len(errors),
            "warnings": len(findings) - len(errors),
            "findings": [f.to_dict() for f in findings],
            "sites": site_sections,
            "runs": list(runs),
            "guarantee": guarantee_statements(site_sections, runs),
        }
    )


# -- the HTML page
# ---------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .88rem; }
th, td { border: 1px solid #ccc; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
.ok { color: #17692b; font-weight: bold; } .fail { color: #b00020; font-weight: bold; }
.warn { color: #8a5a00; } .verdict { font-size: 1.3rem; padding: .6rem 1rem; border-radius: 6px; }
.verdict.ok { background: #e7f5ea; } .verdict.fail { background: #fdecee; }
.figure { margin: .5rem 0 1.5rem; } code { font-size: .85em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, raw: bool = False) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c if raw else _e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def epsilon_chart(site: Mapping[str, Any]) -> Chart:
    """Epsilon at the site's delta after each ledger entry (x: entry number, across runs), one line per data
    source (legacy entries, which have none, count toward every source)."""
    series = []
    for i, source in enumerate(site["data_sources"]):
        pts = [(e["seq"] + 1, _num(e["epsilon_site"])) for e in site["entries"] if e["data_source"] in (None, source)]
        series.append(
            Series(
                f"data source {source}",
                [x for x, _ in pts],
                [y for _, y in pts],
                color=PALETTE[i % len(PALETTE)],
            )
        )
    vrules, previous = [], None
    for e in site["entries"]:
        if e["run_id"] != previous:
            vrules.append(Rule(e["seq"] + 0.5, f"run {e['run_id']}"))
            previous = e["run_id"]
    budget = _num(site.get("max_epsilon"))
    hrules = [Rule(budget, f"budget max_epsilon = {budget:g}", color="#b00020")] if math.isfinite(budget) else []
    return Chart(
        title=f"{site['site_id']}: cumulative epsilon over rounds and runs",
        x_label="ledger entry (one per round trained, all runs)",
        y_label="epsilon",
        series=series,
        hrules=hrules,
        vrules=vrules,
    )


def accuracy_chart(runs: Sequence[Mapping[str, Any]]) -> Chart:
    series = []
    for i, run in enumerate(runs):
        pts = [(0, _num(run["initial_test"].get("accuracy")))] if run.get("initial_test") else []
        pts += [(r["round"], _num(r.get("test", {}).get("accuracy"))) for r in run["rounds"]]
        pts = [(x, y) for x, y in pts if not math.isnan(y)]
        series.append(
            Series(
                f"run {run['run_id']}",
                [x for x, _ in pts],
                [y for _, y in pts],
                color=PALETTE[i % len(PALETTE)],
            )
        )
    return Chart(
        title="Test accuracy of the global model over rounds",
        x_label="round (0: before training)",
        y_label="accuracy",
        series=series,
        y_min=0.0,
        y_max=1.0,
    )


def _findings_html(findings: Sequence[Mapping[str, Any]]) -> str:
    if not findings:
        return '<p class="ok">No problem found.</p>'
    rows = [
        (
            f'<span class="{"fail" if f["severity"] == "error" else "warn"}">{_e(f["severity"])}</span>',
            _e(f["subject"]),
            _e("" if f["line"] is None else f["line"]),
            _e(f["kind"]),
            _e(f["message"]),
        )
        for f in findings
    ]
    return _table(["", "subject", "line", "kind", "finding"], rows, raw=True)


def _site_html(site: Mapping[str, Any]) -> str:
    status = '<span class="ok">verified</span>' if site["verified"] else '<span class="fail">FAILED</span>'
    budget = _eps(site["max_epsilon"]) if site.get("max_epsilon") is not None else "not recorded"
    parts = [
        f"<h2>Site {_e(site['site_id'])}</h2>",
        f"<p>Ledger <code>{_e(site['ledger'])}</code>: {status}, {site['verified_entries']} entries verified "
        f"(chain, signatures, epsilon recomputed from the events). Budget: "
        f"{_e(budget)}.</p>",
        f'<div class="figure">{render_svg(epsilon_chart(site))}</div>',
        "<h3>Privacy spent per data source</h3>",
        _table(
            [
                "data source",
                "releases",
                "runs",
                "epsilon",
                "delta",
                "accountant",
                "delta and accountant from",
                "epsilon (dp-accounting PLD)",
                "fingerprints",
            ],
            [
                (
                    source,
                    d["rounds"],
                    ", ".join(map(str, d["runs"])),
                    _eps(d["epsilon"]),
                    f"{d['delta']:g}",
                    d["accountant"],
                    d["accounting_from"],
                    _eps(d.get("epsilon_pld")),
                    ", ".join(short_fingerprint(fp) for fp in d["fingerprints"]),
                )
                for source, d in site["data_sources"].items()
            ],
        ),
        "<h3>DP parameters</h3>",
        _table(
            [
                "sample rate (Poisson)",
                "noise multiplier",
                "steps/round",
                "clip norm",
                "delta",
                "accountant",
                "rounds",
            ],
            [
                (
                    p["sample_rate"],
                    p["noise_multiplier"],
                    p["steps"],
                    p["clip_norm"],
                    p["delta"],
                    p["accountant"],
                    p["rounds"],
                )
                for p in site["dp_parameters"]
            ],
        ),
        "<details><summary>Every ledger entry</summary>",
        _table(
            [
                "#",
                "run",
                "round",
                "purpose",
                "time",
                "epsilon recorded",
                "recomputed",
                "at the site's delta",
                "PLD",
                "budget",
                "ok",
            ],
            [
                (
                    e["seq"],
                    e["run_id"],
                    e["round"],
                    e["purpose"],
                    e["time"],
                    _eps(e["epsilon_recorded"]),
                    _eps(e["epsilon_recomputed"]),
                    _eps(e["epsilon_site"]),
                    _eps(e["epsilon_pld"]),
                    _eps(e["max_epsilon"]) if e["max_epsilon"] is not None else "-",
                    "yes" if e["matches"] else "NO",
                )
                for e in site["entries"]
            ],
        ),
        "</details>",
        "<h3>Verification</h3>",
        _findings_html(site["findings"]),
    ]
    return "\n".join(parts)


def _run_html(run: Mapping[str, Any]) -> str:
    rows = []
    for r in run["rounds"]:
        declined = r.get("declined", {})
        rows.append(
            (
                r["round"],
                _eps(r.get("test", {}).get("accuracy")),
                ", ".join(r.get("survivors", [])),
                "; ".join(f"{k} ({v})" if v else k for k, v in declined.items()),
                ", ".join(r.get("dropped", [])),
                "yes" if r.get("secure_aggregation") else "no",
                "ABORTED" if r.get("aborted") else str(r.get("aggregate_hash") or "")[:19],
                ", ".join(f"{k}: {_eps(v)}" for k, v in r.get("attested_epsilon", {}).items()),
            )
        )
    status = {True: '<span class="ok">verified</span>', False: '<span class="fail">FAILED</span>'}.get(
        run["verified"], '<span class="warn">no run ledger</span>'
    )
    parts = [
        f"<h2>Run {_e(run['run_id'])}</h2>",
        f"<p>Run ledger <code>{_e(run['run_ledger'])}</code>: {status}.</p>",
        _table(
            [
                "round",
                "test acc.",
                "trained (in aggregate)",
                "declined",
                "dropped",
                "secure agg.",
                "aggregate",
                "signed epsilon attestations",
            ],
            rows,
        ),
        _findings_html(run["findings"]),
    ]
    if run.get("canary"):
        parts.append(_canary_html(run["canary"]))
    return "\n".join(parts)


def _canary_html(c: Mapping[str, Any]) -> str:
    lower, claimed = _num(c.get("epsilon_lower")), _num(c.get("claimed_epsilon"))
    verdict = (
        '<span class="fail">the empirical lower bound EXCEEDS the claim: the claimed guarantee is false</span>'
        if lower > claimed
        else '<span class="ok">consistent: the lower bound does not exceed the claim</span>'
    )
    return "\n".join(
        [
            "<h3>Empirical audit (canaries, one run)</h3>",
            _table(
                [
                    "claimed epsilon",
                    "empirical lower bound",
                    "confidence",
                    "delta",
                    "canaries (inserted)",
                    "guesses (k+, k-)",
                    "correct",
                ],
                [
                    (
                        _eps(claimed),
                        _eps(lower),
                        f"{_num(c.get('confidence')):.0%}",
                        c.get("delta"),
                        f"{c.get('canaries')} ({c.get('included')})",
                        f"{c.get('guesses')} ({c.get('k_plus')}, {c.get('k_minus')})",
                        c.get("correct"),
                    )
                ],
            ),
            f"<p>{verdict}. A lower bound far below the claim is expected (one run, black-box scores) and "
            "does not show the claim is tight; a lower bound above it shows the claim is wrong.</p>",
        ]
    )


def render_html(report: Mapping[str, Any]) -> str:
    ok = report["verdict"] == "verified"
    verdict = (
        f'<p class="verdict {"ok" if ok else "fail"}">{"Verified" if ok else "FAILED"}: '
        f"{report['errors']} error(s), {report['warnings']} warning(s).</p>"
    )
    runs = report["runs"]
    body = [
        "<h1>PrivaTune privacy audit</h1>",
        f"<p>Generated {_e(report['generated'])}.</p>",
        verdict,
        "<h2>The guarantee, in plain words</h2>",
        "".join(f"<p>{_e(s)}</p>" for s in report["guarantee"]),
        "<h2>All findings</h2>",
        _findings_html(report["findings"]),
        *(_site_html(s) for s in report["sites"]),
    ]
    if runs:
        body.append("<h2>Model quality</h2>")
        body.append(f'<div class="figure">{render_svg(accuracy_chart(runs))}</div>')
        body.extend(_run_html(r) for r in runs)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>PrivaTune privacy audit</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_reports(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.json`` (strict JSON) and ``report.html``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / REPORT_JSON, out_dir / REPORT_HTML
    json_path.write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n")
    html_path.write_text(render_html(report), encoding="utf-8")
    return html_path, json_path
