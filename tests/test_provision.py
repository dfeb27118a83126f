"""Enrolment and provisioning: sites make their own keys and send requests; the coordinator builds the CA, the
SuperLink certificate, the roster and public-only bundles from them; each site approves (pins) the roster; and
the check a site runs before starting its SuperNode."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.app_approval import TRUSTED_ENTITIES_FILE, approve_app, review_app
from shared.cli import main as cli_main
from shared.countersignature import (
    COUNTERSIGNATURE_FILE,
    COUNTERSIGNATURES_FILE,
    Countersignature,
    load_countersignatures,
    write_countersignature,
    write_countersignatures,
)
from shared.enrolment import EnrolmentError, SiteKeys, approve_roster, init_site, review_roster
from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, ROSTER_PIN_FILE, Roster, RosterPin, load_private_key
from shared.provision import (
    CA_CERT,
    CA_KEY,
    CONNECTION_FILE,
    NODE_AUTH_KEY,
    NODE_AUTH_PUB,
    NODE_CONFIG_FILE,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
    Federation,
    ProvisionError,
    check_bundle,
    make_node_auth_key,
    provision,
    supernode_command,
)
from shared.site_request import REQUEST_FILE, SiteRequest
from tests.conftest import write_app

SITE_PRIVATE_FILES = (NODE_AUTH_KEY, IDENTITY_KEY_FILE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _node_auth_key(site_dir: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_ssh_private_key((site_dir / NODE_AUTH_KEY).read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.fixture()
def sites(tmp_path: Path) -> dict[str, SiteKeys]:
    """Two sites, each with its own directory, as ``privatune site init`` leaves them."""
    return {s: init_site(s, tmp_path / "sites" / s) for s in ("hospital-a", "clinic-b")}


@pytest.fixture()
def fed(tmp_path: Path, sites: dict[str, SiteKeys]) -> Federation:
    requests = [k.request_path for k in sites.values()]
    return provision(tmp_path / "fed", requests, superlink_hosts=["link.example.org"], port=9092)


def _approve(site: SiteKeys, bundle: Path) -> RosterPin:
    """The site's operator approves, every other site's operator having read out the same roster code."""
    review = review_roster(site.site_dir, bundle)
    return approve_roster(review, confirmed=review.others)


def _collect(sites: dict[str, SiteKeys], fed: Federation) -> Federation:
    """The coordinator runs provision again with every site's countersignature."""
    countersignatures = [s.site_dir / COUNTERSIGNATURE_FILE for s in sites.values()]
    return provision(
        fed.coordinator_dir.parent, [], superlink_hosts=["link.example.org"], countersignatures=countersignatures
    )


def _ready(sites: dict[str, SiteKeys], fed: Federation) -> Path:
    """What hospital-a does before starting: every site approves the roster, the coordinator collects their
    countersignatures into the bundles, hospital-a installs its bundle's and approves the app; and its data where
    its config says."""
    for site in sites.values():
        _approve(site, fed.bundle_dirs[site.request.site_id])
    site = sites["hospital-a"]
    _approve(site, _collect(sites, fed).bundle_dirs["hospital-a"])
    approve_app(review_app(site.site_dir, write_app(site.site_dir.parent / "app" / "tinyapp")))
    (site.site_dir / "data.csv").write_text('text,label\n"good film",fresh\n')
    return site.site_dir


def _secrets(site_dir: Path) -> list[bytes]:
    """Every encoding of a site's two private keys that could end up in a file."""
    identity = load_private_key(site_dir / IDENTITY_KEY_FILE)
    raw = identity.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    scalar = _node_auth_key(site_dir).private_numbers().private_value.to_bytes(48, "big")
    return [
        (site_dir / IDENTITY_KEY_FILE).read_bytes(),
        (site_dir / NODE_AUTH_KEY).read_bytes(),
        raw,
        raw.hex().encode(),
        scalar,
        scalar.hex().encode(),
    ]


# --- a site's own keys --------------------------------------------------------------------------------------


def test_site_init_makes_0600_private_keys_in_a_0700_directory(sites):
    site_dir = sites["hospital-a"].site_dir

    assert _mode(site_dir) == 0o700
    assert all(_mode(site_dir / name) == 0o600 for name in SITE_PRIVATE_FILES)
    assert isinstance(load_private_key(site_dir / IDENTITY_KEY_FILE), Ed25519PrivateKey)
    assert _node_auth_key(site_dir).curve.name == "secp384r1"


def test_site_request_holds_only_public_keys_and_verifies(sites):
    site = sites["hospital-a"]
    text = site.request_path.read_text()

    request = SiteRequest.load(site.request_path)
    assert request.site_id == "hospital-a" and request.fingerprint() == site.request.fingerprint()
    assert not any(secret in text.encode() for secret in _secrets(site.site_dir))
    assert "PRIVATE" not in text


