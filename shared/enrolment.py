"""A site's side of enrolment: it makes its own keys, and approves the roster it will trust.

``privatune site init --site-id hospital-a --out DIR`` makes, inside ``DIR`` (mode 0700)::

    identity_ed25519.pem           Ed25519 identity key (signs secure-aggregation keys, ledger entries)  0600
    node_auth_key, node_auth_key.pub   SuperNode authentication (EC P-384, OpenSSH)                      0600
    site-request.json              public keys + proof of possession, for the coordinator (public)
    node-config.toml               the site's own settings (a template to edit)

and prints the request's fingerprint for the two operators to compare by phone or e-mail. No private key ever
leaves ``DIR``. ``privatune site approve-roster --site-dir DIR BUNDLE`` shows the coordinator's roster (its
fingerprint, its roster code, every site and key, what changed since the roster approved before) and checks
that this site's own entry holds this site's own keys. Its operator then holds the roll call: the operators of
the other sites read out their roster codes, and the operator confirms each site whose operator read the same
code. Only with every other site confirmed is the roster approved: installed (with the bundle's CA certificate
and connection file), pinned with the confirmations (:func:`shared.identity.pin_roster`) and countersigned
(``roster-countersignature.json``, for the coordinator; ``shared/countersignature.py``). From then on the
site's client refuses any other roster, and this one until every other site in it countersigned it
(:func:`shared.identity.load_site_roster`); approving the same roster again installs the countersignatures the
coordinator collected in the bundle.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.countersignature import (
    COUNTERSIGNATURE_FILE,
    COUNTERSIGNATURES_FILE,
    Countersignature,
    CountersignatureError,
    load_countersignatures,
    verified_countersignatures,
    write_countersignature,
    write_countersignatures,
)
from shared.identity import (
    IDENTITY_KEY_FILE,
    ROSTER_FILE,
    ROSTER_PIN_FILE,
    IdentityError,
    Roster,
    RosterPin,
    load_private_key,
    pin_roster,
    write_private_key,
)
from shared.provision import (
    CA_CERT,
    CONNECTION_FILE,
    NODE_AUTH_KEY,
    NODE_AUTH_PUB,
    NODE_CONFIG_FILE,
    _write_new_private,
    _write_public,
    check_private_key_file,
    make_node_auth_key,
    node_config_template,
)
from shared.site_request import REQUEST_FILE, SiteRequest, check_site_id


class EnrolmentError(ValueError):
    """A site's keys, request or the roster it is asked to approve is missing or wrong."""


@dataclass(frozen=True)
class SiteKeys:
    """What ``site init`` left in a site's directory."""

    site_dir: Path
    request_path: Path
    request: SiteRequest


