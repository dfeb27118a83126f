"""Re-verify the privacy ledgers, independently of what they claim.

For a site ledger: every line complete and valid, the hash chain unbroken (no gap, reordering, fork or
edit), every signature valid under the site's roster key, the ledger as long as its signed head record says
and ending in the entry it anchors (nothing cut off, the file not deleted: :mod:`shared.ledger_head`), and every
recorded epsilon equal to the one recomputed from the recorded DP events (never read from the recorded
values). Then the site's own numbers: every entry must be accounted at the site's delta and accountant (from
its node config or site.toml when the audit is given them, else from the ledger's first entry); an entry at
another delta is an error, since its epsilon is not the site's. The epsilon spent is recomputed per data
source (every entry of the source, and every legacy entry, whatever its fingerprint) at the site's delta, and
checked against the budget; a source whose entries hold several fingerprints is a warning (the data changed
under one budget). For the server's run ledger: its chain, and every site attestation in it signed by that site
and present, identically, in the site's own ledger: an attestation the site's ledger does not hold at that
position is a fork or a rollback, and a site ledger that is missing while a run ledger attests entries of it
was deleted. An operator's override (``privatune site accept-ledger``: the site went on from a ledger its head
record or witness said had lost entries) is an error of every audit of that ledger, naming what was lost and
the operator's reason.

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

from shared.distributed_dp import GUARANTEE_AGGREGATE, GUARANTEE_FALLBACK, GUARANTEES, AnyDpEvent
from shared.hashchain import read_chain
from shared.identity import IdentityError, Roster
from shared.ledger import (
    KEYED_FINGERPRINT_PREFIX,
    RUN_LEDGER_KIND,
    SITE_LEDGER_KIND,
    LedgerEntry,
    LedgerError,
    LedgerOverride,
    cumulative_epsilon,
    is_override,
    verify_attestation,
)
from shared.ledger_head import HeadError, HeadRecord, default_head_path, read_head, unanchored
from shared.privacy import DpEvent, PrivacyError

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
    recomputed: float  # by the rule the entry was written under, at its own delta: checks the recorded value
    cross_check: float | None  # dp-accounting PLD epsilon, when asked for
    site_epsilon: float | None = None  # its data source's epsilon so far at the site's delta and accountant

    @property
    def matches(self) -> bool:
        return epsilons_agree(self.entry.epsilon, self.recomputed)


@dataclass(frozen=True)
class SiteAccounting:
    """The delta and accountant a site's epsilon is composed at, and where the audit took them from."""

    delta: float
    accountant: str
    source: str  # "node config <path>", "<path> (site.toml)", "the ledger's first entry"


@dataclass
class SourceSpent:
    """One data source of a site: its epsilon at the site's delta over every entry that counts toward it."""

    data_source: str
    epsilon: float
    epsilon_pld: float | None
    rounds: int
    runs: list[str]
    seeded_noise_rounds: int
    fingerprints: dict[str, list[int]]  # fingerprint -> seqs of the entries recorded with it
    # with distributed-noise rounds (docs/distributed-dp.md): the epsilon with every such round taken under
    # each of its two guarantees (None: no such round)
    distributed_rounds: int = 0
    epsilon_aggregate: float | None = None
    epsilon_fallback: float | None = None


@dataclass
class SiteAudit:
    site_id: str
    path: Path
    checks: list[EntryCheck] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    max_epsilon: float | None = None  # the budget the report draws: given, or the latest recorded
    accounting: SiteAccounting | None = None  # None: no entry verified and none given
    sources: dict[str, SourceSpent] = field(default_factory=dict)
    exists: bool = True  # False: no ledger file at path
    head: HeadRecord | None = None  # the verified head record, when there is one
    overrides: list[LedgerOverride] = field(default_factory=list)  # the operator's accept-ledger lines

    def override_at(self, seq: int) -> LedgerOverride | None:
        return next((o for o in self.overrides if o.seq == seq), None)

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