def test_site_init_again_keeps_the_keys(sites, tmp_path):
    site = sites["hospital-a"]
    before = {n: (site.site_dir / n).read_bytes() for n in SITE_PRIVATE_FILES}

    again = init_site("hospital-a", site.site_dir)

    assert {n: (site.site_dir / n).read_bytes() for n in SITE_PRIVATE_FILES} == before
    assert again.request.fingerprint() == site.request.fingerprint()


def test_site_init_refuses_a_directory_of_another_site(sites):
    with pytest.raises(EnrolmentError, match="already belongs to site 'hospital-a', not 'clinic-b'"):
        init_site("clinic-b", sites["hospital-a"].site_dir)


def test_site_init_refuses_keys_it_did_not_make(tmp_path):
    """A bundle whose keys a coordinator made (as provision did before) is not adopted as the site's own."""
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / NODE_AUTH_KEY).write_bytes(make_node_auth_key()[0])

    with pytest.raises(EnrolmentError, match="holds private keys that site init did not make"):
        init_site("hospital-a", tmp_path / "old")


def test_site_init_refuses_a_bad_site_id(tmp_path):
    with pytest.raises(ValueError, match="site id must be 1-63 letters"):
        init_site("bad id!", tmp_path / "x")


# --- the coordinator's provisioning -------------------------------------------------------------------------


def test_coordinator_files_hold_no_private_key_of_any_site(fed, sites, tmp_path):
    secrets = [s for site in sites.values() for s in _secrets(site.site_dir)]
    files = [p for p in (tmp_path / "fed").rglob("*") if p.is_file()]

    assert files and not [p for p in files if any(s in p.read_bytes() for s in secrets)]
    assert not [p for p in files if p.name in SITE_PRIVATE_FILES]
    holding_private_keys = {
        p.relative_to(tmp_path / "fed").as_posix() for p in files if b"PRIVATE KEY" in p.read_bytes()
    }
    assert holding_private_keys == {"coordinator/ca.key", "coordinator/superlink.key"}


def test_coordinator_private_keys_are_0600_and_bundles_are_public_files_only(fed):
    assert _mode(fed.coordinator_dir / CA_KEY) == _mode(fed.coordinator_dir / SUPERLINK_KEY) == 0o600
    for bundle in fed.bundle_dirs.values():
        assert sorted(p.name for p in bundle.iterdir()) == sorted(
            [CA_CERT, CONNECTION_FILE, ROSTER_FILE, COUNTERSIGNATURES_FILE]
        )


