"""``privatune audit``: verify every ledger, re-account every epsilon, run the canary bound, write reports.

Exit status: 0 when everything verifies, 1 when any check fails (each failure is printed, naming the file,
line and entry), 2 for unusable arguments or inputs (missing roster, unreadable metrics).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shared.audit.canary import CanaryError, epsilon_detectable, one_run_audit
from shared.audit.fdp import audit_recorded_events
from shared.audit.report import build_report, run_section, write_reports
from shared.audit.verify import (
    Finding,
    SiteAudit,
    audit_run_ledger,
    audit_site_ledger,
    cross_check_attestations,
    unattested_rounds,
)
from shared.canary_data import CANARY_FILE
from shared.identity import ROSTER_FILE, IdentityError, Roster
from shared.ledger import PURPOSE_TRAIN, RUN_LEDGER_FILE
from shared.privacy import DpEvent
from shared.site import LEDGER_FILE

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"  # written by the ServerApp (server/outputs.py)


class AuditInputError(ValueError):
    """The audit cannot start: a missing or malformed roster, metrics file or argument."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="privatune audit",
        description="Verify the privacy ledgers (chains, signatures, attestations), recompute every epsilon, "
        "and write report.html and report.json.",
    )
    p.add_argument("--sim-dir", type=Path, help="a simulation's sites directory (roster.json, sites/<id>/)")
    p.add_argument("--ledger", type=Path, action="append", default=[], help="a site ledger (repeat with --site-id)")
    p.add_argument("--site-id", action="append", default=[], help="the site id of the matching --ledger")
    p.add_argument(
        "--ledger-head",
        action="append",
        default=[],
        metavar="SITE=PATH",
        help="a site's signed head record, when it is not beside its ledger (<ledger>.head.json); repeatable",
    )
    p.add_argument("--roster", type=Path, help="roster.json of site public keys (default: <sim-dir>/roster.json)")
    p.add_argument(
        "--run-dir",
        type=Path,
        action="append",
        default=[],
        help="a run's output directory (metrics.json, run_ledger.jsonl, canary_scores.json); repeatable",
    )
    p.add_argument("--out", type=Path, required=True, help="where to write report.html and report.json")
    p.add_argument(
        "--budget",
        action="append",
        default=[],
        metavar="[SITE=]EPSILON",
        help="a site's max_epsilon to draw and check, when its ledger does not record one; repeatable",
    )
    p.add_argument(
        "--node-config",
        type=Path,
        action="append",
        default=[],
        help="a deployed site's node config (its site-id, delta and accountant); repeatable. Simulated sites' "
        "site.toml under --sim-dir is read by itself. Without either, a site's delta and accountant are its "
        "ledger's first entry's",
    )
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the canary lower bound")
    p.add_argument(
        "--no-cross-check",
        action="store_true",
        help="skip the independent dp-accounting PLD epsilon per entry",
    )
    return p


def parse_budgets(values: Sequence[str], site_ids: Sequence[str]) -> dict[str, float]:
    budgets: dict[str, float] = {}
    for raw in values:
        site, _, number = raw.rpartition("=")
        try:
            value = float(number)
        except ValueError as e:
            raise AuditInputError(f"--budget must be [SITE=]EPSILON, got {raw!r}") from e
        if not value > 0:
            raise AuditInputError(f"--budget must be > 0, got {raw!r}")
        if site and site not in site_ids:
            raise AuditInputError(f"--budget names site {site!r}, which is not audited ({', '.join(site_ids)})")
        for s in [site] if site else site_ids:
            budgets[s] = value
    return budgets


def parse_heads(values: Sequence[str], site_ids: Sequence[str]) -> dict[str, Path]:
    heads: dict[str, Path] = {}
    for raw in values:
        site, sep, path = raw.partition("=")
        if not sep or not site or not path:
            raise AuditInputError(f"--ledger-head must be SITE=PATH, got {raw!r}")
        if site not in site_ids:
            raise AuditInputError(f"--ledger-head names site {site!r}, which is not audited ({', '.join(site_ids)})")
        heads[site] = Path(path)
    return heads


