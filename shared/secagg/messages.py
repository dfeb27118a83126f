"""Secure-aggregation messages: frozen records that convert to and from flat dicts of ints, strings and bytes.

The dicts are what a Flower ``ConfigRecord`` holds. ``from_config`` checks every key and type of an
incoming message before anything is built from it, and raises :class:`SecAggMessageError` naming the key.
The masked vector itself travels in an ``ArrayRecord``, never in these records.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.distributed_dp import DEFAULT_MIN_SURVIVORS, NoiseSizing, size_noise
from shared.secagg import constants as K
from shared.secagg.crypto import bind, sha256
from shared.secagg.encoding import NORM_TOLERANCE, FixedPoint
from shared.secagg.errors import SecAggMessageError
from shared.secagg.graph import GraphError, effective_degree, neighbours, ring_order
from shared.secagg.settings import SecAggSettings, check_threshold, consistency_quorum

Config = dict[str, Any]


# --- typed getters ------------------------------------------------------------------------------


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise SecAggMessageError(f"secagg message has no {key!r}")
    return cfg[key]


def _int(cfg: Mapping[str, Any], key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SecAggMessageError(f"secagg message field {key!r} must be an int, got {value!r:.60}")
    return value


def _float(cfg: Mapping[str, Any], key: str) -> float:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SecAggMessageError(f"secagg message field {key!r} must be a finite number, got {value!r:.60}")
    return float(value)


def _str(cfg: Mapping[str, Any], key: str) -> str:
    value = _get(cfg, key)
    if not isinstance(value, str):
        raise SecAggMessageError(f"secagg message field {key!r} must be a str, got {value!r:.60}")
    return value


def _bytes(cfg: Mapping[str, Any], key: str) -> bytes:
    value = _get(cfg, key)
    if not isinstance(value, bytes):
        raise SecAggMessageError(f"secagg message field {key!r} must be bytes, got {type(value).__name__}")
    return value


def _list(cfg: Mapping[str, Any], key: str, kind: type) -> tuple[Any, ...]:
    value = _get(cfg, key)
    if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, kind) for v in value):
        raise SecAggMessageError(f"secagg message field {key!r} must be a list of {kind.__name__}")
    return tuple(value)


def _same_length(cfg: Mapping[str, Any], *keys: str) -> None:
    lengths = {k: len(cfg[k]) for k in keys}
    if len(set(lengths.values())) > 1:
        raise SecAggMessageError(f"secagg message lists must have equal lengths, got {lengths}")


def _header(stage: str, run_id: str, server_round: int) -> Config:
    return {K.KEY_STAGE: stage, K.KEY_RUN_ID: run_id, K.KEY_SERVER_ROUND: server_round}


def stage_of(cfg: Mapping[str, Any]) -> str:
    """The stage a secagg record belongs to (checked against the known stages)."""
    stage = _str(cfg, K.KEY_STAGE)
    if stage not in K.STAGES:
        raise SecAggMessageError(f"secagg message field {K.KEY_STAGE!r} must be one of {K.STAGES}, got {stage!r}")
    return stage


def _check_stage(cfg: Mapping[str, Any], expected: str) -> None:
    stage = stage_of(cfg)
    if stage != expected:
        raise SecAggMessageError(f"expected a {expected!r} secagg message, got {stage!r}")


# --- advertise-keys -----------------------------------------------------------------------------


def _noise_fields(settings: SecAggSettings, n: int) -> dict[str, Any]:
    """The distributed-noise round parameters for ``n`` sampled nodes (none without distributed noise).

    The noise is split into ``M`` shares: ``settings.min_survivors``, or by default the larger of the round's
    consistency quorum (no round completes with fewer survivors anyway) and 3, at most ``n``.
    """
    if settings.noise_multiplier == 0.0:
        return {}
    if settings.dim is None:
        raise ValueError("distributed noise needs the update length (settings.dim) to size the noise")
    quorum = consistency_quorum(n, settings.threshold_for(n))
    shares = min(n, settings.min_survivors or max(quorum, DEFAULT_MIN_SURVIVORS))
    sizing = size_noise(
        noise_multiplier=settings.noise_multiplier,
        sensitivity=settings.sensitivity,
        dimension=settings.dim,
        clip_norm=settings.clip_norm,
        max_weight=settings.max_weight,
        num_nodes=n,
        shares=shares,
    )
    return {"dp_scale": sizing.scale, "dp_noise_stddev": sizing.noise_stddev, "dp_shares": sizing.shares}


@dataclass(frozen=True)
class RoundParams:
    """The round's parameters, sent in the advertise-keys request; every client signs over their digest."""

    run_id: str
    server_round: int
    node_ids: tuple[int, ...]  # the sampled nodes, sorted
    degree: int
    threshold: int
    clip_norm: float
    max_weight: float
    max_clients: int
    modulus_bits: int = 32
    dp_scale: float = 0.0  # distributed DP noise (all three > 0), or none (all three 0): shared/distributed_dp.py
    dp_noise_stddev: float = 0.0
    dp_shares: int = 0

    def __post_init__(self) -> None:
        if not self.run_id:
            raise SecAggMessageError("round parameter run_id must be a non-empty str")
        if self.server_round < 0:  # round 0: the centering query of a centered run
            raise SecAggMessageError(f"round parameter server_round must be >= 0, got {self.server_round}")
        if list(self.node_ids) != sorted(set(self.node_ids)):
            raise SecAggMessageError("round parameter node_ids must be sorted and distinct")
        n = len(self.node_ids)
        if not 2 <= n <= self.max_clients:
            raise SecAggMessageError(f"a round needs 2 <= n <= max_clients = {self.max_clients} nodes, got {n}")
        try:
            if effective_degree(n, self.degree) != self.degree:
                raise SecAggMessageError(
                    f"round parameter degree {self.degree} is not a valid degree for {n} nodes "
                    f"(it would be {effective_degree(n, self.degree)})"
                )
            check_threshold(self.threshold, self.degree + 1)
        except (GraphError, ValueError) as e:
            if isinstance(e, SecAggMessageError):
                raise
            raise SecAggMessageError(f"round parameters rejected: {e}") from e
        if not (self.clip_norm > 0 and self.max_weight > 0):
            raise SecAggMessageError(
                f"round parameters clip_norm and max_weight must be > 0, got {self.clip_norm}, {self.max_weight}"
            )
        if self.modulus_bits != 32:
            raise SecAggMessageError(f"round parameter modulus_bits must be 32, got {self.modulus_bits}")
        noise = (self.dp_scale, self.dp_noise_stddev, self.dp_shares)
        if noise != (0.0, 0.0, 0) and not (
            math.isfinite(self.dp_scale)
            and self.dp_scale > 0
            and math.log2(self.dp_scale).is_integer()
            and math.isfinite(self.dp_noise_stddev)
            and self.dp_noise_stddev > 0
            and 1 <= self.dp_shares <= n
        ):
            raise SecAggMessageError(
                "round parameters dp-scale (a power of two), dp-noise-stddev (> 0) and dp-shares (1..n) must be "
                f"set together or not at all, got {noise} for n = {n}"
            )

    @property
    def noise_sizing(self) -> NoiseSizing | None:
        """The round's distributed-noise numbers, or None in a round without distributed noise."""
        if self.dp_shares == 0:
            return None
        return NoiseSizing(scale=self.dp_scale, noise_stddev=self.dp_noise_stddev, shares=self.dp_shares)

    def fixed_point(self) -> FixedPoint:
        """The round's encoding: for distributed noise its public scale over the sampled nodes, else the
        finest scale for which ``max_clients`` clipped updates cannot wrap."""
        if self.dp_shares == 0:
            return FixedPoint.for_sum(
                clip_norm=self.clip_norm, max_weight=self.max_weight, max_clients=self.max_clients
            )
        bound = float(self.clip_norm) * float(self.max_weight) * (1.0 + NORM_TOLERANCE)
        return FixedPoint(scale=self.dp_scale, bound=bound, max_clients=len(self.node_ids))

    @classmethod
    def for_round(cls, settings: SecAggSettings, *, run_id: str, server_round: int, node_ids: list[int]) -> RoundParams:
        """The parameters of one round of ``node_ids`` under ``settings`` (degree and threshold resolved)."""
        ids = sorted(node_ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"node_ids must be distinct, got {node_ids}")
        if not 2 <= len(ids) <= settings.max_clients:
            raise ValueError(
                f"a secure round needs 2 <= n <= max_clients = {settings.max_clients} nodes, got {len(ids)}"
            )
        return cls(
            run_id=run_id,
            server_round=server_round,
            node_ids=tuple(ids),
            degree=settings.degree_for(len(ids)),
            threshold=settings.threshold_for(len(ids)),
            clip_norm=float(settings.clip_norm),
            max_weight=float(settings.max_weight),
            max_clients=settings.max_clients,
            modulus_bits=settings.modulus_bits,
            **_noise_fields(settings, len(ids)),
        )

    @property
    def digest(self) -> bytes:
        """SHA-256 of every parameter: signed by each client, so neighbours provably saw the same round."""
        return sha256(
            bind(
                K.DOMAIN,
                K.LABEL_PARAMS,
                self.run_id,
                self.server_round,
                *self.node_ids,
                -1,
                self.degree,
                self.threshold,
                repr(float(self.clip_norm)),
                repr(float(self.max_weight)),
                self.max_clients,
                self.modulus_bits,
                *(
                    ()
                    if self.dp_shares == 0
                    else (repr(float(self.dp_scale)), repr(float(self.dp_noise_stddev)), self.dp_shares)
                ),
            )
        )

    def advert_digest(self, adverts: Iterable[KeyAdvert]) -> bytes:
        """SHA-256 of the round's whole advert set (sorted by node id), under the parameter digest.

        It seeds the neighbour graph and is bound into every share ciphertext and survivor-set signature:
        the honest sites' adverts carry fresh keys made after the parameters were fixed, so the server
        cannot choose the graph, and clients shown different advert sets cannot complete a round together.
        """
        parts: list[bytes | str | int] = [K.DOMAIN, K.LABEL_ADVERT_SET, self.digest]
        for a in sorted(adverts, key=lambda a: a.node_id):
            parts += [a.node_id, a.site_id, a.mask_public_key, a.enc_public_key, a.seed_commitment]
        return sha256(bind(*parts))

    def neighbours(self, advert_node_ids: Iterable[int], advert_digest: bytes) -> dict[int, frozenset[int]]:
        """The neighbour graph over the nodes that advertised: the round's degree (complete graph if the
        advert set is that small), ring order seeded by the advert-set digest."""
        ids = sorted(advert_node_ids)
        degree = effective_degree(len(ids), self.degree)
        return neighbours(ids, degree=degree, seed=self.graph_seed(advert_digest))

    def ring(self, advert_node_ids: Iterable[int], advert_digest: bytes) -> list[int]:
        """The nodes in the ring order of :meth:`neighbours` (each is joined to the ``degree/2`` on each side)."""
        return ring_order(sorted(advert_node_ids), seed=self.graph_seed(advert_digest))

    @staticmethod
    def graph_seed(advert_digest: bytes) -> bytes:
        return bind(K.DOMAIN, K.LABEL_GRAPH, advert_digest)

    def share_x(self, node_id: int) -> int:
        """The Shamir x-coordinate of ``node_id``'s shares: its 1-based position among the sampled nodes."""
        return self.node_ids.index(node_id) + 1

    def to_config(self) -> Config:
        return {
            **_header(K.STAGE_ADVERTISE_KEYS, self.run_id, self.server_round),
            K.KEY_NODE_IDS: list(self.node_ids),
            K.KEY_DEGREE: self.degree,
            K.KEY_THRESHOLD: self.threshold,
            K.KEY_CLIP_NORM: float(self.clip_norm),
            K.KEY_MAX_WEIGHT: float(self.max_weight),
            K.KEY_MAX_CLIENTS: self.max_clients,
            K.KEY_MODULUS_BITS: self.modulus_bits,
            **(
                {}
                if self.dp_shares == 0
                else {
                    K.KEY_DP_SCALE: float(self.dp_scale),
                    K.KEY_DP_NOISE_STDDEV: float(self.dp_noise_stddev),
                    K.KEY_DP_SHARES: self.dp_shares,
                }
            ),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> RoundParams:
        _check_stage(cfg, K.STAGE_ADVERTISE_KEYS)
        noise: dict[str, Any] = {}
        if K.KEY_DP_SHARES in cfg:  # a round with distributed noise carries all three
            noise = {
                "dp_scale": _float(cfg, K.KEY_DP_SCALE),
                "dp_noise_stddev": _float(cfg, K.KEY_DP_NOISE_STDDEV),
                "dp_shares": _int(cfg, K.KEY_DP_SHARES),
            }
        return cls(
            run_id=_str(cfg, K.KEY_RUN_ID),
            server_round=_int(cfg, K.KEY_SERVER_ROUND),
            node_ids=_list(cfg, K.KEY_NODE_IDS, int),
            degree=_int(cfg, K.KEY_DEGREE),
            threshold=_int(cfg, K.KEY_THRESHOLD),
            clip_norm=_float(cfg, K.KEY_CLIP_NORM),
            max_weight=_float(cfg, K.KEY_MAX_WEIGHT),
            max_clients=_int(cfg, K.KEY_MAX_CLIENTS),
            modulus_bits=_int(cfg, K.KEY_MODULUS_BITS),
            **noise,
        )


@dataclass(frozen=True)
class KeyAdvert:
    """A client's round public keys and self-mask seed commitment, signed with its site identity key."""

    node_id: int
    site_id: str
    mask_public_key: bytes
    enc_public_key: bytes
    seed_commitment: bytes
    signature: bytes

    @staticmethod
    def signed_payload(
        params_digest: bytes,
        node_id: int,
        site_id: str,
        mask_public_key: bytes,
        enc_public_key: bytes,
        seed_commitment: bytes,
    ) -> bytes:
        return bind(
            K.DOMAIN,
            K.LABEL_ADVERT,
            params_digest,
            node_id,
            site_id,
            mask_public_key,
            enc_public_key,
            seed_commitment,
        )

    def payload(self, params_digest: bytes) -> bytes:
        return self.signed_payload(
            params_digest,
            self.node_id,
            self.site_id,
            self.mask_public_key,
            self.enc_public_key,
            self.seed_commitment,
        )

    def to_config(self) -> Config:
        return {
            K.KEY_STAGE: K.STAGE_ADVERTISE_KEYS,
            K.KEY_NODE_ID: self.node_id,
            K.KEY_SITE_ID: self.site_id,
            K.KEY_MASK_PUBLIC_KEY: self.mask_public_key,
            K.KEY_ENC_PUBLIC_KEY: self.enc_public_key,
            K.KEY_SEED_COMMITMENT: self.seed_commitment,
            K.KEY_SIGNATURE: self.signature,
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> KeyAdvert:
        _check_stage(cfg, K.STAGE_ADVERTISE_KEYS)
        return cls(
            node_id=_int(cfg, K.KEY_NODE_ID),
            site_id=_str(cfg, K.KEY_SITE_ID),
            mask_public_key=_bytes(cfg, K.KEY_MASK_PUBLIC_KEY),
            enc_public_key=_bytes(cfg, K.KEY_ENC_PUBLIC_KEY),
            seed_commitment=_bytes(cfg, K.KEY_SEED_COMMITMENT),
            signature=_bytes(cfg, K.KEY_SIGNATURE),
        )


# --- share-keys ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShareKeysRequest:
    """The server relays to every client ALL the signed adverts of the round (each client derives the graph)."""

    run_id: str
    server_round: int
    adverts: tuple[KeyAdvert, ...]

    def to_config(self) -> Config:
        a = self.adverts
        return {
            **_header(K.STAGE_SHARE_KEYS, self.run_id, self.server_round),
            K.KEY_ADVERT_NODE_IDS: [x.node_id for x in a],
            K.KEY_ADVERT_SITE_IDS: [x.site_id for x in a],
            K.KEY_ADVERT_MASK_KEYS: [x.mask_public_key for x in a],
            K.KEY_ADVERT_ENC_KEYS: [x.enc_public_key for x in a],
            K.KEY_ADVERT_COMMITMENTS: [x.seed_commitment for x in a],
            K.KEY_ADVERT_SIGNATURES: [x.signature for x in a],
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ShareKeysRequest:
        _check_stage(cfg, K.STAGE_SHARE_KEYS)
        cols = (
            _list(cfg, K.KEY_ADVERT_NODE_IDS, int),
            _list(cfg, K.KEY_ADVERT_SITE_IDS, str),
            _list(cfg, K.KEY_ADVERT_MASK_KEYS, bytes),
            _list(cfg, K.KEY_ADVERT_ENC_KEYS, bytes),
            _list(cfg, K.KEY_ADVERT_COMMITMENTS, bytes),
            _list(cfg, K.KEY_ADVERT_SIGNATURES, bytes),
        )
        _same_length(
            cfg,
            K.KEY_ADVERT_NODE_IDS,
            K.KEY_ADVERT_SITE_IDS,
            K.KEY_ADVERT_MASK_KEYS,
            K.KEY_ADVERT_ENC_KEYS,
            K.KEY_ADVERT_COMMITMENTS,
            K.KEY_ADVERT_SIGNATURES,
        )
        return cls(
            run_id=_str(cfg, K.KEY_RUN_ID),
            server_round=_int(cfg, K.KEY_SERVER_ROUND),
            adverts=tuple(KeyAdvert(*row) for row in zip(*cols, strict=True)),
        )


@dataclass(frozen=True)
class EncryptedShares:
    """A client's shares for its neighbours, each encrypted end to end (AES-GCM) to one of them."""

    node_id: int
    dst_node_ids: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]

    def to_config(self) -> Config:
        return {
            K.KEY_STAGE: K.STAGE_SHARE_KEYS,
            K.KEY_NODE_ID: self.node_id,
            K.KEY_PEER_NODE_IDS: list(self.dst_node_ids),
            K.KEY_CIPHERTEXTS: list(self.ciphertexts),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> EncryptedShares:
        _check_stage(cfg, K.STAGE_SHARE_KEYS)
        dst = _list(cfg, K.KEY_PEER_NODE_IDS, int)
        cts = _list(cfg, K.KEY_CIPHERTEXTS, bytes)
        _same_length(cfg, K.KEY_PEER_NODE_IDS, K.KEY_CIPHERTEXTS)
        if len(set(dst)) != len(dst):
            raise SecAggMessageError(f"secagg message field {K.KEY_PEER_NODE_IDS!r} has duplicates")
        return cls(node_id=_int(cfg, K.KEY_NODE_ID), dst_node_ids=dst, ciphertexts=cts)


# --- masked-input -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskedInputRequest:
    """The server relays to a client the ciphertexts addressed to it, and the weight fixed for its update."""

    run_id: str
    server_round: int
    src_node_ids: tuple[int, ...]
    ciphertexts: tuple[bytes, ...]
    weight: float = 1.0

    def to_config(self) -> Config:
        return {
            **_header(K.STAGE_MASKED_INPUT, self.run_id, self.server_round),
            K.KEY_PEER_NODE_IDS: list(self.src_node_ids),
            K.KEY_CIPHERTEXTS: list(self.ciphertexts),
            K.KEY_WEIGHT: float(self.weight),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> MaskedInputRequest:
        _check_stage(cfg, K.STAGE_MASKED_INPUT)
        src = _list(cfg, K.KEY_PEER_NODE_IDS, int)
        cts = _list(cfg, K.KEY_CIPHERTEXTS, bytes)
        _same_length(cfg, K.KEY_PEER_NODE_IDS, K.KEY_CIPHERTEXTS)
        if len(set(src)) != len(src):
            raise SecAggMessageError(f"secagg message field {K.KEY_PEER_NODE_IDS!r} has duplicates")
        return cls(
            run_id=_str(cfg, K.KEY_RUN_ID),
            server_round=_int(cfg, K.KEY_SERVER_ROUND),
            src_node_ids=src,
            ciphertexts=cts,
            weight=_float(cfg, K.KEY_WEIGHT),
        )


def masked_input_reply_config(node_id: int) -> Config:
    """The secagg record next to a masked vector (the vector itself is in an ArrayRecord)."""
    return {K.KEY_STAGE: K.STAGE_MASKED_INPUT, K.KEY_NODE_ID: node_id}


def masked_input_reply_node(cfg: Mapping[str, Any]) -> int:
    _check_stage(cfg, K.STAGE_MASKED_INPUT)
    return _int(cfg, K.KEY_NODE_ID)


# --- consistency-check and unmask --------------------------------------------------------------------


def _node_set(cfg: Mapping[str, Any], key: str) -> tuple[int, ...]:
    ids = _list(cfg, key, int)
    if list(ids) != sorted(set(ids)):
        raise SecAggMessageError(f"secagg message field {key!r} must be sorted and distinct")
    return ids


def survivor_set_payload(
    *, params_digest: bytes, advert_digest: bytes, survivors: Iterable[int], dropped: Iterable[int]
) -> bytes:
    """What a survivor signs in the consistency check: the round, its advert set, and the exact (U, D)."""
    u, d = sorted(survivors), sorted(dropped)
    return bind(K.DOMAIN, K.LABEL_SURVIVOR_SET, params_digest, advert_digest, len(u), *u, len(d), *d)


@dataclass(frozen=True)
class ConsistencyRequest:
    """The survivor set U (inputs in the sum) and dropped set D (masked, no input) the server will unmask."""

    run_id: str
    server_round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    def to_config(self) -> Config:
        return {
            **_header(K.STAGE_CONSISTENCY_CHECK, self.run_id, self.server_round),
            K.KEY_SURVIVORS: list(self.survivors),
            K.KEY_DROPPED: list(self.dropped),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ConsistencyRequest:
        _check_stage(cfg, K.STAGE_CONSISTENCY_CHECK)
        return cls(
            run_id=_str(cfg, K.KEY_RUN_ID),
            server_round=_int(cfg, K.KEY_SERVER_ROUND),
            survivors=_node_set(cfg, K.KEY_SURVIVORS),
            dropped=_node_set(cfg, K.KEY_DROPPED),
        )


@dataclass(frozen=True)
class SurvivorSignature:
    """A survivor's Ed25519 signature (site identity key) of :func:`survivor_set_payload`."""

    node_id: int
    signature: bytes

    def to_config(self) -> Config:
        return {K.KEY_STAGE: K.STAGE_CONSISTENCY_CHECK, K.KEY_NODE_ID: self.node_id, K.KEY_SIGNATURE: self.signature}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> SurvivorSignature:
        _check_stage(cfg, K.STAGE_CONSISTENCY_CHECK)
        return cls(node_id=_int(cfg, K.KEY_NODE_ID), signature=_bytes(cfg, K.KEY_SIGNATURE))


@dataclass(frozen=True)
class UnmaskRequest:
    """The signed survivor and dropped sets, with the survivors' signatures on them (parallel lists)."""

    run_id: str
    server_round: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    signer_ids: tuple[int, ...] = ()
    signatures: tuple[bytes, ...] = ()

    def to_config(self) -> Config:
        return {
            **_header(K.STAGE_UNMASK, self.run_id, self.server_round),
            K.KEY_SURVIVORS: list(self.survivors),
            K.KEY_DROPPED: list(self.dropped),
            K.KEY_SIGNER_IDS: list(self.signer_ids),
            K.KEY_SIGNATURES: list(self.signatures),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UnmaskRequest:
        _check_stage(cfg, K.STAGE_UNMASK)
        signers = _list(cfg, K.KEY_SIGNER_IDS, int)
        signatures = _list(cfg, K.KEY_SIGNATURES, bytes)
        _same_length(cfg, K.KEY_SIGNER_IDS, K.KEY_SIGNATURES)
        return cls(
            run_id=_str(cfg, K.KEY_RUN_ID),
            server_round=_int(cfg, K.KEY_SERVER_ROUND),
            survivors=_node_set(cfg, K.KEY_SURVIVORS),
            dropped=_node_set(cfg, K.KEY_DROPPED),
            signer_ids=signers,
            signatures=signatures,
        )


@dataclass(frozen=True)
class UnmaskShares:
    """A client's decrypted shares: self-mask seed shares of survivors, mask-key shares of dropped clients."""

    node_id: int
    seed_owner_ids: tuple[int, ...]
    seed_shares: tuple[bytes, ...]
    key_owner_ids: tuple[int, ...]
    key_shares: tuple[bytes, ...]

    def to_config(self) -> Config:
        return {
            K.KEY_STAGE: K.STAGE_UNMASK,
            K.KEY_NODE_ID: self.node_id,
            K.KEY_SEED_OWNER_IDS: list(self.seed_owner_ids),
            K.KEY_SEED_SHARES: list(self.seed_shares),
            K.KEY_KEY_OWNER_IDS: list(self.key_owner_ids),
            K.KEY_KEY_SHARES: list(self.key_shares),
        }

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> UnmaskShares:
        _check_stage(cfg, K.STAGE_UNMASK)
        seed_ids = _list(cfg, K.KEY_SEED_OWNER_IDS, int)
        seeds = _list(cfg, K.KEY_SEED_SHARES, bytes)
        key_ids = _list(cfg, K.KEY_KEY_OWNER_IDS, int)
        keys = _list(cfg, K.KEY_KEY_SHARES, bytes)
        _same_length(cfg, K.KEY_SEED_OWNER_IDS, K.KEY_SEED_SHARES)
        _same_length(cfg, K.KEY_KEY_OWNER_IDS, K.KEY_KEY_SHARES)
        if set(seed_ids) & set(key_ids):
            raise SecAggMessageError("secagg unmask reply gives both share kinds for the same owner")
        return cls(
            node_id=_int(cfg, K.KEY_NODE_ID),
            seed_owner_ids=seed_ids,
            seed_shares=seeds,
            key_owner_ids=key_ids,
            key_shares=keys,
        )


def config_size(cfg: Mapping[str, Any]) -> int:
    """Approximate wire size of a secagg record: the bytes of its values plus its keys (for the benchmark)."""
    total = 0
    for key, value in cfg.items():
        total += len(key)
        items = value if isinstance(value, (list, tuple)) else [value]
        for v in items:
            if isinstance(v, bytes):
                total += len(v)
            elif isinstance(v, str):
                total += len(v.encode())
            else:
                total += 8
    return total