def test_superlink_certificate_is_signed_by_the_ca_for_its_hosts_and_loopback(fed):
    ca = x509.load_pem_x509_certificate((fed.coordinator_dir / CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((fed.coordinator_dir / SUPERLINK_CERT).read_bytes())

    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"link.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_registered_node_key_is_the_sites_own_in_the_form_flower_takes(fed, sites):
    from flwr.cli.supernode.register import try_load_public_key

    registered = try_load_public_key(fed.coordinator_dir / "node-keys" / "hospital-a.pub")

    assert registered == _node_auth_key(sites["hospital-a"].site_dir).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_every_bundle_holds_the_roster_of_every_sites_own_keys(fed, sites):
    roster = Roster.load(fed.coordinator_dir / ROSTER_FILE)

    assert roster.fingerprint() == fed.roster_fingerprint
    assert all(Roster.load(b / ROSTER_FILE).fingerprint() == fed.roster_fingerprint for b in fed.bundle_dirs.values())
    for site_id, site in sites.items():
        assert roster.keys[site_id] == load_private_key(site.site_dir / IDENTITY_KEY_FILE).public_key()
        assert roster.node_auth[site_id] == (site.site_dir / NODE_AUTH_PUB).read_text().strip()
    assert fed.request_fingerprints == {s: k.request.fingerprint() for s, k in sites.items()}


def test_rerun_adds_a_site_keeps_every_key_and_updates_every_roster(fed, sites, tmp_path):
    before = {p: p.read_bytes() for p in fed.coordinator_dir.glob("*.key")}
    lab = init_site("lab-c", tmp_path / "sites" / "lab-c")

    again = provision(tmp_path / "fed", [lab.request_path], superlink_hosts=["link.example.org"])

    assert all(p.read_bytes() == data for p, data in before.items())
    assert sorted(again.bundle_dirs) == ["clinic-b", "hospital-a", "lab-c"]
    assert sorted(Roster.load(again.bundle_dirs["hospital-a"] / ROSTER_FILE).keys) == [
        "clinic-b",
        "hospital-a",
        "lab-c",
    ]
    assert again.roster_fingerprint != fed.roster_fingerprint


def test_the_same_request_again_changes_nothing(fed, sites, tmp_path):
    init_site("hospital-a", sites["hospital-a"].site_dir)  # a fresh request (new signatures) for the same keys

    again = provision(tmp_path / "fed", [sites["hospital-a"].request_path], superlink_hosts=["link.example.org"])

    assert again.roster_fingerprint == fed.roster_fingerprint


def _forged_request(path: Path, **changes: str) -> Path:
    raw = json.loads(path.read_text())
    raw.update(changes)
    forged = path.with_name("forged.json")
    forged.write_text(json.dumps(raw))
    return forged


def test_a_request_with_another_identity_key_is_refused(sites, tmp_path):
    """Whoever does not hold a key cannot enrol it: here clinic-b's public key under hospital-a's signatures."""
    forged = _forged_request(
        sites["hospital-a"].request_path, **{"identity-public-key": sites["clinic-b"].request.identity_public_key}
    )

    with pytest.raises(
        ProvisionError, match=r"forged.json: the identity signature of site 'hospital-a' does not verify"
    ):
        provision(tmp_path / "fed", [forged], superlink_hosts=["h"])


def test_a_request_whose_site_id_was_changed_is_refused(sites, tmp_path):
    forged = _forged_request(sites["hospital-a"].request_path, **{"site-id": "clinic-z"})

    with pytest.raises(ProvisionError, match="the identity signature of site 'clinic-z' does not verify"):
        provision(tmp_path / "fed", [forged], superlink_hosts=["h"])


def test_a_request_with_another_node_auth_key_is_refused(sites, tmp_path):
    _, other = make_node_auth_key()
    forged = _forged_request(sites["hospital-a"].request_path, **{"node-auth-public-key": other.decode().strip()})

    with pytest.raises(ProvisionError, match="the identity signature of site 'hospital-a' does not verify"):
        provision(tmp_path / "fed", [forged], superlink_hosts=["h"])


def test_a_request_whose_node_auth_signature_is_not_the_keys_is_refused(sites, tmp_path):
    forged = _forged_request(
        sites["hospital-a"].request_path, **{"node-auth-signature": sites["clinic-b"].request.node_auth_signature}
    )

    with pytest.raises(ProvisionError, match="the node-auth signature of site 'hospital-a' does not verify"):
        provision(tmp_path / "fed", [forged], superlink_hosts=["h"])


def test_two_requests_for_one_site_are_refused(sites, tmp_path):
    twin = init_site("hospital-a", tmp_path / "elsewhere" / "hospital-a")

    with pytest.raises(ProvisionError, match="two requests for site 'hospital-a': .*hospital-a/site-request.json and"):
        provision(tmp_path / "fed", [sites["hospital-a"].request_path, twin.request_path], superlink_hosts=["h"])


def test_two_sites_with_one_identity_key_are_refused(sites, tmp_path):
    copy = SiteRequest.make(
        "clinic-c",
        identity_key=load_private_key(sites["hospital-a"].site_dir / IDENTITY_KEY_FILE),
        node_auth_key=serialization.load_ssh_private_key(make_node_auth_key()[0], None),  # type: ignore[arg-type]
    )
    (tmp_path / "c.json").write_text(copy.to_json())

    with pytest.raises(ProvisionError, match="sites 'hospital-a' .* and 'clinic-c' .* have the same identity key"):
        provision(tmp_path / "fed", [sites["hospital-a"].request_path, tmp_path / "c.json"], superlink_hosts=["h"])


def test_two_sites_with_one_node_auth_key_are_refused(sites, tmp_path):
    copy = SiteRequest.make(
        "clinic-c",
        identity_key=Ed25519PrivateKey.generate(),
        node_auth_key=_node_auth_key(sites["hospital-a"].site_dir),
    )
    (tmp_path / "c.json").write_text(copy.to_json())

    with pytest.raises(ProvisionError, match="sites 'hospital-a' .* and 'clinic-c' .* have the same node-auth key"):
        provision(tmp_path / "fed", [sites["hospital-a"].request_path, tmp_path / "c.json"], superlink_hosts=["h"])


def test_an_enrolled_site_cannot_be_given_other_keys(fed, tmp_path):
    impostor = init_site("hospital-a", tmp_path / "impostor")

    with pytest.raises(ProvisionError, match="site 'hospital-a' is already enrolled .* with other keys"):
        provision(tmp_path / "fed", [impostor.request_path], superlink_hosts=["link.example.org"])
    assert Roster.load(fed.coordinator_dir / ROSTER_FILE).fingerprint() == fed.roster_fingerprint


def test_a_request_with_a_bad_site_id_is_refused(tmp_path):
    identity, auth = Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP384R1())
    good = SiteRequest.make("a", identity_key=identity, node_auth_key=auth)
    auth_pub = good.node_auth_public_key
    payload = SiteRequest.payload_of("bad id!", good.identity_public_key, auth_pub)
    bad = {
        **good.to_obj(),
        "site-id": "bad id!",
        "identity-signature": identity.sign(payload).hex(),
        "node-auth-signature": auth.sign(payload, ec.ECDSA(hashes.SHA384())).hex(),
    }
    (tmp_path / "bad.json").write_text(json.dumps(bad))

    with pytest.raises(ProvisionError, match=r"bad.json: site id must be 1-63 letters.*got 'bad id!'"):
        provision(tmp_path / "fed", [tmp_path / "bad.json"], superlink_hosts=["h"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "is not valid JSON"),
        ('{"kind": "x"}', "site request lacks"),
        ("[1, 2]", "must be a JSON object"),
    ],
)
def test_a_malformed_request_is_refused(tmp_path, content, message):
    (tmp_path / "r.json").write_text(content)

    with pytest.raises(ProvisionError, match=message):
        provision(tmp_path / "fed", [tmp_path / "r.json"], superlink_hosts=["h"])