def _sites(args: argparse.Namespace) -> tuple[Roster, list[tuple[str, Path]]]:
    roster_path = args.roster or (args.sim_dir / ROSTER_FILE if args.sim_dir else None)
    if roster_path is None:
        raise AuditInputError("give --roster (or --sim-dir, whose roster.json is used)")
    try:
        roster = Roster.load(roster_path)
    except IdentityError as e:
        raise AuditInputError(str(e)) from e
    if len(args.ledger) != len(args.site_id):
        raise AuditInputError(f"give one --site-id per --ledger, got {len(args.ledger)} and {len(args.site_id)}")
    pairs = list(zip(args.site_id, args.ledger, strict=True))
    if args.sim_dir:
        pairs += [(s, args.sim_dir / "sites" / s / LEDGER_FILE) for s in sorted(roster.keys)]
    if not pairs:
        raise AuditInputError("nothing to audit: give --sim-dir or --ledger/--site-id pairs")
    return roster, pairs


def site_accounting_settings(
    args: argparse.Namespace, site_ids: Sequence[str]
) -> dict[str, tuple[float | None, str | None, str]]:
    """Each site's own ``(delta, accountant, where from)``: its node config (``--node-config``), or its
    site.toml under ``--sim-dir``; sites with neither are left out (the audit then uses the ledger's first entry).
    """
    import tomllib

    from shared.site import NODE_ACCOUNTANT, NODE_DELTA, NODE_SITE_ID, SiteConfigError, read_site_settings

    found: dict[str, tuple[float | None, str | None, str]] = {}
    if args.sim_dir:
        for site_id in site_ids:
            try:
                own = read_site_settings(args.sim_dir / "sites" / site_id)
            except SiteConfigError as e:
                raise AuditInputError(str(e)) from e
            if NODE_DELTA in own or NODE_ACCOUNTANT in own:
                where = str(args.sim_dir / "sites" / site_id / "site.toml")
                found[site_id] = (own.get(NODE_DELTA), own.get(NODE_ACCOUNTANT), where)
    for path in args.node_config:
        try:
            node = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise AuditInputError(f"--node-config {path}: {e}") from e
        node_site = node.get(NODE_SITE_ID)
        if node_site not in site_ids:
            raise AuditInputError(f"--node-config {path} is for site {node_site!r}, which is not audited")
        for key in (NODE_DELTA, NODE_ACCOUNTANT):
            if key not in node:
                raise AuditInputError(f"--node-config {path} does not set {key!r} (a deployed site must)")
        delta = node[NODE_DELTA]
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0.0 < delta < 1.0:
            raise AuditInputError(f"--node-config {path}: {NODE_DELTA!r} must be in (0, 1), got {delta!r}")
        found[str(node_site)] = (float(delta), str(node[NODE_ACCOUNTANT]), f"node config {path}")
    return found


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AuditInputError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise AuditInputError(f"{path} must hold a JSON object")
    return data


def _run_events(
    sites: Mapping[str, SiteAudit], canary_sites: Sequence[str], run_id: str, *, kind: str
) -> tuple[dict[str, list[DpEvent]], float] | str:
    """The DP events each canary site's ledger records for this run (gradient canaries live in its training
    steps; text canaries are rows, in every release) and the largest delta; or why there are none to test."""
    events: dict[str, list[DpEvent]] = {}
    deltas = []
    for s in canary_sites:
        audit = sites.get(s)
        if audit is None or not audit.exists:
            return f"no ledger of site {s} was audited"
        of_run = [c.entry for c in audit.checks if c.entry.run_id == run_id]
        deltas += [e.delta for e in of_run]
        events[s] = []
        for entry in of_run:
            if kind == "gradient" and entry.release != PURPOSE_TRAIN:
                continue  # the canaries are in the training steps only
            if not isinstance(entry.event, DpEvent):
                return f"site {s} recorded distributed-noise rounds, which the f-DP test does not take"
            if entry.event.steps > 0 and entry.event.noise_multiplier == 0.0:
                return f"site {s} recorded a round without noise (epsilon = inf: nothing to refute)"
            events[s].append(entry.event)
    if not deltas:
        return f"no site ledger records run {run_id}"
    return events, max(deltas)


