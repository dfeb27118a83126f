"""Thin typed wrappers over ``cryptography``: every primitive secure aggregation uses, and nothing else.

- X25519 key agreement (pairwise masks, share encryption), raw 32-byte keys;
- Ed25519 signatures (the site identity key signs its per-round public keys);
- HKDF-SHA256 key derivation, always with a domain-separated ``info``;
- AES-256-GCM authenticated encryption of the secret shares (random 96-bit nonce, prepended);
- AES-256-CTR keystream read as little-endian ``uint32`` words (the masks).

Every failure (bad signature, wrong key, tampered ciphertext) raises :class:`CryptoError`.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
SIGNATURE_BYTES = 64


class CryptoError(ValueError):
    """A signature does not verify, a ciphertext does not decrypt, or a key is malformed."""


def _check_bytes(value: object, name: str, length: int | None = None) -> bytes:
    if not isinstance(value, bytes):
        raise CryptoError(f"{name} must be bytes, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise CryptoError(f"{name} must be {length} bytes, got {len(value)}")
    return value


def bind(*parts: bytes | str | int) -> bytes:
    """Unambiguous encoding of a tuple of fields (type tag + length prefix each), to sign or derive from."""
    out = bytearray()
    for part in parts:
        if isinstance(part, bool):
            raise CryptoError("bind() takes bytes, str or int parts, got bool")
        if isinstance(part, bytes):
            tag, raw = b"b", part
        elif isinstance(part, str):
            tag, raw = b"s", part.encode()
        elif isinstance(part, int):
            tag, raw = b"i", str(part).encode()
        else:
            raise CryptoError(f"bind() takes bytes, str or int parts, got {type(part).__name__}")
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def random_bytes(n: int = KEY_BYTES) -> bytes:
    return os.urandom(n)


# --- X25519 -------------------------------------------------------------------------------------


def generate_x25519() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as raw bytes: ``(private, public)``."""
    private = X25519PrivateKey.generate()
    return (
        private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        ),
        private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
    )


def x25519_public(private: bytes) -> bytes:
    """The public key of a raw X25519 private key."""
    key = X25519PrivateKey.from_private_bytes(_check_bytes(private, "X25519 private key", KEY_BYTES))
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def x25519_shared(private: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret; raises :class:`CryptoError` for a low-order peer key."""
    key = X25519PrivateKey.from_private_bytes(_check_bytes(private, "X25519 private key", KEY_BYTES))
    peer = X25519PublicKey.from_public_bytes(_check_bytes(peer_public, "X25519 public key", KEY_BYTES))
    try:
        return key.exchange(peer)
    except ValueError as e:  # all-zero shared secret: a low-order point
        raise CryptoError(f"X25519 key agreement failed: {e}") from e


def hkdf(secret: bytes, *, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (no salt: every ``secret`` here is a fresh uniformly random or X25519 value)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


# --- Ed25519 ------------------------------------------------------------------------------------


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    return key.sign(message)


def verify(key: Ed25519PublicKey, signature: bytes, message: bytes) -> None:
    """Raise :class:`CryptoError` unless ``signature`` is ``key``'s signature of ``message``."""
    _check_bytes(signature, "signature", SIGNATURE_BYTES)
    try:
        key.verify(signature, message)
    except InvalidSignature as e:
        raise CryptoError("signature does not verify against the identity key") from e


# --- AES-256-GCM --------------------------------------------------------------------------------


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-256-GCM with a random nonce; returns ``nonce || ciphertext || tag``."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(_check_bytes(key, "AES-GCM key", KEY_BYTES)).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises :class:`CryptoError` for a wrong key, wrong data or tampering."""
    aead = AESGCM(_check_bytes(key, "AES-GCM key", KEY_BYTES))
    _check_bytes(ciphertext, "ciphertext")
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise CryptoError(f"ciphertext must be at least {NONCE_BYTES + TAG_BYTES} bytes, got {len(ciphertext)}")
    try:
        return aead.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], associated_data)
    except InvalidTag as e:
        raise CryptoError("ciphertext does not decrypt: wrong key, wrong associated data or tampered") from e


# --- AES-256-CTR keystream ----------------------------------------------------------------------


def keystream_uint32(key: bytes, length: int) -> np.ndarray:
    """``length`` pseudo-random ``uint32`` words: the AES-256-CTR keystream of ``key`` from a zero counter.

    The counter always starts at zero, so ``key`` must never be used for anything else: callers derive it with
    :func:`hkdf` from a fresh secret and an ``info`` naming the run, round and pair.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise CryptoError(f"keystream length must be an int >= 0, got {length!r}")
    encryptor = Cipher(algorithms.AES(_check_bytes(key, "keystream key", KEY_BYTES)), modes.CTR(bytes(16))).encryptor()
    raw = encryptor.update(bytes(4 * length)) + encryptor.finalize()
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32, copy=False)
