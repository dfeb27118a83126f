"""The server side of SecAgg+ as a pure state machine (no Flower inside): relay, sum, unmask.

The server never holds one client's unmasked vector, by construction:

- the only vector it keeps is ``_masked_sum``; :meth:`SecAggServer.add_masked_input` adds a masked vector
  into it and keeps nothing else of it;
- :meth:`SecAggServer.receive_unmask_shares` only *subtracts* mask streams (PRG outputs of reconstructed
  seeds and keys) from that sum, after every reconstruction has succeeded, and only when at least
  ``threshold >= 2`` inputs are in it and every survivor still has a surviving neighbour whose pairwise mask
  the server cannot rebuild;
- the one decoded vector it ever returns is the total, from :meth:`SecAggServer.result`.

``tests/test_secagg_server_structure.py`` checks this on the source and on a live round.

Every client gets the round's whole advert set and derives the neighbour graph from its digest; after the
masked inputs, the server announces one survivor set U and dropped set D, collects the survivors' signatures
on them (the consistency check) and relays them with the unmask request: clients reveal nothing without a
quorum of signatures on the identical sets (see ``shared/secagg/client.py``).

Dropouts: a client missing from a stage's replies is dropped from then on. A round aborts (raising
:class:`SecAggAbort`, revealing nothing) as soon as some client has fewer than ``threshold`` neighbours
left, fewer than the quorum signed the survivor set, or the unmask replies are too few to rebuild a secret.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NoReturn

import numpy as np

from shared.identity import IdentityError, Roster
from shared.secagg import masks, shamir
from shared.secagg.client import seed_commitment
from shared.secagg.crypto import CryptoError, verify, x25519_public
from shared.secagg.errors import SecAggAbort, SecAggMessageError, SecAggProtocolError
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
from shared.secagg.settings import consistency_quorum

logger = logging.getLogger(__name__)

_STAGES = ("adverts", "shares", "inputs", "signatures", "unmask", "done")


@dataclass(frozen=True)
class SecAggResult:
    """The decoded sum of the survivors' inputs and who took part."""

    total: np.ndarray  # float64
    total_weight: float
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    declined: tuple[int, ...]
    resolution: float  # one fixed-point unit; the total is within len(survivors) * resolution per coordinate


