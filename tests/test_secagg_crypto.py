"""The thin crypto wrappers: known answers, and each primitive with the right key and a wrong one."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from shared.secagg import crypto


def test_hkdf_matches_rfc5869_test_case_3() -> None:
    okm = crypto.hkdf(b"\x0b" * 22, info=b"", length=42)  # no salt = zero-length salt in RFC 5869
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8")


def test_keystream_equals_aes_of_the_counter_blocks() -> None:
    key = bytes(range(32))
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(4))
    expected = np.frombuffer(blocks, dtype="<u4")
    assert np.array_equal(crypto.keystream_uint32(key, 16), expected)


def test_keystream_depends_on_the_key() -> None:
    a = crypto.keystream_uint32(b"\x01" * 32, 1000)
    b = crypto.keystream_uint32(b"\x02" * 32, 1000)
    assert a.dtype == np.uint32 and a.shape == (1000,)
    assert np.mean(a == b) < 0.01


def test_keystream_rejects_a_short_key() -> None:
    with pytest.raises(crypto.CryptoError, match="keystream key must be 32 bytes, got 16"):
        crypto.keystream_uint32(b"\x00" * 16, 4)


def test_keystream_rejects_a_negative_length() -> None:
    with pytest.raises(crypto.CryptoError, match="keystream length must be an int >= 0, got -1"):
        crypto.keystream_uint32(b"\x00" * 32, -1)


def test_x25519_agreement_is_symmetric() -> None:
    a_priv, a_pub = crypto.generate_x25519()
    b_priv, b_pub = crypto.generate_x25519()
    assert crypto.x25519_shared(a_priv, b_pub) == crypto.x25519_shared(b_priv, a_pub)
    assert crypto.x25519_public(a_priv) == a_pub


def test_x25519_rejects_a_low_order_public_key() -> None:
    priv, _ = crypto.generate_x25519()
    with pytest.raises(crypto.CryptoError, match="X25519 key agreement failed"):
        crypto.x25519_shared(priv, bytes(32))


def test_x25519_rejects_a_wrong_length_key() -> None:
    priv, _ = crypto.generate_x25519()
    with pytest.raises(crypto.CryptoError, match="X25519 public key must be 32 bytes, got 31"):
        crypto.x25519_shared(priv, bytes(31))


def test_aead_roundtrip_with_the_right_key() -> None:
    key = crypto.random_bytes()
    ct = crypto.encrypt(key, b"share", associated_data=b"ad")
    assert crypto.decrypt(key, ct, associated_data=b"ad") == b"share"


def test_aead_fails_with_a_wrong_key() -> None:
    ct = crypto.encrypt(crypto.random_bytes(), b"share", associated_data=b"ad")
    with pytest.raises(crypto.CryptoError, match="does not decrypt: wrong key"):
        crypto.decrypt(crypto.random_bytes(), ct, associated_data=b"ad")


def test_aead_fails_with_other_associated_data() -> None:
    key = crypto.random_bytes()
    ct = crypto.encrypt(key, b"share", associated_data=b"round 1")
    with pytest.raises(crypto.CryptoError, match="does not decrypt"):
        crypto.decrypt(key, ct, associated_data=b"round 2")


def test_aead_fails_on_a_flipped_bit() -> None:
    key = crypto.random_bytes()
    ct = bytearray(crypto.encrypt(key, b"share", associated_data=b""))
    ct[-1] ^= 1
    with pytest.raises(crypto.CryptoError, match="tampered"):
        crypto.decrypt(key, bytes(ct), associated_data=b"")


def test_aead_rejects_a_truncated_ciphertext() -> None:
    with pytest.raises(crypto.CryptoError, match="ciphertext must be at least 28 bytes, got 5"):
        crypto.decrypt(crypto.random_bytes(), b"short", associated_data=b"")


def test_signature_verifies_with_the_signer_key() -> None:
    key = Ed25519PrivateKey.generate()
    crypto.verify(key.public_key(), crypto.sign(key, b"msg"), b"msg")


def test_signature_fails_with_another_key() -> None:
    sig = crypto.sign(Ed25519PrivateKey.generate(), b"msg")
    with pytest.raises(crypto.CryptoError, match="signature does not verify"):
        crypto.verify(Ed25519PrivateKey.generate().public_key(), sig, b"msg")


def test_signature_fails_on_another_message() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(crypto.CryptoError, match="signature does not verify"):
        crypto.verify(key.public_key(), crypto.sign(key, b"round 1"), b"round 2")


def test_bind_is_unambiguous() -> None:
    assert crypto.bind("ab", "c") != crypto.bind("a", "bc")
    assert crypto.bind(1, "1") != crypto.bind("1", 1)
    assert crypto.bind(b"x") != crypto.bind("x")


def test_bind_rejects_other_types() -> None:
    with pytest.raises(crypto.CryptoError, match="bind\\(\\) takes bytes, str or int parts, got float"):
        crypto.bind(1.5)  # type: ignore[arg-type]
