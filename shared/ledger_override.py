"""An operator's override: go on from a site ledger that its head record or witness says has lost entries.

A site releases nothing while its ledger disagrees with its head record (:mod:`shared.ledger_head`) or its
witness (:mod:`shared.ledger_witness`): the ledger was cut back, deleted, or restored from an older copy, and
its budget would start from less than was spent. The remedy is to restore the latest ledger and head record.
When they are gone, the site's operator may go on from the ledger as it is, and that decision is itself a line
of the ledger (``privatune site accept-ledger``): a signed, chained :class:`shared.ledger.LedgerOverride` that
says what the ledger held, what its head record and witness said, why the site refused it, and the operator's
reason. The head record and the witness then name the ledger with that line. Nothing recorded is rewritten:
the chain is only extended, and a chain that does not verify itself (an edited, reordered or truncated line)
is never accepted. The audit reports every override as an error: the releases it lets go of are in no epsilon
of the ledger, and the server's run ledgers still hold their attestations.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.hashchain import ChainError, ChainWriter, read_chain
from shared.ledger import OVERRIDE_ACCEPT_LEDGER, SITE_LEDGER_KIND, LedgerError, LedgerOverride
from shared.ledger_head import HeadError, default_head_path, read_head, unanchored, write_head
from shared.ledger_witness import read_witness, witness_lag, write_witness


def ledger_problem(
    records: list[dict[str, Any]],
    *,
    ledger_path: Path,
    ledger_exists: bool,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    head_path: Path,
    witness_path: Path,
    proof_of_use: Path | None,
) -> str | None:
    """Why the site refuses the ledger whose verified records are ``records`` (None: it does not), as the site
    says it: the head record's check, then the witness's."""
    public_key = signing_key.public_key()
    try:
        head = read_head(head_path, site_id=site_id, public_key=public_key)
        unanchored(head, records, ledger_path=ledger_path, head_path=head_path, ledger_exists=ledger_exists)
        witness = read_witness(witness_path, site_id=site_id, public_key=public_key)
        witness_lag(
            witness,
            records,
            ledger_path=ledger_path,
            witness_path=witness_path,
            ledger_exists=ledger_exists,
            proof_of_use=proof_of_use,
        )
    except HeadError as e:
        return str(e)
    return None


def review_ledger(
    ledger_path: Path,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    witness_path: Path,
    head_path: Path | None = None,
    proof_of_use: Path | None = None,
) -> str | None:
    """:func:`ledger_problem` of the ledger on disk now, for the operator to read before deciding. A ledger whose
    chain itself does not verify is a :class:`LedgerError`: no override accepts it."""
    ledger_path = Path(ledger_path)
    read = read_chain(
        ledger_path, kind=SITE_LEDGER_KIND, owner=site_id, public_key=signing_key.public_key(), owner_field="site_id"
    )
    if read.issues:
        raise LedgerError(f"the ledger itself does not verify, and is never accepted as it is: {read.issues[0]}")
    return ledger_problem(
        read.records,
        ledger_path=ledger_path,
        ledger_exists=ledger_path.exists(),
        site_id=site_id,
        signing_key=signing_key,
        head_path=Path(head_path) if head_path is not None else default_head_path(ledger_path),
        witness_path=Path(witness_path),
        proof_of_use=proof_of_use,
    )


def _state(read: Any) -> dict[str, Any] | None:
    """A head record's or witness's count, hash and time, as the override records them (None: none readable)."""
    try:
        record = read()
    except HeadError:
        return None
    return None if record is None else {"count": record.count, "head_hash": record.head_hash, "time": record.time}


def accept_ledger(
    ledger_path: Path,
    *,
    site_id: str,
    signing_key: Ed25519PrivateKey,
    reason: str,
    witness_path: Path,
    head_path: Path | None = None,
    proof_of_use: Path | None = None,
) -> LedgerOverride:
    """Record the operator's decision to go on from the ledger at ``ledger_path`` as it is, with ``reason``, then
    write its head record and witness; returns the override line. Refused (:class:`LedgerError`) when the site
    does not refuse the ledger (nothing to accept), when ``reason`` is empty, and when the chain itself does
    not verify."""
    if not isinstance(reason, str) or not reason.strip():
        raise LedgerError(f"reason must say why the ledger is accepted as it is (it is recorded), got {reason!r}")
    ledger_path = Path(ledger_path)
    head_path = Path(head_path) if head_path is not None else default_head_path(ledger_path)
    witness_path = Path(witness_path)
    if not witness_path.parent.is_dir():  # checked before the override is written: it must be followed by a witness
        raise LedgerError(
            f"the directory of the ledger witness {witness_path} does not exist (is its storage mounted?)"
        )
    ledger_exists = ledger_path.exists()  # before the lock file creates it
    public_key = signing_key.public_key()
    try:
        chain = ChainWriter(
            ledger_path, kind=SITE_LEDGER_KIND, owner=site_id, owner_field="site_id", signing_key=signing_key
        )
    except ChainError as e:
        raise LedgerError(f"the ledger itself does not verify, and is never accepted as it is: {e}") from e

    def override(records: list[dict[str, Any]]) -> dict[str, Any]:
        problem = ledger_problem(
            records,
            ledger_path=ledger_path,
            ledger_exists=ledger_exists,
            site_id=site_id,
            signing_key=signing_key,
            head_path=head_path,
            witness_path=witness_path,
            proof_of_use=proof_of_use,
        )
        if problem is None:
            raise LedgerError(
                f"nothing to accept: the ledger {ledger_path} agrees with its head record {head_path} and its "
                f"witness {witness_path}"
            )
        return {
            "site_id": site_id,
            "time": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "override": OVERRIDE_ACCEPT_LEDGER,
            "reason": reason.strip(),
            "problem": problem,
            "entries_found": len(records),
            "head": _state(lambda: read_head(head_path, site_id=site_id, public_key=public_key)),
            "witness": _state(lambda: read_witness(witness_path, site_id=site_id, public_key=public_key)),
        }

    def anchor(records: list[dict[str, Any]]) -> None:
        try:  # entries adopted before head records existed stay marked so (shared.ledger_head.adopt_head)
            old = read_head(head_path, site_id=site_id, public_key=public_key)
        except HeadError:
            old = None
        adopted = old.adopted_count if old is not None and (old.adopted_count or 0) < len(records) else None
        write_head(head_path, site_id=site_id, records=records, adopted_count=adopted, signing_key=signing_key)
        write_witness(witness_path, site_id=site_id, records=records, kind=SITE_LEDGER_KIND, signing_key=signing_key)

    try:
        record = chain.append(override, after=anchor)
    except ChainError as e:
        raise LedgerError(f"cannot record the override in {ledger_path}: {e}") from e
    return LedgerOverride.from_record(record)
