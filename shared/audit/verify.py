"""Re-verify the privacy ledgers, independently of what they claim.

For a site ledger: every line complete and valid, the hash chain unbroken (no gap, reordering, fork or
edit), every signature valid under the site's roster key, the ledger as long as its signed head record says
and ending in the entry it anchors (nothing cut off, the file not deleted: :mod:`shared.ledger_head`), and every
recorded epsilon equal to the one recomputed from the recorded DP events (never read from the recorded
values). For the server's run ledger: its chain, and every site attestation in it signed by that site and
present, identically, in the site's own ledger: an attestation the site's ledger does not hold at that
position is a fork or a rollback, and a site ledger that is missing while a run ledger attests entries of it
was deleted.

Nothing here raises on bad content: each problem is a :class:`Finding` naming the file, line and entry, so
that the audit can list them all and exit non-zero.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared.hashchain import read_chain
from shared.identity import IdentityError, Roster
from shared.ledger import (
    RUN_LEDGER_KIND,
    SITE_LEDGER_KIND,
    LedgerEntry,
    LedgerError,
    cumulative_epsilon,
    verify_attestation,
)
from shared.ledger_head import HeadError, HeadRecord, default_head_path, read_head, unanchored
from shared.privacy import PrivacyError

EPSILON_RTOL = 1e-4  # recomputed vs recorded epsilon (same accountant, same events: equal up to float noise)

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One verification result worth reading: an error fails the audit, a warning does not."""

    subject: str  # "site-0 ledger", "run 42 ledger"
    kind: str  # truncated, corrupt, gap, reordered, fork, tampered, signature, foreign, epsilon, budget, ...
    message: str
    line: int | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f" line {self.line}" if self.line is not None else ""
        return f"{self.severity.upper()} {self.subject}{where} [{self.kind}]: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "kind": self.kind,
            "line": self.line,
            "severity": self.severity,
            "message": self.message,
        }


@dataclass(frozen=True)
class EntryCheck:
    """One verified site-ledger entry with its independently recomputed epsilon."""

    line: int
    entry: LedgerEntry
    recomputed: float
    cross_check: float | None  # dp-accounting PLD epsilon, when asked for

    @property
    def matches(self) -> bool:
        return epsilons_agree(self.entry.epsilon, self.recomputed)


@dataclass
class SiteAudit:
    site_id: str
    path: Path
    checks: list[EntryCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    max_epsilon: float | None = None  # the budget the report draws: given, or the latest recorded
    exists: bool = True  # False: no ledger file at path
    head: HeadRecord | None = None  # the verified head record, when there is one

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def entry_at(self, seq: int) -> LedgerEntry | None:
        return next((c.entry for c in self.checks if c.entry.seq == seq), None)


@dataclass
class RunAudit:
    run_id: str
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    attested: dict[tuple[str, int], LedgerEntry] = field(default_factory=dict)  # (site, round) -> entry
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)


def epsilons_agree(recorded: float, recomputed: float, *, rtol: float = EPSILON_RTOL) -> bool:
    if math.isinf(recorded) or math.isinf(recomputed):
        return recorded == recomputed
    return math.isclose(recorded, recomputed, rel_tol=rtol, abs_tol=1e-9)


def _eps(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4f}"


