"""A malicious coordinator attacks the first roster approval (issue 21, part 3), through the real enrolment
commands and the real secure-aggregation mod.

The coordinator writes every roster. Each site checks only its own entry, so at the first approval the
coordinator can enrol identities of its own (sybils) or show one site a roster in which that site's partners
hold the coordinator's keys. With two such identities in a secure round of three, the "sum" the server unmasks
is the target's update plus values the server chose. Here the coordinator provisions with the real
``provision``, each operator approves with the real ``privatune site approve-roster`` at a terminal, on a call
with the other operators, and the coordinator then runs the first two stages of a secure round against the
target's real mod with its own identities as the target's neighbours: the target sending them its encrypted
shares is the attack taking hold.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.secagg_mod import make_secagg_mod
from shared.cli import main as cli_main
from shared.enrolment import SiteKeys, init_site
from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, ROSTER_PIN_FILE, Roster, load_private_key
from shared.provision import NODE_CONFIG_FILE, Federation, provision
from shared.secagg import constants as K
from shared.secagg.client import SecAggClient
from shared.secagg.messages import EncryptedShares, KeyAdvert, RoundParams, ShareKeysRequest
from shared.secagg.settings import SecAggSettings
from shared.site import site_from_node_config

HONEST = ("hospital-a", "clinic-b", "lab-c")
TARGET = "hospital-a"
RUN_ID = 5


class Coordinator:
    """A coordinator that enrols identities of its own, and keeps their private keys."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.keys: dict[str, Ed25519PrivateKey] = {}

    def own_request(self, site_id: str) -> Path:
        made = init_site(site_id, self.root / "own" / site_id)
        self.keys[site_id] = load_private_key(made.site_dir / IDENTITY_KEY_FILE)
        return made.request_path

    def provision(self, name: str, requests: list[Path]) -> Federation:
        return provision(self.root / name, requests, superlink_hosts=["link.example.org"])


@pytest.fixture()
def sites(tmp_path: Path) -> dict[str, SiteKeys]:
    """Three real sites, each with its own keys (``privatune site init``)."""
    return {s: init_site(s, tmp_path / "sites" / s) for s in HONEST}


def _shown_code(site: SiteKeys, bundle: Path, capsys: pytest.CaptureFixture[str]) -> str | None:
    """The roster code that this site's operator reads out on the call: what ``approve-roster`` shows it."""
    cli_main(["site", "approve-roster", "--site-dir", str(site.site_dir), str(bundle)])  # stdin is not a terminal
    found = re.search(r"roster code: ([0-9 ]+)", capsys.readouterr().out)
    return found.group(1).strip() if found else None