def _load_node_auth_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_ssh_private_key(
            check_private_key_file(path, what="node authentication key").read_bytes(), None
        )
    except ValueError as e:
        raise EnrolmentError(f"node authentication key {path} is not an OpenSSH private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp384r1":
        raise EnrolmentError(f"node authentication key {path} must be an EC (NIST P-384) key")
    return key


def init_site(site_id: str, site_dir: Path) -> SiteKeys:
    """Make this site's private keys (0600, in a 0700 directory) and its request; keep keys that exist."""
    check_site_id(site_id)
    site_dir = Path(site_dir).expanduser().resolve()
    site_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    request_path = site_dir / REQUEST_FILE
    if request_path.is_file():
        earlier = SiteRequest.load(request_path)
        if earlier.site_id != site_id:
            raise EnrolmentError(f"{site_dir} already belongs to site {earlier.site_id!r}, not {site_id!r}")
    elif any((site_dir / name).exists() for name in (IDENTITY_KEY_FILE, NODE_AUTH_KEY)):
        raise EnrolmentError(
            f"{site_dir} holds private keys that site init did not make (a bundle from a coordinator that made "
            "them?): whoever made them may hold a copy; run site init with a new --out directory"
        )
    identity_path = site_dir / IDENTITY_KEY_FILE
    if identity_path.exists():
        identity = load_private_key(check_private_key_file(identity_path, what="identity key"))
    else:
        identity = Ed25519PrivateKey.generate()
        write_private_key(identity_path, identity)
    if not (site_dir / NODE_AUTH_KEY).exists():
        private, public = make_node_auth_key()
        _write_new_private(site_dir / NODE_AUTH_KEY, private)
        _write_public(site_dir / NODE_AUTH_PUB, public)
    node_auth = _load_node_auth_key(site_dir / NODE_AUTH_KEY)
    request = SiteRequest.make(site_id, identity_key=identity, node_auth_key=node_auth)
    _write_public(request_path, request.to_json().encode())
    if not (site_dir / NODE_CONFIG_FILE).exists():
        _write_public(site_dir / NODE_CONFIG_FILE, node_config_template(site_id, site_dir).encode())
    return SiteKeys(site_dir, request_path, request)


def own_request(site_dir: Path) -> SiteRequest:
    """This site's request, checked against the private keys in ``site_dir`` (so it names this site's keys)."""
    site_dir = Path(site_dir).expanduser().resolve()
    request = SiteRequest.load(site_dir / REQUEST_FILE)
    identity = load_private_key(check_private_key_file(site_dir / IDENTITY_KEY_FILE, what="identity key"))
    node_auth = _load_node_auth_key(site_dir / NODE_AUTH_KEY)
    mine = SiteRequest.make(request.site_id, identity_key=identity, node_auth_key=node_auth)
    if (mine.identity_public_key, mine.node_auth_public_key) != (
        request.identity_public_key,
        request.node_auth_public_key,
    ):
        raise EnrolmentError(
            f"{site_dir / REQUEST_FILE} does not hold the public keys of the private keys in {site_dir}"
        )
    return request


@dataclass(frozen=True)
class RosterReview:
    """A roster offered to a site, as its operator reads it before approving."""

    site_dir: Path
    site_id: str
    roster: Roster
    source: Path  # the roster file
    bundle_dir: Path | None  # the coordinator's bundle it came in, if given as a directory
    previous: RosterPin | None
    changes: list[str]  # against the roster approved before (kept in the pin); empty: first approval, or identical
    countersignatures: dict[str, Countersignature]  # the bundle's, of this roster, each verified under its keys

    @property
    def fingerprint(self) -> str:
        return self.roster.fingerprint()

    @property
    def others(self) -> tuple[str, ...]:
        """The sites of the roster other than this one: each must be confirmed at the roll call."""
        return self.roster.others(self.site_id)

    @property
    def unchanged(self) -> bool:
        """The roster is the one approved before, with every other site confirmed then."""
        return (
            self.previous is not None
            and self.previous.fingerprint == self.fingerprint
            and not self.previous.unconfirmed
        )


def _changes(before: Roster, after: Roster) -> list[str]:
    out = []
    for site in sorted(set(before.keys) | set(after.keys)):
        if site not in after.keys:
            out.append(f"REMOVED {site}")
        elif site not in before.keys:
            out.append(f"ADDED {site}")
        elif before.to_obj()[site] != after.to_obj()[site]:
            out.append(f"KEY CHANGED for {site}")
    return out


def review_roster(site_dir: Path, source: Path, *, expected_fingerprint: str | None = None) -> RosterReview:
    """Read the roster offered in ``source`` (a roster file, or the coordinator's bundle directory) and check
    it for this site: it parses, it is the fingerprint the operator was told (if given), and this site's own
    entry holds this site's own keys. Nothing is written."""
    site_dir = Path(site_dir).expanduser().resolve()
    source = Path(source).expanduser().resolve()
    bundle_dir = source if source.is_dir() else None
    roster_path = source / ROSTER_FILE if bundle_dir else source
    request = own_request(site_dir)
    try:
        roster = Roster.load(roster_path)
    except IdentityError as e:
        raise EnrolmentError(str(e)) from e
    if expected_fingerprint is not None:
        expected = "".join(expected_fingerprint.split()).lower()
        if expected != roster.fingerprint():
            raise EnrolmentError(
                f"roster {roster_path} has fingerprint {roster.fingerprint()}, not the {expected} you were given: "
                "do not approve it; ask the coordinator"
            )
    try:
        roster.check_entry(
            request.site_id,
            identity=load_private_key(site_dir / IDENTITY_KEY_FILE).public_key(),
            node_auth=request.node_auth_public_key,
        )
    except IdentityError as e:
        raise EnrolmentError(f"roster {roster_path} cannot be approved by {request.site_id!r}: {e}") from e
    if request.site_id not in roster.node_auth:
        raise EnrolmentError(
            f"roster {roster_path} has no node-auth key for {request.site_id!r}: "
            "it was not made from this site's request"
        )
    previous = RosterPin.load(site_dir / ROSTER_PIN_FILE) if (site_dir / ROSTER_PIN_FILE).is_file() else None
    changes = _changes(previous.roster, roster) if previous is not None else []
    countersignatures: dict[str, Countersignature] = {}
    if bundle_dir is not None:
        try:
            countersignatures = verified_countersignatures(
                load_countersignatures(bundle_dir / COUNTERSIGNATURES_FILE),
                roster_fingerprint=roster.fingerprint(),
                keys=roster.keys,
            )
        except CountersignatureError as e:
            raise EnrolmentError(
                f"{bundle_dir / COUNTERSIGNATURES_FILE}: {e}: do not approve it; ask the coordinator"
            ) from e
    return RosterReview(
        site_dir, request.site_id, roster, roster_path, bundle_dir, previous, changes, countersignatures
    )


def approve_roster(review: RosterReview, *, confirmed: Iterable[str]) -> RosterPin:
    """Install the reviewed roster (and, from a bundle, its CA certificate and connection file), pin it with the
    sites its operator ``confirmed`` at the roll call, countersign it, and keep every countersignature of it.

    Refused unless every other site of the roster is confirmed: a site nobody read the roster code for may be the
    coordinator's own, and one whose operator read another code was shown another roster. The roster is written
    before the pin: a crash in between leaves a roster that does not match the pin, which the site refuses,
    never a pin of a roster it does not hold."""
    confirmed = tuple(sorted(set(confirmed)))
    unknown = sorted(set(confirmed) - set(review.others))
    if unknown:
        raise EnrolmentError(f"confirmed site(s) {unknown} are not other sites of the roster: {list(review.others)}")
    unconfirmed = [s for s in review.others if s not in confirmed]
    if unconfirmed:
        raise EnrolmentError(
            f"roster {review.source} not approved: no operator read out its roster code for {unconfirmed}. A site "
            "nobody on the call speaks for may be the coordinator's own, and one whose operator read another code "
            "was shown another roster: tell the other operators and the coordinator, and do not approve it"
        )
    site_dir = review.site_dir
    if review.bundle_dir is not None:
        for name in (CA_CERT, CONNECTION_FILE):
            if (review.bundle_dir / name).is_file() and review.bundle_dir != site_dir:
                tmp = site_dir / f"{name}.tmp"
                shutil.copyfile(review.bundle_dir / name, tmp)
                os.replace(tmp, site_dir / name)
    _write_public(site_dir / ROSTER_FILE, review.roster.to_json().encode())
    own = Countersignature.make(
        site_id=review.site_id,
        roster_fingerprint=review.fingerprint,
        confirmed=confirmed,
        key=load_private_key(site_dir / IDENTITY_KEY_FILE),
    )
    write_countersignature(site_dir / COUNTERSIGNATURE_FILE, own)
    try:  # those this site holds already, of this roster (those of an earlier roster are dropped with it)
        kept = verified_countersignatures(
            load_countersignatures(site_dir / COUNTERSIGNATURES_FILE),
            roster_fingerprint=review.fingerprint,
            keys=review.roster.keys,
        )
    except CountersignatureError as e:
        raise EnrolmentError(f"{site_dir / COUNTERSIGNATURES_FILE}: {e}") from e
    write_countersignatures(
        site_dir / COUNTERSIGNATURES_FILE, {**kept, **review.countersignatures, review.site_id: own}.values()
    )
    return pin_roster(site_dir, review.site_id, review.roster, confirmed=confirmed)


def held_countersignatures(site_dir: Path, pin: RosterPin) -> tuple[list[str], list[str]]:
    """The other sites of the pinned roster that countersigned it (valid, held in ``site_dir``), and those not."""
    held = verified_countersignatures(
        load_countersignatures(Path(site_dir) / COUNTERSIGNATURES_FILE),
        roster_fingerprint=pin.fingerprint,
        keys=pin.roster.keys,
    )
    others = pin.roster.others(pin.site_id)
    return [s for s in others if s in held], [s for s in others if s not in held]
