"""Long-term site identities: Ed25519 keys, the roster of every site's public keys, and each site's pin.

A site's identity key signs its secure-aggregation public keys and its ledger entries. The roster maps a site
id to its identity public key (and, in a deployment, to the public key its SuperNode authenticates with). A
site makes its own keys (``privatune site init``, see ``shared/enrolment.py``); the coordinator only collects
public keys into the roster. A site uses a roster only after its operator approved it: the approval stores the
roster's fingerprint (SHA-256 of its canonical JSON) in the site's directory, with the other sites whose
operators read out the same roster code (:meth:`Roster.code`) at the roll call, and :func:`load_site_roster`,
the one way a site loads its roster, refuses a roster whose fingerprint is not that pin, one with a site its
operator did not confirm, and one that any other site in it has not countersigned (``shared/countersignature.py``).
In simulation one party plays every role, and :func:`provision_simulation` approves and countersigns every
simulated site's roster itself.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared.countersignature import (
    COUNTERSIGNATURES_FILE,
    NOT_RECEIVED,
    Countersignature,
    CountersignatureError,
    load_countersignatures,
    missing_countersignatures,
    write_countersignatures,
)

if TYPE_CHECKING:
    from shared.site import Site

IDENTITY_KEY_FILE = "identity_ed25519.pem"
ROSTER_FILE = "roster.json"
ROSTER_PIN_FILE = "roster-pin.json"
ROSTER_IDENTITY = "identity"
ROSTER_NODE_AUTH = "node-auth"
APPROVE_COMMAND = "privatune site approve-roster"
# The roster code: 30 decimal digits (about 2^100) of a memory-hard hash (scrypt, 16 MiB) of the fingerprint.
# A coordinator that shows two sites two rosters with one code must find a collision of it: about 2^50 scrypt
# evaluations, since it fixes both rosters before anyone compares.
ROSTER_CODE_SALT = b"privatune roster code v1"
ROSTER_CODE_DIGITS = 30
ROSTER_CODE_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


class IdentityError(ValueError):
    """A key, roster or roster pin is missing, malformed or inconsistent."""


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM with mode 0600 (created that way, never widened)."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from PEM, naming the file on any error."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError as e:
        raise IdentityError(f"identity key not found: {path}") from e
    except (ValueError, TypeError) as e:
        raise IdentityError(f"identity key {path} is not a PEM private key: {e}") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is not an Ed25519 key")
    return key


def public_key_hex(key: Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def public_key_from_hex(value: object, *, where: str = "public key") -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(value)  # type: ignore[arg-type]
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{where} is not a 32-byte hex Ed25519 public key: {value!r}") from e


def check_node_auth_public_key(value: object, *, where: str = "node-auth public key") -> str:
    """A SuperNode authentication public key as Flower 1.41 takes it: EC P-384, one OpenSSH line. Returns it
    normalised (key type and base64, no comment)."""
    if not isinstance(value, str):
        raise IdentityError(f"{where} must be an OpenSSH public key string, got {value!r}")
    try:
        key = serialization.load_ssh_public_key(value.strip().encode())
    except (ValueError, TypeError, IndexError, UnsupportedAlgorithm) as e:
        raise IdentityError(f"{where} is not an OpenSSH public key: {value[:60]!r}") from e
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise IdentityError(f"{where} must be an EC NIST P-384 key (ecdsa-sha2-nistp384), got {value[:60]!r}")
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def format_fingerprint(hex_digest: str) -> str:
    """A fingerprint as two people read it to each other: groups of four hex digits."""
    return " ".join(hex_digest[i : i + 4] for i in range(0, len(hex_digest), 4))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Roster:
    """Site id -> Ed25519 identity public key (and, for deployed sites, node-auth public key), distributed out
    of band and approved by every site's operator."""

    keys: dict[str, Ed25519PublicKey]
    node_auth: dict[str, str] = field(default_factory=dict)  # site id -> OpenSSH EC P-384 public key

    def public_key(self, site_id: str) -> Ed25519PublicKey:
        try:
            return self.keys[site_id]
        except KeyError as e:
            raise IdentityError(f"site {site_id!r} is not in the roster") from e

    def check_entry(self, site_id: str, *, identity: Ed25519PublicKey, node_auth: str | None = None) -> None:
        """This site's own entry holds its own keys (a coordinator cannot swap them in without it noticing)."""
        if public_key_hex(self.public_key(site_id)) != public_key_hex(identity):
            raise IdentityError(
                f"the roster's identity key for site {site_id!r} is {public_key_hex(self.keys[site_id])}, not this "
                f"site's own key {public_key_hex(identity)}"
            )
        if node_auth is not None and site_id in self.node_auth and self.node_auth[site_id] != node_auth:
            raise IdentityError(
                f"the roster's node-auth key for site {site_id!r} is not this site's own node-auth public key"
            )

    def to_obj(self) -> dict[str, Any]:
        """The roster file's content: ``{site: identity hex}``, or ``{site: {identity, node-auth}}`` for a site
        with a node-auth key."""
        out: dict[str, Any] = {}
        for site, key in sorted(self.keys.items()):
            if site in self.node_auth:
                out[site] = {ROSTER_IDENTITY: public_key_hex(key), ROSTER_NODE_AUTH: self.node_auth[site]}
            else:
                out[site] = public_key_hex(key)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), indent=2, sort_keys=True) + "\n"

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the roster's canonical JSON: equal exactly when every site and key is equal."""
        return sha256_hex(canonical_json(self.to_obj()))

    def code(self) -> str:
        """The roster code the sites' operators read out to each other: six groups of five digits, derived from
        the fingerprint by scrypt (:data:`ROSTER_CODE_SCRYPT`), so that two rosters with one code are too costly
        to find. Operators who each read the same code hold the same roster."""
        raw = hashlib.scrypt(bytes.fromhex(self.fingerprint()), salt=ROSTER_CODE_SALT, dklen=16, **ROSTER_CODE_SCRYPT)
        digits = str(int.from_bytes(raw, "big") % 10**ROSTER_CODE_DIGITS).zfill(ROSTER_CODE_DIGITS)
        return " ".join(digits[i : i + 5] for i in range(0, ROSTER_CODE_DIGITS, 5))

    def others(self, site_id: str) -> tuple[str, ...]:
        """Every site of the roster but ``site_id``, sorted."""
        return tuple(sorted(set(self.keys) - {site_id}))

    def describe(self) -> list[str]:
        """One line per site, with its keys, for an operator to read before approving."""
        lines = []
        for site, key in sorted(self.keys.items()):
            auth = f"  node-auth {self.node_auth[site]}" if site in self.node_auth else ""
            lines.append(f"{site}: identity {public_key_hex(key)}{auth}")
        return lines

    @classmethod
    def from_obj(cls, raw: object, *, where: str) -> Roster:
        if not isinstance(raw, dict) or not raw:
            raise IdentityError(f"{where} must be a non-empty JSON object of site id -> public key")
        keys: dict[str, Ed25519PublicKey] = {}
        node_auth: dict[str, str] = {}
        for site, value in raw.items():
            entry = f"{where} entry {site!r}"
            if isinstance(value, dict):
                unknown = sorted(set(value) - {ROSTER_IDENTITY, ROSTER_NODE_AUTH})
                if unknown or ROSTER_IDENTITY not in value:
                    raise IdentityError(
                        f"{entry} must have {ROSTER_IDENTITY!r} (and optionally {ROSTER_NODE_AUTH!r}), "
                        f"got keys {sorted(value)}"
                    )
                keys[site] = public_key_from_hex(value[ROSTER_IDENTITY], where=entry)
                if ROSTER_NODE_AUTH in value:
                    node_auth[site] = check_node_auth_public_key(value[ROSTER_NODE_AUTH], where=entry)
            else:
                keys[site] = public_key_from_hex(value, where=entry)
        return cls(keys, node_auth)

    @classmethod
    def load(cls, path: Path) -> Roster:
        """Parse a roster file. A site never calls this directly: it uses :func:`load_site_roster`."""
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise IdentityError(f"roster not found: {path}") from e
        except json.JSONDecodeError as e:
            raise IdentityError(f"roster {path} is not valid JSON: {e}") from e
        return cls.from_obj(raw, where=f"roster {path}")


