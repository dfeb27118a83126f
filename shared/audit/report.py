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
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from shared.audit.plots import PALETTE, Chart, Rule, Series, render_svg
from shared.audit.verify import Finding, RunAudit, SiteAudit
from shared.hashchain import json_safe
from shared.privacy import DpEvent

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


def _n(value: Any, digits: int = 4) -> str:
    """A number as a person reads it: ``digits`` significant digits (0.3333, 1e-05, 256), inf, or n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "n/a"
    return "inf" if math.isinf(v) else f"{v:.{digits}g}"


def majority_baseline(metrics: Mapping[str, Any] | None) -> float | None:
    """The accuracy of always predicting the test set's most frequent label, if the run recorded it
    (``majority_baseline`` in metrics.json: a number, or an object with ``accuracy``)."""
    rounds = (metrics or {}).get("rounds") or []
    last_test = rounds[-1].get("test") if rounds and isinstance(rounds[-1], Mapping) else None
    for where in (metrics or {}, last_test or {}):
        value = where.get("majority_baseline") if isinstance(where, Mapping) else None
        if isinstance(value, Mapping):
            value = value.get("accuracy")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


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
            "distributed_rounds": d.distributed_rounds,
            "epsilon_aggregate": d.epsilon_aggregate,
            "epsilon_fallback": d.epsilon_fallback,
        }
        for name, d in site.sources.items()
    }
    parameters: dict[tuple[Any, ...], dict[str, Any]] = {}
    for c in site.checks:
        e = c.entry
        if not isinstance(e.event, DpEvent):  # a distributed-noise round, as enforced: its effective multiplier
            ev = e.event
            row = {
                "sample_rate": ev.sample_rate,
                "noise_multiplier": ev.noise_stddev / ev.l2_sensitivity,
                "steps": ev.steps,
                "clip_norm": None,  # in fixed-point units only: l2_sensitivity
                "sampling": "poisson",
                "mechanism": f"{ev.mechanism}, {ev.shares} share(s)",
                "delta": e.delta,
                "accountant": "rdp",
                "rounds": 0,
            }
            p = parameters.setdefault(tuple(sorted((k, str(v)) for k, v in row.items() if k != "rounds")), row)
            p["rounds"] += 1
            continue
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
        "budget": site_budget(site),
        "data_sources": data_sources,
        "dp_parameters": list(parameters.values()),
        "entries": entries,
        "overrides": [  # the operator's accept-ledger lines: each is also an error finding
            {
                "seq": o.seq,
                "time": o.time,
                "reason": o.reason,
                "entries_found": o.entries_found,
                "lost_at_least": o.lost,
                "head": o.head,
                "witness": o.witness,
            }
            for o in site.overrides
        ],
        "findings": [f.to_dict() for f in site.findings],
    }


def site_budget(site: SiteAudit) -> dict[str, Any]:
    """The site's budget as the report states it: ``set`` (a finite max-epsilon, from its ledger or from
    ``--budget``), ``none`` (its ledger records that it set none) or ``not recorded`` (older entries only)."""
    recorded = [c.entry.max_epsilon for c in site.checks if c.entry.max_epsilon is not None]
    value = site.max_epsilon
    if value is not None and math.isfinite(value):
        where = "the site's ledger" if recorded and recorded[-1] == value else "--budget of the audit command"
        return {"status": "set", "max_epsilon": value, "from": where}
    if value is not None or any(c.entry.data_source is not None for c in site.checks):
        return {"status": "none", "max_epsilon": None, "from": "the site's ledger: its config sets no max-epsilon"}
    return {"status": "not recorded", "max_epsilon": None, "from": "older ledger entries, which do not record it"}


def canary_status(config: Mapping[str, Any], canary: Mapping[str, Any] | None) -> str:
    """Whether the run's empirical canary audit ran, in words."""
    if canary is not None:
        return f"ran: {canary.get('canaries')} canaries (canary_scores.json)"
    wanted = config.get("canaries")
    if isinstance(wanted, int) and not isinstance(wanted, bool) and wanted > 0:
        return f"NOT RUN: the run config asked for {wanted} canaries, but the run left no canary_scores.json"
    if "canaries" in config:
        return "not run (canaries = 0 in the run config)"
    return "not run (no canary_scores.json)"


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
            dp_noise=rec.get("dp_noise"),  # "local" or "distributed" (absent in older run ledgers)
            aggregate_hash=rec.get("aggregate_hash"),
            attested_epsilon={s: a.get("epsilon") for s, a in rec.get("attestations", {}).items()},
        )
        if not row["test"]:
            row["test"] = dict(rec.get("metrics") or {})
    initial = (metrics or {}).get("initial_test")
    config = (metrics or {}).get("config") or {}
    return {
        "run_id": run_id,
        "run_dir": str(run_dir),
        "run_ledger": str(run.path) if run is not None else None,
        "verified": run.ok if run is not None else None,
        "config": config,
        "majority_baseline": majority_baseline(metrics),
        "canary_audit": canary_status(config, canary),
        "initial_test": dict(initial) if isinstance(initial, Mapping) else None,
        "rounds": [rounds_by_number[k] for k in sorted(rounds_by_number)],
        "secure_aggregation": any(r.get("secure_aggregation") for r in rounds_by_number.values()),
        "canary": dict(canary) if canary is not None else None,
        "findings": [f.to_dict() for f in run.findings] if run is not None else [],
    }