def test_nothing_is_written_when_one_request_is_bad(sites, tmp_path):
    forged = _forged_request(sites["clinic-b"].request_path, **{"site-id": "clinic-z"})

    with pytest.raises(ProvisionError):
        provision(tmp_path / "fed", [sites["hospital-a"].request_path, forged], superlink_hosts=["h"])
    assert not (tmp_path / "fed").exists()


@pytest.mark.parametrize(
    ("hosts", "port", "message"),
    [
        (["h"], 70000, "port must be in 1..65535, got 70000"),
        ([], 9092, "at least one host"),
    ],
)
def test_bad_provision_input_is_refused(sites, tmp_path, hosts, port, message):
    with pytest.raises(ProvisionError, match=message):
        provision(tmp_path / "fed", [sites["hospital-a"].request_path], superlink_hosts=hosts, port=port)


def test_provision_without_any_request_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(ProvisionError, match=r"no site request \(\*.json\) in directory"):
        provision(tmp_path / "fed", [tmp_path / "empty"], superlink_hosts=["h"])
    with pytest.raises(ProvisionError, match="at least one site request"):
        provision(tmp_path / "fed", [], superlink_hosts=["h"])


# --- the roster a site approves -----------------------------------------------------------------------------


def test_an_unapproved_roster_is_refused_by_the_site_check(fed, sites):
    site = sites["hospital-a"]
    for name in (ROSTER_FILE, CA_CERT):  # the bundle copied in by hand, not approved
        (site.site_dir / name).write_bytes((fed.bundle_dirs["hospital-a"] / name).read_bytes())
    (site.site_dir / "data.csv").write_text("text,label\n")

    with pytest.raises(ProvisionError, match="site 'hospital-a' has not approved a roster .* approve-roster"):
        check_bundle(site.site_dir)


def test_an_approved_roster_passes_the_site_check(fed, sites):
    site_dir = _ready(sites, fed)

    assert check_bundle(site_dir) == site_dir
    assert RosterPin.load(site_dir / ROSTER_PIN_FILE).fingerprint == fed.roster_fingerprint


def test_a_roster_with_an_added_identity_is_refused_until_approved(fed, sites, tmp_path):
    site_dir = _ready(sites, fed)
    intruder = init_site("coordinator-own", tmp_path / "intruder")  # the coordinator enrols a site of its own
    grown = provision(tmp_path / "fed", [intruder.request_path], superlink_hosts=["link.example.org"])
    (site_dir / ROSTER_FILE).write_bytes((grown.bundle_dirs["hospital-a"] / ROSTER_FILE).read_bytes())

    with pytest.raises(
        ProvisionError,
        match=rf"fingerprint {grown.roster_fingerprint}, but site 'hospital-a' approved {fed.roster_fingerprint}",
    ):
        check_bundle(site_dir)

    review = review_roster(site_dir, grown.bundle_dirs["hospital-a"])
    assert review.changes == ["ADDED coordinator-own"]
    approve_roster(review, confirmed=review.others)  # its operator confirmed the new site too
    with pytest.raises(ProvisionError, match="lacks the countersignature of clinic-b, coordinator-own: "):
        check_bundle(site_dir)  # until the others approved the grown roster too


def test_a_roster_with_another_sites_key_swapped_is_refused_until_approved(fed, sites):
    site_dir = _ready(sites, fed)
    roster = Roster.load(site_dir / ROSTER_FILE)
    swapped = Roster({**roster.keys, "clinic-b": Ed25519PrivateKey.generate().public_key()}, roster.node_auth)
    (site_dir / ROSTER_FILE).write_text(swapped.to_json())

    with pytest.raises(ProvisionError, match="the roster changed and is refused until the site's operator checks it"):
        check_bundle(site_dir)
    assert review_roster(site_dir, site_dir / ROSTER_FILE).changes == ["KEY CHANGED for clinic-b"]


