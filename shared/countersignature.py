"""Sites countersign the roster they approved, so that a site can tell that its partners approved the same one.

When a site's operator approves a roster (``privatune site approve-roster``), the site signs, with its identity
key, the roster's fingerprint, its own site id and the sites its operator confirmed at the roll call (those
whose operators read out the same roster code, :meth:`shared.identity.Roster.code`), and writes the result to
``roster-countersignature.json`` for the coordinator. The coordinator collects every site's countersignature
(``privatune provision --countersignature``) and hands them all back in each bundle
(``roster-countersignatures.json``); a site installs them when it approves that bundle again. The coordinator
cannot forge one: a countersignature counts only if it verifies under the key the checking site's own approved
roster holds for its signer. A site uses its roster only once every other site in it countersigned that very
roster (:func:`shared.identity.load_site_roster`), so a roster shown to one site only (a site added, a key
changed) is refused by that site until each of its partners approved the same one.

This module knows only keys and fingerprints (no roster), so that ``shared.identity`` can use it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

COUNTERSIGNATURE_FILE = "roster-countersignature.json"  # this site's own, for the coordinator (public)
COUNTERSIGNATURES_FILE = "roster-countersignatures.json"  # every site's, as the coordinator hands them back
KIND = "privatune-roster-countersignature"
SET_KIND = "privatune-roster-countersignatures"
VERSION = 1
# Signed bytes start with this, so no other message the identity key signs (site request, ledger entries,
# secure-aggregation adverts) can pass for a countersignature, nor a countersignature for one of them.
DOMAIN = b"privatune roster countersignature v1\n"
NOT_RECEIVED = "none received"
_FIELDS = ("kind", "version", "site-id", "roster-fingerprint", "confirmed", "signature")


class CountersignatureError(ValueError):
    """A countersignature is malformed, does not verify, or is missing."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Countersignature:
    """Site ``site_id`` approved the roster of fingerprint ``roster_fingerprint``, its operator having heard the
    same roster code from the operators of ``confirmed``."""

    site_id: str
    roster_fingerprint: str  # SHA-256 hex of the roster's canonical JSON
    confirmed: tuple[str, ...]  # sorted
    signature: str  # hex Ed25519 over payload()

    @staticmethod
    def payload_of(site_id: str, roster_fingerprint: str, confirmed: Iterable[str]) -> bytes:
        fields = {
            "kind": KIND,
            "version": VERSION,
            "site-id": site_id,
            "roster-fingerprint": roster_fingerprint,
            "confirmed": sorted(confirmed),
        }
        return DOMAIN + _canonical(fields)

    def payload(self) -> bytes:
        return self.payload_of(self.site_id, self.roster_fingerprint, self.confirmed)

    @classmethod
    def make(
        cls, *, site_id: str, roster_fingerprint: str, confirmed: Iterable[str], key: Ed25519PrivateKey
    ) -> Countersignature:
        confirmed = tuple(sorted(confirmed))
        signature = key.sign(cls.payload_of(site_id, roster_fingerprint, confirmed)).hex()
        return cls(site_id, roster_fingerprint, confirmed, signature)

    def verify(self, key: Ed25519PublicKey) -> Countersignature:
        """Check the signature under ``key`` (the signer's key in the checker's own roster); returns ``self``."""
        try:
            key.verify(bytes.fromhex(self.signature), self.payload())
        except (InvalidSignature, ValueError) as e:
            raise CountersignatureError(
                f"the countersignature of site {self.site_id!r} does not verify under that site's key in the roster"
            ) from e
        return self

    def to_obj(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "version": VERSION,
            "site-id": self.site_id,
            "roster-fingerprint": self.roster_fingerprint,
            "confirmed": list(self.confirmed),
            "signature": self.signature,
        }

    @classmethod
    def from_obj(cls, raw: object, *, where: str) -> Countersignature:
        if not isinstance(raw, dict):
            raise CountersignatureError(f"{where} must be a JSON object, got {type(raw).__name__}")
        missing = [k for k in _FIELDS if k not in raw]
        unknown = sorted(set(raw) - set(_FIELDS))
        if missing or unknown:
            raise CountersignatureError(f"{where} lacks {missing} / has unknown {unknown} field(s)")
        if raw["kind"] != KIND or raw["version"] != VERSION:
            raise CountersignatureError(
                f"{where} is not a {KIND} version {VERSION}: kind={raw['kind']!r}, version={raw['version']!r}"
            )
        for k in ("site-id", "roster-fingerprint", "signature"):
            if not isinstance(raw[k], str):
                raise CountersignatureError(f"{where} field {k!r} must be a string, got {raw[k]!r}")
        confirmed = raw["confirmed"]
        if not isinstance(confirmed, list) or not all(isinstance(s, str) for s in confirmed):
            raise CountersignatureError(f"{where} field 'confirmed' must be a list of site ids, got {confirmed!r}")
        return cls(raw["site-id"], raw["roster-fingerprint"], tuple(sorted(confirmed)), raw["signature"])

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> Countersignature:
        return cls.from_obj(_read_json(path), where=f"countersignature {path}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CountersignatureError(f"countersignature file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise CountersignatureError(f"countersignature file {path} is not valid JSON: {e}") from e


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_countersignature(path: Path, countersignature: Countersignature) -> None:
    _write_atomic(Path(path), countersignature.to_json())


def write_countersignatures(path: Path, countersignatures: Iterable[Countersignature]) -> None:
    """A set of countersignatures (one per site, by site id), as the coordinator hands them back."""
    by_site = {c.site_id: c for c in countersignatures}
    obj = {"kind": SET_KIND, "version": VERSION, "countersignatures": [by_site[s].to_obj() for s in sorted(by_site)]}
    _write_atomic(Path(path), json.dumps(obj, indent=2) + "\n")


def load_countersignatures(path: Path) -> list[Countersignature]:
    """Read a set written by :func:`write_countersignatures`; none if there is no file. Nothing is verified."""
    path = Path(path)
    if not path.is_file():
        return []
    raw = _read_json(path)
    if not isinstance(raw, dict) or raw.get("kind") != SET_KIND or not isinstance(raw.get("countersignatures"), list):
        raise CountersignatureError(f"{path} is not a {SET_KIND} file (a 'countersignatures' list)")
    return [
        Countersignature.from_obj(item, where=f"{path} entry {i}") for i, item in enumerate(raw["countersignatures"])
    ]


def verified_countersignatures(
    countersignatures: Iterable[Countersignature], *, roster_fingerprint: str, keys: Mapping[str, Ed25519PublicKey]
) -> dict[str, Countersignature]:
    """Site id -> its countersignature of the roster ``roster_fingerprint``, for every one given that verifies
    under ``keys`` (that roster's identity keys). Raises on one of this roster that names a site not in it or
    does not verify; one of another roster is left out."""
    out: dict[str, Countersignature] = {}
    for c in countersignatures:
        if c.roster_fingerprint != roster_fingerprint:
            continue
        if c.site_id not in keys:
            raise CountersignatureError(f"a countersignature names site {c.site_id!r}, which is not in the roster")
        out[c.site_id] = c.verify(keys[c.site_id])
    return out


def missing_countersignatures(
    countersignatures: Iterable[Countersignature],
    *,
    roster_fingerprint: str,
    keys: Mapping[str, Ed25519PublicKey],
    required: Iterable[str],
) -> dict[str, str]:
    """Each site of ``required`` without a valid countersignature of the roster ``roster_fingerprint`` (its
    identity keys ``keys``), with why: none at all, one of another roster, or one that does not verify."""
    why: dict[str, str] = {}
    valid: set[str] = set()
    for c in countersignatures:
        if c.site_id not in keys or c.site_id in valid:
            continue
        if c.roster_fingerprint != roster_fingerprint:
            why.setdefault(c.site_id, f"it countersigned another roster, fingerprint {c.roster_fingerprint}")
            continue
        try:
            c.verify(keys[c.site_id])
        except CountersignatureError:
            why[c.site_id] = "its countersignature does not verify under its key in this roster"
            continue
        valid.add(c.site_id)
        why.pop(c.site_id, None)
    return {s: why.get(s, NOT_RECEIVED) for s in sorted(set(required) - valid)}