class SecAggServer:
    """One secure-aggregation round on the server; the workflow feeds it each stage's replies."""

    def __init__(self, params: RoundParams, *, roster: Roster | None = None) -> None:
        self.params = params
        self._roster = roster
        self._graph: dict[int, frozenset[int]] = {}  # over the advert set, once it is known
        self._advert_digest = b""
        self._quorum = 0
        self._signatures: dict[int, bytes] = {}  # survivor -> its signature of (U, D)
        self._stage = "adverts"
        self._active: set[int] = set(params.node_ids)  # still in the round
        self._abort_reason: str | None = None
        self._adverts: dict[int, KeyAdvert] = {}
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # destination -> source -> ciphertext
        self._masked_with: dict[int, frozenset[int]] = {}  # the pairwise masks each client applied
        self._weights: dict[int, float] = {}
        self._survivors: list[int] = []
        self._declined: list[int] = []
        self._dim: int | None = None
        self._masked_sum: np.ndarray | None = None  # the ONLY vector held: a sum of masked inputs
        self._result: SecAggResult | None = None

    # --- bookkeeping -----------------------------------------------------------------------------

    @property
    def aborted(self) -> bool:
        return self._abort_reason is not None

    @property
    def abort_reason(self) -> str | None:
        return self._abort_reason

    @property
    def survivors(self) -> tuple[int, ...]:
        return tuple(sorted(self._survivors))

    @property
    def declined(self) -> tuple[int, ...]:
        return tuple(sorted(self._declined))

    @property
    def dropped(self) -> tuple[int, ...]:
        """Sampled nodes that left the round so far (declined ones are listed apart)."""
        return tuple(n for n in self.params.node_ids if n not in self._active and n not in self._declined)

    def _enter(self, stage: str) -> None:
        if self.aborted:
            raise SecAggAbort(f"round {self.params.server_round} was aborted: {self._abort_reason}")
        if self._stage != stage:
            raise SecAggProtocolError(f"server stage out of order: at {self._stage!r}, called for {stage!r}")

    def _abort(self, reason: str) -> NoReturn:
        self._abort_reason = reason
        self._masked_sum = None
        raise SecAggAbort(f"round {self.params.server_round} aborted: {reason}")

    def _check_neighbourhoods(self, alive: set[int], stage: str) -> None:
        """Every client masks with at least ``t`` neighbours' shares (it refuses fewer)."""
        t = self.params.threshold
        for u in sorted(alive):
            left = len(self._graph[u] & alive)
            if left < t:
                self._abort(f"after {stage}, node {u} has {left} neighbours left, below threshold {t}")

    # --- stage 1 ---------------------------------------------------------------------------------

    def advertise_request(self) -> RoundParams:
        return self.params

    def receive_adverts(self, adverts: Mapping[int, KeyAdvert]) -> None:
        """Keep the valid adverts (sender = node id; signature checked when the server has the roster)."""
        self._enter("adverts")
        valid: dict[int, KeyAdvert] = {}
        sites: set[str] = set()
        for nid, a in sorted(adverts.items()):
            problem = self._advert_problem(nid, a, sites)
            if problem:
                logger.warning("secagg round %s: advert of node %s dropped: %s", self.params.server_round, nid, problem)
                continue
            valid[nid] = a
            sites.add(a.site_id)
        self._adverts = valid
        self._active = set(valid)
        self._stage = "shares"
        if len(valid) < 2:
            self._abort(f"only {len(valid)} valid key adverts")
        self._advert_digest = self.params.advert_digest(valid.values())
        self._graph = self.params.neighbours(valid, self._advert_digest)
        self._quorum = consistency_quorum(len(valid), self.params.threshold)
        self._check_neighbourhoods(set(valid), "advertise-keys")

    def _advert_problem(self, nid: int, a: KeyAdvert, sites: set[str]) -> str | None:
        if nid not in self.params.node_ids:
            return "not a sampled node"
        if a.node_id != nid:
            return f"advert names node {a.node_id}"
        if a.site_id in sites:
            return f"site {a.site_id!r} already advertised by another node"
        if self._roster is not None:
            try:
                verify(self._roster.public_key(a.site_id), a.signature, a.payload(self.params.digest))
            except (IdentityError, CryptoError) as e:
                return str(e)
        return None

    @property
    def advert_digest(self) -> bytes:
        """The digest of the round's advert set (empty before the adverts are in)."""
        return self._advert_digest

    def ring(self) -> list[int]:
        """The ring order of the round's neighbour graph (after the adverts: it is seeded by their digest)."""
        if not self._advert_digest:
            raise SecAggProtocolError("the neighbour graph is only known once the adverts are in")
        return self.params.ring(self._adverts, self._advert_digest)

    def site_ids(self) -> dict[int, str]:
        """Node id -> the site id it advertised (signed)."""
        return {nid: a.site_id for nid, a in self._adverts.items()}

    # --- stage 2 ---------------------------------------------------------------------------------

    def share_keys_requests(self) -> dict[int, ShareKeysRequest]:
        self._enter("shares")
        p = self.params
        everyone = tuple(self._adverts[v] for v in sorted(self._adverts))
        return {
            u: ShareKeysRequest(run_id=p.run_id, server_round=p.server_round, adverts=everyone)
            for u in sorted(self._adverts)
        }

    def receive_encrypted_shares(self, replies: Mapping[int, EncryptedShares]) -> None:
        """Keep the replies that address exactly the relayed neighbours; route their ciphertexts."""
        self._enter("shares")
        alive = set(self._adverts)
        routed: dict[int, dict[int, bytes]] = {}
        senders: set[int] = set()
        for nid, r in sorted(replies.items()):
            expected = self._graph.get(nid, frozenset()) & alive
            if nid not in alive or r.node_id != nid or set(r.dst_node_ids) != expected:
                logger.warning(
                    "secagg round %s: shares of node %s dropped: wrong sender or destinations",
                    self.params.server_round,
                    nid,
                )
                continue
            senders.add(nid)
            for dst, ct in zip(r.dst_node_ids, r.ciphertexts, strict=True):
                routed.setdefault(dst, {})[nid] = ct
        self._ciphertexts = {u: {v: ct for v, ct in routed.get(u, {}).items() if v in senders} for u in senders}
        self._stage = "inputs"
        self._masked_with = {u: frozenset(self._ciphertexts[u]) for u in senders}
        self._active = set(senders)
        self._check_neighbourhoods(senders, "share-keys")

    # --- stage 3 ---------------------------------------------------------------------------------

    def masked_input_requests(self, weights: Mapping[int, float] | None = None) -> dict[int, MaskedInputRequest]:
        """Each client's incoming ciphertexts and its weight (1.0 unless given; at most ``max_weight``)."""
        self._enter("inputs")
        p = self.params
        out = {}
        for u in sorted(self._masked_with):
            w = 1.0 if weights is None else weights.get(u, 1.0)
            if (
                isinstance(w, bool)
                or not isinstance(w, (int, float))
                or not (math.isfinite(w) and 0 < w <= p.max_weight)
            ):
                raise ValueError(f"weight of node {u} must be in (0, max_weight = {p.max_weight}], got {w!r}")
            self._weights[u] = float(w)
            srcs = sorted(self._ciphertexts[u])
            out[u] = MaskedInputRequest(
                run_id=p.run_id,
                server_round=p.server_round,
                src_node_ids=tuple(srcs),
                ciphertexts=tuple(self._ciphertexts[u][v] for v in srcs),
                weight=float(w),
            )
        return out

    def add_masked_input(self, node_id: int, masked: np.ndarray) -> None:
        """Add one client's masked vector into the running sum; nothing else of it is kept."""
        self._enter("inputs")
        if node_id not in self._masked_with:
            raise SecAggMessageError(f"masked input from node {node_id}, which is not in this stage")
        if node_id in self._survivors or node_id in self._declined:
            raise SecAggMessageError(f"second masked input (or input after declining) from node {node_id}")
        if not isinstance(masked, np.ndarray) or masked.dtype != np.uint32 or masked.ndim != 1 or masked.size == 0:
            raise SecAggMessageError(
                f"masked input of node {node_id} must be a non-empty 1-D uint32 array, got "
                f"{getattr(masked, 'dtype', type(masked).__name__)} of shape {getattr(masked, 'shape', None)}"
            )
        if self._dim is not None and masked.size != self._dim:
            raise SecAggMessageError(f"masked input of node {node_id} has length {masked.size}, expected {self._dim}")
        if self._masked_sum is None:
            self._dim = masked.size
            self._masked_sum = np.zeros(masked.size, dtype=np.uint32)
        np.add(self._masked_sum, masked, out=self._masked_sum)
        self._survivors.append(node_id)

    def mark_declined(self, node_id: int) -> None:
        """The client declined after the keys were shared: no input; its mask key will be rebuilt."""
        self._enter("inputs")
        if node_id not in self._masked_with or node_id in self._survivors or node_id in self._declined:
            raise SecAggMessageError(f"node {node_id} cannot decline now")
        self._declined.append(node_id)
        self._active.discard(node_id)

    # --- stage 4: consistency check --------------------------------------------------------------

    def _gone(self) -> set[int]:
        """Clients that applied pairwise masks but whose input is not in the sum."""
        return set(self._masked_with) - set(self._survivors)

    def consistency_requests(self) -> dict[int, ConsistencyRequest]:
        """Close input collection; abort unless the round can be unmasked safely; else ask every survivor to
        sign the one survivor set U and dropped set D."""
        self._enter("inputs")
        self._stage = "signatures"
        p, alive, gone = self.params, set(self._survivors), self._gone()
        self._active = set(alive)
        if len(alive) < max(2, p.threshold, self._quorum):
            self._abort(
                f"only {len(alive)} masked inputs arrived, below threshold {p.threshold} or quorum {self._quorum}"
            )
        for u in sorted(alive):
            left = len(self._masked_with[u] & alive) + 1
            if left < p.threshold:
                self._abort(f"node {u}'s neighbourhood has {left} survivors, below threshold {p.threshold}")
        for v in sorted(gone):
            holders = len(self._masked_with[v] & alive)
            if holders < p.threshold:
                self._abort(f"dropped node {v} has {holders} surviving neighbours, below threshold {p.threshold}")
        u_set, d_set = tuple(sorted(alive)), tuple(sorted(gone))
        return {
            u: ConsistencyRequest(run_id=p.run_id, server_round=p.server_round, survivors=u_set, dropped=d_set)
            for u in u_set
        }

    def receive_signatures(self, replies: Mapping[int, SurvivorSignature]) -> None:
        """Keep the survivors' valid signatures of (U, D); abort below the quorum."""
        self._enter("signatures")
        p = self.params
        payload = survivor_set_payload(
            params_digest=p.digest,
            advert_digest=self._advert_digest,
            survivors=self._survivors,
            dropped=self._gone(),
        )
        valid: dict[int, bytes] = {}
        for nid, r in sorted(replies.items()):
            problem = None
            if nid not in self._survivors or r.node_id != nid:
                problem = "not a survivor, or naming another node"
            elif self._roster is not None:
                try:
                    verify(self._roster.public_key(self._adverts[nid].site_id), r.signature, payload)
                except (IdentityError, CryptoError) as e:
                    problem = str(e)
            if problem:
                logger.warning("secagg round %s: signature of node %s dropped: %s", p.server_round, nid, problem)
                continue
            valid[nid] = r.signature
        self._signatures = valid
        self._stage = "unmask"
        if len(valid) < self._quorum:
            self._abort(f"only {len(valid)} survivors signed the survivor set, below the quorum {self._quorum}")

    # --- stage 5: unmask -------------------------------------------------------------------------

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """The signed sets and the signatures, to every survivor that signed."""
        self._enter("unmask")
        p = self.params
        signers = tuple(sorted(self._signatures))
        request = UnmaskRequest(
            run_id=p.run_id,
            server_round=p.server_round,
            survivors=tuple(sorted(self._survivors)),
            dropped=tuple(sorted(self._gone())),
            signer_ids=signers,
            signatures=tuple(self._signatures[n] for n in signers),
        )
        return dict.fromkeys(signers, request)

    def receive_unmask_shares(self, replies: Mapping[int, UnmaskShares]) -> None:
        """Rebuild each survivor's seed and each dropped client's mask key, then strip the masks."""
        self._enter("unmask")
        p, alive, gone = self.params, set(self._survivors), self._gone()
        seed_shares: dict[int, list[shamir.Share]] = {u: [] for u in alive}
        key_shares: dict[int, list[shamir.Share]] = {v: [] for v in gone}
        for nid, r in sorted(replies.items()):
            try:
                parsed = self._parse_unmask_reply(nid, r, alive, gone)
            except (SecAggMessageError, shamir.ShamirError) as e:
                logger.warning("secagg round %s: unmask reply of node %s ignored: %s", p.server_round, nid, e)
                continue
            for owner, share in parsed[0]:
                seed_shares[owner].append(share)
            for owner, share in parsed[1]:
                key_shares[owner].append(share)

        seeds: dict[int, bytes] = {}
        for u in sorted(alive):
            seeds[u] = self._rebuild(seed_shares[u], f"self-mask seed of node {u}")
            if seed_commitment(seeds[u]) != self._adverts[u].seed_commitment:
                self._abort(f"the rebuilt self-mask seed of node {u} does not match its signed commitment")
        mask_keys: dict[int, bytes] = {}
        for v in sorted(gone):
            mask_keys[v] = self._rebuild(key_shares[v], f"mask key of dropped node {v}")
            if x25519_public(mask_keys[v]) != self._adverts[v].mask_public_key:
                self._abort(f"the rebuilt mask key of node {v} does not match its signed public key")

        # Every secret is back: only now touch the sum, and only by subtracting mask streams.
        assert self._masked_sum is not None
        total, dim = self._masked_sum, self._masked_sum.size
        for u in sorted(alive):
            masks.apply(total, masks.self_mask(seeds[u], params_digest=p.digest, node_id=u, length=dim), -1)
        for v in sorted(gone):
            for u in sorted(self._masked_with[v] & alive):
                stream = masks.pairwise_mask(
                    mask_keys[v],
                    self._adverts[u].mask_public_key,
                    params_digest=p.digest,
                    u=u,
                    v=v,
                    length=dim,
                )
                masks.apply(total, stream, -masks.pairwise_sign(u, v))  # undo what u applied
        fp = p.fixed_point()
        self._result = SecAggResult(
            total=fp.decode_sum(total, count=len(alive)),
            total_weight=float(sum(self._weights[u] for u in alive)),
            survivors=self.survivors,
            dropped=self.dropped,
            declined=self.declined,
            resolution=fp.resolution,
        )
        self._masked_sum = None
        self._stage = "done"

    def _parse_unmask_reply(
        self, nid: int, r: UnmaskShares, alive: set[int], gone: set[int]
    ) -> tuple[list[tuple[int, shamir.Share]], list[tuple[int, shamir.Share]]]:
        if nid not in alive or r.node_id != nid:
            raise SecAggMessageError(f"unmask reply from node {nid}, not a survivor (or naming node {r.node_id})")
        book = self._masked_with[nid]
        x = self.params.share_x(nid)
        seeds, keys = [], []
        for owner, raw in zip(r.seed_owner_ids, r.seed_shares, strict=True):
            if owner not in (book | {nid}) & alive:
                raise SecAggMessageError(f"seed share of node {owner}, which node {nid} holds no survivor share of")
            seeds.append((owner, shamir.Share.from_bytes(raw)))
        for owner, raw in zip(r.key_owner_ids, r.key_shares, strict=True):
            if owner not in book & gone:
                raise SecAggMessageError(f"mask-key share of node {owner}, which is not a dropped neighbour of {nid}")
            keys.append((owner, shamir.Share.from_bytes(raw)))
        if any(s.x != x for _, s in seeds + keys):
            raise SecAggMessageError(f"node {nid} sent shares with an x-coordinate other than its own ({x})")
        return seeds, keys

    def _rebuild(self, shares: list[shamir.Share], what: str) -> bytes:
        t = self.params.threshold
        if len(shares) < t:
            self._abort(f"only {len(shares)} shares of the {what} arrived, below threshold {t}")
        try:
            return shamir.combine(shares, threshold=t)
        except shamir.ShamirError as e:
            self._abort(f"the {what} cannot be rebuilt: {e}")

    def result(self) -> SecAggResult:
        """The decoded total; only after a completed unmask stage."""
        if self.aborted:
            raise SecAggAbort(f"round {self.params.server_round} was aborted: {self._abort_reason}")
        if self._result is None:
            raise SecAggProtocolError(f"the round is at stage {self._stage!r}; no result before unmasking")
        return self._result