def audit_site_ledger(
    path: Path,
    *,
    site_id: str,
    public_key: Ed25519PublicKey,
    max_epsilon: float | None = None,
    cross_check: bool = False,
    head_path: Path | None = None,
) -> SiteAudit:
    """Verify one site's ledger file end to end; see the module docstring. ``head_path``: its head record
    (default: beside the ledger, ``<ledger>.head.json``)."""
    subject = f"{site_id} ledger"
    path = Path(path)
    head_path = Path(head_path) if head_path is not None else default_head_path(path)
    audit = SiteAudit(site_id=site_id, path=path, max_epsilon=max_epsilon)
    head_ok = True
    try:  # the head first, then the ledger: a site appending meanwhile makes the ledger longer, not shorter
        audit.head = read_head(head_path, site_id=site_id, public_key=public_key)
    except HeadError as e:
        audit.findings.append(Finding(subject, e.kind, str(e)))
        head_ok = False
    if not path.exists():
        audit.exists = False
        if audit.head is not None:
            audit.findings.extend(_head_findings(subject, audit.head, [], path, head_path, exists=False))
        elif head_ok:  # a site that never trained has no ledger and no head; one that did is caught by the
            # cross-check of the server's attestations
            audit.findings.append(Finding(subject, "missing", f"no ledger at {path}", severity="warning"))
        return audit
    read = read_chain(path, kind=SITE_LEDGER_KIND, owner=site_id, public_key=public_key, owner_field="site_id")
    audit.findings.extend(Finding(subject, i.kind, i.detail, line=i.line) for i in read.issues)
    if head_ok and all(i.kind == "truncated" for i in read.issues):  # mid-file problems are reported above
        audit.findings.extend(_head_findings(subject, audit.head, read.records, path, head_path, exists=True))
    if read.issues:
        audit.findings.append(
            Finding(
                subject,
                "chain",
                f"only the first {len(read.records)} entries verified; nothing after line "
                f"{len(read.records)} is trusted or re-accounted",
                severity="warning",
            )
        )

    seen: set[tuple[str, str, int]] = set()
    history: dict[str, list[Any]] = {}
    for line, record in enumerate(read.records, start=1):
        try:
            entry = LedgerEntry.from_record(record)
        except LedgerError as e:
            audit.findings.append(Finding(subject, "corrupt", str(e), line=line))
            break
        name = f"entry {entry.seq} (run {entry.run_id}, round {entry.round})"
        key = (entry.dataset_fingerprint, entry.run_id, entry.round)
        if key in seen:
            audit.findings.append(
                Finding(subject, "duplicate", f"{name} is recorded twice for the same data set", line=line)
            )
        seen.add(key)
        events = history.setdefault(entry.dataset_fingerprint, [])
        events.append(entry.event)
        try:
            recomputed = cumulative_epsilon(events, delta=entry.delta, accountant=entry.accountant)
        except PrivacyError as e:
            audit.findings.append(Finding(subject, "corrupt", f"{name}: {e}", line=line))
            break
        pld = None
        if cross_check:
            from shared.audit.accounting import pld_epsilon

            pld = pld_epsilon(events, delta=entry.delta)
        check = EntryCheck(line=line, entry=entry, recomputed=recomputed, cross_check=pld)
        audit.checks.append(check)
        if not check.matches:
            audit.findings.append(
                Finding(
                    subject,
                    "epsilon",
                    f"{name}: recorded epsilon {_eps(entry.epsilon)} but its {len(events)} events give "
                    f"{_eps(recomputed)} ({entry.accountant}, delta={entry.delta:g})",
                    line=line,
                )
            )
        if entry.seeded_noise:
            audit.findings.append(
                Finding(
                    subject,
                    "seeded-noise",
                    f"{name}: DP noise and sampling were seeded from the run's seed (reproducible-noise): its "
                    "epsilon does not hold against anyone who knows that seed, the server included",
                    line=line,
                    severity="warning",
                )
            )
        budget = entry.max_epsilon if entry.max_epsilon is not None else max_epsilon
        if budget is not None and recomputed > budget:
            audit.findings.append(
                Finding(
                    subject,
                    "budget",
                    f"{name}: epsilon {_eps(recomputed)} is over the site's budget max_epsilon={budget:g}",
                    line=line,
                )
            )
    if audit.max_epsilon is None:
        recorded = [c.entry.max_epsilon for c in audit.checks if c.entry.max_epsilon is not None]
        audit.max_epsilon = recorded[-1] if recorded else None
    return audit


def _head_findings(
    subject: str,
    head: HeadRecord | None,
    records: list[dict[str, Any]],
    path: Path,
    head_path: Path,
    *,
    exists: bool,
) -> list[Finding]:
    """The ledger against its head record: it exists, and every entry the head anchors is there, unchanged."""
    try:
        lag = unanchored(head, records, ledger_path=path, head_path=head_path, ledger_exists=exists)
    except HeadError as e:
        return [Finding(subject, e.kind, str(e))]
    findings = []
    if lag:
        findings.append(
            Finding(
                subject,
                "head-lag",
                f"entry {len(records) - 1} verifies but its head record was not written yet (a crash between "
                "the append and the head write, or the site is appending now); the site anchors it when it "
                "next opens the ledger",
                line=len(records),
                severity="warning",
            )
        )
    if head is not None and head.adopted_count is not None:
        findings.append(
            Finding(
                subject,
                "adopted",
                f"the first {head.adopted_count} entries were written before head records existed and were "
                "adopted as they were found: entries removed before that cannot be detected from the head "
                "record, only from the server's attestations (give the audit the run ledgers)",
                severity="warning",
            )
        )
    return findings


