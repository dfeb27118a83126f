"""A site's own settings: from its node config when deployed, from its site.toml when simulated."""

import math

import pytest

from shared.site import SiteConfigError, read_site_settings, site_from_node_config, write_site_settings


def test_a_simulated_site_lives_under_the_sim_dir_with_no_budget_by_default(tmp_path):
    site = site_from_node_config({"partition-id": 3, "num-partitions": 5}, sim_dir=tmp_path)
    assert (site.site_id, site.site_dir, site.simulated) == ("site-3", tmp_path / "sites" / "site-3", True)
    assert math.isinf(site.max_epsilon) and site.delta is None and site.data_path is None


def test_a_simulated_site_takes_its_budget_from_its_own_site_toml(tmp_path):
    write_site_settings(tmp_path / "sites" / "site-1", {"max-epsilon": 4.5, "delta": 1e-6})
    site = site_from_node_config({"partition-id": 1, "num-partitions": 2}, sim_dir=tmp_path)
    assert (site.max_epsilon, site.delta) == (4.5, 1e-6)
    other = site_from_node_config({"partition-id": 0, "num-partitions": 2}, sim_dir=tmp_path)
    assert math.isinf(other.max_epsilon)


def test_a_deployed_site_names_everything_in_its_node_config(tmp_path):
    node = {
        "site-id": "hospital-a",
        "site-dir": str(tmp_path),
        "data-path": "/data/notes.csv",
        "device": "cuda:0",
        "max-epsilon": 3,
        "delta": 1e-6,
        "accountant": "rdp",
        "labels": "neg,pos",
    }
    site = site_from_node_config(node, sim_dir=tmp_path / "unused")
    assert (site.site_id, site.device, site.max_epsilon, site.simulated) == ("hospital-a", "cuda:0", 3.0, False)
    assert site.ledger_path == tmp_path / "privacy_ledger.jsonl"
    assert (site.accounting(), site.data_source, site.labels) == ((1e-6, "rdp"), "default", ("neg", "pos"))
    assert not site.allow_evaluate and site.fingerprint_key_path == tmp_path / "fingerprint.key"


@pytest.mark.parametrize("missing", ["delta", "accountant", "labels"])
def test_a_deployed_site_must_set_its_own_delta_accountant_and_labels(tmp_path, missing):
    node = {"site-id": "a", "site-dir": "/x", "data-path": "/d.csv", "delta": 1e-5, "accountant": "prv"}
    node["labels"] = "neg,pos"
    del node[missing]
    with pytest.raises(SiteConfigError, match=f"node config of site 'a' must set '{missing}'"):
        site_from_node_config(node, sim_dir=tmp_path)


def test_a_simulated_site_is_pinned_at_first_use_and_keeps_its_pin(tmp_path):
    from shared.site import pin_simulated_accounting

    site = site_from_node_config({"partition-id": 0, "num-partitions": 2}, sim_dir=tmp_path)
    pinned = pin_simulated_accounting(site, delta=1e-6, accountant="rdp")
    again = pin_simulated_accounting(
        site_from_node_config({"partition-id": 0, "num-partitions": 2}, sim_dir=tmp_path), delta=0.5, accountant="prv"
    )

    assert pinned.accounting() == again.accounting() == (1e-6, "rdp")
    assert read_site_settings(site.site_dir) == {"delta": 1e-6, "accountant": "rdp"}
    with pytest.raises(SiteConfigError, match="delta is pinned to 1e-06"):
        write_site_settings(site.site_dir, {"delta": 0.5})
    write_site_settings(site.site_dir, {"max-epsilon": 2.0, "allow-evaluate": True})
    assert read_site_settings(site.site_dir) == {
        "delta": 1e-6,
        "accountant": "rdp",
        "max-epsilon": 2.0,
        "allow-evaluate": True,
    }


def test_a_simulated_site_with_a_ledger_is_pinned_to_its_ledgers_first_entry(tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from shared.ledger import SiteLedger, keyed_fingerprint_rows
    from shared.privacy import DpEvent
    from shared.site import pin_simulated_accounting

    site = site_from_node_config({"partition-id": 0, "num-partitions": 2}, sim_dir=tmp_path)
    SiteLedger(site.ledger_path, site_id="site-0", signing_key=Ed25519PrivateKey.generate()).append(
        run_id="1",
        server_round=1,
        adapter_hash="sha256:00",
        dataset_fingerprint=keyed_fingerprint_rows([("x", 0)], key=bytes(32)),
        event=DpEvent(0.1, 1.0, 1, 1.0),
        delta=1e-7,
        accountant="rdp",
    )

    assert pin_simulated_accounting(site, delta=0.5, accountant="prv").accounting() == (1e-7, "rdp")


@pytest.mark.parametrize(
    ("node", "message"),
    [
        ({}, "node config has neither 'site-id'"),
        ({"site-id": "a"}, "node config of site 'a' must set 'site-dir'"),
        ({"site-id": "a", "site-dir": "/x"}, "must set 'data-path'"),
        ({"partition-id": 0, "max-epsilon": 0}, "'max-epsilon' must be > 0"),
        ({"partition-id": 0, "max-epsilon": "big"}, "'max-epsilon' must be a number"),
        ({"partition-id": 0, "delta": 1.0}, "'delta' must be in (0, 1)"),
    ],
)
def test_bad_node_config_is_a_clear_error(tmp_path, node, message):
    with pytest.raises(SiteConfigError) as err:
        site_from_node_config(node, sim_dir=tmp_path)
    assert message in str(err.value)


def test_bad_site_toml_is_a_clear_error(tmp_path):
    (tmp_path / "site.toml").write_text("max-epsilon = [")
    with pytest.raises(SiteConfigError, match="is not valid TOML"):
        read_site_settings(tmp_path)
    (tmp_path / "site.toml").write_text('data-path = "/elsewhere.csv"\n')
    with pytest.raises(SiteConfigError, match=r"unknown key\(s\) \['data-path'\]"):
        read_site_settings(tmp_path)
    with pytest.raises(SiteConfigError, match="unknown simulated-site setting"):
        write_site_settings(tmp_path, {"noise": 1})