def distributed_statement(what: str, d: Mapping[str, Any]) -> str:
    """Plain words for a data source with distributed-noise rounds: its two epsilons and which one is enforced."""
    agg, fb = _num(d["epsilon_aggregate"]), _num(d["epsilon_fallback"])
    return (
        f"{what}: {d['distributed_rounds']} of its rounds used distributed noise: the site added only its share of "
        "the noise, the other sites of the round the rest, and secure aggregation revealed only the sum. Against "
        f"anyone who sees only that sum (the server, the other sites, whoever gets the model) epsilon is "
        f"{agg:.3f} (the aggregate guarantee: it needs the round's minimum number of honest sites to have added "
        f"their shares). If the server broke secure aggregation together with colluding sites and saw this "
        f"site's update alone, only the site's own share protects it: epsilon {fb:.3f} (the fallback "
        "guarantee). Both at the site's delta, RDP accountant. The epsilon above is the one the site enforced "
        "its budget on, as its own node config chose (budget-guarantee)."
    )


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
            if d.get("distributed_rounds"):
                out.append(distributed_statement(what, d))
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


def summary(sites: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per site across every run: what it released, its largest epsilon (over its data sources) and
    how much of its budget that is, the rounds it declined, and whether its ledger verified."""
    rows = []
    for s in sites:
        sources = list(s["data_sources"].values())
        worst = max(sources, key=lambda d: _num(d["epsilon"])) if sources else None
        budget = s["budget"]
        eps = _num(worst["epsilon"]) if worst else math.nan
        used = eps / budget["max_epsilon"] if budget["status"] == "set" and math.isfinite(eps) else None
        declined = sum(s["site_id"] in (r.get("declined") or {}) for run in runs for r in run["rounds"])
        rows.append(
            {
                "site_id": s["site_id"],
                "verified": s["verified"],
                "releases": sum(d["rounds"] for d in sources),
                "runs": len({run for d in sources for run in d["runs"]}),
                "epsilon": eps,
                "delta": worst["delta"] if worst else None,
                "accountant": worst["accountant"] if worst else None,
                "budget": budget["max_epsilon"],
                "budget_status": budget["status"],
                "budget_used": used,
                "declined_rounds": declined,
                "errors": sum(f["severity"] == "error" for f in s["findings"]),
            }
        )
    return rows


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
            "summary": summary(site_sections, runs),
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


@dataclass(frozen=True)
class RoundAxis:
    """The x axis of the epsilon plots: one position per (run, round), runs in the order the ledgers recorded
    them, each run's rounds side by side; the same positions on every site's plot."""

    positions: dict[tuple[str, int], float]
    ticks: list[tuple[float, str]]
    run_starts: list[Rule]

    @property
    def label(self) -> str:
        runs = len(self.run_starts)
        return "round" if runs <= 1 else f"round (of each of the {runs} runs, in the order the ledgers recorded them)"


def round_axis(sites: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]]) -> RoundAxis:
    rounds: dict[str, set[int]] = {}
    for site in sites:  # a ledger is in time order: the order its runs first appear in is the runs' order
        for e in sorted(site["entries"], key=lambda e: e["seq"]):
            rounds.setdefault(str(e["run_id"]), set()).add(int(e["round"]))
    for run in runs:  # runs no ledger recorded (every site declined) still get their rounds
        numbers = rounds.setdefault(str(run["run_id"]), set())
        numbers.update(int(r["round"]) for r in run["rounds"])
    positions: dict[tuple[str, int], float] = {}
    ticks: list[tuple[float, str]] = []
    starts: list[Rule] = []
    offset = 0.0
    for run_id, numbers in rounds.items():
        if not numbers:
            continue
        lo, hi = min(numbers), max(numbers)
        starts.append(Rule(offset - 0.5, f"run {run_id}"))
        for number in range(lo, hi + 1):
            positions[(run_id, number)] = offset + number - lo
            ticks.append((offset + number - lo, str(number)))
        offset += hi - lo + 1
    return RoundAxis(positions, ticks, starts)


def run_targets(runs: Sequence[Mapping[str, Any]]) -> list[float]:
    """The distinct target-epsilon values the runs planned their noise for (DP runs that set no noise)."""
    found = []
    for run in runs:
        config = run.get("config") or {}
        target = config.get("target-epsilon")
        planned = config.get("dp", True) and not _num(config.get("noise-multiplier", 0.0)) > 0
        if planned and isinstance(target, (int, float)) and not isinstance(target, bool) and target > 0:
            found.append(float(target))
    return sorted(set(found))


def epsilon_chart(site: Mapping[str, Any], axis: RoundAxis | None = None, targets: Sequence[float] = ()) -> Chart:
    """The site's cumulative epsilon at its own delta after each round (x: rounds, across runs), one line per
    data source (legacy entries, which have none, count toward every source), and its budget as a red line;
    a site without a budget gets the runs' planned target-epsilon as a grey reference line instead."""
    axis = axis or round_axis([site], [])
    series = []
    for i, source in enumerate(site["data_sources"]):
        last: dict[float, float] = {}  # the epsilon after the round's last release (training, evaluation)
        for e in sorted(site["entries"], key=lambda e: e["seq"]):
            if e["data_source"] in (None, source):
                last[axis.positions[(str(e["run_id"]), int(e["round"]))]] = _num(e["epsilon_site"])
        xs = sorted(last)
        series.append(Series(f"data source {source}", xs, [last[x] for x in xs], color=PALETTE[i % len(PALETTE)]))
    budget = site.get("budget") or {}
    if budget.get("status") == "set":
        value = _num(budget["max_epsilon"])
        hrules = [Rule(value, f"budget: max-epsilon = {_n(value)}", color="#b00020")]
    else:
        hrules = [
            Rule(t, f"run target-epsilon = {_n(t)} (planned; this site set no budget)", dash="2 4") for t in targets
        ]
    return Chart(
        title=f"{site['site_id']}: cumulative epsilon over rounds and runs",
        x_label=axis.label,
        y_label="epsilon",
        series=series,
        hrules=hrules,
        vrules=axis.run_starts,
        x_ticks=axis.ticks,
        x_min=-0.5 if axis.ticks else None,
        x_max=axis.ticks[-1][0] + 0.5 if axis.ticks else None,
    )


def accuracy_chart(runs: Sequence[Mapping[str, Any]]) -> Chart:
    """Test accuracy (solid) and macro-F1 (dashed) per run over rounds, and the majority-class baseline."""
    series = []
    for i, run in enumerate(runs):
        for metric, name, dashed in (("accuracy", "accuracy", False), ("macro_f1", "macro-F1", True)):
            pts = [(0, _num(run["initial_test"].get(metric)))] if run.get("initial_test") else []
            pts += [(r["round"], _num(r.get("test", {}).get(metric))) for r in run["rounds"]]
            pts = [(x, y) for x, y in pts if not math.isnan(y)]
            if pts or not dashed:
                series.append(
                    Series(
                        f"run {run['run_id']} {name}",
                        [x for x, _ in pts],
                        [y for _, y in pts],
                        color=PALETTE[i % len(PALETTE)],
                        dashed=dashed,
                    )
                )
    baselines = sorted({b for b in (run.get("majority_baseline") for run in runs) if b is not None})
    return Chart(
        title="Test accuracy and macro-F1 of the global model over rounds",
        x_label="round (0: before training)",
        y_label="accuracy, macro-F1",
        series=series,
        hrules=[Rule(b, f"majority-class baseline {_n(b, 3)}", dash="2 4") for b in baselines],
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


def budget_text(budget: Mapping[str, Any]) -> str:
    if budget["status"] == "set":
        return f"max-epsilon = {_n(budget['max_epsilon'])} (from {budget['from']})"
    if budget["status"] == "none":
        return "none set (the site's config has no max-epsilon: nothing at the site limited its epsilon)"
    return f"not recorded ({budget['from']})"


def _site_html(site: Mapping[str, Any], axis: RoundAxis, targets: Sequence[float]) -> str:
    status = '<span class="ok">verified</span>' if site["verified"] else '<span class="fail">FAILED</span>'
    parts = [
        f"<h2>Site {_e(site['site_id'])}</h2>",
        f"<p>Ledger <code>{_e(site['ledger'])}</code>: {status}, {site['verified_entries']} entries verified "
        f"(chain, signatures, epsilon recomputed from the events). Budget: "
        f"{_e(budget_text(site['budget']))}.</p>",
        f'<div class="figure">{render_svg(epsilon_chart(site, axis, targets))}</div>',
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
                    _n(d["delta"]),
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
                    _n(p["sample_rate"]),
                    _n(p["noise_multiplier"]),
                    _n(p["steps"]),
                    _n(p["clip_norm"]),
                    _n(p["delta"]),
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


RUN_CONFIG_KEYS = (  # what a privacy officer checks first; the whole config follows in a <details>
    "num-server-rounds",
    "data-path",
    "model-path",
    "dp",
    "target-epsilon",
    "noise-multiplier",
    "max-grad-norm",
    "delta",
    "accountant",
    "batch-size",
    "local-steps",
    "learning-rate",
    "lora-mode",
    "lora-r",
    "center-features",
    "secure-aggregation",
    "secagg-threshold",
    "canaries",
    "reproducible-noise",
)


def _config_value(value: Any) -> str:
    return _n(value) if isinstance(value, (int, float)) else str(value)


def _config_html(config: Mapping[str, Any]) -> str:
    if not config:
        return "<p>Run configuration: not recorded (metrics.json has no config).</p>"
    shown = [(k, _config_value(config[k])) for k in RUN_CONFIG_KEYS if k in config]
    return "\n".join(
        [
            "<h3>Run configuration</h3>",
            _table(["key", "value"], shown),
            "<details><summary>The whole run configuration</summary>",
            _table(["key", "value"], [(k, _config_value(v)) for k, v in sorted(config.items())]),
            "</details>",
        ]
    )


def _quality_text(run: Mapping[str, Any]) -> str:
    final = run["rounds"][-1].get("test", {}) if run["rounds"] else {}
    baseline = run.get("majority_baseline")
    parts = [
        f"Final model (round {run['rounds'][-1]['round']}): " if run["rounds"] else "No round completed. ",
        f"accuracy {_n(final.get('accuracy'))}, macro-F1 {_n(final.get('macro_f1'))}. " if run["rounds"] else "",
        "Majority-class baseline (always predicting the most frequent label): "
        + (f"accuracy {_n(baseline)}." if baseline is not None else "not recorded."),
    ]
    if baseline is not None and run["rounds"] and _num(final.get("accuracy")) <= baseline:
        parts.append(" The final model is NOT better than the majority-class baseline.")
    return "".join(parts)


def _run_html(run: Mapping[str, Any]) -> str:
    rows = []
    for r in run["rounds"]:
        declined = r.get("declined", {})
        test = r.get("test", {})
        rows.append(
            (
                r["round"],
                _n(test.get("accuracy")),
                _n(test.get("macro_f1")),
                ", ".join(r.get("survivors", [])),
                "; ".join(f"{k} ({v})" if v else k for k, v in declined.items()),
                ", ".join(r.get("dropped", [])),
                ("yes" if r.get("secure_aggregation") else "no")
                + (", distributed DP noise" if r.get("dp_noise") == "distributed" else ""),
                "ABORTED" if r.get("aborted") else str(r.get("aggregate_hash") or "")[:19],
                ", ".join(f"{k}: {_eps(v)}" for k, v in r.get("attested_epsilon", {}).items()),
            )
        )
    status = {True: '<span class="ok">verified</span>', False: '<span class="fail">FAILED</span>'}.get(
        run["verified"], '<span class="warn">no run ledger</span>'
    )
    canary = run.get("canary_audit") or canary_status(run.get("config") or {}, run.get("canary"))
    parts = [
        f"<h2>Run {_e(run['run_id'])}</h2>",
        f"<p>Run ledger <code>{_e(run['run_ledger'])}</code>: {status}.</p>",
        f"<p>{_e(_quality_text(run))}</p>",
        f"<p>Empirical canary audit: {_e(canary)}.</p>",
        _config_html(run.get("config") or {}),
        "<h3>Rounds</h3>",
        _table(
            [
                "round",
                "test acc.",
                "test macro-F1",
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
    refuted = bool(c["refuted"]) if "refuted" in c else lower > claimed
    detectable = _num(c.get("epsilon_detectable"))
    verdict = (
        '<span class="fail">the empirical lower bound EXCEEDS the claim: the claimed guarantee is false</span>'
        if refuted
        else '<span class="ok">consistent: the lower bound does not exceed the claim</span>'
    )
    reach = (
        f"At these settings (canaries, guesses, confidence, delta) this audit can refute a claim of epsilon up to "
        f"{detectable:.3f}, if every guess were right; a claim above that cannot be refuted by it, whatever went "
        "wrong."
        if not math.isnan(detectable)
        else ""
    )
    if not math.isnan(detectable) and detectable <= claimed:
        reach += (
            f" The claim ({claimed:.3f}) is above it: this audit could not have caught a run without noise. "
            "More canaries raise the reach."
        )
    return "\n".join(
        [
            "<h3>Empirical audit (canaries, one run)</h3>",
            f"<p>{_e(str(c.get('method') or 'one-run bound (Steinke, Nasr and Jagielski 2023)'))}; "
            f"canaries: {_e(str(c.get('kind', 'text')))}.</p>",
            _table(
                [
                    "claimed epsilon",
                    "empirical lower bound",
                    "largest epsilon it can refute",
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
                        _eps(detectable),
                        f"{_num(c.get('confidence')):.0%}",
                        _n(c.get("delta")),
                        f"{c.get('canaries')} ({c.get('included')})",
                        f"{c.get('guesses')} ({c.get('k_plus')}, {c.get('k_minus')})",
                        c.get("correct"),
                    )
                ],
            ),
            f"<p>{verdict}. {_e(reach)}</p>",
            "<p>A lower bound far below the claim is expected (one run) and does not show the claim is tight; a "
            "lower bound above it shows the claim is wrong.</p>",
        ]
    )


def _summary_html(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "<p>No site ledger was audited.</p>"
    table = []
    for r in rows:
        if r["budget_status"] == "set":
            budget = f"{_n(r['budget'])} ({_n(100 * _num(r['budget_used']), 3)}% used)"
        else:
            budget = "none set" if r["budget_status"] == "none" else "not recorded"
        table.append(
            (
                r["site_id"],
                '<span class="ok">verified</span>' if r["verified"] else '<span class="fail">FAILED</span>',
                _e(r["releases"]),
                _e(r["runs"]),
                _e(_eps(r["epsilon"])),
                _e(_n(r["delta"])),
                _e(r["accountant"] or "n/a"),
                _e(budget),
                _e(r["declined_rounds"]),
                _e(r["errors"]),
            )
        )
    header = ["site", "ledger", "releases", "runs", "epsilon", "delta", "accountant", "budget", "declined", "errors"]
    return _table(header, [(_e(row[0]), *row[1:]) for row in table], raw=True) + (
        "<p>Epsilon: the largest over the site's data sources, composed over every run, at the site's own delta.</p>"
    )


def render_html(report: Mapping[str, Any]) -> str:
    ok = report["verdict"] == "verified"
    verdict = (
        f'<p class="verdict {"ok" if ok else "fail"}">{"Verified" if ok else "FAILED"}: '
        f"{report['errors']} error(s), {report['warnings']} warning(s).</p>"
    )
    runs = report["runs"]
    axis, targets = round_axis(report["sites"], runs), run_targets(runs)
    body = [
        "<h1>PrivaTune privacy audit</h1>",
        f"<p>Generated {_e(report['generated'])}.</p>",
        verdict,
        "<h2>Every site at a glance</h2>",
        _summary_html(report.get("summary") or summary(report["sites"], runs)),
        "<h2>The guarantee, in plain words</h2>",
        "".join(f"<p>{_e(s)}</p>" for s in report["guarantee"]),
        "<h2>All findings</h2>",
        _findings_html(report["findings"]),
        *(_site_html(s, axis, targets) for s in report["sites"]),
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
