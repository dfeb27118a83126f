"""privatune provision: CA, SuperLink certificate, site bundles; and the bundle check a site runs before starting."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared.cli import main as cli_main
from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, Roster
from shared.provision import (
    CA_CERT,
    CA_KEY,
    NODE_AUTH_KEY,
    NODE_AUTH_PUB,
    NODE_CONFIG_FILE,
    SUPERLINK_CERT,
    SUPERLINK_KEY,
    ProvisionError,
    check_bundle,
    provision,
    supernode_command,
)

PRIVATE_FILES = (CA_KEY, SUPERLINK_KEY, NODE_AUTH_KEY, IDENTITY_KEY_FILE)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _ready_bundle(site_dir: Path) -> Path:
    """Give the bundle the data file its node-config template points at (what a site does before starting)."""
    (site_dir / "data.csv").write_text('text,label\n"good film",fresh\n')
    return site_dir


@pytest.fixture()
def fed(tmp_path: Path):
    return provision(tmp_path / "fed", ["hospital-a", "clinic-b"], superlink_hosts=["link.example.org"], port=9092)


def test_private_keys_are_0600_and_each_lives_in_one_place_only(fed, tmp_path):
    privates = [p for p in (tmp_path / "fed").rglob("*") if p.name in PRIVATE_FILES]

    assert sorted(p.relative_to(tmp_path / "fed").as_posix() for p in privates) == [
        "coordinator/ca.key",
        "coordinator/superlink.key",
        "sites/clinic-b/identity_ed25519.pem",
        "sites/clinic-b/node_auth_key",
        "sites/hospital-a/identity_ed25519.pem",
        "sites/hospital-a/node_auth_key",
    ]
    assert all(_mode(p) == 0o600 for p in privates)
    contents = [p.read_bytes() for p in privates]
    assert len(set(contents)) == len(contents)
    everything_else = [p.read_bytes() for p in (tmp_path / "fed").rglob("*") if p.is_file() and p not in privates]
    assert not any(c in other for c in contents for other in everything_else)


def test_superlink_certificate_is_signed_by_the_ca_for_its_hosts_and_loopback(fed):
    ca = x509.load_pem_x509_certificate((fed.coordinator_dir / CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((fed.coordinator_dir / SUPERLINK_CERT).read_bytes())

    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"link.example.org", "localhost"} <= set(san.get_values_for_type(x509.DNSName))
    assert "127.0.0.1" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_node_auth_key_pair_is_what_flower_supernode_authentication_takes(fed):
    from flwr.cli.supernode.register import try_load_public_key

    site = fed.site_dirs["hospital-a"]
    private = serialization.load_ssh_private_key((site / NODE_AUTH_KEY).read_bytes(), password=None)
    registered = try_load_public_key(fed.coordinator_dir / "node-keys" / "hospital-a.pub")

    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert registered == private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert (site / NODE_AUTH_PUB).read_bytes() == (fed.coordinator_dir / "node-keys" / "hospital-a.pub").read_bytes()


def test_every_bundle_holds_the_same_roster_of_every_site(fed):
    rosters = [Roster.load(d / ROSTER_FILE) for d in fed.site_dirs.values()]

    assert all(r.to_json() == Roster.load(fed.coordinator_dir / ROSTER_FILE).to_json() for r in rosters)
    assert sorted(rosters[0].keys) == ["clinic-b", "hospital-a"]
    assert (fed.site_dirs["clinic-b"] / CA_CERT).read_bytes() == (fed.coordinator_dir / CA_CERT).read_bytes()


def test_rerun_adds_a_site_keeps_every_key_and_updates_every_roster(fed, tmp_path):
    before = {p: p.read_bytes() for p in (tmp_path / "fed").rglob("*") if p.name in PRIVATE_FILES}

    again = provision(tmp_path / "fed", ["lab-c"], superlink_hosts=["link.example.org"])

    assert all(p.read_bytes() == data for p, data in before.items())
    assert sorted(again.site_dirs) == ["clinic-b", "hospital-a", "lab-c"]
    assert sorted(Roster.load(again.site_dirs["hospital-a"] / ROSTER_FILE).keys) == ["clinic-b", "hospital-a", "lab-c"]


def test_checked_bundle_gives_the_supernode_command(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])

    command = supernode_command(site, "link.example.org:9092", runtime_port=9200)

    assert command[:3] == ["flower-supernode", "--superlink", "link.example.org:9092"]
    assert str(site / NODE_AUTH_KEY) in command and str(site / CA_CERT) in command
    assert str(site / NODE_CONFIG_FILE) in command and "--max-retries" not in command


@pytest.mark.parametrize(
    ("site_ids", "hosts", "port", "message"),
    [
        ([], ["h"], 9092, "at least one site id"),
        (["a", "a"], ["h"], 9092, "distinct"),
        (["bad id!"], ["h"], 9092, "site id must be"),
        (["a"], ["h"], 70000, "port must be in 1..65535, got 70000"),
        (["a"], [], 9092, "at least one host"),
    ],
)
def test_bad_provision_input_is_refused(tmp_path, site_ids, hosts, port, message):
    with pytest.raises(ProvisionError, match=message):
        provision(tmp_path / "fed", site_ids, superlink_hosts=hosts, port=port)


def test_bundle_without_the_node_auth_key_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    (site / NODE_AUTH_KEY).unlink()

    with pytest.raises(ProvisionError, match="node authentication key not found: .*node_auth_key"):
        check_bundle(site)


def test_bundle_with_a_group_readable_private_key_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    (site / IDENTITY_KEY_FILE).chmod(0o640)

    with pytest.raises(ProvisionError, match="identity key .* has mode 0640; it must be 0600"):
        check_bundle(site)


def test_bundle_with_a_garbled_node_auth_key_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    (site / NODE_AUTH_KEY).write_bytes(b"not a key")

    with pytest.raises(ProvisionError, match="is not an OpenSSH private key"):
        check_bundle(site)


def test_bundle_whose_data_file_is_missing_is_refused(fed):
    with pytest.raises(ProvisionError, match="data-path .*data.csv does not exist"):
        check_bundle(fed.site_dirs["hospital-a"])


def test_node_config_with_an_unknown_key_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    with open(site / NODE_CONFIG_FILE, "a") as f:
        f.write("max-epsilom = 3.0\n")

    with pytest.raises(ProvisionError, match=r"node-config.toml: node config has unknown key\(s\) \['max-epsilom'\]"):
        check_bundle(site)


def test_node_config_that_is_not_toml_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    (site / NODE_CONFIG_FILE).write_text("site-id = \n")

    with pytest.raises(ProvisionError, match="node-config.toml is not valid TOML"):
        check_bundle(site)


def test_node_config_with_a_negative_budget_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    text = (site / NODE_CONFIG_FILE).read_text().replace("max-epsilon = 8.0", "max-epsilon = -1.0")
    (site / NODE_CONFIG_FILE).write_text(text)

    with pytest.raises(ProvisionError, match="'max-epsilon' must be > 0, got -1.0"):
        check_bundle(site)


def test_identity_key_not_in_the_roster_is_refused(fed):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    other = fed.site_dirs["clinic-b"]
    (site / ROSTER_FILE).write_text(Roster({"clinic-b": Roster.load(other / ROSTER_FILE).keys["clinic-b"]}).to_json())

    with pytest.raises(ProvisionError, match="site-id 'hospital-a' is not in the roster"):
        check_bundle(site)


def test_cli_provision_then_site_check(tmp_path, capsys):
    assert cli_main(["provision", "--out", str(tmp_path / "f"), "--sites", "a,b", "--superlink-host", "127.0.0.1"]) == 0
    _ready_bundle(tmp_path / "f" / "sites" / "a")

    assert cli_main(["site", "check", str(tmp_path / "f" / "sites" / "a")]) == 0
    assert cli_main(["site", "check", str(tmp_path / "f" / "sites" / "nope")]) == 2
    assert "site bundle not found" in capsys.readouterr().err


def test_site_start_execs_the_supernode_with_flowers_phone_home_off(fed, monkeypatch):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    calls = []
    monkeypatch.setattr("os.execvpe", lambda file, args, env: calls.append((file, args, env)))

    cli_main(["site", "start", str(site), "--superlink", "link.example.org:9092"])

    ((file, args, env),) = calls
    assert file == "flower-supernode" and args[args.index("--superlink") + 1] == "link.example.org:9092"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert (
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
        and "--allow-runtime-dependency-installation" not in args
    )


def test_site_start_refuses_a_bundle_with_an_open_key(fed, monkeypatch, capsys):
    site = _ready_bundle(fed.site_dirs["hospital-a"])
    (site / NODE_AUTH_KEY).chmod(0o644)
    monkeypatch.setattr("os.execvpe", lambda *a: pytest.fail("must not start"))

    assert cli_main(["site", "start", str(site), "--superlink", "h:1"]) == 2
    assert "has mode 0644; it must be 0600" in capsys.readouterr().err
