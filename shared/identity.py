"""Long-term site identities: Ed25519 keys and the roster of every site's public key.

A site's identity key signs its secure-aggregation public keys and its ledger entries. The roster maps a
site id to its identity public key; clients get it out of band (at provisioning; in simulation, made at
start-up by :func:`provision_simulation`), never from the server in the same round.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

IDENTITY_KEY_FILE = "identity_ed25519.pem"
ROSTER_FILE = "roster.json"


class IdentityError(ValueError):
    """A key or roster file is missing, malformed or inconsistent."""


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


def public_key_from_hex(value: str, *, where: str = "public key") -> Ed25519PublicKey:
    try:
        raw = bytes.fromhex(value)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{where} is not a 32-byte hex Ed25519 public key: {value!r}") from e


@dataclass(frozen=True)
class Roster:
    """Site id -> Ed25519 identity public key, as distributed out of band."""

    keys: dict[str, Ed25519PublicKey]

    def public_key(self, site_id: str) -> Ed25519PublicKey:
        try:
            return self.keys[site_id]
        except KeyError as e:
            raise IdentityError(f"site {site_id!r} is not in the roster") from e

    def to_json(self) -> str:
        return json.dumps({k: public_key_hex(v) for k, v in sorted(self.keys.items())}, indent=2)

    @classmethod
    def load(cls, path: Path) -> Roster:
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise IdentityError(f"roster not found: {path}") from e
        except json.JSONDecodeError as e:
            raise IdentityError(f"roster {path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict) or not raw:
            raise IdentityError(f"roster {path} must be a non-empty JSON object of site id -> public key")
        return cls({str(k): public_key_from_hex(v, where=f"roster {path} entry {k!r}") for k, v in raw.items()})


def site_id_for_partition(partition_id: int) -> str:
    """The site id a simulated client with this partition id takes."""
    return f"site-{partition_id}"


def provision_simulation(sim_dir: Path, num_sites: int) -> Roster:
    """Create (or reuse) one identity key per simulated site under ``sim_dir`` and the roster of them all.

    Idempotent: existing keys are kept, so a restarted simulation keeps its sites' identities and ledgers.
    The roster never shrinks: a site that has a key under ``sim_dir`` stays in it when a later run has fewer
    sites, so the attestations of earlier runs still verify. In a deployment this is done by the coordinator's
    provisioning, never by the server at run time.
    """
    sim_dir = Path(sim_dir)
    keys: dict[str, Ed25519PublicKey] = {}
    for i in range(num_sites):
        site = site_id_for_partition(i)
        key_path = sim_dir / "sites" / site / IDENTITY_KEY_FILE
        if key_path.exists():
            private = load_private_key(key_path)
        else:
            private = Ed25519PrivateKey.generate()
            write_private_key(key_path, private)
        keys[site] = private.public_key()
    for key_path in sorted((sim_dir / "sites").glob(f"*/{IDENTITY_KEY_FILE}")):
        keys.setdefault(key_path.parent.name, load_private_key(key_path).public_key())
    roster = Roster(keys)
    roster_path = sim_dir / ROSTER_FILE
    tmp = roster_path.with_suffix(".tmp")
    tmp.write_text(roster.to_json())
    os.replace(tmp, roster_path)
    return roster