def audit_run_ledger(path: Path, *, roster: Roster, run_id: str | None = None) -> RunAudit:
    """Verify the server's ledger of one run and every attestation in it against the roster."""
    path = Path(path)
    if run_id is None:  # take the owner from the file; a mismatch with metrics.json is checked by the caller
        run_id = _first_run_id(path)
    subject = f"run {run_id} ledger"
    audit = RunAudit(run_id=str(run_id), path=path)
    if not path.exists():
        audit.findings.append(Finding(subject, "missing", f"no run ledger at {path}"))
        return audit
    read = read_chain(path, kind=RUN_LEDGER_KIND, owner=str(run_id), public_key=None, owner_field="run_id")
    audit.findings.extend(Finding(subject, i.kind, i.detail, line=i.line) for i in read.issues)
    audit.records = read.records
    last_round = -1
    for line, record in enumerate(read.records, start=1):
        server_round = record.get("round")
        if not isinstance(server_round, int) or server_round <= last_round:
            audit.findings.append(
                Finding(
                    subject,
                    "reordered",
                    f"round {server_round!r} does not follow round {last_round}",
                    line=line,
                )
            )
        last_round = server_round if isinstance(server_round, int) else last_round
        participants = set(record.get("participants", []))
        declined = set(record.get("declined", {}))
        for site_id, att in dict(record.get("attestations", {})).items():
            where = f"round {server_round}: attestation of {site_id}"
            try:
                entry = verify_attestation(att, roster.public_key(site_id))
            except (LedgerError, IdentityError) as e:
                audit.findings.append(Finding(subject, "attestation", f"{where}: {e}", line=line))
                continue
            if entry.site_id != site_id or entry.run_id != str(run_id) or entry.round != server_round:
                audit.findings.append(
                    Finding(
                        subject,
                        "attestation",
                        f"{where} is for {entry.site_id} run {entry.run_id} round {entry.round}",
                        line=line,
                    )
                )
                continue
            if site_id not in participants or site_id in declined:
                audit.findings.append(
                    Finding(subject, "attestation", f"{where}: the site did not train in this round", line=line)
                )
            audit.attested[(site_id, server_round)] = entry
    return audit


def cross_check_attestations(run: RunAudit, sites: Mapping[str, SiteAudit]) -> list[Finding]:
    """Each attestation the server holds must be, hash for hash, the entry at its seq in the site's ledger."""
    findings: list[Finding] = []
    deleted: dict[str, list[int]] = {}  # site whose ledger file is missing -> attested seqs
    for (site_id, server_round), attested in sorted(run.attested.items()):
        site = sites.get(site_id)
        subject = f"{site_id} ledger"
        if site is not None and not site.exists:
            deleted.setdefault(site_id, []).append(attested.seq)
            continue
        if site is None:
            findings.append(
                Finding(
                    f"run {run.run_id} ledger",
                    "unaudited",
                    f"round {server_round}: {site_id} attested epsilon {_eps(attested.epsilon)} "
                    "but its ledger was not given to the audit",
                    severity="warning",
                )
            )
            continue
        own = site.entry_at(attested.seq)
        if own is None:
            verified = len(site.checks)
            findings.append(
                Finding(
                    subject,
                    "rollback",
                    f"the server holds {site_id}'s signed entry {attested.seq} (run {run.run_id}, round "
                    f"{server_round}), but only {verified} entries of its ledger verify: "
                    "entries were removed or the ledger was truncated",
                )
            )
        elif own.entry_hash != attested.entry_hash:
            findings.append(
                Finding(
                    subject,
                    "fork",
                    f"entry {attested.seq} differs from the signed entry {attested.seq} the server holds "
                    f"(run {run.run_id}, round {server_round}; ledger {own.entry_hash[:12]}, server "
                    f"{attested.entry_hash[:12]}): the site signed two different histories",
                    line=attested.seq + 1,
                )
            )
    for site_id, seqs in sorted(deleted.items()):
        findings.append(
            Finding(
                f"{site_id} ledger",
                "missing",
                f"the ledger {sites[site_id].path} is missing, but run {run.run_id} holds {len(seqs)} signed "
                f"entries of it (entries {', '.join(map(str, sorted(seqs)))}): the ledger was deleted",
            )
        )
    return findings


def site_entries_of_run(site: SiteAudit, run_id: str) -> list[LedgerEntry]:
    return [c.entry for c in site.checks if c.entry.run_id == run_id]


def unattested_rounds(run: RunAudit, sites: Mapping[str, SiteAudit]) -> list[Finding]:
    """Rounds a site recorded for this run without the server holding its attestation (e.g. a dropout):
    not an error (the site spent the budget all the same, and its own ledger counts it), but worth reading."""
    findings = []
    for site_id, site in sorted(sites.items()):
        for entry in site_entries_of_run(site, run.run_id):
            if (site_id, entry.round) not in run.attested:
                findings.append(
                    Finding(
                        f"{site_id} ledger",
                        "unattested",
                        f"entry {entry.seq}: {site_id} trained round {entry.round} of run {run.run_id} "
                        f"(epsilon {_eps(entry.epsilon)}), but the run ledger holds no attestation of it "
                        "(dropped after training); the site's own ledger counts it",
                        line=entry.seq + 1,
                        severity="warning",
                    )
                )
    return findings


def _first_run_id(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            first = f.readline()
        return str(json.loads(first).get("run_id", "?"))
    except (OSError, ValueError, AttributeError):
        return "?"


def all_findings(*groups: Sequence[Finding]) -> list[Finding]:
    return [f for g in groups for f in g]
