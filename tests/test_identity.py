"""Simulated sites' identities: one key per site, kept across runs, and a roster that never shrinks."""

from __future__ import annotations

from shared.identity import IDENTITY_KEY_FILE, ROSTER_FILE, Roster, load_private_key, provision_simulation


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