def canary_section(
    scores_file: Mapping[str, Any],
    *,
    run_id: str,
    sites: Mapping[str, SiteAudit],
    confidence: float,
    where: Path,
) -> tuple[dict[str, Any], list[Finding]]:
    """The empirical audit of ``canary_scores.json``, against the DP events the canaries' sites recorded for the
    run (:mod:`shared.audit.fdp`); without those events, Steinke et al.'s (epsilon, delta) bound against the
    epsilon the sites' ledgers (or the file) claim (:mod:`shared.audit.canary`)."""
    rows = scores_file.get("canaries")
    if not isinstance(rows, list) or not rows:
        raise AuditInputError(f"{where}: 'canaries' must be a non-empty list")
    try:
        scores = [float(r["score"]) for r in rows]
        included = [bool(r["included"]) for r in rows]
        of_canary = [str(r["site"]) for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise AuditInputError(f"{where}: each canary needs 'score', 'included' and 'site': {e}") from e
    canary_sites = sorted(set(of_canary))
    kind = str(scores_file.get("kind", "text"))
    recorded = _run_events(sites, canary_sites, run_id, kind=kind)
    if isinstance(recorded, tuple):
        events, delta = recorded
        try:
            audit = audit_recorded_events(scores, included, of_canary, events, delta=delta, confidence=confidence)
        except CanaryError as e:
            raise AuditInputError(f"{where}: {e}") from e
        section = {
            **audit.to_dict(),
            "claimed_from": f"the DP events of run {run_id} in the site ledgers",
            "sites": canary_sites,
            "kind": kind,
        }
        findings = []
        if audit.refuted:
            findings.append(
                Finding(
                    f"run {run_id} canaries",
                    "canary",
                    f"empirical lower bound epsilon >= {audit.epsilon_lower:.3f} (confidence {confidence:.0%}) "
                    f"exceeds the claimed epsilon {audit.claimed_epsilon:.3f}: the training was less private than "
                    "the DP-SGD its ledgers record, so the DP guarantee does not hold as claimed",
                )
            )
        return section, findings
    return _steinke_section(scores_file, scores, included, canary_sites, run_id, sites, confidence, where, recorded)


def _steinke_section(
    scores_file: Mapping[str, Any],
    scores: list[float],
    included: list[bool],
    canary_sites: list[str],
    run_id: str,
    sites: Mapping[str, SiteAudit],
    confidence: float,
    where: Path,
    why: str,
) -> tuple[dict[str, Any], list[Finding]]:
    """Steinke et al.'s bound against one (epsilon, delta) claim: the f-DP test had no recorded events (``why``)."""
    claims: dict[str, tuple[float, float]] = {}  # site -> (epsilon, delta) at the end of this run
    for s in canary_sites:
        audit = sites.get(s)
        of_run = [c for c in audit.checks if c.entry.run_id == run_id] if audit else []
        if of_run:
            claims[s] = (of_run[-1].recomputed, of_run[-1].entry.delta)
    if claims:
        claimed = max(eps for eps, _ in claims.values())
        delta = max(d for _, d in claims.values())
        source = "site ledgers"
    else:
        claimed = float(scores_file.get("claimed_epsilon", math.nan))
        delta = float(scores_file.get("delta", math.nan))
        source = str(where)
    if not 0.0 < delta < 1.0:
        raise AuditInputError(f"{where}: no delta for the canary audit (no site ledger of run {run_id}, no 'delta')")
    try:
        result = one_run_audit(scores, included, delta=delta, confidence=confidence)
        detectable = epsilon_detectable(len(scores), delta=delta, confidence=confidence)
    except CanaryError as e:
        raise AuditInputError(f"{where}: {e}") from e
    section = {
        **result.to_dict(),
        "refuted": result.epsilon_lower > claimed,
        "claimed_epsilon": claimed,
        "claimed_from": source,
        "epsilon_detectable": detectable,
        "method": f"(epsilon, delta) one-run bound (Steinke, Nasr and Jagielski 2023): {why}",
        "sites": canary_sites,
        "kind": str(scores_file.get("kind", "text")),
    }
    findings = []
    if result.epsilon_lower > claimed:
        findings.append(
            Finding(
                f"run {run_id} canaries",
                "canary",
                f"empirical lower bound epsilon >= {result.epsilon_lower:.3f} (confidence {confidence:.0%}) "
                f"exceeds the claimed epsilon {claimed:.3f}: the DP guarantee does not hold as claimed",
            )
        )
    return section, findings


def run_audit(args: argparse.Namespace) -> tuple[dict[str, Any], list[Finding]]:
    roster, pairs = _sites(args)
    site_ids = [s for s, _ in pairs]
    budgets = parse_budgets(args.budget, site_ids)
    own = site_accounting_settings(args, site_ids)
    heads = parse_heads(args.ledger_head, site_ids)
    findings: list[Finding] = []
    sites: dict[str, SiteAudit] = {}
    for site_id, path in pairs:
        try:
            key = roster.public_key(site_id)
        except IdentityError as e:
            raise AuditInputError(str(e)) from e
        audit = audit_site_ledger(
            path,
            site_id=site_id,
            public_key=key,
            max_epsilon=budgets.get(site_id),
            cross_check=not args.no_cross_check,
            site_delta=own[site_id][0] if site_id in own else None,
            site_accountant=own[site_id][1] if site_id in own else None,
            settings_from=own[site_id][2] if site_id in own else "the site's configuration",
            head_path=heads.get(site_id),
        )
        sites[site_id] = audit
        findings.extend(audit.findings)

    run_dirs = list(args.run_dir)
    if not run_dirs and args.sim_dir and (args.sim_dir.parent / RUN_LEDGER_FILE).exists():
        run_dirs = [args.sim_dir.parent]  # the default simulation layout: <run dir>/federation
    runs = []
    for run_dir in run_dirs:
        metrics = _load_json(run_dir / METRICS_FILE)
        expected = str(metrics["run_id"]) if metrics and "run_id" in metrics else None
        run = audit_run_ledger(run_dir / RUN_LEDGER_FILE, roster=roster, run_id=expected)
        run_findings = list(run.findings)
        run_findings += cross_check_attestations(run, sites)
        run_findings += unattested_rounds(run, sites)
        run.findings = run_findings
        canary = None
        scores = _load_json(run_dir / CANARY_FILE)
        if scores is not None:
            canary, canary_findings = canary_section(
                scores,
                run_id=run.run_id,
                sites=sites,
                confidence=args.confidence,
                where=run_dir / CANARY_FILE,
            )
            run.findings += canary_findings
        findings.extend(run.findings)
        runs.append(run_section(run, metrics, run_dir, canary))
    report = build_report(sites=list(sites.values()), runs=runs, findings=findings)
    return report, findings


def _eps(value: Any) -> str:
    v = float(value) if value is not None else math.nan
    return "n/a" if math.isnan(v) else "inf" if math.isinf(v) else f"{v:.3f}"


def _budget(budget: Mapping[str, Any], epsilon: Any) -> str:
    if budget["status"] == "set":
        limit, spent = float(budget["max_epsilon"]), float(epsilon)
        used = f", {spent / limit:.0%} used" if math.isfinite(spent) else ""
        return f"max-epsilon {limit:g}{used}"
    return "none set" if budget["status"] == "none" else "not recorded"


def audit_main(argv: list[str] | None = None) -> int:
    """Entry point of ``privatune audit``; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(record=True) as caught:  # the accountants' warnings: to stderr, once each
        warnings.simplefilter("always")
        try:
            report, findings = run_audit(args)
        except AuditInputError as e:
            print(f"privatune audit: error: {e}", file=sys.stderr)
            return 2
    for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
        print(f"privatune audit: note from a library: {message}", file=sys.stderr)
    html_path, json_path = write_reports(report, args.out)
    for site in report["sites"]:
        for source, d in site["data_sources"].items():
            print(
                f"{site['site_id']}: {site['verified_entries']} entries verified | data source {source!r} "
                f"| epsilon {_eps(d['epsilon'])} at delta {d['delta']:g} ({d['accountant']}, from "
                f"{d['accounting_from']}) over {d['rounds']} release(s) in {len(d['runs'])} run(s) "
                f"| budget {_budget(site['budget'], d['epsilon'])}"
                + (
                    f" | {d['distributed_rounds']} distributed-noise round(s): aggregate epsilon "
                    f"{_eps(d['epsilon_aggregate'])}, fallback {_eps(d['epsilon_fallback'])} (rdp)"
                    if d.get("distributed_rounds")
                    else ""
                )
            )
    for run in report["runs"]:
        c = run.get("canary")
        if c:
            print(
                f"run {run['run_id']}: canary audit ({c.get('kind', 'text')} canaries, {c['canaries']}) | empirical "
                f"epsilon >= {_eps(c['epsilon_lower'])} against the claimed {_eps(c['claimed_epsilon'])} at delta "
                f"{c['delta']:g} ({c['confidence']:.0%}) | it can refute a claim of at most "
                f"{_eps(c.get('epsilon_detectable'))}"
            )
    for f in findings:
        print(str(f), file=sys.stderr)
    errors = sum(f.severity == "error" for f in findings)
    print(f"audit {'FAILED' if errors else 'verified'}: {errors} error(s); reports: {html_path} {json_path}")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(audit_main())