def test_a_roster_with_this_sites_own_key_swapped_cannot_be_approved(fed, sites, tmp_path):
    site_dir = sites["hospital-a"].site_dir
    roster = Roster.load(fed.bundle_dirs["hospital-a"] / ROSTER_FILE)
    swapped = Roster({**roster.keys, "hospital-a": Ed25519PrivateKey.generate().public_key()}, roster.node_auth)
    (tmp_path / "swapped.json").write_text(swapped.to_json())

    with pytest.raises(
        EnrolmentError, match="roster's identity key for site 'hospital-a' is .*, not this site's own key"
    ):
        review_roster(site_dir, tmp_path / "swapped.json")
    assert not (site_dir / ROSTER_PIN_FILE).exists()


def test_a_roster_without_this_site_cannot_be_approved(fed, sites, tmp_path):
    roster = Roster.load(fed.bundle_dirs["hospital-a"] / ROSTER_FILE)
    (tmp_path / "r.json").write_text(Roster({"clinic-b": roster.keys["clinic-b"]}, roster.node_auth).to_json())

    with pytest.raises(EnrolmentError, match="site 'hospital-a' is not in the roster"):
        review_roster(sites["hospital-a"].site_dir, tmp_path / "r.json")


def test_a_roster_whose_fingerprint_is_not_the_one_told_cannot_be_approved(fed, sites):
    with pytest.raises(EnrolmentError, match="not the 0000.* you were given: do not approve it"):
        review_roster(sites["hospital-a"].site_dir, fed.bundle_dirs["hospital-a"], expected_fingerprint="0000 " * 16)


def test_approval_installs_the_bundles_ca_and_connection(fed, sites):
    site_dir = sites["hospital-a"].site_dir

    pin = _approve(sites["hospital-a"], fed.bundle_dirs["hospital-a"])

    assert (site_dir / CA_CERT).read_bytes() == (fed.coordinator_dir / CA_CERT).read_bytes()
    assert (site_dir / CONNECTION_FILE).read_text() == 'superlink = "link.example.org:9092"\n'
    assert pin.site_id == "hospital-a" and pin.sites == ("clinic-b", "hospital-a")


# --- the roll call and the countersignatures ----------------------------------------------------------------


def test_a_roster_with_a_site_nobody_confirmed_is_not_approved_and_nothing_is_written(fed, sites, tmp_path):
    site_dir = sites["hospital-a"].site_dir
    review = review_roster(site_dir, fed.bundle_dirs["hospital-a"])

    with pytest.raises(EnrolmentError, match=r"not approved: no operator read out its roster code for \['clinic-b'\]"):
        approve_roster(review, confirmed=())
    with pytest.raises(EnrolmentError, match=r"confirmed site\(s\) \['lab-z'\] are not other sites of the roster"):
        approve_roster(review, confirmed=("clinic-b", "lab-z"))
    assert not [p for p in (ROSTER_PIN_FILE, ROSTER_FILE, COUNTERSIGNATURE_FILE) if (site_dir / p).exists()]


def test_approval_countersigns_the_roster_with_whom_the_operator_confirmed(fed, sites):
    site = sites["hospital-a"]

    _approve(site, fed.bundle_dirs["hospital-a"])

    own = Countersignature.load(site.site_dir / COUNTERSIGNATURE_FILE)
    assert (own.site_id, own.roster_fingerprint, own.confirmed) == ("hospital-a", fed.roster_fingerprint, ("clinic-b",))
    own.verify(load_private_key(site.site_dir / IDENTITY_KEY_FILE).public_key())
    assert RosterPin.load(site.site_dir / ROSTER_PIN_FILE).confirmed == ("clinic-b",)


def test_provision_hands_every_countersignature_of_the_roster_to_every_bundle(fed, sites):
    for site in sites.values():
        _approve(site, fed.bundle_dirs[site.request.site_id])

    collected = _collect(sites, fed)

    assert collected.countersigned == {"hospital-a": ("clinic-b",), "clinic-b": ("hospital-a",)}
    assert collected.awaiting_countersignature == []
    for bundle in collected.bundle_dirs.values():
        assert {c.site_id for c in load_countersignatures(bundle / COUNTERSIGNATURES_FILE)} == set(sites)


def test_a_site_refuses_to_start_until_every_other_site_countersigned(fed, sites):
    site = sites["hospital-a"]
    _approve(site, fed.bundle_dirs["hospital-a"])
    (site.site_dir / "data.csv").write_text("text,label\n")

    with pytest.raises(ProvisionError, match="lacks the countersignature of clinic-b: site 'hospital-a' uses a roster"):
        check_bundle(site.site_dir)
    _approve(sites["clinic-b"], fed.bundle_dirs["clinic-b"])
    _approve(site, _collect(sites, fed).bundle_dirs["hospital-a"])  # the same roster: installs the countersignatures
    approve_app(review_app(site.site_dir, write_app(site.site_dir.parent / "app" / "tinyapp")))
    assert check_bundle(site.site_dir) == site.site_dir