def _operator_approves(
    site: SiteKeys,
    bundle: Path,
    read_out: Mapping[str, str | None],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> tuple[int, str]:
    """``approve-roster`` at the terminal. Asked about another site, the operator answers yes only if that site's
    operator read out the same code as its own tool shows (``read_out``: what each site's operator read on the
    call, None for a site nobody spoke for); every other question, yes."""
    mine = read_out[site.request.site_id]
    monkeypatch.setattr("sys.stdin.isatty", lambda: True)

    def answer(prompt: str) -> str:
        for other in sorted(set(read_out) - {site.request.site_id}, key=len, reverse=True):
            if other in prompt:
                return "yes" if mine is not None and read_out[other] == mine else "no"
        return "yes"

    monkeypatch.setattr("builtins.input", answer)
    rc = cli_main(["site", "approve-roster", "--site-dir", str(site.site_dir), str(bundle)])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _secure_round(site: SiteKeys, own: Mapping[str, Ed25519PrivateKey], roster: Roster) -> str | None:
    """The coordinator runs a secure round of the target and two identities it holds the keys of, against the
    target's real mod: advertise-keys, then share-keys with the adverts its own identities signed. Returns the
    target's refusal, or None when the target took them as its neighbours and sent them its shares."""
    node_config = tomllib.loads((site.site_dir / NODE_CONFIG_FILE).read_text())
    mod = make_secagg_mod(lambda ctx: site_from_node_config(ctx.node_config, sim_dir=site.site_dir))
    context = Context(run_id=RUN_ID, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    node_ids = {site.request.site_id: 1, **{s: 2 + i for i, s in enumerate(sorted(own))}}
    params = RoundParams.for_round(
        SecAggSettings(clip_norm=1.0, max_clients=10), run_id=str(RUN_ID), server_round=1, node_ids=[*node_ids.values()]
    )

    def send(cfg: dict) -> Message:
        msg = Message(RecordDict({K.SECAGG_RECORD: ConfigRecord(cfg)}), dst_node_id=1, message_type="train")
        return mod(msg, context, lambda m, c: pytest.fail("no training in these stages"))

    reply = send(params.to_config())
    if reply.has_error():
        return reply.error.reason
    adverts = [KeyAdvert.from_config(dict(reply.content.config_records[K.SECAGG_RECORD]))]
    for site_id, key in sorted(own.items()):
        sybil = SecAggClient(node_id=node_ids[site_id], site_id=site_id, identity_key=key, roster=roster)
        adverts.append(sybil.advertise_keys(params))
    reply = send(ShareKeysRequest(run_id=str(RUN_ID), server_round=1, adverts=tuple(adverts)).to_config())
    if reply.has_error():
        return reply.error.reason
    shares = EncryptedShares.from_config(dict(reply.content.config_records[K.SECAGG_RECORD]))
    assert set(shares.dst_node_ids) == {node_ids[s] for s in own}  # its shares, encrypted to the coordinator
    return None


def test_sybils_the_coordinator_enrols_in_every_roster_are_refused_at_the_roll_call(
    sites, tmp_path, monkeypatch, capsys
):
    coordinator = Coordinator(tmp_path / "coordinator")
    requests = [s.request_path for s in sites.values()] + [coordinator.own_request(s) for s in ("lab-x", "lab-y")]
    fed = coordinator.provision("fed", requests)  # one roster for everyone: the honest sites and two of its own
    read_out = {s: _shown_code(sites[s], fed.bundle_dirs[s], capsys) for s in HONEST}
    read_out |= {"lab-x": None, "lab-y": None}  # nobody on the call speaks for them

    rc, out = _operator_approves(sites[TARGET], fed.bundle_dirs[TARGET], read_out, monkeypatch, capsys)
    refusal = _secure_round(sites[TARGET], coordinator.keys, Roster.load(fed.bundle_dirs[TARGET] / ROSTER_FILE))

    assert refusal is not None and "has not approved a roster" in refusal
    assert rc == 1 and "lab-x" in out and "lab-y" in out and "not approved" in out
    assert not (sites[TARGET].site_dir / ROSTER_PIN_FILE).exists()
    assert None not in (codes := {read_out[s] for s in HONEST}) and len(codes) == 1  # one roster: one code


def test_partners_keys_swapped_in_one_sites_roster_show_that_site_another_roster_code(
    sites, tmp_path, monkeypatch, capsys
):
    coordinator = Coordinator(tmp_path / "coordinator")
    honest = coordinator.provision("fed", [s.request_path for s in sites.values()])
    impostors = [coordinator.own_request(s) for s in ("clinic-b", "lab-c")]  # the partners' names, its own keys
    for_target = coordinator.provision("fed-for-target", [sites[TARGET].request_path, *impostors])
    bundles = {TARGET: for_target.bundle_dirs[TARGET], **{s: honest.bundle_dirs[s] for s in ("clinic-b", "lab-c")}}
    read_out = {s: _shown_code(sites[s], bundles[s], capsys) for s in HONEST}

    rc, out = _operator_approves(sites[TARGET], bundles[TARGET], read_out, monkeypatch, capsys)
    refusal = _secure_round(sites[TARGET], coordinator.keys, Roster.load(bundles[TARGET] / ROSTER_FILE))

    assert refusal is not None and "has not approved a roster" in refusal
    assert rc == 1 and "clinic-b" in out and "lab-c" in out and "not approved" in out
    assert read_out["clinic-b"] == read_out["lab-c"] is not None and read_out[TARGET] not in (None, read_out["lab-c"])


def test_a_site_whose_operator_skipped_the_roll_call_refuses_rounds_its_partners_did_not_countersign(
    sites, tmp_path, monkeypatch, capsys
):
    coordinator = Coordinator(tmp_path / "coordinator")
    own = [coordinator.own_request(s) for s in ("lab-x", "lab-y")]
    for_target = coordinator.provision("fed-for-target", [*(s.request_path for s in sites.values()), *own])
    bundle = for_target.bundle_dirs[TARGET]  # only the target is shown the sybils; its operator compares nothing
    hears_what_it_expects = dict.fromkeys((*HONEST, "lab-x", "lab-y"), "any code")  # so it says yes to each

    rc, _ = _operator_approves(sites[TARGET], bundle, hears_what_it_expects, monkeypatch, capsys)
    refusal = _secure_round(sites[TARGET], coordinator.keys, Roster.load(bundle / ROSTER_FILE))

    assert rc == 0  # approved: the operator confirmed every site without hearing anyone
    assert refusal is not None and "countersignature" in refusal
    assert "clinic-b" in refusal and "lab-c" in refusal