@dataclass(frozen=True)
class RosterPin:
    """What a site's operator approved: the roster itself and its fingerprint, for this site, at this time, and
    the other sites whose operators read out the same roster code (the roll call)."""

    site_id: str
    roster: Roster
    approved_at: str
    confirmed: tuple[str, ...] = ()  # sorted; a pin written before roll calls existed has none

    @property
    def unconfirmed(self) -> tuple[str, ...]:
        """The other sites of the roster that its operator did not confirm."""
        return tuple(s for s in self.roster.others(self.site_id) if s not in self.confirmed)

    @property
    def fingerprint(self) -> str:
        return self.roster.fingerprint()

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(sorted(self.roster.keys))

    def to_json(self) -> str:
        obj = {
            "site-id": self.site_id,
            "fingerprint": self.fingerprint,
            "approved-at": self.approved_at,
            "confirmed": list(self.confirmed),
            "roster": self.roster.to_obj(),
        }
        return json.dumps(obj, indent=2) + "\n"

    @classmethod
    def load(cls, path: Path) -> RosterPin:
        try:
            raw = json.loads(Path(path).read_text())
            pin = cls(
                site_id=str(raw["site-id"]),
                roster=Roster.from_obj(raw["roster"], where=f"roster pin {path}"),
                approved_at=str(raw["approved-at"]),
                confirmed=_site_ids(raw.get("confirmed", []), where=f"roster pin {path} 'confirmed'"),
            )
            recorded = raw["fingerprint"]
        except FileNotFoundError as e:
            raise IdentityError(f"roster pin not found: {path}") from e
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise IdentityError(f"roster pin {path} is malformed ({e!r}); approve the roster again") from e
        if recorded != pin.fingerprint:
            raise IdentityError(
                f"roster pin {path} records fingerprint {recorded!r} but holds a roster of fingerprint "
                f"{pin.fingerprint}: it was altered; approve the roster again"
            )
        return pin