def test_countersignatures_of_an_earlier_roster_are_left_out_when_a_site_joins(fed, sites, tmp_path):
    for site in sites.values():
        _approve(site, fed.bundle_dirs[site.request.site_id])
    _collect(sites, fed)
    lab = init_site("lab-c", tmp_path / "sites" / "lab-c")

    grown = provision(tmp_path / "fed", [lab.request_path], superlink_hosts=["link.example.org"])

    assert grown.countersigned == {} and grown.awaiting_countersignature == ["clinic-b", "hospital-a", "lab-c"]
    assert load_countersignatures(grown.bundle_dirs["lab-c"] / COUNTERSIGNATURES_FILE) == []


def test_provision_refuses_a_countersignature_of_another_roster(fed, sites, tmp_path):
    _approve(sites["hospital-a"], fed.bundle_dirs["hospital-a"])
    lab = init_site("lab-c", tmp_path / "sites" / "lab-c")
    countersignature = sites["hospital-a"].site_dir / COUNTERSIGNATURE_FILE

    with pytest.raises(ProvisionError, match=r"site 'hospital-a' is of roster [0-9a-f]{64}, not the current roster"):
        provision(tmp_path / "fed", [lab.request_path], superlink_hosts=["h"], countersignatures=[countersignature])
    assert not (tmp_path / "fed" / "coordinator" / "requests" / "lab-c.json").exists()  # nothing written


def test_provision_refuses_a_countersignature_the_site_did_not_sign(fed, sites, tmp_path):
    roster = Roster.load(fed.coordinator_dir / ROSTER_FILE)
    forged = Countersignature.make(
        site_id="clinic-b", roster_fingerprint=roster.fingerprint(), confirmed=(), key=Ed25519PrivateKey.generate()
    )
    write_countersignature(tmp_path / "forged.json", forged)

    with pytest.raises(ProvisionError, match="of site 'clinic-b' does not verify under that site's key"):
        provision(tmp_path / "fed", [], superlink_hosts=["h"], countersignatures=[tmp_path / "forged.json"])


def test_a_bundle_with_a_forged_countersignature_is_not_approved(fed, sites):
    bundle = fed.bundle_dirs["hospital-a"]
    forged = Countersignature.make(
        site_id="clinic-b", roster_fingerprint=fed.roster_fingerprint, confirmed=(), key=Ed25519PrivateKey.generate()
    )
    write_countersignatures(bundle / COUNTERSIGNATURES_FILE, [forged])

    with pytest.raises(EnrolmentError, match="of site 'clinic-b' does not verify.*do not approve it"):
        review_roster(sites["hospital-a"].site_dir, bundle)


# --- the site check and the SuperNode command ---------------------------------------------------------------


def test_checked_site_gives_the_supernode_command(fed, sites):
    site = _ready(sites, fed)

    command = supernode_command(site, "link.example.org:9092", runtime_port=9200)

    assert command[1:3] == ["-m", "client.supernode"]  # flower-supernode, checking the site's app approvals
    assert command[command.index("--trusted-entities") + 1] == str(site / TRUSTED_ENTITIES_FILE)
    assert command[command.index("--superlink") + 1] == "link.example.org:9092"
    assert str(site / NODE_AUTH_KEY) in command and str(site / CA_CERT) in command
    assert str(site / NODE_CONFIG_FILE) in command and "--max-retries" not in command


def test_site_without_an_approved_app_is_refused(fed, sites):
    for other in sites.values():  # a roster every site approved and countersigned: only the app is missing
        _approve(other, fed.bundle_dirs[other.request.site_id])
    site = sites["hospital-a"]
    _approve(site, _collect(sites, fed).bundle_dirs["hospital-a"])
    (site.site_dir / "data.csv").write_text('text,label\n"good film",fresh\n')

    with pytest.raises(ProvisionError, match="no app approved at .* yet: the SuperNode would refuse every run"):
        check_bundle(site.site_dir)


def test_site_without_the_node_auth_key_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / NODE_AUTH_KEY).unlink()

    with pytest.raises(ProvisionError, match="node authentication key not found: .*node_auth_key"):
        check_bundle(site)


def test_site_with_a_group_readable_private_key_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / IDENTITY_KEY_FILE).chmod(0o640)

    with pytest.raises(ProvisionError, match="identity key .* has mode 0640; it must be 0600"):
        check_bundle(site)


def test_site_with_a_garbled_node_auth_key_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / NODE_AUTH_KEY).write_bytes(b"not a key")

    with pytest.raises(ProvisionError, match="is not an OpenSSH private key"):
        check_bundle(site)


def test_site_whose_node_auth_key_is_not_the_rosters_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / NODE_AUTH_KEY).write_bytes(make_node_auth_key()[0])

    with pytest.raises(ProvisionError, match="roster's node-auth key for site 'hospital-a' is not this site's own"):
        check_bundle(site)