def _seqs(seqs: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    parts, start = [], None
    for k, seq in enumerate(seqs):
        if start is None:
            start = seq
        if k + 1 == len(seqs) or seqs[k + 1] != seq + 1:
            parts.append(str(start) if start == seq else f"{start}-{seq}")
            start = None
    return ", ".join(parts)


def _short(fingerprint: str) -> str:
    kind, _, rest = fingerprint.partition(":")
    return f"{kind}:{rest[:12]}"


def audit_site_ledger(
    path: Path,
    *,
    site_id: str,
    public_key: Ed25519PublicKey,
    max_epsilon: float | None = None,
    cross_check: bool = False,
    site_delta: float | None = None,
    site_accountant: str | None = None,
    settings_from: str = "the site's configuration",
    head_path: Path | None = None,
) -> SiteAudit:
    """Verify one site's ledger file end to end; see the module docstring.

    ``site_delta`` and ``site_accountant`` are the site's own (``settings_from`` says where they were read);
    when not given, those of the ledger's first entry are used, and the report says so. ``head_path``: its
    head record (default: beside the ledger, ``<ledger>.head.json``).
    """
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

    entries: list[tuple[int, LedgerEntry]] = []  # (line, release)
    for line, record in enumerate(read.records, start=1):
        try:
            if is_override(record):
                override = LedgerOverride.from_record(record)
                audit.overrides.append(override)
                audit.findings.append(_override_finding(subject, override, line))
            else:
                entries.append((line, LedgerEntry.from_record(record)))
        except LedgerError as e:
            audit.findings.append(Finding(subject, "corrupt", str(e), line=line))
            break
    if site_delta is not None and site_accountant is not None:
        audit.accounting = SiteAccounting(site_delta, site_accountant, settings_from)
    elif entries:
        audit.accounting = SiteAccounting(
            site_delta if site_delta is not None else entries[0][1].delta,
            site_accountant or entries[0][1].accountant,
            "the ledger's first entry" if site_delta is None and site_accountant is None else settings_from,
        )
    accounting = audit.accounting

    seen: set[tuple[str, int, str]] = set()
    legacy_by_fingerprint: dict[str, list[AnyDpEvent]] = {}  # entries written before data sources: their rule
    legacy: list[AnyDpEvent] = []  # ... and they count toward every source
    named: dict[str, list[AnyDpEvent]] = {}
    for line, entry in entries:
        name = f"entry {entry.seq} (run {entry.run_id}, round {entry.round}, {entry.release})"
        key = (entry.run_id, entry.round, entry.release)
        if key in seen:
            audit.findings.append(
                Finding(subject, "duplicate", f"{name} is recorded twice (one release counted twice)", line=line)
            )
        seen.add(key)
        if entry.data_source is None:
            legacy.append(entry.event)
            events = legacy_by_fingerprint.setdefault(entry.dataset_fingerprint, [])
            events.append(entry.event)
            site_events = [*legacy, *(e for evs in named.values() for e in evs)]
        else:
            named.setdefault(entry.data_source, []).append(entry.event)
            events = site_events = [*legacy, *named[entry.data_source]]
        try:
            recomputed = cumulative_epsilon(events, delta=entry.delta, accountant=entry.accountant)
            site_epsilon = (
                cumulative_epsilon(site_events, delta=accounting.delta, accountant=accounting.accountant)
                if accounting is not None
                else recomputed
            )
        except PrivacyError as e:
            audit.findings.append(Finding(subject, "corrupt", f"{name}: {e}", line=line))
            break
        pld = _pld(events, delta=entry.delta) if cross_check else None
        check = EntryCheck(line=line, entry=entry, recomputed=recomputed, cross_check=pld, site_epsilon=site_epsilon)
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
        if accounting is not None and (entry.delta, entry.accountant) != (accounting.delta, accounting.accountant):
            audit.findings.append(
                Finding(
                    subject,
                    "repriced",
                    f"{name} is accounted at delta={entry.delta:g} ({entry.accountant}), but the site's is "
                    f"delta={accounting.delta:g} ({accounting.accountant}, from {accounting.source}): its "
                    f"recorded epsilon {_eps(entry.epsilon)} is not the site's; at the site's delta its data "
                    f"source has spent {_eps(site_epsilon)}",
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
        if budget is not None and site_epsilon > budget:
            audit.findings.append(
                Finding(
                    subject,
                    "budget",
                    f"{name}: epsilon {_eps(site_epsilon)} (its data source, at the site's delta) is over the "
                    f"site's budget max_epsilon={budget:g}",
                    line=line,
                )
            )
    if accounting is not None:
        audit.sources = _sources(audit.checks, accounting, cross_check=cross_check)
        audit.findings.extend(_fingerprint_findings(subject, audit.sources))
    if audit.max_epsilon is None:
        recorded = [c.entry.max_epsilon for c in audit.checks if c.entry.max_epsilon is not None]
        audit.max_epsilon = recorded[-1] if recorded else None
    return audit


def _override_finding(subject: str, override: LedgerOverride, line: int) -> Finding:
    """An operator's override is an error of every audit: the releases it let go of are in no epsilon here."""
    said = [
        f"its {name} said {record['count']} ({record.get('time', '?')})"
        for name, record in (("head record", override.head), ("witness", override.witness))
        if record is not None
    ]
    return Finding(
        subject,
        "override",
        f"entry {override.seq}: the site's operator went on from this ledger as it was, with "
        f"{override.entries_found} entries where {' and '.join(said) or 'nothing readable said otherwise'}: at least "
        f"{override.lost} release(s) of this site's data are in no epsilon of this ledger (the server's run "
        f"ledgers hold their attestations). Accepted {override.time}, reason: {override.reason!r}. The site had "
        f"refused the ledger: {override.problem}",
        line=line,
    )


def _pld(events: Sequence[AnyDpEvent], *, delta: float) -> float | None:
    """The independent PLD epsilon of local DP-SGD events; None with a distributed-noise round (no PLD
    analysis of the distributed discrete Gaussian here: it is accounted in RDP, shared/distributed_dp.py)."""
    from shared.audit.accounting import pld_epsilon

    local = [e for e in events if isinstance(e, DpEvent)]
    return pld_epsilon(local, delta=delta) if len(local) == len(events) else None


def _sources(checks: Sequence[EntryCheck], accounting: SiteAccounting, *, cross_check: bool) -> dict[str, SourceSpent]:
    """Each data source's epsilon at the site's delta over every entry that counts toward it (a ledger of
    legacy entries only has one source, ``default``)."""
    from shared.ledger import DEFAULT_DATA_SOURCE

    names = sorted({c.entry.data_source for c in checks if c.entry.data_source is not None})
    out = {}
    for source in names or ([DEFAULT_DATA_SOURCE] if checks else []):
        mine = [c.entry for c in checks if c.entry.composes_with(source)]
        events = [e.event for e in mine]
        fingerprints: dict[str, list[int]] = {}
        for e in mine:
            fingerprints.setdefault(e.dataset_fingerprint, []).append(e.seq)
        pld = _pld(events, delta=accounting.delta) if cross_check else None
        distributed = sum(e.guarantees is not None for e in mine)
        under = {
            g: cumulative_epsilon(
                [e.event_for(g) for e in mine], delta=accounting.delta, accountant=accounting.accountant
            )
            for g in GUARANTEES
            if distributed
        }
        out[source] = SourceSpent(
            data_source=source,
            epsilon=cumulative_epsilon(events, delta=accounting.delta, accountant=accounting.accountant),
            epsilon_pld=pld,
            rounds=len(mine),
            runs=list(dict.fromkeys(e.run_id for e in mine)),
            seeded_noise_rounds=sum(e.seeded_noise for e in mine),
            fingerprints=fingerprints,
            distributed_rounds=distributed,
            epsilon_aggregate=under.get(GUARANTEE_AGGREGATE),
            epsilon_fallback=under.get(GUARANTEE_FALLBACK),
        )
    return out


def _fingerprint_findings(subject: str, sources: Mapping[str, SourceSpent]) -> list[Finding]:
    """A warning per data source whose entries were recorded with several fingerprints."""
    found = []
    for source in sources.values():
        if len(source.fingerprints) < 2:
            continue
        listed = "; ".join(f"entries {_seqs(seqs)}: {_short(fp)}" for fp, seqs in source.fingerprints.items())
        legacy = any(not fp.startswith(KEYED_FINGERPRINT_PREFIX) for fp in source.fingerprints)
        found.append(
            Finding(
                subject,
                "fingerprints",
                f"data source {source.data_source!r} holds {len(source.fingerprints)} fingerprints ({listed}): the "
                "data changed under one budget; its epsilon composes over all of them"
                + (" (sha256: fingerprints predate keyed ones: the change may be the format only)" if legacy else ""),
                severity="warning",
            )
        )
    return found


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
        override = site.override_at(attested.seq)
        if override is not None:
            findings.append(
                Finding(
                    subject,
                    "rollback",
                    f"the server holds {site_id}'s signed entry {attested.seq} (run {run.run_id}, round "
                    f"{server_round}, epsilon {_eps(attested.epsilon)}), but line {attested.seq + 1} of its ledger "
                    "is its operator's override: the entry was lost before the operator went on without it",
                    line=attested.seq + 1,
                )
            )
        elif own is None:
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