def _site_ids(value: object, *, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise IdentityError(f"{where} must be a list of site ids, got {value!r}")
    return tuple(sorted(value))


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def pin_roster(site_dir: Path, site_id: str, roster: Roster, *, confirmed: tuple[str, ...] = ()) -> RosterPin:
    """Record ``roster`` (and its fingerprint) as the one this site uses: its operator approved it, having heard
    the same roster code from the operators of ``confirmed``, or, in a simulation, the party playing every role
    made it."""
    unknown = sorted(set(confirmed) - set(roster.others(site_id)))
    if unknown:
        raise IdentityError(f"confirmed site(s) {unknown} are not other sites of the roster {roster.others(site_id)}")
    pin = RosterPin(
        site_id=site_id,
        roster=roster,
        approved_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        confirmed=tuple(sorted(confirmed)),
    )
    _write_atomic(Path(site_dir) / ROSTER_PIN_FILE, pin.to_json())
    return pin


def load_pinned_roster(roster_path: Path, *, site_dir: Path, site_id: str) -> Roster:
    """The roster at ``roster_path``, if it is the one site ``site_id`` approved (pin in ``site_dir``)."""
    return _load_pinned(roster_path, site_dir=site_dir, site_id=site_id)[0]


def _load_pinned(roster_path: Path, *, site_dir: Path, site_id: str) -> tuple[Roster, RosterPin]:
    roster_path, site_dir = Path(roster_path), Path(site_dir)
    pin_path = site_dir / ROSTER_PIN_FILE
    approve = f"{APPROVE_COMMAND} --site-dir {site_dir} {roster_path}"
    if not pin_path.is_file():
        raise IdentityError(
            f"site {site_id!r} has not approved a roster (no {pin_path}); check the roster's fingerprint with "
            f"the coordinator, then run: {approve}"
        )
    pin = RosterPin.load(pin_path)
    if pin.site_id != site_id:
        raise IdentityError(f"roster pin {pin_path} belongs to site {pin.site_id!r}, not {site_id!r}")
    roster = Roster.load(roster_path)
    actual = roster.fingerprint()
    if actual != pin.fingerprint:
        raise IdentityError(
            f"roster {roster_path} has fingerprint {actual}, but site {site_id!r} approved {pin.fingerprint} "
            f"({pin_path}, {pin.approved_at}): the roster changed and is refused until the site's operator checks "
            f"it and runs: {approve}"
        )
    return roster, pin


def check_endorsed(roster: Roster, pin: RosterPin, *, site_dir: Path) -> None:
    """The pinned ``roster`` was confirmed at the roll call for every other site in it, and each of them
    countersigned it (``roster-countersignatures.json`` in ``site_dir``, checked under this roster's keys)."""
    approve = f"{APPROVE_COMMAND} --site-dir {site_dir} <the coordinator's bundle>"
    fingerprint = roster.fingerprint()
    if pin.unconfirmed:
        raise IdentityError(
            f"site {pin.site_id!r}'s operator did not confirm {list(pin.unconfirmed)} at the roll call of roster "
            f"{fingerprint} (their operators reading out the same roster code): run {approve} and compare the "
            "code with them"
        )
    try:
        missing = missing_countersignatures(
            load_countersignatures(Path(site_dir) / COUNTERSIGNATURES_FILE),
            roster_fingerprint=fingerprint,
            keys=roster.keys,
            required=roster.others(pin.site_id),
        )
    except CountersignatureError as e:
        raise IdentityError(str(e)) from e
    if missing:
        reasons = "".join(f"; {s}: {why}" for s, why in missing.items() if why != NOT_RECEIVED)
        raise IdentityError(
            f"roster {fingerprint} lacks the countersignature of {', '.join(missing)}{reasons}: site "
            f"{pin.site_id!r} uses a roster only once every other site in it approved the same one. A site that "
            "countersigned another roster was shown another roster by the coordinator; one that has not "
            f"countersigned may not have approved it yet: get the bundle with every site's countersignature from "
            f"the coordinator and run {approve}"
        )


def load_site_roster(site: Site) -> Roster:
    """The one way a site loads its roster: the file its config names, refused unless its operator approved it
    after confirming every other site in it at the roll call, and every other site countersigned it."""
    roster, pin = _load_pinned(site.roster_path, site_dir=site.site_dir, site_id=site.site_id)
    check_endorsed(roster, pin, site_dir=site.site_dir)
    return roster


def site_id_for_partition(partition_id: int) -> str:
    """The site id a simulated client with this partition id takes."""
    return f"site-{partition_id}"


def provision_simulation(sim_dir: Path, num_sites: int) -> Roster:
    """Create (or reuse) one identity key per simulated site under ``sim_dir``, the roster of them all, and
    every simulated site's pin of that roster.

    Idempotent: existing keys are kept, so a restarted simulation keeps its sites' identities and ledgers.
    The roster never shrinks: a site that has a key under ``sim_dir`` stays in it when a later run has fewer
    sites, so the attestations of earlier runs still verify. Here one party plays every role, so it also
    approves (confirming every other site) and countersigns the roster for every site. In a deployment each
    site makes its own keys (``privatune site init``) and approves and countersigns the roster itself
    (``privatune site approve-roster``).
    """
    sim_dir = Path(sim_dir)
    private: dict[str, Ed25519PrivateKey] = {}
    for i in range(num_sites):
        site = site_id_for_partition(i)
        key_path = sim_dir / "sites" / site / IDENTITY_KEY_FILE
        if key_path.exists():
            private[site] = load_private_key(key_path)
        else:
            private[site] = Ed25519PrivateKey.generate()
            write_private_key(key_path, private[site])
    for key_path in sorted((sim_dir / "sites").glob(f"*/{IDENTITY_KEY_FILE}")):
        if key_path.parent.name not in private:
            private[key_path.parent.name] = load_private_key(key_path)
    roster = Roster({site: key.public_key() for site, key in private.items()})
    _write_atomic(sim_dir / ROSTER_FILE, roster.to_json())
    countersignatures = [
        Countersignature.make(
            site_id=site, roster_fingerprint=roster.fingerprint(), confirmed=roster.others(site), key=key
        )
        for site, key in private.items()
    ]
    for site in private:
        write_countersignatures(sim_dir / "sites" / site / COUNTERSIGNATURES_FILE, countersignatures)
        pin_roster(sim_dir / "sites" / site, site, roster, confirmed=roster.others(site))
    return roster