def test_site_whose_data_file_is_missing_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / "data.csv").unlink()

    with pytest.raises(ProvisionError, match="data-path .*data.csv does not exist"):
        check_bundle(site)


def test_node_config_with_an_unknown_key_is_refused(fed, sites):
    site = _ready(sites, fed)
    with open(site / NODE_CONFIG_FILE, "a") as f:
        f.write("max-epsilom = 3.0\n")

    with pytest.raises(ProvisionError, match=r"node-config.toml: node config has unknown key\(s\) \['max-epsilom'\]"):
        check_bundle(site)


def test_node_config_that_is_not_toml_is_refused(fed, sites):
    site = _ready(sites, fed)
    (site / NODE_CONFIG_FILE).write_text("site-id = \n")

    with pytest.raises(ProvisionError, match="node-config.toml is not valid TOML"):
        check_bundle(site)


def test_node_config_with_a_negative_budget_is_refused(fed, sites):
    site = _ready(sites, fed)
    text = (site / NODE_CONFIG_FILE).read_text().replace("max-epsilon = 8.0", "max-epsilon = -1.0")
    (site / NODE_CONFIG_FILE).write_text(text)

    with pytest.raises(ProvisionError, match="'max-epsilon' must be > 0, got -1.0"):
        check_bundle(site)


# --- the command line ---------------------------------------------------------------------------------------


def test_cli_init_provision_approve_check(tmp_path, capsys):
    for s in ("a", "b"):
        assert cli_main(["site", "init", "--site-id", s, "--out", str(tmp_path / s)]) == 0
    init_out = capsys.readouterr().out
    fingerprint = SiteRequest.load(tmp_path / "a" / REQUEST_FILE).fingerprint()
    assert (
        f"request fingerprint (read it to the coordinator's operator): {fingerprint[:4]} {fingerprint[4:8]}" in init_out
    )

    requests = [
        "--site-request",
        str(tmp_path / "a" / REQUEST_FILE),
        "--site-request",
        str(tmp_path / "b" / REQUEST_FILE),
    ]
    assert cli_main(["provision", "--out", str(tmp_path / "f"), *requests, "--superlink-host", "127.0.0.1"]) == 0
    provision_out = capsys.readouterr().out
    roster_fingerprint = Roster.load(tmp_path / "f" / "coordinator" / ROSTER_FILE).fingerprint()
    assert (
        f"  a: {fingerprint[:4]} " in provision_out
        and f"roster fingerprint: {roster_fingerprint[:4]} " in provision_out
    )

    approve = ["site", "approve-roster", "--site-dir", str(tmp_path / "a"), str(tmp_path / "f" / "bundles" / "a")]
    assert cli_main([*approve, "--fingerprint", roster_fingerprint, "--yes"]) == 1  # b's operator read nothing
    assert "not approved: no operator read out this roster code for b." in capsys.readouterr().out
    for site, other in (("a", "b"), ("b", "a")):  # the roll call: each heard the other read out the same code
        bundle = str(tmp_path / "f" / "bundles" / site)
        assert (
            cli_main(
                ["site", "approve-roster", "--site-dir", str(tmp_path / site), bundle, "--confirmed", other, "--yes"]
            )
            == 0
        )
    approve_out = capsys.readouterr().out
    code = Roster.load(tmp_path / "f" / "coordinator" / ROSTER_FILE).code()
    assert approve_out.count(f"roster code: {code}\n") == 2
    assert "this site refuses every round until it holds the countersignature of: b " in approve_out
    (tmp_path / "a" / "data.csv").write_text("text,label\n")
    assert cli_main(["site", "check", str(tmp_path / "a")]) == 2
    assert "lacks the countersignature of b: " in capsys.readouterr().err

    countersignatures = [f"--countersignature={tmp_path / s / COUNTERSIGNATURE_FILE}" for s in ("a", "b")]
    provision = ["provision", "--out", str(tmp_path / "f"), *requests, "--superlink-host", "127.0.0.1"]
    assert cli_main([*provision, *countersignatures]) == 0
    assert "countersigned by a (its operator confirmed: b)" in capsys.readouterr().out
    assert cli_main(approve) == 0  # the same roster: installs the bundle's countersignatures, asks nothing
    assert "every other site countersigned this roster" in capsys.readouterr().out
    assert cli_main(["site", "check", str(tmp_path / "a")]) == 2
    assert "no app approved at" in capsys.readouterr().err
    app = write_app(tmp_path / "app" / "tinyapp")
    assert cli_main(["site", "approve-app", "--site-dir", str(tmp_path / "a"), str(app), "--yes"]) == 0
    capsys.readouterr()
    assert cli_main(["site", "check", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert f"roster pinned: {roster_fingerprint[:4]} " in out
    assert "apps approved: 1; the SuperNode runs only these:" in out and " site-tests/tinyapp 1.0.0 (approved " in out
    assert cli_main(["site", "check", str(tmp_path / "nope")]) == 2
    assert "site directory not found" in capsys.readouterr().err


def test_cli_approval_needs_the_operator(fed, sites, monkeypatch, capsys):
    site_dir = sites["hospital-a"].site_dir
    approve = ["site", "approve-roster", "--site-dir", str(site_dir), str(fed.bundle_dirs["hospital-a"])]

    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert cli_main(approve) == 2
    assert "approving a roster needs its operator" in capsys.readouterr().err

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "no")
    assert cli_main(approve) == 1
    assert not (site_dir / ROSTER_PIN_FILE).exists()

    monkeypatch.setattr("builtins.input", lambda prompt: "yes")
    assert cli_main(approve) == 0
    assert RosterPin.load(site_dir / ROSTER_PIN_FILE).fingerprint == fed.roster_fingerprint


def test_cli_a_roster_pinned_before_roll_calls_is_approved_again_at_one(fed, sites, capsys):
    site_dir = _ready(sites, fed)
    pin = json.loads((site_dir / ROSTER_PIN_FILE).read_text())
    del pin["confirmed"]  # as approve-roster wrote it before roll calls
    (site_dir / ROSTER_PIN_FILE).write_text(json.dumps(pin))
    approve = ["site", "approve-roster", "--site-dir", str(site_dir), str(fed.bundle_dirs["hospital-a"])]

    with pytest.raises(ProvisionError, match=r"operator did not confirm \['clinic-b'\] at the roll call"):
        check_bundle(site_dir)
    assert cli_main([*approve, "--confirmed", "clinic-b", "--yes"]) == 0
    assert "it is the roster approved at" in capsys.readouterr().out
    assert check_bundle(site_dir) == site_dir  # the countersignatures it held are kept


def test_cli_refuses_a_confirmed_site_that_is_not_in_the_roster(fed, sites, capsys):
    site_dir = sites["hospital-a"].site_dir
    approve = ["site", "approve-roster", "--site-dir", str(site_dir), str(fed.bundle_dirs["hospital-a"])]

    assert cli_main([*approve, "--confirmed", "clinic-b,lab-z", "--yes"]) == 2
    assert "--confirmed ['lab-z']: not other sites of this roster (clinic-b)" in capsys.readouterr().err
    assert not (site_dir / ROSTER_PIN_FILE).exists()


def test_cli_approving_the_approved_roster_again_asks_nothing(fed, sites, monkeypatch, capsys):
    site_dir = sites["hospital-a"].site_dir
    _approve(sites["hospital-a"], fed.bundle_dirs["hospital-a"])
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)

    assert cli_main(["site", "approve-roster", "--site-dir", str(site_dir), str(fed.bundle_dirs["hospital-a"])]) == 0
    assert "this is the roster already approved" in capsys.readouterr().out


