"""The client side of SecAgg+ as a pure state machine (no Flower inside), safe against a malicious server.

One round, five stages (each a method); the state between them is a :class:`ClientRoundState` that converts
to and from a flat dict, so a Flower mod can keep it in ``context.state``:

1. ``advertise_keys(params)``: the parameters are checked against the site's own :class:`ClientPolicy`
   (threshold floor ``t >= ceil(f * (k + 1))``, minimum cohort) and a degree floor (SecAgg+'s
   ``2 * ceil(log2 n)``: the server may raise the degree, not lower it); fresh X25519 pairs (mask key ``c``,
   share-encryption key ``s``) and a fresh self-mask seed; the public keys and a commitment to the seed are
   signed with the site identity key, over the digest of the round parameters (run id, round, ...).
2. ``share_keys(request)``: the server relays EVERY advert of the round; each is checked against the roster
   the site got out of band (distinct sites, its own advert unchanged, at least ``max(min cohort, t + 1)``).
   The neighbour graph is derived from the digest of that advert set, so the server cannot choose it. The
   seed and ``c`` are Shamir-shared among the neighbours and the client itself, each neighbour's shares
   encrypted to it (AES-GCM, key from X25519 on the ``s`` keys, associated data binding the advert set).
3. ``receive_shares(request)`` then ``mask_input(update)``: the shares addressed to this client are
   decrypted and kept (at least ``t`` neighbours' shares, or the client refuses); the update is encoded in
   fixed point and masked with the self mask and one pairwise mask per neighbour whose shares arrived.
4. ``sign_survivors(request)``: the consistency check (Bonawitz et al. 2017): the client signs the exact
   survivor and dropped sets ``(U, D)`` the server will unmask, once per round, only if they contain it and
   pass its own checks.
5. ``unmask(request)``: only with valid signatures on the identical ``(U, D)`` from at least
   ``q = max(t, ceil(2n/3))`` distinct nodes of the advert set (``n`` its size): for each neighbour, the seed
   share if it is in ``U``, the mask-key share if in ``D``, never both, and only once per round.

Any violation raises :class:`SecAggProtocolError` (or :class:`SecAggMessageError`) and leaves the state as it
was: the client refuses the round and reveals nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.distributed_dp import wrap_problem
from shared.identity import IdentityError, Roster, public_key_hex
from shared.secagg import constants as K
from shared.secagg import masks, shamir
from shared.secagg.crypto import (
    KEY_BYTES,
    CryptoError,
    bind,
    decrypt,
    encrypt,
    generate_x25519,
    random_bytes,
    sha256,
    sign,
    verify,
)
from shared.secagg.encoding import NORM_TOLERANCE, EncodingError, add_noise_share
from shared.secagg.errors import SecAggMessageError, SecAggProtocolError
from shared.secagg.graph import effective_degree
from shared.secagg.messages import (
    ConsistencyRequest,
    EncryptedShares,
    KeyAdvert,
    MaskedInputRequest,
    RoundParams,
    ShareKeysRequest,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskShares,
    survivor_set_payload,
)
from shared.secagg.settings import ClientPolicy, consistency_quorum, default_degree, threshold_floor

PHASE_ADVERTISED = "advertised"
PHASE_SHARED = "shared"
PHASE_READY = "ready"  # shares received, waiting for the update
PHASE_MASKED = "masked"
PHASE_DECLINED = "declined"
PHASE_SIGNED = "signed"  # signed one survivor set: the only one it will ever unmask for this round
PHASE_UNMASKED = "unmasked"
_PHASES = (PHASE_ADVERTISED, PHASE_SHARED, PHASE_READY, PHASE_MASKED, PHASE_DECLINED, PHASE_SIGNED, PHASE_UNMASKED)
_PARAM_PREFIX = "params/"


def seed_commitment(seed: bytes) -> bytes:
    """The commitment to a self-mask seed published in the signed advert (lets the server check a rebuild)."""
    return sha256(bind(K.DOMAIN, "seed-commitment", seed))


def _pack_shares(seed_share: bytes, key_share: bytes) -> bytes:
    return len(seed_share).to_bytes(2, "big") + seed_share + key_share


def _unpack_shares(plaintext: bytes) -> tuple[bytes, bytes]:
    n = int.from_bytes(plaintext[:2], "big")
    if len(plaintext) < 2 + n:
        raise SecAggProtocolError("a decrypted share bundle is truncated")
    return plaintext[2 : 2 + n], plaintext[2 + n :]


@dataclass(frozen=True)
class ClientRoundState:
    """What a client keeps between the stages of one round (and, as the last round, for replay checks)."""

    phase: str
    params: RoundParams
    mask_private: bytes
    enc_private: bytes
    seed: bytes
    mask_public: bytes
    enc_public: bytes
    neighbour_ids: tuple[int, ...] = ()
    neighbour_mask_keys: tuple[bytes, ...] = ()
    neighbour_enc_keys: tuple[bytes, ...] = ()
    own_seed_share: bytes = b""
    own_key_share: bytes = b""
    peer_ids: tuple[int, ...] = ()  # neighbours whose shares arrived: the pairwise masks
    peer_seed_shares: tuple[bytes, ...] = ()
    peer_key_shares: tuple[bytes, ...] = ()
    weight: float = 1.0
    advert_digest: bytes = b""  # the round's verified advert set: its digest, nodes and their sites
    advert_node_ids: tuple[int, ...] = ()
    advert_site_ids: tuple[str, ...] = ()
    signed_survivors: tuple[int, ...] = ()  # the (U, D) it signed in the consistency check
    signed_dropped: tuple[int, ...] = ()

    def to_config(self) -> dict[str, Any]:
        out: dict[str, Any] = {_PARAM_PREFIX + k: v for k, v in self.params.to_config().items()}
        out.update(
            {
                "phase": self.phase,
                "mask-private": self.mask_private,
                "enc-private": self.enc_private,
                "seed": self.seed,
                "mask-public": self.mask_public,
                "enc-public": self.enc_public,
                "neighbour-ids": list(self.neighbour_ids),
                "neighbour-mask-keys": list(self.neighbour_mask_keys),
                "neighbour-enc-keys": list(self.neighbour_enc_keys),
                "own-seed-share": self.own_seed_share,
                "own-key-share": self.own_key_share,
                "peer-ids": list(self.peer_ids),
                "peer-seed-shares": list(self.peer_seed_shares),
                "peer-key-shares": list(self.peer_key_shares),
                "weight": float(self.weight),
                "advert-digest": self.advert_digest,
                "advert-node-ids": list(self.advert_node_ids),
                "advert-site-ids": list(self.advert_site_ids),
                "signed-survivors": list(self.signed_survivors),
                "signed-dropped": list(self.signed_dropped),
            }
        )
        return out

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ClientRoundState:
        try:
            params = RoundParams.from_config(
                {k[len(_PARAM_PREFIX) :]: v for k, v in cfg.items() if k.startswith(_PARAM_PREFIX)}
            )
            state = cls(
                phase=str(cfg["phase"]),
                params=params,
                mask_private=bytes(cfg["mask-private"]),
                enc_private=bytes(cfg["enc-private"]),
                seed=bytes(cfg["seed"]),
                mask_public=bytes(cfg["mask-public"]),
                enc_public=bytes(cfg["enc-public"]),
                neighbour_ids=tuple(int(x) for x in cfg["neighbour-ids"]),
                neighbour_mask_keys=tuple(bytes(x) for x in cfg["neighbour-mask-keys"]),
                neighbour_enc_keys=tuple(bytes(x) for x in cfg["neighbour-enc-keys"]),
                own_seed_share=bytes(cfg["own-seed-share"]),
                own_key_share=bytes(cfg["own-key-share"]),
                peer_ids=tuple(int(x) for x in cfg["peer-ids"]),
                peer_seed_shares=tuple(bytes(x) for x in cfg["peer-seed-shares"]),
                peer_key_shares=tuple(bytes(x) for x in cfg["peer-key-shares"]),
                weight=float(cfg["weight"]),
                advert_digest=bytes(cfg["advert-digest"]),
                advert_node_ids=tuple(int(x) for x in cfg["advert-node-ids"]),
                advert_site_ids=tuple(str(x) for x in cfg["advert-site-ids"]),
                signed_survivors=tuple(int(x) for x in cfg["signed-survivors"]),
                signed_dropped=tuple(int(x) for x in cfg["signed-dropped"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SecAggMessageError(f"stored secagg client state is malformed: {e!r}") from e
        if state.phase not in _PHASES:
            raise SecAggMessageError(f"stored secagg client state has unknown phase {state.phase!r}")
        return state


class SecAggClient:
    """One site's side of a secure-aggregation round; see the module docstring for the stages."""

    def __init__(
        self,
        *,
        node_id: int,
        site_id: str,
        identity_key: Ed25519PrivateKey,
        roster: Roster,
        state: ClientRoundState | None = None,
        policy: ClientPolicy | None = None,
    ) -> None:
        own = roster.public_key(site_id)
        if public_key_hex(own) != public_key_hex(identity_key.public_key()):
            raise IdentityError(f"the roster's key for site {site_id!r} is not this site's identity key")
        self.node_id = node_id
        self.site_id = site_id
        self._identity_key = identity_key
        self._roster = roster
        self.state = state
        self.policy = policy if policy is not None else ClientPolicy()

    # --- helpers ---------------------------------------------------------------------------------

    def _expect(self, phase: str, run_id: str, server_round: int) -> ClientRoundState:
        state = self.state
        if state is None:
            raise SecAggProtocolError(f"node {self.node_id}: no secagg round in progress (expected {phase!r})")
        p = state.params
        if (run_id, server_round) != (p.run_id, p.server_round):
            raise SecAggProtocolError(
                f"node {self.node_id}: message for run {run_id!r} round {server_round} replayed into "
                f"run {p.run_id!r} round {p.server_round}"
            )
        if state.phase != phase:
            raise SecAggProtocolError(
                f"node {self.node_id}: stage out of order: in phase {state.phase!r}, expected {phase!r}"
            )
        return state

    # --- stage 1 ---------------------------------------------------------------------------------

    def advertise_keys(self, params: RoundParams) -> KeyAdvert:
        """Fresh round keys and seed, signed over the round parameters."""
        if self.node_id not in params.node_ids:
            raise SecAggProtocolError(f"node {self.node_id} is not among the round's sampled nodes")
        least_degree = effective_degree(len(params.node_ids), default_degree(len(params.node_ids)))
        if params.degree < least_degree:
            raise SecAggProtocolError(
                f"node {self.node_id}: degree {params.degree} is below {least_degree}, the least this site accepts "
                f"for a round of {len(params.node_ids)} (2 * ceil(log2 n): fewer neighbours, fewer colluders needed)"
            )
        floor = threshold_floor(params.degree + 1, self.policy.threshold_fraction)
        if params.threshold < floor:
            raise SecAggProtocolError(
                f"node {self.node_id}: threshold t = {params.threshold} is below this site's floor {floor} "
                f"(ceil({self.policy.threshold_fraction:.4g} * m) for m = degree + 1 = {params.degree + 1})"
            )
        if params.dp_shares and params.dp_shares < self.policy.min_survivors:
            raise SecAggProtocolError(
                f"node {self.node_id}: the round splits its distributed DP noise into {params.dp_shares} shares, "
                f"fewer than the {self.policy.min_survivors} survivors this site relies on (its min-survivors); "
                f"{len(params.node_ids)} sites were sampled"
            )
        if len(params.node_ids) < self.policy.min_cohort:
            raise SecAggProtocolError(
                f"node {self.node_id}: a round of {len(params.node_ids)} sampled nodes is below this site's "
                f"minimum cohort of {self.policy.min_cohort}"
            )
        last = self.state
        if last is not None and last.params.run_id == params.run_id and params.server_round <= last.params.server_round:
            raise SecAggProtocolError(
                f"node {self.node_id}: round {params.server_round} of run {params.run_id!r} is not after "
                f"the last round it set up ({last.params.server_round}); refusing a replayed round"
            )
        mask_private, mask_public = generate_x25519()
        enc_private, enc_public = generate_x25519()
        seed = random_bytes(KEY_BYTES)
        commitment = seed_commitment(seed)
        payload = KeyAdvert.signed_payload(
            params.digest, self.node_id, self.site_id, mask_public, enc_public, commitment
        )
        advert = KeyAdvert(
            node_id=self.node_id,
            site_id=self.site_id,
            mask_public_key=mask_public,
            enc_public_key=enc_public,
            seed_commitment=commitment,
            signature=sign(self._identity_key, payload),
        )
        self.state = ClientRoundState(
            phase=PHASE_ADVERTISED,
            params=params,
            mask_private=mask_private,
            enc_private=enc_private,
            seed=seed,
            mask_public=mask_public,
            enc_public=enc_public,
        )
        return advert

    # --- stage 2 ---------------------------------------------------------------------------------

    def _check_adverts(self, state: ClientRoundState, adverts: tuple[KeyAdvert, ...]) -> None:
        """Every advert of the round: a sampled node, signed by its roster site, no duplicates, ours intact."""
        p = state.params
        seen_nodes: set[int] = set()
        seen_sites: set[str] = set()
        seen_keys: set[bytes] = set()
        own = False
        for a in adverts:
            if a.node_id not in p.node_ids:
                raise SecAggProtocolError(f"node {self.node_id}: relayed advert of node {a.node_id}, not sampled")
            if a.node_id in seen_nodes or a.site_id in seen_sites:
                raise SecAggProtocolError(
                    f"node {self.node_id}: node {a.node_id} / site {a.site_id!r} appears twice in the round"
                )
            if a.node_id == self.node_id:
                if (a.site_id, a.mask_public_key, a.enc_public_key, a.seed_commitment) != (
                    self.site_id,
                    state.mask_public,
                    state.enc_public,
                    seed_commitment(state.seed),
                ):
                    raise SecAggProtocolError(f"node {self.node_id}: the advert relayed for it is not its own")
                own = True
            elif a.site_id == self.site_id:
                raise SecAggProtocolError(f"node {self.node_id}: node {a.node_id} claims this site's id")
            try:
                identity = self._roster.public_key(a.site_id)
            except IdentityError as e:
                raise SecAggProtocolError(f"node {self.node_id}: advert of node {a.node_id}: {e}") from e
            try:
                verify(identity, a.signature, a.payload(p.digest))
            except CryptoError as e:
                raise SecAggProtocolError(
                    f"node {self.node_id}: the keys relayed for node {a.node_id} (site {a.site_id!r}) "
                    f"are not signed by that site for run {p.run_id!r} round {p.server_round}: {e}"
                ) from e
            if len(a.mask_public_key) != KEY_BYTES or len(a.enc_public_key) != KEY_BYTES:
                raise SecAggProtocolError(f"node {self.node_id}: node {a.node_id}'s public keys must be 32 bytes")
            if {a.mask_public_key, a.enc_public_key} & seen_keys or a.mask_public_key == a.enc_public_key:
                raise SecAggProtocolError(f"node {self.node_id}: node {a.node_id} reuses a public key in the round")
            seen_nodes.add(a.node_id)
            seen_sites.add(a.site_id)
            seen_keys |= {a.mask_public_key, a.enc_public_key}
        if not own:
            raise SecAggProtocolError(f"node {self.node_id}: its own advert is missing from the round's advert set")
        need = max(self.policy.min_cohort, p.threshold + 1)
        if len(adverts) < need:
            raise SecAggProtocolError(
                f"node {self.node_id}: the round's advert set has {len(adverts)} distinct roster sites; this site "
                f"needs at least {need} (its minimum cohort {self.policy.min_cohort}, and threshold "
                f"{p.threshold} + 1)"
            )

    def share_keys(self, request: ShareKeysRequest) -> EncryptedShares:
        """Verify the round's signed adverts, derive the graph, send each neighbour its encrypted shares."""
        state = self._expect(PHASE_ADVERTISED, request.run_id, request.server_round)
        p = state.params
        adverts = tuple(sorted(request.adverts, key=lambda a: a.node_id))
        self._check_adverts(state, adverts)
        advert_digest = p.advert_digest(adverts)
        mine = p.neighbours([a.node_id for a in adverts], advert_digest)[self.node_id]
        neighbours = tuple(a for a in adverts if a.node_id in mine)
        if len(neighbours) < p.threshold:
            raise SecAggProtocolError(
                f"node {self.node_id}: only {len(neighbours)} neighbours in the round's graph; a threshold of "
                f"{p.threshold} needs at least {p.threshold}"
            )
        holders = [a.node_id for a in neighbours] + [self.node_id]
        xs = [p.share_x(h) for h in holders]
        seed_shares = shamir.split(state.seed, threshold=p.threshold, xs=xs)
        key_shares = shamir.split(state.mask_private, threshold=p.threshold, xs=xs)
        ciphertexts = []
        for a in neighbours:
            x = p.share_x(a.node_id)
            key = masks.share_key(
                state.enc_private, a.enc_public_key, params_digest=p.digest, u=self.node_id, v=a.node_id
            )
            ad = masks.share_associated_data(
                params_digest=p.digest, advert_digest=advert_digest, src=self.node_id, dst=a.node_id
            )
            plaintext = _pack_shares(seed_shares[x].to_bytes(), key_shares[x].to_bytes())
            ciphertexts.append(encrypt(key, plaintext, associated_data=ad))
        own_x = p.share_x(self.node_id)
        self.state = replace(
            state,
            phase=PHASE_SHARED,
            neighbour_ids=tuple(a.node_id for a in neighbours),
            neighbour_mask_keys=tuple(a.mask_public_key for a in neighbours),
            neighbour_enc_keys=tuple(a.enc_public_key for a in neighbours),
            own_seed_share=seed_shares[own_x].to_bytes(),
            own_key_share=key_shares[own_x].to_bytes(),
            advert_digest=advert_digest,
            advert_node_ids=tuple(a.node_id for a in adverts),
            advert_site_ids=tuple(a.site_id for a in adverts),
        )
        return EncryptedShares(
            node_id=self.node_id,
            dst_node_ids=tuple(a.node_id for a in neighbours),
            ciphertexts=tuple(ciphertexts),
        )

    # --- stage 3 ---------------------------------------------------------------------------------

    def receive_shares(self, request: MaskedInputRequest) -> None:
        """Decrypt and keep the shares neighbours sent us; they fix the set of pairwise masks."""
        state = self._expect(PHASE_SHARED, request.run_id, request.server_round)
        p = state.params
        if not 0.0 < request.weight <= p.max_weight:
            raise SecAggProtocolError(
                f"node {self.node_id}: weight must be in (0, max_weight = {p.max_weight}], got {request.weight}"
            )
        enc_keys = dict(zip(state.neighbour_ids, state.neighbour_enc_keys, strict=True))
        own_x = p.share_x(self.node_id)
        received: dict[int, tuple[bytes, bytes]] = {}
        for src, ct in zip(request.src_node_ids, request.ciphertexts, strict=True):
            if src not in enc_keys:
                raise SecAggProtocolError(
                    f"node {self.node_id}: shares relayed from node {src}, not a verified neighbour"
                )
            key = masks.share_key(state.enc_private, enc_keys[src], params_digest=p.digest, u=self.node_id, v=src)
            ad = masks.share_associated_data(
                params_digest=p.digest, advert_digest=state.advert_digest, src=src, dst=self.node_id
            )
            try:
                seed_raw, key_raw = _unpack_shares(decrypt(key, ct, associated_data=ad))
                seed_share, key_share = shamir.Share.from_bytes(seed_raw), shamir.Share.from_bytes(key_raw)
            except (CryptoError, shamir.ShamirError) as e:
                raise SecAggProtocolError(f"node {self.node_id}: shares from node {src} rejected: {e}") from e
            if (
                seed_share.x != own_x
                or key_share.x != own_x
                or {seed_share.secret_len, key_share.secret_len} != {KEY_BYTES}
            ):
                raise SecAggProtocolError(f"node {self.node_id}: shares from node {src} are not addressed to it")
            received[src] = (seed_raw, key_raw)
        if len(received) < p.threshold:
            raise SecAggProtocolError(
                f"node {self.node_id}: shares arrived from only {len(received)} neighbours; this site masks "
                f"with at least t = {p.threshold}"
            )
        ids = tuple(sorted(received))
        self.state = replace(
            state,
            phase=PHASE_READY,
            peer_ids=ids,
            peer_seed_shares=tuple(received[i][0] for i in ids),
            peer_key_shares=tuple(received[i][1] for i in ids),
            weight=float(request.weight),
        )

    def mask_input(self, update: np.ndarray) -> np.ndarray:
        """The masked ``uint32`` encoding of the clipped, weighted ``update`` (checked against the bound)."""
        state = self._expect(PHASE_READY, *self._current())
        p = state.params
        x = np.asarray(update)
        if x.ndim != 1 or x.size == 0 or not np.issubdtype(x.dtype, np.floating):
            raise EncodingError(f"update must be a non-empty 1-D float vector, got {x.dtype} of shape {x.shape}")
        if not np.all(np.isfinite(x)):
            raise EncodingError("update must be finite, got NaN or inf")
        norm = float(np.linalg.norm(x.astype(np.float64)))
        bound = p.clip_norm * state.weight
        if not norm <= bound * (1.0 + NORM_TOLERANCE):
            raise EncodingError(
                f"update L2 norm {norm:.6g} exceeds clip_norm * weight = {bound:.6g}; clip before masking"
            )
        fp = p.fixed_point()
        rng = np.random.default_rng(int.from_bytes(random_bytes(16), "big"))
        masked = fp.encode(x, rng)
        sizing = p.noise_sizing
        if sizing is not None:  # distributed DP: this site's share of the noise, in the integer domain
            problem = wrap_problem(
                sizing, clip_norm=p.clip_norm, max_weight=p.max_weight, num_nodes=len(p.node_ids), dimension=x.size
            )
            if problem is not None:
                raise EncodingError(f"node {self.node_id}: {problem}")
            masked = add_noise_share(masked, sizing)
        masks.apply(
            masked,
            masks.self_mask(state.seed, params_digest=p.digest, node_id=self.node_id, length=x.size),
            +1,
        )
        mask_keys = dict(zip(state.neighbour_ids, state.neighbour_mask_keys, strict=True))
        for v in state.peer_ids:
            stream = masks.pairwise_mask(
                state.mask_private, mask_keys[v], params_digest=p.digest, u=self.node_id, v=v, length=x.size
            )
            masks.apply(masked, stream, masks.pairwise_sign(self.node_id, v))
        self.state = replace(state, phase=PHASE_MASKED)
        return masked

    def decline(self) -> None:
        """The site declines the round after the keys were shared: it sends no input (counted as dropped)."""
        state = self._expect(PHASE_READY, *self._current())
        self.state = replace(state, phase=PHASE_DECLINED)

    def _current(self) -> tuple[str, int]:
        if self.state is None:
            raise SecAggProtocolError(f"node {self.node_id}: no secagg round in progress")
        return self.state.params.run_id, self.state.params.server_round

    # --- stage 4: consistency check --------------------------------------------------------------

    def _books(self, state: ClientRoundState) -> tuple[dict[int, bytes], dict[int, bytes]]:
        """Seed shares held (the peers it masked with, and itself) and mask-key shares held (the peers)."""
        seed_book = dict(zip(state.peer_ids, state.peer_seed_shares, strict=True))
        seed_book[self.node_id] = state.own_seed_share
        return seed_book, dict(zip(state.peer_ids, state.peer_key_shares, strict=True))

    def _check_sets(self, state: ClientRoundState, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> None:
        """The checks a survivor set must pass before this client signs it, and again before it unmasks."""
        p, me = state.params, self.node_id
        u_set, d_set = set(survivors), set(dropped)
        if u_set & d_set:
            raise SecAggProtocolError(
                f"node {me}: nodes {sorted(u_set & d_set)} are listed as both survivor and dropped"
            )
        if me not in u_set:
            raise SecAggProtocolError(f"node {me}: the survivor set does not list it as a survivor")
        outside = sorted((u_set | d_set) - set(state.advert_node_ids))
        if outside:
            raise SecAggProtocolError(f"node {me}: nodes {outside} are not in the round's advert set")
        quorum = consistency_quorum(len(state.advert_node_ids), p.threshold)
        # distributed DP: every survivor added a 1/M share of the noise; fewer than M survivors: reveal nothing
        noise_floor = max(p.dp_shares, self.policy.min_survivors) if p.dp_shares else 0
        need = max(quorum, self.policy.min_cohort, noise_floor)
        if len(u_set) < need:
            noise = f", distributed DP noise in {p.dp_shares} shares" if p.dp_shares else ""
            raise SecAggProtocolError(
                f"node {me}: a survivor set of {len(u_set)} is below the {need} this site needs (quorum "
                f"{quorum}, minimum cohort {self.policy.min_cohort}{noise})"
            )
        unaccounted = sorted(set(state.peer_ids) - u_set - d_set)
        if unaccounted:
            raise SecAggProtocolError(f"node {me}: the sets do not account for its neighbours {unaccounted}")
        alive = len((set(state.peer_ids) | {me}) & u_set)
        if alive < p.threshold:
            raise SecAggProtocolError(
                f"node {me}: only {alive} of its neighbourhood survived, below the threshold {p.threshold}; "
                "the round must abort"
            )

    def _payload(self, state: ClientRoundState, survivors: tuple[int, ...], dropped: tuple[int, ...]) -> bytes:
        return survivor_set_payload(
            params_digest=state.params.digest,
            advert_digest=state.advert_digest,
            survivors=survivors,
            dropped=dropped,
        )

    def sign_survivors(self, request: ConsistencyRequest) -> SurvivorSignature:
        """Sign the survivor and dropped sets the server says it will unmask; once per round."""
        state = self._expect(PHASE_MASKED, request.run_id, request.server_round)
        self._check_sets(state, request.survivors, request.dropped)
        signature = sign(self._identity_key, self._payload(state, request.survivors, request.dropped))
        self.state = replace(
            state, phase=PHASE_SIGNED, signed_survivors=request.survivors, signed_dropped=request.dropped
        )
        return SurvivorSignature(node_id=self.node_id, signature=signature)

    # --- stage 5: unmask -------------------------------------------------------------------------

    def _check_signatures(self, state: ClientRoundState, request: UnmaskRequest) -> None:
        """At least q valid signatures on the identical (U, D), from distinct nodes of U in the advert set."""
        me = self.node_id
        sites = dict(zip(state.advert_node_ids, state.advert_site_ids, strict=True))
        payload = self._payload(state, request.survivors, request.dropped)
        signers: set[int] = set()
        for nid, signature in zip(request.signer_ids, request.signatures, strict=True):
            if nid in signers or nid not in request.survivors:
                raise SecAggProtocolError(f"node {me}: signature of node {nid} repeated, or not from a survivor")
            try:
                verify(self._roster.public_key(sites[nid]), signature, payload)
            except (CryptoError, IdentityError) as e:
                raise SecAggProtocolError(
                    f"node {me}: the signature relayed for node {nid} is not its site's signature of this "
                    f"survivor set: {e}"
                ) from e
            signers.add(nid)
        quorum = consistency_quorum(len(state.advert_node_ids), state.params.threshold)
        if len(signers) < quorum:
            raise SecAggProtocolError(
                f"node {me}: only {len(signers)} valid signatures on the survivor set, below the quorum {quorum} "
                f"of {len(state.advert_node_ids)} nodes; it reveals nothing"
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Seed shares of survivors, key shares of dropped neighbours: only for the set it signed, only with
        a quorum of signatures on it, once per round, never both kinds for one peer."""
        state = self._expect(PHASE_SIGNED, request.run_id, request.server_round)
        if (request.survivors, request.dropped) != (state.signed_survivors, state.signed_dropped):
            raise SecAggProtocolError(
                f"node {self.node_id}: the unmask request's survivor set is not the one it signed; it reveals nothing"
            )
        self._check_sets(state, request.survivors, request.dropped)
        self._check_signatures(state, request)
        seed_book, key_book = self._books(state)
        alive = sorted(set(request.survivors) & set(seed_book))
        gone = sorted(set(request.dropped) & set(key_book))
        self.state = replace(state, phase=PHASE_UNMASKED)
        return UnmaskShares(
            node_id=self.node_id,
            seed_owner_ids=tuple(alive),
            seed_shares=tuple(seed_book[i] for i in alive),
            key_owner_ids=tuple(gone),
            key_shares=tuple(key_book[i] for i in gone),
        )
