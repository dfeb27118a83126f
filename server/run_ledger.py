"""The server's ledger of one run: per round, who trained, who declined, what was aggregated, and each site's
signed epsilon attestation.

Same storage as the sites' ledgers (:mod:`shared.hashchain`): append-only, hash-chained JSON lines, bound
to the run id. The server has no identity key of its own here, so the chain is unsigned unless a key is
given; what makes it worth auditing is that every attestation in it is signed by its site and can be
checked against the site's own ledger.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.hashchain import ChainError, ChainWriter
from shared.identity import IdentityError, Roster
from shared.ledger import RUN_LEDGER_FILE, RUN_LEDGER_KIND, LedgerEntry, LedgerError

__all__ = ["RUN_LEDGER_FILE", "RunLedger"]
from shared.ledger import verify_attestation as verify_site_attestation


def _ids(name: str, values: Sequence[str | int]) -> list[str]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise LedgerError(f"{name} must be a list of site ids, got {values!r}")
    out = [str(v) for v in values]
    if len(set(out)) != len(out):
        raise LedgerError(f"{name} lists a site twice: {out}")
    return out


def _metric_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out[str(k)] = _metric_values(v)
        elif isinstance(v, (bool, int, str)) or v is None:
            out[str(k)] = v
        elif isinstance(v, float) or hasattr(v, "__float__"):
            out[str(k)] = float(v)
        else:
            raise LedgerError(f"metric {k!r} must be a number, string or mapping, got {type(v).__name__}")
    return out


class RunLedger:
    """Append-only ledger of one run, in the run's output directory (``run_ledger.jsonl``)."""

    def __init__(
        self,
        path: Path,
        run_id: str,
        *,
        roster: Roster | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        public_key: Ed25519PublicKey | None = None,
    ) -> None:
        if not run_id:
            raise LedgerError("run_id must be a non-empty string")
        self.path = Path(path)
        self.run_id = run_id
        self.roster = roster
        try:
            self._chain = ChainWriter(
                self.path,
                kind=RUN_LEDGER_KIND,
                owner=run_id,
                owner_field="run_id",
                signing_key=signing_key,
                public_key=public_key,
            )
        except ChainError as e:
            raise LedgerError(f"run ledger of {run_id!r} is invalid: {e}") from e

    def records(self) -> list[dict[str, Any]]:
        return self._chain.records

    def rounds(self) -> list[int]:
        return [int(r["round"]) for r in self._chain.records]

    def verify_attestation(self, attestation: Mapping[str, Any], roster: Roster | None = None) -> LedgerEntry:
        """Check one site's attestation against the roster and this run: returns the attested ledger entry."""
        roster = roster or self.roster
        if roster is None:
            raise LedgerError("a roster is needed to verify attestations")
        site_id = str(attestation.get("site_id"))
        try:
            key = roster.public_key(site_id)
        except IdentityError as e:
            raise LedgerError(f"attestation from {site_id!r}: {e}") from e
        entry = verify_site_attestation(attestation, key)
        if entry.run_id != self.run_id:
            raise LedgerError(f"attestation from {site_id!r} is for run {entry.run_id!r}, not {self.run_id!r}")
        return entry

    def record_round(
        self,
        server_round: int,
        *,
        participants: Sequence[str | int],
        declined: Sequence[str | int] | Mapping[str, str],
        survivors: Sequence[str | int],
        dropped: Sequence[str | int],
        aborted: bool,
        aggregate_hash: str | None,
        attestations: Mapping[str, Mapping[str, Any]],
        metrics: Mapping[str, Any],
        secure_aggregation: bool = False,
        dp_noise: str | None = None,
    ) -> dict[str, Any]:
        """Append the record of one round. Everything is checked first; a bad attestation writes nothing.

        ``participants``: the sites asked to train; ``declined``: those that declined (a list, or
        site -> reason); ``survivors``/``dropped``: the sites whose update was / was not in the aggregate;
        ``aggregate_hash``: the digest of the aggregate (None when the round was aborted); ``dp_noise``: where
        the DP noise was added, ``"local"`` or ``"distributed"`` (recorded when given).
        """
        if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 0:
            raise LedgerError(f"server_round must be a non-negative integer, got {server_round!r}")
        declined_map = (
            {str(k): str(v) for k, v in declined.items()}
            if isinstance(declined, Mapping)
            else dict.fromkeys(_ids("declined", declined), "")
        )
        body_ids = {
            "participants": _ids("participants", participants),
            "survivors": _ids("survivors", survivors),
            "dropped": _ids("dropped", dropped),
        }
        for name in ("survivors", "dropped"):
            stray = set(body_ids[name]) - set(body_ids["participants"])
            if stray:
                raise LedgerError(f"round {server_round}: {name} {sorted(stray)} are not participants")
        if not aborted and aggregate_hash is None:
            raise LedgerError(f"round {server_round}: aggregate_hash is required unless the round was aborted")
        checked: dict[str, dict[str, Any]] = {}
        for site_id, att in attestations.items():
            if str(att.get("site_id")) != str(site_id):
                raise LedgerError(
                    f"round {server_round}: attestation filed under {site_id!r} is from {att.get('site_id')!r}"
                )
            if site_id not in body_ids["participants"]:
                raise LedgerError(f"round {server_round}: attestation from {site_id!r}, which did not participate")
            if self.roster is not None:
                entry = self.verify_attestation(att)
                if entry.round != server_round:
                    raise LedgerError(f"round {server_round}: attestation from {site_id!r} is for round {entry.round}")
            checked[str(site_id)] = dict(att)

        def make_body(records: list[dict[str, Any]]) -> dict[str, Any]:
            if any(r["round"] == server_round for r in records):
                raise LedgerError(f"round {server_round} of run {self.run_id!r} is already recorded in {self.path}")
            return {
                "run_id": self.run_id,
                "round": server_round,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                **body_ids,
                "declined": declined_map,
                "aborted": bool(aborted),
                "secure_aggregation": bool(secure_aggregation),
                **({} if dp_noise is None else {"dp_noise": str(dp_noise)}),
                "aggregate_hash": aggregate_hash,
                "attestations": checked,
                "metrics": _metric_values(metrics),
            }

        try:
            return self._chain.append(make_body)
        except ChainError as e:
            raise LedgerError(f"cannot append to the run ledger of {self.run_id!r}: {e}") from e