def test_cli_provision_refuses_a_forged_request(sites, tmp_path, capsys):
    forged = _forged_request(sites["hospital-a"].request_path, **{"site-id": "clinic-z"})

    assert (
        cli_main(["provision", "--out", str(tmp_path / "f"), "--site-request", str(forged), "--superlink-host", "h"])
        == 2
    )
    assert "does not verify" in capsys.readouterr().err


def test_site_start_execs_the_supernode_with_flowers_phone_home_off(fed, sites, monkeypatch):
    site = _ready(sites, fed)
    calls = []
    monkeypatch.setattr("os.execvpe", lambda file, args, env: calls.append((file, args, env)))

    cli_main(["site", "start", str(site)])  # the SuperLink's address from the bundle's connection.toml

    ((file, args, env),) = calls
    assert args[:3] == [file, "-m", "client.supernode"] and "--trusted-entities" in args
    assert args[args.index("--superlink") + 1] == "link.example.org:9092"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert (
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        and "--allow-runtime-dependency-installation" not in args
    )


def test_site_start_refuses_a_site_with_an_open_key(fed, sites, monkeypatch, capsys):
    site = _ready(sites, fed)
    (site / NODE_AUTH_KEY).chmod(0o644)
    monkeypatch.setattr("os.execvpe", lambda *a: pytest.fail("must not start"))

    assert cli_main(["site", "start", str(site), "--superlink", "h:1"]) == 2
    assert "has mode 0644; it must be 0600" in capsys.readouterr().err


def test_site_start_refuses_a_changed_roster(fed, sites, monkeypatch, capsys):
    site = _ready(sites, fed)
    roster = Roster.load(site / ROSTER_FILE)
    (site / ROSTER_FILE).write_text(Roster({**roster.keys, "x": Ed25519PrivateKey.generate().public_key()}).to_json())
    monkeypatch.setattr("os.execvpe", lambda *a: pytest.fail("must not start"))

    assert cli_main(["site", "start", str(site)]) == 2
    assert "the roster changed" in capsys.readouterr().err
