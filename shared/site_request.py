"""A site's enrolment request: its public keys, signed with the matching private keys (a CSR, as in NVIDIA FLARE).

A site makes its own keys (``privatune site init``) and hands the coordinator only this request. The request
carries the site id, the site's Ed25519 identity public key and its SuperNode authentication public key (EC
P-384, OpenSSH), and one signature by each of the two private keys over the same payload, so the coordinator
knows the site holds both. Its fingerprint (SHA-256 of the signed payload) is what the two operators compare by
phone or e-mail before the coordinator accepts it: it binds the site id to both public keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.identity import (
    IdentityError,
    canonical_json,
    check_node_auth_public_key,
    public_key_from_hex,
    public_key_hex,
    sha256_hex,
)

REQUEST_FILE = "site-request.json"
REQUEST_KIND = "privatune-site-request"
REQUEST_VERSION = 1
# Signed bytes start with this, so no other message the identity key signs (ledger entries, secure-aggregation
# adverts) can pass for a request, nor a request for one of them.
REQUEST_DOMAIN = b"privatune site request v1\n"
_FIELDS = ("kind", "version", "site-id", "identity-public-key", "node-auth-public-key")
_SIGNATURES = ("identity-signature", "node-auth-signature")
_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class SiteRequestError(ValueError):
    """A site request is malformed, or its signatures do not verify."""


def check_site_id(site_id: object) -> str:
    if not isinstance(site_id, str) or not _SITE_ID.match(site_id):
        raise SiteRequestError(
            f"site id must be 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit, got {site_id!r}"
        )
    return site_id


@dataclass(frozen=True)
class SiteRequest:
    """A site id, its two public keys, and the proof that the site holds both private keys."""

    site_id: str
    identity_public_key: str  # Ed25519, 64 hex digits
    node_auth_public_key: str  # "ecdsa-sha2-nistp384 AAAA..."
    identity_signature: str  # hex
    node_auth_signature: str  # hex (DER ECDSA, SHA-384)

    @staticmethod
    def payload_of(site_id: str, identity_public_key: str, node_auth_public_key: str) -> bytes:
        fields = {
            "kind": REQUEST_KIND,
            "version": REQUEST_VERSION,
            "site-id": site_id,
            "identity-public-key": identity_public_key,
            "node-auth-public-key": node_auth_public_key,
        }
        return REQUEST_DOMAIN + canonical_json(fields)

    def payload(self) -> bytes:
        return self.payload_of(self.site_id, self.identity_public_key, self.node_auth_public_key)

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the signed payload: the site id and both public keys."""
        return sha256_hex(self.payload())

    @classmethod
    def make(
        cls, site_id: str, *, identity_key: Ed25519PrivateKey, node_auth_key: ec.EllipticCurvePrivateKey
    ) -> SiteRequest:
        check_site_id(site_id)
        identity = public_key_hex(identity_key.public_key())
        node_auth = node_auth_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        payload = cls.payload_of(site_id, identity, node_auth.decode())
        return cls(
            site_id=site_id,
            identity_public_key=identity,
            node_auth_public_key=node_auth.decode(),
            identity_signature=identity_key.sign(payload).hex(),
            node_auth_signature=node_auth_key.sign(payload, ec.ECDSA(hashes.SHA384())).hex(),
        )

    def to_obj(self) -> dict[str, Any]:
        return {
            "kind": REQUEST_KIND,
            "version": REQUEST_VERSION,
            "site-id": self.site_id,
            "identity-public-key": self.identity_public_key,
            "node-auth-public-key": self.node_auth_public_key,
            "identity-signature": self.identity_signature,
            "node-auth-signature": self.node_auth_signature,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_obj(), indent=2) + "\n"

    def verify(self) -> SiteRequest:
        """Check the site id, both keys and both signatures; returns ``self``."""
        check_site_id(self.site_id)
        payload = self.payload()
        try:
            identity = public_key_from_hex(self.identity_public_key, where="identity-public-key")
            node_auth = check_node_auth_public_key(self.node_auth_public_key, where="node-auth-public-key")
        except IdentityError as e:
            raise SiteRequestError(str(e)) from e
        if node_auth != self.node_auth_public_key:
            raise SiteRequestError(f"node-auth-public-key must be one OpenSSH line without comment, got {node_auth!r}")
        try:
            identity.verify(bytes.fromhex(self.identity_signature), payload)
        except (InvalidSignature, ValueError) as e:
            raise SiteRequestError(
                f"the identity signature of site {self.site_id!r} does not verify: the request was altered, or "
                "whoever made it does not hold the identity key"
            ) from e
        auth_key = serialization.load_ssh_public_key(node_auth.encode())
        assert isinstance(auth_key, ec.EllipticCurvePublicKey)  # checked above
        try:
            auth_key.verify(bytes.fromhex(self.node_auth_signature), payload, ec.ECDSA(hashes.SHA384()))
        except (InvalidSignature, ValueError) as e:
            raise SiteRequestError(
                f"the node-auth signature of site {self.site_id!r} does not verify: the request was altered, or "
                "whoever made it does not hold the node-auth key"
            ) from e
        return self

    @classmethod
    def from_obj(cls, raw: object) -> SiteRequest:
        if not isinstance(raw, dict):
            raise SiteRequestError(f"a site request must be a JSON object, got {type(raw).__name__}")
        missing = [k for k in (*_FIELDS, *_SIGNATURES) if k not in raw]
        unknown = sorted(set(raw) - {*_FIELDS, *_SIGNATURES})
        if missing or unknown:
            raise SiteRequestError(f"site request lacks {missing} / has unknown {unknown} field(s)")
        if raw["kind"] != REQUEST_KIND or raw["version"] != REQUEST_VERSION:
            raise SiteRequestError(
                f"not a {REQUEST_KIND} version {REQUEST_VERSION}: kind={raw['kind']!r}, version={raw['version']!r}"
            )
        for k in (*_FIELDS[2:], *_SIGNATURES):
            if not isinstance(raw[k], str):
                raise SiteRequestError(f"site request field {k!r} must be a string, got {raw[k]!r}")
        return cls(
            site_id=raw["site-id"],
            identity_public_key=raw["identity-public-key"],
            node_auth_public_key=raw["node-auth-public-key"],
            identity_signature=raw["identity-signature"],
            node_auth_signature=raw["node-auth-signature"],
        ).verify()

    @classmethod
    def load(cls, path: Path) -> SiteRequest:
        """Read and verify a request file, naming the file on any error."""
        try:
            return cls.from_obj(json.loads(Path(path).read_text()))
        except FileNotFoundError as e:
            raise SiteRequestError(f"site request not found: {path}") from e
        except json.JSONDecodeError as e:
            raise SiteRequestError(f"site request {path} is not valid JSON: {e}") from e
        except SiteRequestError as e:
            raise SiteRequestError(f"site request {path}: {e}") from e
