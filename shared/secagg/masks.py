"""The masks, and the keys they and the share ciphertexts are derived from (used by both client and server).

- pairwise mask of u and v: AES-256-CTR stream keyed by HKDF(X25519(c_u, C_v), info = run, round, params,
  pair); u adds it if u < v and subtracts it otherwise, so the two cancel in the sum;
- self mask of u: AES-256-CTR stream keyed by HKDF(seed_u, info = run, round, params, u);
- share-encryption key of u and v: HKDF(X25519(s_u, S_v), info = run, round, params, pair), for AES-GCM.

The round parameters' digest binds the run id and the round, so no key is ever reused across rounds or runs;
the share ciphertexts' associated data also binds the digest of the round's advert set.
"""

from __future__ import annotations

import numpy as np

from shared.secagg import constants as K
from shared.secagg.crypto import bind, hkdf, keystream_uint32, x25519_shared


def pairwise_mask_key(private: bytes, peer_public: bytes, *, params_digest: bytes, u: int, v: int) -> bytes:
    lo, hi = sorted((u, v))
    return hkdf(x25519_shared(private, peer_public), info=bind(K.DOMAIN, K.LABEL_PAIRWISE_MASK, params_digest, lo, hi))


def pairwise_mask(
    private: bytes, peer_public: bytes, *, params_digest: bytes, u: int, v: int, length: int
) -> np.ndarray:
    """The stream of the pair (u, v); ``u`` applies it with sign :func:`pairwise_sign` (u, v)."""
    return keystream_uint32(pairwise_mask_key(private, peer_public, params_digest=params_digest, u=u, v=v), length)


def pairwise_sign(u: int, v: int) -> int:
    """+1 if ``u`` adds the pair's stream, -1 if it subtracts it."""
    return 1 if u < v else -1


def self_mask(seed: bytes, *, params_digest: bytes, node_id: int, length: int) -> np.ndarray:
    return keystream_uint32(hkdf(seed, info=bind(K.DOMAIN, K.LABEL_SELF_MASK, params_digest, node_id)), length)


def share_key(private: bytes, peer_public: bytes, *, params_digest: bytes, u: int, v: int) -> bytes:
    lo, hi = sorted((u, v))
    return hkdf(x25519_shared(private, peer_public), info=bind(K.DOMAIN, K.LABEL_SHARE_KEY, params_digest, lo, hi))


def share_associated_data(*, params_digest: bytes, advert_digest: bytes, src: int, dst: int) -> bytes:
    """Associated data of a share ciphertext: direction, round and the advert set both ends were shown, so it
    cannot be replayed elsewhere, nor opened by a client the server showed a different advert set."""
    return bind(K.DOMAIN, K.LABEL_SHARE_AD, params_digest, advert_digest, src, dst)


def apply(acc: np.ndarray, stream: np.ndarray, sign: int) -> None:
    """``acc += sign * stream`` modulo 2^32, in place."""
    if sign > 0:
        np.add(acc, stream, out=acc)
    else:
        np.subtract(acc, stream, out=acc)
