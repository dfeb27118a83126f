"""Identities and the roster a site trusts: simulated sites' keys kept across runs, the roster's fingerprint,
and the pin that makes a site refuse any roster its operator did not approve."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from flwr.app import ConfigRecord, Context, Message, RecordDict

from shared.countersignature import COUNTERSIGNATURES_FILE, Countersignature, write_countersignatures
from shared.identity import (
    IDENTITY_KEY_FILE,
    ROSTER_FILE,
    ROSTER_PIN_FILE,
    IdentityError,
    Roster,
    RosterPin,
    load_pinned_roster,
    load_private_key,
    load_site_roster,
    pin_roster,
    provision_simulation,
    write_private_key,
)
from shared.site import site_from_node_config


def _roster(n: int) -> tuple[Roster, dict[str, Ed25519PrivateKey]]:
    keys = {f"s{i}": Ed25519PrivateKey.generate() for i in range(n)}
    return Roster({s: k.public_key() for s, k in keys.items()}), keys


# --- simulation ---------------------------------------------------------------------------------------------


def test_a_later_run_with_fewer_sites_keeps_every_earlier_site_in_the_roster(tmp_path):
    first = provision_simulation(tmp_path, 3)

    second = provision_simulation(tmp_path, 2)

    on_disk = Roster.load(tmp_path / ROSTER_FILE)
    assert sorted(second.keys) == sorted(on_disk.keys) == ["site-0", "site-1", "site-2"]
    key = load_private_key(tmp_path / "sites" / "site-2" / IDENTITY_KEY_FILE).public_key()
    assert on_disk.public_key("site-2") == key == first.public_key("site-2")


def test_provisioning_again_keeps_the_keys_and_adds_new_sites(tmp_path):
    first = provision_simulation(tmp_path, 2)

    second = provision_simulation(tmp_path, 4)

    assert sorted(second.keys) == ["site-0", "site-1", "site-2", "site-3"]
    assert all(second.public_key(s) == first.public_key(s) for s in first.keys)


def test_a_simulated_site_loads_its_roster_with_no_extra_step(tmp_path):
    provision_simulation(tmp_path, 2)
    grown = provision_simulation(tmp_path, 3)  # the simulation re-pins the grown roster for every site
    site = site_from_node_config({"partition-id": 0, "num-partitions": 3}, sim_dir=tmp_path)

    assert load_site_roster(site).fingerprint() == grown.fingerprint()
    assert RosterPin.load(tmp_path / "sites" / "site-2" / ROSTER_PIN_FILE).fingerprint == grown.fingerprint()


def test_a_simulated_roster_changed_behind_the_simulations_back_is_refused(tmp_path):
    roster = provision_simulation(tmp_path, 2)
    (tmp_path / ROSTER_FILE).write_text(
        Roster({**roster.keys, "site-9": Ed25519PrivateKey.generate().public_key()}).to_json()
    )
    site = site_from_node_config({"partition-id": 0, "num-partitions": 2}, sim_dir=tmp_path)

    with pytest.raises(IdentityError, match="the roster changed"):
        load_site_roster(site)


# --- the roster's fingerprint -------------------------------------------------------------------------------


def test_the_roster_code_is_six_groups_of_five_digits_that_change_with_any_key(tmp_path):
    roster, _ = _roster(3)
    (tmp_path / "compact.json").write_text(json.dumps(dict(reversed(roster.to_obj().items()))))

    code = roster.code()

    assert re.fullmatch(r"\d{5}( \d{5}){5}", code)
    assert Roster.load(tmp_path / "compact.json").code() == code
    assert Roster({**roster.keys, "s1": Ed25519PrivateKey.generate().public_key()}).code() != code
    assert Roster({**roster.keys, "s9": Ed25519PrivateKey.generate().public_key()}).code() != code


def test_the_fingerprint_ignores_layout_and_changes_with_any_key(tmp_path):
    roster, _ = _roster(3)
    (tmp_path / "compact.json").write_text(json.dumps(dict(reversed(roster.to_obj().items()))))

    assert Roster.load(tmp_path / "compact.json").fingerprint() == roster.fingerprint()
    assert (
        Roster({**roster.keys, "s1": Ed25519PrivateKey.generate().public_key()}).fingerprint() != roster.fingerprint()
    )
    assert Roster({k: v for k, v in roster.keys.items() if k != "s2"}).fingerprint() != roster.fingerprint()


_ED25519_SSH = Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()


@pytest.mark.parametrize(
    ("node_auth", "message"),
    [
        ("ssh-ed25519 AAAA", "is not an OpenSSH public key"),
        ("ssh-foo AAAAB3NzaC1mb28=", "is not an OpenSSH public key"),  # a key type cryptography does not know
        (_ED25519_SSH, "must be an EC NIST P-384 key"),
    ],
)
def test_a_roster_entry_with_a_node_auth_key_that_is_not_p384_is_refused(tmp_path, node_auth, message):
    roster, _ = _roster(1)
    (tmp_path / "r.json").write_text(json.dumps({"s0": {"identity": roster.to_obj()["s0"], "node-auth": node_auth}}))

    with pytest.raises(IdentityError, match=f"entry 's0' {message}"):
        Roster.load(tmp_path / "r.json")


def test_a_roster_entry_with_an_unknown_field_is_refused(tmp_path):
    roster, _ = _roster(1)
    (tmp_path / "r.json").write_text(json.dumps({"s0": {"identity": roster.to_obj()["s0"], "extra": "x"}}))

    with pytest.raises(IdentityError, match=r"entry 's0' must have 'identity'.*got keys \['extra', 'identity'\]"):
        Roster.load(tmp_path / "r.json")


# --- the pin ------------------------------------------------------------------------------------------------


@pytest.fixture()
def pinned(tmp_path: Path) -> tuple[Path, Roster]:
    roster, _ = _roster(3)
    (tmp_path / ROSTER_FILE).write_text(roster.to_json())
    pin_roster(tmp_path, "s0", roster)
    return tmp_path, roster


def test_the_approved_roster_loads(pinned):
    site_dir, roster = pinned

    assert (
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0").fingerprint()
        == roster.fingerprint()
    )


def test_an_unpinned_roster_is_refused_with_the_approve_command(tmp_path):
    roster, _ = _roster(2)
    (tmp_path / ROSTER_FILE).write_text(roster.to_json())

    with pytest.raises(
        IdentityError,
        match=rf"site 's0' has not approved a roster .*privatune site approve-roster --site-dir {tmp_path} ",
    ):
        load_pinned_roster(tmp_path / ROSTER_FILE, site_dir=tmp_path, site_id="s0")


def test_a_roster_with_an_added_identity_is_refused_naming_both_fingerprints(pinned):
    site_dir, roster = pinned
    grown = Roster({**roster.keys, "coordinator-own": Ed25519PrivateKey.generate().public_key()})
    (site_dir / ROSTER_FILE).write_text(grown.to_json())

    with pytest.raises(IdentityError) as e:
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0")
    assert f"fingerprint {grown.fingerprint()}, but site 's0' approved {roster.fingerprint()}" in str(e.value)
    assert f"privatune site approve-roster --site-dir {site_dir} {site_dir / ROSTER_FILE}" in str(e.value)


def test_a_roster_with_a_swapped_key_is_refused(pinned):
    site_dir, roster = pinned
    (site_dir / ROSTER_FILE).write_text(
        Roster({**roster.keys, "s1": Ed25519PrivateKey.generate().public_key()}).to_json()
    )

    with pytest.raises(IdentityError, match="the roster changed and is refused until the site's operator checks it"):
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0")


def test_a_newly_approved_roster_loads(pinned):
    site_dir, roster = pinned
    grown = Roster({**roster.keys, "s9": Ed25519PrivateKey.generate().public_key()})
    (site_dir / ROSTER_FILE).write_text(grown.to_json())

    pin_roster(site_dir, "s0", grown)

    assert (
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0").fingerprint() == grown.fingerprint()
    )


def test_another_sites_pin_is_refused(pinned):
    site_dir, _ = pinned

    with pytest.raises(IdentityError, match="roster pin .* belongs to site 's0', not 's1'"):
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s1")


def test_an_altered_pin_is_refused(pinned):
    site_dir, _ = pinned
    raw = json.loads((site_dir / ROSTER_PIN_FILE).read_text())
    raw["fingerprint"] = "0" * 64
    (site_dir / ROSTER_PIN_FILE).write_text(json.dumps(raw))

    with pytest.raises(IdentityError, match="records fingerprint '0000.*it was altered"):
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0")


def test_a_garbled_pin_is_refused(pinned):
    site_dir, _ = pinned
    (site_dir / ROSTER_PIN_FILE).write_text("{}")

    with pytest.raises(IdentityError, match="roster pin .* is malformed"):
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0")


def test_a_pin_whose_confirmed_sites_are_not_a_list_is_refused(pinned):
    site_dir, _ = pinned
    raw = json.loads((site_dir / ROSTER_PIN_FILE).read_text())
    raw["confirmed"] = "s1,s2"
    (site_dir / ROSTER_PIN_FILE).write_text(json.dumps(raw))

    with pytest.raises(IdentityError, match="'confirmed' must be a list of site ids, got 's1,s2'"):
        load_pinned_roster(site_dir / ROSTER_FILE, site_dir=site_dir, site_id="s0")


# --- the roll call and the countersignatures ----------------------------------------------------------------


def _deployed(site_dir: Path, site_id: str = "s0"):  # type: ignore[no-untyped-def]
    node_config = {
        "site-id": site_id,
        "site-dir": str(site_dir),
        "data-path": str(site_dir / "d.csv"),
        "delta": 1e-5,
        "accountant": "prv",
        "labels": "neg,pos",
    }
    return site_from_node_config(node_config, sim_dir=site_dir)


def test_a_pin_without_a_roll_call_is_refused_naming_the_unconfirmed_sites(pinned):
    site_dir, _ = pinned  # pinned as before roll calls existed: no site confirmed

    with pytest.raises(IdentityError, match=r"operator did not confirm \['s1', 's2'\] at the roll call"):
        load_site_roster(_deployed(site_dir))


def test_a_pin_confirming_a_site_not_in_the_roster_is_refused(tmp_path):
    roster, _ = _roster(2)

    with pytest.raises(IdentityError, match=r"confirmed site\(s\) \['s7'\] are not other sites of the roster"):
        pin_roster(tmp_path, "s0", roster, confirmed=("s1", "s7"))


def test_a_roster_whose_partner_countersigned_another_roster_is_refused(tmp_path):
    roster, keys = _roster(3)
    (tmp_path / ROSTER_FILE).write_text(roster.to_json())
    pin_roster(tmp_path, "s0", roster, confirmed=("s1", "s2"))
    shown_to_s2 = Roster({**roster.keys, "s9": Ed25519PrivateKey.generate().public_key()}).fingerprint()
    write_countersignatures(
        tmp_path / COUNTERSIGNATURES_FILE,
        [
            Countersignature.make(site_id="s1", roster_fingerprint=roster.fingerprint(), confirmed=(), key=keys["s1"]),
            Countersignature.make(site_id="s2", roster_fingerprint=shown_to_s2, confirmed=(), key=keys["s2"]),
        ],
    )

    with pytest.raises(IdentityError) as e:
        load_site_roster(_deployed(tmp_path))
    assert f"lacks the countersignature of s2; s2: it countersigned another roster, fingerprint {shown_to_s2}" in str(
        e.value
    )


def test_a_roster_confirmed_and_countersigned_by_every_other_site_loads(tmp_path):
    roster, keys = _roster(3)
    (tmp_path / ROSTER_FILE).write_text(roster.to_json())
    pin_roster(tmp_path, "s0", roster, confirmed=("s1", "s2"))
    write_countersignatures(
        tmp_path / COUNTERSIGNATURES_FILE,
        [
            Countersignature.make(site_id=s, roster_fingerprint=roster.fingerprint(), confirmed=(), key=keys[s])
            for s in keys
        ],
    )

    assert load_site_roster(_deployed(tmp_path)).fingerprint() == roster.fingerprint()


# --- the site's client --------------------------------------------------------------------------------------


def test_the_secure_aggregation_mod_refuses_a_changed_roster(tmp_path):
    """Through the client's real mod: a deployed site whose roster file was replaced refuses the round."""
    from client.secagg_mod import make_secagg_mod
    from shared.secagg import constants as K

    key = Ed25519PrivateKey.generate()
    write_private_key(tmp_path / IDENTITY_KEY_FILE, key)
    approved = Roster({"hospital-a": key.public_key(), "clinic-b": Ed25519PrivateKey.generate().public_key()})
    (tmp_path / ROSTER_FILE).write_text(approved.to_json())
    pin_roster(tmp_path, "hospital-a", approved)
    changed = Roster({**approved.keys, "coordinator-own": Ed25519PrivateKey.generate().public_key()})
    (tmp_path / ROSTER_FILE).write_text(changed.to_json())
    node_config = {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": str(tmp_path / "d.csv"),
        "delta": 1e-5,
        "accountant": "prv",
        "labels": "neg,pos",
    }
    mod = make_secagg_mod(lambda ctx: site_from_node_config(ctx.node_config, sim_dir=tmp_path))
    context = Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})
    content = RecordDict({K.SECAGG_RECORD: ConfigRecord({K.KEY_STAGE: K.STAGE_ADVERTISE_KEYS})})

    reply = mod(Message(content, dst_node_id=7, message_type="train"), context, lambda m, c: pytest.fail("no training"))

    assert reply.has_error()
    assert f"approved {approved.fingerprint()}" in reply.error.reason and "approve-roster" in reply.error.reason
